"""Short-lived offer/answer state, behind one small interface.

`InMemoryState` serves one process. A shared backend (Redis) implements the same
`SignalingState` protocol when several instances run behind a load balancer.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class StateError(Exception):
    """A state operation was refused; `code` and `status` are what the HTTP layer answers."""

    code = "state_error"
    status = 500
    retry_after: float | None = None
    """Seconds after which trying again may succeed (sent as Retry-After), if known."""


class UnknownId(StateError):
    code, status = "unknown_id", 404


class Expired(StateError):
    code, status = "expired", 410


class OfferExists(StateError):
    code, status = "offer_exists", 409


class AnswerExists(StateError):
    code, status = "answer_exists", 409


class StateFull(StateError):
    code, status = "server_full", 503
    retry_after = 30.0


class QuotaExceeded(StateError):
    """One client holds as many live IDs as it may; the rest of the server is unaffected."""

    code, status = "too_many_offers", 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SignalingState(Protocol):
    """Where offers and answers live until they expire. Every method may raise StateError."""

    async def put_offer(self, duet_id: str, sdp: str, owner: str | None = None) -> None:
        """Store the offer for a new ID, held by `owner` (a client key) until it expires.

        OfferExists if one is live, QuotaExceeded if `owner` holds its quota of live IDs,
        StateFull if the server is full. An offer without an owner counts against no quota.
        """

    async def get_offer(self, duet_id: str) -> str | None:
        """The offer, or None if never posted (Expired if it expired)."""

    async def wait_for_offer(self, duet_id: str, timeout: float) -> str | None:
        """Like get_offer, but wait up to `timeout` seconds for it to be posted."""

    async def put_answer(self, duet_id: str, sdp: str) -> None:
        """Store the one answer (UnknownId, Expired, AnswerExists)."""

    async def get_answer(self, duet_id: str) -> str | None:
        """The answer, or None if not yet posted (UnknownId, Expired)."""

    async def wait_for_answer(self, duet_id: str, timeout: float) -> str | None:
        """Like get_answer, but wait up to `timeout` seconds for it to be posted."""

    async def count(self) -> int:
        """Number of IDs held."""

    async def sweep(self) -> int:
        """Drop what has expired; return how many IDs were dropped."""

    async def close(self) -> None:
        """Wake every waiter (they answer as if their wait ran out) and refuse to wait again."""


@dataclass
class _Entry:
    offer: str
    expires_at: float
    owner: str | None = None
    answer: str | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Waiters:
    event: asyncio.Event = field(default_factory=asyncio.Event)
    count: int = 0


class InMemoryState:
    """SignalingState in one process's memory: bounded, with lazy and periodic expiry.

    `max_entries` bounds the live IDs of everyone together; `max_entries_per_owner`
    (None: no bound) those of one owner, so that one client cannot fill the server.
    """

    def __init__(
        self,
        ttl: float,
        *,
        max_entries: int = 10_000,
        max_entries_per_owner: int | None = None,
        tombstone_ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._max_per_owner = max_entries_per_owner
        self._tombstone_ttl = tombstone_ttl
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._owned: dict[str, set[str]] = {}  # owner -> its live IDs
        self._tombstones: OrderedDict[str, float] = OrderedDict()  # id -> forget at
        self._offer_waits: dict[str, _Waiters] = {}
        self._closed = False

    def _expire(self, duet_id: str) -> None:
        entry = self._entries.pop(duet_id)
        entry.answered.set()  # waiters re-check and learn it expired
        self._disown(entry.owner, duet_id)
        self._tombstones[duet_id] = self._clock() + self._tombstone_ttl
        self._tombstones.move_to_end(duet_id)
        while len(self._tombstones) > 4 * self._max_entries:
            self._tombstones.popitem(last=False)

    def _lookup(self, duet_id: str) -> _Entry | None:
        """The live entry, None if never posted; raise Expired if it expired."""
        entry = self._entries.get(duet_id)
        if entry is not None and entry.expires_at <= self._clock():
            self._expire(duet_id)
            entry = None
        if entry is None:
            forget_at = self._tombstones.get(duet_id)
            if forget_at is not None and forget_at > self._clock():
                raise Expired(f"Duet ID {duet_id} has expired")
        return entry

    def _disown(self, owner: str | None, duet_id: str) -> None:
        """Stop counting `duet_id` against its owner's quota."""
        if owner is None:
            return
        owned = self._owned.get(owner)
        if owned is not None:
            owned.discard(duet_id)
            if not owned:
                del self._owned[owner]

    def _check_quota(self, owner: str) -> None:
        """Raise QuotaExceeded if `owner` holds its quota of live IDs (expired ones dropped)."""
        limit = self._max_per_owner
        if limit is None or len(self._owned.get(owner, ())) < limit:
            return
        now = self._clock()
        for duet_id in [i for i in self._owned[owner] if self._entries[i].expires_at <= now]:
            self._expire(duet_id)
        owned = self._owned.get(owner, set())
        if len(owned) >= limit:
            soonest = min(self._entries[i].expires_at for i in owned)
            raise QuotaExceeded(
                f"this address already holds {len(owned)} live Duet IDs (the limit); "
                "wait for one to expire",
                retry_after=soonest - now,
            )

    def _live(self, duet_id: str) -> _Entry:
        entry = self._lookup(duet_id)
        if entry is None:
            raise UnknownId(f"no offer was posted for Duet ID {duet_id}")
        return entry

    async def put_offer(self, duet_id: str, sdp: str, owner: str | None = None) -> None:
        try:
            if self._lookup(duet_id) is not None:
                raise OfferExists(f"an offer was already posted for Duet ID {duet_id}")
        except Expired:
            pass  # an expired ID may be used again
        if owner is not None:
            self._check_quota(owner)
        if len(self._entries) >= self._max_entries:
            await self.sweep()
            if len(self._entries) >= self._max_entries:
                raise StateFull("the server holds too many Duet IDs; try again later")
        self._tombstones.pop(duet_id, None)
        self._entries[duet_id] = _Entry(
            offer=sdp, expires_at=self._clock() + self._ttl, owner=owner
        )
        if owner is not None:
            self._owned.setdefault(owner, set()).add(duet_id)
        waiters = self._offer_waits.pop(duet_id, None)
        if waiters is not None:
            waiters.event.set()

    async def get_offer(self, duet_id: str) -> str | None:
        entry = self._lookup(duet_id)
        return entry.offer if entry is not None else None

    async def wait_for_offer(self, duet_id: str, timeout: float) -> str | None:
        offer = await self.get_offer(duet_id)
        if offer is not None or timeout <= 0 or self._closed:
            return offer
        waiters = self._offer_waits.get(duet_id)
        if waiters is None:
            if len(self._offer_waits) >= self._max_entries:
                raise StateFull("too many clients are waiting; try again later")
            waiters = self._offer_waits[duet_id] = _Waiters()
        waiters.count += 1
        try:
            await asyncio.wait_for(waiters.event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            waiters.count -= 1
            if waiters.count == 0 and self._offer_waits.get(duet_id) is waiters:
                del self._offer_waits[duet_id]
        return await self.get_offer(duet_id)

    async def put_answer(self, duet_id: str, sdp: str) -> None:
        entry = self._live(duet_id)
        if entry.answer is not None:
            raise AnswerExists(f"an answer was already accepted for Duet ID {duet_id}")
        entry.answer = sdp
        # The owner gets a full TTL to fetch the answer.
        entry.expires_at = max(entry.expires_at, self._clock() + self._ttl)
        entry.answered.set()

    async def get_answer(self, duet_id: str) -> str | None:
        return self._live(duet_id).answer

    async def wait_for_answer(self, duet_id: str, timeout: float) -> str | None:
        entry = self._live(duet_id)
        if entry.answer is not None or timeout <= 0 or self._closed:
            return entry.answer
        remaining = min(timeout, entry.expires_at - self._clock())
        try:
            await asyncio.wait_for(entry.answered.wait(), max(remaining, 0.0))
        except TimeoutError:
            pass
        return await self.get_answer(duet_id)

    async def count(self) -> int:
        return len(self._entries)

    async def sweep(self) -> int:
        now = self._clock()
        expired = [i for i, e in self._entries.items() if e.expires_at <= now]
        for duet_id in expired:
            self._expire(duet_id)
        while self._tombstones:
            duet_id, forget_at = next(iter(self._tombstones.items()))
            if forget_at > now:
                break
            del self._tombstones[duet_id]
        return len(expired)

    async def close(self) -> None:
        self._closed = True
        for entry in self._entries.values():
            entry.answered.set()
        for waiters in self._offer_waits.values():
            waiters.event.set()
