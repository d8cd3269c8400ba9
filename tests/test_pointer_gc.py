"""Dropped pointers free the owner's memory; pointers to the owner's own objects never do."""

from __future__ import annotations

import gc
import time

import pytest
import torch

import duet_p2p as sy
from duet_p2p.scientist import session as scientist_module
from tests.conftest import wait_for

TIMEOUT = 10.0
GC_WAIT = 5.0  # deletes go out every 0.5 s or per 512


def _peer_objects(owner: sy.Duet) -> int:
    """Objects the owner's worker holds for the scientist, once queued work is done."""
    return owner._core.holdings().objects


def _settled(owner: sy.Duet, expected: int) -> bool:
    """Whether the owner holds ``expected`` peer objects once queued work is done."""
    return wait_for(lambda: _peer_objects(owner) == expected, GC_WAIT)


def test_dropped_intermediates_are_freed(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    owner, scientist = duet_pair
    owner.store.send(torch.arange(4.0), tags=["data"])
    owner.requests.add_handler(action="accept")
    data = scientist.store["data"]
    assert data.sum().item().get(timeout_secs=TIMEOUT, delete=True) == 6.0
    assert _settled(owner, 0)

    pointers = [data + i for i in range(1000)]
    assert wait_for(lambda: _peer_objects(owner) == 1000, GC_WAIT), _peer_objects(owner)
    assert owner._core.holdings().bytes == 1000 * 4 * 4

    del pointers
    gc.collect()
    assert _settled(owner, 0), _peer_objects(owner)
    assert owner._core.holdings().bytes == 0


def test_temporaries_in_chains_are_freed_and_results_kept(
    duet_pair: tuple[sy.Duet, sy.Duet],
) -> None:
    owner, scientist = duet_pair
    owner.store.send(torch.ones(3), tags=["data"], public=True)
    data = scientist.store["data"]
    kept = [((data * i) + 1).sum() for i in range(300)]  # two temporaries each
    gc.collect()
    assert _settled(owner, 300), _peer_objects(owner)
    values = [p.get(timeout_secs=TIMEOUT).item() for p in kept[:3]]
    assert values == [3.0, 6.0, 9.0]
    assert kept[-1].get(timeout_secs=TIMEOUT).item() == 3.0 * 299 + 3.0


def test_deletes_never_overtake_the_actions_that_use_them(
    duet_pair: tuple[sy.Duet, sy.Duet], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pointer dropped right after use: its delete must reach the owner after the action
    that reads it, even when the periodic delete fires in between."""
    owner, scientist = duet_pair
    monkeypatch.setattr(scientist_module, "DELETE_INTERVAL", 0.001)
    owner.store.send(torch.ones(2), tags=["data"], public=True)
    data = scientist.store["data"]
    results = []
    for i in range(2000):
        temporary = data + i
        results.append(temporary.sum())
        del temporary
        if i % 50 == 0:
            time.sleep(0.001)  # let the loop thread interleave
    assert _settled(owner, len(results)), _peer_objects(owner)
    held = owner._core.holdings().ids
    assert [p.id for p in results if p.id not in held] == []


def test_store_pointers_never_free_owner_objects(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    owner, scientist = duet_pair
    owner.store.send(torch.tensor([[0, 0], [0, 1]]), tags=["data"])
    owner.store.send(torch.tensor([[0], [0]]), tags=["target"])
    for _ in range(50):
        pointer = scientist.store[0]
        also = scientist.store["target"]
        del pointer, also
    pointers = list(scientist.store)
    del pointers
    gc.collect()
    time.sleep(1.2)  # two delete intervals
    assert len(owner.store) == 2
    assert len(scientist.store) == 2
    assert _peer_objects(owner) == 0
    # and the scientist can still use them
    owner.requests.add_handler(action="accept")
    assert scientist.store[0].sum().item().get(timeout_secs=TIMEOUT) == 1


def test_deleting_an_owner_object_id_is_ignored(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    """Even a forged delete for an owner object's ID frees nothing."""
    owner, scientist = duet_pair
    hosted = owner.store.send(torch.ones(2), tags=["data"])
    scientist._core.release(hosted.id)
    scientist._core.sync(scientist._core.flush(), timeout=TIMEOUT)
    time.sleep(1.2)
    assert owner._core.store.get(hosted.id) is not None
    assert len(scientist.store) == 1


def test_get_with_delete_frees_the_result(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    owner, scientist = duet_pair
    owner.store.send(torch.ones(2), tags=["data"], public=True)
    result = scientist.store["data"] * 3
    assert _settled(owner, 1)
    assert torch.equal(result.get(timeout_secs=TIMEOUT, delete=True), torch.full((2,), 3.0))
    assert _settled(owner, 0)


def test_closing_the_session_sends_pending_deletes(
    duet_pair: tuple[sy.Duet, sy.Duet], monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, scientist = duet_pair
    monkeypatch.setattr(scientist_module, "DELETE_INTERVAL", 60.0)  # only close sends them
    owner.store.send(torch.ones(2), tags=["data"], public=True)
    data = scientist.store["data"]
    time.sleep(0.6)  # let the periodic loop start its long sleep
    pointers = [data + i for i in range(10)]
    assert _settled(owner, 10)
    del pointers
    gc.collect()
    time.sleep(0.2)
    assert _peer_objects(owner) == 10  # dropped, not yet sent
    scientist.close()
    assert _settled(owner, 0)
