"""A hostile scientist talking straight to a real owner over WebRTC.

The raw peer joins like any scientist (signaling, verified IDs, DTLS) but then speaks the
wire protocol itself, skipping every check the pointer layer makes: it sends garbage,
forbidden ops, huge and deep values, floods, and writes into the owner's objects. The owner
must answer with errors where a call_id was given, count bad messages, keep its data
unchanged and keep serving a well-behaved request afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import pytest
import torch

import duet_p2p as sy
from duet_p2p.connect import Connection, ConnectOptions, join
from duet_p2p.limits import OwnerLimits
from duet_p2p.rpc import codec
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.messages import PROTOCOL_VERSION
from duet_p2p.runtime import get_runtime
from duet_p2p.store import new_object_id
from duet_p2p.transport import framing
from tests.conftest import launch_owner_with

TIMEOUT = 10.0
UPLOAD_LIMIT = 1 << 20  # the owner's max_upload_bytes in these tests
SECRET = torch.tensor([[12345.0, 2.0], [3.0, 4.0]])

FORBIDDEN_OPS = [
    "torch.Tensor.__class__",
    "torch.Tensor.__reduce_ex__",
    "torch.Tensor.storage",
    "torch.Tensor.untyped_storage",
    "torch.Tensor.data_ptr",
    "torch.Tensor.register_hook",
    "torch.Tensor.numpy",
    "torch.load",
    "torch.save",
    "torch.from_file",
    "os.system",
    "builtins.eval",
    "torch.Tensor.add.__globals__",
    "torch.empty",
    "torch.Tensor.__dict__",
    "torch.Tensor.__init_subclass__",
    "torch.Tensor.share_memory_",
    "torch.Tensor.set_",
    "torch.Tensor.as_strided",
    "torch.manual_seed",
    "torch.set_default_dtype",
    "torch.nn.Module.register_forward_hook",
    "torch.nn.Module.__setattr__",
    "torch._C._set_grad_enabled",
    "torch.utils.data.DataLoader",
    "torch.ops.aten.add",
    "torch.hub.load",
    "torch.jit.load",
    "torch.nonexistent",
    "torch..sum",
    "torch.Tensor.sum ",
    "tórch.sum",
]


@dataclass
class RawScientist:
    """A scientist that speaks the wire protocol by hand."""

    connection: Connection
    replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    notices: list[dict[str, Any]] = field(default_factory=list)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    other: list[dict[str, Any]] = field(default_factory=list)
    owner_hello: dict[str, Any] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _receiver: asyncio.Task[None] | None = None
    _call_ids: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**9)))

    @property
    def transport(self) -> Any:
        return self.connection.transport

    async def start(self) -> None:
        self._receiver = asyncio.ensure_future(self._receive())
        await self.send({
            "kind": "hello", "version": PROTOCOL_VERSION, "role": "scientist",
            "library": "raw", "max_message_bytes": 1 << 30,
        })  # fmt: skip
        await self.until(lambda: self.owner_hello is not None)

    def call_id(self) -> int:
        return next(self._call_ids)

    # -- sending ---------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        """A well-formed plain message (its contents may be anything)."""
        await self.transport.send(b"\x00", codec.encode(message))

    async def send_bytes(self, *parts: bytes) -> None:
        """Any bytes as one whole message (framed correctly)."""
        await self.transport.send(*parts)

    def send_frame(self, frame: bytes) -> None:
        """One raw frame on the data channel, past the framing layer."""
        self.transport._channel.send(frame)

    async def actions(self, *actions: dict[str, Any]) -> None:
        await self.send({"kind": "actions", "actions": list(actions)})

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a message with a fresh call_id and wait for its reply."""
        call_id = self.call_id()
        await self.send({**message, "call_id": call_id})
        return await self.reply(call_id)

    async def reply(self, call_id: int) -> dict[str, Any]:
        await self.until(lambda: call_id in self.replies)
        return self.replies.pop(call_id)

    async def get(self, object_id: str) -> dict[str, Any]:
        """A get: the reply, then (if registered) the decision."""
        reply = await self.call({"kind": "get", "object_id": object_id, "reason": "raw"})
        if not reply["ok"]:
            return reply
        request_id = reply["value"]["request_id"]
        await self.until(lambda: request_id in self.decisions)
        return self.decisions.pop(request_id)

    async def store(self) -> list[dict[str, Any]]:
        reply = await self.call({"kind": "store_query"})
        assert reply["ok"], reply
        return reply["value"]

    # -- receiving -------------------------------------------------------------------

    async def until(self, predicate: Any, timeout: float = TIMEOUT) -> None:
        async def wait() -> None:
            while not predicate():
                self._arrived.clear()
                await self._arrived.wait()

        await asyncio.wait_for(wait(), timeout)

    async def _receive(self) -> None:
        try:
            while True:
                data = await self.transport.recv()
                self._take(data)
                self._arrived.set()
        except Exception:  # noqa: BLE001 - the owner closed the connection
            self.closed.set()
            self._arrived.set()

    def _take(self, data: memoryview) -> None:
        if data[0] == 0:
            message, value = codec.decode(data[1:]), None
        else:
            (length,) = struct.unpack("!I", data[1:5])
            message = codec.decode(data[5 : 5 + length])
            value = codec.decode(data[5 + length :])
        assert isinstance(message, dict)
        kind = message.get("kind")
        if kind == "hello":
            self.owner_hello = message
        elif kind == "reply":
            self.replies[message["call_id"]] = message
        elif kind == "error":
            self.notices.append(message)
        elif kind == "decision":
            self.decisions[message["request_id"]] = {**message, "value": value}
        else:
            self.other.append(message)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.transport.close()
        if self._receiver is not None:
            self._receiver.cancel()


