"""The owner's audit log: an append-only JSON Lines file of actions, requests, decisions and
releases.

Entries hold IDs, op paths, sizes and hashes, never values: anything that is not a plain
string, number, bool or a small container of those is written as ``"<TypeName>"``. Each
entry is flushed as soon as it is written, so the file is complete up to the last event
even if the process dies.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import IO, Any

from duet_p2p.paths import data_dir
from duet_p2p.permissions.facts import RequestFacts
from duet_p2p.table import Table, TableView

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 10_000
_MAX_ITEMS = 1000
_MAX_DEPTH = 4


def default_audit_path() -> Path:
    """``audit/duet_audit_<YYYYmmdd-HHMMSS>_<pid>.jsonl`` in the data directory
    (``$DUET_HOME`` or the per-user one; created 0700), never the working directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = data_dir() / "audit"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"duet_audit_{stamp}_{os.getpid()}.jsonl"


class AuditLog(TableView):
    """Append-only JSON Lines log; thread-safe; the file is created on the first entry."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, fsync: bool = False) -> None:
        """``path=None`` picks a fresh file in the data directory (see default_audit_path);
        an existing file is appended to. ``fsync=True`` also forces each entry to disk."""
        self.path = Path(path) if path is not None else default_audit_path()
        self.fsync = fsync
        self._lock = threading.Lock()
        self._file: IO[str] | None = None

    # --- entries ----------------------------------------------------------------------

    def action(
        self, op: str, inputs: Sequence[str], result: str, ok: bool, error_type: str | None = None
    ) -> None:
        """An op the peer ran (or tried to run): its path, input IDs and result ID."""
        self.actions([(op, inputs, result, ok, error_type)])

    def actions(self, entries: Sequence[tuple[str, Sequence[str], str, bool, str | None]]) -> None:
        """Several ``action`` entries (op, inputs, result, ok, error_type), in one write."""
        now = _utc_now()
        dumps = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode
        lines = [
            dumps({"ts": now, "event": "action", "op": str(op), "inputs": [str(i) for i in inputs],
                   "result": str(result), "ok": bool(ok),
                   "error_type": None if error_type is None else str(error_type)})
            for op, inputs, result, ok, error_type in entries
        ]  # fmt: skip
        self._append(lines)

    def request(self, request: RequestFacts) -> None:
        """A request arrived."""
        self._write(
            "request",
            request_id=request.request_id,
            object_id=request.object_id,
            name=request.name,
            reason=request.reason,
            lineage=request.lineage,
            ops=list(request.ops),
            tags=sorted(request.tags),
            size_bytes=request.size_bytes,
            elements=request.elements,
            aggregation=request.aggregation,
            requester=request.requester,
        )

    def decision(self, request: RequestFacts) -> None:
        """A request left PENDING: accepted, denied, expired or cancelled, and by whom."""
        self._write(
            "decision",
            request_id=request.request_id,
            status=request.status,
            decided_by=request.decided_by,
            reason=request.decision_reason,
        )

    def release(self, object_id: str, request_id: str | None, nbytes: int, sha256: str) -> None:
        """Bytes left the owner's process: what, for which request, and their SHA-256."""
        self._write(
            "release", object_id=object_id, request_id=request_id, nbytes=nbytes, sha256=sha256
        )

    def event(self, kind: str, **fields: Any) -> None:
        """Any other event (connect, disconnect, ...) with plain fields."""
        self._write(kind, **fields)

    def _write(self, event: str, **fields: Any) -> None:
        self._append([self._line(event, **fields)])

    def _line(self, event: str, **fields: Any) -> str:
        entry: dict[str, Any] = {"ts": _utc_now(), "event": str(event)}
        for key, value in fields.items():
            if key not in entry:
                entry[key] = _plain(value, 0)
        return json.dumps(entry, ensure_ascii=True, allow_nan=False, separators=(",", ":"))

    def _append(self, lines: list[str]) -> None:
        if not lines:
            return
        with self._lock:
            if self._file is None:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._file = os.fdopen(fd, "a", encoding="utf-8")
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())

    # --- reading back -----------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Every entry in the file, oldest first (unreadable lines are skipped)."""
        with self._lock:
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return []
        result: list[dict[str, Any]] = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                logger.warning("skipping unreadable line %d of %s", number, self.path)
                continue
            if isinstance(entry, dict):
                result.append(entry)
        return result

    def table(self, limit: int = 50) -> Table:
        """The last ``limit`` entries as a Table (time, event, summary)."""
        entries = self.entries()[-limit:] if limit > 0 else []
        rows = [[e.get("ts", ""), e.get("event", ""), _summary(e)] for e in entries]
        return Table(
            ["Time (UTC)", "Event", "Summary"],
            rows,
            title=f"Audit log {self.path}",
            empty_text="The audit log is empty.",
            max_cell_chars=100,
        )

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: Any, depth: int) -> Any:
    """``value`` reduced to JSON: plain scalars and small containers; anything else by type."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, Enum):
        return _plain(value.value, depth)
    if isinstance(value, str):
        return value[:MAX_TEXT_CHARS]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < _MAX_DEPTH and isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_plain(v, depth + 1) for v in list(items)[:_MAX_ITEMS]]
    if depth < _MAX_DEPTH and isinstance(value, dict):
        pairs = list(value.items())[:_MAX_ITEMS]
        return {str(k)[:200]: _plain(v, depth + 1) for k, v in pairs}
    return f"<{type(value).__name__}>"


def _summary(entry: dict[str, Any]) -> str:
    event = entry.get("event")
    get = entry.get
    if event == "request":
        return f"{get('name')} {get('request_id')} from {get('requester') or '?'}: {get('lineage')}"
    if event == "decision":
        return f"{get('request_id')} {get('status')} by {get('decided_by')}"
    if event == "release":
        return f"{get('object_id')} {get('nbytes')} B sha256={str(get('sha256'))[:16]}"
    if event == "action":
        outcome = "ok" if get("ok") else f"failed ({get('error_type')})"
        return f"{get('op')} -> {get('result')} {outcome}"
    return ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("ts", "event"))
