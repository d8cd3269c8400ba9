"""Jobs run as loopback sessions: their outputs become ordinary requests of their scientist,
decided by the owner or by handlers, kept in the journal, bounded by the job's time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import duet_p2p as sy
from duet_p2p.allowlist import DEFAULT_ALLOWLIST
from duet_p2p.host.job_runner import JobRun, JobRunError, JobRunner, job_limits
from duet_p2p.host.state import HostState
from duet_p2p.identity import Identity
from duet_p2p.limits import OwnerLimits
from duet_p2p.offline.spec import JobSpec, SignedJob
from duet_p2p.owner.owner import Owner
from duet_p2p.permissions import AuditLog
from duet_p2p.permissions.ledger import open_ledger
from duet_p2p.rpc import codec
from duet_p2p.rpc.plan_spec import DEFINE_OP
from duet_p2p.runtime import get_runtime
from duet_p2p.scientist import plans
from duet_p2p.scientist.pointer import Pointer, TensorPointer
from duet_p2p.scientist.session import ScientistCore
from tests.conftest import wait_for

WAIT = 20.0
HOST_ID = "a" * 32


class _Recorder:
    """Just enough of a ScientistCore to record a plan: captures its DEFINE action's args."""

    def __init__(self) -> None:
        self._allowlist = {e.path: str(e.returns) for e in DEFAULT_ALLOWLIST}
        self.definition: tuple[Any, ...] | None = None

    allowed = ScientistCore.allowed
    allowed_paths = ScientistCore.allowed_paths

    def run(self, op: str, *, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
            kind: str | None = None) -> Pointer:  # fmt: skip
        if op == DEFINE_OP:
            self.definition = args
            return TensorPointer(self, "f" * 32, expression="plan", kind="plan", owned=False)  # type: ignore[arg-type]
        return ScientistCore.run(self, op, target=target, args=args, kwargs=kwargs, kind=kind)  # type: ignore[arg-type]

    def release(self, object_id: str) -> None:
        pass


def program_of(function: Callable[..., Any], name: str = "job") -> dict[str, Any]:
    recorder = _Recorder()
    plans.record_plan(recorder, function, name)  # type: ignore[arg-type]
    assert recorder.definition is not None
    plan_name, inputs, outputs, steps = recorder.definition
    return {"name": plan_name, "inputs": inputs, "outputs": outputs, "steps": steps}


def signed_job(identity: Identity, function: Callable[..., Any], tags: list[str],
               outputs: list[str], *, max_seconds: float = 60.0) -> SignedJob:  # fmt: skip
    program = program_of(function)
    now = time.time()
    spec = JobSpec.new(
        client_id=identity.id, host_id=HOST_ID, program=program,
        inputs=dict(zip(program["inputs"], tags, strict=True)), outputs=outputs,
        reason="a study", max_seconds=max_seconds, max_result_elements=10_000_000,
        max_result_bytes=1 << 20, deadline=now + 3600, created_at=now,
    )  # fmt: skip
    return spec.sign(identity)


class Host:
    def __init__(self, tmp: Path) -> None:
        self.state = HostState.open(tmp)
        self.owner = Owner(allowlist=sy.DEFAULT_ALLOWLIST, limits=OwnerLimits(),
                           audit=AuditLog(tmp / "audit.jsonl"), journal=self.state,
                           keep_released=3600.0,
                           ledger=open_ledger(tmp / "ledger.sqlite"))  # fmt: skip
        self.owner.host(torch.arange(10.0), tags=("ages",))
        self.owner.host(torch.arange(64.0).reshape(8, 8), tags=("digits",))
        self.runs: list[JobRun] = []

    def runner(self, allowlist: Any = sy.DEFAULT_ALLOWLIST, **limits: Any) -> JobRunner:
        return JobRunner(self.owner, allowlist, OwnerLimits(**limits))

    def run(self, job: SignedJob, runner: JobRunner | None = None) -> JobRun:
        started = get_runtime().run((runner or self.runner()).run(job, timeout=60), timeout=90)
        self.runs.append(started)
        return started

    def outputs(self, run: JobRun, timeout: float = WAIT) -> dict[str, Any]:
        return get_runtime().run(run.wait_outputs(timeout), timeout=timeout + 10)

    def close_run(self, run: JobRun) -> None:
        get_runtime().run(run.close(), timeout=60)

    def close(self) -> None:
        for run in self.runs:
            with contextlib.suppress(Exception):
                self.close_run(run)
        self.owner.close()
        self.state.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.close()


def _ready(owner: Owner, count: int) -> bool:
    pending = owner.requests.pending()
    return len(pending) == count and all(r.ready for r in pending)


def test_outputs_are_pending_requests_released_on_accept(host: Host):
    alice = Identity.generate()
    job = signed_job(alice, lambda x: ((x * 2).sum(), x.mean()), ["ages"], ["total", "mean"])
    run = host.run(job)
    assert set(run.request_ids) == {"total", "mean"} and all(run.request_ids.values())
    assert wait_for(lambda: _ready(host.owner, 2), WAIT)
    requests = {r.request_id: r for r in host.owner.requests.pending()}
    total = requests[run.request_ids["total"]]
    assert total.requester == alice.id and "torch.Tensor.sum" in total.ops
    assert (
        total.lineage == "job(ages).index(0)" and total.reason == f"job {job.job_id}: output total"
    )
    assert requests[run.request_ids["mean"]].requester == alice.id
    assert host.outputs(run, 0.3)["total"].__class__ is sy.RequestTimeout  # still pending
    assert len(host.owner.requests.pending()) == 2  # waiting less withdrew nothing
    for request in list(host.owner.requests.pending()):
        request.accept()
    values = host.outputs(run)
    assert values["total"] == 90.0 and values["mean"] == pytest.approx(4.5)
    assert not run.timed_out and run.failures == {}


