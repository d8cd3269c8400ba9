"""What every red-team test needs: a real session, and the checks that nothing broke."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import duet_p2p as sy
from tests.conftest import close_pair, make_pair, wait_for

WAIT = 15.0


@contextlib.contextmanager
def session(
    signaling_url: str, tmp_path: Path, **owner_options: Any
) -> Iterator[tuple[sy.Duet, sy.Duet]]:
    """(owner, scientist) over real WebRTC on loopback, the owner with its worker process."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    owner, scientist = make_pair(signaling_url, tmp_path / "audit.jsonl", **owner_options)
    try:
        yield owner, scientist
    finally:
        close_pair(scientist, owner)


def host(owner: sy.Duet, scientist: sy.Duet, value: Any, tag: str, **options: Any) -> Any:
    """Host ``value`` and return the scientist's pointer to it."""
    owner.store.send(value, tags=[tag], **options)
    return scientist.store.refresh()[tag]


def assert_serving(owner: sy.Duet, scientist: sy.Duet) -> None:
    """The owner still computes and answers for this scientist."""
    assert torch.equal((scientist.torch.ones(3) * 2).get(timeout_secs=WAIT), torch.full((3,), 2.0))
    assert owner.connected


def pending(handle: Any, timeout: float = 0.5) -> bool:
    """The request is still waiting for the owner (no rule released it)."""
    return handle.wait(timeout) == "pending"


def released(owner: sy.Duet) -> list[dict[str, Any]]:
    return [e for e in owner.audit.entries() if e.get("event") == "release"]


def ready_requests(owner: sy.Duet, count: int) -> list[Any]:
    """The owner's requests, once ``count`` of them have their value (or failure) known."""
    assert wait_for(lambda: sum(r.ready for r in owner.requests.all()) >= count, WAIT)
    return owner.requests.all()
