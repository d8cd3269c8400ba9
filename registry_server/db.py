"""The registry's tables, and full-text search by database dialect.

Tables (SQLAlchemy Core, portable to PostgreSQL): ``hosts`` (each host's key, when it was
last seen), ``heartbeat_nonces`` (the nonces of recent heartbeats, kept until they could
no longer pass the freshness check), ``listings`` (the current version of each listing:
a few columns to filter on, the canonical signed wire form and its description rendered
at publish), ``listing_keywords`` (one row per case-folded keyword, for exact keyword
filters), ``tombstones`` (each deleted listing's signed deletion), ``reports`` (visitors'
reports about listings, see :mod:`registry_server.reports`) and ``registry_settings``
(small named values the registry makes for itself, such as the reports' hashing key). The schema is made and changed by the Alembic migrations in
``registry_server/migrations`` (:func:`registry_server.migrate.upgrade`).

Full-text search, over name, summary, keywords and description (weighted in that order),
is written in the same transaction as the listing:

- SQLite: an FTS5 table (``unicode61``, diacritics removed) ranked by ``bm25`` with column
  weights; its rows are keyed by a stable integer from ``listings_search_ids`` (an FTS5
  table is keyed by integer, and a listing's own ``rowid`` may change on ``VACUUM``).
- PostgreSQL: ``listings_search``, one weighted ``tsvector`` per listing (configuration
  ``simple``: no stemming, no stop words) under a GIN index, ranked by ``ts_rank``. The
  text is folded the same way in Python first (:func:`search_text`: NFKC, diacritics
  removed, case-folded, words only), so both databases find the same listings.

A user's query never reaches either as syntax: :func:`query_words` keeps its words only
(letters and digits); FTS5 gets each quoted as a string (:func:`fts5_query`), PostgreSQL
gets them as one bound parameter of ``plainto_tsquery``, so ``NEAR``, ``*``, ``^``, ``&``,
``|``, ``!``, column filters and stray quotes are plain words or nothing.
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
    and_,
    bindparam,
    column,
    event,
    func,
    literal_column,
    select,
    table,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = [
    "SEARCH_TABLES", "WRITE_OPTIONS", "Search", "create_schema", "fts5_query", "heartbeat_nonces",
    "facet_tokens", "hosts", "index_listing", "listing_keywords", "listings", "make_engine",
    "metadata", "query_facets", "query_words", "registry_settings", "reports", "search_join",
    "search_text", "tombstones", "unindex_listing",
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
    # the description rendered and sanitized at publish (render_markdown); NULL for rows
    # written before migration 0003 (the page renders those itself)
    Column("description_html", Text, nullable=True),
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

reports = Table(
    "reports",
    metadata,
    Column("report_id", String(ID_CHARS), primary_key=True),
    Column("listing_id", String(ID_CHARS), nullable=False),  # kept if the listing goes
    Column("reason", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("client_key", String(64), nullable=False),  # HMAC of the reporter's address
    Index("ix_reports_created_at", "created_at"),
    Index("ix_reports_listing_client", "listing_id", "client_key", "created_at"),
    Index("ix_reports_client_key", "client_key"),
)

registry_settings = Table(
    "registry_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

SEARCH_TABLES = frozenset({
    "listings_search_ids", "listings_fts", "listings_fts_data", "listings_fts_idx",
    "listings_fts_content", "listings_fts_docsize", "listings_fts_config", "listings_search",
})  # fmt: skip
"""The full-text search tables (made by the migrations, outside :data:`metadata`)."""

_search_ids = table("listings_search_ids", column("id"), column("listing_id"), column("host_id"))
_fts = table("listings_fts", column("rowid"), column("rank"))
_pg_search = table(
    "listings_search", column("listing_id"), column("host_id"), column("document"),
    column("facets"),
)  # fmt: skip
_WORD = re.compile(r"[^\W_]+")
_SQLITE_DRIVERS = frozenset({"sqlite", "sqlite+aiosqlite"})
_POSTGRES_DRIVERS = frozenset({"postgresql", "postgres", "postgresql+asyncpg"})
_PG_INDEX = text(
    "INSERT INTO listings_search (listing_id, host_id, document, facets) "
    "VALUES (:listing_id, :host_id, "
    "setweight(to_tsvector('simple', :name), 'A') || "
    "setweight(to_tsvector('simple', :keywords), 'B') || "
    "setweight(to_tsvector('simple', :summary), 'B') || "
    "setweight(to_tsvector('simple', :description), 'C'), "
    "to_tsvector('simple', :facets)) "
    "ON CONFLICT (listing_id) DO UPDATE "
    "SET document = EXCLUDED.document, facets = EXCLUDED.facets"
)
_SQLITE_INDEX = text(
    "INSERT INTO listings_fts (rowid, name, summary, description, keywords, facets) "
    "VALUES (:rowid, :name, :summary, :description, :keywords, :facets)"
)
PG_RANK_NORMALIZATION = 1
"""``ts_rank``'s normalization: divide by 1 + log(document length), as bm25 favours short
documents too."""


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``url``: ``sqlite:///path`` runs on aiosqlite (foreign keys on,
    real transactions, a busy timeout); ``postgresql://`` or ``postgres://`` on asyncpg.
    Any other scheme or driver raises ValueError."""
    if type(url) is not str:
        raise ValueError("a database URL is text")
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError("not a database URL (sqlite:///path, postgresql://...)") from None
    if parsed.drivername in _SQLITE_DRIVERS:
        parsed = parsed.set(drivername="sqlite+aiosqlite")
        engine = create_async_engine(parsed, **kwargs)
        _sqlite_transactions(engine)
        return engine
    if parsed.drivername in _POSTGRES_DRIVERS:
        return create_async_engine(parsed.set(drivername="postgresql+asyncpg"), **kwargs)
    raise ValueError(
        f"unsupported database {parsed.drivername!r} (sqlite:///path, postgresql://...)"
    )


