"""A message transport over one aiortc data channel.

aiortc gives a reliable ordered channel, but: ``send()`` refuses messages above the remote's
max message size, ``bufferedAmount`` under-reports what is in flight, a killed peer goes
unnoticed for ~30 s, and ``pc.close()`` drops queued data. This module adds framing, a
credit window that really bounds memory, a heartbeat, and a close that delivers first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from duet_p2p.errors import PeerClosed, ProtocolError
from duet_p2p.transport import framing
from duet_p2p.transport.base import Buffer

log = logging.getLogger(__name__)
_CLOSED = object()
SMALL_FRAME_BYTES = 8 * 1024
"""Frames below this size wait for the event loop to turn, so that the ones sent together
leave as one BATCH frame (one SCTP message) instead of one packet and acknowledgement each."""
PROGRESS_THRESHOLD_BYTES = 10 * 1024 * 1024
"""Incoming messages at least this large are reported to ``on_progress``."""
ProgressHook = Callable[[int, int], None]


@dataclass(frozen=True)
class ChannelOptions:
    """Tunables of a data-channel transport."""

    window_bytes: int = 4 * 1024 * 1024
    """Bytes a sender may have in flight before the receiver acknowledges them."""
    max_frame_bytes: int = 64 * 1024
    """Upper bound of one frame; the remote's advertised max message size lowers it.
    64 KiB costs aiortc the least CPU per byte: its receiver rescans the chunks of a
    message being reassembled as each one arrives, so 256 KiB frames cost ~40% more."""
    max_message_bytes: int = 16 * 1024**3
    """Largest whole message accepted from the peer."""
    heartbeat_interval: float = 1.0
    """Seconds between pings when nothing else was sent."""
    heartbeat_timeout: float = 6.0
    """Seconds of silence after which the peer is considered gone."""
    close_timeout: float = 5.0
    """Seconds ``close()`` waits for queued data to be delivered and acknowledged."""


class DataChannelTransport:
    """Whole messages of any size over an open aiortc ``RTCDataChannel``."""

    def __init__(self, pc: Any, channel: Any, options: ChannelOptions | None = None) -> None:
        self._pc = pc
        self._channel = channel
        self.options = options or ChannelOptions()
        remote_max = getattr(getattr(pc, "sctp", None), "_remote_max_message_size", 0) or 65536
        self._max_frame = min(self.options.max_frame_bytes, remote_max)
        self._reassembler = framing.Reassembler(self.options.max_message_bytes)
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._batch_scheduled = False
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._credit = asyncio.Condition()
        self._in_flight = 0
        self._unacknowledged = 0
        self._last_received = time.monotonic()
        self._last_sent = time.monotonic()
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._ping_counter = 0
        self._peer_closed = asyncio.Event()
        self._error: Exception | None = None
        self._closed = False
        self._closing = False
        self.messages_received = 0
        self.protocol_errors = 0
        self.on_progress: ProgressHook | None = None
        """Called as ``on_progress(received, total)`` on the event loop as each frame of a
        large incoming message arrives (the last call has ``received == total``)."""
        self.progress_threshold = PROGRESS_THRESHOLD_BYTES
        self._receiving = (0, 0)
        channel.on("message", self._on_frame)
        channel.on("close", self._on_channel_close)
        pc.on("connectionstatechange", self._on_connection_state)
        self._heartbeat: asyncio.Future[None] | None = None

    def activate(self) -> None:
        """Start the heartbeat once the channel is open (frames are taken from creation on,
        so nothing the peer sends right after opening is lost)."""
        remote_max = getattr(getattr(self._pc, "sctp", None), "_remote_max_message_size", 0)
        if remote_max:  # known once negotiated
            self._max_frame = min(self.options.max_frame_bytes, remote_max)
        if self._heartbeat is None:
            self._last_received = self._last_sent = time.monotonic()
            self._heartbeat = asyncio.ensure_future(self._heartbeat_loop())

    @property
    def closed(self) -> bool:
        return self._closed or self._error is not None

    @property
    def max_frame_bytes(self) -> int:
        return self._max_frame

    # -- sending -----------------------------------------------------------------------

    async def send(self, *parts: Buffer) -> None:
        """Send one message; waits while the window is full, raises PeerClosed if gone."""
        async with self._send_lock:
            for frame in framing.split_message(parts, self._max_frame):
                await self._wait_for_credit(len(frame))
                self._send_frame(frame)
                self._in_flight += len(frame)

    async def _wait_for_credit(self, size: int) -> None:
        if self._in_flight + size <= self.options.window_bytes:
            self._raise_if_closed()
            return
        async with self._credit:
            while self._in_flight + size > self.options.window_bytes and self._in_flight > 0:
                self._raise_if_closed()
                await self._credit.wait()
        self._raise_if_closed()

    def _send_frame(self, frame: bytes) -> None:
        self._raise_if_closed()
        try:
            self._put(frame)
        except Exception as exc:  # aiortc raises InvalidStateError once closed
            self._fail(PeerClosed(f"the data channel is closed ({type(exc).__name__})"))
            raise self._error from exc  # type: ignore[misc]

    def _put(self, frame: bytes) -> None:
        """Hand a frame to the channel: large ones at once (after any waiting small ones),
        small ones when the event loop turns, together."""
        size = len(frame) + framing.BATCH_ITEM_HEADER
        if size >= SMALL_FRAME_BYTES or self._batch_bytes + size > self._max_frame - 1:
            self._flush_batch()
        if size >= SMALL_FRAME_BYTES:
            self._channel.send(frame)
            self._last_sent = time.monotonic()
            return
        self._batch.append(frame)
        self._batch_bytes += size
        if not self._batch_scheduled:
            self._batch_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_batch_soon)

    def _flush_batch_soon(self) -> None:
        self._batch_scheduled = False
        try:
            self._flush_batch()
        except Exception as exc:  # noqa: BLE001 - no sender to raise to: fail the connection
            self._fail(PeerClosed(f"the data channel is closed ({type(exc).__name__})"))

    def _flush_batch(self) -> None:
        if not self._batch:
            return
        frames, self._batch, self._batch_bytes = self._batch, [], 0
        self._channel.send(frames[0] if len(frames) == 1 else framing.batch_frame(frames))
        self._last_sent = time.monotonic()

    def _raise_if_closed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise PeerClosed("the connection is closed")

    # -- receiving ---------------------------------------------------------------------

    async def recv(self) -> memoryview:
        """The next whole message."""
        item = await self._inbox.get()
        if item is _CLOSED:
            self._inbox.put_nowait(_CLOSED)
            raise self._error or PeerClosed("the peer closed the connection")
        return item  # type: ignore[return-value]

    def _on_frame(self, frame: bytes | str) -> None:
        self._last_received = time.monotonic()
        if not isinstance(frame, bytes) or not frame:
            self._protocol_violation("the peer sent a text or empty frame")
            return
        if frame[0] != framing.BATCH:
            self._dispatch(frame)
            return
        try:
            for inner in framing.split_batch(frame):
                self._dispatch(inner)
                if self._error is not None:
                    return
        except ProtocolError as exc:
            self._protocol_violation(str(exc))

    def _dispatch(self, frame: bytes | memoryview) -> None:
        kind = frame[0]
        try:
            if kind in (framing.START, framing.CONT):
                self._on_data(frame)
            elif kind == framing.CREDIT:
                self._on_credit(framing.read_u64(frame))
            elif kind == framing.PING:
                self._send_control(framing.PONG, framing.read_u64(frame))
            elif kind == framing.PONG:
                self._on_pong(framing.read_u64(frame))
            elif kind == framing.CLOSE:
                self._on_peer_close()
            else:
                self._protocol_violation(f"unknown frame type 0x{kind:02x}")
        except ProtocolError as exc:
            self._protocol_violation(str(exc))

    def _on_data(self, frame: bytes) -> None:
        self._unacknowledged += len(frame)
        message = self._reassembler.feed(frame)
        if self.on_progress is not None:
            self._report_progress(frame)
        if message is not None:
            self.messages_received += 1
            self._inbox.put_nowait(message)
        if self._unacknowledged >= self.options.window_bytes // 4:
            self._flush_credit()

    def _report_progress(self, frame: bytes) -> None:
        if frame[0] == framing.START:
            received, total = len(frame) - framing.START_HEADER, framing.read_u64(frame)
        else:
            received = self._receiving[0] + len(frame) - framing.CONT_HEADER
            total = self._receiving[1]
        self._receiving = (received, total)
        if total < self.progress_threshold or self.on_progress is None:
            return
        try:
            self.on_progress(received, total)
        except Exception:  # noqa: BLE001 - a display hook must not break the transport
            log.debug("the progress hook failed", exc_info=True)

    def _flush_credit(self) -> None:
        if self._unacknowledged:
            amount, self._unacknowledged = self._unacknowledged, 0
            self._send_control(framing.CREDIT, amount)

    def _on_credit(self, amount: int) -> None:
        self._in_flight = max(0, self._in_flight - amount)
        asyncio.ensure_future(self._notify_credit())

    async def _notify_credit(self) -> None:
        async with self._credit:
            self._credit.notify_all()

    def _send_control(self, kind: int, value: int = 0) -> None:
        if self._closed and kind != framing.CLOSE:
            return
        try:
            self._put(framing.control_frame(kind, value))
        except Exception:  # noqa: BLE001 - a dead channel is noticed by the heartbeat
            log.debug("control frame not sent", exc_info=True)

    def _protocol_violation(self, what: str) -> None:
        """A framing error cannot be recovered from: the byte stream is out of step."""
        self.protocol_errors += 1
        log.warning("closing the connection: %s", what)
        self._fail(ProtocolError(f"the peer broke the framing protocol: {what}"))
        asyncio.ensure_future(self._abort())

    # -- liveness ----------------------------------------------------------------------

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of one ping, in seconds."""
        self._ping_counter += 1
        nonce = self._ping_counter
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = future
        started = time.perf_counter()
        self._send_control(framing.PING, nonce)
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            self._pings.pop(nonce, None)
        return time.perf_counter() - started

    def _on_pong(self, nonce: int) -> None:
        future = self._pings.get(nonce)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    async def _heartbeat_loop(self) -> None:
        interval = self.options.heartbeat_interval
        while not self.closed:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            if now - self._last_received > self.options.heartbeat_timeout:
                silence = now - self._last_received
                self._fail(
                    PeerClosed(f"the peer stopped responding ({silence:.1f} s without a heartbeat)")
                )
                await self._abort()
                return
            if now - self._last_sent >= interval:
                self._send_control(framing.PING, 0)

    def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        if state in ("failed", "closed") and not self._closing:
            self._fail(PeerClosed(f"the peer connection is {state}"))

    def _on_channel_close(self) -> None:
        if not self._closing:
            self._fail(PeerClosed("the peer closed the data channel"))

    def _on_peer_close(self) -> None:
        self._flush_credit()
        if not self._peer_closed.is_set():
            self._peer_closed.set()
            self._inbox.put_nowait(_CLOSED)
            if not self._closing:
                self._send_control(framing.CLOSE)
                asyncio.ensure_future(self.close())

    def _fail(self, error: Exception) -> None:
        if self._error is None and not self._closed:
            self._error = error
            log.info("connection lost: %s", error)
        self._inbox.put_nowait(_CLOSED)
        for future in self._pings.values():
            if not future.done():
                future.set_exception(error)
        asyncio.ensure_future(self._notify_credit())

    # -- closing -----------------------------------------------------------------------

    async def close(self) -> None:
        """Deliver queued messages, tell the peer, then release the connection."""
        if self._closing:
            return
        self._closing = True
        if self._error is None:
            try:
                await asyncio.wait_for(self._send_lock.acquire(), self.options.close_timeout)
                self._send_lock.release()
                self._flush_credit()
                self._send_control(framing.CLOSE)
                await asyncio.wait_for(self._peer_closed.wait(), self.options.close_timeout)
            except (TimeoutError, PeerClosed, ProtocolError):
                log.debug("peer did not acknowledge the close in time")
        await self._abort()

    async def _abort(self) -> None:
        self._closing = True
        self._closed = True
        self._inbox.put_nowait(_CLOSED)
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        with contextlib.suppress(Exception):
            self._flush_batch()
        with contextlib.suppress(Exception):
            self._channel.close()
        with contextlib.suppress(Exception):
            await self._pc.close()
        asyncio.ensure_future(self._notify_credit())
