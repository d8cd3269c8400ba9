"""The registry's tables, and full-text search by database dialect.

Tables (SQLAlchemy Core, portable to PostgreSQL): ``hosts`` (each host's key, when it was
last seen), ``heartbeat_nonces`` (the nonces of recent heartbeats, kept until they could
no longer pass the freshness check), ``listings`` (the current version of each listing:
a few columns to filter on and the canonical signed wire form), ``listing_keywords`` (one
row per case-folded keyword, for exact keyword filters) and ``tombstones`` (each deleted
listing's signed deletion).

Full-text search on SQLite is an FTS5 table over name, summary, description and keywords,
written in the same transaction as the listing; its rows are keyed by a stable integer
from ``listings_search_ids`` (an FTS5 table is keyed by integer, and a listing's own
``rowid`` may change on ``VACUUM``). PostgreSQL search (a ``tsvector`` column) is not built
yet: every search function raises NotImplementedError for it. There are no Alembic
migrations yet: :func:`create_schema` creates what is missing and changes nothing else.

A user's query never reaches FTS5 as syntax: :func:`fts5_query` keeps its words only
(letters and digits) and quotes each as an FTS5 string, so ``NEAR``, ``*``, ``^``, column
filters and stray quotes are plain words or nothing.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    Select,
    String,
    Table,
    Text,
    column,
    event,
    table,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = [
    "WRITE_OPTIONS", "create_schema", "fts5_query", "heartbeat_nonces", "hosts",
    "index_listing", "listing_keywords", "listings", "make_engine", "metadata", "query_words",
    "search_join", "tombstones", "unindex_listing",
]  # fmt: skip

ID_CHARS = 32
WRITE_OPTIONS = {"registry_write": True}
"""Execution options of a writing connection: on SQLite its transaction starts with
``BEGIN IMMEDIATE`` (it takes the write lock first, so a read-check-write is atomic)."""

metadata = MetaData()

hosts = Table(
    "hosts",
    metadata,
    Column("host_id", String(ID_CHARS), primary_key=True),
    Column("host_key", LargeBinary(32), nullable=False),
    Column("first_seen", Double, nullable=False),
    Column("last_seen", Double, nullable=True),
)

heartbeat_nonces = Table(
    "heartbeat_nonces",
    metadata,
    Column(
        "host_id",
        String(ID_CHARS),
        ForeignKey("hosts.host_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("nonce", LargeBinary(16), primary_key=True),
    Column("expires_at", Double, nullable=False, index=True),
)

listings = Table(
    "listings",
    metadata,
    Column("listing_id", String(ID_CHARS), primary_key=True),
    Column("host_id", String(ID_CHARS), ForeignKey("hosts.host_id"), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("name", Text, nullable=False),
    Column("summary", Text, nullable=False),
    Column("modality", String(16), nullable=False),
    Column("license", String(64), nullable=False),
    Column("keywords", Text, nullable=False),  # a JSON array, as signed
    Column("wire", Text, nullable=False),  # the canonical signed listing (JSON)
    Column("created_at", Double, nullable=False),  # as the host signed it
    Column("updated_at", Double, nullable=False),  # as the host signed it
    Column("published_at", Double, nullable=False),  # the registry's clock: orders "newest"
    Column("deleted", Boolean, nullable=False, default=False),
    Index("ix_listings_deleted_published", "deleted", "published_at"),
)

listing_keywords = Table(
    "listing_keywords",
    metadata,
    Column(
        "listing_id",
        String(ID_CHARS),
        ForeignKey("listings.listing_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("keyword", String(256), primary_key=True),  # case-folded
    Index("ix_listing_keywords_keyword", "keyword"),
)

tombstones = Table(
    "tombstones",
    metadata,
    Column("listing_id", String(ID_CHARS), primary_key=True),
    Column("host_id", String(ID_CHARS), nullable=False, index=True),
    Column("version", BigInteger, nullable=False),  # the deletion's version
    Column("at", Double, nullable=False),
    Column("wire", Text, nullable=False),  # the canonical signed deletion (JSON)
)

_SQLITE_DDL = (
    "CREATE TABLE IF NOT EXISTS listings_search_ids ("
    "id INTEGER PRIMARY KEY AUTOINCREMENT, listing_id TEXT NOT NULL UNIQUE)",
    "CREATE VIRTUAL TABLE IF NOT EXISTS listings_fts USING fts5("
    "name, summary, description, keywords, tokenize = 'unicode61 remove_diacritics 2')",
)
_search_ids = table("listings_search_ids", column("id"), column("listing_id"))
_fts = table("listings_fts", column("rowid"), column("rank"))
_WORD = re.compile(r"[^\W_]+")


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``url``: ``sqlite:///path`` runs on aiosqlite (foreign keys on,
    real transactions, a busy timeout); ``postgresql://`` on asyncpg."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
        engine = create_async_engine(parsed, **kwargs)
        _sqlite_transactions(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+asyncpg")
        return create_async_engine(parsed, **kwargs)
    raise ValueError(f"unsupported database {parsed.get_backend_name()!r} (sqlite, postgresql)")


def _sqlite_transactions(engine: AsyncEngine) -> None:
    """Let SQLAlchemy, not the driver, begin transactions (so reads are inside them too),
    taking the write lock first on writing connections."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA busy_timeout = 10000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("registry_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


