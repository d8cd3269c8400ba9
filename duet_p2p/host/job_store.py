"""A standing host's offline jobs: each signed job, its state, its audit trail, its outputs.

Everything lives in ``jobs.sqlite`` in the host's directory, with the same care as
``state.sqlite`` (0600 in a 0700 directory, WAL, ``synchronous=FULL``, ``secure_delete``,
STRICT tables, a schema version, one connection per thread, every write one synced
transaction). A job is stored as the signed wire form it arrived in, checked when
submitted (signature, host, deadline, duplicates, quotas) and parsed again when read.

Every state change goes through :func:`duet_p2p.offline.lifecycle.check_transition` and is
appended to ``job_events`` (job, time, old state, new state, who, why) in the same
transaction: the job's audit trail. Outputs of a job are kept until it reaches a terminal
state (withheld, expired, ...), then deleted in that transaction; a delivered job's a while
longer (``free_finished``).

Never silently run twice: a run begins only through :meth:`JobStore.start_attempt`, which
counts ``attempts`` with the job RUNNING. After a restart,
:meth:`JobStore.recover_after_restart` fails every RUNNING job ("host restarted"), or, by
the owner's policy, re-queues one that has had fewer than ``MAX_ATTEMPTS`` runs (the trail
says so); ``start_attempt`` then takes it once more, and never again.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from duet_p2p.errors import ConfigurationError, DuetError
from duet_p2p.host.sqlite_file import SqliteFile, init_schema
from duet_p2p.offline import lifecycle
from duet_p2p.offline.lifecycle import OPEN, TERMINAL, InvalidTransition, JobState
from duet_p2p.offline.receipt import InvalidReceipt, Receipt, content_hash
from duet_p2p.offline.spec import MAX_LIFETIME_SECONDS, InvalidJob, SignedJob

logger = logging.getLogger(__name__)

JOBS_FILE = "jobs.sqlite"
SCHEMA_VERSION = 1
DEFAULT_MAX_OPEN_PER_CLIENT = 20
"""A scientist's jobs not yet in a terminal state."""
DEFAULT_MAX_JOBS_PER_CLIENT = 1000
DEFAULT_MAX_JOBS = 100_000
DEFAULT_MAX_OUTPUT_BYTES = 1 << 30
MAX_BY_CHARS = 200
MAX_REASON_CHARS = 4000
MAX_LINEAGE_CHARS = 100_000
MAX_RECEIPT_BYTES = 1 << 17
MAX_PROGRESS = 1 << 62
MAX_LIMIT = 100_000
HOST_RESTARTED = "host restarted"
MAX_CLOCK_SKEW = 300.0
"""Seconds a job may seem to come from the future (clocks differ)."""

_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT",
    """CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY, job_id TEXT NOT NULL UNIQUE, job_hash TEXT NOT NULL UNIQUE,
        client_id TEXT NOT NULL, wire BLOB NOT NULL, state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, submitted_at REAL NOT NULL,
        deadline REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL,
        finished_at REAL, released_at REAL, progress_done INTEGER NOT NULL DEFAULT 0,
        progress_total INTEGER NOT NULL DEFAULT 0, last_by TEXT NOT NULL,
        last_reason TEXT NOT NULL, receipt BLOB) STRICT""",
    "CREATE INDEX jobs_by_client ON jobs (client_id, seq)",
    "CREATE INDEX jobs_by_state ON jobs (state, deadline)",
    """CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY, job_id TEXT NOT NULL, at REAL NOT NULL, old TEXT,
        new TEXT NOT NULL, by TEXT NOT NULL, reason TEXT NOT NULL) STRICT""",
    "CREATE INDEX job_events_by_job ON job_events (job_id, seq)",
    """CREATE TABLE job_outputs (
        job_id TEXT NOT NULL, name TEXT NOT NULL, payload BLOB, sha256 TEXT NOT NULL,
        size_bytes INTEGER NOT NULL, lineage TEXT NOT NULL, elements INTEGER NOT NULL,
        aggregation REAL NOT NULL, stored_at REAL NOT NULL,
        PRIMARY KEY (job_id, name)) STRICT""",
    """CREATE TABLE job_requests (
        seq INTEGER PRIMARY KEY, job_id TEXT NOT NULL, name TEXT NOT NULL,
        request_id TEXT NOT NULL UNIQUE) STRICT""",
    "CREATE INDEX job_requests_by_job ON job_requests (job_id, seq)",
    """CREATE TABLE job_inputs (
        job_id TEXT NOT NULL, input_id TEXT NOT NULL, sha256 TEXT NOT NULL,
        PRIMARY KEY (job_id, input_id)) STRICT""",
    """CREATE TABLE job_notices (
        job_id TEXT PRIMARY KEY, state TEXT NOT NULL, at REAL NOT NULL) STRICT""",
)
_COLUMNS = (
    "job_id, job_hash, client_id, wire, state, attempts, submitted_at, deadline, updated_at, "
    "started_at, finished_at, released_at, progress_done, progress_total, last_by, "
    "last_reason, receipt"
)
_SWEPT = tuple(sorted(str(s) for s in OPEN - {JobState.RUNNING}))
_TERMINAL = tuple(sorted(str(s) for s in TERMINAL))


