"""The scientist's side of a session: queues actions, asks for values, lists the store."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import logging
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from duet_p2p import plans
from duet_p2p.allowlist import DEFAULT_ALLOWLIST, AllowedOp, ReturnKind
from duet_p2p.connect import Connection
from duet_p2p.errors import (
    DuetError,
    OperationNotAllowed,
    PeerClosed,
    PermissionDenied,
    RequestTimeout,
)
from duet_p2p.executor import INDEX_OP
from duet_p2p.lineage import render_call
from duet_p2p.modules import module_to_spec, spec_to_module
from duet_p2p.pointer import Pointer, pointer_class
from duet_p2p.rpc import codec
from duet_p2p.rpc.endpoint import Endpoint
from duet_p2p.rpc.messages import (
    MAX_ACTIONS_PER_MESSAGE,
    PROTOCOL_VERSION,
    Action,
    Actions,
    CancelRequest,
    Decision,
    Delete,
    GetRequest,
    Hello,
    StoreQuery,
    Upload,
)

log = logging.getLogger(__name__)
_NO_GRAD: contextvars.ContextVar[bool] = contextvars.ContextVar("duet_no_grad", default=False)
DELETE_BATCH = 512
DELETE_INTERVAL = 0.5


class RequestHandle:
    """A request for a value: poll ``status``, ``wait(timeout)``, then ``result()``."""

    def __init__(self, core: ScientistCore, request_id: str, object_id: str) -> None:
        self._core = core
        self.request_id = request_id
        self.object_id = object_id
        self._future: asyncio.Future[Any] = core.decision_future(request_id)
        # The decision may have arrived before this handle (reply and decision in one read):
        # the table keeps it until claimed here, and forgets it once decided.
        self._future.add_done_callback(lambda _: core._decisions.pop(request_id, None))

    @property
    def status(self) -> str:
        """ "pending", "accepted", "denied" or "expired"."""
        if not self._future.done():
            return "pending"
        if self._future.cancelled():
            return "expired"
        error = self._future.exception()
        if error is None:
            return "accepted"
        return "denied" if isinstance(error, PermissionDenied) else "expired"

    def wait(self, timeout: float | None = None) -> str:
        """Block until decided or ``timeout`` seconds pass; returns the status."""
        with contextlib.suppress(RequestTimeout, DuetError):
            self._core.sync(self._wait(timeout))
        return self.status

    async def _wait(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            raise RequestTimeout(self._timeout_message(timeout)) from None

    def result(self, timeout: float | None = None) -> Any:
        """The value; raises PermissionDenied, or RequestTimeout after ``timeout`` s."""
        return self._core.sync(self.result_async(timeout))

    async def result_async(self, timeout: float | None = None) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            await self._core.cancel(self.request_id)
            raise RequestTimeout(self._timeout_message(timeout)) from None

    def _timeout_message(self, timeout: float | None) -> str:
        return (
            f"the owner did not decide on request {self.request_id} within {timeout:g} s; "
            "the request was withdrawn — ask again later or ask the owner to look at "
            "duet.requests"
        )

    def __repr__(self) -> str:
        return f"<RequestHandle {self.request_id[:8]} {self.status}>"


class ScientistCore:
    """Scientist-side protocol handling; thread-safe entry points for pointers."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.endpoint = Endpoint(connection.transport, role="scientist", limits=codec.DecodeLimits(
            max_bytes=connection.transport.options.max_message_bytes,
            max_tensor_elements=2**40,
        ))  # fmt: skip
        self.loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[Action] = []
        self._outbox_lock = threading.Lock()
        self._flush_pending = False
        self._send_lock: asyncio.Lock | None = None
        self._deletes: collections.deque[str] = collections.deque()
        self._decisions: dict[str, asyncio.Future[Any]] = {}
        self._allowlist: dict[str, str] = {}
        self.store_version = 0
        self._closed = False
        self._gc_task: asyncio.Task[None] | None = None
        self.show_progress = _interactive_stderr()
        """Show a progress bar on stderr while a large value arrives."""
        self._progress_bar: Any = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()
        self.endpoint.on_closed = self._on_connection_lost
        if hasattr(self.connection.transport, "on_progress"):
            self.connection.transport.on_progress = self._on_progress
        self.endpoint.on("decision", self._on_decision)
        self.endpoint.on("store_changed", self._on_store_changed)
        hello = Hello(
            version=PROTOCOL_VERSION, role="scientist", library="duet_p2p",
            max_message_bytes=self.connection.transport.options.max_message_bytes,
        )  # fmt: skip
        peer = await self.endpoint.start(hello)
        self._allowlist = dict(peer.allowlist or {})
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
        """A pointer to an object the owner hosts (never frees it)."""
        kind = "module" if entry.get("kind") == "module" else "tensor"
        tags = entry.get("tags") or []
        label = tags[0] if tags and str(tags[0]).isidentifier() else f"obj_{entry['id'][:8]}"
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

    async def request(self, object_id: str, reason: str, *, delete: bool = False) -> RequestHandle:
        """Ask for a value; returns once the owner has registered the request."""
        await self.flush()
        call_id = self.endpoint.next_call_id()
        reply = await self.endpoint.call(
            GetRequest(call_id=call_id, object_id=object_id, reason=reason[:4000], delete=delete),
            timeout=30.0,
        )
        if not isinstance(reply, dict) or not isinstance(reply.get("request_id"), str):
            raise DuetError("the owner sent a malformed reply to a request")
        return RequestHandle(self, reply["request_id"], object_id)

    def decision_future(self, request_id: str) -> asyncio.Future[Any]:
        future = self._decisions.get(request_id)
        if future is None:
            assert self.loop is not None
            future = self.loop.create_future()
            # A handle nobody waits on must not log "exception was never retrieved".
            future.add_done_callback(_mark_retrieved)
            self._decisions[request_id] = future
            if self.endpoint.closed_event.is_set():
                future.set_exception(self._lost_error(None))
        return future

    def _lost_error(self, error: BaseException | None) -> PeerClosed:
        if self._closed:
            return PeerClosed("the session closed before a decision")
        cause = f" ({error})" if error is not None else ""
        return PeerClosed(
            f"the connection to the owner was lost before the value arrived{cause}; "
            "join a new session and ask again"
        )

    def _on_connection_lost(self, error: BaseException) -> None:
        """The receive loop ended: nothing more will arrive, so fail every waiting get."""
        self._close_progress()
        for future in list(self._decisions.values()):
            if not future.done():
                future.set_exception(self._lost_error(error))

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
        future = self.decision_future(message.request_id)
        if future.done():
            return
        if message.status == "accepted":
            value = message.value
            if message.module:
                try:
                    value = spec_to_module(value)
                except DuetError as exc:
                    future.set_exception(exc)
                    return
            future.set_result(value)
        elif message.status == "denied":
            reason = message.reason or "no reason given"
            future.set_exception(
                PermissionDenied(f"the owner denied the request: {reason}", reason=message.reason)
            )
        else:
            future.set_exception(RequestTimeout("the request expired on the owner's side"))

    async def cancel(self, request_id: str) -> None:
        with contextlib.suppress(PeerClosed):
            await self.endpoint.send(CancelRequest(request_id=request_id))

    def _on_store_changed(self, _message: Any) -> None:
        self.store_version += 1

    async def store_list(self) -> list[dict[str, Any]]:
        call_id = self.endpoint.next_call_id()
        entries = await self.endpoint.call(StoreQuery(call_id=call_id), timeout=30.0)
        if not isinstance(entries, list):
            raise DuetError("the owner sent a malformed store listing")
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]

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
        for future in self._decisions.values():
            if not future.done():
                future.set_exception(PeerClosed("the session closed before a decision"))


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
