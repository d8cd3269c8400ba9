"""A journaled Owner (as a standing host runs it) on the in-memory transport: a scientist
leaves with a request pending, the owner decides, the scientist comes back and fetches it;
requests listed per scientist; DP requests end with their session; restart restores."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import duet_p2p as sy
from duet_p2p.duet import Duet
from duet_p2p.host.host import _request_of
from duet_p2p.host.state import HostState
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.owner import Owner
from duet_p2p.owner.session import OwnerCore
from duet_p2p.permissions import AuditLog
from duet_p2p.permissions.ledger import open_ledger
from duet_p2p.runtime import get_runtime
from tests.conftest import wait_for
from tests.owner.test_owner_sessions import _session

WAIT = 15.0
HOST_ID = "a" * 32
ALICE, BOB = "b" * 32, "c" * 32


class Host:
    """An Owner with a journal, and sessions to open and close."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = HostState.open(tmp)
        self.owner = Owner(allowlist=sy.DEFAULT_ALLOWLIST, limits=OwnerLimits(),
                           audit=AuditLog(tmp / "audit.jsonl"), journal=self.state,
                           keep_released=3600.0,
                           ledger=open_ledger(tmp / "ledger.sqlite"))  # fmt: skip
        self.open: list[tuple[OwnerCore, Duet]] = []

    def connect(self, client_id: str) -> Duet:
        pair = get_runtime().run(_session(self.owner, client_id), timeout=60)
        self.open.append(pair)
        return pair[1]

    def leave(self, duet: Duet) -> None:
        for core, scientist in list(self.open):
            if scientist is duet:
                get_runtime().run(scientist.aclose(), timeout=15)
                get_runtime().run(core.close(), timeout=15)
                self.open.remove((core, scientist))

    def close(self) -> None:
        for _, duet in list(self.open):
            self.leave(duet)
        self.owner.close()
        self.state.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        with contextlib.suppress(Exception):
            h.close()


def _ages(duet: Duet) -> sy.Pointer:
    assert wait_for(lambda: len(duet.store.refresh()) == 1, WAIT)
    return duet.store["ages"]


def test_a_value_accepted_while_away_is_fetched_once_on_return(host: Host):
    host.owner.host(torch.arange(10.0), tags=("ages",))
    alice = host.connect(ALICE)
    handle = _ages(alice).mean().get(reason="mean", request_block=False)
    assert wait_for(lambda: len(host.owner.requests) == 1 and host.owner.requests[0].ready, WAIT)
    host.leave(alice)
    host.owner.requests[0].accept()
    again = host.connect(ALICE)
    mine = again.requests
    assert [(r.request_id, r.status, r.kept) for r in mine] == [(handle.request_id, "accepted",
                                                                 True)]  # fmt: skip
    assert float(mine[0].get(timeout=WAIT)) == pytest.approx(4.5)
    with pytest.raises(sy.DuetError, match="already fetched|no longer kept"):
        again.requests[0].get(timeout=WAIT)
    assert host.state.get(handle.request_id).delivered


def test_requests_are_listed_and_fetched_only_by_their_scientist(host: Host):
    host.owner.host(torch.arange(10.0), tags=("ages",))
    alice = host.connect(ALICE)
    handle = _ages(alice).sum().get(request_block=False)
    assert wait_for(lambda: len(host.owner.requests) == 1 and host.owner.requests[0].ready, WAIT)
    host.owner.requests[0].accept()
    bob = host.connect(BOB)
    assert len(bob.requests) == 0
    core = bob._core
    with pytest.raises(sy.RemoteError) as stolen:
        core.sync(core.fetch_release(handle.request_id, None, WAIT))
    with pytest.raises(sy.RemoteError) as unknown:
        core.sync(core.fetch_release("f" * 32, None, WAIT))
    assert str(stolen.value).replace(handle.request_id, "X") == str(unknown.value).replace(
        "f" * 32, "X"
    )
    assert float(handle.result(timeout=WAIT)) == 45.0  # alice still gets hers


def test_a_pending_request_is_not_fetchable_and_a_denied_one_says_so(host: Host):
    host.owner.host(torch.arange(10.0), tags=("ages",))
    alice = host.connect(ALICE)
    _ages(alice).sum().get(request_block=False)
    assert wait_for(lambda: len(host.owner.requests) == 1 and host.owner.requests[0].ready, WAIT)
    with pytest.raises(sy.RequestTimeout, match="still waiting"):
        alice.requests[0].get(timeout=WAIT)
    host.leave(alice)
    host.owner.requests[0].deny("no")
    again = host.connect(ALICE)
    assert again.requests[0].status == "denied"
    with pytest.raises(sy.PermissionDenied, match="no"):
        again.requests[0].get(timeout=WAIT)
    assert host.state.payload(again.requests[0].request_id) is None


def test_a_dp_request_ends_with_its_session(host: Host):
    host.owner.host(torch.arange(100.0).reshape(100, 1), tags=("ages",), columns=["age"])
    host.owner.ledger.set_budget("ages", 1.0)
    alice = host.connect(ALICE)
    _ages(alice)
    handle = alice.dp.mean(alice.store["ages"], "age", bounds=(0, 100), epsilon=0.5,
                           request_block=False)  # fmt: skip
    assert wait_for(lambda: len(host.owner.requests) == 1, WAIT)
    host.leave(alice)
    assert wait_for(lambda: len(host.owner.requests) == 0, WAIT)
    assert host.owner.requests[handle.request_id].status.value == "expired"
    assert host.owner.ledger.debits() == []


def test_pending_requests_come_back_after_a_restart(host: Host):
    host.owner.host(torch.arange(10.0), tags=("ages",))
    alice = host.connect(ALICE)
    handle = _ages(alice).max().get(request_block=False)
    assert wait_for(lambda: len(host.owner.requests) == 1 and host.owner.requests[0].ready, WAIT)
    host.leave(alice)
    host.close()
    state = HostState.open(host.tmp)
    try:
        (stored,) = state.pending()
        request = _request_of(stored, lambda rid: state.payload(rid))
        assert request.request_id == handle.request_id
        assert request.requester == ALICE and request.pending and request.ready
        assert request.requested_at <= time.time()
    finally:
        state.close()


def test_a_scientist_who_leaves_at_once_still_has_the_request_kept(host: Host):
    host.owner.host(torch.rand(1500, 1500), tags=("ages",))
    alice = host.connect(ALICE)
    ages = _ages(alice)
    handle = (ages @ ages @ ages).sum().get(request_block=False)  # still computing...
    host.leave(alice)  # ...when she leaves
    assert wait_for(lambda: len(host.owner.requests) == 1, WAIT)
    request = host.owner.requests[0]
    assert request.request_id == handle.request_id and request.pending and request.ready
    request.accept()
    again = host.connect(ALICE)
    assert again.requests[0].kept
    assert isinstance(float(again.requests[0].get(timeout=WAIT)), float)
