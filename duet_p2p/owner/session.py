"""The owner's side of a session: the monitor in the owner's process, serving one scientist.

The monitor holds the connection, the hosted objects, every object's label, the requests,
decisions and the audit log, and decides what leaves. It never runs the scientist's
computation: actions, uploads and frees go in order to the session's worker process,
which holds the scientist's objects and maps the hosted data read-only. Values come back
only when the monitor asks for one to release (a snapshot at that point in the order).

What the scientist can observe never depends on a private result: a get on a private
object is answered at once with a pending request, before the worker has even computed
it; describing one says only that it is private; its failure, like its value, reaches
the scientist only if the owner (or the owner's rule) releases it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import functools
import hashlib
import logging
import math
import time
from typing import Any

import torch

from duet_p2p import lineage
from duet_p2p.allowlist import DEFAULT_ALLOWLIST, Allowlist
from duet_p2p.connect import Connection
from duet_p2p.errors import DuetError, PeerClosed, ProtocolError, RemoteError
from duet_p2p.limits import OwnerLimits
from duet_p2p.modules import module_to_spec, spec_to_module
from duet_p2p.owner.dp_service import DPQueries
from duet_p2p.owner.job_desk import JobDesk
from duet_p2p.owner.labels import Label
from duet_p2p.owner.monitor import Monitor, Node, elements_of
from duet_p2p.owner.owner import Owner
from duet_p2p.owner.worker import SNAP_SECONDS, WorkerLost, WorkerSupervisor
from duet_p2p.permissions import AuditLog, Request, RequestStatus
from duet_p2p.permissions.disclosure import DisclosureRules
from duet_p2p.permissions.ledger import PrivacyLedger
from duet_p2p.rpc import codec
from duet_p2p.rpc.endpoint import Endpoint
from duet_p2p.rpc.messages import (
    PROTOCOL_VERSION,
    Actions,
    BudgetQuery,
    CancelRequest,
    Decision,
    Delete,
    Describe,
    DPQuery,
    FetchRelease,
    GetRequest,
    Hello,
    ListRequests,
    Message,
    StoreChanged,
    StoreQuery,
    Upload,
)
from duet_p2p.store import StoredObject, new_object_id, value_nbytes

log = logging.getLogger(__name__)
_STOP = object()
EXPIRE_INTERVAL = 1.0
"""Seconds between checks for requests a ``timeout_secs`` handler or expiry now decides."""
MAX_QUEUED_MESSAGES = 10_000
"""Messages from the peer waiting for the monitor; past that, uploads are refused."""
WITHHELD = "its details are withheld by the owner"
CLOSE_GRACE = 30.0
"""Seconds a closing session of a standing host waits for values still being computed."""


def listing_entry(record: StoredObject) -> dict[str, Any]:
    """What the scientist sees of a searchable object: never a value."""
    entry: dict[str, Any] = {
        "id": record.id,
        "tags": list(record.tags),
        "description": record.description,
        "type": record.type_name,
        "kind": "module" if isinstance(record.value, torch.nn.Module) else "tensor",
        "public": not record.private,
    }
    value = record.value
    if (record.show_metadata or not record.private) and isinstance(value, torch.Tensor):
        entry["shape"] = list(value.shape)
        entry["dtype"] = str(value.dtype).removeprefix("torch.")
    if record.schema is not None:
        entry["schema"] = record.schema.listing()
    return entry


def new_supervisor(allowlist: Allowlist, limits: OwnerLimits) -> WorkerSupervisor:
    """A worker supervisor for one session; ``prestart()`` it early to hide torch's import."""
    config = {
        "limits": dataclasses.asdict(limits),
        "allowlist": None if allowlist is DEFAULT_ALLOWLIST else _allowlist_data(allowlist),
        "threads": limits.worker_threads,
        "read_only": not limits.allow_inplace_on_owner_objects,
        "seccomp": limits.seccomp,
    }
    return WorkerSupervisor(limits, config, on_done=_unset, on_lost=_unset_async, rehost=_none)


