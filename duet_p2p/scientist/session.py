"""The scientist's side of a session: queues actions, asks for values, lists the store.

The owner is not trusted with the scientist's memory or terminal: decisions are kept only
for requests this side made (plus a small bounded buffer of ones that arrive just before
their reply is handled), a get takes no value larger than its ``max_bytes``, the transport
takes no message larger than a get may need, and every text the owner chose passes through
:func:`duet_p2p.text.printable` before a person sees it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import logging
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from duet_p2p.allowlist import DEFAULT_ALLOWLIST, AllowedOp, ReturnKind
from duet_p2p.connect import Connection
from duet_p2p.errors import (
    DuetError,
    OperationNotAllowed,
    PeerClosed,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
    ValueTooLarge,
)
from duet_p2p.lineage import render_call
from duet_p2p.modules import module_to_spec, spec_to_module
from duet_p2p.rpc import codec
from duet_p2p.rpc.dp_spec import QuerySpec
from duet_p2p.rpc.endpoint import _HEADER_LENGTH, _WITH_ATTACHMENT, Endpoint
from duet_p2p.rpc.errors import raise_from_info
from duet_p2p.rpc.messages import (
    MAX_ACTIONS_PER_MESSAGE,
    PROTOCOL_VERSION,
    Action,
    Actions,
    BudgetQuery,
    CancelJob,
    CancelRequest,
    Decision,
    Delete,
    DPQuery,
    FetchJobResult,
    FetchRelease,
    GetRequest,
    Hello,
    JobResult,
    ListJobs,
    ListRequests,
    Message,
    StoreQuery,
    SubmitJob,
    Upload,
)
from duet_p2p.rpc.ops import INDEX_OP
from duet_p2p.scientist import plans
from duet_p2p.scientist.pointer import Pointer, pointer_class
from duet_p2p.scientist.remote_store import entry_from_peer
from duet_p2p.scientist.requests import RequestHandle
from duet_p2p.text import printable
from duet_p2p.transport.base import Buffer, MessageTransport
from duet_p2p.transport.channel import ChannelOptions

log = logging.getLogger(__name__)
_NO_GRAD: contextvars.ContextVar[bool] = contextvars.ContextVar("duet_no_grad", default=False)
DELETE_BATCH = 512
DELETE_INTERVAL = 0.5
CALL_TIMEOUT = 30.0
DEFAULT_MAX_GET_BYTES = 2 * 1024**3
"""Largest encoded value a get takes unless its ``max_bytes`` says otherwise; a session's
``ScientistCore.max_get_bytes`` starts from this."""
MESSAGE_HEADROOM_BYTES = 1024**2
"""Room above a get's ``max_bytes`` for the rest of the message that carries the value."""
EARLY_DECISIONS = 256
"""Most decisions kept for request IDs this side does not know (yet)."""
EARLY_DECISION_BYTES = 1024**2
"""Bytes of such decisions kept beyond the ``max_bytes`` of the gets awaiting a reply."""
DP_VALUE_BYTES = 1024**2
"""Largest differentially private result taken (a histogram of 10,000 bins fits)."""
MAX_ERROR_CHARS = 1000
"""Longest text of the owner's kept in an exception (its message, a reason)."""
_OP_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_REQUEST_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