async def _owner_and_raw(url: str, audit: Path, **owner_options: Any) -> tuple[sy.Duet, Any]:
    async def join_raw(duet_id: str, on_client_id: Callable[[str], None]) -> RawScientist:
        connection = await join(duet_id, ConnectOptions.resolve(url), on_client_id=on_client_id)
        raw = RawScientist(connection)
        await raw.start()  # the owner's start waits for this hello
        return raw

    return await launch_owner_with(url, audit, join_raw, **owner_options)


@dataclass
class Hostile:
    owner: sy.Duet
    raw: RawScientist
    data_id: str

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return get_runtime().run(coro, timeout=timeout)

    @property
    def bad_messages(self) -> int:
        return self.owner._core.endpoint.bad_messages

    def owner_data(self) -> torch.Tensor:
        return self.owner.store[0]

    def assert_serving(self) -> None:
        """The owner still answers a listing and releases a well-behaved get."""
        entries = self.run(self.raw.store())
        assert [e["id"] for e in entries] == [self.data_id]
        result = new_object_id()
        self.run(self.raw.actions(
            {"op": "torch.Tensor.sum", "result": result, "target": ObjectRef(self.data_id)}
        ))  # fmt: skip
        decision = self.run(self.raw.get(result))
        assert decision["status"] == "accepted", decision
        assert decision["value"].item() == SECRET.sum().item()
        assert torch.equal(self.owner_data(), SECRET)


@pytest.fixture
def hostile(signaling_url: str, tmp_path: Path) -> Iterator[Hostile]:
    owner, raw = get_runtime().run(
        _owner_and_raw(
            signaling_url,
            tmp_path / "audit.jsonl",
            limits=OwnerLimits(max_upload_bytes=UPLOAD_LIMIT),
        ),
        timeout=30,
    )
    hosted = owner.store.send(SECRET.clone(), tags=["data"])
    owner.requests.add_handler(action="accept")
    yield Hostile(owner, raw, hosted.id)
    get_runtime().run(raw.aclose(), timeout=15)
    owner.close()


# -- malformed messages ----------------------------------------------------------------


