"""A hostile owner against a real scientist.

The raw owner speaks the wire protocol by hand (over the in-memory transport, and once over
real WebRTC), skipping every check the owner's session makes: it floods the scientist with
decisions nobody asked for, lists objects whose tags carry terminal escapes and bidi
overrides, denies with escape-laden reasons, sends values larger than the get allowed,
releases errors, reuses request IDs, and announces a message larger than the scientist takes.
The scientist must keep its memory bounded, show no control characters, refuse what it did
not ask for, and keep serving a well-behaved get afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import duet_p2p as sy
from duet_p2p.connect import Connection, ConnectOptions, OwnerHandshake
from duet_p2p.rpc import codec
from duet_p2p.rpc.messages import PROTOCOL_VERSION
from duet_p2p.runtime import get_runtime
from duet_p2p.scientist.pointer import Pointer
from duet_p2p.scientist.remote_store import RemoteStore
from duet_p2p.scientist.session import (
    DEFAULT_MAX_GET_BYTES,
    EARLY_DECISION_BYTES,
    EARLY_DECISIONS,
    MESSAGE_HEADROOM_BYTES,
    ScientistCore,
    ValueTooLarge,
)
from duet_p2p.text import printable
from duet_p2p.transport import framing
from duet_p2p.transport.memory import memory_pair

TIMEOUT = 10.0
OBJECT_ID = "a" * 32
FLOOD = 100_000
FLOOD_VALUE = codec.encode(torch.zeros(16 * 1024))  # 64 KiB each: 6.5 GB if all were kept
HOSTILE = (
    "\x1b[2J\x1b[31mred\x1b[0m \x1b]8;;https://evil.example\x1b\\link\x1b]8;;\x1b\\ "
    "\x1b]0;title\x07\x9b2Jcsi bell\x07 back\x08space carriage\roverwrite "
    "\u202eevil.exe\u202c \u2066iso\u2069 zero\u200bwidth\ufeff \x00nul \x7fdel"
)
"""Terminal escapes (erase, colour, OSC hyperlink and title, 8-bit CSI), BEL, backspace,
CR, bidi overrides and isolates, zero-width characters, NUL and DEL."""
ALLOWLIST = {"torch.Tensor.sum": "tensor", "torch.Tensor.\x1b[2Jmean": "tensor",
             "torch.Tensor.max": "\x1b[2J", "torch.Tensor.min\u202e": "number"}  # fmt: skip
"""The raw owner's allowlist: one usable entry, and three no op could use."""
Policy = Callable[["RawOwner", dict[str, Any]], Awaitable[None]]