def _sqlite_transactions(engine: AsyncEngine) -> None:
    """Let SQLAlchemy, not the driver, begin transactions (so reads are inside them too),
    taking the write lock first on writing connections."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA busy_timeout = 10000")
        cursor.execute("PRAGMA cache_size = -32768")  # KiB: 32 MiB of pages per connection
        cursor.execute("PRAGMA mmap_size = 268435456")  # read through the OS's page cache
        cursor.execute("PRAGMA temp_store = MEMORY")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("registry_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


async def create_schema(engine: AsyncEngine) -> None:
    """Create or migrate the schema (:func:`registry_server.migrate.upgrade`)."""
    from registry_server.migrate import upgrade

    await upgrade(engine)


def _unsupported(dialect: str) -> ValueError:
    return ValueError(f"no full-text search on {dialect!r} (sqlite, postgresql)")


def facet_tokens(*, kind: str, modality: str, license: str, keywords: list[str]) -> list[str]:
    """The filter values of a listing as index words: a letter for the filter, then the
    value's UTF-8 in hex (so any value is one word, and never a word of its text)."""
    tokens = [_facet("k", kind), _facet("m", modality), _facet("l", license)]
    tokens += [_facet("w", word.casefold()) for word in keywords]
    return list(dict.fromkeys(tokens))


def _facet(prefix: str, value: str) -> str:
    return prefix + value.encode().hex()


def query_facets(
    *, kind: str | None, modality: str | None, license: str | None, keyword: str | None
) -> list[str]:
    """The index words a search's filters require (see :func:`facet_tokens`)."""
    wanted = (("k", kind), ("m", modality), ("l", license))
    tokens = [_facet(prefix, value) for prefix, value in wanted if value is not None]
    if keyword is not None:
        tokens.append(_facet("w", keyword.casefold()))
    return tokens


