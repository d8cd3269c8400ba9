"""One Owner, two sessions: hosted data and rules shared, objects and decisions apart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import duet_p2p as sy
from duet_p2p.connect import Connection
from duet_p2p.duet import Duet
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.owner import Owner
from duet_p2p.owner.session import OwnerCore, new_supervisor
from duet_p2p.permissions import AuditLog
from duet_p2p.runtime import get_runtime
from duet_p2p.scientist.session import ScientistCore
from duet_p2p.transport.memory import memory_pair
from tests.conftest import wait_for

WAIT = 15.0
HOST_ID = "a" * 32


async def _session(owner: Owner, client_id: str) -> tuple[OwnerCore, Duet]:
    owner_end, scientist_end = memory_pair()
    owner_side = Connection("owner", HOST_ID, client_id, owner_end, None, "memory", 0.0)
    scientist_side = Connection("scientist", HOST_ID, client_id, scientist_end, None, "memory", 0.0)
    supervisor = new_supervisor(owner.allowlist, owner.limits)
    supervisor.prestart()
    core = OwnerCore(owner_side, allowlist=owner.allowlist, limits=owner.limits,
                     audit=owner.audit, supervisor=supervisor, owner=owner)  # fmt: skip
    scientist = ScientistCore(scientist_side)
    await asyncio.gather(core.start(), scientist.start())
    return core, Duet(scientist_side, scientist, background=True)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[Owner, list[OwnerCore], list[Duet]]]:
    owner = Owner(allowlist=sy.DEFAULT_ALLOWLIST, limits=OwnerLimits(),
                  audit=AuditLog(tmp_path / "audit.jsonl"))  # fmt: skip
    runtime = get_runtime()
    pairs = [runtime.run(_session(owner, c * 32), timeout=60) for c in "bc"]
    cores, scientists = [p[0] for p in pairs], [p[1] for p in pairs]
    try:
        yield owner, cores, scientists
    finally:
        for scientist in scientists:
            with contextlib.suppress(Exception):
                runtime.run(scientist.aclose(), timeout=15)
        for core in cores:
            with contextlib.suppress(Exception):
                runtime.run(core.close(), timeout=15)
        owner.close()


def test_hosting_once_serves_every_session(shared):
    owner, cores, (alice, bob) = shared
    owner.host(torch.arange(10.0), tags=("ages",))
    owner.requests.add_handler("accept", op="sum")
    for scientist in (alice, bob):
        assert wait_for(lambda s=scientist: len(s.store.refresh()) == 1, WAIT)
        assert scientist.store["ages"].sum().get(timeout_secs=WAIT) == 45
    assert all(core.owner is owner for core in cores)


def test_decisions_go_to_the_session_that_asked(shared):
    owner, _, (alice, bob) = shared
    owner.host(torch.arange(10.0), tags=("ages",))
    assert wait_for(lambda: len(alice.store.refresh()) == 1 and len(bob.store.refresh()) == 1,
                    WAIT)  # fmt: skip
    from_alice = alice.store["ages"].max().request(reason="alice")
    from_bob = bob.store["ages"].min().request(reason="bob")
    assert wait_for(lambda: len(owner.requests) == 2 and all(r.ready for r in owner.requests),
                    WAIT)  # fmt: skip
    by_requester = {r.requester: r for r in owner.requests}
    assert set(by_requester) == {"b" * 32, "c" * 32}
    by_requester["c" * 32].accept()
    assert from_bob.result(WAIT) == 0
    assert from_alice.wait(0.3) == "pending"
    by_requester["b" * 32].deny("no")
    assert from_alice.wait(WAIT) == "denied"


def test_one_session_closing_leaves_the_other_serving(shared):
    owner, cores, (alice, bob) = shared
    owner.host(torch.ones(3), tags=("ones",), public=True)
    assert wait_for(lambda: len(bob.store.refresh()) == 1, WAIT)
    get_runtime().run(alice.aclose(), timeout=15)
    get_runtime().run(cores[0].close(), timeout=15)
    assert bob.store["ones"].sum().get(timeout_secs=WAIT) == 3
    assert len(owner.sessions()) == 1


def test_a_session_cannot_withdraw_another_sessions_request(shared):
    owner, _, (alice, bob) = shared
    owner.host(torch.arange(10.0), tags=("ages",))
    assert wait_for(lambda: len(alice.store.refresh()) == 1 and len(bob.store.refresh()) == 1,
                    WAIT)  # fmt: skip
    from_alice = alice.store["ages"].max().request(reason="alice")
    assert wait_for(lambda: len(owner.requests) == 1, WAIT)
    get_runtime().run(bob._core.cancel(from_alice.request_id), timeout=WAIT)
    assert from_alice.wait(0.5) == "pending" and len(owner.requests) == 1
    get_runtime().run(alice._core.cancel(from_alice.request_id), timeout=WAIT)
    assert wait_for(lambda: len(owner.requests) == 0, WAIT)
