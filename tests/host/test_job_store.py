"""The host's job store: durable lifecycle, audit trail, caps, restarts that never run twice."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from duet_p2p.errors import ConfigurationError
from duet_p2p.host.job_store import (
    HOST_RESTARTED,
    JOBS_FILE,
    DuplicateJob,
    JobQuotaExceeded,
    JobStore,
)
from duet_p2p.identity import Identity
from duet_p2p.offline.lifecycle import InvalidTransition, JobState
from duet_p2p.offline.receipt import InvalidReceipt, Receipt, content_hash
from duet_p2p.offline.spec import InvalidJob, SignedJob
from tests.offline.test_spec import HOST, SCIENTIST, make_program, make_spec

S = JobState
TO_QUEUED = (S.PENDING_REVIEW, S.APPROVED, S.QUEUED)
PAYLOAD = b"SECRET-RESULT-" + os.urandom(8).hex().encode()


def new_job(client: Identity = SCIENTIST, *, deadline_in: float = 3600.0, **changes: Any):
    now = time.time()
    fields: dict[str, Any] = dict(
        job_id=os.urandom(16).hex(), client_id=client.id, created_at=now,
        deadline=now + deadline_in, nonce=os.urandom(16),
    )  # fmt: skip
    fields.update(changes)
    return make_spec(**fields).sign(client)


def two_output_job(**changes: Any) -> SignedJob:
    program = make_program()
    program["outputs"] = ["r0", "r1"]
    return new_job(program=program, outputs={"mean": "r0", "summary": "r1"}, **changes)


def advance(store: JobStore, job_id: str, *states: JobState, by: str = "owner") -> None:
    for state in states:
        store.transition(job_id, state, by=by, reason=f"to {state}")


def begin(store: JobStore, job_id: str) -> None:
    advance(store, job_id, *TO_QUEUED)
    store.start_attempt(job_id)


def running(store: JobStore, job: SignedJob | None = None) -> str:
    job = job or new_job()
    store.submit(job)
    begin(store, job.job_id)
    return job.job_id


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    return tmp_path / "hosts" / "h1"


@pytest.fixture
def store(host_dir: Path):
    with JobStore.open(host_dir, host_id=HOST.id) as opened:
        yield opened


def states(store: JobStore, job_id: str) -> list[tuple[JobState | None, JobState]]:
    return [(e.old, e.new) for e in store.events(job_id)]


# -- the file ------------------------------------------------------------------------------


def test_the_file_is_private(store: JobStore, host_dir: Path) -> None:
    store.submit(new_job())
    assert store.path == host_dir / JOBS_FILE
    assert stat.S_IMODE(os.stat(host_dir).st_mode) == 0o700
    for name in (JOBS_FILE, JOBS_FILE + "-wal", JOBS_FILE + "-shm"):
        assert stat.S_IMODE(os.stat(host_dir / name).st_mode) == 0o600, name


def test_a_readable_file_or_a_foreign_database_is_refused(host_dir: Path) -> None:
    JobStore.open(host_dir).close()
    os.chmod(host_dir / JOBS_FILE, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        JobStore.open(host_dir)
    os.chmod(host_dir / JOBS_FILE, 0o600)
    db = sqlite3.connect(host_dir / JOBS_FILE, isolation_level=None)
    db.execute("UPDATE schema_version SET version = 2")
    db.close()
    with pytest.raises(ConfigurationError, match="schema version 2"):
        JobStore.open(host_dir)
    other = host_dir.parent / "other"
    other.mkdir(mode=0o700)
    (other / JOBS_FILE).write_bytes(b"not a database at all" * 100)
    os.chmod(other / JOBS_FILE, 0o600)
    with pytest.raises(ConfigurationError):
        JobStore.open(other)


# -- the lifecycle, end to end ------------------------------------------------------------------


def test_full_lifecycle_round_trip(store: JobStore, host_dir: Path) -> None:
    job = new_job()
    store.submit(job)
    stored = store.get(job.job_id)
    assert stored is not None and stored.state is S.SUBMITTED and stored.attempts == 0
    assert stored.job == job and stored.client_id == SCIENTIST.id
    advance(store, job.job_id, S.PENDING_REVIEW)
    store.transition(job.job_id, S.AUTO_APPROVED, by="policy: plan hash", reason="known plan")
    advance(store, job.job_id, S.QUEUED)
    assert store.start_attempt(job.job_id) == 1
    store.set_progress(job.job_id, 1, 2)
    store.store_output(job.job_id, "summary", PAYLOAD, "mean(train_images)[0:2]", 2, 1000.0)
    store.set_progress(job.job_id, 2, 2)
    advance(store, job.job_id, S.FINISHED, S.PENDING_OUTPUT_REVIEW)
    store.transition(job.job_id, S.RELEASED, by="owner", reason="aggregate enough")
    stored = store.get(job.job_id)
    assert stored is not None and stored.progress == (2, 2)
    assert stored.submitted_at <= stored.started_at <= stored.finished_at <= stored.released_at  # type: ignore[operator]
    [output] = store.outputs(job.job_id)
    assert output.payload == PAYLOAD and output.sha256 == content_hash(PAYLOAD)
    assert (output.elements, output.aggregation, output.size_bytes) == (2, 1000.0, len(PAYLOAD))

    receipt = Receipt.issue(
        HOST, stored.job, inputs={"x": content_hash(b"dataset")},
        outputs={"summary": output.sha256}, submitted_at=stored.submitted_at,
        started_at=stored.started_at, finished_at=stored.finished_at,
        released_at=stored.released_at,
    )  # type: ignore[arg-type]  # fmt: skip
    store.set_receipt(job.job_id, receipt.to_wire())
    store.transition(job.job_id, S.DELIVERED, by="host", reason="sent over the mailbox")

    store.close()
    with JobStore.open(host_dir, host_id=HOST.id) as again:
        final = again.get(job.job_id)
        assert final is not None and final.state is S.DELIVERED and final.terminal
        assert (final.last_by, final.last_reason) == ("host", "sent over the mailbox")
        Receipt.from_wire(final.receipt).verify(HOST.id, job, {"summary": PAYLOAD})
        [kept] = again.outputs(job.job_id)  # kept a while: a delivery may have been lost
        assert kept.payload == PAYLOAD
        assert again.free_finished(time.time() + 1) == 1
        [freed] = again.outputs(job.job_id)
        assert freed.payload is None and freed.sha256 == content_hash(PAYLOAD)
        events = again.events(job.job_id)
        assert [(e.old, e.new) for e in events] == [
            (None, S.SUBMITTED), (S.SUBMITTED, S.PENDING_REVIEW),
            (S.PENDING_REVIEW, S.AUTO_APPROVED), (S.AUTO_APPROVED, S.QUEUED),
            (S.QUEUED, S.RUNNING), (S.RUNNING, S.FINISHED),
            (S.FINISHED, S.PENDING_OUTPUT_REVIEW), (S.PENDING_OUTPUT_REVIEW, S.RELEASED),
            (S.RELEASED, S.DELIVERED),
        ]  # fmt: skip
        assert events[0].by == SCIENTIST.id
        assert (events[2].by, events[2].reason) == ("policy: plan hash", "known plan")
        assert events[4].reason == "run started (attempt 1)"
        assert [e.at for e in events] == sorted(e.at for e in events)
    db = sqlite3.connect(host_dir / JOBS_FILE)
    try:
        assert PAYLOAD not in b"".join(
            row[0] or b"" for row in db.execute("SELECT payload FROM job_outputs"))  # fmt: skip
    finally:
        db.close()


def test_a_forbidden_transition_changes_nothing(store: JobStore) -> None:
    job = new_job()
    store.submit(job)
    for state in (S.RUNNING, S.APPROVED, S.RELEASED, S.DELIVERED, S.SUBMITTED):
        with pytest.raises(InvalidTransition):
            store.transition(job.job_id, state, by="owner")
    assert states(store, job.job_id) == [(None, S.SUBMITTED)]
    advance(store, job.job_id, S.PENDING_REVIEW)
    store.transition(job.job_id, S.REJECTED, by="owner", reason="uses the labels")
    with pytest.raises(InvalidTransition, match="no longer change"):
        store.transition(job.job_id, S.APPROVED, by="owner")
    stored = store.get(job.job_id)
    assert stored is not None and (stored.state, stored.last_reason) == (
        S.REJECTED, "uses the labels")  # fmt: skip
    with pytest.raises(KeyError):
        store.transition("f" * 32, S.PENDING_REVIEW, by="owner")
    with pytest.raises(ValueError):
        store.transition(job.job_id, S.EXPIRED, by="")
    with pytest.raises(InvalidTransition):
        store.transition(job.job_id, "bogus", by="owner")


def test_all_filters_by_state_and_clients_see_only_theirs(store: JobStore) -> None:
    other = Identity.generate()
    mine, theirs = new_job(), new_job(other)
    store.submit(mine)
    store.submit(theirs)
    advance(store, theirs.job_id, S.PENDING_REVIEW)
    assert [j.job_id for j in store.for_client(SCIENTIST.id)] == [mine.job_id]
    assert [j.job_id for j in store.for_client(other.id)] == [theirs.job_id]
    assert [j.job_id for j in store.all()] == [mine.job_id, theirs.job_id]
    assert [j.job_id for j in store.all([S.PENDING_REVIEW])] == [theirs.job_id]
    assert [j.job_id for j in store.all(["submitted", S.REJECTED])] == [mine.job_id]
    assert store.all([]) == []


# -- submissions -------------------------------------------------------------------------------


def test_duplicates_are_refused(store: JobStore) -> None:
    job = new_job()
    store.submit(job)
    with pytest.raises(DuplicateJob):
        store.submit(job)
    with pytest.raises(DuplicateJob):
        store.submit(job.to_wire())
    same_id = new_job(job_id=job.job_id)  # same ID, other content
    assert same_id.hash() != job.hash()
    with pytest.raises(DuplicateJob):
        store.submit(same_id)
    assert len(store.all()) == 1 and states(store, job.job_id) == [(None, S.SUBMITTED)]


def test_bad_submissions_are_refused_and_leave_no_trace(store: JobStore) -> None:
    mallory = Identity.generate()
    for_other_host = new_job(host_id=mallory.id)
    with pytest.raises(InvalidJob, match="for host"):
        store.submit(for_other_host)
    expired = new_job(deadline_in=10)
    with pytest.raises(InvalidJob, match="deadline"):
        store.submit(expired, at=time.time() + 11)
    job = new_job()
    forged = SignedJob(job.spec, mallory.public_key, job.signature)
    with pytest.raises(InvalidJob, match="does not belong"):
        store.submit(forged)
    badly_signed = SignedJob(job.spec, job.public_key, bytes(64))
    with pytest.raises(InvalidJob, match="signature"):
        store.submit(badly_signed)
    with pytest.raises(InvalidJob):
        store.submit(b"\xa0garbage")
    assert store.all() == []
    store.submit(job.to_wire())  # the wire form is accepted as it is
    assert [j.job_id for j in store.all()] == [job.job_id]


def test_open_jobs_per_scientist_are_capped(host_dir: Path) -> None:
    with JobStore.open(host_dir, max_open_per_client=2) as store:
        first, second = new_job(), new_job()
        store.submit(first)
        store.submit(second)
        with pytest.raises(JobQuotaExceeded, match="open"):
            store.submit(new_job())
        store.submit(new_job(Identity.generate()))  # another scientist is not affected
        store.transition(first.job_id, S.CANCELLED, by=SCIENTIST.id, reason="not needed")
        store.submit(new_job())


@pytest.mark.parametrize("cap", ["max_jobs", "max_jobs_per_client"])
def test_full_store_forgets_only_stale_terminal_jobs(host_dir: Path, cap: str) -> None:
    with JobStore.open(host_dir, **{cap: 2}) as store:
        short, other = new_job(deadline_in=10), new_job()
        store.submit(short)
        store.submit(other)
        store.transition(short.job_id, S.CANCELLED, by="owner")
        with pytest.raises(JobQuotaExceeded, match="cap"):
            store.submit(new_job())  # the cancelled job's deadline has not passed
        later = new_job(deadline_in=3600)
        store.submit(later, at=time.time() + 20)
        assert {j.job_id for j in store.all()} == {other.job_id, later.job_id}
        assert store.events(short.job_id) == []
        with pytest.raises(JobQuotaExceeded):
            store.submit(new_job(), at=time.time() + 20)  # open jobs are never forgotten


# -- runs: once, never twice -------------------------------------------------------------------


def test_a_run_begins_once(store: JobStore) -> None:
    job_id = running(store)
    with pytest.raises(InvalidTransition, match="already ran"):
        store.start_attempt(job_id)
    advance(store, job_id, S.FAILED)
    with pytest.raises(InvalidTransition):
        store.start_attempt(job_id)
    stored = store.get(job_id)
    assert stored is not None and stored.attempts == 1 and stored.finished_at is not None


def test_a_run_never_begins_past_the_deadline(store: JobStore) -> None:
    job = new_job(deadline_in=30)
    store.submit(job)
    advance(store, job.job_id, *TO_QUEUED)
    with pytest.raises(InvalidTransition, match="deadline"):
        store.start_attempt(job.job_id, at=time.time() + 31)
    assert store.get(job.job_id).state is S.QUEUED  # type: ignore[union-attr]


def test_restart_requeues_a_run_that_began_once_by_policy_and_never_more(
    host_dir: Path,
) -> None:
    store = JobStore.open(host_dir, host_id=HOST.id)
    job_id = running(store)
    store.close()  # the host dies mid-run
    with JobStore.open(host_dir, host_id=HOST.id) as store:
        assert store.recover_after_restart(requeue=True) == [(job_id, S.QUEUED)]
        stored = store.get(job_id)
        assert stored is not None and stored.state is S.QUEUED
        assert "during attempt 1" in stored.last_reason and stored.attempts == 1
        assert store.start_attempt(job_id) == 2
        with pytest.raises(InvalidTransition):
            store.start_attempt(job_id)
    with JobStore.open(host_dir, host_id=HOST.id) as store:  # and it dies again, mid-run
        assert store.recover_after_restart(requeue=True) == [(job_id, S.FAILED)]
        stored = store.get(job_id)
        assert stored is not None and stored.state is S.FAILED
        assert (stored.last_by, stored.last_reason, stored.attempts) == ("host", HOST_RESTARTED, 2)
        begun = [e for e in store.events(job_id) if e.reason.startswith("run started")]
        assert [e.reason for e in begun] == ["run started (attempt 1)", "run started (attempt 2)"]
        with pytest.raises(InvalidTransition):
            store.start_attempt(job_id)
        assert store.recover_after_restart(requeue=True) == []


def test_restart_without_the_policy_fails_a_run_that_began(host_dir: Path) -> None:
    store = JobStore.open(host_dir, host_id=HOST.id)
    job_id = running(store)
    store.close()
    with JobStore.open(host_dir, host_id=HOST.id) as store:
        assert store.recover_after_restart() == [(job_id, S.FAILED)]
        with pytest.raises(InvalidTransition):
            store.start_attempt(job_id)


def test_a_queued_job_that_ran_is_not_started_again_without_a_restart(host_dir: Path) -> None:
    with JobStore.open(host_dir, host_id=HOST.id) as store:
        job_id = running(store)
        # the only way back to QUEUED is recover_after_restart
        with pytest.raises(InvalidTransition):
            store.transition(job_id, S.QUEUED, by="x", reason="y")
        with pytest.raises(InvalidTransition):
            store.start_attempt(job_id)


def test_restart_without_the_policy_fails_even_a_claimed_job(host_dir: Path) -> None:
    with JobStore.open(host_dir) as store:
        job = new_job()
        store.submit(job)
        advance(store, job.job_id, *TO_QUEUED, S.RUNNING)
    with JobStore.open(host_dir) as store:
        assert store.recover_after_restart() == [(job.job_id, S.FAILED)]
        assert store.events(job.job_id)[-1].reason == HOST_RESTARTED


# -- deadlines -----------------------------------------------------------------------------------


def test_open_jobs_past_their_deadline_expire(store: JobStore) -> None:
    now = time.time()
    jobs = {state: new_job(deadline_in=100) for state in (
        S.SUBMITTED, S.PENDING_REVIEW, S.QUEUED, S.RUNNING, S.PENDING_OUTPUT_REVIEW,
        S.RELEASED, S.REJECTED)}  # fmt: skip
    paths = {
        S.SUBMITTED: (), S.PENDING_REVIEW: (S.PENDING_REVIEW,), S.QUEUED: TO_QUEUED,
        S.REJECTED: (S.PENDING_REVIEW, S.REJECTED),
    }  # fmt: skip
    for state, job in jobs.items():
        store.submit(job)
        if state in paths:
            advance(store, job.job_id, *paths[state])
            continue
        begin(store, job.job_id)
        if state is not S.RUNNING:
            store.store_output(job.job_id, "summary", PAYLOAD, "lineage", 1, 10.0)
            advance(store, job.job_id, S.FINISHED, S.PENDING_OUTPUT_REVIEW)
            if state is S.RELEASED:
                advance(store, job.job_id, S.RELEASED)
    assert store.expire_due(now + 50) == []
    expired = store.expire_due(now + 101)
    expected = [jobs[s].job_id for s in jobs if s not in (S.RUNNING, S.REJECTED)]
    assert expired == expected
    for state, job in jobs.items():
        stored = store.get(job.job_id)
        assert stored is not None
        if state in (S.RUNNING, S.REJECTED):
            assert stored.state is state  # the runner stops a running job; terminal stays
        else:
            assert (stored.state, stored.last_reason) == (S.EXPIRED, "deadline passed")
        for output in store.outputs(job.job_id):
            assert output.payload is None
    assert store.expire_due(now + 200) == []


# -- outputs, progress, receipts ------------------------------------------------------------------


def test_outputs_are_declared_bounded_and_stored_once(store: JobStore) -> None:
    job = two_output_job(max_result_bytes=100, max_result_elements=10)
    with pytest.raises(KeyError):
        store.store_output(job.job_id, "mean", b"x", "l", 1, 1.0)
    store.submit(job)
    with pytest.raises(InvalidTransition, match="no outputs"):
        store.store_output(job.job_id, "mean", b"x", "l", 1, 1.0)
    begin(store, job.job_id)
    with pytest.raises(ValueError, match="declared"):
        store.store_output(job.job_id, "r0", b"x", "l", 1, 1.0)  # a program ID, not a name
    with pytest.raises(JobQuotaExceeded, match="max_result_bytes"):
        store.store_output(job.job_id, "mean", bytes(101), "l", 1, 1.0)
    with pytest.raises(JobQuotaExceeded, match="max_result_elements"):
        store.store_output(job.job_id, "mean", b"x", "l", 11, 1.0)
    store.store_output(job.job_id, "mean", bytes(60), "mean(x)", 6, float("inf"))
    with pytest.raises(DuplicateJob):
        store.store_output(job.job_id, "mean", b"x", "l", 1, 1.0)
    with pytest.raises(JobQuotaExceeded, match="max_result_bytes"):
        store.store_output(job.job_id, "summary", bytes(41), "l", 1, 1.0)  # 60 + 41 > 100
    with pytest.raises(JobQuotaExceeded, match="max_result_elements"):
        store.store_output(job.job_id, "summary", bytes(40), "l", 5, 1.0)  # 6 + 5 > 10
    for bad in (float("nan"), -1.0, "1"):
        with pytest.raises(ValueError):
            store.store_output(job.job_id, "summary", b"x", "l", 1, bad)  # type: ignore[arg-type]
    store.store_output(job.job_id, "summary", bytes(40), "summary(x)", 4, 100.0)
    assert [o.name for o in store.outputs(job.job_id)] == ["mean", "summary"]
    assert all(o.payload is None for o in store.outputs(job.job_id, payloads=False))
    assert store.free_outputs(job.job_id) == 2
    assert [o.payload for o in store.outputs(job.job_id)] == [None, None]
    assert store.free_outputs(job.job_id) == 0


def test_the_store_caps_one_output(host_dir: Path) -> None:
    with JobStore.open(host_dir, max_output_bytes=10) as store:
        job_id = running(store)
        with pytest.raises(JobQuotaExceeded, match="at most 10"):
            store.store_output(job_id, "summary", bytes(11), "l", 1, 1.0)


def test_progress_only_while_running(store: JobStore) -> None:
    job = new_job()
    store.submit(job)
    with pytest.raises(InvalidTransition, match="not running"):
        store.set_progress(job.job_id, 0, 1)
    advance(store, job.job_id, *TO_QUEUED)
    store.start_attempt(job.job_id)
    for done, total in ((2, 1), (-1, 1), (True, 1), (0, 1 << 63)):
        with pytest.raises(ValueError):
            store.set_progress(job.job_id, done, total)
    store.set_progress(job.job_id, 3, 7)
    assert store.get(job.job_id).progress == (3, 7)  # type: ignore[union-attr]
    assert len(store.events(job.job_id)) == 5  # progress is not an audit event


def test_receipts_only_for_the_released_job_by_this_host(store: JobStore) -> None:
    job, other = new_job(), new_job()
    job_id = running(store, job)
    store.store_output(job_id, "summary", PAYLOAD, "l", 1, 10.0)
    times = dict(submitted_at=1.0, started_at=2.0, finished_at=3.0, released_at=4.0)

    def receipt_for(signed: SignedJob, identity: Identity = HOST) -> bytes:
        return Receipt.issue(identity, signed, inputs={"x": "0" * 64},
                             outputs={"summary": content_hash(PAYLOAD)}, **times).to_wire()  # fmt: skip

    with pytest.raises(InvalidTransition, match="released"):
        store.set_receipt(job_id, receipt_for(job))
    advance(store, job_id, S.FINISHED, S.PENDING_OUTPUT_REVIEW, S.RELEASED)
    with pytest.raises(InvalidReceipt, match="another job"):
        store.set_receipt(job_id, receipt_for(other))
    impostor = Identity.generate()
    foreign = new_job(host_id=impostor.id)
    with pytest.raises(InvalidReceipt):
        store.set_receipt(job_id, receipt_for(foreign, impostor))
    with pytest.raises(InvalidReceipt):
        store.set_receipt(job_id, b"\x00" * 10)
    store.set_receipt(job_id, receipt_for(job))
    assert Receipt.from_wire(store.get(job_id).receipt).job_id == job_id  # type: ignore[union-attr, arg-type]


# -- threads and a hostile file -------------------------------------------------------------------


def test_concurrent_writers(store: JobStore) -> None:
    errors: list[BaseException] = []
    done: list[str] = []

    def scientist() -> None:
        try:
            me = Identity.generate()
            for _ in range(3):
                job = new_job(me)
                store.submit(job)
                advance(store, job.job_id, *TO_QUEUED)
                done.append(job.job_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=scientist) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert errors == []
    assert len(done) == 18 and len(store.all([S.QUEUED])) == 18
    for job_id in done:
        assert [new for _, new in states(store, job_id)] == [S.SUBMITTED, *TO_QUEUED]


def test_only_one_of_two_racing_starts_wins(store: JobStore) -> None:
    job = new_job()
    store.submit(job)
    advance(store, job.job_id, *TO_QUEUED)
    barrier = threading.Barrier(4, timeout=10)
    outcomes: list[str] = []

    def start() -> None:
        barrier.wait()
        try:
            store.start_attempt(job.job_id)
            outcomes.append("started")
        except InvalidTransition:
            outcomes.append("refused")

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["refused", "refused", "refused", "started"]


def test_corrupted_rows_are_skipped_never_trusted(
    store: JobStore, host_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad_state, bad_wire = new_job(), new_job()
    store.submit(bad_state)
    store.submit(bad_wire)
    db = sqlite3.connect(host_dir / JOBS_FILE, isolation_level=None)
    try:
        db.execute("UPDATE jobs SET state = 'hacked' WHERE job_id = ?", (bad_state.job_id,))
        tampered = bad_wire.to_wire().replace(b"for the paper", b"for the rival")
        db.execute("UPDATE jobs SET wire = ? WHERE job_id = ?", (tampered, bad_wire.job_id))
    finally:
        db.close()
    with caplog.at_level(logging.WARNING):
        assert store.get(bad_state.job_id) is None
    assert "corrupted" in caplog.text
    with pytest.raises(ConfigurationError, match="corrupted state"):
        store.transition(bad_state.job_id, S.PENDING_REVIEW, by="owner")
    stored = store.get(bad_wire.job_id)
    assert stored is not None
    with pytest.raises(InvalidJob):
        stored.job  # noqa: B018
    advance(store, bad_wire.job_id, *TO_QUEUED)
    with pytest.raises(InvalidJob):
        store.start_attempt(bad_wire.job_id)  # a tampered job never runs
    with pytest.raises(InvalidTransition):
        store.store_output(bad_wire.job_id, "summary", b"x", "l", 1, 1.0)
