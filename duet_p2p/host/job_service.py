"""A standing host's offline jobs, end to end: admit, review, queue, run, settle, receipt.

:class:`JobService` ties the pieces together: a signed job from an admitted scientist is
stored (:class:`~duet_p2p.host.job_store.JobStore`), reviewed against the host's allowlist
and datasets (``review_code``), auto-approved by the host's :class:`JobPolicy` or left for
the owner, run as a loopback session (:class:`~duet_p2p.host.job_runner.JobRunner`) whose
outputs are ordinary requests in the owner's queue, and settled once the owner (or a
handler) has decided them: RELEASED with a receipt signed by the host, or WITHHELD.

Every state change is recorded twice: in the job's own trail (``store.events``) and in the
owner's audit log as a ``job`` event (job_id, state, by, reason). Nothing here runs a job
twice: a run begins only through ``store.start_attempt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import torch

from duet_p2p.allowlist import Allowlist
from duet_p2p.errors import DuetError, PermissionDenied, RequestTimeout
from duet_p2p.host.admissions import AdmissionPolicy
from duet_p2p.host.job_runner import JobRun, JobRunError, JobRunner
from duet_p2p.host.job_store import JobStore
from duet_p2p.identity import Identity
from duet_p2p.jobs.lifecycle import BEFORE_RUN, InvalidTransition, JobState
from duet_p2p.jobs.policy import JobPolicy, auto_reject_reason, decide_code
from duet_p2p.jobs.receipt import Receipt, content_hash
from duet_p2p.jobs.review import CodeReview, review_code
from duet_p2p.jobs.spec import InvalidJob, SignedJob
from duet_p2p.owner.owner import Owner
from duet_p2p.rpc import codec
from duet_p2p.text import printable

__all__ = ["JobRefused", "JobService"]

log = logging.getLogger(__name__)

SLACK_SECONDS = 30.0
"""Time past a job's ``max_seconds`` its outputs may take to be computed."""
POLL_SECONDS = 0.05
MAX_VIA_CHARS = 64
MAX_REASON_CHARS = 2000
OWNER = "owner"
POLICY = "policy"
HOST = "host"

_S = JobState


