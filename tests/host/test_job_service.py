"""The job service: admitted scientists' jobs reviewed, run, settled with a signed receipt."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import duet_p2p as sy
from duet_p2p.host.admissions import AdmissionPolicy
from duet_p2p.host.job_runner import JobRunner
from duet_p2p.host.job_service import JobRefused, JobService
from duet_p2p.host.job_store import JobStore
from duet_p2p.identity import Identity
from duet_p2p.limits import OwnerLimits
from duet_p2p.offline.lifecycle import InvalidTransition, JobState
from duet_p2p.offline.policy import JobPolicy
from duet_p2p.offline.receipt import InvalidReceipt, Receipt, content_hash
from duet_p2p.offline.results import decode_output
from duet_p2p.offline.spec import InvalidJob, JobSpec, SignedJob
from duet_p2p.rpc import codec
from duet_p2p.runtime import get_runtime
from tests.conftest import wait_for
from tests.host.test_job_runner import WAIT, Host, program_of

S = JobState


class Env:
    """A journaled owner, its job store and a service; alice is admitted, mallory not."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.host = Host(tmp)
        self.identity = Identity.generate()
        self.alice, self.mallory = Identity.generate(), Identity.generate()
        self.store = JobStore.open(tmp, host_id=self.identity.id)
        self.admission = AdmissionPolicy([self.alice.id], self.host.state, self.host.owner.audit)
        self.service = self.make(JobPolicy(approve_clients=frozenset({self.alice.id})))

    @property
    def owner(self) -> Any:
        return self.host.owner

    def make(self, policy: JobPolicy, allowlist: Any = sy.DEFAULT_ALLOWLIST) -> JobService:
        runner = JobRunner(self.owner, sy.DEFAULT_ALLOWLIST, OwnerLimits())
        return JobService(
            self.owner, self.store, runner, host_identity=self.identity, allowlist=allowlist,
            admission=self.admission, policy=policy,
            dataset_tags=lambda: [r.tags[0] for r in self.owner.store.listing() if r.tags],
        )  # fmt: skip

    def job(self, function: Callable[..., Any], tags: list[str], outputs: list[str], *,
            who: Identity | None = None, max_seconds: float = 60.0,
            deadline: float = 3600.0) -> SignedJob:  # fmt: skip
        program = program_of(function)
        now = time.time()
        spec = JobSpec.new(
            client_id=(who or self.alice).id, host_id=self.identity.id, program=program,
            inputs=dict(zip(program["inputs"], tags, strict=True)), outputs=outputs,
            reason="a study", max_seconds=max_seconds, max_result_elements=10_000_000,
            max_result_bytes=1 << 20, deadline=now + deadline, created_at=now,
        )  # fmt: skip
        return spec.sign(who or self.alice)

    def run_next(self, service: JobService | None = None) -> str | None:
        return get_runtime().run((service or self.service).run_next(60), timeout=180)

    def settle(self, job_id: str, timeout: float = WAIT) -> JobState:
        return get_runtime().run(self.service.settle_outputs(job_id, timeout), timeout + 30)

    def state(self, job_id: str) -> JobState:
        stored = self.store.get(job_id)
        assert stored is not None
        return stored.state

    def trail(self, job_id: str) -> list[JobState]:
        return [event.new for event in self.store.events(job_id)]

    def audited(self, job_id: str) -> list[str]:
        lines = (self.tmp / "audit.jsonl").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        return [e["state"] for e in events if e["event"] == "job" and e["job_id"] == job_id]

    def request(self, job_id: str, name: str) -> Any:
        assert wait_for(lambda: self.service.output_requests(job_id)[name] is not None, WAIT)
        rid = self.service.output_requests(job_id)[name].request_id
        assert wait_for(lambda: self.owner.requests[rid].ready, WAIT)
        return self.owner.requests[rid]

    def close(self) -> None:
        self.host.close()
        self.store.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


RUN_TRAIL = [S.SUBMITTED, S.PENDING_REVIEW, S.AUTO_APPROVED, S.QUEUED, S.RUNNING, S.FINISHED,
             S.PENDING_OUTPUT_REVIEW]  # fmt: skip


