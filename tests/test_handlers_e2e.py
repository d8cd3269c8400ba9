"""Auto-decision handlers end to end over real WebRTC, and a scientist that forges a name."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import duet_p2p as sy
from duet_p2p.connect import Connection, ConnectOptions, join
from duet_p2p.permissions import RequestStatus
from duet_p2p.rpc import codec
from duet_p2p.rpc.endpoint import Endpoint
from duet_p2p.rpc.messages import PROTOCOL_VERSION, Action, Actions, GetRequest, Hello
from duet_p2p.runtime import get_runtime
from tests.conftest import close_pair, launch_owner_with, make_pair

Pair = tuple[sy.Duet, sy.Duet]
WAIT = 10.0


def host(owner: sy.Duet, scientist: sy.Duet, value: torch.Tensor, tag: str):
    owner.store.send(value, tags=[tag])
    return scientist.store.refresh()[tag]


def stays_pending(handle: object, seconds: float = 0.4) -> bool:
    return handle.wait(seconds) == "pending"  # type: ignore[attr-defined]


def test_accept_by_tags(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    handler = owner.requests.add_handler("accept", tags=["public-stats"])
    stats = host(owner, scientist, torch.tensor([1.0, 2.0, 3.0, 4.0]), "public-stats")
    secret = host(owner, scientist, torch.tensor([5.0, 6.0]), "secret")

    assert stats.mean().item().get(timeout_secs=WAIT) == 2.5
    assert handler.matched == 1
    handle = secret.mean().request()
    assert stays_pending(handle)
    assert owner.requests[0].tags == frozenset({"secret"})
    owner.requests[0].deny("")


def test_accept_by_op(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    owner.requests.add_handler("accept", op="sum")
    data = host(owner, scientist, torch.tensor([[1, 2], [3, 4]]), "data")

    assert data.sum().item().get(timeout_secs=WAIT) == 10, "item() is a conversion: name stays sum"
    assert torch.equal(data.sum(dim=0).get(timeout_secs=WAIT), torch.tensor([4, 6]))
    handle = data.max().request()
    assert stays_pending(handle)
    assert owner.requests[0].name == "max"
    owner.requests[0].deny("")


def test_quota_exhaustion_leaves_the_third_pending(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    handler = owner.requests.add_handler("accept", max_requests=2)
    data = host(owner, scientist, torch.tensor([1, 2, 3]), "data")

    assert data.sum().get(timeout_secs=WAIT).item() == 6
    assert data.max().get(timeout_secs=WAIT).item() == 3
    assert handler.remaining == 0
    third = data.min().request()
    assert stays_pending(third)
    assert handler.matched == 2
    owner.requests[0].accept()
    assert third.result(timeout=WAIT).item() == 1


def test_deny_all_sends_the_reason(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    owner.requests.add_handler("deny", reason="this dataset is closed for the weekend")
    data = host(owner, scientist, torch.tensor([1, 2]), "data")

    with pytest.raises(sy.PermissionDenied) as caught:
        data.sum().get(timeout_secs=WAIT)
    assert caught.value.reason == "this dataset is closed for the weekend"
    [request] = owner.requests.all()
    assert request.status is RequestStatus.DENIED
    assert request.decided_by is not None and request.decided_by.startswith("handler #0")


def test_min_aggregation_holds_back_small_aggregates(signaling_url: str, tmp_path: Path) -> None:
    owner, scientist = make_pair(signaling_url, tmp_path / "audit.jsonl", min_aggregation=10)
    try:
        owner.requests.add_handler("accept")
        small = host(owner, scientist, torch.arange(4.0), "small")
        big = host(owner, scientist, torch.arange(100.0), "big")

        handle = small.sum().request()
        assert stays_pending(handle), "a sum of 4 private elements is below the minimum of 10"
        assert owner.requests[0].aggregation == 4
        assert big.sum().item().get(timeout_secs=WAIT) == 4950.0
        assert stays_pending(handle, 0.1)
        owner.requests[0].accept()
        assert handle.result(timeout=WAIT).item() == 6.0, "the owner may still accept by hand"
    finally:
        close_pair(scientist, owner)


def test_timeout_secs_handler_fires_without_new_requests(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    handler = owner.requests.add_handler("accept", op="mean", timeout_secs=0.5)
    data = host(owner, scientist, torch.tensor([2.0, 4.0]), "data")

    started = time.monotonic()
    value = data.mean().get(timeout_secs=WAIT)
    elapsed = time.monotonic() - started
    assert value.item() == 3.0
    assert 0.5 <= elapsed < 4, f"the handler fired after {elapsed:.2f} s"
    assert handler.matched == 1
    [request] = owner.requests.all()
    assert request.decided_by is not None and "after 0.5s" in request.decided_by


def test_print_local_and_log_local(
    duet_pair: Pair, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    owner, scientist = duet_pair
    owner.requests.add_handler("accept", print_local=True, log_local=True)
    data = host(owner, scientist, torch.tensor([20, 22]), "data")

    with caplog.at_level(logging.INFO, logger="duet_p2p.owner"):
        assert data.sum().item().get(timeout_secs=WAIT) == 42
    assert "[duet] released data.sum().item() = 42" in capsys.readouterr().out
    assert any("released data.sum().item() = 42" in r.getMessage() for r in caplog.records)


# -- a scientist speaking the protocol directly -----------------------------------------


async def _raw_session(url: str, audit: Path) -> tuple[sy.Duet, Connection, Endpoint]:
    """An owner session and a bare scientist endpoint (no ScientistCore, no pointers)."""

    async def join_raw(
        duet_id: str, on_client_id: Callable[[str], None]
    ) -> tuple[Connection, Endpoint]:
        connection = await join(duet_id, ConnectOptions.resolve(url), on_client_id=on_client_id)
        endpoint = Endpoint(connection.transport, role="scientist")
        endpoint.on("store_changed", lambda _message: None)
        hello = Hello(version=PROTOCOL_VERSION, role="scientist", max_message_bytes=1 << 20)
        await endpoint.start(hello)
        return connection, endpoint

    owner, (connection, endpoint) = await launch_owner_with(url, audit, join_raw)
    return owner, connection, endpoint


async def _forge(endpoint: Endpoint, data_id: str, result_id: str) -> dict[str, str]:
    max_op = Action(op="torch.Tensor.max", result=result_id, target=codec.ObjectRef(data_id))
    await endpoint.send(Actions(actions=[max_op]))
    call = GetRequest(
        call_id=endpoint.next_call_id(), object_id=result_id, reason="sum (name=sum, op=sum)"
    )
    return await endpoint.call(call, timeout=WAIT)


async def _send_raw(endpoint: Endpoint, message: dict[str, object]) -> object:
    """Send a hand-made map (not a validated model) and wait for the owner's answer."""
    future = asyncio.get_running_loop().create_future()
    endpoint._calls[message["call_id"]] = future  # type: ignore[index]
    await endpoint.transport.send(b"\x00", codec.encode(message))
    return await asyncio.wait_for(future, WAIT)


