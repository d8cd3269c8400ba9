"""Run an offline job as a loopback scientist session on a standing host.

A job runs exactly as its scientist would have run it live: an in-memory connection joins
an :class:`~duet_p2p.owner.session.OwnerCore` serving the shared :class:`Owner` for the
job's ``client_id`` and a :class:`~duet_p2p.scientist.session.ScientistCore` that defines
the job's plan, runs it once on the hosted datasets its inputs are bound to (by first tag,
as the store lists them) and asks for each declared output. Those asks are ordinary
requests in ``owner.requests``: journaled, kept for that scientist, decided by the owner or
by release rules (handlers), under every disclosure check of a live request.

The session's worker gets the job's time budget (``max_op_seconds`` and
``max_plan_seconds`` at most the job's ``max_seconds``) and result caps. Nothing here
touches a job store or lifecycle: the caller records what a run came to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from duet_p2p.allowlist import Allowlist
from duet_p2p.connect import Connection
from duet_p2p.errors import DuetError, RequestTimeout
from duet_p2p.limits import OwnerLimits
from duet_p2p.offline.review import review_code
from duet_p2p.offline.spec import SignedJob
from duet_p2p.owner.owner import Owner
from duet_p2p.owner.session import OwnerCore, new_supervisor
from duet_p2p.rpc.ops import INDEX_OP
from duet_p2p.rpc.plan_spec import DEFINE_OP, RUN_OP
from duet_p2p.scientist.pointer import Pointer
from duet_p2p.scientist.requests import RequestHandle
from duet_p2p.scientist.session import ScientistCore
from duet_p2p.text import printable
from duet_p2p.transport.memory import memory_pair

__all__ = ["JobOutput", "JobRun", "JobRunError", "JobRunner", "job_limits"]

log = logging.getLogger(__name__)

TIME_BUDGET = "time budget"
"""What the failure of an output stopped for running too long says."""
MAX_REASON_CHARS = 2000
CLOSE_SECONDS = 30.0


class JobRunError(DuetError):
    """A job could not be started (an op off the allowlist, an unknown dataset tag, a
    passed deadline, the session failing to start); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class JobOutput:
    """One declared output: its request (None if the owner refused to register it, e.g.
    the computation had already failed; ``error`` then says why)."""

    name: str
    source: str
    """The program output ID."""
    request_id: str | None
    handle: RequestHandle | None
    error: BaseException | None = None
    _task: asyncio.Task[Any] | None = field(default=None, repr=False)


