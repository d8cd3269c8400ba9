"""A standing host's persistent state: requests, decisions, admissions and quota counters.

A host serves many scientists for days, across restarts. Everything it must not forget
lives in one SQLite file, ``state.sqlite`` in the host's directory (0600, in a 0700
directory): every request and its decision, the value an accepted request releases while
its scientist is away (kept until ``keep_until``), which scientists are admitted, the
handlers' quota counters and a few host facts.

Every write is one transaction synced to disk before it returns (WAL, ``synchronous=FULL``),
so a decision is durable before it is acted on. Payloads of denied, expired, cancelled and
delivered requests are deleted in the transaction that decides so (``secure_delete``
zeroes the freed pages). Rows are validated when read back: a corrupted row is skipped with
a warning, never trusted.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from duet_p2p.errors import ConfigurationError, DuetError
from duet_p2p.host.sqlite_file import SqliteFile, init_schema

logger = logging.getLogger(__name__)

STATE_FILE = "state.sqlite"
SCHEMA_VERSION = 1
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
MAX_ID_CHARS = 200
MAX_NAME_CHARS = 1000
"""Longest handler name or host fact key."""
MAX_TEXT_CHARS = 100_000
MAX_JSON_CHARS = 1_000_000
MAX_LIMIT = 100_000
MAX_UNDECIDED_ADMISSIONS = 10_000
"""Scientists seen but not yet admitted or refused; the longest unseen are forgotten."""

PENDING, ACCEPTED, DENIED, EXPIRED, CANCELLED = (
    "pending", "accepted", "denied", "expired", "cancelled"
)  # fmt: skip
STATUSES = frozenset({PENDING, ACCEPTED, DENIED, EXPIRED, CANCELLED})
ADMISSIONS = frozenset({"admitted", "refused"})
_SURROGATE = re.compile("[\ud800-\udfff]")

_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT",
    """CREATE TABLE requests (
        seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, client_id TEXT NOT NULL,
        object_id TEXT NOT NULL, name TEXT NOT NULL, reason TEXT NOT NULL,
        lineage TEXT NOT NULL, ops TEXT NOT NULL, tags TEXT NOT NULL,
        size_bytes INTEGER NOT NULL, elements INTEGER NOT NULL, aggregation REAL NOT NULL,
        requested_at REAL NOT NULL, status TEXT NOT NULL, decided_by TEXT,
        decision_reason TEXT NOT NULL, decided_at REAL, error TEXT, checks TEXT NOT NULL,
        dp INTEGER NOT NULL, held INTEGER NOT NULL DEFAULT 0,
        module INTEGER NOT NULL DEFAULT 0, failure TEXT, keep_until REAL,
        delivered INTEGER NOT NULL DEFAULT 0) STRICT""",
    "CREATE INDEX requests_by_client ON requests (client_id, requested_at)",
    "CREATE INDEX requests_by_time ON requests (requested_at)",
    "CREATE INDEX requests_by_status ON requests (status)",
    "CREATE TABLE payloads (request_id TEXT PRIMARY KEY, data BLOB NOT NULL) STRICT",
    """CREATE TABLE admissions (
        client_id TEXT PRIMARY KEY, status TEXT, decided_by TEXT, decided_at REAL,
        note TEXT NOT NULL DEFAULT '', last_seen REAL) STRICT""",
    "CREATE TABLE handler_counts (name TEXT PRIMARY KEY, count INTEGER NOT NULL) STRICT",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT",
)
_COLUMNS = (
    "request_id, client_id, object_id, name, reason, lineage, ops, tags, size_bytes, elements, "
    "aggregation, requested_at, status, decided_by, decision_reason, decided_at, error, checks, "
    "dp, held, module, failure, keep_until, delivered"
)


@dataclass(frozen=True)
class StoredRequest:
    """One request as the host state holds it (validated when read)."""

    request_id: str
    client_id: str
    object_id: str
    name: str
    reason: str
    lineage: str
    ops: tuple[str, ...]
    tags: frozenset[str]
    size_bytes: int
    elements: int
    aggregation: float
    """May be inf (the value depends on no private data)."""
    requested_at: float
    status: str
    """pending, accepted, denied, expired or cancelled."""
    decided_by: str | None
    decision_reason: str
    decided_at: float | None
    error: str | None
    checks: tuple[str, ...]
    dp: bool
    """A differentially private release (not restored across restarts)."""
    has_value: bool
    """A payload or a held failure is stored."""
    module: bool
    """The payload is a module spec."""
    failure: dict[str, Any] | None
    """The held failure (when the computation failed), as JSON."""
    keep_until: float | None
    """An accepted value is freed after this."""
    delivered: bool


class HostState(SqliteFile):
    """The host's state in one SQLite file; every method is thread-safe.

    Each thread uses its own connection; writes are serialised by a lock and each is one
    synced transaction. :meth:`close` waits for calls in flight, then closes them all.
    """

    def __init__(self, path: Path, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int):
            raise TypeError("max_payload_bytes must be an int")
        if max_payload_bytes < 0:
            raise ValueError("max_payload_bytes must not be negative")
        super().__init__(path)
        limit = self._set_up(_init_schema)
        self.max_payload_bytes = min(max_payload_bytes, limit)

    @classmethod
    def open(cls, host_dir: Path, **options: Any) -> HostState:
        """The state of the host in ``host_dir`` (its ``state.sqlite``)."""
        return cls(Path(host_dir) / STATE_FILE, **options)

    # -- admissions --------------------------------------------------------------------

    def admission(self, client_id: str) -> str | None:
        """``"admitted"``, ``"refused"``, or None (never decided)."""
        client_id = _id(client_id, "client_id")
        with self._connection() as db:
            row = db.execute(
                "SELECT status FROM admissions WHERE client_id = ?", (client_id,)
            ).fetchone()
        if row is None or row[0] is None:
            return None
        if row[0] not in ADMISSIONS:
            logger.warning("ignoring a corrupted admission of %r", client_id)
            return None
        return row[0]

    def set_admission(self, client_id: str, status: str, *, by: str, note: str = "") -> None:
        """Admit or refuse ``client_id`` (keeps when they were last seen)."""
        client_id = _id(client_id, "client_id")
        if status not in ADMISSIONS:
            raise ValueError(f"an admission is one of {sorted(ADMISSIONS)}, not {status!r}")
        by, note = _text(by, "by"), _text(note, "note")
        with self._write() as db:
            db.execute(
                "INSERT INTO admissions (client_id, status, decided_by, decided_at, note) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE SET "
                "status = excluded.status, decided_by = excluded.decided_by, "
                "decided_at = excluded.decided_at, note = excluded.note",
                (client_id, status, by, time.time(), note),
            )

    def admissions(self) -> list[dict[str, Any]]:
        """Every scientist decided or seen, most recently seen first."""
        with self._connection() as db:
            rows = db.execute(
                "SELECT client_id, status, decided_by, decided_at, note, last_seen FROM admissions "
                "ORDER BY last_seen IS NULL, last_seen DESC, client_id"
            ).fetchall()
        found = []
        for client_id, status, by, at, note, seen in rows:
            if (
                not isinstance(client_id, str)
                or (status is not None and status not in ADMISSIONS)
                or not isinstance(by, str | None)
                or not isinstance(note, str)
                or not _is_time(at, optional=True)
                or not _is_time(seen, optional=True)
            ):
                logger.warning("skipping a corrupted admission row for %r", client_id)
                continue
            found.append({"client_id": client_id, "status": status, "decided_by": by,
                          "decided_at": at, "note": note, "last_seen": seen})  # fmt: skip
        return found

    def seen(self, client_id: str, at: float | None = None) -> None:
        """Record that ``client_id`` connected at ``at`` (default: now)."""
        client_id = _id(client_id, "client_id")
        at = _time(time.time() if at is None else at, "at")
        with self._write() as db:
            db.execute(
                "INSERT INTO admissions (client_id, last_seen) VALUES (?, ?) "
                "ON CONFLICT (client_id) DO UPDATE SET last_seen = excluded.last_seen",
                (client_id, at),
            )
            db.execute(
                "DELETE FROM admissions WHERE client_id IN (SELECT client_id FROM admissions "
                "WHERE status IS NULL ORDER BY last_seen DESC LIMIT -1 OFFSET ?)",
                (MAX_UNDECIDED_ADMISSIONS,),
            )

    # -- requests ----------------------------------------------------------------------

    def record_request(self, request: Any, *, dp: bool) -> None:
        """Store a request (a duet_p2p Request, read by its fields: ``requester`` is the
        client); a request already stored is left as it is."""
        if not isinstance(dp, bool):
            raise TypeError("dp must be a bool")
        row = _request_row(request, dp)
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO requests (request_id, client_id, object_id, name, reason, "
                "lineage, ops, tags, size_bytes, elements, aggregation, requested_at, status, "
                "decided_by, decision_reason, decided_at, error, checks, dp) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    def hold(
        self,
        request_id: str,
        *,
        payload: bytes | None,
        module: bool,
        failure: dict[str, Any] | None,
        size_bytes: int,
        elements: int,
        error: str | None,
        checks: tuple[str, ...],
    ) -> None:
        """Keep the computed value (``payload``) or the failure of a pending or accepted
        request; nothing is kept for one already denied, expired, cancelled or delivered.
        Raises KeyError for an unknown request."""
        request_id = _id(request_id, "request_id")
        if payload is not None:
            if not isinstance(payload, bytes | bytearray | memoryview):
                raise TypeError("payload must be bytes")
            payload = bytes(payload)
            if len(payload) > self.max_payload_bytes:
                raise ValueError(
                    f"the payload is {len(payload)} bytes; the host keeps at most "
                    f"{self.max_payload_bytes}"
                )
        if (payload is None) == (failure is None):
            raise ValueError("hold needs exactly one of payload and failure")
        failure_json = None if failure is None else _dump_failure(failure)
        values = (
            _count(size_bytes, "size_bytes"), _count(elements, "elements"),
            None if error is None else _text(error, "error"), _dump_strings(checks, "checks"),
            int(_flag(module, "module")), failure_json,
        )  # fmt: skip
        with self._write() as db:
            row = db.execute(
                "SELECT status, delivered FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is None:
                raise KeyError(request_id)
            if row[0] not in (PENDING, ACCEPTED) or row[1]:
                logger.debug("not holding the value of %s request %s", row[0], request_id)
                return
            db.execute(
                "UPDATE requests SET size_bytes = ?, elements = ?, error = ?, checks = ?, "
                "module = ?, failure = ?, held = 1 WHERE request_id = ?",
                (*values, request_id),
            )
            db.execute("DELETE FROM payloads WHERE request_id = ?", (request_id,))
            if payload is not None:
                db.execute("INSERT INTO payloads VALUES (?, ?)", (request_id, payload))

    def decide(
        self,
        request_id: str,
        *,
        status: str,
        decided_by: str,
        reason: str,
        decided_at: float,
        keep_until: float | None,
        overrule: bool = False,
    ) -> None:
        """Record a decision, durably. A denied, expired or cancelled request loses its
        payload in the same transaction; ``keep_until`` applies to an accepted one only.

        A request leaves pending once: deciding it again with the same status updates the
        decision's details, another status raises DuetError. Unknown: KeyError.
        ``overrule``: an accepted request may still end denied (a DP release whose budget
        debit failed)."""
        request_id = _id(request_id, "request_id")
        if status not in STATUSES - {PENDING}:
            raise ValueError(f"a decision is accepted, denied, expired or cancelled: {status!r}")
        values = (
            status, _text(decided_by, "decided_by"), _text(reason, "reason"),
            _time(decided_at, "decided_at"),
            None if status != ACCEPTED or keep_until is None else _time(keep_until, "keep_until"),
        )  # fmt: skip
        with self._write() as db:
            row = db.execute(
                "SELECT status FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is None:
                raise KeyError(request_id)
            allowed = (PENDING, status, ACCEPTED) if overrule and status == DENIED else (
                PENDING, status)  # fmt: skip
            if row[0] not in allowed:
                raise DuetError(f"request {request_id} was already {row[0]}")
            db.execute(
                "UPDATE requests SET status = ?, decided_by = ?, decision_reason = ?, "
                "decided_at = ?, keep_until = ? WHERE request_id = ?",
                (*values, request_id),
            )
            if status != ACCEPTED:
                _free(db, request_id)

    def delivered(self, request_id: str) -> None:
        """The scientist received the accepted value: its payload is deleted."""
        request_id = _id(request_id, "request_id")
        with self._write() as db:
            row = db.execute(
                "SELECT status FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is None:
                raise KeyError(request_id)
            if row[0] != ACCEPTED:
                raise DuetError(f"request {request_id} is {row[0]}, not accepted")
            db.execute("UPDATE requests SET delivered = 1 WHERE request_id = ?", (request_id,))
            _free(db, request_id)

    def payload(self, request_id: str) -> bytes | None:
        """The held payload, whatever the status (owner-side: preview, release)."""
        request_id = _id(request_id, "request_id")
        with self._connection() as db:
            row = db.execute(
                "SELECT data FROM payloads WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None or not isinstance(row[0], bytes) else row[0]

    def get(self, request_id: str) -> StoredRequest | None:
        """The request, or None (unknown, or its row is corrupted)."""
        request_id = _id(request_id, "request_id")
        found = self._select("WHERE request_id = ?", (request_id,))
        return found[0] if found else None

    def for_client(self, client_id: str, *, limit: int = 1000) -> list[StoredRequest]:
        """``client_id``'s requests, newest first."""
        client_id = _id(client_id, "client_id")
        return self._select(
            "WHERE client_id = ? ORDER BY requested_at DESC, seq DESC LIMIT ?",
            (client_id, _limit(limit)),
        )

    def claim(self, client_id: str, request_id: str) -> tuple[StoredRequest, bytes | None] | None:
        """A scientist asks for their request after reconnecting: the request, and its
        payload if it was accepted and is still kept. Another client's request is None,
        exactly as an unknown one. Call :meth:`delivered` once the value was sent."""
        client_id = _id(client_id, "client_id")
        request_id = _id(request_id, "request_id")
        inside = getattr(self._tx, "db", None) is not None  # a writer's transaction
        with self._connection() as db:
            if not inside:
                db.execute("BEGIN")  # one snapshot for the row and its payload
            try:
                found = self._select(
                    "WHERE request_id = ? AND client_id = ?", (request_id, client_id), db
                )
                if not found:
                    return None
                stored = found[0]
                if stored.status != ACCEPTED or stored.delivered or not stored.has_value:
                    return stored, None
                if stored.keep_until is not None and stored.keep_until <= time.time():
                    return replace(stored, has_value=False, failure=None), None
                row = db.execute(
                    "SELECT data FROM payloads WHERE request_id = ?", (request_id,)
                ).fetchone()
            finally:
                if not inside:
                    db.execute("COMMIT")
        return stored, None if row is None or not isinstance(row[0], bytes) else row[0]

    def pending(self) -> list[StoredRequest]:
        """Every pending request, oldest first (to restore them on restart)."""
        return self._select(
            "WHERE status = ? ORDER BY requested_at, seq LIMIT ?", (PENDING, MAX_LIMIT)
        )

    def all_requests(self, *, limit: int = 1000) -> list[StoredRequest]:
        """Every request, newest first."""
        return self._select("ORDER BY requested_at DESC, seq DESC LIMIT ?", (_limit(limit),))

    def free_expired(self, now: float | None = None) -> int:
        """Delete the values kept past their ``keep_until``; returns how many."""
        now = _time(time.time() if now is None else now, "now")
        with self._write() as db:
            ids = [row[0] for row in db.execute(
                "SELECT request_id FROM requests WHERE held = 1 AND keep_until IS NOT NULL "
                "AND keep_until <= ?", (now,),
            )]  # fmt: skip
            for request_id in ids:
                _free(db, request_id)
        return len(ids)

    def pending_bytes(self, client_id: str) -> int:
        """Bytes of values kept for ``client_id``'s pending requests."""
        client_id = _id(client_id, "client_id")
        with self._connection() as db:
            row = db.execute(
                "SELECT COALESCE(SUM(LENGTH(p.data)), 0) FROM payloads p JOIN requests r "
                "ON r.request_id = p.request_id WHERE r.client_id = ? AND r.status = ?",
                (client_id, PENDING),
            ).fetchone()
        return int(row[0])

    def prune_client(self, client_id: str, keep: int) -> int:
        """Forget ``client_id``'s oldest decided requests holding no value beyond the
        newest ``keep`` of theirs; returns how many."""
        client_id = _id(client_id, "client_id")
        keep = _limit(keep)
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests WHERE client_id = ? "
                "AND status != ? AND held = 0 ORDER BY seq DESC LIMIT -1 OFFSET ?)",
                (client_id, PENDING, keep),
            )  # fmt: skip
            return cursor.rowcount

    def prune(self, keep: int = 100_000) -> int:
        """Forget the oldest decided requests holding no value beyond the newest ``keep``
        (the audit log keeps them all); returns how many."""
        keep = _limit(keep) if keep > 0 else 0
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests WHERE status != ? "
                "AND held = 0 ORDER BY seq DESC LIMIT -1 OFFSET ?)", (PENDING, keep),
            )  # fmt: skip
            return cursor.rowcount

    def expire_dp_pending(self, reason: str) -> int:
        """Expire every pending DP request (its budget reservation did not survive the
        restart) and free its payload; returns how many."""
        reason = _text(reason, "reason")
        with self._write() as db:
            ids = [row[0] for row in db.execute(
                "SELECT request_id FROM requests WHERE status = ? AND dp = 1", (PENDING,)
            )]  # fmt: skip
            for request_id in ids:
                db.execute(
                    "UPDATE requests SET status = ?, decided_by = ?, decision_reason = ?, "
                    "decided_at = ? WHERE request_id = ?",
                    (EXPIRED, "host (restarted)", reason, time.time(), request_id),
                )
                _free(db, request_id)
        return len(ids)

    # -- handlers' quota counters ------------------------------------------------------

    def handler_count(self, name: str) -> int:
        """How many requests the handler ``name`` decided (0 if never)."""
        name = _id(name, "name", MAX_NAME_CHARS)
        with self._connection() as db:
            row = db.execute("SELECT count FROM handler_counts WHERE name = ?", (name,)).fetchone()
        if row is None:
            return 0
        if not isinstance(row[0], int) or row[0] < 0:
            raise ConfigurationError(f"{self.path}: the count of handler {name!r} is corrupted")
        return row[0]

    def set_handler_count(self, name: str, count: int) -> None:
        name = _id(name, "name", MAX_NAME_CHARS)
        count = _count(count, "count")
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO handler_counts VALUES (?, ?)", (name, count))

    # -- host facts --------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        key = _id(key, "key", MAX_NAME_CHARS)
        with self._connection() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row is not None and isinstance(row[0], str) else None

    def set_meta(self, key: str, value: str) -> None:
        key, value = _id(key, "key", MAX_NAME_CHARS), _text(value, "value")
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- lifetime ----------------------------------------------------------------------

    # -- internals ---------------------------------------------------------------------

    def _select(
        self, where: str, args: tuple[Any, ...], db: sqlite3.Connection | None = None
    ) -> list[StoredRequest]:
        query = f"SELECT {_COLUMNS} FROM requests {where}"
        if db is None:
            with self._connection() as own:
                rows = own.execute(query, args).fetchall()
        else:
            rows = db.execute(query, args).fetchall()
        found = []
        for row in rows:
            try:
                found.append(_parse(row))
            except (ValueError, TypeError, RecursionError) as exc:
                logger.warning("skipping corrupted request row %r: %s", row[0], exc)
        return found

    def record_decision(
        self,
        request: Any,
        *,
        dp: bool,
        keep_until: float | None,
        handler: tuple[str, int] | None = None,
        prune_to: int | None = None,
    ) -> None:
        """Store a decided request (inserted if it was never kept) and its decision, and a
        handler's quota counter, in one durable transaction; ``prune_to``: then keep at
        most that many of the scientist's decided requests (see ``prune_client``)."""
        with self._write():
            self.record_request(request, dp=dp)
            self.decide(
                request.request_id, status=str(request.status), decided_by=request.decided_by
                or "", reason=request.decision_reason, decided_at=request.decided_at
                or time.time(), keep_until=keep_until,
            )  # fmt: skip
            if handler is not None:
                self.set_handler_count(*handler)
            if prune_to is not None:
                self.prune_client(request.requester, prune_to)

    def keep(self, request: Any, *, dp: bool, payload: bytes | None, module: bool,
             failure: dict[str, Any] | None, prune_to: int | None = None) -> None:  # fmt: skip
        """Store a request still waiting for a decision with its value (or failure), in one
        transaction (see ``record_request`` and ``hold``)."""
        with self._write():
            self.record_request(request, dp=dp)
            self.hold(
                request.request_id, payload=payload, module=module, failure=failure,
                size_bytes=request.size_bytes, elements=request.elements, error=request.error,
                checks=tuple(request.checks),
            )  # fmt: skip
            if prune_to is not None:
                self.prune_client(request.requester, prune_to)


