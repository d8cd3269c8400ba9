"""The worker a scientist's actions run in holds nothing of the owner's process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.hostile.common import host, session


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_worker_is_confined_and_holds_no_owner_secrets(
    signaling_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DUET_TEST_API_TOKEN", "hunter2-owner-secret")
    with session(signaling_url, tmp_path) as (owner, scientist):
        host(owner, scientist, torch.ones(4), "data")
        worker = owner._core.worker.current
        assert worker is not None and worker.pid != os.getpid()
        environ = Path(f"/proc/{worker.pid}/environ").read_bytes()
        assert b"hunter2-owner-secret" not in environ
        limits = Path(f"/proc/{worker.pid}/limits").read_text()
        address_space = next(line for line in limits.splitlines() if "address space" in line)
        assert "unlimited" not in address_space.split()[3], address_space  # the soft limit
        file_size = next(line for line in limits.splitlines() if "file size" in line)
        assert file_size.split()[3] == "0", file_size
        if os.environ.get("CI"):
            assert owner._core.worker.sandbox == "seccomp"
        status = Path(f"/proc/{worker.pid}/status").read_text()
        if owner._core.worker.sandbox == "seccomp":
            assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
