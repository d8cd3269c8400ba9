"""Session requests, replies, reviews and access nonces, kept in the registry database.

Every document is parsed and verified (:mod:`duet_p2p.registry.session`,
:mod:`~duet_p2p.registry.review`, :mod:`~duet_p2p.registry.access`) before it is looked
at, and checked against what is stored in one transaction (on SQLite one that takes the
write lock first; on PostgreSQL a reply's ``(request_id, seq)`` is unique, so of two
concurrent replies one fails). A request must be for a current listing of the host it
names, and fresh (within ``max_skew`` of the registry's clock), as must a reply; a reply
must be allowed after the replies stored (:func:`check_reply`). Each request, reply and
access document is taken once. The registry sees sealed messages only.

Refusals: a malformed or forged document raises ``InvalidDocument`` (an
``InvalidListing``); a valid one refused because of what is stored raises
:class:`~registry_server.store.Conflict` (:class:`NotFound` when what it names is not
here); an access document that does not pass raises ``AccessDenied``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from duet_p2p.registry.access import AccessDenied, SignedAccess
from duet_p2p.registry.review import SignedReview
from duet_p2p.registry.session import (
    InvalidDocument,
    SignedSessionReply,
    SignedSessionRequest,
    check_reply,
    session_state,
)
from registry_server.db import WRITE_OPTIONS, listings
from registry_server.db_inbox import access_nonces, reviews, session_replies, session_requests
from registry_server.store import Conflict, InvalidQuery

__all__ = ["InboxStore", "NotFound", "StoredSession"]

MAX_REPLIES_PER_SESSION = 12
MAX_SESSIONS_PAGE = 20
"""Most sessions in one inbox page (with their replies, a page stays under 4 MiB)."""
MAX_REVIEWS_PAGE = 100
MAX_OFFSET = 10_000
MAX_RATING_IDS = 1000
MAX_NONCES_PER_IDENTITY = 1000
_HEX32 = re.compile(r"[0-9a-f]{32}")
_OPEN = ("pending", "proposed")


class NotFound(Conflict):
    """The listing or session a document names is not here."""


@dataclass(frozen=True)
class StoredSession:
    """A session as stored: its request, its replies in order, the registry's view of its
    state (clients recompute it from the signed wires)."""

    request_id: str
    listing_id: str
    host_id: str
    scientist_id: str
    status: str
    start: float | None
    created_at: float
    request: str
    replies: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The API's SESSION object."""
        return {
            "request_id": self.request_id, "listing_id": self.listing_id,
            "host_id": self.host_id, "scientist_id": self.scientist_id, "status": self.status,
            "start": self.start, "created_at": self.created_at, "request": self.request,
            "replies": list(self.replies),
        }  # fmt: skip


def _finite(value: object, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"{what} is a finite number")
    return float(value)  # type: ignore[arg-type]


def _page(value: object, what: str, least: int, most: int) -> int:
    if type(value) is not int:
        raise InvalidQuery(f"{what} is an int")
    return min(max(value, least), most)


def _is_id(value: object) -> bool:
    return type(value) is str and _HEX32.fullmatch(value) is not None


