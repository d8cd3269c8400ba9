"""The owner's side of a session: serves the peer's messages against the store.

Actions, deletes, uploads and gets go through one ordered work queue, so a get sees every
action sent before it; ops run in one worker thread so the event loop (and with it the
heartbeat) stays responsive. Store listings and cancellations are answered at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from duet_p2p import lineage
from duet_p2p.allowlist import Allowlist
from duet_p2p.connect import Connection
from duet_p2p.errors import DuetError, PeerClosed, ProtocolError
from duet_p2p.executor import Executor, action_refs
from duet_p2p.limits import OwnerLimits
from duet_p2p.modules import module_to_spec, spec_to_module
from duet_p2p.permissions import AuditLog, Request, RequestQueue, RequestStatus
from duet_p2p.rpc import codec
from duet_p2p.rpc.endpoint import ATTACHMENT_IN_THREAD_BYTES, Endpoint
from duet_p2p.rpc.errors import error_info
from duet_p2p.rpc.messages import (
    PROTOCOL_VERSION,
    Actions,
    CancelRequest,
    Decision,
    Delete,
    Describe,
    GetRequest,
    Hello,
    Message,
    StoreChanged,
    StoreQuery,
    Upload,
)
from duet_p2p.store import OwnerStore, StoredObject, clean_tags, new_object_id, value_nbytes

log = logging.getLogger(__name__)
_STOP = object()
EXPIRE_INTERVAL = 1.0
"""Seconds between checks for requests a ``timeout_secs`` handler or expiry now decides."""


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
    return entry


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
    ) -> None:
        self.connection = connection
        self.allowlist = allowlist
        self.limits = limits
        self.audit = audit
        self.store = OwnerStore()
        self.executor = Executor(self.store, allowlist, limits)
        self.endpoint = Endpoint(
            connection.transport,
            role="owner",
            limits=codec.DecodeLimits(max_bytes=limits.max_upload_bytes),
        )
        self.requests = RequestQueue(
            on_decision=self._on_decision, audit=audit, min_aggregation=min_aggregation
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self._work: collections.deque[Any] = collections.deque()
        self._work_ready = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duet-owner-ops")
        self._worker: asyncio.Task[None] | None = None
        self._expirer: asyncio.Task[None] | None = None
        self._answered: dict[str, asyncio.Event] = {}
        self._gets: dict[str, tuple[GetRequest, StoredObject]] = {}
        self._closed = False

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for kind in ("actions", "delete", "upload", "get", "describe"):
            self.endpoint.on(kind, self._enqueue)
        self.endpoint.on("store_query", self._on_store_query)
        self.endpoint.on("cancel_request", self._on_cancel)
        self._worker = asyncio.ensure_future(self._work_loop())
        self._expirer = asyncio.ensure_future(self._expire_loop())
        hello = Hello(
            version=PROTOCOL_VERSION,
            role="owner",
            library="duet_p2p",
            max_message_bytes=self.limits.max_upload_bytes,
            allowlist={entry.path: str(entry.returns) for entry in self.allowlist},
        )
        await self.endpoint.start(hello)
        self.audit.event("connected", duet_id=self.connection.duet_id,
                         client_id=self.connection.client_id)  # fmt: skip

    # -- the owner's own calls (any thread) ---------------------------------------------

    def host(
        self,
        value: Any,
        *,
        tags: tuple[str, ...] = (),
        description: str = "",
        searchable: bool = True,
        public: bool = False,
        show_metadata: bool = False,
    ) -> StoredObject:
        """Place ``value`` in the store; the peer is told the listing changed."""
        if not isinstance(value, (torch.Tensor, torch.nn.Module)):
            raise TypeError(f"only tensors and modules can be hosted, not {type(value).__name__}")
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
            aggregation=float("inf") if public else 1.0,
            support=float("inf") if public else _elements(value),
            nbytes=value_nbytes(value),
        )
        if not record.expression:
            record.expression = f"obj_{record.id[:8]}"
        self.store.put(record)
        self.audit.event("hosted", object_id=record.id, tags=list(tags), public=public)
        if searchable and self.loop is not None and not self._closed:
            self.loop.call_soon_threadsafe(self._notify_store_changed)
        return record

    def _notify_store_changed(self) -> None:
        asyncio.ensure_future(self._send_quietly(StoreChanged()))

    async def _send_quietly(
        self, message: Message, attachment: bytes | memoryview | None = None
    ) -> None:
        with contextlib.suppress(PeerClosed, ProtocolError):
            await self.endpoint.send(message, attachment)

    # -- incoming -----------------------------------------------------------------------

    def _enqueue(self, message: Message) -> None:
        self._work.append(message)
        self._work_ready.set()

    async def _on_store_query(self, message: StoreQuery) -> None:
        entries = [listing_entry(r) for r in self.store.listing()]
        await self.endpoint.reply(message.call_id, entries)

    def _on_cancel(self, message: CancelRequest) -> None:
        with contextlib.suppress(DuetError, KeyError):
            self.requests.cancel(message.request_id)

    async def _work_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._work:
                self._work_ready.clear()
                await self._work_ready.wait()
                continue
            message = self._work.popleft()
            if message is _STOP:
                return
            try:
                if isinstance(message, Actions):
                    batch = list(message.actions)
                    while self._work and isinstance(self._work[0], Actions):
                        batch.extend(self._work.popleft().actions)
                    await loop.run_in_executor(self._pool, self._run_actions, batch)
                elif isinstance(message, Delete):
                    self.store.remove_peer_objects(message.ids)
                elif isinstance(message, Upload):
                    await loop.run_in_executor(self._pool, self._upload, message)
                elif isinstance(message, GetRequest):
                    await self._on_get(message)
                elif isinstance(message, Describe):
                    await self._on_describe(message)
            except Exception:  # noqa: BLE001 - one bad item must not stop the queue
                log.exception("owner work item failed")

    async def _expire_loop(self) -> None:
        """Let ``timeout_secs`` handlers and ``expire_after`` decide overdue requests."""
        while not self._closed:
            await asyncio.sleep(EXPIRE_INTERVAL)
            try:
                self.requests.expire_overdue()
            except Exception:  # noqa: BLE001 - e.g. an unwritable audit log; retry next tick
                log.exception("expiring overdue requests failed")

    def _run_actions(self, actions: list[Any]) -> None:
        for action in actions:
            record = self.executor.run(action)
            self.audit.action(
                op=action.op,
                inputs=[ref.id for ref in action_refs(action)],
                result=action.result,
                ok=record.error is None,
                error_type=(record.error or {}).get("type"),
            )

    def _upload(self, message: Upload) -> None:
        try:
            if message.as_module:
                value: Any = spec_to_module(message.value)
            elif isinstance(message.value, torch.Tensor):
                value = message.value
            else:
                raise ProtocolError("an upload must be a tensor or a module spec")
            nbytes = value_nbytes(value)
            if self.store.peer_bytes + nbytes > self.limits.max_peer_bytes:
                raise ProtocolError("the owner's memory budget for this peer is used up")
            record = StoredObject(
                id=message.result, value=value, origin="peer", private=False,
                expression=f"uploaded_{type(value).__name__.lower()}", nbytes=nbytes,
            )  # fmt: skip
        except DuetError as exc:
            record = StoredObject(
                id=message.result, value=None, origin="peer",
                error=error_info(exc, op="upload"), expression="upload",
            )  # fmt: skip
        with contextlib.suppress(KeyError):
            self.store.put(record)
        self.audit.event("upload", result=message.result, ok=record.error is None)

    async def _on_describe(self, message: Describe) -> None:
        record = self.store.get(message.object_id)
        if record is None:
            info: dict[str, Any] = {"exists": False}
        else:
            info = {"exists": True, "error": record.error, "private": record.private}
        await self.endpoint.reply(message.call_id, info)

    # -- gets, requests and releases ---------------------------------------------------

    async def _on_get(self, message: GetRequest) -> None:
        record = self.store.get(message.object_id)
        if record is None:
            await self.endpoint.send_error(
                message.call_id,
                {"code": "not_found", "type": "KeyError",
                 "message": f"no object {message.object_id} on the owner's side"},
            )  # fmt: skip
            return
        if record.error is not None:
            await self.endpoint.send_error(message.call_id, record.error)
            return
        request = Request(
            request_id=new_object_id(),
            object_id=record.id,
            name=lineage.name_of(record.ops) if record.ops else (record.tags or ("object",))[0],
            reason=message.reason,
            lineage=record.expression,
            ops=record.ops,
            tags=record.lineage_tags,
            size_bytes=record.nbytes,
            elements=_elements(record.value),
            aggregation=record.aggregation,
            requested_at=time.time(),
            requester=self.connection.client_id,
            _preview=lambda: record.value,
        )
        answered = asyncio.Event()
        self._answered[request.request_id] = answered
        self._gets[request.request_id] = (message, record)
        if record.private:
            self.requests.submit(request)
        else:
            self.audit.request(request)
            request.status = RequestStatus.ACCEPTED
            request.decided_by = "public: depends on no private data"
            request.decided_at = time.time()
            self.audit.decision(request)
            self._on_decision(request)
        await self.endpoint.reply(
            message.call_id, {"request_id": request.request_id, "status": str(request.status)}
        )
        answered.set()

    def _on_decision(self, request: Request) -> None:
        """Called once per request when it leaves pending, from any thread."""
        if self.loop is None or self._closed:
            return
        self.loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(self._deliver(request))
        )  # fmt: skip

    async def _deliver(self, request: Request) -> None:
        answered = self._answered.get(request.request_id)
        if answered is not None:
            await answered.wait()
        self._answered.pop(request.request_id, None)
        get, record = self._gets.pop(request.request_id, (None, None))
        if get is None or record is None:
            return
        status = request.status
        if status is not RequestStatus.ACCEPTED:
            await self._send_quietly(
                Decision(
                    request_id=request.request_id,
                    status="denied" if status is RequestStatus.DENIED else "expired",
                    reason=request.decision_reason or "",
                )
            )
            return
        value = record.value
        is_module = isinstance(value, torch.nn.Module)
        payload_value = module_to_spec(value) if is_module else value
        if record.nbytes >= ATTACHMENT_IN_THREAD_BYTES:
            encoded, digest = await asyncio.to_thread(_encode_and_hash, payload_value)
        else:
            encoded, digest = _encode_and_hash(payload_value)
        self.audit.release(
            object_id=record.id,
            request_id=request.request_id,
            nbytes=memoryview(encoded).nbytes,
            sha256=digest,
        )
        self._show_locally(request, value)
        del value, payload_value
        await self._send_quietly(
            Decision(request_id=request.request_id, status="accepted", module=is_module),
            attachment=encoded,
        )
        if get.delete:
            self.store.remove_peer_objects([record.id])

    def _show_locally(self, request: Request, value: Any) -> None:
        handler = getattr(request, "handler", None)
        if handler is None:
            return
        if getattr(handler, "print_local", False):
            print(f"[duet] released {request.lineage} = {value}")
        if getattr(handler, "log_local", False):
            log.info("released %s = %s", request.lineage, value)

    # -- closing ------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._enqueue(_STOP)
        with contextlib.suppress(Exception):
            await self.connection.close()
        await self.endpoint.close()
        if self._worker is not None:
            self._worker.cancel()
        if self._expirer is not None:
            self._expirer.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.audit.event("disconnected", duet_id=self.connection.duet_id)


def _encode_and_hash(value: Any) -> tuple[bytes | memoryview, str]:
    """The encoded value as one snapshot (later in-place ops cannot change what leaves),
    and its SHA-256. Large payloads are copied by numpy, which releases the GIL: a
    ``bytes`` join of gigabytes would stall the event loop past the heartbeat timeout."""
    parts = codec.encode_parts(value)
    total = sum(memoryview(part).nbytes for part in parts)
    if total < ATTACHMENT_IN_THREAD_BYTES:
        encoded: bytes | memoryview = b"".join(parts)
    else:
        snapshot = np.empty(total, np.uint8)
        offset = 0
        for part in parts:
            size = memoryview(part).nbytes
            snapshot[offset : offset + size] = np.frombuffer(part, np.uint8)
            offset += size
        encoded = memoryview(snapshot)
    return encoded, hashlib.sha256(encoded).hexdigest()


def _elements(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, torch.nn.Module):
        return sum(p.numel() for p in value.parameters())
    if isinstance(value, (list, tuple)):
        return sum(_elements(v) for v in value[:10_000])
    return 1
