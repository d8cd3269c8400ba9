"""Requests end to end over real WebRTC: deny, timeout, non-blocking handles, deletes,
and public values that need no request (variants of the seed flow in test_seed_flow.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

import duet_p2p as sy
from duet_p2p.permissions import RequestStatus
from tests.conftest import wait_for

Pair = tuple[sy.Duet, sy.Duet]
WAIT = 10.0


def host(owner: sy.Duet, scientist: sy.Duet, value: torch.Tensor, tag: str, **options: object):
    """Host ``value`` under ``tag`` and return the scientist's pointer to it."""
    owner.store.send(value, tags=[tag], **options)
    return scientist.store.refresh()[tag]


def owner_decides(owner: sy.Duet, decide: Callable[[object], None]) -> threading.Thread:
    """Start a thread that waits (bounded) for the next request and decides it."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            request = owner.requests.wait(timeout=WAIT)
            assert request is not None, "no request arrived"
            decide(request)
        except BaseException as exc:  # noqa: BLE001 - surfaced by join_ok
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.failures = failures  # type: ignore[attr-defined]
    thread.start()
    return thread


def join_ok(thread: threading.Thread) -> None:
    thread.join(WAIT)
    assert not thread.is_alive(), "the owner's decision thread did not finish"
    failures = thread.failures  # type: ignore[attr-defined]
    if failures:
        raise failures[0]


def test_denial_carries_the_owners_reason(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    data = host(owner, scientist, torch.tensor([[0, 0], [0, 1]]), "data")
    decider = owner_decides(owner, lambda r: r.deny("not before the ethics review"))
    with pytest.raises(sy.PermissionDenied) as caught:
        data.sum().item().get(reason="to see the result", timeout_secs=WAIT)
    join_ok(decider)
    assert caught.value.reason == "not before the ethics review"
    assert "not before the ethics review" in str(caught.value)
    [request] = owner.requests.all()
    assert request.status is RequestStatus.DENIED and request.decided_by == "owner"


def test_timeout_without_decision_cancels_the_request(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    data = host(owner, scientist, torch.arange(6.0), "data")
    started = time.monotonic()
    with pytest.raises(sy.RequestTimeout):
        data.mean().get(reason="nobody is there", timeout_secs=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    [request] = owner.requests.all()
    assert wait_for(lambda: request.status is RequestStatus.CANCELLED, WAIT)
    assert request.decided_by == "requester"
    assert len(owner.requests) == 0
    with pytest.raises(sy.DuetError, match="already cancelled"):
        request.accept()


def test_non_blocking_request_polled_until_accepted(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    data = host(owner, scientist, torch.tensor([1.0, 2.0, 3.0]), "data")
    handle = data.sum().get(reason="later", request_block=False)
    assert handle.status == "pending"
    assert owner.requests[0].request_id == handle.request_id
    decider = owner_decides(owner, lambda r: r.accept())
    assert wait_for(lambda: handle.status != "pending", WAIT), "no decision arrived"
    join_ok(decider)
    assert handle.status == "accepted"
    assert torch.equal(handle.result(timeout=WAIT), torch.tensor(6.0))


def test_handle_wait_returns_the_status(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    data = host(owner, scientist, torch.tensor([4, 5]), "data")
    handle = data.max().request(reason="the maximum")
    started = time.monotonic()
    assert handle.wait(0.3) == "pending"
    assert 0.25 <= time.monotonic() - started < 3
    assert len(owner.requests) == 1, "waiting must not withdraw the request"
    owner.requests[0].accept()
    assert handle.wait(WAIT) == "accepted"
    assert handle.result(timeout=1).item() == 5

    denied = data.min().request()
    owner.requests.wait(WAIT).deny("enough")  # type: ignore[union-attr]
    assert denied.wait(WAIT) == "denied"
    with pytest.raises(sy.PermissionDenied):
        denied.result(timeout=1)


def test_get_with_delete_frees_the_owners_object(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    owner.requests.add_handler("accept", tags=["data"])
    data = host(owner, scientist, torch.tensor([1, 2, 3]), "data")
    store = owner._core.store  # the owner's hosted objects (test introspection)

    def held(pointer: sy.Pointer) -> bool:
        return pointer.id in owner._core.holdings().ids

    kept = data * 10
    assert torch.equal(kept.get(timeout_secs=WAIT), torch.tensor([10, 20, 30]))
    assert held(kept), "a plain get keeps the object"
    assert torch.equal(kept.get(timeout_secs=WAIT), torch.tensor([10, 20, 30]))

    freed = data + 1
    assert torch.equal(freed.get(timeout_secs=WAIT, delete=True), torch.tensor([2, 3, 4]))
    assert wait_for(lambda: not held(freed), WAIT)
    with pytest.raises(sy.RemoteError, match="no object"):
        freed.get(timeout_secs=WAIT)

    data.get(timeout_secs=WAIT, delete=True)
    assert store.get(data.id) is not None, "delete never frees what the owner hosts"


def test_public_values_need_no_request(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    weights = host(owner, scientist, torch.tensor([0.5, 1.5]), "weights", public=True)
    private = host(owner, scientist, torch.tensor([7.0, 9.0]), "private")

    assert torch.equal(weights.get(timeout_secs=WAIT), torch.tensor([0.5, 1.5]))
    assert (weights * 2).sum().item().get(timeout_secs=WAIT) == 4.0
    assert torch.equal((weights + torch.ones(2)).get(timeout_secs=WAIT), torch.tensor([1.5, 2.5]))
    assert owner.requests.all() == [], "public values never enter the request queue"

    mixed = (weights * private).sum()
    handle = mixed.request()
    assert handle.wait(0.3) == "pending", "anything touching private data needs a decision"
    assert owner.requests[0].tags == frozenset({"private", "weights"})
    owner.requests[0].deny("no")
    assert handle.wait(WAIT) == "denied"
