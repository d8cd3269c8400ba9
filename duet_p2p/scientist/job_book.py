"""The scientist's own record of the jobs they submitted, kept on their machine.

``<data dir>/jobs/<Client ID>/<Job ID>/``: ``job`` (the signed job), ``state.json`` (the
host, the last state and reason heard, and how it was heard) and, once results arrived and
were verified, ``result`` (the host's result bundle). Files are 0600 in 0700 directories,
written whole (a temporary file renamed over the old one).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from duet_p2p.errors import DuetError
from duet_p2p.mailbox.known_keys import private_directory
from duet_p2p.offline.lifecycle import JobState, parse_state
from duet_p2p.offline.spec import SignedJob
from duet_p2p.paths import data_dir

__all__ = ["JobBook", "JobRecord"]

_ID = re.compile(r"[0-9a-f]{32}")
MAX_STATE_BYTES = 64 * 1024
MAX_REASON_CHARS = 2000


@dataclass(frozen=True)
class JobRecord:
    """What the scientist knows of one of their jobs."""

    job_id: str
    host_id: str
    signaling_url: str | None
    state: str
    reason: str
    updated_at: float
    progress: tuple[int, int] = (0, 0)
    submitted_via: str = "live"

    @property
    def job_state(self) -> JobState:
        return parse_state(self.state)


class JobBook:
    """One identity's jobs on this machine."""

    def __init__(self, client_id: str, directory: Path | None = None) -> None:
        if not _ID.fullmatch(client_id):
            raise ValueError("a Client ID is 32 lower-case hex digits")
        base = (directory or data_dir()) / "jobs"
        private_directory(base)
        self.root = private_directory(base / client_id)
        self.client_id = client_id

    def _dir(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
            raise KeyError(f"no job {str(job_id)[:64]!r}")
        return self.root / job_id

    def add(self, signed: SignedJob, record: JobRecord) -> None:
        folder = private_directory(self._dir(signed.job_id))
        _write(folder / "job", signed.to_wire())
        self.save(record)

    def save(self, record: JobRecord) -> None:
        folder = self._dir(record.job_id)
        _write(folder / "state.json", json.dumps(asdict(record)).encode())

    def update(self, job_id: str, *, state: str, reason: str, at: float,
               progress: tuple[int, int] | None = None) -> JobRecord | None:  # fmt: skip
        """Record a state heard from the host (an older notice never overrides a newer
        one; a job the scientist has collected stays collected)."""
        record = self.record(job_id)
        if record is None:
            return None
        if not isinstance(at, int | float) or not math.isfinite(at):
            return record
        if at < record.updated_at or record.state == JobState.DELIVERED and self.has_result(job_id):
            return record
        new = replace(record, state=str(parse_state(state)), reason=str(reason)[:MAX_REASON_CHARS],
                      updated_at=float(at), progress=progress or record.progress)  # fmt: skip
        self.save(new)
        return new

    def record(self, job_id: str) -> JobRecord | None:
        try:
            raw = (self._dir(job_id) / "state.json").read_bytes()[:MAX_STATE_BYTES]
            data = json.loads(raw)
            record = JobRecord(**{**data, "progress": tuple(data.get("progress", (0, 0)))})
            parse_state(record.state)
            if record.job_id != job_id or not math.isfinite(record.updated_at):
                return None
            return record
        except (OSError, ValueError, TypeError, KeyError, DuetError):
            return None

    def signed(self, job_id: str) -> SignedJob:
        return SignedJob.from_wire((self._dir(job_id) / "job").read_bytes())

    def ids(self) -> list[str]:
        """Job IDs, oldest first."""
        found = []
        for entry in self.root.iterdir():
            if _ID.fullmatch(entry.name) and (entry / "state.json").is_file():
                found.append((self._created(entry), entry.name))
        return [job_id for _, job_id in sorted(found)]

    @staticmethod
    def _created(folder: Path) -> float:
        try:
            return (folder / "job").stat().st_mtime
        except OSError:
            return time.time()

    def forget(self, job_id: str) -> None:
        """Remove a job's record (one never sent)."""
        folder = self._dir(job_id)
        for name in ("job", "state.json", "result"):
            (folder / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()

    def put_result(self, job_id: str, bundle: bytes) -> None:
        _write(self._dir(job_id) / "result", bundle)

    def result(self, job_id: str) -> bytes | None:
        try:
            return (self._dir(job_id) / "result").read_bytes()
        except OSError:
            return None

    def has_result(self, job_id: str) -> bool:
        return (self._dir(job_id) / "result").is_file()


def _write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