class InboxStore:
    """Sessions, reviews and access nonces in a database (the tables of
    :mod:`registry_server.db_inbox` must exist)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_skew: float = 300.0,
        max_pending_per_scientist: int = 20,
        max_requests_per_host: int = 10_000,
        max_reviews_per_listing: int = 100_000,
    ) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**WRITE_OPTIONS)
        self.max_skew = _finite(max_skew, "max_skew")
        self.max_pending_per_scientist = max_pending_per_scientist
        self.max_requests_per_host = max_requests_per_host
        self.max_reviews_per_listing = max_reviews_per_listing

    # -- sessions ----------------------------------------------------------------------

    async def submit_request(self, wire: bytes | str, now: float | None = None) -> StoredSession:
        """Store a fresh session request for a current listing of the host it names."""
        signed = SignedSessionRequest.from_wire(wire)
        r = signed.request
        now = self._now(now)
        self._fresh(r.at, now, "session request")
        text = signed.to_wire().decode()
        try:
            async with self._writer.begin() as conn:
                await self._listing_host(conn, r.listing_id, r.host_id)
                if await self._session_row(conn, r.request_id) is not None:
                    raise Conflict(f"session request {r.request_id} was already received")
                pending = await self._count(
                    conn,
                    session_requests.c.scientist_id == r.scientist_id,
                    session_requests.c.status.in_(_OPEN),
                )
                if pending >= self.max_pending_per_scientist:
                    raise Conflict(
                        f"{r.scientist_id} has {pending} open session requests, the most allowed"
                    )
                held = await self._count(  # what waits for the host, not all ever asked
                    conn,
                    session_requests.c.host_id == r.host_id,
                    session_requests.c.status.in_(_OPEN),
                )
                if held >= self.max_requests_per_host:
                    raise Conflict(f"host {r.host_id}'s inbox is full")
                await conn.execute(
                    insert(session_requests).values(
                        request_id=r.request_id,
                        listing_id=r.listing_id,
                        host_id=r.host_id,
                        scientist_id=r.scientist_id,
                        created_at=now,
                        status="pending",
                        start=None,
                        wire=text,
                    )  # fmt: skip
                )
        except IntegrityError:
            raise Conflict(f"session request {r.request_id} was already received") from None
        return StoredSession(
            r.request_id, r.listing_id, r.host_id, r.scientist_id, "pending", None, now, text, ()
        )

    async def reply(
        self, request_id: str, wire: bytes | str, now: float | None = None
    ) -> StoredSession:
        """Store a fresh reply allowed after the session's stored replies."""
        signed = SignedSessionReply.from_wire(wire)
        reply = signed.reply
        if reply.request_id != request_id:
            raise InvalidDocument("the reply answers another session request")
        now = self._now(now)
        self._fresh(reply.at, now, "session reply")
        if reply.start is not None and reply.start < now:
            raise Conflict("that time has passed; propose another")
        text = signed.to_wire().decode()
        try:
            async with self._writer.begin() as conn:
                row = await self._session_row(conn, request_id)
                if row is None:
                    raise NotFound(f"no session request {request_id} here")
                request = SignedSessionRequest.from_wire(row.wire)
                if reply.author_id not in (request.host_id, request.scientist_id):
                    raise InvalidDocument(f"{reply.author_id} is not a party to this session")
                wires = await self._reply_wires(conn, [request_id])
                stored = wires.get(request_id, [])
                if len(stored) >= MAX_REPLIES_PER_SESSION:
                    raise Conflict(f"a session holds at most {MAX_REPLIES_PER_SESSION} replies")
                earlier = [SignedSessionReply.from_wire(item) for item in stored]
                if any(item.reply_id == reply.reply_id for item in earlier):
                    raise Conflict("the reply was already received (a replay?)")
                try:
                    check_reply(request, earlier, signed)
                except InvalidDocument as exc:
                    raise Conflict(str(exc)) from None
                state = session_state(request, [*earlier, signed], strict=True)
                await conn.execute(
                    insert(session_replies).values(
                        reply_id=reply.reply_id,
                        request_id=request_id,
                        seq=len(stored) + 1,
                        at=reply.at,
                        wire=text,
                    )  # fmt: skip
                )
                done = await conn.execute(
                    update(session_requests)
                    .where(
                        session_requests.c.request_id == request_id,
                        session_requests.c.status == row.status,
                    )
                    .values(status=state.status, start=state.start)
                )
                if done.rowcount != 1:
                    raise Conflict("the session changed meanwhile; fetch it and retry")
        except IntegrityError:
            raise Conflict("the session changed meanwhile, or the reply is a replay") from None
        return StoredSession(
            row.request_id, row.listing_id, row.host_id, row.scientist_id, state.status,
            state.start, row.created_at, row.wire, (*stored, text),
        )  # fmt: skip

    async def session(self, request_id: str) -> StoredSession | None:
        """One session, or None."""
        if not _is_id(request_id):
            return None
        found = await self._sessions(session_requests.c.request_id == request_id, 1, 0)
        return found[0] if found else None

    async def inbox(
        self, host_id: str, limit: int = MAX_SESSIONS_PAGE, offset: int = 0
    ) -> list[StoredSession]:
        """Sessions addressed to ``host_id``, newest first."""
        if not _is_id(host_id):
            return []
        return await self._sessions(
            session_requests.c.host_id == host_id,
            _page(limit, "limit", 1, MAX_SESSIONS_PAGE),
            _page(offset, "offset", 0, MAX_OFFSET),
        )

    async def sent(
        self, scientist_id: str, limit: int = MAX_SESSIONS_PAGE, offset: int = 0
    ) -> list[StoredSession]:
        """Sessions ``scientist_id`` requested, newest first."""
        if not _is_id(scientist_id):
            return []
        return await self._sessions(
            session_requests.c.scientist_id == scientist_id,
            _page(limit, "limit", 1, MAX_SESSIONS_PAGE),
            _page(offset, "offset", 0, MAX_OFFSET),
        )

    # -- reviews -----------------------------------------------------------------------

    async def add_review(
        self, listing_id: str, wire: bytes | str, now: float | None = None
    ) -> tuple[SignedReview, bool]:
        """Store a review of a current listing by anyone but its host; a newer one by the
        same reviewer replaces the older. The review, and whether it is the reviewer's first."""
        signed = SignedReview.from_wire(wire)
        review = signed.review
        if review.listing_id != listing_id:
            raise InvalidDocument("the review is of another listing")
        now = self._now(now)
        if review.at > now + self.max_skew:
            raise InvalidDocument(f"the review is dated {review.at}, in the future")
        text = signed.to_wire().decode()
        key = (reviews.c.listing_id == listing_id, reviews.c.reviewer_id == review.reviewer_id)
        try:
            async with self._writer.begin() as conn:
                host_id = await self._listing_host(conn, listing_id, None)
                if host_id == review.reviewer_id:
                    raise Conflict("a host cannot review its own listing")
                old = (await conn.execute(select(reviews.c.at, reviews.c.wire).where(*key))).first()
                values = dict(stars=review.stars, at=review.at, wire=text, received_at=now)
                if old is not None:
                    if old.wire == text:
                        return signed, False  # the same review, sent again
                    if review.at <= old.at:
                        raise Conflict("a newer review by this reviewer is already here")
                    await conn.execute(update(reviews).where(*key).values(**values))
                    return signed, False
                count = await self._count(conn, reviews.c.listing_id == listing_id, table=reviews)
                if count >= self.max_reviews_per_listing:
                    raise Conflict(f"listing {listing_id} has {count} reviews, the most allowed")
                await conn.execute(
                    insert(reviews).values(
                        listing_id=listing_id, reviewer_id=review.reviewer_id, **values
                    )
                )
        except IntegrityError:
            raise Conflict("the review changed meanwhile; retry") from None
        return signed, True

    async def reviews(
        self, listing_id: str, limit: int = 20, offset: int = 0
    ) -> tuple[list[SignedReview], int, float | None]:
        """A page of a listing's reviews (newest first), how many in all, their average."""
        limit = _page(limit, "limit", 1, MAX_REVIEWS_PAGE)
        offset = _page(offset, "offset", 0, MAX_OFFSET)
        if not _is_id(listing_id):
            return [], 0, None
        mine = reviews.c.listing_id == listing_id
        async with self.engine.connect() as conn:
            total, average = (
                await conn.execute(
                    select(func.count(), func.avg(reviews.c.stars)).select_from(reviews).where(mine)
                )
            ).one()
            rows = (
                await conn.execute(
                    select(reviews.c.wire)
                    .where(mine)
                    .order_by(reviews.c.received_at.desc(), reviews.c.reviewer_id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
        found = [SignedReview.from_wire(row.wire) for row in rows]
        return found, int(total), None if average is None else float(average)

    async def rating(self, listing_ids: Iterable[str]) -> dict[str, tuple[int, float | None]]:
        """(count, average stars) of each of ``listing_ids`` (at most 1000; (0, None) when
        unreviewed; non-IDs are left out)."""
        ids = list(dict.fromkeys(i for i in listing_ids if _is_id(i)))
        if len(ids) > MAX_RATING_IDS:
            raise InvalidQuery(f"at most {MAX_RATING_IDS} listings at once")
        out: dict[str, tuple[int, float | None]] = {i: (0, None) for i in ids}
        if not ids:
            return out
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(reviews.c.listing_id, func.count(), func.avg(reviews.c.stars))
                .where(reviews.c.listing_id.in_(ids))
                .group_by(reviews.c.listing_id)
            )
            for listing_id, count, average in rows:
                out[listing_id] = (int(count), None if average is None else float(average))
        return out

    # -- access ------------------------------------------------------------------------

    async def check_access(
        self, header_value: object, purpose: str, audience: str, now: float | None = None
    ) -> str:
        """The identity a fresh, unused access document for ``purpose`` at ``audience``
        proves; AccessDenied otherwise (its nonce is remembered until it expires)."""
        access = SignedAccess.from_header(header_value)
        now = self._now(now)
        access.verify(purpose, audience, now, self.max_skew)
        nonce = access.nonce.hex()
        try:
            async with self._writer.begin() as conn:
                await conn.execute(delete(access_nonces).where(access_nonces.c.expires_at < now))
                mine = access_nonces.c.identity_id == access.identity_id
                used = await self._count(conn, mine, table=access_nonces)
                if used >= MAX_NONCES_PER_IDENTITY:
                    raise AccessDenied(f"{access.identity_id} signs in too often; slow down")
                seen = await conn.execute(
                    select(access_nonces.c.nonce).where(mine, access_nonces.c.nonce == nonce)
                )
                if seen.first() is not None:
                    raise AccessDenied("the access document was already used (a replay?)")
                await conn.execute(
                    insert(access_nonces).values(
                        identity_id=access.identity_id,
                        nonce=nonce,
                        expires_at=access.at + self.max_skew,
                    )  # fmt: skip
                )
        except IntegrityError:
            raise AccessDenied("the access document was already used (a replay?)") from None
        return access.identity_id

    # -- helpers -----------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return time.time() if now is None else _finite(now, "now")

    def _fresh(self, at: float, now: float, what: str) -> None:
        if not abs(at - now) <= self.max_skew:
            raise InvalidDocument(
                f"the {what} is dated {at}, more than {self.max_skew:g}s from the registry's clock"
            )

    @staticmethod
    async def _count(conn: AsyncConnection, *where: Any, table: Any = session_requests) -> int:
        found = await conn.execute(select(func.count()).select_from(table).where(*where))
        return int(found.scalar_one())

    @staticmethod
    async def _listing_host(conn: AsyncConnection, listing_id: str, host_id: str | None) -> str:
        row = (
            await conn.execute(
                select(listings.c.host_id).where(
                    listings.c.listing_id == listing_id, listings.c.deleted.is_(False)
                )
            )
        ).first()
        if row is None:
            raise NotFound(f"no listing {listing_id} here")
        if host_id is not None and row.host_id != host_id:
            raise Conflict(f"listing {listing_id} is not host {host_id}'s")
        stored: str = row.host_id
        return stored

    @staticmethod
    async def _session_row(conn: AsyncConnection, request_id: str) -> Any:
        return (
            await conn.execute(
                select(session_requests).where(session_requests.c.request_id == request_id)
            )
        ).first()

    @staticmethod
    async def _reply_wires(conn: AsyncConnection, request_ids: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if not request_ids:
            return out
        rows = await conn.execute(
            select(session_replies.c.request_id, session_replies.c.wire)
            .where(session_replies.c.request_id.in_(request_ids))
            .order_by(session_replies.c.request_id, session_replies.c.seq)
        )
        for request_id, wire in rows:
            out.setdefault(request_id, []).append(wire)
        return out

    async def _sessions(self, where: Any, limit: int, offset: int) -> list[StoredSession]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(session_requests)
                    .where(where)
                    .order_by(session_requests.c.created_at.desc(), session_requests.c.request_id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            wires = await self._reply_wires(conn, [row.request_id for row in rows])
        return [
            StoredSession(
                row.request_id,
                row.listing_id,
                row.host_id,
                row.scientist_id,
                row.status,
                row.start,
                row.created_at,
                row.wire,
                tuple(wires.get(row.request_id, ())),
            )  # fmt: skip
            for row in rows
        ]