class DuplicateJob(DuetError):
    """A job with this ID or this content hash was submitted before."""


class JobQuotaExceeded(DuetError):
    """A cap on jobs (per scientist, in all) or on a job's results would be exceeded."""


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's audit trail."""

    job_id: str
    at: float
    old: JobState | None
    """None for the submission."""
    new: JobState
    by: str
    reason: str


@dataclass(frozen=True)
class StoredOutput:
    job_id: str
    name: str
    sha256: str
    """Of the payload: what the receipt attests."""
    size_bytes: int
    lineage: str
    elements: int
    aggregation: float
    stored_at: float
    payload: bytes | None
    """None once freed, or when not asked for."""


@dataclass(frozen=True)
class StoredJob:
    """A job as the store holds it; ``job`` parses (and re-verifies) its signed form."""

    job_id: str
    job_hash: str
    client_id: str
    wire: bytes = field(repr=False)
    state: JobState
    attempts: int
    submitted_at: float
    deadline: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    released_at: float | None
    progress: tuple[int, int]
    """(steps done, steps in all) of the current run."""
    last_by: str
    last_reason: str
    """Who made the last transition, and why (what the scientist is told)."""
    receipt: bytes | None = field(repr=False)

    @cached_property
    def job(self) -> SignedJob:
        """The signed job (InvalidJob if the stored form no longer matches this row)."""
        signed = SignedJob.from_wire(self.wire)
        if signed.hash() != self.job_hash or signed.job_id != self.job_id:
            raise InvalidJob(f"the stored form of job {self.job_id} does not match its row")
        return signed

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