def _allowlist_data(allowlist: Allowlist) -> list[dict[str, Any]]:
    return [
        {k: (str(v) if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(e).items()}
        for e in allowlist
    ]


def _unset(*_args: Any) -> None:
    raise RuntimeError("the worker supervisor is not attached to a session")


async def _unset_async(*_args: Any) -> None:
    _unset()


async def _none() -> None:
    return None


@dataclasses.dataclass(frozen=True)
class _RefusedUpload:
    """An upload refused on arrival; its refusal takes its place in the order."""

    result: str


@dataclasses.dataclass(frozen=True)
class Holdings:
    """What a session's worker holds for the peer."""

    objects: int
    bytes: int
    ids: frozenset[str]
    """Objects it holds a value for (not failures)."""
    failed: frozenset[str]
    """Objects whose op failed in the worker."""


@dataclasses.dataclass
class _Held:
    """A snapshot kept for a request until it is decided."""

    payload: bytearray | None
    module: bool
    error: dict[str, Any] | None
    max_bytes: int | None
    private: bool = True
    """Which budget it is held in (private values' sizes are private)."""
    dp: bool = False
    """A DP release, held in a budget of its own (see ``_hold_value``)."""
    counted: bool = True
    """Its bytes still count against the session's budget."""


class OwnerCore:
    """Owner-side protocol handling; lives on the event loop that owns the connection."""

    def __init__(
        self,
        connection: Connection,
        *,
        allowlist: Allowlist,
        limits: OwnerLimits,
        audit: AuditLog,
        min_aggregation: int = 1,
        supervisor: WorkerSupervisor | None = None,
        ledger: PrivacyLedger | None = None,
        disclosure: DisclosureRules | None = None,
        owner: Owner | None = None,
        session_limits: OwnerLimits | None = None,
    ) -> None:
        """``owner``: the owner this session serves a scientist for (None: a new owner of
        this session's own, closed with it: the one-off Duet). ``session_limits``: this
        session's own time and size budgets where they differ from the owner's (a job's)."""
        self._owns_owner = owner is None
        self.owner = owner or Owner(
            allowlist=allowlist, limits=limits, audit=audit, min_aggregation=min_aggregation,
            ledger=ledger, disclosure=disclosure,
        )  # fmt: skip
        self.connection = connection
        self.allowlist = self.owner.allowlist
        self.limits = self.owner.limits
        self.audit = self.owner.audit
        self.store = self.owner.store
        self.requests = self.owner.requests
        self._sealed = self.owner.sealed
        self.disclosure = self.owner.disclosure
        self.monitor = Monitor(self.allowlist, session_limits or self.limits)
        self.worker = supervisor or new_supervisor(allowlist, limits)
        self.worker.on_done = self._on_worker_done
        self.worker.on_lost = self._on_worker_lost
        self.worker.rehost = self._rehost
        self.endpoint = Endpoint(
            connection.transport,
            role="owner",
            limits=codec.DecodeLimits(max_bytes=limits.max_upload_bytes),
        )
        self.dp = DPQueries(self)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._work: collections.deque[Any] = collections.deque()
        self._work_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failed: dict[str, dict[str, Any]] = {}
        self._sent: collections.deque[list[Node]] = collections.deque()
        """The nodes of each batch sent to the worker and not yet done, in order."""
        """Failures the worker reported, by object (released only as labels allow)."""
        self._fitted: dict[str, int | None] = {}
        """For a module's request: the records it was fitted on, as the monitor knows them."""
        self._held: dict[str, _Held] = {}
        self._gets: dict[str, GetRequest | DPQuery] = {}
        self._snaps: dict[str, asyncio.Event] = {}
        """Set once a private request's value (or failure) is held."""
        self._answered: dict[str, asyncio.Event] = {}
        self._mine: set[str] = set()
        self._kept: set[str] = set()
        """Requests whose value the owner's journal keeps (freed once delivered)."""
        self._keeping: dict[str, asyncio.Future[bool]] = {}
        """Requests this session submitted (a one-off Duet lists them to its scientist)."""
        self.held_bytes = 0
        """Bytes of private values held for requests awaiting a decision (their sizes are
        private, so this budget is kept apart from anything the peer can observe)."""
        self.public_held_bytes = 0
        self.dp_held_bytes = 0
        """Bytes of DP releases awaiting a decision."""
        """Bytes of public values on their way out (their own budget, for the same reason)."""
        self.queued_bytes = 0
        """Bytes of uploads waiting for the monitor."""
        self._space = asyncio.Event()
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self.serving = True
        self.stop_cause = ""

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.worker.start()
        self.owner.attach(self)
        for record in self.store.owner_records():  # hosted before this session began
            self._host_on_loop(record, notify=False)
        for kind in ("actions", "delete", "upload", "get", "describe", "dp_query"):
            self.endpoint.on(kind, self._enqueue)
        self.endpoint.on("store_query", self._on_store_query)
        self.endpoint.on("dp_budget", self._on_budget_query)
        self.endpoint.on("cancel_request", self._on_cancel)
        self.endpoint.on("list_requests", self._on_list_requests)
        self.endpoint.on("fetch_release", self._on_fetch_release)
        JobDesk(self)
        self._tasks = [
            asyncio.ensure_future(self._work_loop()),
            asyncio.ensure_future(self._expire_loop()),
        ]
        hello = Hello(
            version=PROTOCOL_VERSION,
            role="owner",
            library="duet_p2p",
            max_message_bytes=self.limits.max_upload_bytes,
            allowlist={entry.path: str(entry.returns) for entry in self.allowlist},
        )
        await self.endpoint.start(hello)
        self.audit.event("connected", duet_id=self.connection.duet_id,
                         client_id=self.connection.client_id,
                         worker_sandbox=self.worker.sandbox)  # fmt: skip

    @property
    def ledger(self) -> PrivacyLedger:
        """The owner's privacy budget ledger."""
        return self.owner.ledger

    # -- the owner's own calls (any thread) ---------------------------------------------

    def host(self, value: Any, **options: Any) -> StoredObject:
        """Place ``value`` in the owner's store (see ``Owner.host``); every session, this
        one included, is told."""
        return self.owner.host(value, **options)

    # -- the owner's changes, as the sessions hear of them --------------------------------

    def on_hosted(self, record: StoredObject) -> None:
        self._call_on_loop(self._host_on_loop, record)

    def on_unhosted(self, object_id: str) -> None:
        self._call_on_loop(self._unhost, object_id)

    def _call_on_loop(self, function: Any, *args: Any) -> None:
        if self.loop is None or self._closed:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            function(*args)
        else:
            self.loop.call_soon_threadsafe(function, *args)

    def _host_on_loop(self, record: StoredObject, notify: bool = True) -> None:
        if self.store.get(record.id) is not record or record.id in self.monitor.nodes:
            return  # removed before this session heard of it, or hosted already
        self.monitor.host(
            record.id, record.value, private=record.private, tags=record.tags,
            expression=record.expression,
        )  # fmt: skip
        self._send_hosted(record)
        self.worker.set_hosted_bytes(sum(s.nbytes for s in self._sealed.values()))
        if record.searchable and notify:
            self._notify_store_changed()

    def _send_hosted(self, record: StoredObject) -> None:
        sealed = self._sealed.get(record.id)
        if isinstance(record.value, torch.Tensor) and sealed is None:
            return  # unhosted meanwhile
        if sealed is not None:
            self.worker.send(
                {"t": "host", "id": record.id, "dtype": sealed.dtype,
                 "shape": list(sealed.shape), "nbytes": sealed.nbytes},
                sealed.inline, fd=sealed.fd,
            )  # fmt: skip
        else:
            module = record.value
            encoded = codec.encode(module_to_spec(module))
            self.worker.send({"t": "host_module", "id": record.id}, encoded)

    async def _rehost(self) -> None:
        """A new worker: map the hosted objects into it."""
        for record in self.store.owner_records():
            if record.id in self.monitor.nodes:
                self._send_hosted(record)

    def _unhost(self, object_id: str) -> None:
        self.monitor.unhost(object_id)
        with contextlib.suppress(WorkerLost):
            self.worker.send({"t": "unhost", "id": object_id})
        self._notify_store_changed()

    def _notify_store_changed(self) -> None:
        if not self._closed:
            asyncio.ensure_future(self._send_quietly(StoreChanged()))

    async def _send_quietly(
        self, message: Message, attachment: bytes | memoryview | None = None
    ) -> bool:
        """Send, or give up quietly if the peer is gone; whether it was sent."""
        try:
            await self.endpoint.send(message, attachment)
        except (PeerClosed, ProtocolError):
            return False
        return True

    # -- incoming -----------------------------------------------------------------------

    async def _enqueue(self, message: Message) -> None:
        """A peer message joins the ordered queue; a full queue stops reading the peer (the
        transport's credit window then stops its sender)."""
        while len(self._work) >= MAX_QUEUED_MESSAGES and not self._closed:
            self._space.clear()
            await self._space.wait()
        if isinstance(message, Upload):
            size = _upload_bytes(message)
            if self.queued_bytes + size > self.limits.max_pending_bytes:
                self._push(_RefusedUpload(message.result))
                return
            self.queued_bytes += size
        self._push(message)

    def _push(self, item: Any) -> None:
        self._work.append(item)
        self._work_ready.set()

    async def _on_store_query(self, message: StoreQuery) -> None:
        entries = [listing_entry(r) for r in self.store.listing() if r.id in self.monitor.nodes]
        await self.endpoint.reply(message.call_id, entries)

    async def _on_budget_query(self, message: BudgetQuery) -> None:
        try:
            await self.dp.on_budget(message)
        except Exception:  # noqa: BLE001 - e.g. an unreadable ledger: say so, keep serving
            log.exception("reading the privacy ledger failed")
            await self._send_error(message.call_id, _refused_info(
                "dp.budget", "the owner's privacy ledger could not be read"))  # fmt: skip

    def _on_cancel(self, message: CancelRequest) -> None:
        """The scientist withdraws one of its own requests (another session's are not
        its to name)."""
        if not self.owner.routed_to(message.request_id, self):
            return
        with contextlib.suppress(DuetError, KeyError):
            self.requests.cancel(message.request_id)

    async def _work_loop(self) -> None:
        while True:
            if not self._work:
                self._work_ready.clear()
                await self._work_ready.wait()
                continue
            message = self._work.popleft()
            self._space.set()
            if message is _STOP:
                return
            if isinstance(message, asyncio.Event):
                message.set()
                continue
            try:
                if not self.serving:
                    self._refuse_after_stop(message)
                    continue
                if isinstance(message, Actions):
                    batch = list(message.actions)
                    while self._work and isinstance(self._work[0], Actions):
                        batch.extend(self._work.popleft().actions)
                    self._run_actions(batch)
                elif isinstance(message, Delete):
                    self._free(message.ids)
                elif isinstance(message, Upload):
                    self._upload(message)
                elif isinstance(message, _RefusedUpload):
                    self.monitor.upload(message.result)
                    self._failed[message.result] = _refused_info(
                        "upload", "the owner's memory for queued uploads is used up"
                    )
                elif isinstance(message, GetRequest):
                    self._on_get(message)
                elif isinstance(message, Describe):
                    self._on_describe(message)
                elif isinstance(message, DPQuery):
                    self.dp.on_query(message)
                await self.worker.drain()
            except WorkerLost:
                continue  # the session stopped serving; said to the peer already
            except Exception:  # noqa: BLE001 - one bad item must not stop the queue
                log.exception("owner work item failed")

    def _refuse_after_stop(self, message: Message) -> None:
        """The worker was stopped too often: answer what expects an answer, plainly."""
        call_id = getattr(message, "call_id", None)
        if call_id is not None:
            info = {
                "code": "remote_error",
                "type": "SessionStopped",
                "message": f"the owner's session stopped serving you: {self.stop_cause}",
            }
            asyncio.ensure_future(self._send_error(call_id, info))  # fmt: skip

    async def _expire_loop(self) -> None:
        """Let ``timeout_secs`` handlers and ``expire_after`` decide overdue requests."""
        while not self._closed:
            await asyncio.sleep(EXPIRE_INTERVAL)
            try:
                self.requests.expire_overdue()
            except Exception:  # noqa: BLE001 - e.g. an unwritable audit log; retry next tick
                log.exception("expiring overdue requests failed")

    def _run_actions(self, actions: list[Any]) -> None:
        wire: list[list[Any]] = []
        budgets: list[tuple[float, str]] = []
        audited: list[tuple[str, list[str], str, bool, str | None]] = []
        sent: list[Node] = []
        for action in actions:
            verdict = self.monitor.admit(action)
            error = verdict.node.error or {}
            audited.append((action.op, verdict.inputs, action.result, not verdict.refused,
                            error.get("type")))  # fmt: skip
            if verdict.refused:
                continue
            self._failed.pop(action.result, None)
            wire.append(_compact(action, verdict.private))
            sent.append(verdict.node)
            budgets.append((verdict.budget, action.op[:200]))
        self.audit.actions(audited)
        if wire:
            self._sent.append(sent)
            self.worker.send({"t": "run", "actions": wire}, budgets=budgets)

    def _free(self, ids: list[str]) -> None:
        freed = self.monitor.free(ids)
        for object_id in freed:
            self._failed.pop(object_id, None)
        if freed:
            self.worker.send({"t": "free", "ids": freed})

    def _upload(self, message: Upload) -> None:
        self.queued_bytes -= _upload_bytes(message)
        existing = self.monitor.nodes.get(message.result)
        if existing is not None and existing.origin == "owner":
            self.audit.event("upload", result=message.result, ok=False)
            return
        value = message.value
        if message.as_module != isinstance(value, dict) or not (
            message.as_module or isinstance(value, torch.Tensor)
        ):
            self.monitor.upload(message.result)
            self._failed[message.result] = _refused_info(
                "upload", "an upload must be a tensor or a module spec"
            )
            self.audit.event("upload", result=message.result, ok=False)
            return
        self.monitor.upload(message.result, spec=value if message.as_module else None)
        self._failed.pop(message.result, None)
        self._sent.append([self.monitor.nodes[message.result]])
        self.worker.send(
            {"t": "upload", "id": message.result, "module": message.as_module},
            codec.encode(value),
            budgets=[(self.limits.max_op_seconds, "upload")],
        )
        self.audit.event("upload", result=message.result, ok=True)

    def _on_describe(self, message: Describe) -> None:
        node = self.monitor.nodes.get(message.object_id)
        if node is None:
            asyncio.ensure_future(self._reply(message.call_id, {"exists": False}))
        elif node.error is not None:
            info = {"exists": True, "error": node.error, "private": False}
            asyncio.ensure_future(self._reply(message.call_id, info))
        elif self.monitor.label(node).private:
            info = {"exists": True, "error": None, "private": True}
            asyncio.ensure_future(self._reply(message.call_id, info))
        else:
            sync = self.worker.ask({"t": "sync"})
            asyncio.ensure_future(self._describe_public(message, node, sync))

    async def _describe_public(self, message: Describe, node: Node, sync: Any) -> None:
        try:
            await sync
            error = self._failed.get(node.id)
        except WorkerLost as lost:
            error = _lost_info(lost.cause)
        await self._reply(message.call_id, {"exists": True, "error": error, "private": False})

    async def _reply(self, call_id: int, value: Any) -> None:
        with contextlib.suppress(PeerClosed, ProtocolError):
            await self.endpoint.reply(call_id, value)

    def _on_worker_done(self, failed: Any) -> None:
        """The worker finished a batch (or an upload): which of its items failed, by
        position. A failure counts only for the very node that was sent: a later object
        that reuses the ID (or a worker that lies) must not inherit it."""
        sent = self._sent.popleft() if self._sent else []
        for item in failed if isinstance(failed, list) else []:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)):
                continue
            index, info = item
            if not 0 <= index < len(sent):
                continue
            node = sent[index]
            if self.monitor.nodes.get(node.id) is node:
                self._failed[node.id] = _clean_error(info)
                self.audit.event("action_failed", result=node.id,
                                 error_type=self._failed[node.id].get("type"))  # fmt: skip

    async def _on_worker_lost(self, cause: str, final: bool) -> None:
        lost = self.monitor.forget_peer_objects(cause)
        self._failed.clear()
        self._sent.clear()
        self.audit.event("worker_lost", cause=cause, objects_lost=len(lost), final=final)
        if final:
            self.serving = False
            self.stop_cause = f"its worker was stopped too often; the last time: {cause}"
            log.error("the session stops serving the scientist: %s", cause)

    # -- gets, requests and releases ---------------------------------------------------

    def _on_get(self, message: GetRequest) -> None:
        node = self.monitor.nodes.get(message.object_id)
        if node is None:
            info = self.monitor.missing(message.object_id)
            asyncio.ensure_future(self._send_error(message.call_id, info))
            return
        if node.error is not None:
            asyncio.ensure_future(self._send_error(message.call_id, node.error))
            return
        label = self.monitor.label(node)
        request = self._new_request(message, node, label)
        if node.kind == "module":
            self._fitted[request.request_id] = self.monitor.records_fitted(node)
        snap = self.worker.ask({"t": "snap", "id": node.id}, (SNAP_SECONDS, "preparing a value"))
        if message.delete:
            self._free([node.id])
        asyncio.ensure_future(self._serve_get(message, request, label, snap))

    def _new_request(self, message: GetRequest, node: Node, label: Label) -> Request:
        request_id = new_object_id()
        return Request(
            request_id=request_id,
            object_id=node.id,
            name=lineage.name_of(node.ops) if node.ops else self._plain_name(node),
            reason=message.reason,
            lineage=node.expression,
            ops=node.ops,
            tags=label.tags,
            size_bytes=0,
            elements=0,
            aggregation=label.aggregation,
            requested_at=time.time(),
            requester=self.connection.client_id,
            _preview=lambda: self._preview(request_id),
        )

    def _plain_name(self, node: Node) -> str:
        """The name of a request for an object no op made: the owner's tag, or "object"."""
        record = self.store.get(node.id) if node.origin == "owner" else None
        return record.tags[0] if record is not None and record.tags else "object"

    async def _serve_get(
        self, message: GetRequest, request: Request, label: Label, snap: Any
    ) -> None:
        rid = request.request_id
        # a private one is registered and answered before anything of the value is known
        ready = await self.pend(message, request) if label.private else asyncio.Event()
        try:
            head, payload = await snap
        except WorkerLost as lost:
            if label.private:
                self._held[rid] = _Held(None, False, _lost_info(lost.cause), None)
                request.error = _lost(lost.cause)  # owner-side, as for any failed value
                ready.set()
                with contextlib.suppress(DuetError):
                    self.requests.deny(rid, reason=_lost(lost.cause))
            else:
                await self._send_error(message.call_id, _lost_info(lost.cause))
            return
        held = self._hold(head, payload, message, private=label.private)
        if not label.private and held.error is not None:
            self._release_hold(held)
            await self._send_error(message.call_id, held.error)
            return
        self._fill(request, held)
        self._held[rid] = held
        ready.set()
        if label.private:
            self.requests.mark_ready(rid)  # a handler may decide it now
            if self.owner.journal is not None and request.pending:
                await self._keep(request, held)  # for a decision after a leave or restart
            return
        self._gets[rid] = message
        answered = asyncio.Event()
        self._answered[rid] = answered
        self.audit.request(request)
        request.status = RequestStatus.ACCEPTED
        request.decided_by = "public: depends on no private data"
        request.decided_at = time.time()
        self.audit.decision(request)
        self._on_decision(request)
        await self._reply(message.call_id, {"request_id": rid, "status": "accepted"})
        answered.set()

    async def pend(self, message: GetRequest | DPQuery, request: Request) -> asyncio.Event:
        """Register ``request`` as pending, its value not yet known (handlers wait for
        ``mark_ready``), and answer the scientist "pending". Returns the event to set
        once the value (or its failure) is held."""
        rid = request.request_id
        ready = asyncio.Event()
        request.ready = False
        self._gets[rid] = message
        self._snaps[rid] = ready
        self._mine.add(rid)
        if len(self._mine) > 2 * self.limits.max_requests:  # keep those the queue remembers
            remembered = {q.request_id for q in self.requests.all()}
            self._mine &= remembered
        self.owner.submit(request, self)
        await self._reply(message.call_id, {"request_id": rid, "status": "pending"})
        return ready

    def _hold(
        self, head: dict[str, Any], payload: Any, message: GetRequest, *, private: bool
    ) -> _Held:
        max_bytes = getattr(message, "max_bytes", None)
        if head.get("ok") is not True or payload is None:
            info = head.get("error")
            return _Held(None, False, _clean_error(info), max_bytes, private)
        size = len(payload)
        held = self.held_bytes if private else self.public_held_bytes
        if held + size > self.limits.max_pending_bytes:
            error = _refused_info("get", "the owner's memory for values awaiting a decision "
                                  "is used up")  # fmt: skip
            return _Held(None, False, error, max_bytes, private)
        if private:
            self.held_bytes += size
        else:
            self.public_held_bytes += size
        return _Held(payload, bool(head.get("module")), None, max_bytes, private)

    def _hold_value(self, payload: bytes) -> _Held:
        """A DP release computed in the monitor, held for its request. Never refused for
        room: a refusal that depended on the private values held beside it would tell of
        them. It needs no cap of its own: its size follows from the query (at most
        ``MAX_BINS`` counts), and pending requests are capped in number."""
        self.dp_held_bytes += len(payload)
        return _Held(bytearray(payload), False, None, None, True, dp=True)

    def _hold_failure(self, info: dict[str, Any]) -> _Held:
        return _Held(None, False, _clean_error(info), None, True)

    def _release_hold(self, held: _Held, keeping: bool = False) -> None:
        """Give back the hold's budget and its memory (``keeping``: a queued journal write
        still takes the value to disk, then lets it go)."""
        if held.payload is not None and held.counted:
            if held.dp:
                self.dp_held_bytes -= len(held.payload)
            elif held.private:
                self.held_bytes -= len(held.payload)
            else:
                self.public_held_bytes -= len(held.payload)
            held.counted = False
        if not keeping:
            held.payload = None

    def _fill(self, request: Request, held: _Held) -> None:
        """Size and elements from the value itself, decoded here under strict limits."""
        if held.payload is None:
            request.error = _error_text(held.error)
            return
        request.size_bytes = len(held.payload)
        try:
            value = self._decode(held, borrow=True)
        except DuetError as exc:
            held.error = _refused_info("get", "the worker sent an unreadable value")
            self._release_hold(held)
            request.error = f"unreadable value from the worker: {exc}"
            return
        if isinstance(value, torch.nn.Module):
            request.elements = sum(p.numel() for p in value.parameters())
        elif isinstance(value, dict) and request.dp is not None:
            request.elements = len(value.get("counts", ())) + 1
        else:
            elements = elements_of(value)
            request.elements = int(min(elements, 2**62))
        fitted = self._fitted.pop(request.request_id, None)
        if request.dp is None and not math.isinf(request.aggregation):
            request.checks = self.disclosure.check(value, request.ops, fitted, request.aggregation)

    def _decode(self, held: _Held, *, borrow: bool = False) -> Any:
        """The held value, decoded under strict limits; ``borrow``: tensors view the held
        bytes (no copy) and must not outlive this call's user."""
        assert held.payload is not None
        limits = codec.DecodeLimits(max_bytes=max(1, len(held.payload)), borrow_buffers=borrow)
        value = codec.decode(held.payload if borrow else bytes(held.payload), limits=limits)
        if held.module:
            if not isinstance(value, dict):
                raise ProtocolError("a module release must be a module spec")
            return spec_to_module(value)
        return value

    def _preview(self, request_id: str) -> Any:
        held = self._held.get(request_id)
        if held is None and request_id in self._snaps:
            raise DuetError("the value is still being computed; preview again in a moment")
        if held is None:
            raise DuetError("the value is no longer held: the request was decided")
        if held.payload is None:
            raise RemoteError(f"the computation failed: {_error_text(held.error)}")
        return self._decode(held)

    async def _keep(self, request: Request, held: _Held) -> None:
        """Journal a request left waiting, with its value (from a thread; a delivery
        waits for it, so a value delivered is never left kept)."""
        rid = request.request_id
        keeping = asyncio.wrap_future(self.owner.later(self._keep_now, request, held))
        self._keeping[rid] = keeping
        try:
            if await keeping:
                self._kept.add(rid)
        finally:
            self._keeping.pop(rid, None)

    def _keep_now(self, request: Request, held: _Held) -> bool:
        """On the journal's writer thread: keep the value if it is still held (a value let go
        meanwhile, decided or delivered, is not kept, and its memory is not pinned)."""
        payload = held.payload
        if payload is None and held.error is None:
            return False
        return self.owner.keep(request, payload, module=held.module, failure=held.error)

    def _on_decision(self, request: Request) -> bool:
        """Called once per request when it leaves pending, from any thread; False if this
        session can no longer deliver it (the owner then journals the decision)."""
        if self.loop is None or self._closed:
            return False
        self.loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(self._deliver(request))
        )  # fmt: skip
        return True

    async def _deliver(self, request: Request) -> None:
        answered = self._answered.pop(request.request_id, None)
        if answered is not None:
            await answered.wait()
        ready = self._snaps.pop(request.request_id, None)
        if ready is not None:
            await ready.wait()  # decided before the value was held: wait for it
        denial = self.dp.settle(request) if request.dp is not None else None
        if self.owner.journal is not None and request.request_id in self._mine:
            # written behind, in order after the value was kept (the audit log already
            # holds the decision); the delivery does not wait for the disk, except when a
            # handler's quota counts it: that count must survive a crash
            written = self.owner.later(self.owner.journal_decision, request)
            handler = request.handler
            if handler is not None and handler.max_requests is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(written)
        if request.status is not RequestStatus.ACCEPTED:
            self._kept.discard(request.request_id)  # the journal frees it with the decision
        get = self._gets.pop(request.request_id, None)
        held = self._held.pop(request.request_id, None)
        if get is None or held is None:
            return
        try:
            if denial is not None:
                if self.owner.journal is not None:
                    self.owner.later(self.owner.overrule, request, denial[:4000])
                decision = Decision(request_id=request.request_id, status="denied",
                                    reason=denial[:4000])  # fmt: skip
                await self._send_quietly(decision)
                return
            await self._send_decision(request, held)
        finally:
            self._release_hold(held)

    async def _send_decision(self, request: Request, held: _Held) -> bool:
        """Answer a decided request; whether a value (or its failure) reached the scientist."""
        rid = request.request_id
        status = request.status
        if status is not RequestStatus.ACCEPTED:
            denied = "denied" if status is RequestStatus.DENIED else "expired"
            await self._send_quietly(
                Decision(request_id=rid, status=denied, reason=request.decision_reason or "")
            )
            return False
        if held.payload is None:
            error = held.error or _refused_info("get", "failed")
            if request.aggregation != float("inf"):
                where = f"{error['where']}: " if "where" in error else ""
                error = {**{k: error[k] for k in ("code", "type", "op") if k in error},
                         "message": f"{where}the computation failed; {WITHHELD}"}  # fmt: skip
            self.audit.release(object_id=request.object_id, request_id=rid, nbytes=0,
                               sha256="error")  # fmt: skip
            return await self._send_quietly(
                Decision(request_id=rid, status="accepted", error=error)
            )
        if held.max_bytes is not None and len(held.payload) > held.max_bytes:
            await self._send_quietly(Decision(
                request_id=rid, status="denied",
                reason=f"the value is larger than the max_bytes={held.max_bytes} you set",
            ))  # fmt: skip
            return False
        payload = held.payload
        digest = getattr(payload, "sha256", "") or _sha256(payload)  # hashed as it arrived
        self.audit.release(object_id=request.object_id, request_id=rid, nbytes=len(payload),
                           sha256=digest)  # fmt: skip
        self._show_locally(request, held)
        sent = await self._send_quietly(
            Decision(request_id=rid, status="accepted", module=held.module),
            attachment=memoryview(payload),
        )
        if sent and (rid in self._keeping or rid in self._kept):
            # queued after the keep (the writer runs in order): nothing is left on disk
            self._kept.discard(rid)
            self.owner.later(self.owner.delivered, rid)
        return sent

    def _show_locally(self, request: Request, held: _Held) -> None:
        handler = getattr(request, "handler", None)
        if handler is None or not (handler.print_local or handler.log_local):
            return
        try:
            value = self._decode(held)
        except DuetError:
            return
        if handler.print_local:
            print(f"[duet] released {request.lineage} = {value}")
        if handler.log_local:
            log.info("released %s = %s", request.lineage, value)

    async def _send_error(self, call_id: int, info: dict[str, Any]) -> None:
        with contextlib.suppress(PeerClosed, ProtocolError):
            await self.endpoint.send_error(call_id, info)

    # -- what the worker holds (for tests and diagnostics) ------------------------------

    def holdings(self, timeout: float = 30.0) -> Holdings:
        """What the worker holds for the peer now, after everything queued before this
        call; from any thread but the session's loop. Reported by the (untrusted) worker."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(self._holdings(), self.loop).result(timeout)

    async def _holdings(self) -> Holdings:
        done = asyncio.Event()
        self._push(done)  # after every message that came before
        await done.wait()
        head, _ = await self.worker.ask({"t": "sync", "detail": True})
        ids = head.get("ids") if isinstance(head.get("ids"), list) else []
        return Holdings(int(head.get("objects", 0)), int(head.get("bytes", 0)), frozenset(ids),
                        frozenset(self._failed))  # fmt: skip

    # -- closing ------------------------------------------------------------------------

    async def close(self) -> None:
        """Close once; every caller waits for the same closing, which no caller's
        cancellation cuts short."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._closed = True
        self._push(_STOP)
        self._space.set()
        with contextlib.suppress(Exception):
            await self.connection.close()
        await self.endpoint.close()
        for task in self._tasks:
            task.cancel()
        self._withdraw_dp_requests()
        await self._finish_values_being_computed()
        self._let_go_of_held_values()
        self.dp.close()
        self.owner.detach(self)
        await self.worker.close()
        self.audit.event("disconnected", duet_id=self.connection.duet_id)
        if self._owns_owner:
            self.owner.close()

    async def _finish_values_being_computed(self) -> None:
        """A standing host keeps a departed scientist's pending requests: values still being
        computed are waited for (a while), so the owner can decide them later."""
        if self.owner.journal is None or not self._snaps:
            return
        waits = [asyncio.ensure_future(event.wait()) for event in self._snaps.values()]
        _, late = await asyncio.wait(waits, timeout=min(CLOSE_GRACE, self.limits.max_op_seconds))
        for wait in late:
            wait.cancel()
        await asyncio.sleep(0)  # each value's keep is queued before the session lets go

    def _let_go_of_held_values(self) -> None:
        """Values held for this session's undecided requests are dropped with it (a standing
        host keeps them in its journal; previews then read them there)."""
        for rid, held in self._held.items():
            self._release_hold(held, keeping=rid in self._keeping)
        self._held.clear()
        self._fitted.clear()
        self._gets.clear()
        for event in (*self._snaps.values(), *self._answered.values()):
            event.set()  # deliveries waiting on them find nothing held, and end
        self._snaps.clear()
        self._answered.clear()
        for rid in self._mine:
            with contextlib.suppress(KeyError):
                request = self.requests[rid]
                if request.pending:
                    request._preview = functools.partial(self.owner.preview_kept, rid)

    def _withdraw_dp_requests(self) -> None:
        """A DP query's budget is reserved by this session: undecided ones end with it
        (none may be released later without its debit)."""
        for rid, message in list(self._gets.items()):
            if isinstance(message, DPQuery):
                with contextlib.suppress(DuetError, KeyError):
                    self.requests.expire(rid, "the scientist left before the decision")

    # -- the scientist's own requests ---------------------------------------------------

    async def _on_list_requests(self, message: ListRequests) -> None:
        """The scientist's requests (this session's and, on a standing host, earlier
        sessions'), newest first; a private value's size is theirs only once accepted."""
        client_id = self.connection.client_id
        if self.owner.journal is not None:
            stored = await asyncio.wrap_future(
                self.owner.later(self.owner.journal.for_client, client_id))  # fmt: skip
            rows = [_row_of_stored(r) for r in stored]
            known = {row["request_id"] for row in rows}
            waiting = [r for r in self.requests.pending()
                       if r.request_id in self._mine and r.request_id not in known]  # fmt: skip
            rows = [_row_of_request(r) for r in reversed(waiting)] + rows
        else:
            mine = [r for r in self.requests.all() if r.request_id in self._mine]
            rows = [_row_of_request(r) for r in reversed(mine)]
        await self._reply(message.call_id, rows[:1000])

    async def _on_fetch_release(self, message: FetchRelease) -> None:
        """Send again a value accepted while its scientist was away (a standing host keeps
        it for ``keep_released`` seconds, then frees it)."""
        jobs = self.owner.jobs
        if jobs is not None and await asyncio.to_thread(
            jobs.service.is_job_request, message.request_id
        ):
            await self._send_error(message.call_id, {"code": "not_found", "type": "KeyError",
                "message": f"request {message.request_id} is an offline job's output: "
                "collect it with its job (duet.jobs)"})  # fmt: skip
            return
        journal = self.owner.journal
        claimed = None if journal is None else await asyncio.wrap_future(
            self.owner.later(journal.claim, self.connection.client_id, message.request_id))  # fmt: skip
        if claimed is None:
            await self._send_error(message.call_id, {"code": "not_found", "type": "KeyError",
                "message": f"no request {message.request_id} of yours is kept here"})  # fmt: skip
            return
        stored, payload = claimed
        rid = stored.request_id
        if stored.status != "accepted":
            await self._reply(message.call_id, {"request_id": rid, "status": stored.status,
                                                "reason": stored.decision_reason})  # fmt: skip
            return
        if payload is None and stored.failure is None:
            await self._reply(message.call_id, {"request_id": rid, "status": "gone"})
            return
        await self._reply(message.call_id, {"request_id": rid, "status": "accepted"})
        request = Request(
            request_id=rid, object_id=stored.object_id, name=stored.name, reason="",
            lineage=stored.lineage, ops=stored.ops, tags=stored.tags, size_bytes=0, elements=0,
            aggregation=stored.aggregation, status=RequestStatus.ACCEPTED,
        )  # fmt: skip
        held = _Held(None if payload is None else bytearray(payload), stored.module,
                     stored.failure, None)  # fmt: skip
        if await self._send_decision(request, held):
            self.owner.later(self.owner.delivered, rid)