def test_an_accepted_output_is_released_with_a_receipt_that_verifies(env: Env):
    job = env.job(lambda x: (x * 2).sum(), ["ages"], ["total"])
    job_id = env.service.submit(job.to_wire(), via="mailbox")
    assert job_id == job.job_id and env.state(job_id) is S.QUEUED
    assert env.run_next() == job_id
    assert env.state(job_id) is S.PENDING_OUTPUT_REVIEW
    assert env.settle(job_id, 0.2) is S.PENDING_OUTPUT_REVIEW  # undecided: nothing moves
    env.request(job_id, "total").accept()
    assert env.settle(job_id) is S.RELEASED
    assert env.trail(job_id) == [*RUN_TRAIL, S.RELEASED]
    assert env.audited(job_id) == [str(s) for s in [*RUN_TRAIL, S.RELEASED]]
    stored = env.store.get(job_id)
    assert stored is not None and stored.receipt is not None
    receipt = Receipt.from_wire(stored.receipt)
    released = env.service.released(job_id)
    assert (
        released is not None and float(decode_output(released["total"], max_bytes=1 << 20)) == 90.0
    )
    receipt.verify(env.identity.id, job, released)
    ages = next(r.value for r in env.owner.store.listing() if r.tags[0] == "ages")
    assert list(receipt.inputs.values()) == [content_hash(ages)]
    with pytest.raises(InvalidReceipt):
        receipt.verify(env.identity.id, job, {"total": codec.encode(torch.tensor(91.0))})
    assert env.service.run_of(job_id) is None
    assert env.run_next() is None


def test_a_denied_output_withholds_the_job_with_the_reason(env: Env):
    job_id = env.service.submit(env.job(lambda x: x.max(), ["ages"], ["top"]), via="live")
    assert env.run_next() == job_id
    env.request(job_id, "top").deny("too revealing")
    assert env.settle(job_id) is S.WITHHELD
    stored = env.store.get(job_id)
    assert stored is not None and "too revealing" in stored.last_reason
    assert stored.receipt is None and env.service.released(job_id) is None
    assert env.trail(job_id) == [*RUN_TRAIL, S.WITHHELD]


def test_a_client_not_admitted_is_refused_and_nothing_is_stored(env: Env):
    with pytest.raises(JobRefused, match="may not submit"):
        env.service.submit(env.job(lambda x: x.sum(), ["ages"], ["t"], who=env.mallory),
                           via="mailbox")  # fmt: skip
    env.admission.refuse(env.mallory.id, "no")
    with pytest.raises(JobRefused, match="refused"):
        env.service.submit(env.job(lambda x: x.sum(), ["ages"], ["t"], who=env.mallory),
                           via="mailbox")  # fmt: skip
    job = env.job(lambda x: x.sum(), ["ages"], ["t"])
    forged = SignedJob(job.spec, env.mallory.public_key, env.mallory.sign_bytes(b"x"))
    with pytest.raises(InvalidJob):
        env.service.submit(forged, via="mailbox")
    with pytest.raises(InvalidJob):
        env.service.submit(job.to_wire()[:-1] + b"\x00", via="mailbox")
    other_host = JobSpec.new(
        client_id=env.alice.id, host_id="b" * 32, program=job.spec.program,
        inputs=job.spec.inputs, outputs=job.spec.outputs, reason="x", max_seconds=5,
        max_result_elements=1, max_result_bytes=1, deadline=time.time() + 60,
    ).sign(env.alice)  # fmt: skip
    with pytest.raises(InvalidJob, match="for host"):
        env.service.submit(other_host, via="mailbox")
    assert env.store.all() == []


def test_an_op_off_the_allowlist_is_rejected_by_name(env: Env):
    narrow = sy.DEFAULT_ALLOWLIST.narrow(lambda e: e.path != "torch.Tensor.sum")
    service = env.make(JobPolicy(approve_clients=frozenset({env.alice.id})), narrow)
    job_id = service.submit(env.job(lambda x: x.sum(), ["ages"], ["total"]), via="mailbox")
    stored = env.store.get(job_id)
    assert stored is not None and stored.state is S.REJECTED
    assert "torch.Tensor.sum" in stored.last_reason
    assert env.run_next(service) is None and len(env.owner.requests) == 0


def test_the_owner_reviews_approves_rejects_and_jobs_are_cancelled(env: Env):
    service = env.make(JobPolicy())  # no auto-approval: the owner decides
    first = service.submit(env.job(lambda x: x.sum(), ["ages"], ["t"]), via="mailbox")
    assert env.state(first) is S.PENDING_REVIEW
    assert service.review(first).ok
    service.approve(first)
    assert env.state(first) is S.QUEUED
    assert env.trail(first)[-2:] == [S.APPROVED, S.QUEUED]
    with pytest.raises(InvalidTransition):
        service.approve(first)
    second = service.submit(env.job(lambda x: x.mean(), ["ages"], ["m"]), via="mailbox")
    service.reject(second, "not a study I can host")
    stored = env.store.get(second)
    assert stored is not None and stored.state is S.REJECTED
    assert stored.last_reason == "not a study I can host" and stored.last_by == "owner"
    with pytest.raises(sy.PermissionDenied):
        service.cancel(first, by=env.mallory.id)
    service.cancel(first, by=env.alice.id)
    assert env.state(first) is S.CANCELLED
    assert env.run_next(service) is None
    third = service.submit(env.job(lambda x: x.sum(), ["gone"], ["t"]), via="mailbox")
    assert env.state(third) is S.PENDING_REVIEW  # a dataset it needs is not hosted: it waits
    assert service.review_waiting() == 0
    env.owner.host(torch.ones(3), tags=("gone",))  # hosted now: reviewed again
    assert not service.review(third).problems
    auto = env.make(JobPolicy(approve_clients=frozenset({env.alice.id})))
    assert auto.review_waiting() == 1  # the policy approves it now
    assert env.state(third) is S.QUEUED


