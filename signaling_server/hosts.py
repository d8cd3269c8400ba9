"""Standing hosts: offers queued for a host with a persistent Ed25519 key, and their answers.

A host's ID is the first 128 bits of SHA-256 of its public key, in hex. Scientists post
offers to a host; the host proves it holds the key (a signed one-time challenge), long-polls
for the offers, and answers or refuses each. `HostRegistry` keeps this in one process's
memory, bounded; a shared backend would implement the same `HostState` protocol.

A challenge is stateless: random || expiry || MAC(server secret, host ID, random, expiry).
Issuing one stores nothing, so asking for many evicts nothing; a challenge is remembered
(until it expires) only once a wait with a valid signature has spent it. `ChallengeBook`
does this for any kind of key holder (the mailbox's recipients use one too).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import json
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signaling_server.state import AnswerExists, QuotaExceeded, StateError, StateFull, UnknownId

KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 32
_RANDOM_BYTES = 16
_EXPIRY_BYTES = 8
_MAC_BYTES = 16
CHALLENGE_BYTES = _RANDOM_BYTES + _EXPIRY_BYTES + _MAC_BYTES
"""random (16) || expiry in whole seconds of the registry's clock (8, big-endian) || MAC (16)."""
CHALLENGE_TTL = 60.0
"""Seconds a challenge stays usable."""
MAX_CHALLENGES = 8
"""Spent challenges remembered per host the registry may serve: the spent set holds at most
`max_entries * MAX_CHALLENGES` (a wait is refused with 503 while it is full)."""
_CHALLENGE_CONTEXT = b"duet host challenge"
MAX_DELIVERY = 16
"""Offers in one wait response, at most."""
DELIVERY_BUDGET = 768 * 1024
"""Characters of JSON offers in one wait response, at most (one offer always fits)."""
MAX_REASON = 500
"""Longest refusal reason, in characters."""
_WAIT_CONTEXT = b"duet_p2p host wait v1"

__all__ = [
    "ChallengeBook",
    "DeliveredOffer",
    "HostBusy",
    "HostOffline",
    "HostOffer",
    "HostRegistry",
    "HostState",
    "host_id_of",
    "verify_key_proof",
    "verify_wait_proof",
    "wait_message",
]


class HostOffline(StateError):
    code, status = "host_offline", 404


class HostBusy(StateError):
    code, status = "host_busy", 503

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def wait_message(host_id: str, challenge: bytes) -> bytes:
    """The bytes a host signs to open a wait: each part as 4-byte big-endian length + bytes."""
    parts = [_WAIT_CONTEXT, host_id.encode("ascii"), challenge]
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def host_id_of(public_key: bytes) -> str:
    """The ID a public key stands for: SHA-256, first 128 bits, hex."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def verify_key_proof(owner_id: str, public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `public_key` is the one `owner_id` stands for and signed `message`."""
    if len(public_key) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    if not hmac.compare_digest(host_id_of(public_key), owner_id):
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
        key.verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_wait_proof(host_id: str, public_key: bytes, challenge: bytes, signature: bytes) -> bool:
    """Whether `public_key` is the host's and signed `wait_message(host_id, challenge)`."""
    return verify_key_proof(host_id, public_key, wait_message(host_id, challenge), signature)


