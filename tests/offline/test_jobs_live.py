"""Offline jobs over a live connection to a standing host (one process, real WebRTC on
loopback, a real signaling server): submit, auto-approve by policy, review outputs,
release, collect with a verified receipt; reject and withhold reasons; cancel; another
scientist's job is invisible."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import duet_p2p as sy
from duet_p2p.errors import DuetError, PermissionDenied
from duet_p2p.host import job_runner
from duet_p2p.identity import Identity
from tests.conftest import wait_for

WAIT = 30.0
DATA = torch.arange(12, dtype=torch.float32).reshape(4, 3)


def column_means(x):  # noqa: ANN001, ANN201 - a job function: pointers in, pointers out
    return x.mean(dim=0), x.sum()


@pytest.fixture
def host(signaling_url: str, tmp_path: Path) -> Iterator[sy.Host]:
    home = tmp_path / "host_home"
    home.mkdir(mode=0o700)
    host = sy.launch_host(signaling_url, name="jobs", admit="any", data_dir=home,
                          jobs=sy.JobSettings(mailbox=False))  # fmt: skip
    host.send(DATA, tags=["table"])
    yield host
    host.close()


def scientist(host: sy.Host, url: str, tmp_path: Path, name: str) -> sy.Duet:
    folder = tmp_path / "ids"
    folder.mkdir(mode=0o700, exist_ok=True)
    return sy.join_duet(host.id, signaling_url=url, identity=Identity.load(name, directory=folder))


def test_a_job_is_reviewed_run_released_and_collected(host: sy.Host, signaling_url: str,
                                                      tmp_path: Path) -> None:  # fmt: skip
    duet = scientist(host, signaling_url, tmp_path, "alice")
    try:
        job = duet.submit(column_means, inputs={"x": "table"}, outputs=["means", "total"],
                          reason="column means", max_seconds=30)  # fmt: skip
        assert job.status == "pending_review"
        assert wait_for(lambda: len(host.jobs.pending_review) == 1, WAIT)
        owner_job = host.jobs[job.job_id]
        assert "torch.Tensor.mean" in owner_job.review.ops
        owner_job.approve()
        assert wait_for(lambda: host.jobs[job.job_id].state == "pending_output_review", WAIT)
        assert torch.equal(host.jobs[job.job_id].preview("means"), DATA.mean(dim=0))
        host.jobs[job.job_id].release()
        assert job.wait(WAIT) == "delivered"
        result = job.result()
        assert torch.equal(result["means"], DATA.mean(dim=0))
        assert float(result["total"]) == float(DATA.sum())
        receipt = job.receipt
        assert receipt is not None
        receipt.verify()
        receipt.verify(host.id)
        assert receipt.job_hash == job.signed.hash() and set(receipt.outputs) == {"means", "total"}
        with pytest.raises(sy.DuetError, match="not"):
            receipt.verify("0" * 32)
        assert [j.job_id for j in duet.jobs] == [job.job_id]
    finally:
        duet.close()


def test_reject_and_withhold_reasons_reach_the_scientist(host: sy.Host, signaling_url: str,
                                                         tmp_path: Path) -> None:  # fmt: skip
    duet = scientist(host, signaling_url, tmp_path, "bob")
    try:
        rejected = duet.submit(column_means, inputs={"x": "table"}, outputs=["m", "t"],
                               reason="r1")  # fmt: skip
        assert wait_for(lambda: host.jobs[rejected.job_id].state == "pending_review", WAIT)
        host.jobs[rejected.job_id].reject("not this quarter")
        assert rejected.wait(WAIT) == "rejected"
        assert "not this quarter" in rejected.reason
        with pytest.raises(PermissionDenied, match="not this quarter"):
            rejected.result()

        withheld = duet.submit(column_means, inputs={"x": "table"}, outputs=["m", "t"],
                               reason="r2")  # fmt: skip
        assert wait_for(lambda: host.jobs[withheld.job_id].state == "pending_review", WAIT)
        host.jobs[withheld.job_id].approve()
        assert wait_for(lambda: host.jobs[withheld.job_id].state == "pending_output_review", WAIT)
        host.jobs[withheld.job_id].withhold("too precise")
        assert withheld.wait(WAIT) == "withheld"
        assert "too precise" in withheld.reason
    finally:
        duet.close()


def test_cancel_and_isolation(host: sy.Host, signaling_url: str, tmp_path: Path) -> None:
    alice = scientist(host, signaling_url, tmp_path, "carol")
    bob = scientist(host, signaling_url, tmp_path, "dave")
    try:
        job = alice.submit(column_means, inputs={"x": "table"}, outputs=["m", "t"], reason="x")
        assert len(bob.jobs) == 0
        core = bob._core
        assert core.sync(core.list_jobs()) == []
        with pytest.raises(DuetError, match="no job"):
            core.sync(core.cancel_job(job.job_id))
        with pytest.raises(DuetError, match="no job"):
            core.sync(core.fetch_job_result(job.job_id, 1 << 20))
        unknown = "0" * 32
        with pytest.raises(DuetError, match="no job") as foreign:
            core.sync(core.fetch_job_result(unknown, 1 << 20))
        assert unknown in str(foreign.value)
        job.cancel()
        assert job.wait(WAIT) == "cancelled"
        assert "cancelled by" in job.reason
    finally:
        alice.close()
        bob.close()


def test_outputs_released_while_the_run_closes_are_delivered(
    host: sy.Host, signaling_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner may release as soon as the job awaits its output review, while its run's
    loopback session is still closing: the accepted values reach that session, not the
    journal, and must still be kept (they were once lost: "its value was not kept")."""
    closing = job_runner.JobRun.close

    async def slow_close(run: job_runner.JobRun) -> None:
        await asyncio.sleep(1.5)  # widen the window a busy machine opens now and then
        await closing(run)

    monkeypatch.setattr(job_runner.JobRun, "close", slow_close)
    duet = scientist(host, signaling_url, tmp_path, "alice")
    try:
        job = duet.submit(column_means, inputs={"x": "table"}, outputs=["means", "total"],
                          reason="column means", max_seconds=30)  # fmt: skip
        assert wait_for(lambda: len(host.jobs.pending_review) == 1, WAIT)
        host.jobs[job.job_id].approve()
        assert wait_for(lambda: host.jobs[job.job_id].state == "pending_output_review", WAIT)
        host.jobs[job.job_id].release()
        assert job.wait(WAIT) == "delivered", host.jobs[job.job_id].reason
        assert torch.equal(job.result()["means"], DATA.mean(dim=0))
    finally:
        duet.close()
