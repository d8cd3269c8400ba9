"""Value oracles: learning a private value from whether, when or how a computation failed.

Before the monitor, ``torch.zeros(1)[bit * 5]`` read any private bit: the index fails when
the bit is 1, and a get (or describe) of a failed result answered at once with the error.
Now a private result's success, error, shape and type stay with the owner until it
releases them; both outcomes look the same to the scientist.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import duet_p2p as sy
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.messages import Action, Actions, Describe
from duet_p2p.runtime import get_runtime
from tests.hostile.common import WAIT, assert_serving, host, ready_requests, released, session


@dataclass
class _Ref:
    id: str


SECRET_TEXT = "31337"


def _describe(scientist: sy.Duet, pointer: Any) -> Any:
    core = scientist._core

    async def ask() -> Any:
        await core.flush()
        call_id = core.endpoint.next_call_id()
        return await core.endpoint.call(Describe(call_id=call_id, object_id=pointer.id), 10)

    return get_runtime().run(ask(), timeout=15)


def test_failure_oracle_reads_nothing(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        zero = host(owner, scientist, torch.tensor([0]), "zero")
        one = host(owner, scientist, torch.tensor([1]), "one")
        probes = {}
        for name, bit in (("zero", zero), ("one", one)):
            index = (bit * 5).sum()  # 0 or 5: only the second is out of range
            probes[name] = scientist.torch.zeros(1)[index]
        seen = {name: (_describe(scientist, p), p.request(reason=name).status) for name, p in
                probes.items()}  # fmt: skip
        assert (
            seen["zero"]
            == seen["one"]
            == ({"exists": True, "error": None, "private": True}, "pending")
        )
        requests = {r.reason: r for r in ready_requests(owner, 2)}
        assert requests["zero"].error is None
        assert "out of bounds" in (requests["one"].error or ""), "the owner sees the failure"
        assert released(owner) == []
        assert_serving(owner, scientist)


def test_get_of_a_failed_private_result_answers_like_any_other(
    signaling_url: str, tmp_path: Path
) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        data = host(owner, scientist, torch.arange(7.0), "data")
        failing = data.view(3)  # fails in the worker: "shape '[3]' is invalid ... size 7"
        fine = data.view(7)
        handles = [failing.request(reason="a"), fine.request(reason="b")]
        assert [h.status for h in handles] == ["pending", "pending"]
        assert _describe(scientist, failing) == _describe(scientist, fine)
        ready_requests(owner, 2)
        owner.requests[handles[0].request_id].deny("no")
        assert handles[0].wait(WAIT) == "denied"
        assert_serving(owner, scientist)


def test_released_failures_never_name_private_values_or_types(
    signaling_url: str, tmp_path: Path
) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        owner.requests.add_handler("accept")
        data = host(owner, scientist, torch.tensor([31337.0, 2.0]), "data")
        attempts = [
            data[int(1e6)],  # the index error names the size
            data.reshape(5, 5),  # the shape error names the element count
            data.view(torch.int64).view(7),  # names dtypes and sizes
            (data > 0).float() @ torch.ones(5),  # names the shapes
        ]
        for pointer in attempts:
            try:
                pointer.get(timeout_secs=WAIT)
            except sy.RemoteError as exc:
                text = str(exc)
                assert "withheld" in text, text
                for secret in (SECRET_TEXT, "size 2", "(2,", "[2]", "float32", "Float"):
                    assert secret not in text, text
            else:
                raise AssertionError("the attempt should have failed")
        assert_serving(owner, scientist)


def test_public_failures_keep_their_details(signaling_url: str, tmp_path: Path) -> None:
    """The same mistake on public data is explained: the tests above can see a leak."""
    with session(signaling_url, tmp_path) as (owner, scientist):
        weights = host(owner, scientist, torch.arange(7.0), "weights", public=True)
        try:
            weights.view(3).get(timeout_secs=WAIT)
        except sy.RemoteError as exc:
            assert "7" in str(exc)
        else:
            raise AssertionError("view(3) of 7 elements should fail")
        assert _describe(scientist, weights.view(3))["error"] is not None


def test_the_memory_budget_is_no_oracle(signaling_url: str, tmp_path: Path) -> None:
    """A private result whose size depends on the data (a mask) fills its own budget: a
    public allocation succeeds or fails the same way whatever the private data is."""
    limits = sy.OwnerLimits(max_peer_bytes=12 * 1024**2)
    outcomes = []
    for sign in (1.0, -1.0):
        with session(signaling_url, tmp_path / str(sign), limits=limits) as (owner, scientist):
            x = host(owner, scientist, sign * torch.rand(2 * 1024**2), "x")  # 8 MiB
            kept = x[x > 0]  # 8 MiB when every value is positive, nothing otherwise
            public = scientist.torch.ones(2 * 1024**2)  # 8 MiB
            try:
                outcomes.append(public.sum().item().get(timeout_secs=WAIT))
            except sy.DuetError as exc:
                outcomes.append(type(exc).__name__)
            del kept
    assert outcomes == [2 * 1024**2, 2 * 1024**2]


def test_values_awaiting_a_decision_are_no_size_oracle(signaling_url: str, tmp_path: Path) -> None:
    """A pending private value is held in a budget of its own: a public get's fate does
    not depend on how large it is."""
    limits = sy.OwnerLimits(max_pending_bytes=40_000)
    with session(signaling_url, tmp_path, limits=limits) as (owner, scientist):
        x = host(owner, scientist, torch.arange(5000.0) % 10, "x")
        public = scientist.torch.zeros(9_000)  # 36 kB of the 40 kB
        assert public.sum().item().get(timeout_secs=WAIT) == 0.0
        selected = x.masked_select(x > 4.5)  # 10 kB, a secret count of records
        assert selected.request(reason="count me").wait(0.5) == "pending"
        assert ready_requests(owner, 1)
        assert torch.equal(public.get(timeout_secs=WAIT), torch.zeros(9_000))


def test_a_reused_id_never_inherits_a_private_failure(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        x = host(owner, scientist, torch.arange(5000.0) % 10, "x")
        selected = x.masked_select(x > 4.5)
        core = scientist._core
        get_runtime().run(core.flush(), timeout=WAIT)
        for _ in range(3):
            result = uuid.uuid4().hex
            failing = Action(op="torch.Tensor.view", result=result,
                             target=ObjectRef(selected.id), args=[7, -1])  # fmt: skip
            public = Action(op="torch.zeros", result=result, args=[3])

            async def send(failing: Action = failing, public: Action = public) -> None:
                endpoint = core.endpoint
                await endpoint.send(Actions(actions=[failing]))
                await endpoint.send(Describe(call_id=endpoint.next_call_id(), object_id="0" * 32))
                await endpoint.send(Actions(actions=[public]))
                await endpoint.send(Actions(actions=[failing, public]))  # and in one batch

            get_runtime().run(send(), timeout=WAIT)
            assert _describe(scientist, _Ref(result)) == {
                "exists": True, "error": None, "private": False
            }  # fmt: skip


def test_python_values_count_against_the_private_budget(signaling_url: str, tmp_path: Path) -> None:
    """``tolist()`` of a private selection is tens of megabytes of Python objects: counted
    as such (it used to count as nothing), it cannot crowd public work out of the worker."""
    with session(signaling_url, tmp_path) as (owner, scientist):
        x = host(owner, scientist, (torch.arange(4_000_000) % 100).float(), "x")
        kept = x.masked_select(x < 10).tolist()  # 400 thousand Python floats
        scientist.torch.ones(1).get(timeout_secs=WAIT)  # a barrier: queued after the actions
        assert owner._core.holdings().bytes >= 400_000 * 40
        del kept
