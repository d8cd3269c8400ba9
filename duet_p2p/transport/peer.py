"""Creating aiortc peer connections: ICE configuration, the channel, the open timeout."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

from duet_p2p.errors import ConfigurationError, ConnectionTimeout

log = logging.getLogger(__name__)
CHANNEL_LABEL = "duet"
CHANNEL_ID = 0
_original_host_addresses = aioice.ice.get_host_addresses
_host_addresses: tuple[str, ...] | None = None


def ice_server_objects(servers: Sequence[dict[str, Any]]) -> list[RTCIceServer]:
    """RTCIceServer objects from W3C-style dicts; refuses malformed entries."""
    result = []
    for entry in servers:
        if not isinstance(entry, dict) or "urls" not in entry:
            raise ConfigurationError(f"an ICE server needs 'urls': {entry!r}")
        urls = entry["urls"]
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ConfigurationError("ICE server 'urls' must be a string or a list of strings")
        for url in urls:
            if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
                raise ConfigurationError(f"not a STUN/TURN URL: {url!r}")
        result.append(
            RTCIceServer(
                urls=urls, username=entry.get("username"), credential=entry.get("credential")
            )
        )
    return result


def restrict_host_addresses(addresses: Sequence[str] | None) -> None:
    """Gather host candidates only on ``addresses`` (e.g. ["127.0.0.1"]); None: all.

    aioice leaves out loopback, so a setting of loopback addresses also brings them in.
    The setting is process-wide, like aioice's own address discovery.
    """
    global _host_addresses
    _host_addresses = tuple(addresses) if addresses else None
    aioice.ice.get_host_addresses = (
        _original_host_addresses if _host_addresses is None else _configured_host_addresses
    )


def _configured_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    wanted = _host_addresses or ()
    return [a for a in wanted if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


def new_peer_connection(ice_servers: Sequence[dict[str, Any]]) -> tuple[Any, Any]:
    """A peer connection and its negotiated data channel (both sides create it as id 0).

    ``ice_servers`` is always passed explicitly: aiortc contacts a public STUN server
    when it is given none.
    """
    config = RTCConfiguration(iceServers=ice_server_objects(ice_servers))
    pc = RTCPeerConnection(configuration=config)
    channel = pc.createDataChannel(CHANNEL_LABEL, ordered=True, negotiated=True, id=CHANNEL_ID)
    return pc, channel


async def wait_open(pc: Any, channel: Any, timeout: float, *, has_turn: bool) -> None:
    """Wait until ``channel`` is open; a clear ConnectionTimeout names the likely cause."""
    if channel.readyState == "open":
        return
    opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_open() -> None:
        if not opened.done():
            opened.set_result(None)

    def on_state() -> None:
        if pc.connectionState == "failed" and not opened.done():
            opened.set_exception(_no_path_error(pc, timeout, has_turn, failed=True))

    channel.on("open", on_open)
    pc.on("connectionstatechange", on_state)
    try:
        await asyncio.wait_for(opened, timeout)
    except TimeoutError:
        raise _no_path_error(pc, timeout, has_turn, failed=False) from None
    finally:
        channel.remove_listener("open", on_open)
        pc.remove_listener("connectionstatechange", on_state)


def _no_path_error(pc: Any, timeout: float, has_turn: bool, *, failed: bool) -> ConnectionTimeout:
    state = f"ICE state {pc.iceConnectionState}, connection state {pc.connectionState}"
    when = "ICE found no working path" if failed else f"nothing opened within {timeout:g} s"
    hint = (
        "the TURN relay was not reachable or refused the credentials"
        if has_turn
        else "the peers are probably on different networks behind symmetric NATs or "
        "firewalls that block UDP; configure a TURN server (ice_servers=[...] or "
        "DUET_ICE_SERVERS) so traffic can be relayed"
    )
    return ConnectionTimeout(f"the data channel did not open: {when} ({state}); {hint}")


def selected_candidate_types(pc: Any) -> tuple[str, str] | None:
    """(local, remote) candidate types of the selected ICE pair, e.g. ("host", "srflx")."""
    try:
        connection = pc.sctp.transport.transport._connection
        pair = connection._nominated.get(1)
    except AttributeError:
        return None
    if pair is None:
        return None
    return pair.local_candidate.type, pair.remote_candidate.type
