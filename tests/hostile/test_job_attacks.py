"""Attacks on offline jobs: a hostile scientist, a curious second scientist, and a hostile
signaling (mailbox) server, against a standing host and against the scientist's own
mailbox reading and job book.

One standing host serves the module (real signaling server with its mailbox, scientists
over real WebRTC on loopback); the scientist-side attacks feed ``check_mail`` from a fake
mailbox server that delivers envelopes sealed by a real host identity, as a hostile server
may (replayed, reordered, withheld, swapped, endless). A test that passes documents a
defence; a test marked ``xfail(strict=True)`` states how the code should behave and why it
does not yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import duet_p2p as sy
from duet_p2p.errors import DuetError, ProtocolError
from duet_p2p.identity import Identity
from duet_p2p.mailbox.client import Delivered, MailboxClient
from duet_p2p.offline import mail as job_mail
from duet_p2p.offline import spec as job_spec
from duet_p2p.offline.policy import JobPolicy, ReleaseRule
from duet_p2p.offline.receipt import InvalidReceipt, Receipt, content_hash
from duet_p2p.offline.results import (
    InvalidResult,
    JobUpdate,
    ResultBundle,
    encode_output,
    open_result,
)
from duet_p2p.offline.spec import SignedJob
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.runtime import get_runtime
from duet_p2p.scientist import job_mail as scientist_mail
from duet_p2p.scientist.job_book import JobBook
from duet_p2p.scientist.jobs import Job, JobsList, record_job
from tests.conftest import wait_for
from tests.peers.job_forge import fields, forge_wire, new_id, program, signed_job, step

WAIT = 20.0
RUNTIME = get_runtime()
TABLE = torch.arange(12, dtype=torch.float32).reshape(4, 3)
SMALL = torch.tensor([5.0, 6.0, 7.0])
SECRET = torch.tensor([42.0, 43.0, 44.0])
CONTROL = "\x1b]0;owned\x07\x1b[2J\r\nfake row\u202e\x00"
"""Text a hostile peer would like to reach an owner's or a scientist's terminal."""
UNPRINTABLE = ("\x1b", "\x07", "\r", "\u202e", "\x00")


def assert_shown_safely(text: str) -> None:
    """No control character, and no line the attacker started (a forged table row)."""
    assert not any(c in text for c in UNPRINTABLE), repr(text)
    assert not any(line.lstrip().startswith("fake row") for line in text.splitlines()[1:]), text


# -- the module's host and scientists --------------------------------------------------------


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("job_ids")
    folder.chmod(0o700)
    return folder


def who(ids: Path, name: str) -> Identity:
    return Identity.load(name, directory=ids)


@pytest.fixture(scope="module")
def host(signaling_url: str, ids: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A standing host: alice's jobs are auto-approved, output ``m`` is auto-released when it
    has at most 3 elements (the documented example rule); jobs run one at a time."""
    home = tmp_path_factory.mktemp("job_host")
    home.chmod(0o700)
    policy = JobPolicy(approve_clients=frozenset({who(ids, "alice").id}), release=(
        ReleaseRule(outputs=frozenset({"m"}), max_elements=3),
        # opted in: a plan's outputs count as summarising one record (see decide_output)
        ReleaseRule(outputs=frozenset({"mean_only"}), op="mean", max_elements=3,
                    min_aggregation=1),
    ))  # fmt: skip
    host = sy.launch_host(signaling_url, name="jobs-under-attack", admit="any", data_dir=home,
                          identity=who(ids, "the-host"),
                          jobs=sy.JobSettings(policy=policy, poll_seconds=1.0))  # fmt: skip
    host.send(TABLE, tags=["table"])
    host.send(SMALL, tags=["small"])
    host.send(SECRET, tags=["secret"])
    host.send(torch.tensor([1.0, 2.0]), tags=["hidden"], searchable=False)
    host.send(torch.tensor([3.0, 4.0]), tags=["primary", "alias"])
    yield host
    host.close()


def join(host: Any, url: str, identity: Identity) -> sy.Duet:
    return sy.join_duet(host.id, signaling_url=url, identity=identity)


@pytest.fixture(scope="module")
def alice(host: Any, signaling_url: str, ids: Path) -> Iterator[sy.Duet]:
    duet = join(host, signaling_url, who(ids, "alice"))
    yield duet
    duet.close()


@pytest.fixture(scope="module")
def bob(host: Any, signaling_url: str, ids: Path) -> Iterator[sy.Duet]:
    duet = join(host, signaling_url, who(ids, "bob"))
    yield duet
    duet.close()


def submit(duet: sy.Duet, signed: SignedJob | bytes) -> dict[str, Any]:
    core = duet._core
    wire = signed if isinstance(signed, bytes) else signed.to_wire()
    return core.sync(core.submit_job(wire))  # type: ignore[union-attr]


