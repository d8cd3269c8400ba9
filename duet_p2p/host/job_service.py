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
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from duet_p2p.allowlist import Allowlist
from duet_p2p.errors import DuetError, PermissionDenied, ProtocolError, RequestTimeout
from duet_p2p.host.admissions import AdmissionPolicy
from duet_p2p.host.job_runner import JobRun, JobRunError, JobRunner
from duet_p2p.host.job_store import JobStore
from duet_p2p.identity import Identity
from duet_p2p.modules import spec_to_module
from duet_p2p.offline.lifecycle import BEFORE_RUN, InvalidTransition, JobState
from duet_p2p.offline.policy import (
    JobPolicy,
    auto_reject_reason,
    decide_code,
    decide_output,
    output_facts,
)
from duet_p2p.offline.receipt import Receipt, content_hash
from duet_p2p.offline.results import encode_output
from duet_p2p.offline.review import CodeReview, review_code
from duet_p2p.offline.spec import InvalidJob, SignedJob
from duet_p2p.owner.owner import Owner
from duet_p2p.rpc import codec
from duet_p2p.text import printable

__all__ = ["JobRefused", "JobService"]

log = logging.getLogger(__name__)

SLACK_SECONDS = 30.0
"""Time past a job's ``max_seconds`` its outputs may take to be computed."""
POLL_SECONDS = 0.05
JOURNAL_WAIT = 30.0
PROGRESS_SECONDS = 0.25
"""Seconds between looks at a running job's steps (each one written to the job store)."""
MAX_VIA_CHARS = 64
MAX_REASON_CHARS = 2000
OWNER = "owner"
POLICY = "policy"
HOST = "host"

_S = JobState