def test_malformed_messages_get_error_notices(hostile: Hostile) -> None:
    raw = hostile.raw
    garbage: list[bytes] = [
        b"\x00\xff\xff\xff",  # not CBOR
        b"\x00" + cbor2.dumps([1, 2, 3]),  # not a map
        b"\x00" + cbor2.dumps("hello"),
        b"\x00" + cbor2.dumps({"no": "kind"}),
        b"\x00" + cbor2.dumps({"kind": 5}),
        b"\x00" + cbor2.dumps({"kind": "actions"}),  # missing field, no call id
        b"\x00" + cbor2.dumps({"kind": "actions", "actions": []}),  # too few
        b"\x00" + cbor2.dumps({"kind": "delete", "ids": ["../../etc/passwd"]}),
        b"\x00" + cbor2.dumps({"kind": "decision", "request_id": "x", "status": "accepted"}),
        b"\x00\xd9\xd9\xf7\xa0",  # a tag the codec does not accept
        b"\x00\x9f\x01\xff",  # indefinite length
        b"\x00\xa1\x61a\x01\x00",  # bytes after the end
        b"\x00" + cbor2.dumps({"kind": "get", "call_id": -1, "object_id": "a"}),
        b"\x07hello",  # unknown layout
        b"\x01\x00\x00\xff\xff{}",  # header longer than the message
        b"\x01\x00",  # truncated layout
        b"",  # empty message
    ]
    before = hostile.bad_messages
    for message in garbage:
        hostile.run(raw.send_bytes(message))
    hostile.run(raw.until(lambda: len(raw.notices) >= len(garbage)))
    assert hostile.bad_messages - before == len(garbage)
    assert all(n["code"] == "bad_message" for n in raw.notices)
    assert not raw.closed.is_set()
    hostile.assert_serving()


@pytest.mark.parametrize(
    "message",
    [
        {"kind": "bogus"},  # unknown kind
        {"kind": "get"},  # missing object_id
        {"kind": "get", "object_id": 12345},  # wrong type
        {"kind": "get", "object_id": "a" * 65},  # too long
        {"kind": "get", "object_id": "a b"},  # bad characters
        {"kind": "get", "object_id": "abc", "reason": "x" * 5000},  # oversize text
        {"kind": "get", "object_id": "abc", "delete": "yes please"},
        {"kind": "store_query", "extra": 1},  # unknown field
        {"kind": "describe"},
        {"kind": "hello", "version": "one"},
        {"kind": "actions", "actions": [{"op": "torch.ones"}]},  # missing result
        {"kind": "actions", "actions": [{"op": "torch.Tensor.sum", "result": "r",
                                         "args": list(range(100))}]},  # too many args
        {"kind": "actions", "actions": [{"op": "torch." + "a" * 300, "result": "r"}]},
        {"kind": "actions", "actions": "all of them"},
        {"kind": "upload", "result": "r"},  # missing value
        {"kind": "decision", "request_id": "r", "status": "accepted"},  # owner-bound only
    ],
)  # fmt: skip
def test_bad_messages_with_call_ids_get_error_replies(
    hostile: Hostile, message: dict[str, Any]
) -> None:
    raw = hostile.raw
    before = hostile.bad_messages
    reply = hostile.run(raw.call(message))
    assert reply["ok"] is False
    assert reply["error"]["code"] == "protocol"
    assert len(reply["error"]["message"]) <= 500
    assert hostile.bad_messages == before + 1
    hostile.assert_serving()


def test_attachment_on_a_message_that_takes_none(hostile: Hostile) -> None:
    raw = hostile.raw
    call_id = raw.call_id()
    header = codec.encode({"kind": "store_query", "call_id": call_id})
    hostile.run(raw.send_bytes(b"\x01" + struct.pack("!I", len(header)), header, b"\xf6"))
    reply = hostile.run(raw.reply(call_id))
    assert reply["ok"] is False and "attachment" in reply["error"]["message"]
    hostile.assert_serving()


