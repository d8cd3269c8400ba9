"""A bare aiortc peer to validate the namespace harness, independent of duet_p2p.

Two instances share a directory: the offerer writes offer.json, the answerer answer.json.
The offerer opens a data channel, sends a message and waits for its echo. Each prints one
JSON line on stdout with the selected ICE candidate pair, and exits 0; on failure it prints
{"ok": false, "error": ...}, writes the reason on stderr and exits 2.

    python raw_peer.py offerer --dir D --ice-servers '[{"urls": ["stun:198.51.100.1:3478"]}]'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)

logger = logging.getLogger("raw_peer")


class PeerFailure(Exception):
    """The peer could not connect or exchange its message in time."""


def ice_servers_from_json(text: str) -> list[RTCIceServer]:
    """Parse a JSON list of RTCIceServer-like dicts (never None: no implicit public STUN)."""
    items = json.loads(text)
    if not isinstance(items, list):
        raise ValueError("--ice-servers must be a JSON list")
    return [
        RTCIceServer(
            urls=item["urls"], username=item.get("username"), credential=item.get("credential")
        )
        for item in items
    ]


def fetch_ice_servers(url: str, timeout: float = 5.0) -> list[RTCIceServer]:
    """GET {"iceServers": [...]} from a signaling server (e.g. http://host:port/v1/ice-servers)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
        body = json.loads(response.read(65536))
    return ice_servers_from_json(json.dumps(body["iceServers"]))


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write atomically so the other peer never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


async def read_json(path: Path, deadline: float) -> dict[str, Any]:
    """Wait (until the monotonic deadline) for a file written by the other peer."""
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        await asyncio.sleep(0.05)
    raise PeerFailure(f"timed out waiting for {path.name} from the other peer")


def _candidate(c: Any) -> dict[str, Any]:
    return {"type": c.type, "address": f"{c.host}:{c.port}"}


def selected_pair(pc: RTCPeerConnection) -> dict[str, Any]:
    """The nominated ICE pair, read from aioice (aiortc exposes no stats for it)."""
    connection = pc.sctp.transport.transport._connection  # aioice.Connection
    pair = connection._nominated.get(1)
    if pair is None:
        raise PeerFailure("connected, but aioice reports no nominated candidate pair")
    local = pair.local_candidate
    reflexive = [
        c
        for c in connection.local_candidates
        if c.type == "srflx" and (c.related_address, c.related_port) == (local.host, local.port)
    ]
    return {
        # A srflx path uses the host socket, so aioice names the local side "host"; the
        # address the other peer saw is in local_reflexive.
        "local": _candidate(local),
        "local_reflexive": _candidate(reflexive[0]) if reflexive else None,
        "remote": _candidate(pair.remote_candidate),
        "gathered": sorted({c.type for c in connection.local_candidates}),
    }


async def wait_event(
    event: asyncio.Event, deadline: float, what: str, failed: asyncio.Event
) -> None:
    """Wait for event, failing early if the connection failed or at the deadline."""
    waiter = asyncio.ensure_future(event.wait())
    failer = asyncio.ensure_future(failed.wait())
    try:
        done, _ = await asyncio.wait(
            {waiter, failer},
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        waiter.cancel()
        failer.cancel()
    if waiter not in done:
        cause = "ICE failed" if failer in done else "timed out"
        raise PeerFailure(f"{what}: {cause}")


async def run(role: str, workdir: Path, ice_servers: list[RTCIceServer], timeout: float) -> dict:
    start = time.monotonic()
    deadline = start + timeout
    pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers))
    failed = asyncio.Event()
    opened = asyncio.Event()
    echoed = asyncio.Event()
    channel_box: list[RTCDataChannel] = []
    message = f"ping from {role} {os.getpid()}"
    ice_started = 0.0

    @pc.on("connectionstatechange")
    def on_state() -> None:
        logger.info("%s connection state %s", role, pc.connectionState)
        if pc.connectionState == "failed":
            failed.set()

    def attach(channel: RTCDataChannel) -> None:
        channel_box.append(channel)

        @channel.on("message")
        def on_message(data: Any) -> None:
            if role == "answerer":
                channel.send(data)
                echoed.set()
            elif data == message:
                echoed.set()

        if channel.readyState == "open":
            opened.set()
        channel.on("open", opened.set)

    try:
        if role == "offerer":
            attach(pc.createDataChannel("raw"))
            await pc.setLocalDescription(await pc.createOffer())
            write_json(workdir / "offer.json", _sdp(pc))
            answer = await read_json(workdir / "answer.json", deadline)
            ice_started = time.monotonic()
            await pc.setRemoteDescription(RTCSessionDescription(**answer))
            await wait_event(opened, deadline, "data channel did not open", failed)
            connected = time.monotonic()
            pair = selected_pair(pc)
            channel_box[0].send(message)
            await wait_event(echoed, deadline, "no echo", failed)
            write_json(workdir / "offerer.done", {"ok": True})
        else:
            pc.on("datachannel", attach)
            offer = await read_json(workdir / "offer.json", deadline)
            ice_started = time.monotonic()
            await pc.setRemoteDescription(RTCSessionDescription(**offer))
            await pc.setLocalDescription(await pc.createAnswer())
            write_json(workdir / "answer.json", _sdp(pc))
            await wait_event(opened, deadline, "data channel did not open", failed)
            connected = time.monotonic()
            pair = selected_pair(pc)
            await wait_event(echoed, deadline, "no message to echo", failed)
            # Stay up until the offerer has its echo (bounded).
            await read_json(workdir / "offerer.done", min(deadline, time.monotonic() + 5))
        return {
            "ok": True,
            "role": role,
            "connect_seconds": round(connected - ice_started, 3),
            "total_seconds": round(time.monotonic() - start, 3),
            **pair,
        }
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pc.close(), 5)


def _sdp(pc: RTCPeerConnection) -> dict[str, str]:
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["offerer", "answerer"])
    parser.add_argument("--dir", required=True, type=Path, help="directory shared by both peers")
    parser.add_argument("--ice-servers", default="[]", help="JSON list of RTCIceServer dicts")
    parser.add_argument("--ice-servers-url", help="fetch the ICE servers from this URL instead")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds for everything")
    parser.add_argument("-v", "--verbose", action="store_true", help="aioice/aiortc logs on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(
        format="%(relativeCreated)d %(name)s %(message)s",
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
    )
    try:
        if args.ice_servers_url:
            servers = fetch_ice_servers(args.ice_servers_url)
        else:
            servers = ice_servers_from_json(args.ice_servers)
        result = asyncio.run(run(args.role, args.dir, servers, args.timeout))
    except (PeerFailure, OSError, ValueError, KeyError) as exc:
        reason = f"{args.role}: no connection within {args.timeout:g} s: {exc}"
        print(reason, file=sys.stderr)
        print(json.dumps({"ok": False, "role": args.role, "error": reason}), flush=True)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