class ChallengeBook:
    """Stateless one-time challenges for key holders named by an ID, and the spent set.

    `context` separates kinds of challenges: one issued by a book never passes another
    book's check (each also has its own random secret). At most `max_spent` spent,
    unexpired challenges are remembered; `take` raises StateFull(`full_message`) past it.
    """

    def __init__(
        self,
        context: bytes,
        *,
        max_spent: int,
        full_message: str = "the server holds too many sessions; try again later",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._context = context
        self._max_spent = max_spent
        self._full_message = full_message
        self._clock = clock
        self._secret = os.urandom(32)
        self.spent: dict[bytes, int] = {}
        """Spent challenge -> its expiry."""
        self.spent_order: list[tuple[int, bytes]] = []
        """Heap of (expiry, challenge) over `spent`."""

    def _mac(self, owner_id: str, head: bytes) -> bytes:
        message = self._context + owner_id.encode("ascii") + head
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, owner_id: str) -> bytes:
        """A fresh challenge for `owner_id` (an ASCII ID); stores nothing."""
        expiry = max(0, math.ceil(self._clock() + CHALLENGE_TTL))
        head = secrets.token_bytes(_RANDOM_BYTES) + expiry.to_bytes(_EXPIRY_BYTES, "big")
        return head + self._mac(owner_id, head)

    def _expiry_if_valid(self, owner_id: str, challenge: bytes) -> int | None:
        """The challenge's expiry if it was issued here for `owner_id` and has not expired."""
        if len(challenge) != CHALLENGE_BYTES or not owner_id.isascii():
            return None
        head, mac = challenge[:-_MAC_BYTES], challenge[-_MAC_BYTES:]
        if not hmac.compare_digest(self._mac(owner_id, head), mac):
            return None
        expiry = int.from_bytes(head[_RANDOM_BYTES:], "big")
        return expiry if expiry > self._clock() else None

    def check(self, owner_id: str, challenge: bytes) -> bool:
        """Whether `challenge` was issued for `owner_id`, has not expired and is not spent."""
        expiry = self._expiry_if_valid(owner_id, challenge)
        return expiry is not None and challenge not in self.spent

    def take(self, owner_id: str, challenge: bytes) -> bool:
        """Spend `challenge` if `check` holds; whether it did (StateFull when full)."""
        expiry = self._expiry_if_valid(owner_id, challenge)
        if expiry is None or challenge in self.spent:
            return False
        if len(self.spent) >= self._max_spent:
            self.forget_expired()
            if len(self.spent) >= self._max_spent:
                raise StateFull(self._full_message)
        self.spent[challenge] = expiry
        heapq.heappush(self.spent_order, (expiry, challenge))
        return True

    def forget_expired(self) -> None:
        """Drop spent challenges that expired (they fail `check` by their expiry anyway)."""
        now = self._clock()
        while self.spent_order and self.spent_order[0][0] <= now:
            _, challenge = heapq.heappop(self.spent_order)
            self.spent.pop(challenge, None)


@dataclass(frozen=True)
class HostOffer:
    """What a scientist posts to a host (shapes already checked by the HTTP layer)."""

    sdp: str
    client_id: str
    public_key: bytes
    nonce: bytes
    signature: bytes


@dataclass(frozen=True)
class DeliveredOffer:
    """An offer as handed to the host: its ID, what the scientist posted, and its age."""

    offer_id: str
    offer: HostOffer
    age: float


class HostState(Protocol):
    """Where host offers, answers and challenges live. Every method may raise StateError.

    An answer is a dict: {"type": "answer", "sdp", "public_key", "signature"} (bytes
    fields) or {"type": "refusal", "reason"}.
    """

    async def online(self, host_id: str) -> bool:
        """Whether the host has a wait open, or had one within the idle period."""

    async def put_offer(self, host_id: str, offer: HostOffer, owner: str | None = None) -> str:
        """Queue an offer for an online host and return its new offer ID (HostOffline,
        HostBusy, QuotaExceeded for `owner`, StateFull)."""

    async def wait_answer(self, host_id: str, offer_id: str, timeout: float) -> dict | None:
        """The answer to the offer, waiting up to `timeout` s; None if none yet (UnknownId)."""

    async def put_answer(self, host_id: str, offer_id: str, answer: dict[str, Any]) -> None:
        """Store the one answer to a live offer of this host (UnknownId, AnswerExists)."""

    async def new_challenge(self, host_id: str) -> bytes:
        """A fresh one-time challenge for the host; issuing one stores nothing."""

    async def check_challenge(self, host_id: str, challenge: bytes) -> bool:
        """Whether `challenge` was issued for the host, has not expired and is not spent."""

    async def take_challenge(self, host_id: str, challenge: bytes) -> bool:
        """Spend `challenge` if `check_challenge` holds; whether it did. Call it only for a
        wait whose signature is valid (StateFull if too many spent challenges are held)."""

    async def wait_offers(self, host_id: str, timeout: float) -> tuple[list[DeliveredOffer], bytes]:
        """The host's oldest undelivered offers (waiting up to `timeout` s for one), and the
        next one-time challenge. A newer wait of the same host ends this one (no offers)."""

    async def count(self) -> int:
        """Number of live offers held."""

    async def sweep(self) -> int:
        """Drop expired offers and challenges and idle hosts; return how many offers."""

    async def close(self) -> None:
        """Wake every waiter and refuse to wait again."""


@dataclass
class _Offer:
    host_id: str
    offer: HostOffer
    posted_at: float
    expires_at: float
    owner: str | None
    answer: dict[str, Any] | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Wait:
    event: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Host:
    seen_at: float
    wait: _Wait | None = None
    queue: OrderedDict[str, None] = field(default_factory=OrderedDict)  # undelivered, oldest first
    offers: set[str] = field(default_factory=set)  # every live offer of this host