class JobStore(SqliteFile):
    """The host's jobs in one SQLite file; every method is thread-safe.

    ``host_id``: refuse jobs addressed to another host. Caps: ``max_open_per_client`` jobs
    of one scientist not yet terminal, ``max_jobs_per_client`` and ``max_jobs`` rows (when
    full, terminal jobs past their deadline are forgotten first, oldest first; they can no
    longer be replayed, their deadline having passed), ``max_output_bytes`` per output.
    Unknown jobs raise KeyError.
    """

    what = "the host's job store"

    def __init__(
        self,
        path: Path,
        *,
        host_id: str | None = None,
        max_open_per_client: int = DEFAULT_MAX_OPEN_PER_CLIENT,
        max_jobs_per_client: int = DEFAULT_MAX_JOBS_PER_CLIENT,
        max_jobs: int = DEFAULT_MAX_JOBS,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        for name, value in (
            ("max_open_per_client", max_open_per_client), ("max_jobs", max_jobs),
            ("max_jobs_per_client", max_jobs_per_client), ("max_output_bytes", max_output_bytes),
        ):  # fmt: skip
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int")
        self.host_id = host_id
        self.max_open_per_client = max_open_per_client
        self.max_jobs_per_client = max_jobs_per_client
        self.max_jobs = max_jobs
        super().__init__(path)
        limit = self._set_up(_init_schema)
        self.max_output_bytes = min(max_output_bytes, limit)

    @classmethod
    def open(cls, host_dir: Path, **options: Any) -> JobStore:
        """The jobs of the host in ``host_dir`` (its ``jobs.sqlite``)."""
        return cls(Path(host_dir) / JOBS_FILE, **options)

    # -- submitting ----------------------------------------------------------------------

    def submit(self, signed_job: SignedJob | bytes, *, at: float | None = None) -> None:
        """Store a scientist's job as SUBMITTED. Refused: a bad signature, a job for another
        host or past its deadline (InvalidJob), one seen before (DuplicateJob), one over a
        cap (JobQuotaExceeded)."""
        if not isinstance(signed_job, SignedJob):
            signed_job = SignedJob.from_wire(signed_job)
        signed_job.verify(expected_host_id=self.host_id)
        spec = signed_job.spec
        now = _time(time.time() if at is None else at, "at")
        if spec.deadline <= now:
            raise InvalidJob(f"job {spec.job_id} is past its deadline")
        if spec.created_at > now + MAX_CLOCK_SKEW:
            raise InvalidJob(f"job {spec.job_id} was made in the future (check the clocks)")
        if spec.deadline > now + MAX_LIFETIME_SECONDS:
            raise InvalidJob(f"job {spec.job_id}'s deadline is more than "
                             f"{MAX_LIFETIME_SECONDS / 86400:g} days away")  # fmt: skip
        wire, job_hash = signed_job.to_wire(), signed_job.hash()
        with self._write() as db:
            row = db.execute(
                "SELECT job_id FROM jobs WHERE job_id = ? OR job_hash = ?",
                (spec.job_id, job_hash),
            ).fetchone()
            if row is not None:
                raise DuplicateJob(f"job {spec.job_id} was submitted before")
            self._make_room(db, spec.client_id, now)
            db.execute(
                "INSERT INTO jobs (job_id, job_hash, client_id, wire, state, submitted_at, "
                "deadline, updated_at, last_by, last_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (spec.job_id, job_hash, spec.client_id, wire, str(JobState.SUBMITTED), now,
                 spec.deadline, now, spec.client_id, "submitted"),
            )  # fmt: skip
            _event(db, spec.job_id, now, None, JobState.SUBMITTED, spec.client_id, "submitted")

    def _make_room(self, db: sqlite3.Connection, client_id: str, now: float) -> None:
        open_jobs = _scalar(
            db, f"SELECT COUNT(*) FROM jobs WHERE client_id = ? AND state NOT IN "
            f"({_marks(_TERMINAL)})", (client_id, *_TERMINAL),
        )  # fmt: skip
        if open_jobs >= self.max_open_per_client:
            raise JobQuotaExceeded(
                f"{client_id} has {open_jobs} jobs open; at most {self.max_open_per_client}"
            )
        for where, args, cap, who in (
            ("client_id = ?", (client_id,), self.max_jobs_per_client, f"{client_id}'s jobs"),
            ("1", (), self.max_jobs, "the host's jobs"),
        ):
            count = _scalar(db, f"SELECT COUNT(*) FROM jobs WHERE {where}", args)
            if count < cap:
                continue
            stale = [r[0] for r in db.execute(
                f"SELECT job_id FROM jobs WHERE {where} AND state IN ({_marks(_TERMINAL)}) "
                "AND deadline < ? ORDER BY seq LIMIT ?", (*args, *_TERMINAL, now, count - cap + 1),
            )]  # fmt: skip
            for job_id in stale:
                _forget(db, job_id)
            if count - len(stale) >= cap:
                raise JobQuotaExceeded(f"{who} are at their cap of {cap}")

    # -- moving through the lifecycle -------------------------------------------------

    def transition(
        self, job_id: str, new_state: JobState | str, *, by: str, reason: str = "",
        at: float | None = None,
    ) -> None:  # fmt: skip
        """Move a job to ``new_state`` (InvalidTransition if the lifecycle forbids it) and
        append the event. Moving to RUNNING claims the job for a run that has not begun
        (see :meth:`start_attempt`); a terminal state frees the job's outputs."""
        new = lifecycle.parse_state(new_state)
        by, reason = _text(by, "by", MAX_BY_CHARS, least=1), _text(reason, "reason")
        now = _time(time.time() if at is None else at, "at")
        with self._write() as db:
            old, _ = self._state_of(db, job_id)
            lifecycle.check_transition(old, new)
            _move(db, job_id, old, new, by=by, reason=reason, at=now)

    def start_attempt(self, job_id: str, *, by: str = "host", at: float | None = None) -> int:
        """The job's run begins now: QUEUED (or RUNNING, claimed, not yet begun) -> RUNNING,
        ``attempts`` counted, in one transaction. Refused (InvalidTransition) past the job's
        deadline, and once it has run ``MAX_ATTEMPTS`` times, or once unless a restart
        re-queued it; InvalidJob if its stored document no longer verifies. Returns the
        attempt number."""
        by = _text(by, "by", MAX_BY_CHARS, least=1)
        now = _time(time.time() if at is None else at, "at")
        with self._write() as db:
            old, attempts = self._state_of(db, job_id)
            requeued = attempts > 0 and old is JobState.QUEUED and self._requeued(db, job_id)
            if attempts >= lifecycle.MAX_ATTEMPTS or (attempts != 0 and not requeued):
                raise InvalidTransition(f"job {job_id} already ran once; it never runs again")
            if old is not JobState.RUNNING:
                lifecycle.check_transition(old, JobState.RUNNING)
            if self._job(db, job_id).spec.deadline <= now:  # and the stored job is intact
                raise InvalidTransition(f"job {job_id} is past its deadline")
            attempt = attempts + 1
            db.execute(
                "UPDATE jobs SET state = ?, attempts = ?, started_at = ?, progress_done = 0, "
                "progress_total = 0, updated_at = ?, last_by = ?, last_reason = ? "
                "WHERE job_id = ?",
                (str(JobState.RUNNING), attempt, now, now, by, "run started", job_id),
            )
            _event(db, job_id, now, old, JobState.RUNNING, by, f"run started (attempt {attempt})")
        return attempt

    @staticmethod
    def _requeued(db: sqlite3.Connection, job_id: str) -> bool:
        """Whether the job's last move was a restart's re-queue."""
        row = db.execute(
            "SELECT old, new, reason FROM job_events WHERE job_id = ? ORDER BY seq DESC LIMIT 1",
            (job_id,),
        ).fetchone()  # fmt: skip
        return row is not None and tuple(row[:2]) == (str(JobState.RUNNING), str(
            JobState.QUEUED)) and str(row[2]).startswith(HOST_RESTARTED)  # fmt: skip

    def recover_after_restart(
        self, requeue: bool = False, *, at: float | None = None
    ) -> list[tuple[str, JobState]]:
        """Settle the jobs a previous process left RUNNING: FAILED ("host restarted"), or
        with ``requeue`` (the owner's policy), QUEUED for one more run while it has had
        fewer than ``MAX_ATTEMPTS``; FINISHED ones go on to their output review. Call it
        once at start-up, before any run begins. Returns (job_id, new state) pairs."""
        now = _time(time.time() if at is None else at, "at")
        settled: list[tuple[str, JobState]] = []
        with self._write() as db:
            rows = db.execute(
                "SELECT job_id, attempts FROM jobs WHERE state = ? ORDER BY seq",
                (str(JobState.RUNNING),),
            ).fetchall()
            for job_id, attempts in rows:
                if requeue and 0 <= attempts < lifecycle.MAX_ATTEMPTS:
                    lifecycle.check_requeue(JobState.RUNNING, attempts)
                    new = JobState.QUEUED
                    why = (f"{HOST_RESTARTED} during attempt {attempts}; re-queued by the "
                           "owner's policy" if attempts else
                           f"{HOST_RESTARTED} before the run began; re-queued")  # fmt: skip
                else:
                    new, why = JobState.FAILED, HOST_RESTARTED
                _move(db, job_id, JobState.RUNNING, new, by="host", reason=why, at=now)
                settled.append((job_id, new))
            finished = db.execute("SELECT job_id FROM jobs WHERE state = ? ORDER BY seq",
                                  (str(JobState.FINISHED),)).fetchall()  # fmt: skip
            for (job_id,) in finished:
                _move(db, job_id, JobState.FINISHED, JobState.PENDING_OUTPUT_REVIEW, by="host",
                      reason=f"{HOST_RESTARTED}; the outputs await a decision", at=now)  # fmt: skip
                settled.append((job_id, JobState.PENDING_OUTPUT_REVIEW))
        return settled

    def expire_due(self, now: float | None = None) -> list[str]:
        """Expire every open job past its deadline, except RUNNING ones (whoever runs a job
        stops it, then expires it); returns their IDs."""
        now = _time(time.time() if now is None else now, "now")
        due = (f"SELECT job_id, state FROM jobs WHERE state IN ({_marks(_SWEPT)}) "
               "AND deadline <= ? ORDER BY seq")  # fmt: skip
        with self._connection() as db:  # a read first: most looks find nothing due
            if db.execute(due + " LIMIT 1", (*_SWEPT, now)).fetchone() is None:
                return []
        with self._write() as db:
            rows = db.execute(due, (*_SWEPT, now)).fetchall()
            for job_id, state in rows:
                _move(db, job_id, JobState(state), JobState.EXPIRED, by="host",
                      reason="deadline passed", at=now)  # fmt: skip
        return [row[0] for row in rows]

    def set_progress(self, job_id: str, done: int, total: int) -> None:
        """Steps done of the running job (not an audit event)."""
        for what, value in (("done", done), ("total", total)):
            if type(value) is not int or not 0 <= value <= MAX_PROGRESS:
                raise ValueError(f"{what} must be an int from 0 to {MAX_PROGRESS}")
        if done > total:
            raise ValueError("done cannot exceed total")
        with self._write() as db:
            state, _ = self._state_of(db, job_id)
            if state is not JobState.RUNNING:
                raise InvalidTransition(f"job {job_id} is {state}, not running")
            db.execute(
                "UPDATE jobs SET progress_done = ?, progress_total = ? WHERE job_id = ?",
                (done, total, job_id),
            )

    # -- outputs and receipts ---------------------------------------------------------

    def store_output(
        self, job_id: str, name: str, payload: bytes, lineage: str, elements: int,
        aggregation: float,
    ) -> None:  # fmt: skip
        """Keep one declared output of a running or finished job, once. Refused
        (JobQuotaExceeded) past the job's ``max_result_bytes`` or ``max_result_elements``
        (all its outputs together) or the store's ``max_output_bytes``."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError("payload must be bytes")
        payload = bytes(payload)
        lineage = _text(lineage, "lineage", MAX_LINEAGE_CHARS)
        if type(elements) is not int or not 0 <= elements < 1 << 63:
            raise ValueError("elements must be a non-negative 64-bit int")
        if type(aggregation) not in (int, float) or math.isnan(aggregation) or aggregation < 0:
            raise ValueError("aggregation must be a non-negative number (inf allowed)")
        if len(payload) > self.max_output_bytes:
            raise JobQuotaExceeded(f"an output is at most {self.max_output_bytes} bytes here")
        with self._write() as db:
            state, _ = self._state_of(db, job_id)
            if state not in (JobState.RUNNING, JobState.FINISHED,
                             JobState.PENDING_OUTPUT_REVIEW):  # fmt: skip
                raise InvalidTransition(f"job {job_id} is {state}; it stores no outputs now")
            spec = self._job(db, job_id).spec
            if type(name) is not str or name not in spec.outputs:
                raise ValueError(f"{str(name)[:64]!r} is not an output job {job_id} declared")
            used_bytes, used_elements, taken = db.execute(
                "SELECT COALESCE(SUM(size_bytes), 0), COALESCE(SUM(elements), 0), "
                "COALESCE(SUM(name = ?), 0) FROM job_outputs WHERE job_id = ?", (name, job_id),
            ).fetchone()  # fmt: skip
            if taken:
                raise DuplicateJob(f"output {name} of job {job_id} is stored already")
            if used_bytes + len(payload) > spec.max_result_bytes:
                raise JobQuotaExceeded(f"job {job_id}'s results exceed its max_result_bytes")
            if used_elements + elements > spec.max_result_elements:
                raise JobQuotaExceeded(f"job {job_id}'s results exceed its max_result_elements")
            db.execute(
                "INSERT INTO job_outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, payload, content_hash(payload), len(payload), lineage, elements,
                 float(aggregation), time.time()),
            )  # fmt: skip

    def set_requests(self, job_id: str, request_ids: dict[str, str]) -> None:
        """Remember the owner's request behind each declared output of a run (every run's
        are kept: a request of an earlier run stays a job's output)."""
        with self._write() as db:
            spec = self._job(db, job_id).spec
            for name, request_id in request_ids.items():
                if name not in spec.outputs or type(request_id) is not str:
                    raise ValueError(f"{str(name)[:64]!r} is not an output job {job_id} declared")
                db.execute("INSERT OR IGNORE INTO job_requests (job_id, name, request_id) "
                           "VALUES (?, ?, ?)",
                           (job_id, name, _text(request_id, "request_id", 64, least=1)))  # fmt: skip

    def requests(self, job_id: str, *, every_run: bool = False) -> dict[str, str]:
        """The owner's request behind each output of the job's last run, by output name
        (``every_run``: request ID -> output name, of all its runs)."""
        with self._connection() as db:
            rows = db.execute("SELECT name, request_id FROM job_requests WHERE job_id = ? "
                              "ORDER BY seq", (_key(job_id),)).fetchall()  # fmt: skip
        if every_run:
            return {str(rid): str(name) for name, rid in rows}
        return {str(name): str(rid) for name, rid in rows}

    def set_input_hashes(self, job_id: str, hashes: dict[str, str]) -> None:
        """The content hash of the dataset bound to each input, as the run began."""
        with self._write() as db:
            self._job(db, job_id)
            db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))
            for input_id, digest in hashes.items():
                db.execute("INSERT INTO job_inputs VALUES (?, ?, ?)",
                           (job_id, _text(input_id, "input_id", 64, least=1),
                            _text(digest, "sha256", 64, least=64)))  # fmt: skip

    def input_hashes(self, job_id: str) -> dict[str, str] | None:
        """What ``set_input_hashes`` kept (None: nothing was)."""
        with self._connection() as db:
            rows = db.execute("SELECT input_id, sha256 FROM job_inputs WHERE job_id = ?",
                              (_key(job_id),)).fetchall()  # fmt: skip
        return {str(i): str(h) for i, h in rows} or None

    def is_job_request(self, request_id: str) -> bool:
        """Whether ``request_id`` is the request behind a job's output."""
        if type(request_id) is not str or len(request_id) > 64:
            return False
        with self._connection() as db:
            row = db.execute("SELECT 1 FROM job_requests WHERE request_id = ? LIMIT 1",
                             (request_id,)).fetchone()  # fmt: skip
        return row is not None

    def noticed(self, job_id: str) -> str | None:
        """The last state its scientist was sent a notice of (None: none yet)."""
        with self._connection() as db:
            row = db.execute("SELECT state FROM job_notices WHERE job_id = ?",
                             (_key(job_id),)).fetchone()  # fmt: skip
        return row[0] if row is not None and isinstance(row[0], str) else None

    def unnoticed(self, states: Collection[JobState | str], *, limit: int = 100) -> list[StoredJob]:
        """Jobs in ``states`` whose scientist was not sent a notice of that state yet (nor
        of a later one), oldest change first."""
        chosen = sorted({str(lifecycle.parse_state(s)) for s in states})
        if not chosen:
            return []
        return self._select(
            f"WHERE state IN ({_marks(chosen)}) AND NOT EXISTS (SELECT 1 FROM job_notices n "
            "WHERE n.job_id = jobs.job_id AND (n.state = jobs.state OR n.state = ?)) "
            "ORDER BY updated_at LIMIT ?", (*chosen, str(JobState.DELIVERED), _limit(limit)),
        )  # fmt: skip

    def set_noticed(self, job_id: str, state: JobState | str) -> None:
        """Record that the job's scientist was sent a notice of ``state``."""
        state = lifecycle.parse_state(state)
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO job_notices VALUES (?, ?, ?)",
                       (_key(job_id), str(state), time.time()))  # fmt: skip

    def outputs(self, job_id: str, *, payloads: bool = True) -> list[StoredOutput]:
        """The job's outputs by name (payload None once freed or if not ``payloads``)."""
        job_id = _key(job_id)
        data = "payload" if payloads else "NULL"
        with self._connection() as db:
            rows = db.execute(
                f"SELECT job_id, name, sha256, size_bytes, lineage, elements, aggregation, "
                f"stored_at, {data} FROM job_outputs WHERE job_id = ? ORDER BY name", (job_id,),
            ).fetchall()  # fmt: skip
        found = []
        for row in rows:
            try:
                found.append(_parse_output(row))
            except (ValueError, TypeError) as exc:
                logger.warning("skipping a corrupted output of job %r: %s", job_id, exc)
        return found

    def free_outputs(self, job_id: str) -> int:
        """Delete the job's output payloads (their hashes and sizes stay); returns how many."""
        job_id = _key(job_id)
        with self._write() as db:
            return _free(db, job_id)

    def free_finished(self, delivered_before: float) -> int:
        """Free the output payloads of jobs delivered before ``delivered_before`` (kept
        until then in case a delivery was lost); returns how many were freed."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE job_outputs SET payload = NULL WHERE payload IS NOT NULL AND job_id IN "
                "(SELECT job_id FROM jobs WHERE state = ? AND updated_at < ?)",
                (str(JobState.DELIVERED), _time(delivered_before, "delivered_before")),
            )  # fmt: skip
            return cursor.rowcount

    def set_receipt(self, job_id: str, wire: bytes) -> None:
        """Keep the host's receipt of a released job (checked: it parses, it is for this
        job and, with ``host_id``, by this host)."""
        if not isinstance(wire, bytes) or len(wire) > MAX_RECEIPT_BYTES:
            raise InvalidReceipt(f"a receipt is at most {MAX_RECEIPT_BYTES} bytes")
        receipt = Receipt.from_wire(wire)
        if self.host_id is not None:
            receipt.verify(self.host_id)
        with self._write() as db:
            state, _ = self._state_of(db, job_id)
            if state not in (JobState.RELEASED, JobState.DELIVERED):
                raise InvalidTransition(f"job {job_id} is {state}; only a released job has one")
            receipt.check_job(self._job(db, job_id).spec)
            db.execute("UPDATE jobs SET receipt = ? WHERE job_id = ?", (wire, job_id))

    # -- reading -----------------------------------------------------------------------

    def get(self, job_id: str) -> StoredJob | None:
        """The job, or None (unknown, or its row is corrupted)."""
        found = self._select("WHERE job_id = ?", (_key(job_id),))
        return found[0] if found else None

    def for_client(
        self, client_id: str, *, limit: int = 1000, newest_first: bool = False
    ) -> list[StoredJob]:
        """``client_id``'s jobs, oldest first (or the newest first)."""
        order = "DESC" if newest_first else ""
        return self._select(
            f"WHERE client_id = ? ORDER BY seq {order} LIMIT ?", (_key(client_id), _limit(limit))
        )

    def all(
        self, states: Collection[JobState | str] | None = None, *, limit: int = 1000,
        newest_first: bool = False,
    ) -> list[StoredJob]:  # fmt: skip
        """Every job (in ``states``, if given), oldest first (or the newest first)."""
        order = "ORDER BY seq DESC" if newest_first else "ORDER BY seq"
        if states is None:
            return self._select(f"{order} LIMIT ?", (_limit(limit),))
        chosen = sorted({str(lifecycle.parse_state(s)) for s in states})
        if not chosen:
            return []
        return self._select(
            f"WHERE state IN ({_marks(chosen)}) {order} LIMIT ?", (*chosen, _limit(limit))
        )

    def events(self, job_id: str) -> list[JobEvent]:
        """The job's audit trail, in order."""
        job_id = _key(job_id)
        with self._connection() as db:
            rows = db.execute(
                "SELECT job_id, at, old, new, by, reason FROM job_events WHERE job_id = ? "
                "ORDER BY seq", (job_id,),
            ).fetchall()  # fmt: skip
        found = []
        for job, at, old, new, by, reason in rows:
            try:
                found.append(JobEvent(
                    job, _read_time(at), None if old is None else JobState(old), JobState(new),
                    _read_str(by), _read_str(reason),
                ))  # fmt: skip
            except (ValueError, TypeError) as exc:
                logger.warning("skipping a corrupted event of job %r: %s", job_id, exc)
        return found

    # -- lifetime ----------------------------------------------------------------------

    # -- internals ---------------------------------------------------------------------

    def _state_of(self, db: sqlite3.Connection, job_id: str) -> tuple[JobState, int]:
        row = db.execute(
            "SELECT state, attempts FROM jobs WHERE job_id = ?", (_key(job_id),)
        ).fetchone()
        if row is None:
            raise KeyError(job_id)
        state, attempts = row
        if type(attempts) is not int or not 0 <= attempts <= lifecycle.MAX_ATTEMPTS:
            raise ConfigurationError(f"{self.path}: job {job_id} has a corrupted attempt count")
        try:
            return JobState(state), attempts
        except ValueError:
            raise ConfigurationError(f"{self.path}: job {job_id} has a corrupted state") from None

    def _job(self, db: sqlite3.Connection, job_id: str) -> SignedJob:
        row = db.execute(
            "SELECT job_hash, wire FROM jobs WHERE job_id = ?", (_key(job_id),)
        ).fetchone()
        if row is None:
            raise KeyError(job_id)
        signed = SignedJob.from_wire(row[1])
        if signed.hash() != row[0] or signed.job_id != job_id:
            raise InvalidJob(f"the stored form of job {job_id} does not match its row")
        return signed

    def _select(self, where: str, args: tuple[Any, ...]) -> list[StoredJob]:
        with self._connection() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM jobs {where}", args).fetchall()
        found = []
        for row in rows:
            try:
                found.append(_parse_job(row))
            except (ValueError, TypeError) as exc:
                logger.warning("skipping corrupted job row %r: %s", row[0], exc)
        return found


