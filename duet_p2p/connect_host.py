"""Connecting to a standing host: signed offers from scientists, signed answers from hosts.

The scientist makes the offer: it signs its DTLS fingerprints, a fresh nonce and the host's
ID with its identity key and posts the offer for the host. The host's authenticated wait
delivers it; the host checks that the scientist's key hashes to the Client ID it claims and
that the signature covers this offer, decides admission, and answers with its own
signature over its fingerprints, the scientist's nonce and the scientist's ID. The
scientist checks that the answer's key hashes to the Host ID it was given. A signaling
server that substitutes an offer, an answer or a key is caught by one side or the other;
DTLS then proves each end holds the certificate it signed for.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from duet_p2p import config, ids
from duet_p2p.connect import (
    Connection,
    ConnectOptions,
    _apply_host_addresses,
    _has_turn,
    _ice_servers,
)
from duet_p2p.errors import (
    ConnectionTimeout,
    DuetError,
    PeerVerificationError,
    PermissionDenied,
    SignalingError,
)
from duet_p2p.identity import Identity, SessionBinding, fresh_nonce, verify
from duet_p2p.mailbox.known_keys import KnownKeys
from duet_p2p.signaling import SignalingClient
from duet_p2p.signaling.client import wait_message
from duet_p2p.text import printable
from duet_p2p.transport.channel import DataChannelTransport
from duet_p2p.transport.peer import new_peer_connection, wait_open

log = logging.getLogger(__name__)

ADMISSION_TIMEOUT = 300.0
"""Seconds a scientist waits for a host to admit them (the owner may be deciding)."""
WAIT_SECONDS = 25.0
"""One authenticated long-poll of the host."""
MAX_BACKOFF = 30.0
SEEN_NONCES = 4096
"""Offers remembered by nonce, so a replayed offer is refused rather than answered twice."""


@dataclass(frozen=True)
class HostOffer:
    """A scientist's offer as the host received it, its signature verified."""

    offer_id: str
    client_id: str
    sdp: str
    nonce: bytes
    received_at: float


async def host_is_online(client: SignalingClient, host_id: str) -> bool:
    """Whether the server knows ``host_id`` as a standing host now; False when it cannot say
    (an older server). Either answer is checked later: a host's answer must be signed by
    the key ``host_id`` stands for, a one-off offer must hash to it."""
    try:
        return await client.host_online(host_id)
    except SignalingError:
        return False


async def join_host(
    host_id: str,
    options: ConnectOptions,
    identity: Identity,
    *,
    on_waiting: Callable[[str], Any] | None = None,
    admission_timeout: float = ADMISSION_TIMEOUT,
    client: SignalingClient | None = None,
) -> Connection:
    """The scientist's half: sign and post the offer, wait to be admitted, check the host's
    signed answer, open the channel."""
    started = time.perf_counter()
    host_id = ids.normalise_id(host_id, what="Host ID")
    url = options.signaling_url
    if url is None:
        raise DuetError(
            "connecting to a host needs the signaling server's URL: pass signaling_url=... "
            f"or set {config.SIGNALING_URL_ENV}"
        )
    _apply_host_addresses(options, url)
    own_client = client is None
    client = client or SignalingClient(url)
    pc = None
    try:
        ice = await _ice_servers(options, client)
        pc, channel = new_peer_connection(ice)
        transport = DataChannelTransport(pc, channel, options.channel)
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        nonce = fresh_nonce()
        binding = SessionBinding.for_sdp("scientist", host_id, nonce, offer)
        offer_id = await client.post_host_offer(
            host_id, sdp=offer, client_id=identity.id, public_key=identity.public_key,
            nonce=nonce, signature=identity.sign(binding),
        )  # fmt: skip
        if on_waiting is not None:
            on_waiting(identity.id)
        reply = await client.wait_host_answer(
            host_id, offer_id, timeout=max(options.timeout, admission_timeout)
        )
        if reply.get("type") == "refusal":
            reason = printable(str(reply.get("reason", "")), 500)
            raise PermissionDenied(
                f"the host {host_id} did not admit Client ID {identity.id}"
                + (f": {reason}" if reason else ""),
                reason=reason,
            )
        answer = reply["sdp"]
        verify(host_id, reply["public_key"], reply["signature"],
               SessionBinding.for_sdp("host", identity.id, nonce, answer))  # fmt: skip
        with contextlib.suppress(DuetError, OSError):  # pinned for sealing offline jobs
            KnownKeys().remember(reply["public_key"])
        from aiortc import RTCSessionDescription

        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_open(pc, channel, options.timeout, has_turn=_has_turn(ice))
    except BaseException as exc:
        if pc is not None:
            with contextlib.suppress(Exception):
                await pc.close()
        if isinstance(exc, ConnectionTimeout) and "partner did not join" in str(exc):
            raise ConnectionTimeout(
                f"the host {host_id} did not admit you within "
                f"{max(options.timeout, admission_timeout):g} s: ask its owner to admit "
                f"Client ID {identity.id} (`duet-host admit {identity.id}`), then connect again"
            ) from None
        raise
    finally:
        if own_client:
            await client.close()
    transport.activate()
    return Connection(
        role="scientist", duet_id=host_id, client_id=identity.id, transport=transport, pc=pc,
        signaling_url=url, connect_seconds=time.perf_counter() - started,
    )  # fmt: skip