# -- the file --------------------------------------------------------------------------


def _init_schema(db: sqlite3.Connection, path: Path) -> None:
    init_schema(db, path, statements=_SCHEMA, version=SCHEMA_VERSION,
                tables=frozenset({"requests", "payloads", "admissions", "handler_counts", "meta"}), what="host state")  # fmt: skip


def _free(db: sqlite3.Connection, request_id: str) -> None:
    db.execute("DELETE FROM payloads WHERE request_id = ?", (request_id,))
    db.execute("UPDATE requests SET held = 0, failure = NULL WHERE request_id = ?", (request_id,))


# -- writing: validate what goes in ----------------------------------------------------


def _request_row(request: Any, dp: bool) -> tuple[Any, ...]:
    status = str(getattr(request, "status", PENDING))
    if status not in STATUSES:
        raise ValueError(f"unknown request status {status!r}")
    aggregation = getattr(request, "aggregation", None)
    if isinstance(aggregation, bool) or not isinstance(aggregation, int | float):
        raise TypeError("aggregation must be a number")
    if math.isnan(aggregation) or aggregation < 0:
        raise ValueError("aggregation must be a non-negative number (inf allowed)")
    decided_by = getattr(request, "decided_by", None)
    decided_at = getattr(request, "decided_at", None)
    error = getattr(request, "error", None)
    return (
        _id(request.request_id, "request_id"),
        _id(request.requester, "requester"),
        _id(request.object_id, "object_id"),
        _text(request.name, "name"),
        _text(request.reason, "reason"),
        _text(request.lineage, "lineage"),
        _dump_strings(request.ops, "ops"),
        _dump_strings(sorted(request.tags), "tags"),
        _count(request.size_bytes, "size_bytes"),
        _count(request.elements, "elements"),
        float(aggregation),
        _time(request.requested_at, "requested_at"),
        status,
        None if decided_by is None else _text(decided_by, "decided_by"),
        _text(getattr(request, "decision_reason", ""), "decision_reason"),
        None if decided_at is None else _time(decided_at, "decided_at"),
        None if error is None else _text(error, "error"),
        _dump_strings(getattr(request, "checks", ()), "checks"),
        int(dp),
    )