# -- writing helpers ---------------------------------------------------------------------


def _move(
    db: sqlite3.Connection, job_id: str, old: JobState, new: JobState, *, by: str, reason: str,
    at: float,
) -> None:  # fmt: skip
    """Record a checked transition and its event; free outputs on a terminal state (a
    delivered job's are kept a while: ``free_finished``)."""
    times = ""
    if old is JobState.RUNNING and (new is JobState.FINISHED or new in TERMINAL):
        times = ", finished_at = :at"
    elif new is JobState.RELEASED:
        times = ", released_at = :at"
    db.execute(
        f"UPDATE jobs SET state = :new, updated_at = :at, last_by = :by, last_reason = :reason"
        f"{times} WHERE job_id = :job_id",
        {"new": str(new), "at": at, "by": by, "reason": reason, "job_id": job_id},
    )
    _event(db, job_id, at, old, new, by, reason)
    if new in TERMINAL and new is not JobState.DELIVERED:
        _free(db, job_id)


def _event(
    db: sqlite3.Connection, job_id: str, at: float, old: JobState | None, new: JobState,
    by: str, reason: str,
) -> None:  # fmt: skip
    db.execute(
        "INSERT INTO job_events (job_id, at, old, new, by, reason) VALUES (?, ?, ?, ?, ?, ?)",
        (job_id, at, None if old is None else str(old), str(new), by, reason),
    )