class HostRegistry:
    """HostState in one process's memory: bounded, with lazy and periodic expiry.

    Offers live `ttl` seconds (an answer gets a full `ttl` more to be fetched). At most
    `max_entries` offers and hosts; at most `max_offers_per_host` unanswered offers per host;
    at most `max_entries_per_owner` live offers per owner; at most `max_spent` (default
    `max_entries * MAX_CHALLENGES`) spent, unexpired challenges.
    """

    def __init__(
        self,
        ttl: float,
        *,
        host_idle: float = 60.0,
        max_entries: int = 10_000,
        max_offers_per_host: int = 64,
        max_entries_per_owner: int | None = None,
        max_spent: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._idle = host_idle
        self._max_entries = max_entries
        self._max_per_host = max_offers_per_host
        self._max_per_owner = max_entries_per_owner
        self._clock = clock
        self._offers: dict[str, _Offer] = {}
        self._hosts: dict[str, _Host] = {}
        self._owned: dict[str, set[str]] = {}
        self._challenges = ChallengeBook(
            _CHALLENGE_CONTEXT,
            max_spent=max_entries * MAX_CHALLENGES if max_spent is None else max_spent,
            full_message="the server holds too many host sessions; try again later",
            clock=clock,
        )
        self._closed = False

    @property
    def _spent(self) -> dict[bytes, int]:
        return self._challenges.spent

    @property
    def _spent_order(self) -> list[tuple[int, bytes]]:
        return self._challenges.spent_order

    # -- hosts ------------------------------------------------------------------------

    def _is_online(self, host: _Host | None) -> bool:
        return host is not None and (
            host.wait is not None or self._clock() - host.seen_at < self._idle
        )

    async def online(self, host_id: str) -> bool:
        return self._is_online(self._hosts.get(host_id))

    def _host_for_wait(self, host_id: str) -> _Host:
        host = self._hosts.get(host_id)
        if host is not None:
            return host
        if len(self._hosts) >= self._max_entries:
            self._drop_idle_hosts()
            if len(self._hosts) >= self._max_entries:
                raise StateFull("the server serves too many hosts; try again later")
        host = self._hosts[host_id] = _Host(seen_at=self._clock())
        return host

    def _drop_idle_hosts(self) -> int:
        idle = [i for i, h in self._hosts.items() if not self._is_online(h) and not h.offers]
        for host_id in idle:
            del self._hosts[host_id]
        return len(idle)

    # -- challenges -------------------------------------------------------------------

    async def new_challenge(self, host_id: str) -> bytes:
        return self._challenges.issue(host_id)

    async def check_challenge(self, host_id: str, challenge: bytes) -> bool:
        return self._challenges.check(host_id, challenge)

    async def take_challenge(self, host_id: str, challenge: bytes) -> bool:
        return self._challenges.take(host_id, challenge)

    # -- offers -----------------------------------------------------------------------

    def _expire(self, offer_id: str) -> None:
        entry = self._offers.pop(offer_id)
        entry.answered.set()  # waiters re-check and learn it expired
        host = self._hosts.get(entry.host_id)
        if host is not None:
            host.queue.pop(offer_id, None)
            host.offers.discard(offer_id)
        if entry.owner is not None:
            owned = self._owned.get(entry.owner)
            if owned is not None:
                owned.discard(offer_id)
                if not owned:
                    del self._owned[entry.owner]

    def _expire_host_offers(self, host: _Host) -> None:
        now = self._clock()
        for offer_id in [i for i in host.offers if self._offers[i].expires_at <= now]:
            self._expire(offer_id)

    def _live(self, host_id: str, offer_id: str) -> _Offer:
        entry = self._offers.get(offer_id)
        if entry is not None and entry.expires_at <= self._clock():
            self._expire(offer_id)
            entry = None
        if entry is None or not hmac.compare_digest(entry.host_id, host_id):
            raise UnknownId(f"no live offer {offer_id} for host {host_id}")
        return entry

    def _check_owner(self, owner: str) -> None:
        limit = self._max_per_owner
        if limit is None or len(self._owned.get(owner, ())) < limit:
            return
        now = self._clock()
        for offer_id in [i for i in self._owned[owner] if self._offers[i].expires_at <= now]:
            self._expire(offer_id)
        owned = self._owned.get(owner, set())
        if len(owned) >= limit:
            soonest = min(self._offers[i].expires_at for i in owned)
            raise QuotaExceeded(
                f"this address already holds {len(owned)} live offers (the limit); "
                "wait for one to expire",
                retry_after=soonest - now,
            )

    async def put_offer(self, host_id: str, offer: HostOffer, owner: str | None = None) -> str:
        host = self._hosts.get(host_id)
        if host is None or not self._is_online(host):
            raise HostOffline(
                f"host {host_id} is not serving now: it has not been in touch with this "
                "signaling server lately; check the host ID and that the host is running"
            )
        self._expire_host_offers(host)
        pending = [self._offers[i] for i in host.offers if self._offers[i].answer is None]
        if len(pending) >= self._max_per_host:
            soonest = min(e.expires_at for e in pending)
            raise HostBusy(
                f"host {host_id} has {len(pending)} offers waiting (the limit); try again later",
                retry_after=max(1.0, min(soonest - self._clock(), 30.0)),
            )
        if owner is not None:
            self._check_owner(owner)
        if len(self._offers) >= self._max_entries:
            await self.sweep()
            if len(self._offers) >= self._max_entries:
                raise StateFull("the server holds too many offers; try again later")
        offer_id = secrets.token_hex(16)
        now = self._clock()
        self._offers[offer_id] = _Offer(host_id, offer, now, now + self._ttl, owner)
        host.offers.add(offer_id)
        host.queue[offer_id] = None
        if owner is not None:
            self._owned.setdefault(owner, set()).add(offer_id)
        if host.wait is not None:
            host.wait.event.set()
        return offer_id

    async def wait_offers(self, host_id: str, timeout: float) -> tuple[list[DeliveredOffer], bytes]:
        host = self._host_for_wait(host_id)
        if host.wait is not None:
            host.wait.event.set()  # a newer wait replaces it
        wait = host.wait = _Wait()
        try:
            self._expire_host_offers(host)
            if not host.queue and timeout > 0 and not self._closed:
                try:
                    await asyncio.wait_for(wait.event.wait(), timeout)
                except TimeoutError:
                    pass
            replaced = host.wait is not wait
            delivered = [] if replaced else self._deliver(host)
        finally:
            if host.wait is wait:
                host.wait = None
            host.seen_at = self._clock()
        return delivered, self._challenges.issue(host_id)

    def _deliver(self, host: _Host) -> list[DeliveredOffer]:
        self._expire_host_offers(host)
        now = self._clock()
        out: list[DeliveredOffer] = []
        size = 0
        while host.queue and len(out) < MAX_DELIVERY:
            offer_id = next(iter(host.queue))
            entry = self._offers[offer_id]
            cost = _json_cost(entry.offer)
            if out and size + cost > DELIVERY_BUDGET:
                break
            del host.queue[offer_id]
            size += cost
            out.append(DeliveredOffer(offer_id, entry.offer, max(0.0, now - entry.posted_at)))
        return out

    async def put_answer(self, host_id: str, offer_id: str, answer: dict[str, Any]) -> None:
        entry = self._live(host_id, offer_id)
        if entry.answer is not None:
            raise AnswerExists(f"an answer was already accepted for offer {offer_id}")
        entry.answer = dict(answer)
        entry.expires_at = max(entry.expires_at, self._clock() + self._ttl)
        host = self._hosts.get(host_id)
        if host is not None:
            host.queue.pop(offer_id, None)  # nothing left to deliver
        entry.answered.set()

    async def wait_answer(self, host_id: str, offer_id: str, timeout: float) -> dict | None:
        entry = self._live(host_id, offer_id)
        if entry.answer is not None or timeout <= 0 or self._closed:
            return entry.answer
        remaining = min(timeout, entry.expires_at - self._clock())
        try:
            await asyncio.wait_for(entry.answered.wait(), max(remaining, 0.0))
        except TimeoutError:
            pass
        return self._live(host_id, offer_id).answer

    # -- housekeeping -----------------------------------------------------------------

    async def count(self) -> int:
        return len(self._offers)

    async def sweep(self) -> int:
        now = self._clock()
        expired = [i for i, e in self._offers.items() if e.expires_at <= now]
        for offer_id in expired:
            self._expire(offer_id)
        self._challenges.forget_expired()
        self._drop_idle_hosts()
        return len(expired)

    async def close(self) -> None:
        self._closed = True
        for entry in self._offers.values():
            entry.answered.set()
        for host in self._hosts.values():
            if host.wait is not None:
                host.wait.event.set()


def _json_cost(offer: HostOffer) -> int:
    """About the JSON size of an offer in a wait response (escaped SDP, base64, the rest)."""
    return len(json.dumps(offer.sdp)) + 4 * (KEY_BYTES + NONCE_BYTES + SIGNATURE_BYTES) // 3 + 256