async def index_listing(
    conn: AsyncConnection,
    listing_id: str,
    *,
    host_id: str,
    name: str,
    summary: str,
    description: str,
    keywords: list[str],
    kind: str,
    modality: str,
    license: str,
) -> None:
    """Put a listing's text and filter values in the full-text index (replacing what was
    there)."""
    facets = " ".join(
        facet_tokens(kind=kind, modality=modality, license=license, keywords=keywords)
    )
    dialect = conn.dialect.name
    if dialect == "postgresql":
        await conn.execute(
            _PG_INDEX,
            {
                "listing_id": listing_id,
                "host_id": host_id,
                "name": search_text(name),
                "keywords": search_text(" ".join(keywords)),
                "summary": search_text(summary),
                "description": search_text(description),
                "facets": facets,
            },
        )
        return
    if dialect != "sqlite":
        raise _unsupported(dialect)
    await conn.execute(
        text(
            "INSERT OR IGNORE INTO listings_search_ids (listing_id, host_id) "
            "VALUES (:listing_id, :host_id)"
        ),
        {"listing_id": listing_id, "host_id": host_id},
    )
    rowid = (
        await conn.execute(
            text("SELECT id FROM listings_search_ids WHERE listing_id = :listing_id"),
            {"listing_id": listing_id},
        )
    ).scalar_one()
    await conn.execute(text("DELETE FROM listings_fts WHERE rowid = :rowid"), {"rowid": rowid})
    await conn.execute(
        _SQLITE_INDEX,
        {
            "rowid": rowid,
            "name": name,
            "summary": summary,
            "description": description,
            "keywords": " ".join(keywords),
            "facets": facets,
        },
    )


async def unindex_listing(conn: AsyncConnection, listing_id: str) -> None:
    """Take a listing out of the full-text index."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        await conn.execute(
            text("DELETE FROM listings_search WHERE listing_id = :listing_id"),
            {"listing_id": listing_id},
        )
        return
    if dialect != "sqlite":
        raise _unsupported(dialect)
    await conn.execute(
        text(
            "DELETE FROM listings_fts WHERE rowid = "
            "(SELECT id FROM listings_search_ids WHERE listing_id = :listing_id)"
        ),
        {"listing_id": listing_id},
    )


def fts5_query(words: list[str], facets: list[str] = ()) -> str:  # type: ignore[assignment]
    """An FTS5 query matching every one of ``words`` in the text columns and every one of
    ``facets`` in the filter column (each quoted: never syntax)."""
    parts = []
    if words:
        quoted = " ".join('"' + word.replace('"', '""') + '"' for word in words)
        parts.append("{name summary description keywords} : (" + quoted + ")")
    if facets:
        quoted = " ".join('"' + token.replace('"', '""') + '"' for token in facets)
        parts.append("{facets} : (" + quoted + ")")
    return " AND ".join(parts)


def query_words(query: str) -> list[str]:
    """The distinct words (runs of letters and digits, NFKC) of a user's query, in order."""
    found = _WORD.findall(unicodedata.normalize("NFKC", query))
    return list(dict.fromkeys(word.casefold() for word in found))


def search_text(value: str) -> str:
    """``value``'s words, folded as SQLite's ``unicode61 remove_diacritics 2`` folds them
    (compatibility forms, no diacritics, case-folded), one space apart."""
    bare = "".join(
        char for char in unicodedata.normalize("NFKD", value) if not unicodedata.combining(char)
    )
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", bare).casefold()))


