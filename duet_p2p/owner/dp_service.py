"""Differentially private queries in the monitor: check, reserve budget, compute, release.

A query names a hosted dataset and a statistic. The monitor checks it against the
dataset's public facts, reserves its privacy loss in the ledger (a query over budget is
refused here, before anything reads data), and registers a request like any get: the
scientist is answered "pending" at once. The statistic is then computed in the monitor's
own process (a thread beside the event loop), by OpenDP, on the sealed hosted bytes; no
worker and nothing the scientist ran is involved. When the request is accepted (by the
owner, or a ``dp=True`` handler) the debit is written first and the value sent after;
otherwise the reservation is returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

import torch

from duet_p2p.errors import BudgetExceeded, InvalidQuery
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner import dp_data, dp_mechanisms
from duet_p2p.owner.hosted import SealedTensor, read_only_view
from duet_p2p.permissions import AuditLog, Request, RequestQueue, RequestStatus
from duet_p2p.permissions.ledger import Left, PrivacyLedger, Reservation, exact_text
from duet_p2p.permissions.request import DPRelease
from duet_p2p.rpc import codec
from duet_p2p.rpc.errors import error_info
from duet_p2p.rpc.messages import BudgetQuery, DPQuery
from duet_p2p.store import StoredObject, new_object_id

log = logging.getLogger(__name__)
NOT_A_DATASET = (
    "differentially private queries run on the owner's hosted datasets; pass a dataset from "
    "duet.store (or its tag), not a result computed in your session"
)


class SessionCore(Protocol):
    """What DP queries use of the owner's session (``owner.session.OwnerCore``)."""

    connection: Any
    store: Any
    monitor: Any
    audit: AuditLog
    limits: OwnerLimits
    requests: RequestQueue
    _sealed: dict[str, SealedTensor]
    _held: dict[str, Any]
    _closed: bool

    @property
    def ledger(self) -> PrivacyLedger: ...

    async def pend(self, message: DPQuery, request: Request) -> asyncio.Event: ...

    async def _reply(self, call_id: int, value: Any) -> None: ...

    async def _send_error(self, call_id: int, info: dict[str, Any]) -> None: ...

    def _preview(self, request_id: str) -> Any: ...

    def _hold_value(self, payload: bytes) -> Any: ...

    def _hold_failure(self, info: dict[str, Any]) -> Any: ...

    def _fill(self, request: Request, held: Any) -> None: ...


