"""The narrow interface the rpc layer uses to move whole messages."""

from __future__ import annotations

from typing import Protocol

Buffer = bytes | bytearray | memoryview


class MessageTransport(Protocol):
    """A reliable, ordered pipe of whole messages of any size."""

    @property
    def closed(self) -> bool: ...

    async def send(self, *parts: Buffer) -> None:
        """Send one message made of ``parts`` (concatenated); waits for flow-control credit."""

    async def recv(self) -> memoryview:
        """The next whole message; raises PeerClosed once the peer is gone and all is read."""

    async def close(self) -> None:
        """Deliver what is queued, tell the peer, and release the connection."""