def test_approve_refuses_when_the_review_finds_problems_now(env: Env):
    env.owner.host(torch.ones(3), tags=("temp",))
    tags = {"ages", "temp"}
    service = env.make(JobPolicy())
    service.dataset_tags = lambda: tags
    job_id = service.submit(env.job(lambda x: x.sum(), ["temp"], ["t"]), via="mailbox")
    tags.discard("temp")
    with pytest.raises(JobRefused, match="temp"):
        service.approve(job_id)
    assert env.state(job_id) is S.PENDING_REVIEW


def test_jobs_past_their_deadline_expire(env: Env):
    service = env.make(JobPolicy())
    waiting = service.submit(env.job(lambda x: x.sum(), ["ages"], ["t"], deadline=60), via="m")
    queued = env.service.submit(env.job(lambda x: x.sum(), ["ages"], ["t"], deadline=60), via="m")
    later = env.service.submit(env.job(lambda x: x.sum(), ["ages"], ["t"]), via="m")
    assert sorted(env.service.expire_due(time.time() + 120)) == sorted([waiting, queued])
    assert env.state(waiting) is S.EXPIRED and env.state(queued) is S.EXPIRED
    assert env.state(later) is S.QUEUED
    assert env.audited(queued)[-1] == "expired"


def test_a_job_over_its_time_times_out_and_the_next_one_runs(env: Env):
    env.owner.host(torch.rand(600, 600), tags=("big",))

    def heavy(m: Any) -> Any:
        for _ in range(200):
            m = (m @ m).tanh()
        return m.sum()

    slow = env.service.submit(env.job(heavy, ["big"], ["t"], max_seconds=0.3), via="m")
    quick = env.service.submit(env.job(lambda x: x.sum(), ["ages"], ["t"]), via="m")
    started = time.monotonic()
    assert env.run_next() == slow
    assert time.monotonic() - started < 30
    stored = env.store.get(slow)
    assert stored is not None and stored.state is S.TIMED_OUT
    assert "time budget" in stored.last_reason and env.service.run_of(slow) is None
    assert env.run_next() == quick
    env.request(quick, "t").accept()
    assert env.settle(quick) is S.RELEASED


def test_a_running_job_is_cancelled_by_closing_its_run(env: Env):
    env.owner.host(torch.rand(600, 600), tags=("big",))

    def heavy(m: Any) -> Any:
        for _ in range(400):
            m = (m @ m).tanh()
        return m.sum()

    job_id = env.service.submit(env.job(heavy, ["big"], ["t"], max_seconds=120), via="m")
    running = get_runtime().submit(env.service.run_next(60))
    assert wait_for(lambda: env.service.run_of(job_id) is not None, WAIT)
    assert env.state(job_id) is S.RUNNING
    with pytest.raises(sy.PermissionDenied):
        env.service.cancel(job_id, by=env.mallory.id)
    env.service.cancel(job_id, by=env.alice.id)
    assert running.result(timeout=WAIT) == job_id
    assert env.state(job_id) is S.CANCELLED and env.service.run_of(job_id) is None
    assert env.trail(job_id)[-2:] == [S.RUNNING, S.CANCELLED]
    with pytest.raises(InvalidTransition):
        env.store.start_attempt(job_id)


def test_after_a_restart_a_running_job_fails_and_never_runs_again(env: Env):
    job_id = env.service.submit(env.job(lambda x: x.sum(), ["ages"], ["t"]), via="m")
    env.store.start_attempt(job_id)  # the host dies while it runs
    env.store.close()
    env.store = JobStore.open(env.tmp, host_id=env.identity.id)
    service = env.make(JobPolicy(approve_clients=frozenset({env.alice.id})))
    assert service.recover_after_restart() == [(job_id, S.FAILED)]
    stored = env.store.get(job_id)
    assert stored is not None and stored.state is S.FAILED
    assert stored.last_reason == "host restarted" and stored.attempts == 1
    assert env.run_next(service) is None and len(env.owner.requests) == 0
    with pytest.raises(InvalidTransition):
        env.store.start_attempt(job_id)
    assert env.trail(job_id)[-2:] == [S.RUNNING, S.FAILED]
    assert env.audited(job_id)[-1] == "failed"
