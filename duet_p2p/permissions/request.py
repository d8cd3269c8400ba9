"""Requests to release a value, and the owner's queue of them.

A scientist's get on a private value becomes a Request in the owner's RequestQueue.
Handlers (policy.py) may decide it at once; otherwise it waits for the owner, who lists,
previews, accepts or denies from a notebook thread while the session's event-loop thread
submits, cancels and expires requests. Every request leaves PENDING exactly once, and the
queue then calls ``on_decision`` (outside its lock) so the session sends the value or the
denial.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, overload

from duet_p2p.errors import DuetError
from duet_p2p.permissions.audit import AuditLog
from duet_p2p.permissions.policy import Action, Handler, HandlerList, as_tags
from duet_p2p.table import (
    Table,
    TableView,
    format_clock,
    format_size,
    safe_text,
    uid_label,
)
from duet_p2p.text import printable

logger = logging.getLogger(__name__)

MAX_REASON_CHARS = 1000
"""Longest reason kept from the scientist (longer text is cut)."""
DEFAULT_MAX_PENDING = 1000
"""Pending requests beyond this are denied at once, so a peer cannot flood the owner."""
DEFAULT_MAX_HISTORY = 10_000
"""Decided requests kept for ``all()``; the oldest are forgotten first (the audit log keeps all)."""


@dataclass
class DPRelease:
    """What a differentially private request releases and what it costs."""

    statistic: str
    query: str
    """The query as the owner reads it, e.g. ``dp.mean(ages['age'], bounds=(0, 100), ...)``."""
    epsilon: float
    delta: float
    budget_before: dict[str, tuple[float, float]]
    """(epsilon, delta) left on each budgeted dataset before this release."""
    noise: str = ""
    """How the value is protected (set once computed), e.g. ``"Laplace, scale 200"``."""

    def budget_rows(self) -> list[tuple[str, str]]:
        rows = []
        for dataset, (epsilon, delta) in sorted(self.budget_before.items()):
            after = (max(0.0, epsilon - self.epsilon), max(0.0, delta - self.delta))
            rows.append((f"Budget {dataset}", f"epsilon {epsilon:g} -> {after[0]:g}, "
                                              f"delta {delta:g} -> {after[1]:g}"))  # fmt: skip
        return rows


class RequestStatus(StrEnum):
    """Where a request stands; it leaves PENDING exactly once."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


