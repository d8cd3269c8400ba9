"""Who may connect to a standing host: pending admissions, and the owner's decisions.

``admit="ask"`` (the default) holds each unknown scientist's offer as a pending admission
the owner accepts or refuses (``host.admissions[0].accept()``, ``duet-host admit ID``);
``admit=[client ids]`` admits those and refuses everyone else; ``admit="any"`` admits all.
Decisions are kept in the host's state, so an admitted scientist is not asked again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from duet_p2p.errors import DuetError
from duet_p2p.ids import normalise_id
from duet_p2p.table import Table, TableView, format_clock

ADMITTED, REFUSED, ASK = "admitted", "refused", "ask"


@dataclass(eq=False)
class Admission:
    """A scientist waiting to be let in; ``accept()`` or ``refuse(reason)``."""

    client_id: str
    requested_at: float
    _decide: Callable[[str, bool, str], None] = field(repr=False)

    def accept(self) -> None:
        self._decide(self.client_id, True, "")

    def refuse(self, reason: str = "") -> None:
        self._decide(self.client_id, False, reason)


class AdmissionPolicy:
    """The host's admission rule and its pending admissions (thread-safe)."""

    def __init__(
        self,
        admit: str | list[str] | tuple[str, ...],
        state: Any,
        audit: Any,
        *,
        max_pending: int = 32,
    ) -> None:
        if isinstance(admit, str):
            if admit not in ("ask", "any"):
                raise ValueError('admit must be "ask", "any" or a list of Client IDs')
            self.mode, self.listed = admit, frozenset[str]()
        else:
            self.mode = "list"
            self.listed = frozenset(normalise_id(c, what="Client ID") for c in admit)
        self._state = state
        self._audit = audit
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Admission, asyncio.Future[bool | None]]] = {}
        """Admissions with the one offer of theirs that waits (a newer offer replaces it)."""
        self.loop: asyncio.AbstractEventLoop | None = None

    def verdict(self, client_id: str) -> str:
        """ADMITTED, REFUSED, or ASK (the owner decides)."""
        stored = self._state.admission(client_id)
        if stored == ADMITTED or self.mode == "any" or client_id in self.listed:
            return ADMITTED
        if stored == REFUSED or self.mode == "list":
            return REFUSED
        return ASK

    async def ask(self, client_id: str, timeout: float) -> bool | None:
        """Wait for the owner's decision on ``client_id``: True, False, or None when none
        came within ``timeout``, a newer offer of the same Client ID replaced this one, or
        too many are waiting. An admission is pending only while an offer waits for it."""
        loop = asyncio.get_running_loop()
        self.loop = loop
        future: asyncio.Future[bool | None] = loop.create_future()
        with self._lock:
            entry = self._pending.get(client_id)
            if entry is None and len(self._pending) >= self._max_pending:
                return None
            if entry is None:
                admission = Admission(client_id, time.time(), self._decide)
                self._audit.event("admission_requested", client_id=client_id)
            else:
                admission = entry[0]
                _settle(entry[1], None)  # the older offer gives way
            self._pending[client_id] = (admission, future)
        stored = self._state.admission(client_id)  # decided between verdict() and now?
        if stored in (ADMITTED, REFUSED):
            _settle(future, stored == ADMITTED)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None
        finally:
            with self._lock:
                current = self._pending.get(client_id)
                if current is not None and current[1] is future:
                    del self._pending[client_id]

    def _decide(self, client_id: str, admitted: bool, reason: str) -> None:
        status = ADMITTED if admitted else REFUSED
        self._state.set_admission(client_id, status, by="owner", note=reason[:500])
        self._audit.event("admission", client_id=client_id, status=status)
        with self._lock:
            entry = self._pending.pop(client_id, None)
        if entry is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(_settle, entry[1], admitted)

    def admit(self, client_id: str) -> None:
        """Admit ``client_id`` now and from now on (pending or not)."""
        self._decide(normalise_id(client_id, what="Client ID"), True, "")

    def refuse(self, client_id: str, reason: str = "") -> None:
        """Refuse ``client_id`` now and from now on, until admitted."""
        self._decide(normalise_id(client_id, what="Client ID"), False, reason)

    def pending(self) -> list[Admission]:
        with self._lock:
            return [entry[0] for entry in self._pending.values()]

    def rows(self) -> list[dict[str, Any]]:
        """Pending admissions, then the decided ones (newest first)."""
        rows = [{"client_id": a.client_id, "status": "pending", "requested_at": a.requested_at,
                 "decided_at": None, "note": ""} for a in self.pending()]  # fmt: skip
        for row in self._state.admissions():
            rows.append({"client_id": row["client_id"], "status": row["status"],
                         "requested_at": None, "decided_at": row.get("decided_at"),
                         "note": row.get("note", "")})  # fmt: skip
        return rows


def _settle(future: asyncio.Future[bool | None], admitted: bool | None) -> None:
    if not future.done():
        future.set_result(admitted)


class AdmissionsView(TableView):
    """``host.admissions``: pending ones by index (``[0].accept()``), all as a table."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self._policy = policy

    def admit(self, client_id: str) -> None:
        self._policy.admit(client_id)

    def refuse(self, client_id: str, reason: str = "") -> None:
        self._policy.refuse(client_id, reason)

    def __len__(self) -> int:
        return len(self._policy.pending())

    def __getitem__(self, index: int | str) -> Admission:
        pending = self._policy.pending()
        if isinstance(index, str):
            for admission in pending:
                if admission.client_id == index:
                    return admission
            raise KeyError(f"no pending admission for {index!r}")
        try:
            return pending[index]
        except IndexError:
            raise DuetError(f"no pending admission at index {index}") from None

    def table(self) -> Table:
        rows = [[r["client_id"], r["status"], format_clock(r["requested_at"]),
                 format_clock(r["decided_at"]), r["note"]] for r in self._policy.rows()]  # fmt: skip
        return Table(["Client ID", "Status", "Asked", "Decided", "Note"], rows,
                     empty_text="No scientist has asked to connect.")  # fmt: skip