def _free(db: sqlite3.Connection, job_id: str) -> int:
    cursor = db.execute(
        "UPDATE job_outputs SET payload = NULL WHERE job_id = ? AND payload IS NOT NULL",
        (job_id,),
    )
    return cursor.rowcount


def _forget(db: sqlite3.Connection, job_id: str) -> None:
    """Delete a job, its outputs and its events (the host's audit log keeps them)."""
    for table in ("job_outputs", "job_events", "job_inputs", "job_notices", "jobs"):
        db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))


def _scalar(db: sqlite3.Connection, query: str, args: tuple[Any, ...]) -> Any:
    row = db.execute(query, args).fetchone()
    if row is None:
        raise KeyError(args[0] if args else query)
    return row[0]


def _marks(values: Collection[Any]) -> str:
    return ", ".join("?" for _ in values)


def _key(value: object) -> str:
    if type(value) is not str or not 0 < len(value) <= 64:
        raise KeyError(value if isinstance(value, str) else repr(value))
    return value


def _text(value: object, what: str, limit: int = MAX_REASON_CHARS, *, least: int = 0) -> str:
    if type(value) is not str or not least <= len(value) <= limit:
        raise ValueError(f"{what} must be text of {least} to {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode") from None
    return value


def _time(value: object, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"{what} must be a finite unix time")
    return float(value)  # type: ignore[arg-type]