@dataclass(frozen=True)
class _Encoded:
    """An output already encoded (kept in the job store)."""

    data: bytes


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_moved: Callable[[str, JobState], None] | None = None
        """Called (from any thread) after each of a job's moves."""
        self.output_request_ids: set[str] = set()
        """The owner's requests behind the outputs of jobs run by this process or awaiting
        their review (a decision on one of them settles its job)."""

    # -- recording -------------------------------------------------------------------

    def _move(self, job_id: str, state: JobState, *, by: str, reason: str = "",
              at: float | None = None) -> None:  # fmt: skip
        reason = printable(reason, MAX_REASON_CHARS)
        self.store.transition(job_id, state, by=by, reason=reason, at=at)
        self._audit(job_id, state, by, reason)
        self._moved(job_id, state)

    def _moved(self, job_id: str, state: JobState) -> None:
        if self.on_moved is not None:
            try:
                self.on_moved(job_id, state)
            except Exception:  # noqa: BLE001 - a listener never breaks a transition
                log.exception("a job listener failed")

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
        self._decide_review(job_id, self._review(signed))
        return job_id

    def _decide_review(self, job_id: str, review: CodeReview) -> None:
        """Reject a job that cannot run, approve one the policy covers, else leave it to
        the owner. A job whose only problem is a dataset not hosted (yet: a host starting
        up, an owner about to host it) waits for review instead of being rejected."""
        unhosted = sum(1 for item in review.inputs.values() if not item.hosted)
        if review.problems and len(review.problems) == unhosted:
            why = f"waits: {review.problems[0]}"
            self.owner.audit.event("job_review", job_id=job_id, by=POLICY, reason=why)
            return
        rejected = auto_reject_reason(review)
        if rejected is not None:
            self._move(job_id, _S.REJECTED, by=POLICY, reason=rejected)
            return
        approved, why = decide_code(review, self.policy)
        if approved:
            self._move(job_id, _S.AUTO_APPROVED, by=POLICY, reason=why)
            self._move(job_id, _S.QUEUED, by=POLICY, reason="queued to run")
        else:
            self.owner.audit.event("job_review", job_id=job_id, by=POLICY, reason=why)

    def review_waiting(self) -> int:
        """Review again the jobs waiting for a dataset that is now hosted (the policy may
        approve them); how many were decided."""
        hosted = set(self.dataset_tags())
        decided = 0
        for stored in self.store.all([_S.PENDING_REVIEW], limit=100):
            try:
                tags = set(stored.job.spec.inputs.values())
            except InvalidJob:
                continue
            if not tags <= hosted:
                continue
            with contextlib.suppress(InvalidTransition, KeyError):
                review = self._review(stored.job)
                before = self._state(stored.job_id)
                self._decide_review(stored.job_id, review)
                decided += self._state(stored.job_id) is not before
        return decided

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
        self._deny_outputs(job_id, f"job {job_id} was cancelled")
        self._close_later(job_id)

    # -- running ------------------------------------------------------------------------

    async def run_next(self, timeout: float) -> str | None:
        """Run the oldest queued job until its outputs are computed (or failed); returns
        its ID, or None when none is queued. ``timeout``: seconds its session may take
        to start."""
        self._loop = asyncio.get_running_loop()
        hosted = set(self.dataset_tags())
        for stored in self.store.all([_S.QUEUED], limit=16):
            job_id = stored.job_id
            try:
                if not set(stored.job.spec.inputs.values()) <= hosted:
                    continue  # its datasets are not hosted (yet, after a restart): it waits
            except InvalidJob:
                pass  # start_attempt refuses it below
            try:
                attempt = self.store.start_attempt(job_id, by=HOST)
            except InvalidTransition as exc:  # taken meanwhile, or past its deadline
                if stored.deadline <= time.time():
                    with contextlib.suppress(InvalidTransition, KeyError):
                        self._move(job_id, _S.EXPIRED, by=HOST, reason="deadline passed")
                log.info("job %s not started: %s", job_id, exc)
                continue
            except InvalidJob as exc:  # it never ran: it ends without running
                with contextlib.suppress(InvalidTransition, KeyError):
                    self._move(job_id, _S.CANCELLED, by=HOST,
                               reason=f"its stored document is damaged: {exc}")  # fmt: skip
                continue
            self._audit(job_id, _S.RUNNING, HOST, f"run started (attempt {attempt})")
            self._moved(job_id, _S.RUNNING)
            try:
                await self._run(stored.job, timeout)
            except Exception as exc:  # fail closed: a run the host lost track of has failed
                log.exception("job %s failed inside the host", job_id)
                await self._finish(job_id, _S.FAILED, f"the host failed to run it: {exc}")
            return job_id
        return None

    async def _run(self, signed: SignedJob, timeout: float) -> None:
        job_id = signed.job_id
        try:
            hashes = await asyncio.to_thread(self._input_hashes, signed)
            await asyncio.to_thread(self.store.set_input_hashes, job_id, hashes)
            run = await self.runner.run(signed, timeout=timeout)
        except (JobRunError, JobRefused) as exc:
            await self._finish(job_id, _S.FAILED, exc.reason)
            return
        except Exception as exc:  # fail closed: a run that cannot start has failed
            log.exception("job %s could not start", job_id)
            await self._finish(job_id, _S.FAILED, f"could not start: {exc}")
            return
        with self._lock:
            self._runs[job_id] = run
        requests = {name: rid for name, rid in run.request_ids.items() if rid is not None}
        self.output_request_ids.update(requests.values())
        try:  # known as a job's outputs before anything can decide them
            await asyncio.to_thread(self.store.set_requests, job_id, requests)
        except Exception as exc:
            for request_id in requests.values():
                with contextlib.suppress(DuetError, KeyError):
                    self.owner.requests.decide_as(request_id, False, HOST, "job failed")
            await self._finish(job_id, _S.FAILED, f"its outputs could not be recorded: {exc}")
            return
        with contextlib.suppress(Exception):  # bookkeeping only
            self.store.set_progress(job_id, 0, len(signed.spec.program["steps"]))
        spec = signed.spec
        bound = min(spec.max_seconds + self.slack_seconds, spec.deadline - time.time())
        outcome = await self._await_outputs(run, job_id, max(bound, 0.0))
        if outcome == "moved":  # cancelled meanwhile
            self._deny_outputs(job_id, f"job {job_id} was cancelled")
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
            steps = len(spec.program["steps"])
            with contextlib.suppress(Exception):
                self.store.set_progress(job_id, steps, steps)
            try:
                self._move(job_id, _S.FINISHED, by=HOST, reason="run finished")
            except InvalidTransition:  # cancelled at the last moment
                await self._drop(job_id)
                return
            count = len(run.outputs)
            await self._keep_taken(job_id, run)
            self._move(job_id, _S.PENDING_OUTPUT_REVIEW, by=HOST,
                       reason=f"{count} output request(s) await a decision")  # fmt: skip
            # the outputs wait in the owner's journal (or, decided meanwhile, in the job
            # store); the worker goes
            await self._drop(job_id, keep_taken=True)

    async def _keep_taken(self, job_id: str, run: JobRun) -> None:
        """Outputs a handler accepted while the run was open reached its loopback session,
        not the journal: keep them in the job store before the session closes."""
        values = await run.wait_outputs(0)
        taken = {n: v for n, v in values.items() if not isinstance(v, BaseException)}
        if not taken:
            return
        try:
            encoded = {name: encode_output(value) for name, value in taken.items()}
            await asyncio.to_thread(self._store_outputs, job_id, encoded)
        except (TypeError, ValueError, DuetError) as exc:  # settled as withheld later
            log.warning("job %s: an accepted output cannot be kept: %s", job_id, exc)

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
        shown, written = (-1, -1), 0.0
        while True:
            steps = self._steps(run, job_id)
            if steps != shown and steps[1] and loop.time() - written >= PROGRESS_SECONDS:
                shown, written = steps, loop.time()
                with contextlib.suppress(Exception):  # bookkeeping only
                    await asyncio.to_thread(self.store.set_progress, job_id, *steps)
            if self._state(job_id) is not _S.RUNNING:
                return "moved"
            if self._computed(run):
                return "done"
            if loop.time() >= end:
                return "late"
            await asyncio.sleep(POLL_SECONDS)

    @staticmethod
    def _steps(run: JobRun, job_id: str) -> tuple[int, int]:
        """The run's (steps done, steps in all) as its worker reports them, clamped to the
        job's own plan."""
        done, total = run.plan_steps()
        steps = run.steps
        if total != steps:
            return 0, steps
        return min(max(done, 0), steps), steps

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
        self._deny_outputs(job_id, f"job {job_id} ended {state}")
        await self._drop(job_id)

    def _deny_outputs(self, job_id: str, reason: str) -> None:
        """Deny whatever output of an ended job is still undecided: it never leaves (not
        through a handler, nor the owner's queue, once the job is over)."""
        request_ids = list(self.store.requests(job_id, every_run=True))
        for request_id in request_ids:
            request = self._request(request_id)
            if request is not None and request.pending:
                with contextlib.suppress(DuetError):
                    self.owner.requests.decide_as(request_id, False, HOST, reason)
            elif self.owner.journal is not None:  # an accepted value kept for nobody: freed
                with contextlib.suppress(Exception):
                    self.owner.later(self.owner.delivered, request_id)
        self.output_request_ids.difference_update(request_ids)

    def is_job_request(self, request_id: str) -> bool:
        """Whether a request of the owner's queue is a job's output (collected with its
        job and receipt, never on its own)."""
        return self.store.is_job_request(request_id)

    async def _drop(self, job_id: str, *, keep_taken: bool = False) -> None:
        """Close a job's run, then forget it. With ``keep_taken`` (the run ended awaiting
        its output review), outputs the owner accepted while it was closing reached its
        loopback session, not the journal: they are kept in the job store first. Until the
        run is forgotten it is ``closing``, and settling waits for it."""
        with self._lock:
            run = self._runs.get(job_id)
        if run is None:
            return
        run.closing = True
        try:
            await run.close()
            if keep_taken:
                await self._keep_taken(job_id, run)
        finally:
            with self._lock:
                if self._runs.get(job_id) is run:
                    del self._runs[job_id]

    def _close_later(self, job_id: str) -> None:
        """Close a job's run from any thread (on the loop that runs it)."""
        with self._lock:
            run = self._runs.pop(job_id, None)
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
        """The encoded bytes a released job's receipt attests, by output name (None once
        freed, or before its release)."""
        stored = self.store.get(job_id)
        if stored is None or stored.receipt is None:
            return None
        outputs = self.store.outputs(job_id)
        if any(out.payload is None for out in outputs) or not outputs:
            return None
        return {out.name: out.payload for out in outputs}  # type: ignore[misc]

    # -- settling -----------------------------------------------------------------------

    async def settle_outputs(self, job_id: str, timeout: float) -> JobState:
        """Once every output request of a job awaiting output review is decided: RELEASED
        (all accepted) with a signed receipt and its outputs stored, or WITHHELD (any
        denied or failed). Returns the job's state (still PENDING_OUTPUT_REVIEW while a
        decision is missing). After a restart the decisions and values come from the
        owner's journal."""
        state = self._state(job_id)
        if state is not _S.PENDING_OUTPUT_REVIEW:
            return state
        run = self.run_of(job_id)
        if run is not None and run.closing:  # its taken outputs are being kept: next time
            return _S.PENDING_OUTPUT_REVIEW
        if run is not None:
            values = await run.wait_outputs(timeout)
            by = self._deciders(run.request_ids.values())
        else:
            read = await asyncio.to_thread(self._values_from_journal, job_id)
            if read is None:
                return _S.PENDING_OUTPUT_REVIEW
            values, by = read
        if any(isinstance(v, RequestTimeout) for v in values.values()):
            return _S.PENDING_OUTPUT_REVIEW
        denied = {n: v for n, v in values.items() if isinstance(v, BaseException)}
        if denied:
            reason = "; ".join(f"output {n}: {printable(str(e), 500)}" for n, e in denied.items())
            await self._finish_as(job_id, _S.WITHHELD, by, reason)
            return _S.WITHHELD
        stored = self.store.get(job_id)
        if stored is None:
            raise KeyError(f"no job {printable(job_id, 64)!r}")
        try:
            encoded = {name: value.data if isinstance(value, _Encoded) else encode_output(value)
                       for name, value in values.items()}  # fmt: skip
        except (TypeError, ValueError, DuetError) as exc:
            await self._finish_as(job_id, _S.WITHHELD, HOST, f"an output cannot be encoded: {exc}")
            return _S.WITHHELD
        if sum(len(b) for b in encoded.values()) > stored.job.spec.max_result_bytes:
            await self._finish_as(job_id, _S.WITHHELD, HOST, "results exceed max_result_bytes")
            return _S.WITHHELD
        inputs = await asyncio.to_thread(self.store.input_hashes, job_id)
        if inputs is None:  # never recorded: no receipt could say what it ran on
            await self._finish_as(job_id, _S.WITHHELD, HOST,
                                  "the inputs it ran on were not recorded")  # fmt: skip
            return _S.WITHHELD
        try:
            await asyncio.to_thread(self._store_outputs, job_id, encoded)
        except DuetError as exc:  # over a quota of the store
            await self._finish_as(job_id, _S.WITHHELD, HOST, f"the results cannot be kept: {exc}")
            return _S.WITHHELD
        now = time.time()
        receipt = Receipt.issue(
            self.identity, stored.job, inputs=inputs,
            outputs={name: content_hash(data) for name, data in encoded.items()},
            submitted_at=stored.submitted_at,
            started_at=stored.started_at or stored.submitted_at,
            finished_at=stored.finished_at or now, released_at=now,
        )  # fmt: skip
        with self.store._write():  # the release and its receipt, in one transaction
            self.store.transition(job_id, _S.RELEASED, by=by, reason="every output accepted",
                                  at=now)  # fmt: skip
            self.store.set_receipt(job_id, receipt.to_wire())
        self._audit(job_id, _S.RELEASED, by, "every output accepted")
        self._moved(job_id, _S.RELEASED)
        self.output_request_ids.difference_update(self.store.requests(job_id).values())
        await self._drop(job_id)
        return _S.RELEASED

    def _store_outputs(self, job_id: str, encoded: dict[str, bytes]) -> None:
        requests = self.store.requests(job_id)
        have = {out.name for out in self.store.outputs(job_id, payloads=False)}
        for name, data in encoded.items():
            if name in have:
                continue
            lineage, elements, aggregation = "", 0, 0.0
            request = self._request(requests.get(name))
            if request is not None:
                lineage, elements = request.lineage, int(request.elements)
                aggregation = float(request.aggregation)
            self.store.store_output(job_id, name, data, lineage, elements, aggregation)

    def _request(self, request_id: str | None) -> Any:
        if request_id is None:
            return None
        try:
            return self.owner.requests[request_id]
        except (KeyError, DuetError):
            return None

    def _values_from_journal(self, job_id: str) -> tuple[dict[str, Any], str] | None:
        """A job's output values as the journal kept them (its run ended with the host's
        last process); None while any is undecided."""
        journal = self.owner.journal
        if journal is not None:  # decisions queued for the journal are written first
            self.owner.later(lambda: None).result(timeout=JOURNAL_WAIT)
        requests = self.store.requests(job_id)
        stored = self.store.get(job_id)
        if stored is None:
            raise KeyError(job_id)
        values: dict[str, Any] = {}
        deciders: list[str] = []
        kept_outputs = {out.name: out.payload for out in self.store.outputs(job_id)
                        if out.payload is not None}  # fmt: skip
        for name in stored.job.spec.outputs:
            rid = requests.get(name)
            if name in kept_outputs:  # accepted while its run was open
                values[name] = _Encoded(kept_outputs[name])
                continue
            live = self._request(rid)
            if live is not None and live.pending:
                return None
            kept = None if journal is None or rid is None else journal.get(rid)
            if kept is None:
                values[name] = DuetError("its request was lost when the host restarted")
                continue
            if kept.status == "pending":
                return None
            if kept.decided_by and kept.decided_by not in deciders:
                deciders.append(kept.decided_by)
            if kept.status != "accepted":
                values[name] = PermissionDenied(f"{kept.status}: {kept.decision_reason}")
                continue
            payload = journal.payload(rid) if journal is not None else None
            if payload is None:
                values[name] = DuetError("its value was not kept")
                continue
            try:
                value = codec.decode(payload, limits=codec.DecodeLimits(max_bytes=len(payload)))
                values[name] = spec_to_module(value) if kept.module else value
            except (ProtocolError, ValueError, TypeError) as exc:
                values[name] = DuetError(f"its kept value cannot be read: {exc}")
        for rid in requests.values():  # the outputs now live in the job store
            with contextlib.suppress(Exception):
                self.owner.delivered(rid)
        return values, printable(", ".join(deciders), 200) or OWNER

    # -- output review ------------------------------------------------------------------

    def output_requests(self, job_id: str) -> dict[str, Any]:
        """Released name -> the owner's request for it (None if it is no longer queued)."""
        stored = self.store.get(job_id)
        if stored is None:
            raise KeyError(f"no job {printable(job_id, 64)!r}")
        requests = self.store.requests(job_id)
        return {name: self._request(requests.get(name)) for name in stored.job.spec.outputs}

    def release(self, job_id: str, by: str = OWNER) -> None:
        """Accept every undecided output of a job awaiting output review."""
        self._decide_outputs(job_id, True, by, "")

    def withhold(self, job_id: str, reason: str, by: str = OWNER) -> None:
        """Deny every undecided output of a job awaiting output review, saying why."""
        self._decide_outputs(job_id, False, by, reason or f"withheld by {by}")

    def _decide_outputs(self, job_id: str, accept: bool, by: str, reason: str) -> None:
        if self._state(job_id) is not _S.PENDING_OUTPUT_REVIEW:
            raise InvalidTransition(f"job {job_id} is not waiting for its output review")
        for request in self.output_requests(job_id).values():
            if request is not None and request.pending:
                with contextlib.suppress(DuetError):  # decided meanwhile
                    self.owner.requests.decide_as(request.request_id, accept, by, reason)

    def apply_release_rules(self, job_id: str) -> int:
        """Release each computed output the host's release rules cover (a job whose output
        would break a rule waits for the owner); returns how many were released."""
        if not self.policy.release or self._state(job_id) is not _S.PENDING_OUTPUT_REVIEW:
            return 0
        review = self.review(job_id)
        released = 0
        for name, request in self.output_requests(job_id).items():
            if request is None or not request.pending or not request.ready:
                continue
            facts = output_facts(
                review, name, elements=request.elements, size_bytes=request.size_bytes,
                aggregation=request.aggregation, checks=request.checks, error=request.error,
            )  # fmt: skip
            ok, why = decide_output(facts, self.policy.release,
                                    min_aggregation=self.owner.requests.min_aggregation)  # fmt: skip
            if ok:
                with contextlib.suppress(DuetError):
                    self.owner.requests.decide_as(request.request_id, True, f"{POLICY}: {why}")
                    released += 1
        return released

    async def _finish_as(self, job_id: str, state: JobState, by: str, reason: str) -> None:
        self._move(job_id, state, by=by, reason=reason)
        self._deny_outputs(job_id, f"job {job_id} ended {state}")
        await self._drop(job_id)

    def _deciders(self, request_ids: Iterable[str | None]) -> str:
        found: list[str] = []
        for request_id in request_ids:
            with contextlib.suppress(KeyError, TypeError, DuetError):
                who = self.owner.requests[request_id].decided_by  # type: ignore[index]
                if who and who not in found:
                    found.append(who)
        return printable(", ".join(found), 200) or OWNER

    # -- housekeeping -------------------------------------------------------------------

    def expire_due(self, now: float | None = None) -> list[str]:
        """Expire open jobs past their deadline (not running ones); audited."""
        expired = self.store.expire_due(now)
        for job_id in expired:
            self._audit(job_id, _S.EXPIRED, HOST, "deadline passed")
            self._moved(job_id, _S.EXPIRED)
            self._deny_outputs(job_id, f"job {job_id} expired: its deadline passed")
            self._close_later(job_id)
        return expired

    def recover_after_restart(self, requeue: bool = False) -> list[tuple[str, JobState]]:
        """Settle jobs a previous process left RUNNING (FAILED "host restarted"); audited."""
        settled = self.store.recover_after_restart(requeue)
        for job_id, state in settled:
            self._audit(job_id, state, HOST, "host restarted")
            if state is not _S.PENDING_OUTPUT_REVIEW:  # the interrupted run's outputs
                self._deny_outputs(job_id, f"job {job_id}'s run was cut by a restart")
        for stored in self.store.all([_S.SUBMITTED], limit=100_000):  # stopped mid-intake
            with contextlib.suppress(InvalidTransition, InvalidJob, KeyError):
                self._move(stored.job_id, _S.PENDING_REVIEW, by=HOST, reason="awaiting review")
                self._decide_review(stored.job_id, self._review(stored.job))
        for stored in self.store.all([_S.APPROVED, _S.AUTO_APPROVED], limit=100_000):
            with contextlib.suppress(InvalidTransition, KeyError):
                self._move(stored.job_id, _S.QUEUED, by=HOST, reason="queued to run")
        for stored in self.store.all([_S.PENDING_OUTPUT_REVIEW], limit=100_000):
            self.output_request_ids.update(self.store.requests(stored.job_id).values())
        return settled
