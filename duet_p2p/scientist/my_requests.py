"""``duet.requests`` on the scientist's side: their own requests, as the owner keeps them.

On a standing host this reaches back over earlier sessions: a scientist who reconnects sees
what they asked, what was decided while they were away, and fetches an accepted value
with ``duet.requests[i].get()`` while the host still keeps it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from duet_p2p.errors import ProtocolError
from duet_p2p.scientist.protocol import SessionCore
from duet_p2p.table import Table, TableView, format_clock, format_size, uid_label
from duet_p2p.text import printable

_ID = re.compile(r"[0-9a-zA-Z_-]{1,64}")
_STATUSES = ("pending", "accepted", "denied", "expired", "cancelled")
MAX_ROWS = 1000


@dataclass(frozen=True)
class PastRequest:
    """One of the scientist's requests: its status, and ``get()`` for an accepted value."""

    request_id: str
    name: str
    reason: str
    status: str
    requested_at: float | None
    decided_at: float | None
    decision_reason: str
    dp: bool
    size_bytes: int | None
    kept: bool
    """The owner still keeps the accepted value for this scientist to fetch."""
    _core: Any = None

    def get(self, timeout: float | None = 60.0, max_bytes: int | None = None) -> Any:
        """The accepted value (fetched from the owner, who then frees it)."""
        core: SessionCore = self._core
        return core.sync(core.fetch_release(self.request_id, max_bytes, timeout))

    def __repr__(self) -> str:
        return f"<PastRequest {self.request_id[:8]} {self.name} {self.status}>"


class MyRequests(TableView):
    """The scientist's requests on this owner, newest first (a fresh list on each access)."""

    def __init__(self, core: SessionCore) -> None:
        self._core = core
        self._rows = [_row(entry, core) for entry in _entries(core.sync(core.my_requests()))]

    def get(self, request_id: str, timeout: float | None = 60.0) -> Any:
        """The value of the accepted request ``request_id``."""
        return self[request_id].get(timeout)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Any:
        return iter(self._rows)

    def __getitem__(self, key: int | str) -> PastRequest:
        if isinstance(key, str):
            bare = key.strip().removeprefix("<UID:").removesuffix(">")
            for row in self._rows:
                if row.request_id == bare:
                    return row
            raise KeyError(f"no request of yours with ID {key!r}")
        return self._rows[key]

    def table(self) -> Table:
        rows = [
            [uid_label(r.request_id), r.name, r.reason, r.status,
             format_clock(r.requested_at), format_clock(r.decided_at), r.decision_reason,
             "" if r.size_bytes is None else format_size(r.size_bytes),
             "yes" if r.kept else ""]
            for r in self._rows
        ]  # fmt: skip
        columns = ["Request ID", "Name", "Reason", "Status", "Requested", "Decided", "Note",
                   "Size", "Kept"]  # fmt: skip
        return Table(columns, rows, empty_text="You have made no requests here.")


def _entries(reply: Any) -> list[dict[str, Any]]:
    if not isinstance(reply, list) or len(reply) > MAX_ROWS:
        raise ProtocolError("the owner sent a malformed list of requests")
    return [entry for entry in reply if isinstance(entry, dict)]


def _row(entry: dict[str, Any], core: SessionCore) -> PastRequest:
    request_id = entry.get("request_id")
    status = entry.get("status")
    if not isinstance(request_id, str) or not _ID.fullmatch(request_id) or status not in _STATUSES:
        raise ProtocolError("the owner sent a malformed request entry")
    return PastRequest(
        request_id=request_id,
        name=printable(str(entry.get("name", "")), 200),
        reason=printable(str(entry.get("reason", "")), 4000),
        status=status,
        requested_at=_time(entry.get("requested_at")),
        decided_at=_time(entry.get("decided_at")),
        decision_reason=printable(str(entry.get("decision_reason", "")), 4000),
        dp=entry.get("dp") is True,
        size_bytes=_size(entry.get("size_bytes")),
        kept=entry.get("kept") is True,
        _core=core,
    )


def _time(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e11:
        return float(value)
    return None


def _size(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62:
        return value
    return None