def state(host: Any, job_id: str) -> str | None:
    found = host._jobs.store.get(job_id)
    return None if found is None else str(found.state)


def story(host: Any, job_id: str) -> str:
    """A job's trail, for a failing assertion's message."""
    trail = [f"{e.old}->{e.new} by {e.by}: {e.reason}" for e in host._jobs.events(job_id)]
    return f"job {job_id} is {state(host, job_id)}: " + "; ".join(trail)


def reaches(host: Any, job_id: str, wanted: str) -> None:
    """Wait for a job to reach ``wanted``; a failure tells its whole trail."""
    assert wait_for(lambda: state(host, job_id) == wanted, WAIT), story(host, job_id)


def summing(identity: Identity, host_id: str, tag: str = "table", name: str = "m",
            **overrides: Any) -> SignedJob:  # fmt: skip
    """A harmless job: the sum of one dataset, released as ``name``."""
    x, out = new_id(), new_id()
    prog = program([x], [out], [step("torch.Tensor.sum", out, x)])
    return signed_job(identity, host_id, prog, {x: tag}, {name: out}, **overrides)


def on_host_loop(host: Any, coroutine: Any, timeout: float = WAIT) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, host.loop).result(timeout)


# -- mailbox plumbing ------------------------------------------------------------------------


async def _post(url: str, sender: Identity, recipient: str, envelopes: list[bytes]) -> None:
    async with MailboxClient(url, sender) as client:
        await job_mail.post_mail(client, recipient, envelopes)


def mail_to_host(url: str, sender: Identity, host: Any, kind: str, payload: bytes) -> list[bytes]:
    """Seal ``payload`` from ``sender`` to the host and post it; the envelopes posted."""
    envelopes = job_mail.seal_mail(sender, host.id, host.identity.public_key, kind, payload)
    RUNTIME.run(_post(url, sender, host.id, envelopes), timeout=WAIT)
    return envelopes


async def _inbox(url: str, identity: Identity) -> list[Delivered]:
    found: list[Delivered] = []
    async with MailboxClient(url, identity) as client:
        after = None
        while batch := await client.fetch(0.0, after=after):
            found += batch
            after = batch[-1].message_id
    return found


def inbox(url: str, identity: Identity) -> list[Delivered]:
    """What waits in ``identity``'s mailbox (read, not deleted)."""
    return RUNTIME.run(_inbox(url, identity), timeout=WAIT)


def updates_in(url: str, identity: Identity, job_id: str) -> list[JobUpdate]:
    """The job updates for ``job_id`` waiting in ``identity``'s mailbox (nothing recorded)."""
    opener = job_mail.MailOpener(identity, kinds={job_mail.UPDATE, job_mail.RESULT},
                                 max_bytes=1 << 24)  # fmt: skip
    found = []
    for mail in opener.add(inbox(url, identity)):
        if mail.kind == job_mail.UPDATE:
            update = JobUpdate.from_bytes(mail.payload)
            if update.job_id == job_id:
                found.append(update)
    return found


def host_mail_handled(url: str, host: Any) -> bool:
    """Every mail posted to the host was handled (answered or refused, then deleted)."""
    return wait_for(lambda: not inbox(url, host.identity), WAIT)


# -- a live job from the wrong scientist, for the wrong host, or malformed -------------------


def test_a_job_signed_by_one_scientist_cannot_be_submitted_by_another(
    host: Any, alice: sy.Duet, bob: sy.Duet, ids: Path
) -> None:
    """Bob replays Alice's signed job over his own session: refused, nothing stored, and
    Alice can still submit it herself (the attempt did not burn her job ID)."""
    job = summing(who(ids, "alice"), host.id, name="t")
    with pytest.raises(DuetError, match="scientist who signed it"):
        submit(bob, job)
    assert state(host, job.job_id) is None
    assert submit(alice, job)["job_id"] == job.job_id
    assert host._jobs.get(job.job_id).client_id == who(ids, "alice").id