class DPQueries:
    """One session's DP queries, against the owner's ledger."""

    def __init__(self, core: SessionCore) -> None:
        self._core = core
        self._reservations: dict[str, Reservation] = {}
        self._computing = asyncio.Semaphore(1)

    @property
    def ledger(self) -> PrivacyLedger:
        return self._core.ledger

    @property
    def client_id(self) -> str:
        return self._core.connection.client_id

    # -- arrivals (on the session's loop, in message order) -----------------------------

    def on_query(self, message: DPQuery) -> None:
        try:
            record, plan = self._check(message)
            view = read_only_view(self._core._sealed[record.id])
        except ValueError as exc:
            self._refuse(message, InvalidQuery(str(exc)))
            return
        asyncio.ensure_future(self._take(message, record, plan, view))

    async def _take(
        self,
        message: DPQuery,
        record: StoredObject,
        plan: dp_data.QueryPlan,
        view: torch.Tensor,
    ) -> None:
        """Rehearse the query on made-up records (off the event loop), reserve its cost,
        then register the request and compute it."""
        statistic = f"dp.{message.query.statistic}"
        reservation: Reservation | None = None
        try:
            epsilon, delta = dp_mechanisms.cost(message.query)
            # over budget: refused before any work; returned if the rehearsal fails
            reservation = self.ledger.reserve(
                self.client_id, record.tags, epsilon, delta, statistic
            )
            async with self._computing:
                await asyncio.to_thread(
                    dp_mechanisms.rehearse, message.query, plan.contributions,
                    plan.categories, self._core.limits.max_dp_rows,
                )  # fmt: skip
        except ValueError as exc:
            if reservation is not None:
                reservation.cancel()
            self._refuse(message, InvalidQuery(str(exc)))
            return
        except BudgetExceeded as exc:
            self._refuse(message, exc)
            return
        except Exception:  # noqa: BLE001 - e.g. an unwritable ledger: refuse, keep serving
            if reservation is not None:
                reservation.cancel()
            log.exception("taking a DP query failed")
            info = {"code": "remote_error", "type": "DPQueryRefused",
                    "message": "the owner could not take this query (its privacy ledger "
                               "failed); nothing was computed or spent"}  # fmt: skip
            await self._core._send_error(message.call_id, info)
            return
        if self._core._closed:
            reservation.cancel()
            return
        request = self._new_request(message, record, reservation)
        self._reservations[request.request_id] = reservation
        await self._serve(message, request, record, plan, view)

    def _refuse(self, message: DPQuery, refusal: Exception) -> None:
        self._core.audit.event("dp_refused", client_id=self.client_id,
                               dataset=message.dataset, why=str(refusal)[:500])  # fmt: skip
        info = error_info(refusal, op=f"dp.{message.query.statistic}")
        asyncio.ensure_future(self._core._send_error(message.call_id, info))

    def _check(self, message: DPQuery) -> tuple[StoredObject, dp_data.QueryPlan]:
        """The dataset and the query's plan, from public facts only (ValueError if not)."""
        record = self._core.store.get(message.dataset)
        if (
            record is None
            or record.origin != "owner"
            or message.dataset not in self._core.monitor.nodes
            or record.id not in self._core._sealed
        ):
            raise ValueError(NOT_A_DATASET)
        if not record.private:
            raise ValueError("this dataset is public: get its values directly, without noise")
        sealed = self._core._sealed[record.id]
        shape = sealed.shape if record.show_metadata else None
        return record, dp_data.plan_query(message.query, record.schema, shape)

    def _new_request(
        self, message: DPQuery, record: StoredObject, reservation: Reservation
    ) -> Request:
        spec = message.query
        dataset = record.tags[0] if record.tags else f"obj_{record.id[:8]}"
        text = spec.text(dataset)
        request_id = new_object_id()
        return Request(
            request_id=request_id,
            object_id=record.id,
            name=f"dp.{spec.statistic}",
            reason=message.reason,
            lineage=text,
            ops=(f"dp.{spec.statistic}",),
            tags=frozenset(record.tags),
            size_bytes=0,
            elements=0,
            aggregation=1.0,
            requested_at=time.time(),
            requester=self.client_id,
            dp=DPRelease(
                statistic=spec.statistic,
                query=text,
                epsilon=float(reservation.epsilon),
                delta=float(reservation.delta),
                budget_before={
                    name: (float(left.epsilon), float(left.delta))
                    for name, left in reservation.before.items()
                },
            ),  # fmt: skip
            _preview=lambda: self._core._preview(request_id),
        )

    async def _serve(
        self,
        message: DPQuery,
        request: Request,
        record: StoredObject,
        plan: dp_data.QueryPlan,
        view: torch.Tensor,
    ) -> None:
        core = self._core
        rid = request.request_id
        ready = await core.pend(message, request)
        limit = core.limits.max_dp_rows
        async with self._computing:
            try:
                released = await asyncio.to_thread(_compute, message, plan, view, limit)
            except Exception as exc:  # noqa: BLE001 - a failure is private, like a value
                log.warning("a DP query failed: %s", exc)
                info = {"code": "remote_error", "type": type(exc).__name__,
                        "message": str(exc)[:500], "op": request.name}  # fmt: skip
                held = core._hold_failure(info)
            else:
                assert request.dp is not None
                request.dp.noise = released.noise
                held = core._hold_value(codec.encode(released.value))
        core._fill(request, held)
        core._held[rid] = held
        ready.set()
        core.requests.mark_ready(rid)

    # -- decisions ----------------------------------------------------------------------

    def settle(self, request: Request) -> str | None:
        """Before a decided DP request is answered: debit its budget if accepted (None: go
        on and send), else return it. Returns a denial reason if the debit failed."""
        reservation = self._reservations.pop(request.request_id, None)
        if reservation is None:
            return None
        if request.status is not RequestStatus.ACCEPTED:
            reservation.cancel()
            return None
        try:
            debits = reservation.commit(request.request_id)
        except BudgetExceeded as exc:
            self._core.audit.event("dp_refused", client_id=self.client_id,
                                   request_id=request.request_id, why=str(exc)[:500])  # fmt: skip
            return str(exc)
        except Exception:  # e.g. a locked or full ledger: no debit, so no release
            log.exception("debiting the privacy budget of %s failed", request.request_id)
            with contextlib.suppress(Exception):
                reservation.cancel()
            return "the owner's privacy ledger could not be written; ask again later"
        with contextlib.suppress(Exception):  # the debit is written; its audit is extra
            self._audit_debits(debits)
        return None

    def _audit_debits(self, debits: Any) -> None:
        for debit in debits:
            left = self.ledger.left(debit.client_id, debit.dataset)
            self._core.audit.event(
                "dp_debit", client_id=debit.client_id, dataset=debit.dataset,
                request_id=debit.request_id, statistic=debit.statistic,
                epsilon=str(debit.epsilon), delta=str(debit.delta),
                epsilon_left=exact_text(left.epsilon) if left else None,
                delta_left=exact_text(left.delta) if left else None,
            )  # fmt: skip

    def close(self) -> None:
        for reservation in self._reservations.values():
            reservation.cancel()
        self._reservations.clear()

    # -- budget view --------------------------------------------------------------------

    async def on_budget(self, message: BudgetQuery) -> None:
        """What is left of this scientist's budgets, for the datasets hosted here."""
        hosted = {
            tag
            for record in self._core.store.owner_records()
            if record.searchable and record.private
            for tag in record.tags
        }
        rows = [_left_entry(left) for left in self.ledger.datasets_for(self.client_id)
                if left.dataset in hosted]  # fmt: skip
        await self._core._reply(message.call_id, rows)


def _compute(
    message: DPQuery, plan: dp_data.QueryPlan, view: torch.Tensor, max_rows: int
) -> dp_mechanisms.Release:
    records = dp_data.select(view, plan)
    return dp_mechanisms.release(message.query, records, max_rows=max_rows)


def _left_entry(left: Left) -> dict[str, Any]:
    return {
        "dataset": left.dataset,
        "epsilon_left": float(left.epsilon),
        "delta_left": float(left.delta),
        "epsilon_budget": float(left.epsilon_budget),
        "epsilon_spent": float(left.epsilon_spent),
        "delta_budget": float(left.delta_budget),
        "delta_spent": float(left.delta_spent),
    }