def _limit(value: object) -> int:
    if type(value) is not int or not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"limit must be an int from 1 to {MAX_LIMIT}")
    return value


# -- the file ----------------------------------------------------------------------------


def _init_schema(db: sqlite3.Connection, path: Path) -> None:
    init_schema(db, path, statements=_SCHEMA, version=SCHEMA_VERSION,
                tables=frozenset({"jobs", "job_events", "job_outputs", "job_requests",
                                      "job_inputs", "job_notices"}), what="job")  # fmt: skip


# -- reading: trust nothing the file holds -------------------------------------------------


def _parse_job(row: tuple[Any, ...]) -> StoredJob:
    (job_id, job_hash, client_id, wire, state, attempts, submitted_at, deadline, updated_at,
     started_at, finished_at, released_at, done, total, last_by, last_reason,
     receipt) = row  # fmt: skip
    if type(wire) is not bytes or (receipt is not None and type(receipt) is not bytes):
        raise TypeError("a blob column holds no bytes")
    if type(attempts) is not int or not 0 <= attempts <= lifecycle.MAX_ATTEMPTS:
        raise ValueError("a corrupted attempt count")
    return StoredJob(
        job_id=_read_str(job_id), job_hash=_read_str(job_hash), client_id=_read_str(client_id),
        wire=wire, state=JobState(state), attempts=attempts,
        submitted_at=_read_time(submitted_at), deadline=_read_time(deadline),
        updated_at=_read_time(updated_at), started_at=_read_time(started_at, optional=True),
        finished_at=_read_time(finished_at, optional=True),
        released_at=_read_time(released_at, optional=True),
        progress=(_read_count(done), _read_count(total)), last_by=_read_str(last_by),
        last_reason=_read_str(last_reason), receipt=receipt,
    )  # fmt: skip


def _parse_output(row: tuple[Any, ...]) -> StoredOutput:
    job_id, name, sha256, size_bytes, lineage, elements, aggregation, stored_at, payload = row
    if payload is not None and type(payload) is not bytes:
        raise TypeError("a payload is not bytes")
    if type(aggregation) is not float or math.isnan(aggregation):
        raise ValueError("aggregation is not a number")
    return StoredOutput(
        job_id=_read_str(job_id), name=_read_str(name), sha256=_read_str(sha256),
        size_bytes=_read_count(size_bytes), lineage=_read_str(lineage),
        elements=_read_count(elements), aggregation=aggregation,
        stored_at=_read_time(stored_at), payload=payload,
    )  # fmt: skip


def _read_str(value: object) -> str:
    if type(value) is not str:
        raise TypeError("a text column holds no text")
    return value


def _read_count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("a count is not a non-negative int")
    return value


def _read_time(value: object, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError("a time is not a finite number")
    return float(value)  # type: ignore[arg-type]