def test_unknown_and_foreign_ids(hostile: Hostile) -> None:
    raw = hostile.raw
    reply = hostile.run(raw.call({"kind": "get", "object_id": "f" * 32}))
    assert reply["ok"] is False and reply["error"]["code"] == "not_found"
    described = hostile.run(raw.call({"kind": "describe", "object_id": "f" * 32}))
    assert described["value"] == {"exists": False}
    hostile.run(raw.send({"kind": "cancel_request", "request_id": "f" * 32}))
    hostile.run(raw.send({"kind": "reply", "call_id": 999_999, "ok": True}))
    hostile.assert_serving()


# -- oversize and deep values --------------------------------------------------------------


def test_message_over_the_upload_limit_is_refused_and_serving_goes_on(hostile: Hostile) -> None:
    raw = hostile.raw
    before = hostile.bad_messages
    blob = os.urandom(UPLOAD_LIMIT + 1000)
    header = codec.encode({"kind": "upload", "result": "big", "value": None})
    hostile.run(raw.send({"kind": "upload", "result": "big", "value": blob}))
    hostile.run(raw.until(lambda: len(raw.notices) >= 1))
    assert "exceeds" in raw.notices[-1]["message"]
    hostile.run(raw.send_bytes(b"\x01" + struct.pack("!I", len(header)), header, blob))
    hostile.run(raw.until(lambda: len(raw.notices) >= 2))
    assert "exceeds" in raw.notices[-1]["message"]
    assert hostile.bad_messages == before + 2
    assert "big" not in hostile.owner._core.monitor.nodes
    hostile.assert_serving()


def test_oversize_frame_announcement_closes_without_allocating(hostile: Hostile) -> None:
    """A frame announcing a terabyte message breaks framing: the owner drops the connection
    at once, and reserves no memory for it."""
    raw = hostile.raw
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    owner_transport = hostile.owner._connection.transport

    async def announce(total: int) -> None:
        raw.send_frame(bytes((framing.START,)) + struct.pack("!Q", total) + b"\x00")

    hostile.run(announce(1 << 40))
    hostile.run(raw.closed.wait(), timeout=TIMEOUT)
    assert owner_transport.protocol_errors == 1
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_after - peak_before < 200 * 1024  # KiB: nothing near the announced size
    assert torch.equal(hostile.owner_data(), SECRET)


def test_announced_size_under_the_limit_reserves_nothing_up_front(
    signaling_url: str, tmp_path: Path
) -> None:
    """A peer that announces a large message and then stalls holds only what it sent."""
    owner, raw = get_runtime().run(
        _owner_and_raw(signaling_url, tmp_path / "audit.jsonl"), timeout=30
    )
    try:
        transport = owner._connection.transport
        # the default upload limit (1 GiB) bounds the owner's messages, not the channel's 16 GiB
        assert transport._reassembler.max_message_bytes <= OwnerLimits().max_upload_bytes + (
            1 << 20
        )
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        async def announce() -> None:
            raw.send_frame(bytes((framing.START,)) + struct.pack("!Q", 1 << 29) + b"\x00" * 100)
            await asyncio.sleep(0.3)

        get_runtime().run(announce(), timeout=TIMEOUT)
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert peak_after - peak_before < 200 * 1024  # KiB, against the 512 MiB announced
        assert not raw.closed.is_set()
    finally:
        get_runtime().run(raw.aclose(), timeout=15)
        owner.close()


def test_deeply_nested_arguments(hostile: Hostile) -> None:
    raw = hostile.raw
    before = hostile.bad_messages
    nested = b"\x81" * 100_000 + b"\x00"
    # {"kind": "actions", "actions": [{"op": "torch.Tensor.sum", "result": "deep",
    #  "args": [[[[...]]]]}]} written by hand: no encoder nests 100k levels
    head = b"\xa2" + cbor2.dumps("kind") + cbor2.dumps("actions") + cbor2.dumps("actions")
    action = b"\xa3" + cbor2.dumps("op") + cbor2.dumps("torch.Tensor.sum")
    action += cbor2.dumps("result") + cbor2.dumps("deep") + cbor2.dumps("args") + b"\x81"
    started = time.perf_counter()
    hostile.run(raw.send_bytes(b"\x00", head, b"\x81", action, nested))
    hostile.run(raw.until(lambda: len(raw.notices) >= 1))
    assert time.perf_counter() - started < 2.0
    assert "deeper" in raw.notices[-1]["message"]
    # wide instead of deep: a million-item list is over the item limit
    wide = b"\x9a" + struct.pack("!I", 2_000_000) + b"\x00" * 2_000_000
    hostile.run(raw.send_bytes(b"\x00", head, b"\x81", action, wide))
    hostile.run(raw.until(lambda: len(raw.notices) >= 2))
    assert hostile.bad_messages == before + 2
    assert "deep" not in hostile.owner._core.monitor.nodes
    hostile.assert_serving()