def _row_of_stored(stored: Any) -> dict[str, Any]:
    accepted = stored.status == "accepted"
    return {
        "request_id": stored.request_id, "name": stored.name, "reason": stored.reason,
        "status": stored.status, "requested_at": stored.requested_at,
        "decided_at": stored.decided_at, "decision_reason": stored.decision_reason,
        "dp": bool(stored.dp),
        "size_bytes": stored.size_bytes if accepted and not stored.dp else None,
        "kept": bool(accepted and stored.has_value and not stored.delivered),
    }  # fmt: skip


def _row_of_request(request: Request) -> dict[str, Any]:
    accepted = request.status is RequestStatus.ACCEPTED
    return {
        "request_id": request.request_id, "name": request.name, "reason": request.reason,
        "status": request.status.value, "requested_at": request.requested_at,
        "decided_at": request.decided_at, "decision_reason": request.decision_reason,
        "dp": request.dp is not None, "size_bytes": request.size_bytes if accepted else None,
        "kept": False,
    }  # fmt: skip


def _compact(action: Any, private: bool) -> list[Any]:
    """An action as the worker takes it: a list, cheaper to encode than a map."""
    return [action.op, action.result, action.target, action.args, action.kwargs,
            action.no_grad, private]  # fmt: skip


def _sha256(payload: Any) -> str:
    return hashlib.sha256(payload).hexdigest()