class ScientistCore:
    """Scientist-side protocol handling; thread-safe entry points for pointers."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.max_get_bytes = DEFAULT_MAX_GET_BYTES
        """Largest encoded value a get takes when it gives no ``max_bytes``."""
        self._transport_limit = _transport_limit(connection.transport)
        self._incoming = _MeteredTransport(connection.transport)
        self.endpoint = Endpoint(self._incoming, role="scientist", limits=codec.DecodeLimits(
            max_bytes=self._transport_limit, max_tensor_elements=2**40,
        ))  # fmt: skip
        self._incoming_cap = 0
        self._allow_incoming(self.max_get_bytes)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[Action] = []
        self._outbox_lock = threading.Lock()
        self._flush_pending = False
        self._send_lock: asyncio.Lock | None = None
        self._deletes: collections.deque[str] = collections.deque()
        self._decisions: dict[str, _Awaited] = {}
        """Requests this side made and still awaits, by request ID."""
        self._early = _EarlyDecisions(EARLY_DECISIONS)
        self._gets_in_flight: dict[int, int] = {}
        """``max_bytes`` of each get whose request ID is not known yet, by call ID."""
        self._allowlist: dict[str, str] = {}
        self.store_version = 0
        self._closed = False
        self._gc_task: asyncio.Task[None] | None = None
        self.show_progress = _interactive_stderr()
        """Show a progress bar on stderr while a large value arrives."""
        self._progress_bar: Any = None
        self._job_results: dict[str, tuple[asyncio.Future[bytes], int]] = {}
        self.job_changes = 0
        """How many job changes the host has announced (``wait_job_change``)."""

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()
        self.endpoint.on_closed = self._on_connection_lost
        if hasattr(self.connection.transport, "on_progress"):
            self.connection.transport.on_progress = self._on_progress
        self.endpoint.on("decision", self._on_decision)
        self.endpoint.on("store_changed", self._on_store_changed)
        self.endpoint.on("job_result", self._on_job_result)
        self.endpoint.on("job_changed", self._on_job_changed)
        self._job_changed = asyncio.Event()
        hello = Hello(
            version=PROTOCOL_VERSION, role="scientist", library="duet_p2p",
            max_message_bytes=self._incoming_cap,
        )  # fmt: skip
        peer = await self.endpoint.start(hello)
        self._allowlist = _usable_allowlist(peer.allowlist)
        self._gc_task = asyncio.ensure_future(self._gc_loop())

    # -- thread-safe entry points ---------------------------------------------------------

    def sync(self, coro: Any, timeout: float | None = None) -> Any:
        """Run ``coro`` on the session's loop from a plain (or Jupyter) thread."""
        assert self.loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise DuetError(
                "this blocking call would stall the event loop the session runs on; "
                "use the async form (await ptr.get_async(...))"
            )
        if plans.current_recording() is not None:
            coro.close()
            raise DuetError(
                "a plan runs without round trips: get values and look up the store "
                "outside the plan function"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except (KeyboardInterrupt, concurrent.futures.TimeoutError):
            future.cancel()
            raise

    def allowed(self, path: str) -> AllowedOp | None:
        """The allowlist entry for ``path`` if the owner allows it."""
        kind = self._allowlist.get(path)
        if kind is None:
            return None
        if path in DEFAULT_ALLOWLIST:
            return DEFAULT_ALLOWLIST.get(path)
        return AllowedOp(path=path, returns=ReturnKind(kind))

    def allowed_paths(self, prefix: str) -> list[str]:
        return [p for p in self._allowlist if p.startswith(prefix)]

    def run(
        self,
        op: str,
        *,
        target: Pointer | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: str | None = None,
    ) -> Pointer:
        """Queue ``op`` (or record it, inside a plan) and return its result's pointer at once."""
        internal = op == INDEX_OP or op in plans.PLAN_OPS
        entry = None if internal else self.allowed(op)
        if not internal and entry is None:
            raise OperationNotAllowed(f"{op} is not on the owner's allowlist")
        if kind is None:
            auto = entry is None or op == "torch.nn.Module.__call__"
            kind = "auto" if auto else str(entry.returns)  # type: ignore[union-attr]
        wire_args = [_to_wire(a) for a in args]
        wire_kwargs = {k: _to_wire(v) for k, v in kwargs.items()}
        try:  # refuse here: an argument that cannot be sent would lose the whole batch
            codec.encode_parts([wire_args, wire_kwargs])  # checks; large payloads not copied
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{op}: an argument cannot be sent to the owner: {exc}") from None
        result_id = uuid.uuid4().hex
        reference = codec.ObjectRef(target.id) if target is not None else None
        names = {target.id: target._expression} if target is not None else {}
        for value in (*args, *kwargs.values()):
            if isinstance(value, Pointer):
                names[value.id] = value._expression
        expression = render_call(
            op, reference, wire_args, wire_kwargs, names, attribute=bool(entry and entry.attribute)
        )
        action = Action(
            op=op,
            result=result_id,
            target=reference,
            args=wire_args,
            kwargs=wire_kwargs,
            no_grad=_NO_GRAD.get(),
        )
        recording = plans.current_recording()
        if recording is not None:  # a plan's step: its result lives only while the plan runs
            if op in plans.PLAN_OPS:
                raise OperationNotAllowed("a plan cannot define or run another plan")
            recording.actions.append(action)
            return pointer_class(kind)(
                self, result_id, expression=expression, kind=kind, owned=False
            )
        self._queue(action)
        return pointer_class(kind)(self, result_id, expression=expression, kind=kind, owned=True)

    def plan(self, function: Any, name: str | None = None) -> plans.RemotePlan:
        """Record ``function``'s remote ops once as a plan the owner replays per call."""
        return plans.record_plan(self, function, name)

    @contextlib.contextmanager
    def no_grad(self) -> Iterator[None]:
        """Ops queued inside run owner-side under ``torch.no_grad()`` (this thread only)."""
        token = _NO_GRAD.set(True)
        try:
            yield
        finally:
            _NO_GRAD.reset(token)

    def _queue(self, action: Action) -> None:
        if self._closed:
            raise PeerClosed("the session is closed")
        with self._outbox_lock:
            self._outbox.append(action)
            if self._flush_pending:
                return
            self._flush_pending = True
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._spawn_flush)

    def _spawn_flush(self) -> None:
        asyncio.ensure_future(self.flush())

    def release(self, object_id: str) -> None:
        """A pointer was dropped: free its object on the owner's side (batched)."""
        if not self._closed:
            self._deletes.append(object_id)

    def pointer_for(self, entry: dict[str, Any]) -> Pointer:
        """A pointer to an object the owner hosts (never frees it); ``entry`` is one of
        ``store_list``'s, already checked."""
        kind = "module" if entry.get("kind") == "module" else "tensor"
        tags = entry.get("tags") or []
        usable = bool(tags) and str(tags[0]).isidentifier() and len(tags[0]) <= 64
        label = tags[0] if usable else f"obj_{entry['id'][:8]}"
        return pointer_class(kind)(self, entry["id"], expression=label, kind=kind, owned=False)

    # -- on the loop ------------------------------------------------------------------------

    async def flush(self, *, deletes: bool = False) -> None:
        """Send every queued action, then the deletes of pointers dropped before them
        (a batch's worth, or all with ``deletes``): a delete never overtakes an action
        that makes or reads its object."""
        assert self._send_lock is not None
        async with self._send_lock:
            dropped = len(self._deletes)  # each was queued after every action using it
            with self._outbox_lock:
                batch, self._outbox = self._outbox, []
                self._flush_pending = False
            for start in range(0, len(batch), MAX_ACTIONS_PER_MESSAGE):
                chunk = batch[start : start + MAX_ACTIONS_PER_MESSAGE]
                await self.endpoint.send(Actions(actions=chunk))
            if deletes or dropped >= DELETE_BATCH:
                await self._send_deletes(dropped)

    async def _send_deletes(self, limit: int | None = None) -> None:
        ids = []
        count = min(limit if limit is not None else len(self._deletes), 100_000)
        while self._deletes and len(ids) < count:
            ids.append(self._deletes.popleft())
        if ids:
            await self.endpoint.send(Delete(ids=ids))

    async def _gc_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(DELETE_INTERVAL)
            if self._deletes:
                with contextlib.suppress(PeerClosed):
                    await self.flush(deletes=True)

    async def request(
        self, object_id: str, reason: str, *, delete: bool = False, max_bytes: int | None = None
    ) -> RequestHandle:
        """Ask for a value of at most ``max_bytes`` encoded bytes (default
        ``max_get_bytes``); returns once the owner has registered the request."""
        limit = self._get_limit(max_bytes)

        def get(call_id: int) -> Message:
            return GetRequest(call_id=call_id, object_id=object_id, reason=reason[:4000],
                              delete=delete, max_bytes=limit)  # fmt: skip

        return await self._ask(get, object_id, limit, RequestHandle)

    async def dp_query(
        self, dataset_id: str, query: QuerySpec, reason: str, handle: type[RequestHandle]
    ) -> RequestHandle:
        """Ask for a differentially private statistic of a hosted dataset."""

        def ask(call_id: int) -> Message:
            return DPQuery(call_id=call_id, dataset=dataset_id, query=query, reason=reason[:4000])

        return await self._ask(ask, dataset_id, DP_VALUE_BYTES, handle)

    async def dp_budget(self) -> Any:
        """The owner's account of this scientist's privacy budgets (checked by the caller)."""
        return await self._call(BudgetQuery(call_id=self.endpoint.next_call_id()))

    async def my_requests(self) -> Any:
        """The owner's list of this scientist's requests (checked by the caller)."""
        return await self._call(ListRequests(call_id=self.endpoint.next_call_id()))

    # -- offline jobs on a standing host --------------------------------------------------

    async def submit_job(self, wire: bytes) -> Any:
        """Hand a signed job to the host; its row (checked by the caller)."""
        return await self._call(SubmitJob(call_id=self.endpoint.next_call_id(), job=wire))

    async def list_jobs(self) -> Any:
        """The host's rows of this scientist's jobs (checked by the caller)."""
        return await self._call(ListJobs(call_id=self.endpoint.next_call_id()))

    async def cancel_job(self, job_id: str) -> Any:
        return await self._call(CancelJob(call_id=self.endpoint.next_call_id(), job_id=job_id))

    async def fetch_job_result(
        self, job_id: str, max_bytes: int, timeout: float | None = None
    ) -> tuple[Any, bytes | None]:
        """The job's row, and its result bundle when released (at most ``max_bytes``)."""
        self._allow_incoming(max_bytes)
        assert self.loop is not None
        future: asyncio.Future[bytes] = self.loop.create_future()
        future.add_done_callback(_mark_retrieved)
        self._job_results[job_id] = (future, max_bytes)
        try:
            row = await self._call(FetchJobResult(call_id=self.endpoint.next_call_id(),
                                                  job_id=job_id))  # fmt: skip
            size = row.get("size") if isinstance(row, dict) else None
            if size is None:
                return row, None
            return row, await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            self._job_results.pop(job_id, None)
            future.cancel()

    def _on_job_changed(self, _message: Any) -> None:
        self.job_changes += 1
        self._job_changed.set()

    async def wait_job_change(self, seen: int, timeout: float) -> None:
        """Until the host announces a job change after the ``seen``-th, or ``timeout`` s."""
        assert self.loop is not None
        end = self.loop.time() + timeout
        while self.job_changes == seen and not self.endpoint.closed_event.is_set():
            self._job_changed.clear()
            left = end - self.loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._job_changed.wait(), left)

    def _on_job_result(self, message: JobResult) -> None:
        waiting = self._job_results.get(message.job_id)
        if waiting is None or waiting[0].done():
            return
        future, max_bytes = waiting
        value = message.value
        if not isinstance(value, bytes | bytearray | memoryview) or len(value) > max_bytes:
            future.set_exception(ProtocolError("the host sent a malformed or oversize result"))
        else:
            future.set_result(bytes(value))

    async def fetch_release(
        self, request_id: str, max_bytes: int | None = None, timeout: float | None = None
    ) -> Any:
        """The value of one of this scientist's requests that was accepted while they were
        away (a standing host keeps it for a while). Raises PermissionDenied if it was
        denied, RequestTimeout if it is still pending or expired, DuetError if it is no
        longer kept."""
        limit = self._get_limit(max_bytes)
        self._allow_incoming(limit)
        future = self.decision_future(request_id, limit)
        call_id = self.endpoint.next_call_id()
        self._gets_in_flight[call_id] = limit
        try:
            reply = await self._call(FetchRelease(call_id=call_id, request_id=request_id))
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._gets_in_flight[call_id]
            self._early.trim(self._early_budget())
        status = reply.get("status") if isinstance(reply, dict) else None
        if status == "accepted":
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                future.cancel()
                raise RequestTimeout(f"the value of {request_id} did not arrive in time") from None
        future.cancel()
        said = printable(reply.get("reason", "") if isinstance(reply, dict) else "", 500)
        if status == "denied":
            raise PermissionDenied(f"request {request_id} was denied: {said}", reason=said)
        if status == "pending":
            raise RequestTimeout(f"request {request_id} is still waiting for the owner")
        if status in ("expired", "cancelled"):
            raise RequestTimeout(f"request {request_id} ended undecided ({status}): {said}")
        if status == "gone":
            raise DuetError(
                f"the value of request {request_id} was already fetched, or is no longer kept"
            )
        raise ProtocolError("the owner sent a malformed reply to a fetch")

    async def _ask(
        self, make: Any, object_id: str, limit: int, handle: type[RequestHandle]
    ) -> RequestHandle:
        await self.flush()
        self._allow_incoming(limit)
        call_id = self.endpoint.next_call_id()
        self._gets_in_flight[call_id] = limit
        try:
            reply = await self._call(make(call_id))
            return handle(self, self._new_request_id(reply), object_id, limit)
        finally:
            del self._gets_in_flight[call_id]
            self._early.trim(self._early_budget())

    def _get_limit(self, max_bytes: int | None) -> int:
        if max_bytes is None:
            return self.max_get_bytes
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
            raise TypeError(f"max_bytes must be an int, not {type(max_bytes).__name__}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        return max_bytes

    def _new_request_id(self, reply: Any) -> str:
        """The request ID in the owner's reply to a get: well formed, and not one in use."""
        request_id = reply.get("request_id") if isinstance(reply, dict) else None
        if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
            raise ProtocolError("the owner sent a malformed reply to a request")
        if request_id in self._decisions:
            raise ProtocolError("the owner gave a new request the ID of one still pending")
        return request_id

    async def _call(self, message: Message) -> Any:
        """``endpoint.call``; an error the owner sent is raised with its text printable."""
        try:
            return await self.endpoint.call(message, timeout=CALL_TIMEOUT)
        except DuetError as exc:
            _clean_error(exc)
            raise

    def _allow_incoming(self, max_bytes: int) -> None:
        """Let the transport take a message carrying a value of ``max_bytes`` (within its
        own configured limit). The cap starts at the default get's and only rises: the
        reassembler refuses (and closes the connection on) a message announced larger,
        before buffering any of it."""
        cap = min(max_bytes + MESSAGE_HEADROOM_BYTES, self._transport_limit)
        if cap <= self._incoming_cap:
            return
        self._incoming_cap = cap
        # The data-channel transport has no public setter; its reassembler reads this field
        # at each message's first frame (the in-memory transport has none).
        reassembler = getattr(self.connection.transport, "_reassembler", None)
        if reassembler is not None:
            reassembler.max_message_bytes = cap

    def _early_budget(self) -> int:
        return EARLY_DECISION_BYTES + sum(self._gets_in_flight.values())

    def decision_future(self, request_id: str, max_bytes: int | None = None) -> asyncio.Future[Any]:
        """The future a handle waits on; a decision that came before it settles it now.
        The request is forgotten once decided (the handle keeps the future)."""
        awaited = self._decisions.get(request_id)
        if awaited is not None:
            return awaited.future
        assert self.loop is not None
        future = self.loop.create_future()
        # A handle nobody waits on must not log "exception was never retrieved".
        future.add_done_callback(_mark_retrieved)
        limit = self.max_get_bytes if max_bytes is None else max_bytes
        awaited = self._decisions[request_id] = _Awaited(future, limit)
        future.add_done_callback(lambda _: self._forget(request_id, awaited))
        early = self._early.pop(request_id)
        if early is not None:
            self._settle(awaited, *early)
        elif self.endpoint.closed_event.is_set():
            future.set_exception(self._lost_error(None))
        return future

    def _forget(self, request_id: str, awaited: _Awaited) -> None:
        if self._decisions.get(request_id) is awaited:
            del self._decisions[request_id]

    def _lost_error(self, error: BaseException | None) -> PeerClosed:
        if self._closed:
            return PeerClosed("the session closed before a decision")
        cause = f" ({printable(error, MAX_ERROR_CHARS)})" if error is not None else ""
        return PeerClosed(
            f"the connection to the owner was lost before the value arrived{cause}; "
            "join a new session and ask again"
        )

    def _on_connection_lost(self, error: BaseException) -> None:
        """The receive loop ended: nothing more will arrive, so fail every waiting get."""
        self._close_progress()
        self._early.clear()
        for awaited in list(self._decisions.values()):
            if not awaited.future.done():
                awaited.future.set_exception(self._lost_error(error))

    def _on_progress(self, received: int, total: int) -> None:
        if not self.show_progress:
            return
        bar = self._progress_bar
        if bar is not None and (bar.total != total or received < bar.n):
            self._close_progress()
            bar = None
        if bar is None:
            from tqdm import tqdm

            bar = self._progress_bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                file=sys.stderr, desc="receiving", mininterval=0.25,
            )  # fmt: skip
        bar.update(received - bar.n)
        if received >= total:
            self._close_progress()

    def _close_progress(self) -> None:
        bar, self._progress_bar = self._progress_bar, None
        if bar is not None:
            with contextlib.suppress(Exception):
                bar.close()

    def _on_decision(self, message: Decision) -> None:
        """Settle the request it decides; one for an unknown request ID is kept only in the
        bounded early buffer (its handle may be about to be made), else dropped."""
        nbytes = self._incoming.value_bytes
        awaited = self._decisions.get(message.request_id)
        if awaited is None:
            self._early.add(message, nbytes, self._early_budget())
        else:
            self._settle(awaited, message, nbytes)

    def _settle(self, awaited: _Awaited, message: Decision, nbytes: int) -> None:
        if awaited.future.done():
            return
        try:
            value = _decided_value(message, nbytes, awaited.max_bytes)
        except DuetError as exc:
            awaited.future.set_exception(exc)
        else:
            awaited.future.set_result(value)

    async def cancel(self, request_id: str) -> None:
        with contextlib.suppress(PeerClosed):
            await self.endpoint.send(CancelRequest(request_id=request_id))

    def _on_store_changed(self, _message: Any) -> None:
        self.store_version += 1

    async def store_list(self) -> list[dict[str, Any]]:
        """The owner's listing; entries without a well-formed ID are skipped, and every text
        is printable and bounded (see ``store_view.entry_from_peer``)."""
        entries = await self._call(StoreQuery(call_id=self.endpoint.next_call_id()))
        if not isinstance(entries, list):
            raise ProtocolError("the owner sent a malformed store listing")
        checked = (entry_from_peer(entry) for entry in entries)
        return [entry for entry in checked if entry is not None]

    async def upload(self, value: Any) -> Pointer:
        """Place a local tensor or module in the owner's process; returns its pointer."""
        import torch

        result_id = uuid.uuid4().hex
        as_module = isinstance(value, torch.nn.Module)
        if not as_module and not isinstance(value, torch.Tensor):
            raise TypeError("only tensors and modules can be sent")
        # refuses custom modules, hooks and tied weights (OperationNotAllowed, naming the part)
        wire = await asyncio.to_thread(module_to_spec, value) if as_module else value
        await self.flush()
        encoded = await asyncio.to_thread(codec.encode, wire)
        await self.endpoint.send(
            Upload(result=result_id, value=None, as_module=as_module), attachment=encoded
        )
        kind = "module" if as_module else "tensor"
        expression = f"uploaded_{kind}"
        return pointer_class(kind)(self, result_id, expression=expression, kind=kind, owned=True)

    async def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(DuetError):
            await asyncio.wait_for(self.flush(), 5.0)
        with contextlib.suppress(DuetError, TimeoutError):
            await asyncio.wait_for(self._send_deletes(), 2.0)
        self._closed = True
        if self._gc_task is not None:
            self._gc_task.cancel()
        await self.endpoint.close()
        self._early.clear()
        for awaited in list(self._decisions.values()):
            if not awaited.future.done():
                awaited.future.set_exception(PeerClosed("the session closed before a decision"))


