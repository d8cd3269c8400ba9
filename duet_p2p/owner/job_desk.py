"""A session's offline-job messages: a standing host's scientist submits, lists, cancels
and fetches their own jobs over the live channel.

Each message reaches the host's jobs (``owner.jobs``) as the session's Client ID; a job of
another scientist answers exactly as an unknown one. An owner that takes no jobs (a one-off
Duet) says so.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from duet_p2p.errors import DuetError, PeerClosed, ProtocolError
from duet_p2p.offline.lifecycle import InvalidTransition
from duet_p2p.rpc import codec
from duet_p2p.rpc.messages import CancelJob, FetchJobResult, JobResult, ListJobs, SubmitJob
from duet_p2p.text import printable


class JobSession(Protocol):
    """What a desk needs of its session (an ``OwnerCore``; this module sits below it)."""

    endpoint: Any
    connection: Any
    owner: Any

    async def _reply(self, call_id: int, value: Any) -> None: ...

    async def _send_error(self, call_id: int, info: dict[str, Any]) -> None: ...


__all__ = ["JobDesk"]

log = logging.getLogger(__name__)

NO_JOBS = "this owner does not take offline jobs (a standing host does: sy.launch_host)"


class JobDesk:
    """The job messages of one session."""

    def __init__(self, core: JobSession) -> None:
        self.core = core
        endpoint = core.endpoint
        endpoint.on("submit_job", self._on_submit)
        endpoint.on("list_jobs", self._on_list)
        endpoint.on("cancel_job", self._on_cancel)
        endpoint.on("fetch_job_result", self._on_fetch)

    @property
    def _client_id(self) -> str:
        return self.core.connection.client_id

    async def _refuse(self, call_id: int, code: str, kind: str, message: str) -> None:
        await self.core._send_error(call_id, {"code": code, "type": kind,
                                              "message": printable(message, 2000)})  # fmt: skip

    def _jobs(self) -> Any:
        return self.core.owner.jobs

    async def _on_submit(self, message: SubmitJob) -> None:
        jobs = self._jobs()
        if jobs is None:
            await self._refuse(message.call_id, "no_jobs", "PermissionDenied", NO_JOBS)
            return
        try:
            row = await jobs.submit_for(self._client_id, bytes(message.job), via="live")
        except (DuetError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            await self._refuse(message.call_id, "job_refused", "PermissionDenied", reason)
            return
        await self.core._reply(message.call_id, row)

    async def _on_list(self, message: ListJobs) -> None:
        jobs = self._jobs()
        if jobs is None:
            await self._refuse(message.call_id, "no_jobs", "PermissionDenied", NO_JOBS)
            return
        await self.core._reply(message.call_id, jobs.rows_for(self._client_id))

    async def _on_cancel(self, message: CancelJob) -> None:
        jobs = self._jobs()
        if jobs is None:
            await self._refuse(message.call_id, "no_jobs", "PermissionDenied", NO_JOBS)
            return
        try:
            row = await jobs.cancel_for(self._client_id, message.job_id)
        except KeyError as exc:
            await self._refuse(message.call_id, "not_found", "KeyError", str(exc.args[0]))
            return
        except (InvalidTransition, DuetError) as exc:
            await self._refuse(message.call_id, "job_refused", "DuetError", str(exc))
            return
        await self.core._reply(message.call_id, row)

    async def _on_fetch(self, message: FetchJobResult) -> None:
        jobs = self._jobs()
        if jobs is None:
            await self._refuse(message.call_id, "no_jobs", "PermissionDenied", NO_JOBS)
            return
        try:
            row, bundle = await jobs.result_for(self._client_id, message.job_id)
        except KeyError as exc:
            await self._refuse(message.call_id, "not_found", "KeyError", str(exc.args[0]))
            return
        row = {**row, "size": None if bundle is None else len(bundle)}
        await self.core._reply(message.call_id, row)
        if bundle is not None:
            attachment = codec.encode(bundle)
            try:
                await self.core.endpoint.send(JobResult(job_id=message.job_id),
                                              attachment=attachment)  # fmt: skip
            except (PeerClosed, ProtocolError):
                return  # not delivered: it stays released, to fetch again or mail
            await jobs.delivered_live(message.job_id)
