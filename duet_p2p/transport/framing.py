"""Frames on the data channel: a one-byte type, then a type-specific body.

A message is split into a START frame (carrying the message's total length) and as many
CONT frames as needed, each no larger than the channel's max message size. Control frames
(credit, ping, pong, close) may come between the frames of a message.

Small frames sent together travel as one BATCH frame (each inner frame preceded by its
u32 length): aiortc sends every data-channel message as its own packet and answers each
with an acknowledgement, so a hundred small messages would cost a hundred round trips'
worth of work on both sides.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from duet_p2p.errors import ProtocolError
from duet_p2p.transport.base import Buffer

START = 0x01
CONT = 0x02
CREDIT = 0x10
PING = 0x20
PONG = 0x21
CLOSE = 0x30
BATCH = 0x40

_U64 = struct.Struct("!Q")
_U32 = struct.Struct("!I")
START_HEADER = 1 + _U64.size
CONT_HEADER = 1
BATCH_ITEM_HEADER = _U32.size
_CONT_BYTE = bytes((CONT,))
_BATCH_BYTE = bytes((BATCH,))


def control_frame(kind: int, value: int = 0) -> bytes:
    """A credit, ping, pong or close frame."""
    return bytes((kind,)) + _U64.pack(value)


def read_u64(frame: bytes, offset: int = 1) -> int:
    if len(frame) < offset + _U64.size:
        raise ProtocolError("truncated frame")
    return _U64.unpack_from(frame, offset)[0]


def batch_frame(frames: Sequence[bytes]) -> bytes:
    """One BATCH frame carrying ``frames`` (none of them a batch), in order."""
    pieces: list[bytes] = [_BATCH_BYTE]
    for frame in frames:
        pieces.append(_U32.pack(len(frame)))
        pieces.append(frame)
    return b"".join(pieces)


def split_batch(frame: bytes) -> Iterator[memoryview]:
    """The frames inside a BATCH frame (views into it); refuses nesting and bad lengths."""
    view = memoryview(frame)
    end = view.nbytes
    offset = 1
    if offset == end:
        raise ProtocolError("an empty batch frame")
    while offset < end:
        if offset + BATCH_ITEM_HEADER > end:
            raise ProtocolError("truncated batch frame")
        (length,) = _U32.unpack_from(view, offset)
        offset += BATCH_ITEM_HEADER
        if length == 0 or offset + length > end:
            raise ProtocolError("a batch item is empty or longer than the batch")
        if view[offset] == BATCH:
            raise ProtocolError("a batch inside a batch")
        yield view[offset : offset + length]
        offset += length


def split_message(parts: Sequence[Buffer], max_frame: int) -> Iterator[bytes]:
    """Frames of one message made of ``parts``; each frame at most ``max_frame`` bytes.

    Each frame is built with a single copy of its slice of the payload.
    """
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(v.nbytes for v in views)
    pieces: list[Buffer] = [bytes((START,)) + _U64.pack(total)]
    room = max_frame - START_HEADER
    for view in views:
        offset = 0
        while offset < view.nbytes:
            take = min(room, view.nbytes - offset)
            pieces.append(view[offset : offset + take])
            offset += take
            room -= take
            if room == 0:
                yield b"".join(pieces)
                pieces = [_CONT_BYTE]
                room = max_frame - CONT_HEADER
    if len(pieces) > 1 or total == 0:
        yield b"".join(pieces)


class Reassembler:
    """Collects START/CONT frames into whole messages, in one buffer that grows with the
    data received (never with the length announced: ten bytes must not reserve gigabytes)."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer: bytearray | None = None
        self._total = 0

    @property
    def in_progress(self) -> bool:
        return self._buffer is not None

    def feed(self, frame: bytes) -> memoryview | None:
        """Take one data frame; return the message when it is complete."""
        kind = frame[0]
        if kind == START:
            if self._buffer is not None:
                raise ProtocolError("a new message started before the previous one ended")
            total = read_u64(frame)
            if total > self.max_message_bytes:
                raise ProtocolError(
                    f"the peer announced a {total}-byte message; the limit is "
                    f"{self.max_message_bytes} bytes"
                )
            body = memoryview(frame)[START_HEADER:]
            if body.nbytes == total:
                return body
            self._buffer = bytearray()
            self._total = total
        elif kind == CONT:
            if self._buffer is None:
                raise ProtocolError("a continuation frame arrived outside a message")
            body = memoryview(frame)[CONT_HEADER:]
        else:
            raise ProtocolError(f"unknown frame type 0x{kind:02x}")
        if len(self._buffer) + body.nbytes > self._total:
            raise ProtocolError("a message is longer than its announced length")
        self._buffer += body
        if len(self._buffer) < self._total:
            return None
        message, self._buffer = memoryview(self._buffer), None
        return message