def _upload_bytes(message: Upload) -> int:
    value = message.value
    return value_nbytes(value) if isinstance(value, torch.Tensor) else 0


def _refused_info(op: str, why: str) -> dict[str, Any]:
    return {"code": "not_allowed", "type": "OperationNotAllowed", "op": op,
            "message": f"{op} was refused: {why}"}  # fmt: skip


def _lost(cause: str) -> str:
    return (f"the owner's worker was stopped ({cause}); the objects you made are lost: "
            "compute them again")  # fmt: skip


def _lost_info(cause: str) -> dict[str, Any]:
    return {"code": "remote_error", "type": "WorkerLost", "message": _lost(cause)}


def _clean_error(info: Any) -> dict[str, Any]:
    """An error description from the worker, reduced to short plain strings."""
    if not isinstance(info, dict):
        return {"code": "remote_error", "type": "RemoteError", "message": "failed"}
    clean = {}
    for key in ("code", "type", "op", "message", "where"):
        value = info.get(key)
        if isinstance(value, str):
            clean[key] = value[:500]
    clean.setdefault("code", "remote_error")
    clean.setdefault("message", "failed")
    return clean


def _error_text(info: dict[str, Any] | None) -> str:
    if not info:
        return "failed"
    return f"{info.get('type', 'Error')}: {info.get('message', '')}"