@dataclass(eq=False, repr=False)
class Request:
    """One get waiting for (or past) a decision, with what the owner needs to judge it."""

    request_id: str
    object_id: str
    name: str
    """Computed by the owner from the lineage (e.g. ``"sum"``), never taken from the scientist."""
    reason: str
    """The scientist's text: untrusted, cut to MAX_REASON_CHARS."""
    lineage: str
    """The expression that produced the value, e.g. ``data.sum().item()``."""
    ops: tuple[str, ...]
    """Every op path in the lineage, oldest first."""
    tags: frozenset[str]
    """Tags of the owner's stored objects the value derives from."""
    size_bytes: int
    elements: int
    aggregation: float
    """The fewest private elements each released value summarises (inf: no private data)."""
    requested_at: float = field(default_factory=time.time)
    requester: str = ""
    """The scientist's Client ID."""
    status: RequestStatus = RequestStatus.PENDING
    decided_by: str | None = None
    """``"owner"``, ``"handler #<n> (<summary>)"``, or the queue's own limit."""
    decision_reason: str = ""
    decided_at: float | None = None
    handler: Handler | None = None
    """The handler that decided, if any (the session reads its print_local/log_local)."""
    ready: bool = True
    """False while the value is still being computed: handlers wait, the owner may decide."""
    error: str | None = None
    """Set when the computation failed: what failed (owner-side only; the scientist learns
    of the failure only if the request is accepted)."""
    dp: DPRelease | None = None
    """Set on a differentially private release: handlers match it by ``dp=True``."""
    checks: tuple[str, ...] = ()
    """Disclosure checks that fired on this exact release (accept handlers skip it)."""
    _preview: Callable[[], Any] | None = None
    _queue: RequestQueue | None = None

    def __post_init__(self) -> None:
        self.reason = _cap(self.reason)
        self.ops = tuple(str(op) for op in self.ops)
        self.tags = frozenset(str(tag) for tag in self.tags)
        self.size_bytes = int(self.size_bytes)
        self.elements = int(self.elements)
        self.aggregation = float(self.aggregation)
        self.status = RequestStatus(self.status)

    @property
    def pending(self) -> bool:
        return self.status is RequestStatus.PENDING

    def preview(self) -> Any:
        """The value this request would release, shown owner-side only."""
        if self._preview is None:
            raise DuetError(f"request {uid_label(self.request_id)} has no local value to preview")
        return self._preview()

    def accept(self) -> None:
        """Release the value to the scientist."""
        self._require_queue().accept(self.request_id)

    def deny(self, reason: str = "") -> None:
        """Refuse the request; ``reason`` is sent to the scientist."""
        self._require_queue().deny(self.request_id, reason=reason)

    def _require_queue(self) -> RequestQueue:
        if self._queue is None:
            raise DuetError(f"request {uid_label(self.request_id)} is not in a request queue")
        return self._queue

    def _details(self) -> list[tuple[str, str]]:
        noun = "element" if self.elements == 1 else "elements"
        if self.dp is not None:
            aggregation = f"differentially private ({self.dp.noise or 'being computed'})"
        elif math.isinf(self.aggregation):
            aggregation = "depends on no private data"
        else:
            aggregation = f"each value summarises >= {self.aggregation:g} records"
        rows = [
            ("Request ID", uid_label(self.request_id)),
            ("Status", self.status.value),
            ("Lineage", self.lineage),
            ("Ops", ", ".join(self.ops)),
            ("Reason", printable(self.reason, MAX_REASON_CHARS)),
            ("Requester", self.requester),
            ("Object ID", uid_label(self.object_id)),
            ("Size", f"{format_size(self.size_bytes)} ({self.elements} {noun})"),
            ("Aggregation", aggregation),
            ("Tags", ", ".join(sorted(self.tags))),
            ("Requested at", format_clock(self.requested_at)),
        ]
        if self.dp is not None:
            rows[4:4] = [("Privacy loss", f"epsilon {self.dp.epsilon:g}, delta {self.dp.delta:g}"),
                         *self.dp.budget_rows()]  # fmt: skip
        checks = list(self.checks)
        floor = self._queue.min_aggregation if self._queue is not None else 1
        if self.dp is None and self.aggregation < floor:
            checks.append(f"subset: summarises {self.aggregation:g} records, below the "
                          f"minimum {floor:g} (min_aggregation)")  # fmt: skip
        if checks:
            rows.insert(3, ("Disclosure checks", "; ".join(checks)))
        if self.error is not None:
            rows.insert(3, ("Failed", self.error))
        if not self.pending:
            rows.append(("Decided", f"by {self.decided_by} at {format_clock(self.decided_at)}"))
            if self.decision_reason:
                rows.append(("Decision reason", self.decision_reason))
        return rows

    def __repr__(self) -> str:
        rows = self._details()
        width = max(len(label) for label, _ in rows) + 1
        lines = [f"Request {safe_text(self.name)}"]
        for label, value in rows:
            lines.append(f"  {label + ':':<{width}} {safe_text(value)}".rstrip())
        if self.pending:
            lines.append("  .preview() shows the value here; .accept() or .deny(reason=...)")
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        title = f"Request {self.name}"
        return Table(["Field", "Value"], self._details(), title, index=False)._repr_html_()