def _id(value: object, what: str, limit: int = MAX_ID_CHARS) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ValueError(f"{what} must be a string of 1 to {limit} characters")
    return _storable(value)


def _text(value: object, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string")
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    return _storable(value)


def _storable(value: str) -> str:
    """``value`` as UTF-8 can hold it (a lone surrogate becomes U+FFFD)."""
    return _SURROGATE.sub("\ufffd", value)


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int")
    if not 0 <= value < 1 << 63:
        raise ValueError(f"{what} must be a non-negative 64-bit int")
    return value


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool")
    return value


def _time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a time (float seconds)")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite")
    return float(value)


def _limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"limit must be an int from 1 to {MAX_LIMIT}")
    return value


def _dump_strings(values: object, what: str) -> str:
    if isinstance(values, str) or not isinstance(values, tuple | list | frozenset | set):
        raise TypeError(f"{what} must be a collection of strings")
    items = list(values)
    if not all(isinstance(item, str) for item in items):
        raise TypeError(f"{what} must hold strings only")
    return _dump(items, what)


def _dump_failure(failure: object) -> str:
    if not isinstance(failure, dict) or not all(isinstance(k, str) for k in failure):
        raise TypeError("failure must be a dict with string keys")
    return _dump(failure, "failure")


def _dump(value: object, what: str) -> str:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not plain JSON: {exc}") from None
    if len(text) > MAX_JSON_CHARS:
        raise ValueError(f"{what} is larger than {MAX_JSON_CHARS} characters as JSON")
    return text