def test_a_handler_releases_an_output_by_itself(host: Host):
    host.owner.requests.add_handler("accept", op="sum")
    job = signed_job(Identity.generate(), lambda d: d.sum(), ["digits"], ["total"])
    run = host.run(job)
    assert host.outputs(run)["total"] == float(sum(range(64)))


def test_a_denied_output_raises_permission_denied(host: Host):
    run = host.run(signed_job(Identity.generate(), lambda x: x.max(), ["ages"], ["top"]))
    assert wait_for(lambda: _ready(host.owner, 1), WAIT)
    host.owner.requests[run.request_ids["top"]].deny("not today")
    result = host.outputs(run)["top"]
    assert isinstance(result, sy.PermissionDenied) and "not today" in str(result)


def test_an_op_off_the_allowlist_is_refused_by_name(host: Host):
    narrow = sy.DEFAULT_ALLOWLIST.narrow(lambda e: e.path != "torch.Tensor.sum")
    job = signed_job(Identity.generate(), lambda x: x.sum(), ["ages"], ["total"])
    with pytest.raises(JobRunError, match=r"torch\.Tensor\.sum"):
        host.run(job, host.runner(narrow))
    assert len(host.owner.requests) == 0


def test_a_missing_dataset_or_a_forged_signature_is_refused(host: Host):
    alice, mallory = Identity.generate(), Identity.generate()
    with pytest.raises(JobRunError, match="does not hold"):
        host.run(signed_job(alice, lambda x: x.sum(), ["salaries"], ["total"]))
    job = signed_job(alice, lambda x: x.sum(), ["ages"], ["total"])
    forged = SignedJob(job.spec, mallory.public_key, mallory.sign_bytes(b"anything"))
    with pytest.raises(JobRunError, match="signature"):
        host.run(forged)
    with pytest.raises(TypeError):
        get_runtime().run(host.runner().run(job.spec, timeout=5), timeout=10)  # type: ignore[arg-type]
    assert len(host.owner.requests) == 0


def test_a_job_past_its_time_budget_times_out(host: Host):
    host.owner.host(torch.rand(600, 600), tags=("big",))

    def heavy(m: Any) -> Any:
        for _ in range(200):
            m = (m @ m).tanh()
        return m.sum()

    job = signed_job(Identity.generate(), heavy, ["big"], ["total"], max_seconds=0.3)
    limits = job_limits(OwnerLimits(), job)
    assert limits.max_plan_seconds == limits.max_op_seconds == 0.3
    run = host.run(job)
    rid = run.request_ids["total"]
    assert wait_for(lambda: run.timed_out, WAIT)
    assert "0.3 s time budget" in run.failures["total"]
    request = host.owner.requests[rid]
    if request.pending:  # the failure was held for the owner to decide on (else denied)
        assert "time budget" in request.error
        request.accept()
    result = host.outputs(run)["total"]
    assert isinstance(result, sy.DuetError) and "time budget" in str(result)


def test_each_job_asks_as_its_own_scientist(host: Host):
    alice, bob = Identity.generate(), Identity.generate()
    runs = [host.run(signed_job(who, lambda x: x.sum(), ["ages"], ["total"]))
            for who in (alice, bob)]  # fmt: skip
    assert wait_for(lambda: _ready(host.owner, 2), WAIT)
    for who, run in zip((alice, bob), runs, strict=True):
        assert host.owner.requests[run.request_ids["total"]].requester == who.id

    def stored() -> list[Any]:  # written behind, by the journal's writer thread
        return [host.state.get(run.request_ids["total"]) for run in runs]

    assert wait_for(lambda: all(stored()), WAIT)
    assert [s.client_id for s in stored()] == [alice.id, bob.id]


def test_outputs_outlive_a_closed_run_in_the_journal(host: Host):
    alice = Identity.generate()
    run = host.run(signed_job(alice, lambda x: (x * 2).sum(), ["ages"], ["total"]))
    rid = run.request_ids["total"]
    assert wait_for(lambda: _ready(host.owner, 1), WAIT)
    host.close_run(run)
    assert host.owner.requests[rid].pending
    host.owner.requests[rid].accept()
    assert wait_for(lambda: (c := host.state.claim(alice.id, rid)) is not None and c[1], WAIT)
    stored, payload = host.state.claim(alice.id, rid)
    assert stored.status == "accepted" and float(codec.decode(payload)) == 90.0
    assert host.state.claim(Identity.generate().id, rid) is None


def test_a_program_reaching_past_its_inputs_is_refused(host: Host):
    digits = next(r for r in host.owner.store.listing() if r.tags[0] == "digits")
    recorder = _Recorder()
    other = TensorPointer(recorder, digits.id, expression="d", kind="tensor", owned=False)  # type: ignore[arg-type]
    alice = Identity.generate()
    job = signed_job(alice, lambda x: (x + other[0, :]).sum(), ["ages"], ["total"])
    with pytest.raises(JobRunError, match="neither a program input"):
        host.run(job)
    assert len(host.owner.requests) == 0