def test_a_job_for_another_host_or_forged_or_malformed_is_refused(
    host: Any, alice: sy.Duet, ids: Path
) -> None:
    me, other = who(ids, "alice"), who(ids, "some-other-host")
    x, out = new_id(), new_id()
    prog = program([x], [out], [step("torch.Tensor.sum", out, x)])
    good = fields(me, host.id, prog, {x: "table"}, {"m": out})
    wrong_host = signed_job(me, other.id, prog, {x: "table"}, {"m": out})
    bad_signature = bytearray(summing(me, host.id).to_wire())
    bad_signature[-1] ^= 1
    oversize_reason = forge_wire(me, {**good, "reason": "r" * (job_spec.MAX_REASON_CHARS + 1)})
    raw_output = forge_wire(me, {**good, "program": program([x], [x], prog["steps"]),
                                 "outputs": {"m": x}})  # fmt: skip
    not_mine = forge_wire(me, {**good, "client_id": who(ids, "bob").id})
    attempts = {
        "for another host": wrong_host.to_wire(), "bad signature": bytes(bad_signature),
        "oversize reason": oversize_reason, "output is a raw input": raw_output,
        "signed by a key not the client's": not_mine, "garbage": b"\xa1\x61v\x01" * 50,
        "empty": b"",
    }  # fmt: skip
    before = len(host._jobs.store.for_client(me.id, limit=100_000))
    for what, wire in attempts.items():
        with pytest.raises(DuetError):
            submit(alice, wire)
        assert len(host._jobs.store.for_client(me.id, limit=100_000)) == before, what
    assert state(host, wrong_host.job_id) is None
    assert isinstance(alice._core.sync(alice._core.list_jobs()), list)  # still served


# -- a job's reach: only the datasets it names, by their first tag, read-only ----------------


def test_a_job_cannot_reach_objects_outside_its_inputs(
    host: Any, alice: sy.Duet, bob: sy.Duet, ids: Path
) -> None:
    """ObjectRef constants to a hosted object or to another scientist's live object, a
    program output that is a stored object, an input bound to an object ID, to a hidden
    dataset or to a dataset's second tag: each job never runs (rejected, or, bound to no
    hosted dataset, left to the owner)."""
    me = who(ids, "alice")
    secret = next(r for r in host.owner.store.listing() if r.tags[:1] == ("secret",))
    bobs = bob.torch.ones(3)
    x, out = new_id(), new_id()
    sum_x = [step("torch.Tensor.sum", out, x)]
    unknown, no_step, not_held = "neither a program input", "made by no step", "does not hold"
    attacks = {
        "hosted object by reference": (unknown, program(
            [x], [out], [step("torch.Tensor.__add__", out, x, ObjectRef(secret.id))]),
            {x: "small"}, {"m": out}),
        "another scientist's live object": (unknown, program(
            [x], [out], [step("torch.Tensor.__mul__", out, x, ObjectRef(bobs.id))]),
            {x: "small"}, {"m": out}),
        "reference hidden in a slice": (unknown, program(
            [x], [out], [step("torch.Tensor.__getitem__", out, x,
                              slice(ObjectRef(secret.id), None))]),
            {x: "small"}, {"m": out}),
        "released output is a stored object": (
            no_step, program([x], [secret.id], sum_x), {x: "small"}, {"m": secret.id}),
        "unreleased program output is a stored object": (
            no_step, program([x], [out, secret.id], sum_x), {x: "small"}, {"m": out}),
        "input bound to an object ID": (
            not_held, program([x], [out], sum_x), {x: secret.id}, {"m": out}),
        "input bound to a hidden dataset": (
            not_held, program([x], [out], sum_x), {x: "hidden"}, {"m": out}),
        "input bound to a second tag": (
            not_held, program([x], [out], sum_x), {x: "alias"}, {"m": out}),
    }  # fmt: skip
    for what, (why, prog, inputs, outputs) in attacks.items():
        job = signed_job(me, host.id, prog, inputs, outputs)
        row = submit(alice, job)
        if why == not_held:  # it waits for the owner (or a dataset with that tag): never runs
            assert row["state"] == "pending_review", (what, row)
            assert any(why in p for p in host._jobs.review(job.job_id).problems), what
        else:
            assert row["state"] == "rejected" and why in row["reason"], (what, row)
            assert host._jobs.events(job.job_id)[-1].by == "policy", what
        assert host._jobs.store.requests(job.job_id) == {}, what


def test_a_job_cannot_modify_hosted_data(host: Any, alice: sy.Duet, ids: Path) -> None:
    x, y, out = new_id(), new_id(), new_id()
    prog = program([x], [out], [step("torch.Tensor.add_", y, x, 100.0),
                                step("torch.Tensor.sum", out, y)])  # fmt: skip
    job = signed_job(who(ids, "alice"), host.id, prog, {x: "small"}, {"m": out})
    submit(alice, job)
    assert wait_for(lambda: state(host, job.job_id) in ("failed", "withheld"), WAIT)
    assert "modify an object the owner hosts" in host._jobs.get(job.job_id).last_reason
    hosted = {r.tags[0]: r.value for r in host.owner.store.listing()}
    assert torch.equal(hosted["small"], SMALL)


# -- outputs: raw data never leaves without the owner ------------------------------------------