@dataclass(frozen=True)
class _Awaited:
    """A request this side made: the future its handle waits on, and its size limit."""

    future: asyncio.Future[Any]
    max_bytes: int


class _EarlyDecisions:
    """Decisions for request IDs this side does not know yet.

    The reply to a get and its decision can be handled back to back, before the handle
    that claims the decision exists, so they cannot simply be dropped. A hostile owner can
    also send decisions nobody asked for: at most ``max_count`` are kept, within a byte
    budget (values that no waiting get could take count against it), the oldest going
    first, and with them their values.
    """

    def __init__(self, max_count: int) -> None:
        self.max_count = max_count
        self.nbytes = 0
        self._items: collections.OrderedDict[str, tuple[Decision, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, message: Decision, nbytes: int, budget: int) -> None:
        """Keep ``message`` (its value ``nbytes`` long) if it fits ``budget``; a repeated ID
        keeps the first."""
        if nbytes > budget or message.request_id in self._items:
            return
        self._items[message.request_id] = (message, nbytes)
        self.nbytes += nbytes
        self.trim(budget)

    def trim(self, budget: int) -> None:
        """Drop the oldest until at most ``max_count`` within ``budget`` bytes remain."""
        while self._items and (len(self._items) > self.max_count or self.nbytes > budget):
            _, (_, nbytes) = self._items.popitem(last=False)
            self.nbytes -= nbytes

    def pop(self, request_id: str) -> tuple[Decision, int] | None:
        item = self._items.pop(request_id, None)
        if item is not None:
            self.nbytes -= item[1]
        return item

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


class _MeteredTransport:
    """The connection's transport as the endpoint sees it, noting how many bytes of the
    message being handled are its value (the endpoint handles one message at a time, so
    a handler reads the figure for its own message)."""

    def __init__(self, inner: MessageTransport) -> None:
        self.inner = inner
        self.value_bytes = 0

    @property
    def closed(self) -> bool:
        return self.inner.closed

    async def send(self, *parts: Buffer) -> None:
        await self.inner.send(*parts)

    async def recv(self) -> memoryview:
        data = await self.inner.recv()
        self.value_bytes = _value_bytes(data)
        return data

    async def close(self) -> None:
        await self.inner.close()


def _value_bytes(data: memoryview) -> int:
    """Bytes of a message's attachment (the encoded value); the whole message when the
    value, if any, is inline (the owner always attaches one)."""
    if data.nbytes >= 5 and data[0] == _WITH_ATTACHMENT:
        (header,) = _HEADER_LENGTH.unpack(data[1:5])
        return max(0, data.nbytes - 5 - header)
    return data.nbytes


def _transport_limit(transport: Any) -> int:
    """The largest message ``transport`` was configured to take."""
    options = getattr(transport, "options", None)
    return int(getattr(options, "max_message_bytes", ChannelOptions.max_message_bytes))


def _decided_value(message: Decision, nbytes: int, max_bytes: int) -> Any:
    """The value a decision releases, or the DuetError it stands for."""
    if message.status == "denied":
        reason = printable(message.reason, MAX_ERROR_CHARS)
        shown = reason or "no reason given"
        raise PermissionDenied(f"the owner denied the request: {shown}", reason=reason)
    if message.status == "expired":
        reason = printable(message.reason, MAX_ERROR_CHARS)
        raise RequestTimeout(
            f"the request expired on the owner's side: {reason or 'no reason given'}"
        )
    if message.error is not None:  # the owner released the failure, not a value
        raise _error_from_peer(message.error)
    if nbytes > max_bytes:
        raise ValueTooLarge(
            f"the owner sent a value of {nbytes} bytes; this get takes at most {max_bytes} "
            "(get(..., max_bytes=...)), so it was dropped"
        )
    if not message.module:
        return message.value
    try:
        return spec_to_module(message.value)
    except DuetError as exc:
        raise _clean_error(exc) from None
    except Exception as exc:  # noqa: BLE001 - any malformed spec is the owner's fault
        raise ProtocolError(
            f"the owner sent a module that cannot be rebuilt ({type(exc).__name__})"
        ) from None


def _error_from_peer(info: Any) -> DuetError:
    """The local exception for error info the owner sent (e.g. RemoteError naming the op)."""
    try:
        raise_from_info(info)
    except DuetError as exc:
        return _clean_error(exc)
    return ProtocolError("the owner sent an error that describes no error")  # not reached


def _clean_error(exc: DuetError) -> DuetError:
    """``exc`` (in place) with the owner's text in its message and fields printable."""
    exc.args = (printable(str(exc), MAX_ERROR_CHARS, multiline=True),)
    for name in ("reason", "op", "error_type"):
        value = getattr(exc, name, None)
        if value is not None:
            setattr(exc, name, printable(value, MAX_ERROR_CHARS))
    return exc


def _usable_allowlist(entries: dict[str, str] | None) -> dict[str, str]:
    """The owner's allowlist without entries that name no op path or no known return kind:
    they could not be used, and their text would reach error messages."""
    kinds = {str(kind) for kind in ReturnKind}
    return {
        path: kind
        for path, kind in (entries or {}).items()
        if _OP_PATH.fullmatch(path) and kind in kinds
    }


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _interactive_stderr() -> bool:
    """Whether a progress bar on stderr would be seen (a terminal or a Jupyter kernel)."""
    stream = sys.stderr
    if stream is None:
        return False
    try:
        return stream.isatty() or "ipykernel" in sys.modules
    except (AttributeError, ValueError):
        return False


def _to_wire(value: Any) -> Any:
    """Local arguments as they go on the wire: pointers become references."""
    if isinstance(value, Pointer):
        return codec.ObjectRef(value.id)
    if isinstance(value, list):
        return [_to_wire(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_wire(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_to_wire(value.start), _to_wire(value.stop), _to_wire(value.step))
    return value
