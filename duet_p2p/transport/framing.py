"""Frames on the data channel: a one-byte type, then a type-specific body.

A message is split into a START frame (carrying the message's total length) and as many
CONT frames as needed, each no larger than the channel's max message size. Control frames
(credit, ping, pong, close) may come between the frames of a message.
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

_U64 = struct.Struct("!Q")
START_HEADER = 1 + _U64.size
CONT_HEADER = 1
_CONT_BYTE = bytes((CONT,))


def control_frame(kind: int, value: int = 0) -> bytes:
    """A credit, ping, pong or close frame."""
    return bytes((kind,)) + _U64.pack(value)


def read_u64(frame: bytes, offset: int = 1) -> int:
    if len(frame) < offset + _U64.size:
        raise ProtocolError("truncated frame")
    return _U64.unpack_from(frame, offset)[0]


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