def test_an_output_that_copies_raw_data_is_never_auto_released(
    host: Any, alice: sy.Duet, ids: Path
) -> None:
    """``small * 1`` is the raw dataset (3 private values, aggregation 1); the example rule
    (output m, at most 3 elements) must not release it: the owner decides."""
    x, out = new_id(), new_id()
    prog = program([x], [out], [step("torch.Tensor.__mul__", out, x, 1.0)])
    job = signed_job(who(ids, "alice"), host.id, prog, {x: "small"}, {"m": out})
    submit(alice, job)
    assert wait_for(lambda: state(host, job.job_id) not in ("queued", "running", "finished",
                                                           "auto_approved"), WAIT)  # fmt: skip
    time.sleep(1.0)  # several settle ticks: release rules have had their chance
    assert state(host, job.job_id) == "pending_output_review"


def test_an_aggregate_under_the_rule_is_released_and_delivered(
    host: Any, alice: sy.Duet, ids: Path
) -> None:
    """Control for the test above: a real aggregate (a column mean over 4 records)
    matching the rule goes out with a receipt that verifies."""
    x, out = new_id(), new_id()
    prog = program([x], [out], [step("torch.Tensor.mean", out, x, dim=0)])
    job = signed_job(who(ids, "alice"), host.id, prog, {x: "table"}, {"mean_only": out})
    submit(alice, job)
    reaches(host, job.job_id, "released")
    row, bundle = alice._core.sync(alice._core.fetch_job_result(job.job_id, 1 << 20, timeout=WAIT))
    receipt, values = open_result(ResultBundle.from_bytes(bundle, max_bytes=1 << 20), job,
                                  host_id=host.id, max_bytes=1 << 20)  # fmt: skip
    assert torch.equal(values["mean_only"], TABLE.mean(dim=0))
    assert receipt.inputs[x] == content_hash(TABLE)
    assert row["state"] == "released"  # the reply comes first; delivered once it is sent
    reaches(host, job.job_id, "delivered")


# -- time and queue abuse --------------------------------------------------------------------


def test_a_runaway_job_is_stopped_and_does_not_block_the_queue(
    host: Any, alice: sy.Duet, ids: Path
) -> None:
    """300 chained 1500x1500 products with a 1 s budget on a one-at-a-time host: the job is
    stopped by its time budget and the next job still runs."""
    me = who(ids, "alice")
    x, a, out = new_id(), new_id(), new_id()
    steps, previous = [step("torch.Tensor.sum", new_id(), x), step("torch.randn", a, None, 1500,
                                                                    1500)], a  # fmt: skip
    for _ in range(300):
        result = new_id()
        steps.append(step("torch.Tensor.__matmul__", result, previous, ObjectRef(a)))
        previous = result
    steps.append(step("torch.Tensor.sum", out, previous))
    runaway = signed_job(me, host.id, program([x], [out], steps), {x: "table"}, {"t": out},
                         max_seconds=1.0)  # fmt: skip
    after = summing(me, host.id, name="t")
    started = time.monotonic()
    submit(alice, runaway)
    submit(alice, after)
    assert wait_for(lambda: state(host, after.job_id) == "pending_output_review", 45)
    assert state(host, runaway.job_id) in ("timed_out", "failed")
    assert "time budget" in host._jobs.get(runaway.job_id).last_reason
    assert time.monotonic() - started < 40


def test_jobs_awaiting_output_review_do_not_pile_up_workers(
    signaling_url: str, ids: Path, tmp_path: Path
) -> None:
    """Three auto-approved jobs nobody reviews, on a host that runs one job at a time: at
    most one session (one worker process) may be open, whatever waits for the owner."""
    gina = who(ids, "gina")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    settings = sy.JobSettings(policy=JobPolicy(approve_clients=frozenset({gina.id})),
                              concurrency=1, mailbox=False)  # fmt: skip
    host = sy.launch_host(signaling_url, name="one-at-a-time", admit="any", data_dir=home,
                          jobs=settings)  # fmt: skip
    try:
        host.send(TABLE, tags=["table"])
        jobs = [summing(gina, host.id, name="t") for _ in range(3)]
        for job in jobs:
            on_host_loop(host, host._jobs.submit_for(gina.id, job.to_wire()))
        wait_for(lambda: all(state(host, j.job_id) == "pending_output_review" for j in jobs), 6)
        assert state(host, jobs[0].job_id) == "pending_output_review"
        assert len(host._jobs.service._runs) <= settings.concurrency
    finally:
        host.close()


def test_a_scientist_cannot_hold_more_than_their_share_of_open_jobs(
    host: Any, signaling_url: str, ids: Path
) -> None:
    """Carol (not auto-approved) fills her quota of open jobs; the next is refused, and
    another scientist is not affected."""
    carol, dave = who(ids, "carol"), who(ids, "dave")
    duet = join(host, signaling_url, carol)
    try:
        cap = host._jobs.store.max_open_per_client
        for _ in range(cap):
            assert submit(duet, summing(carol, host.id))["state"] == "pending_review"
        with pytest.raises(DuetError, match="open"):
            submit(duet, summing(carol, host.id))
        assert len(host._jobs.store.for_client(carol.id)) == cap
        on_host_loop(host, host._jobs.submit_for(dave.id, summing(dave, host.id).to_wire()))
    finally:
        duet.close()


