"""The owner's domain: what is hosted, the requests and rules, the audit log, the ledger.

An ``Owner`` exists without any connection. Each connected scientist is served by a
session (``session.OwnerCore``) against it: the sessions share the hosted objects (sealed
once, mapped into every session's worker), the request queue and its handlers (each
request is routed back to the session that made it), the audit log and the privacy
ledger; each session keeps its own monitor, worker and objects. A one-off Duet is an owner
with a single session, which closes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Protocol

import torch

from duet_p2p.allowlist import Allowlist
from duet_p2p.errors import DuetError
from duet_p2p.limits import OwnerLimits
from duet_p2p.modules import module_to_spec, spec_to_module
from duet_p2p.owner.hosted import SealedTensor, seal
from duet_p2p.owner.journal_writer import JournalWriter
from duet_p2p.permissions import AuditLog, Request, RequestQueue, RequestStatus
from duet_p2p.permissions.disclosure import DisclosureRules
from duet_p2p.permissions.ledger import PrivacyLedger, open_ledger
from duet_p2p.rpc import codec
from duet_p2p.schema import TableSchema, from_dataframe, schema_for_tensor
from duet_p2p.store import OwnerStore, StoredObject, clean_tags, new_object_id, value_nbytes

log = logging.getLogger(__name__)
JOURNAL_WAIT = 60.0
"""Seconds an owner's decision waits for the journal to have it on disk."""
MAX_KEPT_PER_SCIENTIST = 100_000
"""Decided requests a journal keeps per scientist at most, whatever ``max_requests`` says."""


class RequestJournal(Protocol):
    """Where a standing host keeps requests, held values and decisions across restarts
    (``duet_p2p.host.state.HostState``)."""

    def record_request(self, request: Any, *, dp: bool) -> None: ...

    def hold(self, request_id: str, *, payload: bytes | None, module: bool,
             failure: dict[str, Any] | None, size_bytes: int, elements: int,
             error: str | None, checks: tuple[str, ...]) -> None: ...  # fmt: skip

    def decide(self, request_id: str, *, status: str, decided_by: str, reason: str,
               decided_at: float, keep_until: float | None,
               overrule: bool = False) -> None: ...  # fmt: skip

    def delivered(self, request_id: str) -> None: ...

    def claim(self, client_id: str, request_id: str) -> tuple[Any, bytes | None] | None: ...

    def for_client(self, client_id: str, *, limit: int = 1000) -> list[Any]: ...

    def set_handler_count(self, name: str, count: int) -> None: ...

    def handler_count(self, name: str) -> int: ...

    def transaction(self) -> Any: ...

    def keep(self, request: Any, *, dp: bool, payload: bytes | None, module: bool,
             failure: dict[str, Any] | None, prune_to: int | None = None) -> None: ...  # fmt: skip

    def record_decision(self, request: Any, *, dp: bool, keep_until: float | None,
                        handler: tuple[str, int] | None = None,
                        prune_to: int | None = None) -> None: ...  # fmt: skip

    def payload(self, request_id: str) -> bytes | None: ...

    def get(self, request_id: str) -> Any: ...

    def pending_bytes(self, client_id: str) -> int: ...

    def prune_client(self, client_id: str, keep: int) -> int: ...


class Session(Protocol):
    """What the owner needs of a session serving one scientist."""

    def on_hosted(self, record: StoredObject) -> None: ...

    def on_unhosted(self, object_id: str) -> None: ...

    def _on_decision(self, request: Request) -> bool: ...


class HostedStore(OwnerStore):
    """The owner's hosted objects (the monitor's own copies; peer objects live in workers)."""

    def __init__(self, owner: Owner) -> None:
        super().__init__()
        self._owner = owner

    def remove(self, object_id: str) -> StoredObject | None:
        record = super().remove(object_id)
        if record is not None:
            self._owner._unhost(object_id)
        return record


