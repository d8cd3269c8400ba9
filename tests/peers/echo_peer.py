"""A scientist-side peer at the transport level, for the connection tests.

    python echo_peer.py SIGNALING_URL DUET_ID [--timeout S]

Joins the Duet, prints ``CLIENT_ID <id>`` (for the owner to confirm) and, once the channel
is open, ``CONNECTED``. Then it serves commands; each message starts with one tag byte:

- ``D<payload>``: answer with the SHA-256 (64 hex digits) of the payload.
- ``G<size>``: send the SHA-256 of ``size`` fresh random bytes, then the bytes themselves.
- ``B<count> <size>``: send ``count`` messages of ``size`` bytes (byte ``i % 256`` repeated in
  message ``i``), then close gracefully and exit.
- ``Q``: close gracefully and exit.

Exits 0 after a graceful close (its own or the owner's), 2 on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys

from duet_p2p.connect import ConnectOptions, join
from duet_p2p.errors import DuetError, PeerClosed
from duet_p2p.transport.channel import DataChannelTransport


async def serve(transport: DataChannelTransport) -> None:
    while True:
        try:
            message = await transport.recv()
        except PeerClosed:
            return
        tag, body = bytes(message[:1]), message[1:]
        if tag == b"D":
            await transport.send(hashlib.sha256(body).hexdigest().encode())
        elif tag == b"G":
            payload = os.urandom(int(bytes(body)))
            await transport.send(hashlib.sha256(payload).hexdigest().encode())
            await transport.send(payload)
        elif tag == b"B":
            count, size = (int(x) for x in bytes(body).split())
            for i in range(count):
                await transport.send(bytes((i % 256,)) * size)
            await transport.close()
            return
        elif tag == b"Q":
            await transport.close()
            return
        else:
            raise SystemExit(f"unknown command {tag!r}")


async def main(url: str, duet_id: str, timeout: float) -> None:
    options = ConnectOptions(
        signaling_url=url, ice_servers=[], host_addresses=["127.0.0.1"], timeout=timeout
    )

    def announce(client_id: str) -> None:
        print(f"CLIENT_ID {client_id}", flush=True)

    connection = await join(duet_id, options, on_client_id=announce)
    print("CONNECTED", flush=True)
    try:
        await serve(connection.transport)
    finally:
        await connection.close()
    print("CLOSED", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="transport-level echo peer")
    parser.add_argument("url")
    parser.add_argument("duet_id")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.url, args.duet_id, args.timeout))
    except DuetError as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
        sys.exit(2)