class RequestQueue(TableView):
    """The owner's requests: thread-safe, with handlers and an audit trail.

    ``queue[i]``, ``len(queue)`` and iteration cover PENDING requests in arrival order;
    ``queue["<request id>"]`` and ``all()`` reach decided ones too. If the audit log cannot
    be written, the request or decision is not made and the error propagates (fail closed).
    """

    def __init__(
        self,
        *,
        on_decision: Callable[[Request], None],
        audit: AuditLog | None = None,
        min_aggregation: float = 1,
        expire_after: float | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_history: int = DEFAULT_MAX_HISTORY,
        max_pending_per_requester: int | None = None,
        handler_counts: Callable[[str], int] | None = None,
    ) -> None:
        """``min_aggregation``: accept handlers never release a value that summarises fewer
        private elements. ``expire_after``: seconds after which ``expire_overdue`` marks a
        request EXPIRED when nothing else decided it (None: never)."""
        self._on_decision = on_decision
        self.audit = audit
        self.min_aggregation = min_aggregation
        self.expire_after = expire_after
        self.max_pending = max_pending
        self.max_history = max_history
        self.max_pending_per_requester = max_pending_per_requester
        self._handler_counts = handler_counts
        """A named handler's count so far, as kept across restarts (a standing host)."""
        """Pending requests of one requester at once (None: no cap of its own)."""
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._requests: dict[str, Request] = {}
        self._pending: dict[str, Request] = {}
        self._handlers: list[Handler] = []
        self._callbacks: list[Callable[[Request], None]] = []

    # --- arrivals and decisions -------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Record a new request; a matching handler decides it now, else it waits."""
        with self._lock:
            if request.request_id in self._requests:
                raise DuetError(f"request {uid_label(request.request_id)} already exists")
            if not request.pending:
                raise DuetError("only a pending request can be submitted")
            if self.audit is not None:
                self.audit.request(request)
            request._queue = self
            self._requests[request.request_id] = request
            self._pending[request.request_id] = request
            self._forget_old()
            if len(self._pending) > self.max_pending:
                reason = "the owner has too many pending requests; try again later"
                self._decide(request, RequestStatus.DENIED, "queue (too many pending)", reason)
            elif self._over_requester_cap(request.requester):
                reason = ("you have too many requests waiting for the owner; wait for "
                          "decisions, or cancel some")  # fmt: skip
                self._decide(request, RequestStatus.DENIED, "queue (too many of yours)", reason)
            else:
                self._apply_handlers(request, time.time())
            if request.pending and request.ready:
                self._arrived.notify_all()
            callbacks = list(self._callbacks) if request.ready else []
        if not request.pending:
            self._emit(request)
        self._call_back(callbacks, request)
        return request

    def _over_requester_cap(self, requester: str) -> bool:
        """Whether ``requester`` holds more pending requests than one may: its own cap, and
        never more than half the queue (so one requester cannot fill it for the others)."""
        cap = self.max_pending_per_requester
        if cap is None:
            return False
        cap = min(cap, max(1, self.max_pending // 2))
        return sum(1 for r in self._pending.values() if r.requester == requester) > cap

    def _call_back(self, callbacks: list[Callable[[Request], None]], request: Request) -> None:
        for callback in callbacks:
            try:
                callback(request)
            except Exception:
                logger.exception("a request callback failed")

    def accept(self, request_id: str) -> Request:
        """The owner accepts: the value is released."""
        return self._owner_decides(request_id, RequestStatus.ACCEPTED, "")

    def deny(self, request_id: str, reason: str = "") -> Request:
        """The owner denies; ``reason`` is sent to the scientist."""
        return self._owner_decides(request_id, RequestStatus.DENIED, reason)

    def cancel(self, request_id: str) -> Request | None:
        """The scientist stopped waiting. Returns the request, or None if it was not pending."""
        with self._lock:
            request = self._pending.get(_bare_id(request_id))
            if request is None:
                return None
            self._decide(request, RequestStatus.CANCELLED, "requester", "the requester cancelled")
        self._emit(request)
        return request

    def expire(self, request_id: str, reason: str) -> Request | None:
        """End a pending request undecided (e.g. its budget reservation ended with its
        session). Returns the request, or None if it was not pending."""
        with self._lock:
            request = self._pending.get(_bare_id(request_id))
            if request is None:
                return None
            self._decide(request, RequestStatus.EXPIRED, "queue (withdrawn)", _cap(reason))
        self._emit(request)
        return request

    def restore(self, request: Request) -> Request:
        """Put back a pending request kept across a restart (already audited when it
        arrived); handlers see it on their next pass."""
        with self._lock:
            if request.request_id in self._requests or not request.pending:
                raise DuetError(f"request {uid_label(request.request_id)} cannot be restored")
            request._queue = self
            self._requests[request.request_id] = request
            self._pending[request.request_id] = request
            self._arrived.notify_all()
        return request

    def expire_overdue(self, now: float | None = None) -> list[Request]:
        """Apply handlers whose ``timeout_secs`` has passed, then ``expire_after``.

        The session calls this periodically (about once a second). Returns what it decided.
        """
        now = time.time() if now is None else now
        decided: list[Request] = []
        with self._lock:
            for request in list(self._pending.values()):
                if self._apply_handlers(request, now):
                    decided.append(request)
                elif self.expire_after is not None and (
                    now - request.requested_at >= self.expire_after
                ):
                    reason = f"no decision within {self.expire_after:g} s"
                    self._decide(request, RequestStatus.EXPIRED, "queue (expired)", reason, now)
                    decided.append(request)
        for request in decided:
            self._emit(request)
        return decided

    def wait(self, timeout: float | None) -> Request | None:
        """Block until a request is pending and return the first, or None after ``timeout`` s."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: bool(self._ready()), timeout=timeout):
                return None
            return self._ready()[0]

    def _ready(self) -> list[Request]:
        return [r for r in self._pending.values() if r.ready]

    def add_callback(self, callback: Callable[[Request], None]) -> None:
        """Call ``callback(request)`` whenever a request arrives (after handlers ran)."""
        with self._lock:
            self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[Request], None]) -> None:
        with self._lock:
            self._callbacks.remove(callback)

    # --- handlers ---------------------------------------------------------------------

    def add_handler(
        self,
        action: Action,
        *,
        tags: Iterable[str] | None = None,
        op: str | None = None,
        max_elements: int | None = None,
        max_requests: int | None = None,
        timeout_secs: float | None = None,
        print_local: bool = False,
        log_local: bool = False,
        name: str | None = None,
        reason: str = "",
        min_aggregation: float | None = None,
        dp: bool | None = None,
        max_epsilon: float | None = None,
        max_delta: float | None = None,
        ignore_disclosure_checks: bool = False,
    ) -> Handler:
        """Append an auto-decision rule (see Handler); it applies to pending requests too.

        ``add_handler("accept", dp=True, max_epsilon=0.5)`` releases differentially private
        queries of at most 0.5 epsilon each, within the scientist's budget: the way to run
        unattended."""
        handler = Handler(
            action=action,
            tags=as_tags(tags),
            op=op,
            max_elements=max_elements,
            max_requests=max_requests,
            timeout_secs=timeout_secs,
            print_local=print_local,
            log_local=log_local,
            name=name,
            reason=_cap(reason),
            min_aggregation=min_aggregation,
            dp=dp,
            max_epsilon=max_epsilon,
            max_delta=max_delta,
            ignore_disclosure_checks=ignore_disclosure_checks,
        )
        if name and self._handler_counts is not None:
            handler.matched = self._handler_counts(name)  # its quota survives restarts
        decided: list[Request] = []
        with self._lock:
            self._handlers.append(handler)
            now = time.time()
            for request in list(self._pending.values()):
                if self._apply_handlers(request, now):
                    decided.append(request)
        for request in decided:
            self._emit(request)
        return handler

    @property
    def handlers(self) -> HandlerList:
        """A snapshot of the handlers in evaluation order (shown as a table)."""
        with self._lock:
            return HandlerList(self._handlers)

    def remove_handler(self, handler: Handler | int) -> Handler:
        """Remove a handler, given itself or its index in ``handlers``."""
        with self._lock:
            if isinstance(handler, int):
                return self._handlers.pop(handler)
            index = next((i for i, h in enumerate(self._handlers) if h is handler), None)
            if index is None:
                raise ValueError("that handler is not in this queue")
            return self._handlers.pop(index)

    def clear_handlers(self) -> None:
        with self._lock:
            self._handlers.clear()

    # --- views ------------------------------------------------------------------------

    def pending(self) -> list[Request]:
        with self._lock:
            return list(self._pending.values())

    def all(self) -> list[Request]:
        """Every request still remembered, decided ones included, in arrival order."""
        with self._lock:
            return list(self._requests.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.pending())

    @overload
    def __getitem__(self, key: int | str) -> Request: ...
    @overload
    def __getitem__(self, key: slice) -> list[Request]: ...
    def __getitem__(self, key: int | str | slice) -> Request | list[Request]:
        if isinstance(key, str):
            with self._lock:
                request = self._requests.get(_bare_id(key))
            if request is None:
                raise KeyError(f"no request with ID {key!r}")
            return request
        pending = self.pending()
        if isinstance(key, slice):
            return pending[key]
        try:
            return pending[key]
        except IndexError:
            raise IndexError(
                f"no pending request at index {key} ({len(pending)} pending)"
            ) from None

    def table(self) -> Table:
        """The pending requests as a Table."""
        rows = [
            [
                r.name,
                printable(r.reason, MAX_REASON_CHARS),
                uid_label(r.request_id),
                format_size(r.size_bytes),
                format_clock(r.requested_at),
            ]
            for r in self.pending()
        ]
        columns = ["Request Name", "Reason", "Request ID", "Size", "Requested At"]
        return Table(columns, rows, empty_text="No pending requests.")

    # --- internals (call with the lock held) ------------------------------------------

    def decide_as(self, request_id: str, accept: bool, by: str, reason: str = "") -> Request:
        """Decide for the owner under another name (e.g. a job's release rule); the
        decision is audited and sent like the owner's."""
        status = RequestStatus.ACCEPTED if accept else RequestStatus.DENIED
        return self._owner_decides(request_id, status, reason, by=_cap(by)[:200] or "owner")

    def _owner_decides(
        self, request_id: str, status: RequestStatus, reason: str, by: str = "owner"
    ) -> Request:
        with self._lock:
            request = self._requests.get(_bare_id(request_id))
            if request is None:
                raise DuetError(f"no request with ID {request_id!r}")
            if not request.pending:
                raise DuetError(
                    f"request {uid_label(request.request_id)} ({safe_text(request.name)}) "
                    f"was already {request.status.value}"
                )
            self._decide(request, status, by, _cap(reason))
        self._emit(request)
        return request

    def mark_ready(self, request_id: str) -> None:
        """The value behind a request is known now (size, or failure): handlers may decide."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is None or request.ready:
                return
            request.ready = True
            decided = request.pending and self._apply_handlers(request, time.time())
            if request.pending:
                self._arrived.notify_all()
            callbacks = list(self._callbacks)
        if decided:
            self._emit(request)
        self._call_back(callbacks, request)

    def _apply_handlers(self, request: Request, now: float) -> bool:
        if not request.ready:
            return False
        for number, handler in enumerate(self._handlers):
            if handler.matches(request, now, min_aggregation=self.min_aggregation):
                if handler.action == "accept":
                    status, reason = RequestStatus.ACCEPTED, ""
                else:
                    status = RequestStatus.DENIED
                    reason = handler.reason or "denied by the owner's policy"
                by = f"handler #{number} ({handler.summary()})"
                self._decide(request, status, by, reason, now, handler)
                handler.matched += 1
                return True
        return False

    def _decide(
        self,
        request: Request,
        status: RequestStatus,
        decided_by: str,
        reason: str,
        now: float | None = None,
        handler: Handler | None = None,
    ) -> None:
        request.status = status
        request.decided_by = decided_by
        request.decision_reason = reason
        request.decided_at = time.time() if now is None else now
        request.handler = handler
        if self.audit is not None:
            try:
                self.audit.decision(request)
            except BaseException:
                request.status = RequestStatus.PENDING
                request.decided_by = request.decided_at = request.handler = None
                request.decision_reason = ""
                raise
        del self._pending[request.request_id]

    def _emit(self, request: Request) -> None:
        try:
            self._on_decision(request)
        except Exception:
            logger.exception("on_decision failed for request %s", request.request_id)

    def _forget_old(self) -> None:
        excess = len(self._requests) - self.max_history
        if excess <= 0:
            return
        old: list[str] = []
        for request_id, request in self._requests.items():
            if len(old) >= excess:
                break
            if not request.pending:
                old.append(request_id)
        for request_id in old:
            del self._requests[request_id]


def _cap(text: object) -> str:
    text = text if isinstance(text, str) else str(text)
    return text[:MAX_REASON_CHARS]


def _bare_id(key: str) -> str:
    """Accept an ID as shown in tables (``<UID:...>``) as well as bare."""
    key = key.strip()
    if key.startswith("<UID:") and key.endswith(">"):
        return key[5:-1]
    return key