class RawOwner:
    """An owner that speaks the wire protocol by hand."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.listing: list[Any] = []
        self.gets: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        """Get requests no ``policy`` answered, for the test to answer."""
        self.policy: Policy | None = None
        """Answers each get on the owner's loop (so the blocking API can be used)."""
        self.seen_gets: list[dict[str, Any]] = []
        self._receiver: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._receiver = asyncio.ensure_future(self._receive())
        await self.send({
            "kind": "hello", "version": PROTOCOL_VERSION, "role": "owner", "library": "raw",
            "max_message_bytes": 1 << 30, "allowlist": ALLOWLIST,
        })  # fmt: skip

    async def send(self, message: dict[str, Any], attachment: bytes | None = None) -> None:
        header = codec.encode(message)
        if attachment is None:
            await self.transport.send(b"\x00", header)
        else:
            await self.transport.send(b"\x01" + struct.pack("!I", len(header)), header, attachment)

    async def reply(self, get: dict[str, Any], value: Any) -> None:
        await self.send({"kind": "reply", "call_id": get["call_id"], "ok": True, "value": value})

    async def registered(self, get: dict[str, Any]) -> str:
        """Answer a get as registered; returns its new request ID."""
        request_id = uuid.uuid4().hex
        await self.reply(get, {"request_id": request_id, "status": "pending"})
        return request_id

    async def decide(
        self, request_id: str, status: str = "accepted", value: Any = None, **fields: Any
    ) -> None:
        """A decision; an accepted ``value`` travels as an attachment, like the owner's."""
        message = {"kind": "decision", "request_id": request_id, "status": status, **fields}
        await self.send(message, None if value is None else codec.encode(value))

    async def _receive(self) -> None:
        with contextlib.suppress(sy.PeerClosed):
            while True:
                data = await self.transport.recv()
                assert data[0] == 0, "the scientist sent an attachment"
                await self._take(codec.decode(data[1:]))

    async def _take(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "store_query":
            await self.reply(message, self.listing)
        elif kind == "get":
            self.seen_gets.append(message)
            if self.policy is None:
                self.gets.put_nowait(message)
            else:
                asyncio.ensure_future(self.policy(self, message))

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.transport.close()
        if self._receiver is not None:
            self._receiver.cancel()


def accept(value: Any = None, **fields: Any) -> Policy:
    """Register each get and accept it with ``value`` (and extra decision fields)."""

    async def policy(owner: RawOwner, get: dict[str, Any]) -> None:
        await owner.decide(await owner.registered(get), "accepted", value, **fields)

    return policy


def deny(reason: str) -> Policy:
    async def policy(owner: RawOwner, get: dict[str, Any]) -> None:
        await owner.decide(await owner.registered(get), "denied", reason=reason)

    return policy


async def register_only(owner: RawOwner, get: dict[str, Any]) -> None:
    await owner.registered(get)


@dataclass
class Session:
    core: ScientistCore
    owner: RawOwner

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return get_runtime().run(coro, timeout=timeout)

    def pointer(self, object_id: str = OBJECT_ID) -> Pointer:
        return self.core.pointer_for({"id": object_id, "tags": [], "kind": "tensor"})

    def assert_serving(self) -> None:
        """A well-behaved get still works, and leaves no decision state behind."""
        self.owner.policy = accept(torch.tensor([1.0, 2.0]))
        value = self.pointer().get(reason="still there?", timeout_secs=TIMEOUT)
        assert torch.equal(value, torch.tensor([1.0, 2.0]))
        self.run(self.barrier())
        assert not self.core._decisions

    async def barrier(self) -> None:
        """A round trip: every message the owner sent before its answer has been handled."""
        await asyncio.wait_for(self.core.store_list(), TIMEOUT)


async def _memory_session() -> Session:
    scientist_end, owner_end = memory_pair()
    owner = RawOwner(owner_end)
    await owner.start()
    core = ScientistCore(
        Connection("scientist", "d" * 32, "c" * 32, scientist_end, None, "memory", 0)
    )
    await asyncio.wait_for(core.start(), TIMEOUT)
    return Session(core, owner)


@pytest.fixture
def session() -> Iterator[Session]:
    """A scientist core talking to a raw owner over the in-memory transport."""
    session = get_runtime().run(_memory_session(), timeout=TIMEOUT)
    yield session
    get_runtime().run(session.core.close(), timeout=TIMEOUT)
    get_runtime().run(session.owner.aclose(), timeout=TIMEOUT)


def assert_printable(text: str) -> None:
    """No control, format or other invisible character; line breaks only as newlines."""
    bad = sorted({ch for ch in text if not ch.isprintable() and ch != "\n"})
    assert not bad, f"{bad} in {text!r}"
    for leftover in ("[2J", "[31m", "evil.example", "]0;title"):
        assert leftover not in text, f"{leftover!r} of an escape sequence is left in {text!r}"


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- unsolicited decisions ---------------------------------------------------------------


async def _flood(session: Session, count: int) -> None:
    """``count`` accepted decisions for random request IDs, each with a 64 KiB value."""
    for sent in range(1, count + 1):
        await session.owner.send(
            {"kind": "decision", "request_id": uuid.uuid4().hex, "status": "accepted"},
            FLOOD_VALUE,
        )
        if sent % 1000 == 0:  # the in-memory pipe is unbounded: let the scientist catch up
            await session.barrier()
    await session.barrier()


def test_flood_of_unsolicited_decisions_keeps_memory_bounded(session: Session) -> None:
    core = session.core
    before = _resident_bytes()
    session.run(_flood(session, FLOOD // 2), timeout=120)
    assert len(core._early) <= EARLY_DECISIONS
    assert core._early.nbytes <= EARLY_DECISION_BYTES
    assert not core._decisions

    async def flood_while_a_get_waits() -> Any:
        """The same flood while a get waits for its reply: the early buffer may then hold
        up to that get's max_bytes more, and the get still gets its own value."""
        get = asyncio.ensure_future(
            session.pointer().get_async(timeout_secs=TIMEOUT, max_bytes=1 << 20)
        )
        message = await asyncio.wait_for(session.owner.gets.get(), TIMEOUT)
        await _flood(session, FLOOD // 2)
        assert len(core._early) <= EARLY_DECISIONS
        assert core._early.nbytes <= EARLY_DECISION_BYTES + (1 << 20)
        request_id = await session.owner.registered(message)
        await session.owner.decide(request_id, value=torch.tensor(7.0))
        return await asyncio.wait_for(get, TIMEOUT)

    assert session.run(flood_while_a_get_waits(), timeout=120).item() == 7.0
    session.run(session.barrier())
    assert core._early.nbytes <= EARLY_DECISION_BYTES  # trimmed once no get waits
    assert _resident_bytes() - before < 512 * 1024**2, "the flood's values were kept"
    session.assert_serving()


def test_many_gets_leave_no_decision_state(session: Session) -> None:
    """A long session: each request is forgotten once decided (here each decision comes
    right behind its reply, so it is handled before the handle exists)."""

    async def many_gets() -> None:
        session.owner.policy = accept(torch.arange(3.0))
        for _ in range(300):
            value = await session.pointer().get_async(timeout_secs=TIMEOUT)
            assert torch.equal(value, torch.arange(3.0))

    session.run(many_gets(), timeout=120)
    assert not session.core._decisions and len(session.core._early) == 0


def test_malformed_request_id_is_refused(session: Session) -> None:
    async def malformed() -> None:
        get = asyncio.ensure_future(session.core.request(OBJECT_ID, "x"))
        message = await asyncio.wait_for(session.owner.gets.get(), TIMEOUT)
        await session.owner.reply(message, {"request_id": "\x1b[2J", "status": "pending"})
        await asyncio.wait_for(get, TIMEOUT)

    with pytest.raises(sy.ProtocolError, match="malformed"):
        session.run(malformed())
    assert not session.core._decisions
    session.assert_serving()


def test_decision_sent_after_the_reply_is_handled(session: Session) -> None:
    async def decide_later() -> Any:
        handle = asyncio.ensure_future(session.core.request(OBJECT_ID, "later"))
        message = await asyncio.wait_for(session.owner.gets.get(), TIMEOUT)
        request_id = await session.owner.registered(message)
        waiting = await asyncio.wait_for(handle, TIMEOUT)
        assert waiting.status == "pending" and request_id in session.core._decisions
        await session.owner.decide(request_id, value=torch.tensor(3.0))
        return await waiting.result_async(TIMEOUT)

    assert session.run(decide_later()).item() == 3.0
    assert not session.core._decisions


def test_reused_request_id_is_refused(session: Session) -> None:
    """Two pending gets under one request ID would get each other's value."""

    async def reuse() -> None:
        first = asyncio.ensure_future(session.core.request(OBJECT_ID, "one"))
        request_id = await session.owner.registered(await session.owner.gets.get())
        await asyncio.wait_for(first, TIMEOUT)
        second = asyncio.ensure_future(session.core.request(OBJECT_ID, "two"))
        message = await asyncio.wait_for(session.owner.gets.get(), TIMEOUT)
        await session.owner.reply(message, {"request_id": request_id, "status": "pending"})
        await asyncio.wait_for(second, TIMEOUT)

    with pytest.raises(sy.ProtocolError, match="still pending"):
        session.run(reuse())
    [first] = session.core._decisions.values()
    session.run(session.owner.decide(*session.core._decisions, "expired", reason="enough"))
    with pytest.raises(sy.RequestTimeout, match="enough"):
        session.run(asyncio.wait_for(first.future, TIMEOUT))
    session.assert_serving()


# -- text the owner chose ----------------------------------------------------------------


def test_listing_with_escapes_renders_without_them(session: Session) -> None:
    session.owner.listing = [
        {"id": "b" * 32, "tags": [HOSTILE, "<script>alert(1)</script>", "x" * 10_000],
         "description": HOSTILE + "<img src=x onerror=alert(2)>", "type": HOSTILE,
         "kind": "tensor", "public": False, "shape": [2, 3], "dtype": HOSTILE},
        {"id": "c" * 32, "tags": ["plain"], "description": "fine", "type": "Tensor",
         "kind": "tensor", "public": True, "shape": ["\x1b[2J"], "unknown": HOSTILE},
        {"id": "d\x1b[2J", "tags": ["bad id"], "description": HOSTILE},
        {"id": "e" * 65, "tags": ["long id"]},
        "not an entry",
    ]  # fmt: skip
    store = RemoteStore(session.core)
    assert len(store) == 2, "entries without a well-formed ID are skipped"
    for text in (repr(store), str(store), repr(list(store)), str(store.info(0)),
                 str(store.info("plain"))):  # fmt: skip
        assert_printable(text)
    html = store._repr_html_()
    assert_printable(html)
    assert "<script>" not in html and "<img" not in html and "&lt;script&gt;" in html
    info = store.info(0)
    assert (
        info["tags"][0]
        == "red link csi bell backspace carriage overwrite evil.exe iso zerowidth nul del"
    )
    assert len(info["tags"][2]) <= 100 and info["shape"] == [2, 3]
    assert "shape" not in store.info("plain") and "unknown" not in store.info("plain")
    pytest.importorskip("pandas")
    for column in ("Tags", "Description", "Type"):
        assert_printable(str(list(store.pandas[column])))


def test_denial_reason_with_escapes_is_printable(session: Session) -> None:
    session.owner.policy = deny(HOSTILE)
    with pytest.raises(sy.PermissionDenied) as caught:
        session.pointer().get(reason="please", timeout_secs=TIMEOUT)
    assert_printable(str(caught.value))
    assert_printable(caught.value.reason or "")
    assert "evil.exe" in str(caught.value)
    handle = session.pointer().request(reason="again")
    assert handle.wait(TIMEOUT) == "denied"
    session.assert_serving()


def test_error_reply_with_escapes_is_printable(session: Session) -> None:
    async def refuse(owner: RawOwner, get: dict[str, Any]) -> None:
        error = {"code": "remote_error", "type": HOSTILE, "op": HOSTILE, "message": HOSTILE}
        await owner.send({"kind": "reply", "call_id": get["call_id"], "ok": False, "error": error})

    session.owner.policy = refuse
    with pytest.raises(sy.RemoteError) as caught:
        session.pointer().get(timeout_secs=TIMEOUT)
    for text in (str(caught.value), caught.value.op or "", caught.value.error_type or ""):
        assert_printable(text)
    session.assert_serving()


def test_unusable_allowlist_entries_are_dropped(session: Session) -> None:
    assert session.core._allowlist == {"torch.Tensor.sum": "tensor"}
    with pytest.raises(sy.OperationNotAllowed):
        session.pointer().max()
    assert isinstance(session.pointer().sum(), Pointer)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[1;31mred\x1b[0m", "red"),
        ("a\x1b]8;;https://x\x1b\\b\x1b]8;;\x07c", "abc"),
        ("\x9b2Jx\x9d0;t\x9cy", "xy"),
        ("over\rwrite\x08s\x07", "over writes"),
        ("l\u202er\u2067i\u200dz\u2060w\u00adj", "lrizwj"),
        ("one\r\ntwo\u2028three\tfour", "one two three four"),
        (["\x1b[2J", 3], "['\\x1b[2J', 3]"),  # not a str: its repr, which escapes
        ("x" * 50, "x" * 19 + "…"),
    ],
)
def test_printable_removes_what_a_terminal_would_act_on(text: object, shown: str) -> None:
    assert printable(text, 20) == shown


def test_printable_keeps_line_breaks_only_when_asked() -> None:
    assert printable("a\r\nb\rc\td\x1b[2J", 20, multiline=True) == "a\nb\nc\td"


# -- values ------------------------------------------------------------------------------


def test_value_larger_than_max_bytes_is_refused(session: Session) -> None:
    big = torch.zeros(1024)  # 4 KiB of data
    session.owner.policy = accept(big)
    with pytest.raises(ValueTooLarge, match="at most 1000"):
        session.pointer().get(timeout_secs=TIMEOUT, max_bytes=1000)
    assert session.owner.seen_gets[-1]["max_bytes"] == 1000
    handle = session.pointer().request(max_bytes=1000)
    assert handle.wait(TIMEOUT) == "failed"
    with pytest.raises(ValueTooLarge):
        handle.result(timeout=TIMEOUT)

    async def inline(owner: RawOwner, get: dict[str, Any]) -> None:
        message = {"kind": "decision", "request_id": await owner.registered(get),
                   "status": "accepted", "value": big}  # fmt: skip
        await owner.send(message)

    session.owner.policy = inline  # the value in the header, not attached
    with pytest.raises(ValueTooLarge):
        session.pointer().get(timeout_secs=TIMEOUT, max_bytes=1000)

    session.owner.policy = accept(big)
    assert torch.equal(session.pointer().get(timeout_secs=TIMEOUT), big)
    assert session.owner.seen_gets[-1]["max_bytes"] == DEFAULT_MAX_GET_BYTES
    with pytest.raises(ValueError, match="max_bytes"):
        session.pointer().get(max_bytes=-1)
    session.assert_serving()


def test_accepted_decision_with_an_error_raises_it(session: Session) -> None:
    """The owner released the failure of a private computation, not a value."""
    error = {"code": "remote_error", "type": "RuntimeError", "op": "torch.Tensor.sum",
             "message": "size mismatch\x1b[2J"}  # fmt: skip
    session.owner.policy = accept(error=error)
    with pytest.raises(sy.RemoteError) as caught:
        session.pointer().get(timeout_secs=TIMEOUT)
    assert caught.value.op == "torch.Tensor.sum" and caught.value.error_type == "RuntimeError"
    assert "torch.Tensor.sum" in str(caught.value) and "size mismatch" in str(caught.value)
    assert_printable(str(caught.value))
    assert session.pointer().request().wait(TIMEOUT) == "failed"
    session.owner.policy = accept(torch.tensor(1.0), error=error)  # a value does not win
    with pytest.raises(sy.RemoteError):
        session.pointer().get(timeout_secs=TIMEOUT)
    session.assert_serving()


# -- one message too large, over real WebRTC -----------------------------------------------


async def _webrtc_session(url: str) -> tuple[sy.Duet, RawOwner, Any]:
    handshake = OwnerHandshake(ConnectOptions.resolve(url))
    await handshake.start()
    client_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    joining = asyncio.ensure_future(
        sy.join_duet_async(handshake.duet_id, url, on_client_id=client_id.set_result)
    )
    try:
        connection = await handshake.complete(await asyncio.wait_for(client_id, TIMEOUT))
        owner = RawOwner(connection.transport)
        await owner.start()
        scientist = await asyncio.wait_for(joining, TIMEOUT)
    except BaseException:
        joining.cancel()
        await handshake.abort()
        raise
    return scientist, owner, connection


def test_message_larger_than_any_get_is_refused_before_buffering(signaling_url: str) -> None:
    """The transport caps what it reassembles at the largest value a get may take (plus
    room for the header): announcing more closes the connection at the first frame."""
    runtime = get_runtime()
    scientist, owner, connection = runtime.run(_webrtc_session(signaling_url), timeout=30)
    try:
        core = scientist._core
        reassembler = core.connection.transport._reassembler
        assert reassembler.max_message_bytes == DEFAULT_MAX_GET_BYTES + MESSAGE_HEADROOM_BYTES
        owner.policy = register_only
        handle = runtime.run(core.request(OBJECT_ID, "big", max_bytes=3 * 1024**3), TIMEOUT)
        assert reassembler.max_message_bytes == 3 * 1024**3 + MESSAGE_HEADROOM_BYTES
        assert handle.max_bytes == 3 * 1024**3

        announced = reassembler.max_message_bytes + 1
        start = bytes((framing.START,)) + struct.pack("!Q", announced) + b"\x01" * 1000
        runtime.loop.call_soon_threadsafe(connection.transport._channel.send, start)
        with pytest.raises(sy.PeerClosed, match="limit"):
            handle.result(timeout=TIMEOUT)
        assert handle.status == "expired"
    finally:
        scientist.close()
        runtime.run(owner.aclose(), timeout=TIMEOUT)
        runtime.run(connection.close(), timeout=TIMEOUT)