class Owner:
    """Hosted objects, requests, handlers, audit, ledger and limits, shared by sessions."""

    def __init__(
        self,
        *,
        allowlist: Allowlist,
        limits: OwnerLimits,
        audit: AuditLog,
        min_aggregation: int = 1,
        ledger: PrivacyLedger | None = None,
        disclosure: DisclosureRules | None = None,
        journal: RequestJournal | None = None,
        keep_released: float = 7 * 24 * 3600.0,
        expire_after: float | None = None,
    ) -> None:
        """``journal``: a standing host's durable record of requests (None: requests live
        in memory, as in a one-off Duet). ``keep_released``: seconds an accepted value
        waits for a scientist who was away. ``expire_after``: seconds after which an
        undecided request expires (None: never)."""
        self.allowlist = allowlist
        self.limits = limits
        self.audit = audit
        self.store = HostedStore(self)
        self.sealed: dict[str, SealedTensor] = {}
        """Hosted tensors' sealed bytes, by object ID."""
        self.requests = RequestQueue(
            on_decision=self._route_decision, audit=audit, min_aggregation=min_aggregation,
            max_history=limits.max_requests, expire_after=expire_after,
            max_pending_per_requester=limits.max_pending_per_scientist,
            handler_counts=None if journal is None else journal.handler_count,
        )  # fmt: skip
        self.journal = journal
        self.jobs: Any = None
        """A standing host's offline jobs (``HostJobs``): what a session's job messages reach."""
        self.decided_listeners: list[Any] = []
        """Called (from any thread) with each request once its decision is routed."""
        self.keep_released = keep_released
        self._writer = JournalWriter(journal.transaction) if journal is not None else None
        self._kept_per_scientist = max(1, min(limits.max_requests, MAX_KEPT_PER_SCIENTIST))
        self.disclosure = disclosure if disclosure is not None else DisclosureRules()
        self._ledger = ledger
        self._lock = threading.Lock()
        self._sessions: list[Session] = []
        self._routes: dict[str, Session] = {}

    @property
    def ledger(self) -> PrivacyLedger:
        """The privacy budget ledger (opened on first use: the default file lives in the
        owner's data directory, so budgets and spends survive restarts)."""
        if self._ledger is None:
            self._ledger = open_ledger()
        return self._ledger

    # -- sessions -----------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        with self._lock:
            self._sessions.append(session)

    def detach(self, session: Session) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)
            for request_id in [r for r, s in self._routes.items() if s is session]:
                del self._routes[request_id]

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions)

    def route(self, request_id: str, session: Session) -> None:
        """Decisions on ``request_id`` go to ``session`` (call before submitting it)."""
        with self._lock:
            self._routes[request_id] = session

    def routed_to(self, request_id: str, session: Session) -> bool:
        """Whether ``request_id`` is a pending request of ``session``."""
        with self._lock:
            return self._routes.get(request_id) is session

    def _route_decision(self, request: Request) -> None:
        with self._lock:
            session = self._routes.pop(request.request_id, None)
        if session is not None and session._on_decision(request):
            self._tell_listeners(request)
            return  # the session journals it before delivering it
        if self.journal is not None:
            written = self.later(self.journal_decision, request)
            if not _on_event_loop():  # the owner's own thread: durable before it returns
                written.result(timeout=JOURNAL_WAIT)
        self._tell_listeners(request)

    def _tell_listeners(self, request: Request) -> None:
        for listener in list(self.decided_listeners):
            try:
                listener(request)
            except Exception:  # noqa: BLE001 - a listener never breaks a decision
                log.exception("a decision listener failed")

    # -- requests as the journal keeps them -----------------------------------------------
    #
    # Journal calls are blocking I/O: sessions make them from a thread. A request decided
    # while its scientist waits costs one write (its record and decision together); one
    # left waiting is kept with its value, so it can be decided after its scientist left or
    # the host restarted, and fetched on their return.

    def later(self, function: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run a journal call on the journal's writer thread, in order with the others,
        committed together with whatever else is queued."""
        assert self._writer is not None, "only an owner with a journal writes one"
        return self._writer.submit(function, *args, **kwargs)

    def submit(self, request: Request, session: Session) -> None:
        """A new request of ``session``'s scientist: routed to it, then submitted."""
        self.route(request.request_id, session)
        self.requests.submit(request)

    def preview_kept(self, request_id: str) -> Any:
        """The value kept for a request whose session has gone (the owner's preview; read
        after the journal's queued writes, so a keep still on its way is seen)."""
        if self.journal is None:
            raise DuetError("the value is no longer held: its scientist left before a decision")
        read = self.later(lambda: (self.journal.payload(request_id), self.journal.get(request_id)))
        payload, stored = read.result(timeout=JOURNAL_WAIT)
        if payload is None or stored is None:
            raise DuetError("the value is no longer held: its scientist left before a decision")
        value = codec.decode(payload, limits=codec.DecodeLimits(max_bytes=max(1, len(payload))))
        return spec_to_module(value) if stored.module else value

    def keep(self, request: Request, payload: Any, *, module: bool,
             failure: dict[str, Any] | None) -> bool:  # fmt: skip
        """Keep a request still waiting for a decision, with its value (or failure). The
        values kept for one scientist's pending requests, over all their sessions, stay
        within ``max_pending_bytes``. Returns whether it was kept."""
        if self.journal is None or request.status not in (
            RequestStatus.PENDING,
            RequestStatus.ACCEPTED,
        ):
            return False  # denied or withdrawn meanwhile: nothing to keep
        size = 0 if payload is None else len(payload)
        try:
            if size and self.journal.pending_bytes(request.requester) + size > (
                self.limits.max_pending_bytes
            ):
                raise ValueError("the values kept for this scientist's pending requests "
                                 "would pass max_pending_bytes")  # fmt: skip
            self.journal.keep(request, dp=request.dp is not None,
                              payload=None if payload is None else bytes(payload),
                              module=module, failure=failure,
                              prune_to=self._kept_per_scientist)  # fmt: skip
        except Exception as exc:  # e.g. a value past the journal's cap, or a full disk
            log.warning("the host cannot keep the value of %s: %s", request.request_id, exc)
            request.error = f"the host could not keep this value ({type(exc).__name__})"
            return False
        return True

    def delivered(self, request_id: str) -> None:
        """The scientist received the value: a standing host need not keep it."""
        if self.journal is not None:
            self.journal.delivered(request_id)

    def overrule(self, request: Request, reason: str) -> None:
        """An accepted DP release was denied after all (its debit failed): journal that."""
        if self.journal is None:
            return
        try:
            self.journal.decide(request.request_id, status="denied", decided_by="ledger",
                                reason=reason, decided_at=time.time(), keep_until=None,
                                overrule=True)  # fmt: skip
        except Exception:
            log.exception("recording the denial of %s failed", request.request_id)

    def journal_decision(self, request: Request) -> None:
        """Record a decision durably (with the request, if it was never kept, and the
        deciding handler's quota counter)."""
        if self.journal is None:
            return
        accepted = request.status is RequestStatus.ACCEPTED
        handler = request.handler
        try:
            self.journal.record_decision(
                request, dp=request.dp is not None,
                keep_until=time.time() + self.keep_released if accepted else None,
                handler=(handler.name, handler.matched) if handler and handler.name else None,
                prune_to=self._kept_per_scientist,
            )  # fmt: skip
        except Exception:  # the audit log has the decision; the session still delivers it
            log.exception("recording the decision on %s failed", request.request_id)

    # -- hosting ------------------------------------------------------------------------

    def host(
        self,
        value: Any,
        *,
        tags: tuple[str, ...] = (),
        description: str = "",
        searchable: bool = True,
        public: bool = False,
        show_metadata: bool = False,
        columns: list[str] | tuple[str, ...] | None = None,
        identifier: str | None = None,
        rows_per_identifier: int = 1,
    ) -> StoredObject:
        """Place ``value`` in the store; every session is told (its scientist sees the
        listing change). A pandas DataFrame is hosted as a float64 tensor with its columns
        as the schema."""
        schema: TableSchema | None = None
        if _is_dataframe(value):
            if columns is not None:
                raise ValueError("a DataFrame brings its own columns: leave out columns=")
            value, schema = from_dataframe(value, identifier, rows_per_identifier)
        elif isinstance(value, torch.Tensor):
            schema = schema_for_tensor(value, columns, identifier, rows_per_identifier)
        elif columns is not None or identifier is not None:
            raise ValueError("columns= and identifier= describe a tensor or a DataFrame")
        if not isinstance(value, (torch.Tensor, torch.nn.Module)):
            raise TypeError(
                f"only tensors, modules and DataFrames can be hosted, not {type(value).__name__}"
            )
        tags = clean_tags(tags)
        label = tags[0] if tags else None
        record = StoredObject(
            id=new_object_id(),
            value=value,
            origin="owner",
            private=not public,
            tags=tags,
            description=description[:4000],
            searchable=searchable,
            show_metadata=show_metadata,
            expression=label if label and label.isidentifier() else "",
            lineage_tags=frozenset(tags),
            nbytes=value_nbytes(value),
            schema=schema,
        )
        if not record.expression:
            record.expression = f"obj_{record.id[:8]}"
        if isinstance(value, torch.Tensor):
            self.sealed[record.id] = seal(value)  # a snapshot: later local edits stay local
        else:
            module_to_spec(value)  # refuses custom code now, in the owner's hands
        self.store.put(record)
        self.audit.event("hosted", object_id=record.id, tags=list(tags), public=public)
        for session in self.sessions():
            session.on_hosted(record)
        return record

    def _unhost(self, object_id: str) -> None:
        for session in self.sessions():
            session.on_unhosted(object_id)
        sealed = self.sealed.pop(object_id, None)
        if sealed is not None:
            sealed.close()  # each worker keeps its own mapping while it runs

    def close(self) -> None:
        """Commit the journal's queued writes; release the sealed memory of every hosted
        tensor."""
        if self._writer is not None:
            self._writer.close()
        for sealed in self.sealed.values():
            sealed.close()
        self.sealed.clear()


def _is_dataframe(value: Any) -> bool:
    return type(value).__name__ == "DataFrame" and hasattr(value, "columns")


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