def test_a_job_dated_in_the_future_cannot_outlive_the_lifetime_cap(
    host: Any, alice: sy.Duet, ids: Path
) -> None:
    ahead = time.time() + 10 * 365 * 86400.0
    job = summing(who(ids, "alice"), host.id, name="t", created_at=ahead,
                  deadline=ahead + 86400.0)  # fmt: skip
    try:
        row = submit(alice, job)
    except DuetError:
        return
    assert row["state"] == "rejected"


# -- what a refusal reveals, and what reaches a screen -------------------------------------


def test_refusals_do_not_reveal_another_scientists_jobs(
    host: Any, alice: sy.Duet, bob: sy.Duet, ids: Path
) -> None:
    job = summing(who(ids, "alice"), host.id, name="t")
    submit(alice, job)
    core, unknown = bob._core, new_id()
    answers = []
    for job_id in (job.job_id, unknown):
        for call in (core.cancel_job(job_id), core.fetch_job_result(job_id, 1 << 20)):
            with pytest.raises(DuetError) as refused:
                core.sync(call)
            answers.append((type(refused.value), str(refused.value).replace(job_id, "<id>")))
    assert answers[:2] == answers[2:]
    assert all(row["job_id"] != job.job_id for row in core.sync(core.list_jobs()))
    # Bob's own job under Alice's job ID is refused; hers stays hers, untouched.
    before = host._jobs.get(job.job_id)
    squatter = summing(who(ids, "bob"), host.id, job_id=job.job_id)
    with pytest.raises(DuetError):
        submit(bob, squatter)
    after = host._jobs.get(job.job_id)
    assert (after.client_id, after.job_hash) == (before.client_id, before.job_hash)


def test_control_characters_never_reach_the_owner_or_the_scientist(
    host: Any, signaling_url: str, ids: Path
) -> None:
    erin = who(ids, "erin")
    duet = join(host, signaling_url, erin)
    try:
        job = duet.submit(total, inputs={"x": "table"}, outputs=["m"], reason=CONTROL)
        owner_job = host.jobs[job.job_id]
        shown = [str(host.jobs), str(owner_job), str(owner_job.review), owner_job.review.reason]
        owner_job.reject("no" + CONTROL)
        assert job.wait(WAIT) == "rejected"
        shown += [job.reason, str(duet.jobs), host._jobs.get(job.job_id).last_reason]
        for text in shown:
            assert_shown_safely(text)
        assert "\n" not in job.reason + owner_job.review.reason
    finally:
        duet.close()


def total(x):  # noqa: ANN001, ANN201 - a job function: pointers in, pointers out
    return x.sum()


# -- results on the live channel ---------------------------------------------------------------


def test_a_result_transfer_that_fails_does_not_lose_the_results(
    host: Any, alice: sy.Duet, ids: Path
) -> None:
    job = summing(who(ids, "alice"), host.id, name="t")
    submit(alice, job)
    reaches(host, job.job_id, "pending_output_review")
    host._jobs.release(job.job_id)
    reaches(host, job.job_id, "released")
    core = alice._core
    with pytest.raises(ProtocolError):  # the transfer fails (here: over what it accepts)
        core.sync(core.fetch_job_result(job.job_id, 16, timeout=WAIT))
    _, bundle = core.sync(core.fetch_job_result(job.job_id, 1 << 20, timeout=WAIT))
    assert bundle is not None


def test_an_ended_job_leaves_no_output_request_to_release(
    host: Any, alice: sy.Duet, ids: Path
) -> None:
    job = summing(who(ids, "alice"), host.id, name="t", deadline=time.time() + 4.0)
    submit(alice, job)
    reaches(host, job.job_id, "pending_output_review")
    reaches(host, job.job_id, "expired")
    request_id = host._jobs.store.requests(job.job_id)["t"]

    def settled() -> bool:
        try:
            return not host.requests[request_id].pending
        except KeyError:
            return True

    assert wait_for(settled, 2.0)


# -- the host's mailbox ----------------------------------------------------------------------


def test_a_job_mailed_by_someone_else_is_refused_and_not_burned(
    host: Any, signaling_url: str, ids: Path
) -> None:
    hank, bob = who(ids, "hank"), who(ids, "bob")
    job = summing(hank, host.id)
    mail_to_host(signaling_url, bob, host, job_mail.JOB, job.to_wire())
    assert host_mail_handled(signaling_url, host)
    assert state(host, job.job_id) is None
    refused = [e for e in host.audit.entries() if e.get("event") == "job_refused"
               and e.get("job_id") == job.job_id]  # fmt: skip
    assert refused and refused[-1]["client_id"] == bob.id
    mail_to_host(signaling_url, hank, host, job_mail.JOB, job.to_wire())
    reaches(host, job.job_id, "pending_review")