# -- forbidden and dangerous ops -------------------------------------------------------------


def test_every_forbidden_path_is_refused(hostile: Hostile, tmp_path: Path) -> None:
    raw = hostile.raw
    data = ObjectRef(hostile.data_id)
    victim = tmp_path / "written_by_peer"
    results = {}
    for op in FORBIDDEN_OPS:
        result = new_object_id()
        results[op] = result
        args: list[Any] = []
        if op in ("torch.save",):
            args = [data, str(victim)]
        elif op in ("torch.load", "torch.from_file", "torch.jit.load", "torch.hub.load"):
            args = ["/etc/passwd"]
        elif op in ("os.system", "builtins.eval"):
            args = [f"touch {victim}"]
        target = data if op.startswith(("torch.Tensor.", "torch.nn.Module.")) else None
        hostile.run(raw.actions({"op": op, "result": result, "target": target, "args": args}))
    for op, result in results.items():
        reply = hostile.run(raw.get(result))
        assert reply.get("ok") is False, (op, reply)
        assert reply["error"]["code"] == "not_allowed", (op, reply)
    assert not victim.exists()
    hostile.assert_serving()


def test_huge_creation_fails_fast(hostile: Hostile) -> None:
    raw = hostile.raw
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = [new_object_id() for _ in range(4)]
    started = time.perf_counter()
    hostile.run(raw.actions(
        {"op": "torch.ones", "result": results[0], "args": [10**12]},
        {"op": "torch.zeros", "result": results[1], "args": [[10**6, 10**6]]},
        {"op": "torch.full", "result": results[2], "args": [[10**12], 1.0]},
        {"op": "torch.Tensor.expand", "result": results[3], "target": ObjectRef(hostile.data_id),
         "args": [10**6, 10**3, 2, 2]},
    ))  # fmt: skip
    for result in results[:3]:
        reply = hostile.run(raw.get(result))
        assert reply.get("ok") is False and "would exceed" in reply["error"]["message"], reply
    private = hostile.run(raw.call({"kind": "get", "object_id": results[3], "reason": "raw"}))
    assert private["value"]["status"] == "pending", private  # on private data: so is its failure
    assert time.perf_counter() - started < 2.0
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_after - peak_before < 200 * 1024  # KiB
    hostile.assert_serving()


