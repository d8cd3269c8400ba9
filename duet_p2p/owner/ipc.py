"""Frames between the owner's monitor and a worker process, over a Unix socket pair.

A frame is two lengths (little-endian u64: head, attachment), a head (a CBOR map in our
strict codec) and an optional raw attachment (an encoded value). Nothing is pickled: the
worker is untrusted, so what it sends is parsed like a peer's message, under caps.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from typing import Any

from duet_p2p.errors import ProtocolError
from duet_p2p.rpc import codec

LENGTHS = struct.Struct("<QQ")
MAX_HEAD_BYTES = 64 * 1024**2
"""Largest head the monitor reads from a worker (heads carry outcomes, never values)."""
_HEAD_LIMITS = codec.DecodeLimits(max_bytes=MAX_HEAD_BYTES, max_depth=32)


class Attachment(bytearray):
    """Bytes a worker sent, with their SHA-256 (computed while they arrived)."""

    sha256: str = ""


def frame(head: dict[str, Any], attachment: bytes | memoryview | None = None) -> list[Any]:
    """The parts of one frame, for a vectored write."""
    encoded = codec.encode(head)
    size = memoryview(attachment).nbytes if attachment is not None else 0
    parts: list[Any] = [LENGTHS.pack(len(encoded), size), encoded]
    if size:
        parts.append(attachment)
    return parts


def parse_head(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    head = codec.decode(data, limits=_HEAD_LIMITS)
    if not isinstance(head, dict) or not isinstance(head.get("t"), str):
        raise ProtocolError("a worker frame's head must be a map with a kind")
    return head


class BlockingChannel:
    """The worker's end: blocking reads and writes on its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, head: dict[str, Any], attachment: bytes | memoryview | None = None) -> None:
        for part in frame(head, attachment):
            self.sock.sendall(part)

    def recv(self) -> tuple[dict[str, Any], memoryview | None]:
        head_size, size = LENGTHS.unpack(self._exact(LENGTHS.size))
        head = parse_head(self._exact(head_size))
        return head, (memoryview(self._exact(size)) if size else None)

    def _exact(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:], size - got)
            if n == 0:
                raise EOFError("the monitor closed the channel")
            got += n
        return buffer


class AsyncChannel:
    """The monitor's end: frames from an untrusted worker, read under caps."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_attachment: int
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_attachment = max_attachment

    def send(self, head: dict[str, Any], attachment: bytes | memoryview | None = None) -> None:
        self.writer.writelines(frame(head, attachment))

    async def drain(self) -> None:
        await self.writer.drain()

    async def recv(self) -> tuple[dict[str, Any], Attachment | None]:
        head_size, size = LENGTHS.unpack(await self.reader.readexactly(LENGTHS.size))
        if head_size > MAX_HEAD_BYTES or size > self.max_attachment:
            raise ProtocolError("the worker sent a frame over the monitor's caps")
        head = parse_head(await self.reader.readexactly(head_size))
        if not size:
            return head, None
        return head, await self._read_into(size)

    async def _read_into(self, size: int) -> Attachment:
        """Read an attachment a chunk at a time into one buffer (one copy of a large value,
        not two), hashing it on the way: the SHA-256 of exactly these bytes."""
        buffer = Attachment(size)
        view = memoryview(buffer)
        digest = hashlib.sha256()
        got = 0
        while got < size:
            chunk = await self.reader.read(min(size - got, 1 << 20))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", size)
            view[got : got + len(chunk)] = chunk
            digest.update(chunk)
            got += len(chunk)
        buffer.sha256 = digest.hexdigest()
        return buffer

    def close(self) -> None:
        self.writer.close()