def test_forged_request_name_cannot_match_a_handler(signaling_url: str, tmp_path: Path) -> None:
    runtime = get_runtime()
    owner, connection, endpoint = runtime.run(
        _raw_session(signaling_url, tmp_path / "audit.jsonl"), timeout=30
    )
    try:
        handler = owner.requests.add_handler("accept", op="sum")
        data = owner.store.send(torch.tensor([3, 1, 4, 1, 5]), tags=["data"])
        result_id = "f" * 32
        reply = runtime.run(_forge(endpoint, data.id, result_id), timeout=WAIT + 5)

        assert reply["status"] == "pending"
        request = owner.requests[reply["request_id"]]
        assert request.name == "max", "names come from the owner's lineage, not the reason"
        assert request.ops == ("torch.Tensor.max",)
        assert request.reason.startswith("sum")
        assert handler.matched == 0 and request.pending

        with pytest.raises(sy.ProtocolError, match="name"):
            runtime.run(
                _send_raw(endpoint, {"kind": "get", "call_id": endpoint.next_call_id(),
                                     "object_id": result_id, "name": "sum"}),
                timeout=WAIT + 5,
            )  # fmt: skip
        assert len(owner.requests) == 1, "a get with a name field is refused, not queued"
    finally:
        runtime.run(endpoint.close(), timeout=15)
        owner.close()