# -- reading: trust nothing the file holds ---------------------------------------------


def _parse(row: tuple[Any, ...]) -> StoredRequest:
    (request_id, client_id, object_id, name, reason, lineage, ops, tags, size_bytes, elements,
     aggregation, requested_at, status, decided_by, decision_reason, decided_at, error, checks,
     dp, held, module, failure, keep_until, delivered) = row  # fmt: skip
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    if not isinstance(aggregation, float) or math.isnan(aggregation):
        raise ValueError("aggregation is not a number")
    for flag in (dp, held, module, delivered):
        if flag not in (0, 1):
            raise ValueError("a flag is neither 0 nor 1")
    return StoredRequest(
        request_id=_read_str(request_id),
        client_id=_read_str(client_id),
        object_id=_read_str(object_id),
        name=_read_str(name),
        reason=_read_str(reason),
        lineage=_read_str(lineage),
        ops=_read_strings(ops),
        tags=frozenset(_read_strings(tags)),
        size_bytes=_read_count(size_bytes),
        elements=_read_count(elements),
        aggregation=aggregation,
        requested_at=_read_time(requested_at),
        status=status,
        decided_by=None if decided_by is None else _read_str(decided_by),
        decision_reason=_read_str(decision_reason),
        decided_at=None if decided_at is None else _read_time(decided_at),
        error=None if error is None else _read_str(error),
        checks=_read_strings(checks),
        dp=bool(dp),
        has_value=bool(held),
        module=bool(module),
        failure=None if failure is None else _read_failure(failure),
        keep_until=None if keep_until is None else _read_time(keep_until),
        delivered=bool(delivered),
    )


def _read_str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("a text column holds no text")
    return value


def _read_count(value: object) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError("a count is not a non-negative int")
    return value


def _read_time(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("a time is not a finite number")
    return float(value)


def _is_time(value: object, *, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(value: object) -> object:
    if not isinstance(value, str) or len(value) > MAX_JSON_CHARS:
        raise ValueError("a JSON column is not text of a sane size")
    return json.loads(value)  # JSONDecodeError is a ValueError


def _read_strings(value: object) -> tuple[str, ...]:
    items = _read_json(value)
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError("a JSON list of strings was expected")
    return tuple(items)


def _read_failure(value: object) -> dict[str, Any]:
    failure = _read_json(value)
    if not isinstance(failure, dict):
        raise ValueError("a failure is not a JSON object")
    return failure
