"""An in-process pair of transports: a real transport for tests of the layers above."""

from __future__ import annotations

import asyncio

from duet_p2p.errors import PeerClosed
from duet_p2p.transport.base import Buffer

_CLOSED = object()


class MemoryTransport:
    """One end of an in-memory, ordered, reliable message pipe."""

    def __init__(self) -> None:
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._peer: MemoryTransport | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, *parts: Buffer) -> None:
        if self._closed or self._peer is None or self._peer._closed:
            raise PeerClosed("the connection is closed")
        self._peer._inbox.put_nowait(memoryview(b"".join(parts)))

    async def recv(self) -> memoryview:
        item = await self._inbox.get()
        if item is _CLOSED:
            self._inbox.put_nowait(_CLOSED)
            raise PeerClosed("the peer closed the connection")
        return item  # type: ignore[return-value]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put_nowait(_CLOSED)
        if self._peer is not None:
            self._peer._inbox.put_nowait(_CLOSED)


def memory_pair() -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected in-memory transports."""
    a, b = MemoryTransport(), MemoryTransport()
    a._peer, b._peer = b, a
    return a, b