async def create_schema(engine: AsyncEngine) -> None:
    """Create the tables (and on SQLite the FTS5 index) that are missing."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        if conn.dialect.name == "sqlite":
            for statement in _SQLITE_DDL:
                await conn.exec_driver_sql(statement)


def _unsupported(dialect: str) -> NotImplementedError:
    return NotImplementedError(f"full-text search on {dialect} is not built yet")


async def index_listing(
    conn: AsyncConnection,
    listing_id: str,
    *,
    name: str,
    summary: str,
    description: str,
    keywords: list[str],
) -> None:
    """Put a listing's text in the full-text index (replacing what was there)."""
    if conn.dialect.name != "sqlite":
        raise _unsupported(conn.dialect.name)
    await conn.execute(
        text("INSERT OR IGNORE INTO listings_search_ids (listing_id) VALUES (:listing_id)"),
        {"listing_id": listing_id},
    )
    rowid = (
        await conn.execute(
            text("SELECT id FROM listings_search_ids WHERE listing_id = :listing_id"),
            {"listing_id": listing_id},
        )
    ).scalar_one()
    await conn.execute(text("DELETE FROM listings_fts WHERE rowid = :rowid"), {"rowid": rowid})
    await conn.execute(
        text(
            "INSERT INTO listings_fts (rowid, name, summary, description, keywords) "
            "VALUES (:rowid, :name, :summary, :description, :keywords)"
        ),
        {
            "rowid": rowid,
            "name": name,
            "summary": summary,
            "description": description,
            "keywords": " ".join(keywords),
        },
    )


async def unindex_listing(conn: AsyncConnection, listing_id: str) -> None:
    """Take a listing out of the full-text index."""
    if conn.dialect.name != "sqlite":
        raise _unsupported(conn.dialect.name)
    await conn.execute(
        text(
            "DELETE FROM listings_fts WHERE rowid = "
            "(SELECT id FROM listings_search_ids WHERE listing_id = :listing_id)"
        ),
        {"listing_id": listing_id},
    )


def fts5_query(words: list[str]) -> str:
    """An FTS5 query matching every one of ``words`` (each quoted: never syntax)."""
    return " ".join('"' + word.replace('"', '""') + '"' for word in words)


def query_words(query: str) -> list[str]:
    """The distinct words (runs of letters and digits, NFKC) of a user's query, in order."""
    found = _WORD.findall(unicodedata.normalize("NFKC", query))
    return list(dict.fromkeys(word.casefold() for word in found))


def search_join(stmt: Select[Any], dialect: str, words: list[str]) -> Select[Any]:
    """``stmt`` (over ``listings``) restricted to listings matching all ``words``, best
    match first; the query text is a bound parameter."""
    if dialect != "sqlite":
        raise _unsupported(dialect)
    return (
        stmt.join(_search_ids, _search_ids.c.listing_id == listings.c.listing_id)
        .join(_fts, _fts.c.rowid == _search_ids.c.id)
        .where(text("listings_fts MATCH :fts_query").bindparams(fts_query=fts5_query(words)))
        .order_by(_fts.c.rank)
    )