class JobRun:
    """A job running (or ran) in its loopback session: one request per declared output."""

    def __init__(
        self,
        job_id: str,
        client_id: str,
        outputs: dict[str, JobOutput],
        owner_core: OwnerCore,
        scientist: ScientistCore,
        pointers: list[Pointer],
    ) -> None:
        self.job_id = job_id
        self.client_id = client_id
        self.outputs = outputs
        self._owner_core = owner_core
        self._scientist = scientist
        self._pointers = pointers  # held so the session frees nothing while the run is open
        self._closed = False
        self.closing = False
        """Set while its job's service closes it (its outputs are not settled meanwhile)."""
        self.steps = 0
        """Steps of the job's plan."""

    def plan_steps(self) -> tuple[int, int]:
        """(steps done, steps in all) of the plan its worker runs now (untrusted)."""
        return self._owner_core.worker.plan_steps()

    @property
    def request_ids(self) -> dict[str, str | None]:
        """Each output's request ID, by output name."""
        return {name: out.request_id for name, out in self.outputs.items()}

    @property
    def handles(self) -> dict[str, RequestHandle | None]:
        return {name: out.handle for name, out in self.outputs.items()}

    async def wait_outputs(self, timeout: float | None) -> dict[str, Any]:
        """Each output's value, or the exception it ended with (PermissionDenied,
        RemoteError, ...); one still undecided after ``timeout`` s is a RequestTimeout
        (the request stays pending: waiting less never withdraws it)."""
        tasks = [out._task for out in self.outputs.values() if out._task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        results: dict[str, Any] = {}
        for name, out in self.outputs.items():
            if out._task is None:
                results[name] = out.error
            elif not out._task.done():
                results[name] = RequestTimeout(
                    f"output {name} of job {self.job_id} is still waiting for a decision"
                )
            elif out._task.cancelled():
                results[name] = RequestTimeout(f"output {name} of job {self.job_id} was dropped")
            else:
                error = out._task.exception()
                results[name] = error if error is not None else out._task.result()
        return results

    @property
    def failures(self) -> dict[str, str]:
        """Why each output known to have failed so far failed, by name: refused at once, a
        computation the owner's request shows as failed (its ``error``, owner-side), or a
        decision that ended in an error."""
        found: dict[str, str] = {}
        for name, out in self.outputs.items():
            cause = None if out.error is None else str(out.error)
            if cause is None and out.request_id is not None:
                with contextlib.suppress(KeyError):
                    cause = self._owner_core.owner.requests[out.request_id].error
            task = out._task
            if cause is None and task is not None and task.done() and not task.cancelled():
                error = task.exception()
                cause = None if error is None else str(error)
            if cause is not None:
                found[name] = cause
        return found

    @property
    def timed_out(self) -> bool:
        """Whether an output failed because the run went past its time budget."""
        return any(TIME_BUDGET in cause for cause in self.failures.values())

    async def close(self) -> None:
        """Close the loopback session. Undecided requests stay with the owner (a standing
        host's journal keeps their values for a later decision); waits end with PeerClosed."""
        if self._closed:
            return
        self._closed = True
        self._pointers.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._scientist.close(), CLOSE_SECONDS)
        await self._owner_core.close()
        for out in self.outputs.values():
            if out._task is not None and not out._task.done():
                out._task.cancel()

    def __repr__(self) -> str:
        return f"<JobRun {self.job_id} of {self.client_id}: {len(self.outputs)} outputs>"


def job_limits(limits: OwnerLimits, signed_job: SignedJob) -> OwnerLimits:
    """``limits`` with the job's run time: ``max_op_seconds`` and ``max_plan_seconds`` at
    most its ``max_seconds``. (Its result caps bound what is released, not each step's
    intermediate values: ``max_result_bytes`` is each output request's ``max_bytes``.)"""
    spec = signed_job.spec
    return dataclasses.replace(
        limits,
        max_op_seconds=min(limits.max_op_seconds, spec.max_seconds),
        max_plan_seconds=min(limits.max_plan_seconds, spec.max_seconds),
    )


