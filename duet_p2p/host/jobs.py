"""A standing host's offline jobs: settings, and the machinery the host runs them with."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from duet_p2p.errors import ConfigurationError
from duet_p2p.host.job_mail import JobMail
from duet_p2p.host.job_runner import JobRunner
from duet_p2p.host.job_service import HOST, OWNER, JobRefused, JobService
from duet_p2p.host.job_store import JobEvent, JobStore, StoredJob
from duet_p2p.offline.lifecycle import InvalidTransition, JobState
from duet_p2p.offline.policy import JobPolicy
from duet_p2p.offline.results import ResultBundle
from duet_p2p.offline.review import CodeReview
from duet_p2p.offline.spec import SignedJob
from duet_p2p.rpc.messages import JobChanged
from duet_p2p.text import printable

if TYPE_CHECKING:
    from duet_p2p.connect import ConnectOptions
    from duet_p2p.host.admissions import AdmissionPolicy
    from duet_p2p.identity import Identity
    from duet_p2p.owner.owner import Owner
    from duet_p2p.owner.session import OwnerCore
    from duet_p2p.permissions import AuditLog

__all__ = ["HostJobs", "JobSettings", "JobsHost"]

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"[0-9a-f]{32}")
MAX_LISTED = 1000
START_SECONDS = 60.0
"""Seconds a job's session may take to start."""
IDLE_SECONDS = 1.0
SETTLE_SECONDS = 0.25
FREE_EVERY = 240
"""Settle ticks between sweeps that free delivered jobs' outputs (about once a minute)."""

ON_RESTART = ("fail", "requeue")
MAX_CONCURRENCY = 16


@dataclass(frozen=True)
class JobSettings:
    """How a host takes offline jobs (``[jobs]`` in host.toml)."""

    enabled: bool = True
    policy: JobPolicy = field(default_factory=JobPolicy)
    """What is approved and released without the owner."""
    concurrency: int = 1
    """Jobs run at once."""
    on_restart: str = "fail"
    """What a job RUNNING when the host stopped becomes: "fail", or "requeue": it runs once
    more (attempt 2, recorded; never a third time)."""
    max_job_seconds: float | None = None
    """The host's cap on a job's ``max_seconds`` (review refuses a job asking more)."""
    mailbox: bool = True
    """Take jobs from the signaling server's mailbox, and send results back through it."""
    poll_seconds: float = 20.0
    """Seconds one mailbox long-poll waits."""
    mailbox_max_result_bytes: int = 48 << 20
    """Largest result sent through the mailbox (a larger one waits to be fetched live; a
    signaling server holds 64 MiB per recipient by default)."""

    def __post_init__(self) -> None:
        if type(self.enabled) is not bool or type(self.mailbox) is not bool:
            raise ConfigurationError("enabled and mailbox are true or false")
        if not isinstance(self.policy, JobPolicy):
            raise ConfigurationError("policy must be a JobPolicy")
        if type(self.concurrency) is not int or not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ConfigurationError(f"concurrency must be an integer from 1 to {MAX_CONCURRENCY}")
        if self.on_restart not in ON_RESTART:
            raise ConfigurationError('on_restart must be "fail" or "requeue"')
        cap = self.max_job_seconds
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, int | float) or not 0 < cap < 1e9
        ):
            raise ConfigurationError("max_job_seconds must be a number of seconds above 0")
        size = self.mailbox_max_result_bytes
        if type(size) is not int or not 0 < size <= 1 << 40:
            raise ConfigurationError("mailbox_max_result_bytes must be a positive integer")
        poll = self.poll_seconds
        if isinstance(poll, bool) or not isinstance(poll, int | float) or not 0 < poll <= 300:
            raise ConfigurationError("poll_seconds must be a number from 0 to 300")


class JobsHost(Protocol):
    """What the jobs (and their mailbox) need of their host (a ``Host``; this module sits
    below it)."""

    id: str
    identity: Identity
    host_dir: Path
    options: ConnectOptions
    owner: Owner
    admission: AdmissionPolicy
    audit: AuditLog
    loop: asyncio.AbstractEventLoop | None
    _sessions: dict[str, OwnerCore]

    def connected(self) -> list[str]: ...