def test_a_replayed_job_envelope_is_refused_without_a_notice(
    host: Any, signaling_url: str, ids: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server delivers Ivan's job envelope twice: one job, one answer, never 'rejected'."""
    caplog.set_level(logging.INFO, logger="duet_p2p.host.job_mail")
    ivan = who(ids, "ivan")
    job = summing(ivan, host.id)
    envelopes = mail_to_host(signaling_url, ivan, host, job_mail.JOB, job.to_wire())
    RUNTIME.run(_post(signaling_url, ivan, host.id, envelopes), timeout=WAIT)  # the replay
    assert host_mail_handled(signaling_url, host)
    assert state(host, job.job_id) == "pending_review"
    states = [str(u.state) for u in updates_in(signaling_url, ivan, job.job_id)]
    assert states == ["pending_review"]
    assert any("a replay" in r.getMessage() for r in caplog.records)  # it did reach the host


def test_only_the_jobs_scientist_can_cancel_it_by_mail(
    host: Any, signaling_url: str, ids: Path
) -> None:
    judy, bob = who(ids, "judy"), who(ids, "bob")
    job = summing(judy, host.id)
    mail_to_host(signaling_url, judy, host, job_mail.JOB, job.to_wire())
    reaches(host, job.job_id, "pending_review")
    mail_to_host(signaling_url, bob, host, job_mail.CANCEL, job_mail.cancel_payload(job.job_id))
    assert host_mail_handled(signaling_url, host)
    assert state(host, job.job_id) == "pending_review"
    mail_to_host(signaling_url, judy, host, job_mail.CANCEL, job_mail.cancel_payload(job.job_id))
    reaches(host, job.job_id, "cancelled")


def test_a_duplicate_job_is_not_answered_as_rejected(
    host: Any, ids: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kate = who(ids, "kate")
    job = summing(kate, host.id)
    told: list[JobUpdate] = []
    mail = host._jobs.mail
    original = mail._tell

    async def tell(client_id: str, key: bytes, update: JobUpdate) -> None:
        if update.job_id == job.job_id:
            told.append(update)
        await original(client_id, key, update)

    monkeypatch.setattr(mail, "_tell", tell)
    for number in range(2):
        arrived = job_mail.Mail(job_mail.JOB, kate.id, kate.public_key, job.to_wire(),
                                (f"{number:032x}",))  # fmt: skip
        on_host_loop(host, mail._on_mail(arrived))
    assert state(host, job.job_id) == "pending_review"
    assert [str(u.state) for u in told if str(u.state) == "rejected"] == []


# -- the scientist's mailbox, fed by a hostile server ----------------------------------------


class FakeMailbox:
    """A mailbox server under the attacker's control: delivers what it is given, in the
    order given, and records what the scientist deletes."""

    def __init__(self, items: list[Delivered]) -> None:
        self.items = items
        self.deleted: list[str] = []

    def __call__(self, url: str, identity: Identity) -> FakeMailbox:
        return self

    async def __aenter__(self) -> FakeMailbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def fetch(self, wait: float = 0.0, *, after: str | None = None) -> list[Delivered]:
        ids = [item.message_id for item in self.items]
        start = 0 if after is None else ids.index(after) + 1
        return [i for i in self.items[start : start + 64] if i.message_id not in self.deleted]

    async def delete(self, message_ids: list[str]) -> int:
        self.deleted += list(message_ids)
        return len(message_ids)


def delivered(sender: Identity, recipient: Identity, kind: str, payload: bytes,
              now: float | None = None) -> Delivered:  # fmt: skip
    """One envelope from ``sender``, as a server hands it over."""
    envelopes = list(job_mail.iter_mail(sender, recipient.id, recipient.public_key, kind,
                                        payload, now=now))  # fmt: skip
    assert len(envelopes) == 1
    return Delivered(new_id(), sender.id, envelopes[0], time.time())


def again(item: Delivered) -> Delivered:
    """The same envelope under a new message ID: a server's replay."""
    return Delivered(new_id(), item.sender_id, item.envelope, time.time())


def read_mail(monkeypatch: pytest.MonkeyPatch, scientist: Identity, book: JobBook,
              items: list[Delivered]) -> FakeMailbox:  # fmt: skip
    server = FakeMailbox(items)
    monkeypatch.setattr(scientist_mail, "MailboxClient", server)
    RUNTIME.run(scientist_mail.check_mail(scientist, "http://mailbox.invalid", book), timeout=WAIT)
    return server


def recorded(scientist: Identity, host: Identity, book: JobBook, **overrides: Any) -> SignedJob:
    """A job the scientist submitted by mail to ``host`` (recorded in ``book``)."""
    job = summing(scientist, host.id, **overrides)
    record_job(book, job, "http://mailbox.invalid", "mailbox")
    return job


def released(host: Identity, job: SignedJob, values: dict[str, Any]) -> ResultBundle:
    """The bundle an honest ``host`` would send for ``job`` with these outputs."""
    encoded = {name: encode_output(value) for name, value in values.items()}
    now = time.time()
    receipt = Receipt.issue(
        host, job, inputs={i: "0" * 64 for i in job.spec.inputs},
        outputs={name: content_hash(data) for name, data in encoded.items()},
        submitted_at=now - 3, started_at=now - 2, finished_at=now - 1, released_at=now,
    )  # fmt: skip
    return ResultBundle(job.job_id, receipt.to_wire(), encoded)


@pytest.fixture
def lab(ids: Path) -> tuple[Identity, Identity, JobBook]:
    """(a scientist with a fresh job book, the host of their jobs, the book)."""
    scientist = Identity.load(f"sci-{new_id()[:8]}", directory=ids)
    return scientist, who(ids, "mail-host"), JobBook(scientist.id)


def test_a_mailbox_server_cannot_roll_back_a_jobs_state(
    monkeypatch: pytest.MonkeyPatch, lab: tuple[Identity, Identity, JobBook]
) -> None:
    """Updates delivered out of order, then replayed: the newest state stays; its reason,
    full of control characters, is shown printable."""
    scientist, host, book = lab
    job = recorded(scientist, host, book)
    now = time.time() + 1
    pending = delivered(host, scientist, job_mail.UPDATE,
                        JobUpdate(job.job_id, "pending_review", "", now).to_bytes())  # fmt: skip
    rejected = delivered(host, scientist, job_mail.UPDATE,
                         JobUpdate(job.job_id, "rejected", CONTROL, now + 1).to_bytes())  # fmt: skip
    read_mail(monkeypatch, scientist, book, [rejected, pending])
    assert book.record(job.job_id).state == "rejected"  # type: ignore[union-attr]
    server = read_mail(monkeypatch, scientist, book, [again(pending), again(rejected)])
    assert book.record(job.job_id).state == "rejected"  # type: ignore[union-attr]
    assert len(server.deleted) == 2  # refused as replays
    for text in (Job(scientist, job.job_id, book=book).reason, str(JobsList(scientist))):
        assert_shown_safely(text)


def test_results_cannot_be_swapped_forged_or_sent_by_another_host(
    monkeypatch: pytest.MonkeyPatch, lab: tuple[Identity, Identity, JobBook], ids: Path
) -> None:
    scientist, host, book = lab
    other_host, mallory = who(ids, "other-host"), who(ids, "mallory")
    first, second = recorded(scientist, host, book), recorded(scientist, host, book)
    elsewhere = recorded(scientist, other_host, book)
    one, two = (
        released(host, first, {"m": torch.ones(2)}),
        released(host, second, {"m": torch.zeros(2)}),
    )
    swaps = {
        "outputs of another job": ResultBundle(first.job_id, one.receipt, two.outputs),
        "receipt of another job": ResultBundle(first.job_id, two.receipt, two.outputs),
    }
    for bundle in swaps.values():
        with pytest.raises((InvalidReceipt, InvalidResult)):
            open_result(bundle, first, host_id=host.id, max_bytes=1 << 20)
    by_other = released(other_host, elsewhere, {"m": torch.ones(2)})
    posing = ResultBundle(first.job_id, by_other.receipt, one.outputs)
    forged = dict(one.__dict__)
    draft = Receipt.from_wire(one.receipt)
    fake = Receipt(**{**draft.__dict__, "public_key": mallory.public_key,
                      "signature": bytes(64)})  # fmt: skip
    fake = Receipt(**{**fake.__dict__, "signature": mallory.sign_bytes(fake._message())})
    forged["receipt"] = fake.to_wire()
    items = [
        delivered(host, scientist, job_mail.RESULT, swaps["outputs of another job"].to_bytes()),
        delivered(host, scientist, job_mail.RESULT, swaps["receipt of another job"].to_bytes()),
        delivered(other_host, scientist, job_mail.RESULT, posing.to_bytes()),
        delivered(other_host, scientist, job_mail.RESULT, one.to_bytes()),
        delivered(host, scientist, job_mail.RESULT, ResultBundle(**forged).to_bytes()),
        delivered(mallory, scientist, job_mail.RESULT, one.to_bytes()),
        delivered(other_host, scientist, job_mail.UPDATE,
                  JobUpdate(first.job_id, "withheld", "", time.time() + 5).to_bytes()),
    ]  # fmt: skip
    read_mail(monkeypatch, scientist, book, items)
    assert not book.has_result(first.job_id)
    assert book.record(first.job_id).state == "submitted"  # type: ignore[union-attr]
    read_mail(monkeypatch, scientist, book, [delivered(host, scientist, job_mail.RESULT,
                                                       two.to_bytes())])  # fmt: skip
    values = Job(scientist, second.job_id, book=book).result(timeout=1)
    assert torch.equal(values["m"], torch.zeros(2))
    assert not book.has_result(first.job_id)


def test_job_ids_cannot_escape_the_job_book(
    monkeypatch: pytest.MonkeyPatch, lab: tuple[Identity, Identity, JobBook]
) -> None:
    scientist, host, book = lab
    job = recorded(scientist, host, book)
    escape = "../../../../escaped"
    for make in (lambda: JobUpdate(escape, "rejected", "", time.time()),
                 lambda: ResultBundle(escape, b"r", {"m": b""})):  # fmt: skip
        with pytest.raises(InvalidResult):
            make()
    with pytest.raises(KeyError):
        book.put_result(escape, b"x")
    assert book.record(escape) is None
    with pytest.raises(ValueError):
        JobBook("../" + scientist.id)
    payload = job_spec.canonical_bytes({
        "v": 1, "job_id": escape, "state": "rejected", "reason": "", "at": time.time() + 5,
        "progress": [0, 0]})  # fmt: skip
    read_mail(monkeypatch, scientist, book, [delivered(host, scientist, job_mail.UPDATE, payload)])
    assert sorted(p.name for p in book.root.iterdir()) == [job.job_id]
    assert not list(book.root.parent.parent.rglob("escaped"))


def test_results_larger_than_the_job_allowed_are_refused(
    lab: tuple[Identity, Identity, JobBook],
) -> None:
    scientist, host, book = lab
    job = recorded(scientist, host, book, max_result_bytes=256)
    bundle = released(host, job, {"m": torch.zeros(10_000)})
    with pytest.raises((InvalidResult, InvalidReceipt)):
        open_result(bundle, job, host_id=host.id, max_bytes=1 << 30)


def test_a_delivered_notice_without_results_does_not_end_the_job(
    monkeypatch: pytest.MonkeyPatch, lab: tuple[Identity, Identity, JobBook]
) -> None:
    scientist, host, book = lab
    job = recorded(scientist, host, book)
    claim = JobUpdate(job.job_id, "delivered", "sent", time.time() + 1).to_bytes()
    read_mail(monkeypatch, scientist, book, [delivered(host, scientist, job_mail.UPDATE, claim)])
    assert book.record(job.job_id).state != "delivered"  # type: ignore[union-attr]


def test_a_host_whose_clock_is_behind_is_still_heard(
    monkeypatch: pytest.MonkeyPatch, lab: tuple[Identity, Identity, JobBook]
) -> None:
    scientist, host, book = lab
    job = recorded(scientist, host, book)
    behind = time.time() - 120.0
    notice = JobUpdate(job.job_id, "rejected", "not this quarter", behind).to_bytes()
    read_mail(monkeypatch, scientist, book,
              [delivered(host, scientist, job_mail.UPDATE, notice, now=behind)])  # fmt: skip
    assert book.record(job.job_id).state == "rejected"  # type: ignore[union-attr]


class EndlessJunk(FakeMailbox):
    """A server that never runs out of junk (2 MiB pages, one 32 KiB envelope repeated)."""

    def __init__(self, pages: int) -> None:
        super().__init__([])
        self.pages, self.served, self.bytes_before_delete = pages, 0, None
        self.junk = b"\x00" * (32 << 10)
        self.stranger = new_id()

    async def fetch(self, wait: float = 0.0, *, after: str | None = None) -> list[Delivered]:
        if self.served >= self.pages:
            return []
        self.served += 1
        return [Delivered(new_id(), self.stranger, self.junk, 0.0) for _ in range(64)]

    async def delete(self, message_ids: list[str]) -> int:
        if self.bytes_before_delete is None:
            self.bytes_before_delete = self.served * 64 * len(self.junk)
        return await super().delete(message_ids)


def test_endless_junk_from_the_mailbox_server_is_dropped_as_it_comes(
    monkeypatch: pytest.MonkeyPatch, lab: tuple[Identity, Identity, JobBook]
) -> None:
    scientist, host, book = lab
    recorded(scientist, host, book)
    server = EndlessJunk(pages=24)
    monkeypatch.setattr(scientist_mail, "MailboxClient", server)
    recorded_count = RUNTIME.run(
        scientist_mail.check_mail(scientist, "http://mailbox.invalid", book), timeout=60
    )
    # mail from a sender that is none of this book's hosts is not held (it may be another
    # machine's of the same identity: it stays on the server), so junk costs no memory
    assert recorded_count == 0 and server.served == server.pages
    assert server.bytes_before_delete is None