class Search:
    """The full-text part of one search: ``words`` (matched in the text, ranked) and
    ``facets`` (filter values, :func:`query_facets`) as bound parameters, on ``dialect``."""

    def __init__(
        self, dialect: str, words: list[str], facets: list[str], online_since: float | None = None
    ) -> None:
        if dialect not in ("sqlite", "postgresql"):
            raise _unsupported(dialect)
        if not (words or facets):
            raise ValueError("a full-text search needs words or filters")
        self.dialect, self.words, self.facets = dialect, words, facets
        self.online_since = online_since
        if dialect == "sqlite":
            self._match = text("listings_fts MATCH :fts_query").bindparams(
                fts_query=fts5_query(words, facets)
            )
            return
        simple = literal_column("'simple'::regconfig")
        self._words = func.plainto_tsquery(
            simple, bindparam("ts_words", search_text(" ".join(words)), type_=Text)
        )
        self._facets = func.plainto_tsquery(
            simple, bindparam("ts_facets", " ".join(facets), type_=Text)
        )
        in_words = _pg_search.c.document.op("@@")(self._words)
        in_facets = _pg_search.c.facets.op("@@")(self._facets)
        if words and facets:
            self._match = and_(in_words, in_facets)
        else:
            self._match = in_words if words else in_facets

    async def prepare(self, conn: AsyncConnection) -> None:
        """Settings for this transaction's search queries. PostgreSQL: no sequential scans
        (its planner prices ``@@`` as cheap and, under a LIMIT, would rather test rows one
        by one than read the GIN index; the search tables are only ever read by index), a
        plan made for these very words (a prepared statement's generic plan cannot know how
        many listings a word matches), and no parallel workers (starting them costs more
        than a search's page)."""
        if self.dialect == "postgresql":
            await conn.execute(text("SET LOCAL enable_seqscan = off"))
            await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
            await conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))

    def count(self, cap: int) -> Select[Any]:
        """How many listings match (of hosts seen since ``online_since``, if given),
        counting to ``cap`` at most. Straight from the index: it holds live listings only."""
        if self.dialect == "sqlite":
            inner = select(literal_column("1")).select_from(_fts).where(self._match)
            if self.online_since is not None:
                inner = inner.join(_search_ids, _search_ids.c.id == _fts.c.rowid)
            host = _search_ids.c.host_id
        else:
            inner = select(literal_column("1")).select_from(_pg_search).where(self._match)
            host = _pg_search.c.host_id
        if self.online_since is not None:
            inner = inner.join(hosts, hosts.c.host_id == host).where(
                hosts.c.last_seen >= self.online_since
            )
        return select(func.count()).select_from(inner.limit(cap).subquery())

    def ranked(self, stmt: Select[Any]) -> Select[Any]:
        """``stmt`` (over ``listings``) joined to its matches, best first by the words
        (cheap when few match)."""
        if self.dialect == "sqlite":
            stmt = (
                stmt.join(_search_ids, _search_ids.c.listing_id == listings.c.listing_id)
                .join(_fts, _fts.c.rowid == _search_ids.c.id)
                .where(self._match)
            )
            return stmt.order_by(_fts.c.rank) if self.words else stmt
        stmt = stmt.join(_pg_search, _pg_search.c.listing_id == listings.c.listing_id).where(
            self._match
        )
        if not self.words:
            return stmt
        rank = func.ts_rank(_pg_search.c.document, self._words, PG_RANK_NORMALIZATION)
        return stmt.order_by(rank.desc())

    def contains(self) -> Any:
        """A condition on ``listings``: the listing matches (checked row by row: for
        walking listings newest first when many match)."""
        if self.dialect == "sqlite":  # the matches' ids once (FTS5 probed row by row is slow)
            matching = select(_fts.c.rowid).where(self._match)
            return (
                select(literal_column("1"))
                .select_from(_search_ids)
                .where(
                    _search_ids.c.listing_id == listings.c.listing_id,
                    _search_ids.c.id.in_(matching),
                )
                .exists()
            )
        return (
            select(literal_column("1"))
            .select_from(_pg_search)
            .where(_pg_search.c.listing_id == listings.c.listing_id, self._match)
            .exists()
        )


def search_join(stmt: Select[Any], dialect: str, words: list[str]) -> Select[Any]:
    """``stmt`` (over ``listings``) restricted to listings matching all ``words``, best
    match first; the words are a bound parameter, never syntax."""
    return Search(dialect, words, []).ranked(stmt)