class JobRefused(DuetError):
    """The service refused a submission or a decision; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobService:
    """Submit, review, run and settle a host's offline jobs (internal; thread-safe for
    the synchronous methods, the async ones run on the host's event loop)."""

    def __init__(
        self,
        owner: Owner,
        store: JobStore,
        runner: JobRunner,
        *,
        host_identity: Identity,
        allowlist: Allowlist,
        admission: AdmissionPolicy,
        policy: JobPolicy,
        dataset_tags: Callable[[], Collection[str]],
        max_seconds_cap: float | None = None,
        slack_seconds: float = SLACK_SECONDS,
    ) -> None:
        if not isinstance(store, JobStore) or not isinstance(runner, JobRunner):
            raise TypeError("a JobService needs a JobStore and a JobRunner")
        if not isinstance(policy, JobPolicy) or not isinstance(allowlist, Allowlist):
            raise TypeError("a JobService needs a JobPolicy and an Allowlist")
        if store.host_id is not None and store.host_id != host_identity.id:
            raise ValueError("the job store belongs to another host")
        self.owner = owner
        self.store = store
        self.runner = runner
        self.identity = host_identity
        self.allowlist = allowlist
        self.admission = admission
        self.policy = policy
        self.dataset_tags = dataset_tags
        self.max_seconds_cap = max_seconds_cap
        self.slack_seconds = float(slack_seconds)
        self._lock = threading.Lock()
        self._runs: dict[str, JobRun] = {}
        self._inputs: dict[str, dict[str, str]] = {}
        self._released: dict[str, dict[str, bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- recording -------------------------------------------------------------------

    def _move(self, job_id: str, state: JobState, *, by: str, reason: str = "",
              at: float | None = None) -> None:  # fmt: skip
        reason = printable(reason, MAX_REASON_CHARS)
        self.store.transition(job_id, state, by=by, reason=reason, at=at)
        self._audit(job_id, state, by, reason)

    def _audit(self, job_id: str, state: JobState, by: str, reason: str, **more: Any) -> None:
        self.owner.audit.event("job", job_id=job_id, state=str(state), by=by, reason=reason,
                               **more)  # fmt: skip

    def _review(self, signed: SignedJob) -> CodeReview:
        return review_code(signed, self.allowlist, list(self.dataset_tags()),
                           max_seconds=self.max_seconds_cap)  # fmt: skip

    def _state(self, job_id: str) -> JobState:
        stored = self.store.get(job_id)
        if stored is None:
            raise KeyError(f"no job {printable(job_id, 64)!r}")
        return stored.state

    # -- submission and review ----------------------------------------------------------

    def submit(self, signed_job_or_wire: SignedJob | bytes, *, via: str) -> str:
        """Take a scientist's signed job; returns its ID. Refused: a malformed or forged
        job, or one for another host (InvalidJob), a client not admitted (JobRefused), a
        duplicate or one over a quota (the store's errors). Nothing is stored when refused."""
        if type(via) is not str or not 0 < len(via) <= MAX_VIA_CHARS or not via.isprintable():
            raise ValueError(f"via is printable text of 1 to {MAX_VIA_CHARS} characters")
        signed = signed_job_or_wire
        if not isinstance(signed, SignedJob):
            signed = SignedJob.from_wire(signed)
        signed.verify(expected_host_id=self.identity.id)
        client_id = signed.client_id
        verdict = self.admission.verdict(client_id)
        if verdict != "admitted":
            why = ("the owner refused it" if verdict == "refused"
                   else "the owner has not admitted it yet")  # fmt: skip
            self.owner.audit.event("job_refused", job_id=signed.job_id, client_id=client_id,
                                   via=via, reason=f"client not admitted ({verdict})")  # fmt: skip
            raise JobRefused(f"client {client_id} may not submit jobs to this host: {why}")
        self.store.submit(signed)
        job_id = signed.job_id
        self._audit(job_id, _S.SUBMITTED, client_id, "submitted", via=via)
        self._move(job_id, _S.PENDING_REVIEW, by=HOST, reason="awaiting review")
        review = self._review(signed)
        rejected = auto_reject_reason(review)
        if rejected is not None:
            self._move(job_id, _S.REJECTED, by=POLICY, reason=rejected)
            return job_id
        approved, why = decide_code(review, self.policy)
        if approved:
            self._move(job_id, _S.AUTO_APPROVED, by=POLICY, reason=why)
            self._move(job_id, _S.QUEUED, by=POLICY, reason="queued to run")
        else:
            self.owner.audit.event("job_review", job_id=job_id, by=POLICY, reason=why)
        return job_id

    def review(self, job_id: str) -> CodeReview:
        """The job's code review as of now (for the owner)."""
        stored = self.store.get(job_id)
        if stored is None:
            raise KeyError(f"no job {printable(job_id, 64)!r}")
        return self._review(stored.job)

    def approve(self, job_id: str, by: str = OWNER) -> None:
        """The owner approves a job waiting for review: APPROVED, then QUEUED. Refused
        (JobRefused) if the review now finds problems (e.g. a dataset went away)."""
        if self._state(job_id) is not _S.PENDING_REVIEW:
            raise InvalidTransition(f"job {job_id} is not waiting for review")
        review = self.review(job_id)
        if review.problems:
            raise JobRefused(f"job {job_id} cannot be approved: {auto_reject_reason(review)}")
        self._move(job_id, _S.APPROVED, by=by, reason=f"approved by {by}")
        self._move(job_id, _S.QUEUED, by=by, reason="queued to run")

    def reject(self, job_id: str, reason: str, by: str = OWNER) -> None:
        """The owner rejects a job waiting for review, saying why."""
        if self._state(job_id) is not _S.PENDING_REVIEW:
            raise InvalidTransition(f"job {job_id} is not waiting for review")
        self._move(job_id, _S.REJECTED, by=by, reason=reason or f"rejected by {by}")

    def cancel(self, job_id: str, by: str) -> None:
        """Cancel a job before or while it runs; ``by`` is its scientist's Client ID or
        ``"owner"`` (PermissionDenied otherwise). A running job's session is closed."""
        stored = self.store.get(job_id)
        if stored is None:
            raise KeyError(f"no job {printable(job_id, 64)!r}")
        if by != OWNER and by != stored.client_id:
            raise PermissionDenied(f"only the job's scientist or the owner may cancel {job_id}")
        if stored.state not in BEFORE_RUN and stored.state is not _S.RUNNING:
            raise InvalidTransition(f"job {job_id} is {stored.state}; it can no longer be "
                                    "cancelled")  # fmt: skip
        self._move(job_id, _S.CANCELLED, by=by, reason=f"cancelled by {by}")
        self._close_later(job_id)

    # -- running ------------------------------------------------------------------------

    async def run_next(self, timeout: float) -> str | None:
        """Run the oldest queued job until its outputs are computed (or failed); returns
        its ID, or None when none is queued. ``timeout``: seconds its session may take
        to start."""
        self._loop = asyncio.get_running_loop()
        for stored in self.store.all([_S.QUEUED], limit=16):
            job_id = stored.job_id
            try:
                self.store.start_attempt(job_id, by=HOST)
            except InvalidTransition as exc:  # taken meanwhile, or past its deadline
                if stored.deadline <= time.time():
                    with contextlib.suppress(InvalidTransition, KeyError):
                        self._move(job_id, _S.EXPIRED, by=HOST, reason="deadline passed")
                log.info("job %s not started: %s", job_id, exc)
                continue
            except InvalidJob as exc:
                self._move(job_id, _S.FAILED, by=HOST, reason=f"stored job is damaged: {exc}")
                continue
            self._audit(job_id, _S.RUNNING, HOST, "run started (attempt 1)")
            await self._run(stored.job, timeout)
            return job_id
        return None

    async def _run(self, signed: SignedJob, timeout: float) -> None:
        job_id = signed.job_id
        try:
            self._inputs[job_id] = self._input_hashes(signed)
            run = await self.runner.run(signed, timeout=timeout)
        except (JobRunError, JobRefused) as exc:
            self._move(job_id, _S.FAILED, by=HOST, reason=exc.reason)
            self._inputs.pop(job_id, None)
            return
        except Exception as exc:  # fail closed: a run that cannot start has failed
            log.exception("job %s could not start", job_id)
            self._move(job_id, _S.FAILED, by=HOST, reason=f"could not start: {exc}")
            self._inputs.pop(job_id, None)
            return
        with self._lock:
            self._runs[job_id] = run
        spec = signed.spec
        bound = min(spec.max_seconds + self.slack_seconds, spec.deadline - time.time())
        outcome = await self._await_outputs(run, job_id, max(bound, 0.0))
        if outcome == "moved":  # cancelled meanwhile
            await self._drop(job_id)
            return
        if run.timed_out:
            await self._finish(job_id, _S.TIMED_OUT, self._why(run))
        elif outcome == "late" and spec.deadline <= time.time():
            await self._finish(job_id, _S.EXPIRED, "deadline passed while running")
        elif outcome == "late":
            await self._finish(job_id, _S.TIMED_OUT, f"outputs not computed within {bound:g} s")
        elif run.failures:
            await self._finish(job_id, _S.FAILED, self._why(run))
        else:
            self._move(job_id, _S.FINISHED, by=HOST, reason="run finished")
            count = len(run.outputs)
            self._move(job_id, _S.PENDING_OUTPUT_REVIEW, by=HOST,
                       reason=f"{count} output request(s) await a decision")  # fmt: skip

    def _input_hashes(self, signed: SignedJob) -> dict[str, str]:
        """Program input -> content hash of the hosted tensor bound to it (by first tag,
        as the runner binds them), taken as the run starts."""
        by_tag: dict[str, Any] = {}
        for record in self.owner.store.listing():
            if record.tags:
                by_tag.setdefault(record.tags[0], record.value)
        hashes: dict[str, str] = {}
        for input_id, tag in signed.spec.inputs.items():
            value = by_tag.get(tag)
            if not isinstance(value, torch.Tensor):
                raise JobRefused(f"input {input_id} is not bound to a hosted tensor; "
                                 "no receipt could attest it")  # fmt: skip
            hashes[input_id] = content_hash(value)
        return hashes

    async def _await_outputs(self, run: JobRun, job_id: str, bound: float) -> str:
        """Wait for the run: "done" once every output is computed or failed, "moved" if
        the job left RUNNING (cancelled), "late" after ``bound`` s."""
        loop = asyncio.get_running_loop()
        end = loop.time() + bound
        while True:
            if self._computed(run):
                return "done"
            if self._state(job_id) is not _S.RUNNING:
                return "moved"
            if loop.time() >= end:
                return "late"
            await asyncio.sleep(POLL_SECONDS)

    def _computed(self, run: JobRun) -> bool:
        failed = run.failures
        for name, output in run.outputs.items():
            if name in failed or output.request_id is None:
                continue
            try:
                request = self.owner.requests[output.request_id]
            except KeyError:
                continue  # gone from the queue: decided and dropped; wait_outputs knows
            if request.pending and not request.ready and request.error is None:
                return False
        return True

    @staticmethod
    def _why(run: JobRun) -> str:
        return "; ".join(f"output {name}: {cause}" for name, cause in run.failures.items())

    async def _finish(self, job_id: str, state: JobState, reason: str) -> None:
        with contextlib.suppress(InvalidTransition):  # e.g. cancelled at the last moment
            self._move(job_id, state, by=HOST, reason=reason)
        await self._drop(job_id)

    async def _drop(self, job_id: str) -> None:
        with self._lock:
            run = self._runs.pop(job_id, None)
        self._inputs.pop(job_id, None)
        if run is not None:
            await run.close()

    def _close_later(self, job_id: str) -> None:
        """Close a job's run from any thread (on the loop that runs it)."""
        with self._lock:
            run = self._runs.pop(job_id, None)
        self._inputs.pop(job_id, None)
        loop = self._loop
        if run is None or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(run.close())
        else:
            asyncio.run_coroutine_threadsafe(run.close(), loop)

    def run_of(self, job_id: str) -> JobRun | None:
        """The open run of a job (running or awaiting its output review)."""
        with self._lock:
            return self._runs.get(job_id)

    def released(self, job_id: str) -> dict[str, bytes] | None:
        """The encoded bytes a released job's receipt attests, by output name."""
        found = self._released.get(job_id)
        return None if found is None else dict(found)

    # -- settling -----------------------------------------------------------------------

    async def settle_outputs(self, job_id: str, timeout: float) -> JobState:
        """Once every output request of a job awaiting output review is decided: RELEASED
        (all accepted) with a signed receipt, or WITHHELD (any denied or failed). Returns
        the job's state (still PENDING_OUTPUT_REVIEW while a decision is missing)."""
        state = self._state(job_id)
        run = self.run_of(job_id)
        if state is not _S.PENDING_OUTPUT_REVIEW or run is None:
            return state
        values = await run.wait_outputs(timeout)
        if any(isinstance(v, RequestTimeout) for v in values.values()):
            return _S.PENDING_OUTPUT_REVIEW
        denied = {n: v for n, v in values.items() if isinstance(v, BaseException)}
        by = self._deciders(run)
        if denied:
            reason = "; ".join(f"output {n}: {printable(str(e), 500)}" for n, e in denied.items())
            await self._finish_as(job_id, _S.WITHHELD, by, reason)
            return _S.WITHHELD
        stored = self.store.get(job_id)
        if stored is None:
            raise KeyError(f"no job {printable(job_id, 64)!r}")
        try:
            encoded = {name: codec.encode(value) for name, value in values.items()}
        except (TypeError, ValueError) as exc:
            await self._finish_as(job_id, _S.WITHHELD, HOST, f"an output cannot be encoded: {exc}")
            return _S.WITHHELD
        if sum(len(b) for b in encoded.values()) > stored.job.spec.max_result_bytes:
            await self._finish_as(job_id, _S.WITHHELD, HOST, "results exceed max_result_bytes")
            return _S.WITHHELD
        now = time.time()
        receipt = Receipt.issue(
            self.identity, stored.job, inputs=self._inputs.get(job_id, {}),
            outputs={name: content_hash(data) for name, data in encoded.items()},
            submitted_at=stored.submitted_at,
            started_at=stored.started_at or stored.submitted_at,
            finished_at=stored.finished_at or now, released_at=now,
        )  # fmt: skip
        self._move(job_id, _S.RELEASED, by=by, reason="every output accepted", at=now)
        self.store.set_receipt(job_id, receipt.to_wire())
        self._released[job_id] = encoded
        await self._drop(job_id)
        return _S.RELEASED

    async def _finish_as(self, job_id: str, state: JobState, by: str, reason: str) -> None:
        self._move(job_id, state, by=by, reason=reason)
        await self._drop(job_id)

    def _deciders(self, run: JobRun) -> str:
        found: list[str] = []
        for output in run.outputs.values():
            with contextlib.suppress(KeyError, TypeError):
                who = self.owner.requests[output.request_id].decided_by  # type: ignore[index]
                if who and who not in found:
                    found.append(who)
        return printable(", ".join(found), 200) or OWNER

    # -- housekeeping -------------------------------------------------------------------

    def expire_due(self, now: float | None = None) -> list[str]:
        """Expire open jobs past their deadline (not running ones); audited."""
        expired = self.store.expire_due(now)
        for job_id in expired:
            self._audit(job_id, _S.EXPIRED, HOST, "deadline passed")
            self._close_later(job_id)
        return expired

    def recover_after_restart(self, requeue: bool = False) -> list[tuple[str, JobState]]:
        """Settle jobs a previous process left RUNNING (FAILED "host restarted"); audited."""
        settled = self.store.recover_after_restart(requeue)
        for job_id, state in settled:
            self._audit(job_id, state, HOST, "host restarted")
        return settled