def test_inplace_writes_into_owner_objects_are_refused(hostile: Hostile) -> None:
    raw = hostile.raw
    data = ObjectRef(hostile.data_id)
    view, ones, clone = new_object_id(), new_object_id(), new_object_id()
    attempts = {
        "add_": {"op": "torch.Tensor.add_", "target": data, "args": [1.0]},
        "iadd": {"op": "torch.Tensor.__iadd__", "target": data, "args": [1.0]},
        "setitem": {"op": "torch.Tensor.__setitem__", "target": data, "args": [0, 0.0]},
        "copy_": {"op": "torch.Tensor.copy_", "target": data, "args": [ObjectRef(ones)]},
        "zero_": {"op": "torch.Tensor.zero_", "target": data},
        "view add_": {"op": "torch.Tensor.add_", "target": ObjectRef(view), "args": [1.0]},
        "view setitem": {"op": "torch.Tensor.__setitem__", "target": ObjectRef(view),
                         "args": [0, 0.0]},
        "view copy_": {"op": "torch.Tensor.copy_", "target": ObjectRef(view),
                       "args": [ObjectRef(ones)]},
        "data attr": {"op": "torch.Tensor.fill_", "target": ObjectRef(clone), "args": [0.0]},
        "out=": {"op": "torch.add", "args": [data, 1.0], "kwargs": {"out": data}},
        "init": {"op": "torch.nn.init.zeros_", "args": [data]},
        "overwrite id": {"op": "torch.zeros", "args": [2], "result": hostile.data_id},
    }  # fmt: skip
    hostile.run(raw.actions(
        {"op": "torch.Tensor.__getitem__", "result": view, "target": data, "args": [0]},
        {"op": "torch.ones", "result": ones, "args": [2]},
        {"op": "torch.Tensor.data", "result": clone, "target": data},
    ))  # fmt: skip
    results = {}
    for name, action in attempts.items():
        results[name] = action.get("result") or new_object_id()
        hostile.run(raw.actions({**action, "result": results[name]}))
    for name, result in results.items():
        if name == "overwrite id":
            continue
        reply = hostile.run(raw.get(result))
        assert reply.get("ok") is False, (name, reply)
        assert reply["error"]["code"] == "not_allowed", (name, reply)
    assert torch.equal(hostile.owner_data(), SECRET)
    # deleting the owner's object by ID frees nothing either
    hostile.run(raw.send({"kind": "delete", "ids": [hostile.data_id, view, ones]}))
    hostile.assert_serving()


def test_flood_of_actions(hostile: Hostile) -> None:
    raw = hostile.raw
    data = ObjectRef(hostile.data_id)
    core = hostile.owner._core
    ids = [new_object_id() for _ in range(20_000)]
    ops = ["torch.Tensor.sum", "torch.Tensor.numpy", "torch.Tensor.mean", "torch.bogus"]
    batches = [
        [{"op": ops[i % 4], "result": ids[i], "target": data} for i in range(s, s + 1000)]
        for s in range(0, 20_000, 1000)
    ]
    started = time.perf_counter()
    for batch in batches:
        hostile.run(raw.actions(*batch))
    # over the per-message cap: refused as a whole
    hostile.run(raw.actions(*[{"op": "torch.Tensor.sum", "result": f"x{i}", "target": data}
                              for i in range(10_001)]))  # fmt: skip
    hostile.run(raw.until(lambda: len(raw.notices) >= 1))
    assert "at most 10000" in raw.notices[0]["message"]
    # the event loop stays responsive while the flood is worked through
    asked = time.perf_counter()
    assert hostile.run(raw.store())
    assert time.perf_counter() - asked < 2.0
    last = hostile.run(raw.get(ids[-4]))  # queued after the flood
    assert last.get("status") == "accepted", last.get("error")
    elapsed = time.perf_counter() - started
    assert len(core.monitor.nodes) - 1 == 20_000  # and the owner's one
    assert core.monitor.nodes[ids[1]].error["code"] == "not_allowed"  # refused before running
    assert core.holdings().objects == 10_000  # sum and mean ran in the worker
    assert "x0" not in core.monitor.nodes
    hostile.run(raw.send({"kind": "delete", "ids": ids}))
    hostile.run(raw.store())
    assert core.holdings().objects == 0
    assert len(core.monitor.nodes) == 1
    assert elapsed < 30
    hostile.assert_serving()


def test_hostile_uploads(hostile: Hostile) -> None:
    raw = hostile.raw
    bad_module, not_tensor = new_object_id(), new_object_id()
    hostile.run(raw.send({"kind": "upload", "result": bad_module, "value": {"type": "os.system"},
                          "as_module": True}))  # fmt: skip
    hostile.run(raw.send({"kind": "upload", "result": not_tensor, "value": "rm -rf /"}))
    hostile.run(raw.send({"kind": "upload", "result": hostile.data_id, "value": torch.zeros(2)}))
    for result in (bad_module, not_tensor):
        reply = hostile.run(raw.get(result))
        assert reply.get("ok") is False, reply
    assert torch.equal(hostile.owner_data(), SECRET)
    hostile.assert_serving()