class JobRunner:
    """Runs signed jobs against ``owner``'s hosted data, one loopback session each.

    ``allowlist``: the ops a job may use (checked before anything runs; the owner's own
    allowlist still applies inside the session); ``limits``: the host's caps, narrowed
    per job by :func:`job_limits`."""

    def __init__(self, owner: Owner, allowlist: Allowlist, limits: OwnerLimits) -> None:
        if not isinstance(owner, Owner):
            raise TypeError("a JobRunner runs jobs for an Owner")
        if not isinstance(allowlist, Allowlist):
            raise TypeError("a JobRunner needs an Allowlist")
        if not isinstance(limits, OwnerLimits):
            raise TypeError("a JobRunner needs OwnerLimits")
        self.owner = owner
        self.allowlist = allowlist
        self.limits = limits

    async def run(self, signed_job: SignedJob, *, timeout: float) -> JobRun:
        """Start ``signed_job``: returns once each output's request is registered (or
        refused). JobRunError if it cannot start within ``timeout`` s or at all."""
        if not isinstance(signed_job, SignedJob):
            raise TypeError("run takes a SignedJob")
        self._check(signed_job)
        spec = signed_job.spec
        limits = job_limits(self.limits, signed_job)
        owner_end, scientist_end = memory_pair()
        owner_side = Connection("owner", spec.job_id, spec.client_id, owner_end, None, "job", 0.0)
        scientist_side = Connection(
            "scientist", spec.job_id, spec.client_id, scientist_end, None, "job", 0.0
        )
        supervisor = new_supervisor(self.owner.allowlist, limits)
        supervisor.prestart()
        # the session's monitor sets each op's and plan's time budget: the job's
        core = OwnerCore(owner_side, allowlist=self.owner.allowlist, limits=limits,
                         audit=self.owner.audit, supervisor=supervisor, owner=self.owner,
                         session_limits=limits)  # fmt: skip
        scientist = ScientistCore(scientist_side)
        pointers: list[Pointer] = []
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(core.start(), scientist.start())
                outputs = await self._start(signed_job, scientist, pointers)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(scientist.close(), CLOSE_SECONDS)
            with contextlib.suppress(Exception):
                await core.close()
            if isinstance(exc, TimeoutError):
                raise JobRunError(f"job {spec.job_id} did not start within {timeout:g} s") from None
            if isinstance(exc, DuetError) and not isinstance(exc, JobRunError):
                raise JobRunError(f"job {spec.job_id} could not start: {exc}") from None
            raise
        run = JobRun(spec.job_id, spec.client_id, outputs, core, scientist, pointers)
        run.steps = len(spec.program["steps"])
        self.owner.audit.event("job_run", job_id=spec.job_id, client_id=spec.client_id,
                               requests=[o.request_id for o in outputs.values()])  # fmt: skip
        return run

    def _check(self, signed_job: SignedJob) -> None:
        """Refuse a job that cannot run here: its signature, ops, tags and deadline."""
        tags = [r.tags[0] for r in self.owner.store.listing() if r.tags]
        review = review_code(signed_job, self.allowlist, tags)
        if review.problems:
            said = f"job {signed_job.job_id} cannot run: " + "; ".join(review.problems)
            raise JobRunError(printable(said, MAX_REASON_CHARS))

    async def _start(
        self, signed_job: SignedJob, scientist: ScientistCore, pointers: list[Pointer]
    ) -> dict[str, JobOutput]:
        spec = signed_job.spec
        program = spec.program
        by_tag: dict[str, dict[str, Any]] = {}
        for entry in await scientist.store_list():
            entry_tags = entry.get("tags") or []
            if entry_tags and isinstance(entry_tags[0], str):
                by_tag.setdefault(entry_tags[0], entry)
        arguments: list[Pointer] = []
        for input_id in program["inputs"]:
            tag = spec.inputs[input_id]
            entry = by_tag.get(tag)
            if entry is None:
                raise JobRunError(f"job {spec.job_id}: input {input_id} is bound to "
                                  f"{printable(repr(tag), 200)}, which this host does not hold")  # fmt: skip
            arguments.append(scientist.pointer_for(entry))
        definition = (program["name"], program["inputs"], program["outputs"], program["steps"])
        plan = scientist.run(DEFINE_OP, target=None, args=definition, kwargs={}, kind="plan")
        several = len(program["outputs"]) != 1
        result = scientist.run(RUN_OP, target=plan, args=tuple(arguments), kwargs={},
                               kind="tuple" if several else "auto")  # fmt: skip
        pointers += [*arguments, plan, result]
        outputs: dict[str, JobOutput] = {}
        for name, source in spec.outputs.items():
            pointer = result
            if several:
                index = program["outputs"].index(source)
                pointer = scientist.run(INDEX_OP, target=result, args=(index,), kwargs={},
                                        kind="auto")  # fmt: skip
                pointers.append(pointer)
            outputs[name] = await self._ask(signed_job, scientist, name, source, pointer)
        return outputs

    async def _ask(
        self, signed_job: SignedJob, scientist: ScientistCore, name: str, source: str,
        pointer: Pointer,
    ) -> JobOutput:  # fmt: skip
        spec = signed_job.spec
        reason = f"job {spec.job_id}: output {name}"
        try:
            handle = await scientist.request(pointer.id, reason, max_bytes=spec.max_result_bytes)
        except DuetError as exc:  # e.g. the run already failed: no request to decide
            log.info("job %s: output %s refused: %s", spec.job_id, name, exc)
            return JobOutput(name, source, None, None, error=exc)
        task = asyncio.ensure_future(handle.result_async(None))
        task.add_done_callback(_retrieved)
        return JobOutput(name, source, handle.request_id, handle, _task=task)


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