class HostListener:
    """The host's half: an authenticated wait for offers; each verified offer is handed to
    ``on_offer``, which answers it with ``accept`` or ``refuse``."""

    def __init__(
        self,
        identity: Identity,
        options: ConnectOptions,
        on_offer: Callable[[HostOffer], Awaitable[None]],
    ) -> None:
        if options.signaling_url is None:
            raise DuetError("a host needs the signaling server's URL (signaling_url=...)")
        self.identity = identity
        self.options = options
        self._on_offer = on_offer
        self._client = SignalingClient(options.signaling_url)
        self._ice: list[dict[str, Any]] | None = None
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.online = asyncio.Event()
        """Set once the server has accepted the host's first wait."""
        self.last_error = ""

    @property
    def host_id(self) -> str:
        return self.identity.id

    async def ice_servers(self) -> list[dict[str, Any]]:
        if self._ice is None:
            self._ice = await _ice_servers(self.options, self._client)
        return self._ice

    async def run(self) -> None:
        """Wait for offers until closed; signaling failures are retried with a backoff."""
        _apply_host_addresses(self.options, self._client.url)
        backoff = 0.5
        challenge: bytes | None = None
        while not self._closed:
            try:
                if challenge is None:
                    challenge = await self._client.host_challenge(self.host_id)
                signature = self.identity.sign_bytes(wait_message(self.host_id, challenge))
                # the first wait returns at once: from then on the server lists the host
                wait = WAIT_SECONDS if self.online.is_set() else 0.0
                offers, challenge = await self._client.host_wait(
                    self.host_id, public_key=self.identity.public_key, challenge=challenge,
                    signature=signature, wait=wait,
                )  # fmt: skip
                self.online.set()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving; the next poll retries
                challenge = None
                self.last_error = str(exc)
                if self._closed:
                    return
                log.warning("waiting for scientists failed (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            for raw in offers:
                self._dispatch(raw)

    def _dispatch(self, raw: dict[str, Any]) -> None:
        try:
            offer = self._verified(raw)
        except (PeerVerificationError, ValueError, KeyError) as exc:
            log.warning("refused an offer that failed verification: %s", exc)
            refusal = {"type": "refusal", "reason": "the offer's signature did not verify"}
            self._spawn(self._post_quietly(str(raw.get("offer_id", "")), refusal))
            return
        self._spawn(self._on_offer(offer))

    def _verified(self, raw: dict[str, Any]) -> HostOffer:
        nonce = raw["nonce"]
        if nonce in self._seen:
            raise PeerVerificationError("a replayed offer (its nonce was seen before)")
        media = [line for line in raw["sdp"].splitlines() if line.startswith("m=")]
        if len(media) != 1 or not media[0].startswith("m=application "):
            raise PeerVerificationError("an offer must carry exactly one data channel")
        binding = SessionBinding.for_sdp("scientist", self.host_id, nonce, raw["sdp"])
        verify(raw["client_id"], raw["public_key"], raw["signature"], binding)
        self._seen[nonce] = None
        while len(self._seen) > SEEN_NONCES:
            self._seen.popitem(last=False)
        return HostOffer(raw["offer_id"], raw["client_id"], raw["sdp"], nonce,
                         time.time() - float(raw.get("age", 0.0)))  # fmt: skip

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post_quietly(self, offer_id: str, answer: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self._client.post_host_answer(self.host_id, offer_id, answer)

    async def refuse(self, offer: HostOffer, reason: str) -> None:
        """Tell the scientist they were not admitted."""
        await self._post_quietly(offer.offer_id, {"type": "refusal", "reason": reason[:500]})

    async def accept(self, offer: HostOffer, prepare: Awaitable[Any] | None = None) -> Connection:
        """Answer ``offer`` with a signed answer and wait for the channel; ``prepare`` (e.g.
        starting the scientist's worker) runs meanwhile."""
        started = time.perf_counter()
        from aiortc import RTCSessionDescription

        ice = await self.ice_servers()
        pc, channel = new_peer_connection(ice)
        try:
            transport = DataChannelTransport(pc, channel, self.options.channel)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            answer = pc.localDescription.sdp
            binding = SessionBinding.for_sdp("host", offer.client_id, offer.nonce, answer)
            await self._client.post_host_answer(self.host_id, offer.offer_id, {
                "type": "answer", "sdp": answer, "public_key": self.identity.public_key,
                "signature": self.identity.sign(binding),
            })  # fmt: skip
            opened = wait_open(pc, channel, self.options.timeout, has_turn=_has_turn(ice))
            if prepare is not None:
                await asyncio.gather(opened, prepare)
            else:
                await opened
        except BaseException:
            with contextlib.suppress(Exception):
                await pc.close()
            raise
        transport.activate()
        return Connection(
            role="owner", duet_id=self.host_id, client_id=offer.client_id, transport=transport,
            pc=pc, signaling_url=self._client.url, connect_seconds=time.perf_counter() - started,
        )  # fmt: skip

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._client.close()
