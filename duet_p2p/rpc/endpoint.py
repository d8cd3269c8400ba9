"""One side of the conversation: encodes, decodes, validates and dispatches messages.

Every incoming message is untrusted: it is size-bounded by the transport, decoded by the
codec under limits, validated by its pydantic model, and only then handed to the handler
for its kind. Bad input is answered with an error and counted; the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from duet_p2p.errors import DuetError, PeerClosed, ProtocolError
from duet_p2p.rpc import codec
from duet_p2p.rpc.errors import error_info, raise_from_info
from duet_p2p.rpc.messages import (
    PROTOCOL_VERSION,
    ErrorNotice,
    Hello,
    Message,
    Reply,
    call_id_of,
    parse_message,
    to_wire,
)
from duet_p2p.transport.base import MessageTransport

log = logging.getLogger(__name__)
_PLAIN = b"\x00"
_WITH_ATTACHMENT = 0x01
_HEADER_LENGTH = struct.Struct("!I")
ATTACHMENT_IN_THREAD_BYTES = 1 << 20
Handler = Callable[[Message], Awaitable[Any] | Any]


class Endpoint:
    """Sends messages, awaits replies, and runs a handler per incoming message kind."""

    def __init__(
        self,
        transport: MessageTransport,
        *,
        role: str,
        limits: codec.DecodeLimits | None = None,
        max_message_bytes: int = 0,
    ) -> None:
        self.transport = transport
        self.role = role
        self.limits = limits
        # An attachment's buffer is the freshly reassembled message: tensors may keep it.
        self._borrowing = dataclasses.replace(limits or codec.DecodeLimits(), borrow_buffers=True)
        self.max_message_bytes = max_message_bytes
        self.peer_hello: Hello | None = None
        self.bad_messages = 0
        self._handlers: dict[str, Handler] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count(1)
        self._hello = asyncio.Event()
        self._receiver: asyncio.Task[None] | None = None
        self._closed_error: BaseException | None = None
        self.on_closed: Callable[[BaseException], None] | None = None
        self.closed_event = asyncio.Event()

    def on(self, kind: str, handler: Handler) -> None:
        """Run ``handler(message)`` for each incoming message of ``kind``."""
        self._handlers[kind] = handler

    async def start(self, hello: Hello, timeout: float = 10.0) -> Hello:
        """Exchange hellos; returns the peer's."""
        self._receiver = asyncio.ensure_future(self._receive_loop())
        await self.send(hello)
        try:
            await asyncio.wait_for(self._hello.wait(), timeout)
        except TimeoutError:
            raise ProtocolError("the peer did not say hello in time") from None
        assert self.peer_hello is not None
        if self.peer_hello.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"the peer speaks protocol version {self.peer_hello.version}, "
                f"this side {PROTOCOL_VERSION}: upgrade duet_p2p on both sides"
            )
        return self.peer_hello

    async def send(self, message: Message, attachment: bytes | memoryview | None = None) -> None:
        """Encode and send one message; ``attachment`` is an already encoded ``value``.

        A large value travels as an attachment so that it is encoded once (and can be
        hashed for the audit log) and decoded straight from the received buffer.
        """
        header = codec.encode(to_wire(message))
        if attachment is None:
            await self.transport.send(_PLAIN, header)
        else:
            prefix = bytes((_WITH_ATTACHMENT,)) + _HEADER_LENGTH.pack(len(header))
            await self.transport.send(prefix, header, attachment)

    async def call(self, message: Message, timeout: float | None = None) -> Any:
        """Send a message that carries a ``call_id`` and wait for its reply's value."""
        call_id = message.call_id  # type: ignore[attr-defined]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            await self.send(message)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._calls.pop(call_id, None)

    def next_call_id(self) -> int:
        return next(self._call_ids)

    async def close(self) -> None:
        await self.transport.close()
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(BaseException):
                await self._receiver

    # -- receiving ---------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        try:
            while True:
                data = await self.transport.recv()
                await self._handle(data)
        except (PeerClosed, ProtocolError) as exc:
            self._closed_error = exc
        except asyncio.CancelledError:
            self._closed_error = PeerClosed("the connection was closed")
            raise
        finally:
            error = self._closed_error or PeerClosed("the connection was closed")
            self.closed_event.set()
            for future in self._calls.values():
                if not future.done():
                    future.set_exception(error)
            if self.on_closed is not None:
                self.on_closed(error)

    async def _decode(self, data: memoryview) -> tuple[object, Message]:
        if not data.nbytes:
            raise ProtocolError("empty message")
        if data[0] == 0:
            raw = codec.decode(data[1:], limits=self.limits)
            return raw, _parse(raw)
        if data[0] != _WITH_ATTACHMENT or data.nbytes < 5:
            raise ProtocolError("unknown message layout")
        (length,) = _HEADER_LENGTH.unpack(data[1:5])
        if 5 + length > data.nbytes:
            raise ProtocolError("message header longer than the message")
        raw = codec.decode(data[5 : 5 + length], limits=self.limits)
        message = _parse(raw)
        try:
            if "value" not in type(message).model_fields:
                raise ProtocolError(f"{type(message).__name__} messages carry no attachment")
            body = data[5 + length :]
            if body.nbytes >= ATTACHMENT_IN_THREAD_BYTES:
                value = await asyncio.to_thread(codec.decode, body, limits=self._borrowing)
            else:
                value = codec.decode(body, limits=self._borrowing)
        except ProtocolError as exc:
            exc.call_id = call_id_of(raw)  # type: ignore[attr-defined]
            raise
        return raw, message.model_copy(update={"value": value})

    async def _handle(self, data: memoryview) -> None:
        raw: object = None
        try:
            raw, message = await self._decode(data)
        except ProtocolError as exc:
            await self._refuse(str(exc), getattr(exc, "call_id", None))
            return
        kind = message.kind  # type: ignore[attr-defined]
        if kind == "hello":
            self.peer_hello = message  # type: ignore[assignment]
            self._hello.set()
            return
        if kind == "reply":
            self._on_reply(message)  # type: ignore[arg-type]
            return
        if kind == "error":
            log.warning("the peer refused a message: %s", message.message)  # type: ignore[attr-defined]
            return
        handler = self._handlers.get(kind)
        if handler is None:
            await self._refuse(f"this side does not accept {kind!r} messages", call_id_of(raw))
            return
        call_id = call_id_of(raw)
        try:
            result = handler(message)
            if asyncio.iscoroutine(result):
                result = await result
        except DuetError as exc:
            if call_id is not None:
                await self._reply_error(call_id, exc)
            else:
                await self._refuse(str(exc), None)
        except Exception as exc:  # noqa: BLE001 - the loop must keep serving
            log.exception("handler for %s failed", kind)
            if call_id is not None:
                await self._reply_error(call_id, exc, safe=f"internal error ({type(exc).__name__})")

    def _on_reply(self, reply: Reply) -> None:
        future = self._calls.get(reply.call_id)
        if future is None or future.done():
            return
        if reply.ok:
            future.set_result(reply.value)
        else:
            try:
                raise_from_info(reply.error)
            except DuetError as exc:
                future.set_exception(exc)

    async def reply(self, call_id: int, value: Any) -> None:
        await self.send(Reply(call_id=call_id, ok=True, value=value))

    async def send_error(self, call_id: int, info: dict[str, Any]) -> None:
        """Answer a call with an error already in wire form."""
        with contextlib.suppress(PeerClosed):
            await self.send(Reply(call_id=call_id, ok=False, error=info))

    async def _reply_error(self, call_id: int, exc: BaseException, safe: str | None = None) -> None:
        with contextlib.suppress(PeerClosed):
            await self.send(
                Reply(call_id=call_id, ok=False, error=error_info(exc, safe_message=safe))
            )

    async def _refuse(self, what: str, call_id: int | None) -> None:
        self.bad_messages += 1
        log.info("refused a message from the peer: %s", what)
        with contextlib.suppress(PeerClosed):
            if call_id is not None:
                await self.send(
                    Reply(call_id=call_id, ok=False, error=error_info(ProtocolError(what)))
                )
            else:
                await self.send(ErrorNotice(code="bad_message", message=what[:4000]))


def _parse(raw: object) -> Message:
    """``parse_message``, keeping the call id on the error so the refusal reaches the caller."""
    try:
        return parse_message(raw)
    except ProtocolError as exc:
        exc.call_id = call_id_of(raw)  # type: ignore[attr-defined]
        raise
