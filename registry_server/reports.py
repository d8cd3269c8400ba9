"""Visitors' reports about listings, kept in the database for the registry's operator.

A report is a reason (one of :data:`REASONS`), at most :data:`MAX_REPORT_CHARS` characters
of text, the time it came and a ``client_key``: an HMAC-SHA256 of the reporter's address
(an IPv4 address, or an IPv6 /64 prefix: see ``address_key``) under a random key made once
per database and kept in ``registry_settings``. The address itself is never stored; the
key tells the operator which reports came from one place (a flood), and the same address
gets another key in another registry's database.

Caps: a client has at most :data:`MAX_PER_CLIENT_PER_DAY` open reports about one listing
made in the last 24 hours (:class:`TooManyReports` beyond), and the table holds at most
:data:`MAX_REPORTS` reports in all. When it is full, new reports are refused
(:class:`ReportsFull`) and those already there are kept: a flood cannot push out what
others reported first; the operator sees it (``duet-registry reports``) and clears it by
report or by client (:meth:`ReportStore.dismiss`, :meth:`ReportStore.dismiss_client`).
Dismissing a report deletes it. The text is stored as typed (NUL aside, refused): it is
hostile, and whoever shows it strips control characters (``duet_p2p.text.printable``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, delete, func, insert, select
from sqlalchemy import text as sql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from duet_p2p.errors import DuetError
from registry_server.db import WRITE_OPTIONS, registry_settings, reports
from signaling_server.ratelimit import address_key

__all__ = [
    "MAX_PER_CLIENT_PER_DAY", "MAX_REPORTS", "MAX_REPORT_CHARS", "REASONS", "InvalidReport",
    "ReportStore", "ReportsFull", "StoredReport", "TooManyReports",
]  # fmt: skip

logger = logging.getLogger(__name__)

REASONS = {
    "spam": "Spam or advertising",
    "misleading": "Misleading or false description",
    "harmful": "Harmful, abusive or illegal content",
    "personal": "Exposes personal data",
    "other": "Something else",
}
MAX_REPORT_CHARS = 1000
MAX_PER_CLIENT_PER_DAY = 20
"""Open reports one client may have made about one listing in the last 24 hours."""
MAX_REPORTS = 100_000
MAX_LIST = 1000
DAY_SECONDS = 86400.0
SALT_NAME = "report_client_key"
SALT_BYTES = 32
LOCK_KEY = 0x4455_4554_5250_54  # "DUETRPT": PostgreSQL's advisory lock of report writes
WARN_EVERY_SECONDS = 3600.0
_HEX32 = re.compile(r"[0-9a-f]{32}")
_CLIENT_PREFIX = re.compile(r"[0-9a-f]{16,64}")


class InvalidReport(DuetError, ValueError):
    """A report or a report query that is malformed (unknown reason, too long, not an ID)."""


class TooManyReports(DuetError):
    """This client has made as many reports about this listing today as are taken."""


class ReportsFull(DuetError):
    """The registry holds :data:`MAX_REPORTS` reports; no more are taken until some go."""


@dataclass(frozen=True)
class StoredReport:
    """One report as stored (``text`` is hostile: print it through ``printable``)."""

    report_id: str
    listing_id: str
    reason: str
    text: str
    created_at: float
    client_key: str

    def to_json(self) -> dict[str, Any]:
        return {
            "report_id": self.report_id, "listing_id": self.listing_id, "reason": self.reason,
            "text": self.text, "created_at": self.created_at, "client_key": self.client_key,
        }  # fmt: skip


def check_report(listing_id: object, reason: object, text: object) -> None:
    """InvalidReport unless the listing is an ID, the reason known and the text short."""
    if type(listing_id) is not str or not _HEX32.fullmatch(listing_id):
        raise InvalidReport("a listing ID is 32 lowercase hex characters")
    if type(reason) is not str or reason not in REASONS:
        raise InvalidReport(f"a reason is one of {sorted(REASONS)}")
    if type(text) is not str or len(text) > MAX_REPORT_CHARS:
        raise InvalidReport(f"a report's text is at most {MAX_REPORT_CHARS} characters")
    if "\x00" in text:
        raise InvalidReport("a report's text has no NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidReport("a report's text is valid Unicode") from None


class ReportStore:
    """Reports in a registry database (schema at revision 0003 or later)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        per_client_per_day: int = MAX_PER_CLIENT_PER_DAY,
        max_reports: int = MAX_REPORTS,
    ) -> None:
        if per_client_per_day < 1 or max_reports < 1:
            raise ValueError("report caps are at least 1")
        self._engine = engine
        self._writer = engine.execution_options(**WRITE_OPTIONS)
        self._per_client = per_client_per_day
        self._max = max_reports
        self._salt: bytes | None = None
        self._warned_at = -WARN_EVERY_SECONDS

    async def client_key(self, address: str | None) -> str:
        """The key :meth:`add` stores for a reporter at ``address`` (64 hex characters)."""
        if self._salt is None:
            async with self._writer.begin() as conn:
                salt = await self._load_salt(conn)
            self._salt = salt  # once committed
        where = address_key(address).encode("utf-8", "surrogatepass")
        return hmac.new(self._salt, where, hashlib.sha256).hexdigest()

    async def add(
        self,
        listing_id: str,
        reason: str,
        text: str,
        address: str | None,
        *,
        now: float | None = None,
        per_client: bool = True,
    ) -> StoredReport:
        """Store a report from ``address`` (the reporter's IP; only its keyed hash is kept).
        InvalidReport, TooManyReports or ReportsFull if it is not taken. ``per_client=False``
        skips the per-client cap (for an address every visitor shares: a reverse proxy
        exempted from the per-client limits); the total cap still holds."""
        check_report(listing_id, reason, text)
        now = time.time() if now is None else float(now)
        key = await self.client_key(address)
        async with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":  # the caps' counts and the insert, in turns
                await conn.execute(sql("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            recent = (
                await conn.execute(
                    select(func.count())
                    .select_from(reports)
                    .where(
                        reports.c.listing_id == listing_id,
                        reports.c.client_key == key,
                        reports.c.created_at > now - DAY_SECONDS,
                    )
                )
            ).scalar_one()
            if per_client and recent >= self._per_client:
                raise TooManyReports(f"at most {self._per_client} reports a day about one listing")
            held = (await conn.execute(select(func.count()).select_from(reports))).scalar_one()
            if held >= self._max:
                self._warn_full(held)
                raise ReportsFull(f"the registry holds {held} reports, the most it keeps")
            report = StoredReport(secrets.token_hex(16), listing_id, reason, text, now, key)
            await conn.execute(insert(reports).values(**report.to_json()))
        return report

    async def newest(self, *, listing_id: str | None = None, limit: int = 50) -> list[StoredReport]:
        """Open reports, newest first (about ``listing_id`` only, if given); ``limit`` is
        held to 1..1000."""
        if listing_id is not None and (
            type(listing_id) is not str or not _HEX32.fullmatch(listing_id)
        ):
            raise InvalidReport("a listing ID is 32 lowercase hex characters")
        if type(limit) is not int:
            raise InvalidReport("limit is an int")
        stmt = select(reports).order_by(reports.c.created_at.desc(), reports.c.report_id)
        if listing_id is not None:
            stmt = stmt.where(reports.c.listing_id == listing_id)
        stmt = stmt.limit(min(max(limit, 1), MAX_LIST))
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [_report(row) for row in rows]

    async def count(self) -> int:
        """How many reports are open."""
        async with self._engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(reports))).scalar_one())

    async def dismiss(self, report_id: str) -> bool:
        """Delete one report; False if there is no such report."""
        if type(report_id) is not str or not _HEX32.fullmatch(report_id):
            raise InvalidReport("a report ID is 32 lowercase hex characters")
        async with self._writer.begin() as conn:
            done = await conn.execute(delete(reports).where(reports.c.report_id == report_id))
        return bool(done.rowcount)

    async def dismiss_client(self, client_key: str) -> int:
        """Delete every report whose client key starts with ``client_key`` (16 to 64 hex
        characters, as ``duet-registry reports`` shows them); how many went."""
        if type(client_key) is not str or not _CLIENT_PREFIX.fullmatch(client_key):
            raise InvalidReport("a client key is 16 to 64 lowercase hex characters")
        condition = (
            reports.c.client_key == client_key
            if len(client_key) == 64
            else reports.c.client_key.startswith(client_key, autoescape=True)
        )
        async with self._writer.begin() as conn:
            done = await conn.execute(delete(reports).where(condition))
        return int(done.rowcount)

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    async def _load_salt(conn: AsyncConnection) -> bytes:
        """The database's report key, made on first use (one writer makes it; all read it)."""
        stmt = select(registry_settings.c.value).where(registry_settings.c.name == SALT_NAME)
        found = (await conn.execute(stmt)).scalar_one_or_none()
        if found is None:
            dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            await conn.execute(
                dialect_insert(registry_settings)
                .values(name=SALT_NAME, value=secrets.token_bytes(SALT_BYTES))
                .on_conflict_do_nothing()
            )
            found = (await conn.execute(stmt)).scalar_one()
        salt = bytes(found)
        if len(salt) < 16:
            raise RuntimeError("the registry's report key is too short")
        return salt

    def _warn_full(self, held: int) -> None:
        moment = time.monotonic()
        if moment - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = moment
            logger.warning(
                "%d reports held, the most kept: new reports are refused until some are "
                "dismissed (duet-registry reports)",
                held,
            )


def _report(row: Row[Any]) -> StoredReport:
    return StoredReport(
        report_id=row.report_id, listing_id=row.listing_id, reason=row.reason, text=row.text,
        created_at=row.created_at, client_key=row.client_key,
    )  # fmt: skip
