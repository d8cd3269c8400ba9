"""Fixtures for the network-namespace tests (`make test-network`, needs root)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # netns.py is imported by path, whatever the import mode
    sys.path.insert(0, str(HERE))

import netns  # noqa: E402


@pytest.fixture(scope="session")
def require_netns() -> Iterator[None]:
    """Skip (fail when env CI is set) unless root can create namespaces; clean leftovers."""
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"network tests cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    netns.cleanup_leftovers()
    yield
    netns.cleanup_leftovers()
