"""The registry's store: signed listings, their edits and deletions, host heartbeats, search.

Every document is parsed and verified by :mod:`duet_p2p.registry.listing` before it is
looked at, and checked against what is stored in one transaction (on SQLite one that
takes the write lock first). A listing's first version is version 1; an edit must be the
stored version's successor (:func:`check_successor`: same host and key, version + 1); a
deleted listing keeps a tombstone (its signed deletion) and is never published again; a
heartbeat is fresh, from a known host, and its nonce is remembered until it could no
longer pass the freshness check, so it is taken once. Sending the very document already
stored again is a no-op (a client may retry). A listing's description is rendered to
sanitized HTML (:func:`registry_server.render.render_markdown`) once, when the version is
published, in a worker thread (a pathological text costs markdown-it half a second), and
stored with it: the website shows that HTML and never renders on a view.

A valid document refused because of what is stored (stale, replayed, deleted, another
host's listing, unknown host, over a host's quota) raises :class:`Conflict`; a malformed or
forged one raises ``InvalidListing`` (Conflict is one too). Bad search parameters raise
:class:`InvalidQuery`. Search words are bound parameters, never FTS syntax (see
:mod:`registry_server.db`); "newest" is by the registry's clock, not the dates a host signs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from duet_p2p.errors import DuetError
from duet_p2p.registry.listing import (
    HEARTBEAT_SKEW_SECONDS,
    KINDS,
    MODALITIES,
    InvalidListing,
    SignedDeletion,
    SignedHeartbeat,
    SignedListing,
    check_deletion,
    check_successor,
)
from registry_server.db import (
    WRITE_OPTIONS,
    Search,
    heartbeat_nonces,
    hosts,
    index_listing,
    listing_keywords,
    listings,
    query_facets,
    query_words,
    tombstones,
    unindex_listing,
)
from registry_server.render import render_markdown

__all__ = ["Conflict", "InvalidQuery", "RegistryStore", "StoredListing"]

ONLINE_WINDOW_SECONDS = 600.0
"""A host is online if its last heartbeat is at most this old."""
MAX_LISTINGS_PER_HOST = 1000
MAX_NONCES_PER_HOST = 1000
"""Heartbeats one host may send within one freshness window."""
MAX_LIMIT = 100
MAX_OFFSET = 10_000
MAX_TOTAL = 1000
"""Search counts matches up to this many (a total of MAX_TOTAL means "at least"; pages
past it are still served, up to MAX_OFFSET): counting costs a look at every match. Fewer
matches are listed best first; as many or more, newest first (a query that broad is
narrowed by more words or a filter; ranking it would cost a look at every match too)."""
MAX_QUERY_CHARS = 500
MAX_QUERY_WORDS = 16
MAX_FILTER_CHARS = 64
MAX_ONLINE_WITHIN = 366 * 86400.0
MAX_RENDERING = 2
"""Descriptions rendered in worker threads at once (other publishes wait, off the loop)."""
_HEX32 = re.compile(r"[0-9a-f]{32}")


class Conflict(InvalidListing):
    """A valid document the registry refuses because of what it holds."""


class InvalidQuery(DuetError, ValueError):
    """A search parameter is of the wrong type, unknown or too long."""


@dataclass(frozen=True)
class StoredListing:
    """A listing's current version as stored, with its host's presence."""

    listing_id: str
    host_id: str
    kind: str
    version: int
    name: str
    summary: str
    modality: str
    license: str
    keywords: tuple[str, ...]
    created_at: float
    updated_at: float
    published_at: float
    wire: str
    """The canonical signed listing (JSON text): what a client verifies."""
    last_seen: float | None
    online: bool
    description_html: str | None = None
    """The description as sanitized HTML, rendered at publish (only :meth:`RegistryStore.get`
    reads it; None there: stored before descriptions were kept rendered)."""


def _finite(value: object, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"{what} is a finite number")
    return float(value)  # type: ignore[arg-type]


def _choice(value: object, what: str, allowed: tuple[str, ...] | None) -> str | None:
    """None, or text of 1 to MAX_FILTER_CHARS characters (one of ``allowed`` if given)."""
    if value is None:
        return None
    if type(value) is not str or not 0 < len(value) <= MAX_FILTER_CHARS:
        raise InvalidQuery(f"{what} is text of 1 to {MAX_FILTER_CHARS} characters")
    if allowed is not None and value not in allowed:
        raise InvalidQuery(f"{what} is one of {list(allowed)}")
    return value


def _count(value: object, what: str, least: int, most: int) -> int:
    if type(value) is not int:
        raise InvalidQuery(f"{what} is an int")
    return min(max(value, least), most)


def _still_at(listing_id: str, version: int) -> tuple[Any, ...]:
    """The row of ``listing_id`` only while it is still ``version`` and not deleted: an
    update under it changes nothing when another writer got there first."""
    return (
        listings.c.listing_id == listing_id,
        listings.c.version == version,
        listings.c.deleted.is_(False),
    )


class RegistryStore:
    """Listings, deletions and heartbeats in a database (see :mod:`registry_server.db`;
    the schema must be current: :func:`registry_server.migrate.upgrade`)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        online_window: float = ONLINE_WINDOW_SECONDS,
        max_skew: float = HEARTBEAT_SKEW_SECONDS,
        max_listings_per_host: int = MAX_LISTINGS_PER_HOST,
    ) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**WRITE_OPTIONS)
        self._online_window = _finite(online_window, "online_window")
        self._max_skew = _finite(max_skew, "max_skew")
        self._max_listings = max_listings_per_host
        self._rendering = asyncio.Semaphore(MAX_RENDERING)

    # -- writes ------------------------------------------------------------------------

    async def publish(self, wire: bytes, *, now: float | None = None) -> SignedListing:
        """Store a new listing (version 1) or an edit of a stored one; the listing."""
        signed = SignedListing.from_wire(wire)
        spec = signed.spec
        now = self._now(now)
        if spec.updated_at > now + self._max_skew:
            raise InvalidListing(f"the listing is dated {spec.updated_at}, in the future")
        text = signed.to_wire().decode()
        async with self._engine.connect() as conn:  # before rendering: retries cost nothing
            if await self._tombstone(conn, spec.listing_id) is not None:
                raise Conflict(f"listing {spec.listing_id} was deleted")
            stored = await conn.execute(
                select(listings.c.wire).where(listings.c.listing_id == spec.listing_id)
            )
            if stored.scalar_one_or_none() == text:
                return signed  # the stored version, sent again
        html = await self._render(spec.description)
        try:
            async with self._writer.begin() as conn:
                if await self._tombstone(conn, spec.listing_id) is not None:
                    raise Conflict(f"listing {spec.listing_id} was deleted")
                await self._host(conn, spec.host_id, spec.host_key, now, create=True)
                row = (
                    await conn.execute(
                        select(listings.c.wire, listings.c.version, listings.c.deleted).where(
                            listings.c.listing_id == spec.listing_id
                        )
                    )
                ).first()
                if row is not None and row.wire == text:
                    return signed  # the stored version, sent again
                if row is None:
                    await self._insert(conn, signed, text, html, now)
                else:
                    await self._edit(conn, row, signed, text, html, now)
                await self._index(conn, signed)
        except IntegrityError:
            raise Conflict("the listing changed meanwhile; fetch it and retry") from None
        return signed

    async def delete(self, wire: bytes, *, now: float | None = None) -> None:
        """Delete a listing by its host's signed deletion; keep the deletion as a tombstone."""
        deletion = SignedDeletion.from_wire(wire)
        now = self._now(now)
        if deletion.at > now + self._max_skew:
            raise InvalidListing(f"the deletion is dated {deletion.at}, in the future")
        text = deletion.to_wire().decode()
        try:
            async with self._writer.begin() as conn:
                stored = await self._tombstone(conn, deletion.listing_id)
                if stored is not None:
                    if stored == text:
                        return  # the same deletion, sent again
                    raise Conflict(f"listing {deletion.listing_id} is already deleted")
                row = (
                    await conn.execute(
                        select(listings.c.wire, listings.c.version).where(
                            listings.c.listing_id == deletion.listing_id,
                            listings.c.deleted.is_(False),
                        )
                    )
                ).first()
                if row is None:
                    raise Conflict(f"no listing {deletion.listing_id} here")
                old = SignedListing.from_wire(row.wire.encode())
                try:
                    check_deletion(old, deletion)
                except InvalidListing as exc:
                    raise Conflict(str(exc)) from None
                done = await conn.execute(
                    update(listings)
                    .where(*_still_at(deletion.listing_id, row.version))
                    .values(deleted=True)
                )
                if done.rowcount != 1:
                    raise Conflict("the listing changed meanwhile; fetch it and retry")
                await conn.execute(
                    delete(listing_keywords).where(
                        listing_keywords.c.listing_id == deletion.listing_id
                    )
                )
                await unindex_listing(conn, deletion.listing_id)
                await conn.execute(
                    insert(tombstones).values(
                        listing_id=deletion.listing_id,
                        host_id=deletion.host_id,
                        version=deletion.version,
                        at=deletion.at,
                        wire=text,
                    )  # fmt: skip
                )
        except IntegrityError:
            raise Conflict("the listing changed meanwhile; fetch it and retry") from None

    async def heartbeat(self, wire: bytes, now: float) -> None:
        """Take a known host's fresh heartbeat once; its host is seen at the heartbeat's time."""
        now = _finite(now, "now")
        beat = SignedHeartbeat.from_wire(wire, now, self._max_skew)
        try:
            async with self._writer.begin() as conn:
                last_seen = await self._host(conn, beat.host_id, beat.public_key, now, create=False)
                await conn.execute(
                    delete(heartbeat_nonces).where(heartbeat_nonces.c.expires_at < now)
                )
                mine = heartbeat_nonces.c.host_id == beat.host_id
                count = (
                    await conn.execute(
                        select(func.count()).select_from(heartbeat_nonces).where(mine)
                    )
                ).scalar_one()
                if count >= MAX_NONCES_PER_HOST:
                    raise Conflict(f"host {beat.host_id} sends heartbeats too often")
                seen = await conn.execute(
                    select(heartbeat_nonces.c.nonce).where(
                        mine, heartbeat_nonces.c.nonce == beat.nonce
                    )
                )
                if seen.first() is not None:
                    raise Conflict("the heartbeat was already received (a replay?)")
                await conn.execute(
                    insert(heartbeat_nonces).values(
                        host_id=beat.host_id, nonce=beat.nonce, expires_at=beat.at + self._max_skew
                    )
                )
                seen_at = max(last_seen or 0.0, min(beat.at, now))
                await conn.execute(
                    update(hosts).where(hosts.c.host_id == beat.host_id).values(last_seen=seen_at)
                )
        except IntegrityError:
            raise Conflict("the heartbeat was already received (a replay?)") from None

    # -- reads -------------------------------------------------------------------------

    async def deletion(self, listing_id: str) -> str | None:
        """The signed deletion (wire text) of a deleted listing, or None."""
        if type(listing_id) is not str or not _HEX32.fullmatch(listing_id):
            return None
        async with self._engine.connect() as conn:
            return await self._tombstone(conn, listing_id)

    async def get(self, listing_id: str, *, now: float | None = None) -> StoredListing | None:
        """The current version of a listing, or None (unknown, deleted or not an ID)."""
        if type(listing_id) is not str or not _HEX32.fullmatch(listing_id):
            return None
        now = self._now(now)
        stmt = self._base().add_columns(listings.c.description_html)
        async with self._engine.connect() as conn:
            row = (await conn.execute(stmt.where(listings.c.listing_id == listing_id))).first()
        return None if row is None else self._stored(row, now)

    async def keep_description_html(self, listing_id: str, version: int, html: str) -> bool:
        """Store ``html`` (rendered from the description of ``version``) for a listing
        stored before descriptions were kept rendered, if it is still that version and
        still has none; whether it was stored."""
        if type(listing_id) is not str or not _HEX32.fullmatch(listing_id):
            return False
        if type(version) is not int or type(html) is not str:
            return False
        async with self._writer.begin() as conn:
            done = await conn.execute(
                update(listings)
                .where(
                    listings.c.listing_id == listing_id,
                    listings.c.version == version,
                    listings.c.deleted.is_(False),
                    listings.c.description_html.is_(None),
                )
                .values(description_html=html)
            )
        return bool(done.rowcount)

    async def search(
        self,
        query: str,
        *,
        kind: str | None = None,
        modality: str | None = None,
        license: str | None = None,
        keyword: str | None = None,
        online_within: float | None = None,
        limit: int = 20,
        offset: int = 0,
        now: float | None = None,
    ) -> tuple[list[StoredListing], int]:
        """A page of listings matching every word of ``query`` and the filters, and how
        many match (counted to MAX_TOTAL at most: then "at least"). Best match first when
        fewer than MAX_TOTAL match; newest first when more match, or the query has no
        words. ``limit`` is held to 1..100, ``offset`` to 0..10000."""
        if type(query) is not str or len(query) > MAX_QUERY_CHARS:
            raise InvalidQuery(f"a query is text of at most {MAX_QUERY_CHARS} characters")
        words = query_words(query)
        if len(words) > MAX_QUERY_WORDS:
            raise InvalidQuery(f"a query has at most {MAX_QUERY_WORDS} words")
        kind = _choice(kind, "kind", KINDS)
        modality = _choice(modality, "modality", MODALITIES)
        license = _choice(license, "license", None)
        keyword = _choice(keyword, "keyword", None)
        limit = _count(limit, "limit", 1, MAX_LIMIT)
        offset = _count(offset, "offset", 0, MAX_OFFSET)
        now = self._now(now)
        facets = query_facets(kind=kind, modality=modality, license=license, keyword=keyword)
        base, since = self._base(), None
        if online_within is not None:
            if type(online_within) not in (int, float) or not (
                0 < online_within <= MAX_ONLINE_WITHIN
            ):
                raise InvalidQuery(f"online_within is seconds, more than 0 to {MAX_ONLINE_WITHIN}")
            since = now - online_within
            base = base.where(hosts.c.last_seen >= since)
        newest = (listings.c.published_at.desc(), listings.c.listing_id)
        async with self._engine.connect() as conn:
            if not (words or facets):
                inner = base.with_only_columns(listings.c.listing_id).limit(MAX_TOTAL)
                counted = select(func.count()).select_from(inner.subquery())
                total = (await conn.execute(counted)).scalar_one()
                stmt = base.order_by(*newest)
            else:
                search = Search(conn.dialect.name, words, facets, since)
                await search.prepare(conn)
                total = (await conn.execute(search.count(MAX_TOTAL))).scalar_one()
                if total < MAX_TOTAL:  # few: from the index, best first (or newest)
                    stmt = search.ranked(base).order_by(*newest)
                else:  # many: walk the newest, keeping those that match
                    stmt = base.where(search.contains()).order_by(*newest)
            rows = (await conn.execute(stmt.limit(limit).offset(offset))).all()
        return [self._stored(row, now) for row in rows], total

    # -- helpers -----------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return time.time() if now is None else _finite(now, "now")

    async def _render(self, description: str) -> str:
        """The description as sanitized HTML, made in a worker thread."""
        async with self._rendering:
            try:
                return await asyncio.to_thread(render_markdown, description)
            except ValueError as exc:
                raise InvalidListing(f"the description cannot be shown: {exc}") from None

    @staticmethod
    def _base() -> Any:
        """Live listings with their host's presence (without their rendered description:
        pages of results do not show it)."""
        shown = [c for c in listings.c if c.name != "description_html"]
        return (
            select(*shown, hosts.c.last_seen)
            .join(hosts, hosts.c.host_id == listings.c.host_id)
            .where(listings.c.deleted.is_(False))
        )

    def _stored(self, row: Row[Any], now: float) -> StoredListing:
        last_seen = row.last_seen
        return StoredListing(
            listing_id=row.listing_id, host_id=row.host_id, kind=row.kind, version=row.version,
            name=row.name, summary=row.summary, modality=row.modality, license=row.license,
            keywords=tuple(json.loads(row.keywords)), created_at=row.created_at,
            updated_at=row.updated_at, published_at=row.published_at, wire=row.wire,
            last_seen=last_seen,
            online=last_seen is not None and last_seen >= now - self._online_window,
            description_html=row._mapping.get("description_html"),
        )  # fmt: skip

    @staticmethod
    async def _tombstone(conn: AsyncConnection, listing_id: str) -> str | None:
        return (
            await conn.execute(
                select(tombstones.c.wire).where(tombstones.c.listing_id == listing_id)
            )
        ).scalar_one_or_none()

    @staticmethod
    async def _host(
        conn: AsyncConnection, host_id: str, host_key: bytes, now: float, *, create: bool
    ) -> float | None:
        """Check ``host_key`` is the stored host's key (add the host if ``create``); its
        ``last_seen``. On PostgreSQL the host's row stays locked until the transaction ends,
        so one host's writes (quota, nonce count, edits) take turns; SQLite's write lock
        already serializes every write."""
        mine = (
            select(hosts.c.host_key, hosts.c.last_seen)
            .where(hosts.c.host_id == host_id)
            .with_for_update()
        )
        row = (await conn.execute(mine)).first()
        if row is None:
            if not create:
                raise Conflict(f"host {host_id} has no listing here")
            new = {"host_id": host_id, "host_key": host_key, "first_seen": now}
            dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            # a host's first listings may arrive at once: one inserts, the others wait
            await conn.execute(dialect_insert(hosts).values(**new).on_conflict_do_nothing())
            row = (await conn.execute(mine)).one()
        if not hmac.compare_digest(bytes(row.host_key), host_key):
            raise Conflict(f"host {host_id} is known here by another key")
        last_seen: float | None = row.last_seen
        return last_seen

    def _columns(self, signed: SignedListing, text: str, html: str, now: float) -> dict[str, Any]:
        spec = signed.spec
        return dict(
            host_id=spec.host_id, kind=spec.kind, version=spec.version, name=spec.name,
            summary=spec.summary, modality=spec.modality, license=spec.license,
            keywords=json.dumps(spec.keywords, ensure_ascii=False), wire=text,
            created_at=spec.created_at, updated_at=spec.updated_at, published_at=now,
            description_html=html,
        )  # fmt: skip

    async def _insert(
        self, conn: AsyncConnection, signed: SignedListing, text: str, html: str, now: float
    ) -> None:
        if signed.version != 1:
            raise Conflict("a listing new here must be version 1")
        held = (
            await conn.execute(
                select(func.count())
                .select_from(listings)
                .where(listings.c.host_id == signed.host_id, listings.c.deleted.is_(False))
            )
        ).scalar_one()
        if held >= self._max_listings:
            raise Conflict(f"host {signed.host_id} has {held} listings, the most allowed")
        await conn.execute(
            insert(listings).values(
                listing_id=signed.listing_id,
                deleted=False,
                **self._columns(signed, text, html, now),
            )
        )

    async def _edit(
        self,
        conn: AsyncConnection,
        row: Row[Any],
        signed: SignedListing,
        text: str,
        html: str,
        now: float,
    ) -> None:
        if row.deleted:
            raise Conflict(f"listing {signed.listing_id} was deleted")
        old = SignedListing.from_wire(row.wire.encode())
        try:
            check_successor(old, signed)
        except InvalidListing as exc:
            raise Conflict(str(exc)) from None
        done = await conn.execute(
            update(listings)
            .where(*_still_at(signed.listing_id, row.version))
            .values(**self._columns(signed, text, html, now))
        )
        if done.rowcount != 1:
            raise Conflict("the listing changed meanwhile; fetch it and retry")
        await conn.execute(
            delete(listing_keywords).where(listing_keywords.c.listing_id == signed.listing_id)
        )

    @staticmethod
    async def _index(conn: AsyncConnection, signed: SignedListing) -> None:
        spec = signed.spec
        folded = list(dict.fromkeys(word.casefold() for word in spec.keywords))
        if folded:
            await conn.execute(
                insert(listing_keywords),
                [{"listing_id": spec.listing_id, "keyword": word} for word in folded],
            )
        await index_listing(
            conn, spec.listing_id, host_id=spec.host_id, name=spec.name, summary=spec.summary,
            description=spec.description, keywords=spec.keywords, kind=spec.kind,
            modality=spec.modality, license=spec.license,
        )  # fmt: skip
