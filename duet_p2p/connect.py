"""Making the connection: offer and answer through the signaling server, IDs verified.

Owner: create the offer, post it under the Duet ID, get the Client ID confirmed, check the
answer against it, wait for the channel. Scientist: fetch the offer, check it against the
Duet ID, post the answer, show the Client ID, wait for the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from duet_p2p import config, ids
from duet_p2p.errors import ConnectionTimeout, DuetError
from duet_p2p.signaling import SignalingClient
from duet_p2p.transport.channel import ChannelOptions, DataChannelTransport
from duet_p2p.transport.peer import (
    new_peer_connection,
    restrict_host_addresses,
    selected_candidate_types,
    wait_open,
)

log = logging.getLogger(__name__)


@dataclass
class ConnectOptions:
    """How to reach the other peer."""

    signaling_url: str | None = None
    """Base URL of the signaling server; None starts an embedded one (owner only)."""
    ice_servers: list[dict[str, Any]] | None = None
    """STUN/TURN servers; None asks the signaling server (which may hand out none)."""
    host_addresses: list[str] | None = None
    """Local addresses for host candidates; None means all (loopback for a local server)."""
    timeout: float = config.DEFAULT_CONNECT_TIMEOUT
    """Seconds to wait for the partner and for the channel to open."""
    channel: ChannelOptions = field(default_factory=ChannelOptions)

    @classmethod
    def resolve(
        cls,
        signaling_url: str | None = None,
        ice_servers: list[dict[str, Any]] | None = None,
        host_addresses: list[str] | None = None,
        timeout: float | None = None,
        channel: ChannelOptions | None = None,
    ) -> ConnectOptions:
        """Arguments first, then the environment."""
        return cls(
            signaling_url=config.signaling_url(signaling_url),
            ice_servers=config.ice_servers(ice_servers),
            host_addresses=config.host_addresses(host_addresses),
            timeout=config.DEFAULT_CONNECT_TIMEOUT if timeout is None else timeout,
            channel=channel or ChannelOptions(),
        )


@dataclass
class Connection:
    """An open, verified connection to the partner."""

    role: str
    duet_id: str
    client_id: str
    transport: DataChannelTransport
    pc: Any
    signaling_url: str
    connect_seconds: float
    embedded_server: Any = None

    def candidate_types(self) -> tuple[str, str] | None:
        """(local, remote) ICE candidate types of the path in use, e.g. ("relay", "srflx")."""
        return selected_candidate_types(self.pc)

    async def close(self) -> None:
        await self.transport.close()
        if self.embedded_server is not None:
            server, self.embedded_server = self.embedded_server, None
            await server.close()


def _is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _apply_host_addresses(options: ConnectOptions, url: str) -> None:
    if options.host_addresses is not None:
        restrict_host_addresses(options.host_addresses)
    elif _is_loopback_url(url):
        restrict_host_addresses(["127.0.0.1"])


async def _ice_servers(options: ConnectOptions, client: SignalingClient) -> list[dict[str, Any]]:
    if options.ice_servers is not None:
        return options.ice_servers
    return await client.ice_servers()


def _has_turn(servers: list[dict[str, Any]]) -> bool:
    for server in servers:
        urls = server.get("urls", [])
        for url in [urls] if isinstance(urls, str) else urls:
            if str(url).startswith(("turn:", "turns:")):
                return True
    return False


class OwnerHandshake:
    """The owner's half: offer posted, waiting for a confirmed Client ID and the answer."""

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self.duet_id = ""
        self.signaling_url = ""
        self._client: SignalingClient | None = None
        self._server: Any = None
        self._pc: Any = None
        self._channel: Any = None
        self._ice: list[dict[str, Any]] = []
        self._transport: DataChannelTransport | None = None

    async def start(self) -> None:
        """Create the offer and post it; afterwards ``duet_id`` is set."""
        url = self.options.signaling_url
        if url is None:
            from signaling_server.app import ServerConfig, start_server

            self._server = await start_server(ServerConfig(), host="127.0.0.1", port=0)
            url = self._server.url
        self.signaling_url = url
        _apply_host_addresses(self.options, url)
        self._client = SignalingClient(url)
        try:
            self._ice = await _ice_servers(self.options, self._client)
            self._pc, self._channel = new_peer_connection(self._ice)
            self._transport = DataChannelTransport(self._pc, self._channel, self.options.channel)
            await self._pc.setLocalDescription(await self._pc.createOffer())
            sdp = self._pc.localDescription.sdp
            self.duet_id = ids.fingerprint_id(sdp)
            await self._client.post_offer(self.duet_id, sdp)
        except BaseException:
            await self.abort()
            raise

    async def complete(self, client_id: str) -> Connection:
        """Check the answer against the confirmed ``client_id`` and open the channel."""
        assert self._client is not None
        started = time.perf_counter()
        try:
            expected = ids.normalise_id(client_id, what="Duet Client ID")
            answer = await self._client.wait_answer(self.duet_id, timeout=self.options.timeout)
            ids.verify_sdp(answer, expected, role="scientist")
            from aiortc import RTCSessionDescription

            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await wait_open(
                self._pc, self._channel, self.options.timeout, has_turn=_has_turn(self._ice)
            )
        except BaseException:
            await self.abort()
            raise
        await self._client.close()
        transport = self._transport
        assert transport is not None
        transport.activate()
        return Connection(
            role="owner",
            duet_id=self.duet_id,
            client_id=expected,
            transport=transport,
            pc=self._pc,
            signaling_url=self.signaling_url,
            connect_seconds=time.perf_counter() - started,
            embedded_server=self._server,
        )

    async def abort(self) -> None:
        """Release everything the handshake holds."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        if self._pc is not None:
            with contextlib.suppress(Exception):
                await self._pc.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.close()
            self._server = None


async def join(duet_id: str, options: ConnectOptions, on_client_id: Any = None) -> Connection:
    """The scientist's half: verify the offer, answer, announce the Client ID, open."""
    started = time.perf_counter()
    duet_id = ids.normalise_id(duet_id, what="Duet ID")
    url = options.signaling_url
    if url is None:
        raise DuetError(
            "join_duet needs the signaling server's URL: pass signaling_url=... (the owner's "
            f"join line shows it) or set {config.SIGNALING_URL_ENV}"
        )
    _apply_host_addresses(options, url)
    pc = None
    client_id = ""
    async with SignalingClient(url) as client:
        try:
            offer, ice = await asyncio.gather(
                client.get_offer(duet_id, wait=min(options.timeout, 10.0)),
                _ice_servers(options, client),
            )
            ids.verify_sdp(offer, duet_id, role="owner")
            from aiortc import RTCSessionDescription

            pc, channel = new_peer_connection(ice)
            transport = DataChannelTransport(pc, channel, options.channel)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            answer = pc.localDescription.sdp
            client_id = ids.fingerprint_id(answer)
            await client.post_answer(duet_id, answer)
            if on_client_id is not None:
                on_client_id(client_id)
            await wait_open(pc, channel, options.timeout, has_turn=_has_turn(ice))
        except BaseException as exc:
            if pc is not None:
                with contextlib.suppress(Exception):
                    await pc.close()
            if isinstance(exc, ConnectionTimeout) and client_id:
                raise ConnectionTimeout(
                    f"{exc}. If the owner has not yet confirmed your Client ID {client_id}, "
                    "that is the cause: ask them to type it"
                ) from None
            raise
    transport.activate()
    return Connection(
        role="scientist",
        duet_id=duet_id,
        client_id=client_id,
        transport=transport,
        pc=pc,
        signaling_url=url,
        connect_seconds=time.perf_counter() - started,
    )