class HostJobs:
    """A host's offline jobs: taken live or from the mailbox, reviewed, run, settled and
    sent back. ``service`` holds the lifecycle; the methods here are the owner's verbs
    (synchronous, thread-safe) and the scientist's (``*_for``, on the host's loop)."""

    def __init__(self, host: JobsHost, settings: JobSettings) -> None:
        owner = host.owner
        self.host = host
        self.settings = settings
        self.store = JobStore.open(host.host_dir, host_id=host.id)
        self.runner = JobRunner(owner, owner.allowlist, owner.limits)
        self.service = JobService(
            owner, self.store, self.runner, host_identity=host.identity,
            allowlist=owner.allowlist, admission=host.admission, policy=settings.policy,
            dataset_tags=self._dataset_tags, max_seconds_cap=settings.max_job_seconds,
        )  # fmt: skip
        self.service.on_moved = self._moved
        owner.decided_listeners.append(self._decided)
        self.mail: JobMail | None = None
        if settings.mailbox and host.options.signaling_url is not None:
            self.mail = JobMail(self, host.options.signaling_url)
        self._tasks: list[asyncio.Task[None]] = []
        self._wakes: list[asyncio.Event] = []
        """One per loop below: a poke wakes each (one loop's nap never eats another's)."""
        self._tags_reviewed: frozenset[str] = frozenset()
        self._sends: set[asyncio.Task[Any]] = set()
        self._closed = False

    def _dataset_tags(self) -> list[str]:
        return [record.tags[0] for record in self.host.owner.store.listing() if record.tags]

    # -- the owner's verbs ----------------------------------------------------------------

    def list(
        self, states: Collection[JobState] | None = None, limit: int = 1000
    ) -> list[StoredJob]:
        """Jobs (in ``states``, if given), newest first."""
        return self.store.all(states, limit=limit, newest_first=True)

    def get(self, job_id: str) -> StoredJob:
        found = self.store.get(job_id)
        if found is None:
            raise KeyError(f"no job {printable(str(job_id), 64)!r}")
        return found

    def review(self, job_id: str) -> CodeReview:
        return self.service.review(job_id)

    def approve(self, job_id: str, by: str = OWNER) -> None:
        self.service.approve(job_id, by=by)
        self.poke()

    def reject(self, job_id: str, reason: str, by: str = OWNER) -> None:
        self.service.reject(job_id, reason, by=by)
        self.poke()

    def output_requests(self, job_id: str) -> dict[str, Any]:
        return self.service.output_requests(job_id)

    def release(self, job_id: str, by: str = OWNER) -> None:
        self.service.release(job_id, by=by)
        self.poke()

    def withhold(self, job_id: str, reason: str, by: str = OWNER) -> None:
        self.service.withhold(job_id, reason, by=by)
        self.poke()

    def cancel(self, job_id: str, by: str = OWNER) -> None:
        self.service.cancel(job_id, by=by)
        self.poke()

    def events(self, job_id: str) -> list[JobEvent]:
        return self.store.events(job_id)

    def _decided(self, request: Any) -> None:
        """A request was decided: if it is a job's output, settle now."""
        if request.request_id in self.service.output_request_ids:
            self.poke()

    def _moved(self, job_id: str, state: JobState) -> None:
        """Tell the job's scientist, if connected, that it moved (from any thread)."""
        loop = self.host.loop
        if loop is None or loop.is_closed() or self._closed:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._tell_live, job_id, state)

    def _tell_live(self, job_id: str, state: JobState) -> None:
        stored = self.store.get(job_id)
        core = None if stored is None else self.host._sessions.get(stored.client_id)
        if core is None:
            return
        task = asyncio.ensure_future(core._send_quietly(JobChanged(job_id=job_id,
                                                                   state=str(state))))  # fmt: skip
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def poke(self) -> None:
        """Look at the jobs now rather than at the next tick (from any thread)."""
        loop, wakes = self.host.loop, tuple(self._wakes)
        if loop is None or not wakes or loop.is_closed():
            return
        for wake in wakes:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    # -- the scientist's verbs (live, on the host's loop) ------------------------------

    async def submit_for(self, client_id: str, wire: bytes, via: str = "live") -> dict[str, Any]:
        """Take a job its scientist sent; its row (JobRefused, InvalidJob or a store error
        when refused). The job must be signed by ``client_id`` itself."""
        signed = SignedJob.from_wire(wire)
        if signed.client_id != client_id:
            raise JobRefused("a job is submitted by the scientist who signed it")
        job_id = await asyncio.to_thread(self.service.submit, signed, via=via)
        self.poke()
        return self.row(self.get(job_id))

    def rows_for(self, client_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The scientist's jobs, newest first."""
        jobs = self.store.for_client(client_id, limit=limit, newest_first=True)
        return [self.row(job) for job in jobs]

    def mine(self, client_id: str, job_id: str) -> StoredJob:
        """The scientist's own job; another's answers exactly as an unknown one."""
        found = self.store.get(job_id) if JOB_ID.fullmatch(str(job_id)) else None
        if found is None or found.client_id != client_id:
            raise KeyError(f"no job {printable(str(job_id), 64)!r} of yours is here")
        return found

    async def cancel_for(self, client_id: str, job_id: str) -> dict[str, Any]:
        self.mine(client_id, job_id)
        await asyncio.to_thread(self.service.cancel, job_id, client_id)
        self.poke()
        return self.row(self.get(job_id))

    async def result_for(self, client_id: str, job_id: str) -> tuple[dict[str, Any], bytes | None]:
        """The job's row, and its result bundle if released (``delivered_live`` once sent)."""
        job = self.mine(client_id, job_id)
        if job.state not in (JobState.RELEASED, JobState.DELIVERED):
            return self.row(job), None
        found = await asyncio.to_thread(self.bundle, job)
        if found is None:
            return self.row(job), None
        bundle = await asyncio.to_thread(found.to_bytes)
        return self.row(job), bundle

    async def delivered_live(self, job_id: str) -> None:
        """The result bundle was sent to its scientist over the live channel."""
        with contextlib.suppress(InvalidTransition, KeyError):
            await asyncio.to_thread(self._delivered, job_id, "fetched live")

    def bundle(self, job: StoredJob) -> ResultBundle | None:
        """The released job's result bundle (None once its outputs are freed)."""
        outputs = self.service.released(job.job_id)
        if outputs is None or job.receipt is None:
            return None
        return ResultBundle(job.job_id, job.receipt, outputs)

    def _delivered(self, job_id: str, how: str) -> None:
        self.service._move(job_id, JobState.DELIVERED, by=HOST, reason=how)

    @staticmethod
    def row(job: StoredJob) -> dict[str, Any]:
        """What its scientist is told of a job."""
        return {
            "job_id": job.job_id, "state": str(job.state), "reason": job.last_reason,
            "by": job.last_by, "submitted_at": job.submitted_at, "updated_at": job.updated_at,
            "deadline": job.deadline, "progress": list(job.progress),
        }  # fmt: skip

    def close_files(self) -> None:
        """Close the job store and the mailbox's replay memory (a host that never started)."""
        self.store.close()
        if self.mail is not None:
            with contextlib.suppress(Exception):
                self.mail.seen.close()

    # -- running --------------------------------------------------------------------------

    async def start(self) -> None:
        """Settle what the last process left running, then run, settle and send jobs. The
        mailbox's notices have their own loop: a slow or unreachable mailbox never holds
        up settling (and so releasing to scientists who are connected)."""
        requeue = self.settings.on_restart == "requeue"
        await asyncio.to_thread(self.service.recover_after_restart, requeue)
        loops = [self._run_jobs(self._new_wake()) for _ in range(self.settings.concurrency)]
        loops.append(self._settle(self._new_wake()))
        if self.mail is not None:
            loops += [self.mail.run(), self._send_notices(self._new_wake())]
        self._tasks = [asyncio.ensure_future(loop) for loop in loops]

    def _new_wake(self) -> asyncio.Event:
        wake = asyncio.Event()
        self._wakes.append(wake)
        return wake

    @staticmethod
    async def _nap(wake: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)
        wake.clear()

    async def _run_jobs(self, wake: asyncio.Event) -> None:
        while not self._closed:
            try:
                ran = await self.service.run_next(timeout=START_SECONDS)
            except Exception:  # noqa: BLE001 - one job's failure never stops the host
                log.exception("running a job failed")
                ran = None
            if ran is None:
                await self._nap(wake, IDLE_SECONDS)
            else:
                self.poke()

    async def _settle(self, wake: asyncio.Event) -> None:
        ticks = 0
        while not self._closed:
            try:
                await self._settle_once()
                if ticks % FREE_EVERY == 0:
                    before = time.time() - self.host.owner.keep_released
                    await asyncio.to_thread(self.store.free_finished, before)
            except Exception:  # noqa: BLE001 - retried at the next tick
                log.exception("settling jobs failed")
            ticks += 1
            await self._nap(wake, SETTLE_SECONDS)

    async def _send_notices(self, wake: asyncio.Event) -> None:
        assert self.mail is not None
        while not self._closed:
            try:
                await self.mail.send_notices()
            except Exception:  # noqa: BLE001 - retried at the next tick
                log.exception("sending job notices failed")
            await self._nap(wake, SETTLE_SECONDS)

    async def _settle_once(self) -> None:
        if await asyncio.to_thread(self.service.expire_due):
            self.poke()
        tags = frozenset(self._dataset_tags())
        if tags != self._tags_reviewed:  # a dataset came: jobs waiting for it may go on
            self._tags_reviewed = tags
            if await asyncio.to_thread(self.service.review_waiting):
                self.poke()
        for job in self.store.all([JobState.PENDING_OUTPUT_REVIEW], limit=MAX_LISTED):
            try:  # one job's trouble never holds up the others
                await asyncio.to_thread(self.service.apply_release_rules, job.job_id)
                state = await self.service.settle_outputs(job.job_id, 0.0)
            except Exception:  # noqa: BLE001 - tried again at the next tick
                log.exception("settling job %s failed", job.job_id)
                continue
            if state is not JobState.PENDING_OUTPUT_REVIEW:
                self.poke()

    async def aclose(self) -> None:
        self._closed = True
        with contextlib.suppress(ValueError):
            self.host.owner.decided_listeners.remove(self._decided)
        tasks = [*self._tasks, *self._sends]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.mail is not None:
            await self.mail.close()
        for job_id in list(self.service._runs):
            run = self.service.run_of(job_id)
            if run is not None:
                with contextlib.suppress(Exception):
                    await run.close()
        self.store.close()
