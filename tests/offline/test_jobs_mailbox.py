"""Offline jobs through the signaling server's mailbox (one process, a real signaling
server with its mailbox, real WebRTC for the live part): a job submitted while the host is
down arrives once it starts, is auto-approved and auto-released by policy, and its results
come back through the mailbox, checked against the receipt; a job from a scientist the
host has not admitted is refused with the reason mailed back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import duet_p2p as sy
from duet_p2p.identity import Identity
from duet_p2p.offline.policy import JobPolicy, ReleaseRule

WAIT = 60.0
DATA = torch.arange(12, dtype=torch.float32).reshape(4, 3)


def column_means(x):  # noqa: ANN001, ANN201 - a job function: pointers in, pointers out
    return x.mean(dim=0)


def identities(tmp_path: Path) -> Path:
    folder = tmp_path / "ids"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def start_host(url: str, home: Path, identity: Identity, policy: JobPolicy,
               admit: object) -> sy.Host:  # fmt: skip
    host = sy.launch_host(url, name="offline", admit=admit, data_dir=home, identity=identity,
                          jobs=sy.JobSettings(policy=policy, poll_seconds=1.0))  # fmt: skip
    host.send(DATA, tags=["table"])
    return host


def test_submitted_while_the_host_is_down_then_collected_from_the_mailbox(
    signaling_url: str, tmp_path: Path
) -> None:
    ids = identities(tmp_path)
    host_identity = Identity.load("offline-host", directory=ids)
    alice = Identity.load("alice", directory=ids)
    home = tmp_path / "host"
    home.mkdir(mode=0o700)
    job = sy.submit_job(
        host_identity.id, column_means, inputs={"x": "table"}, outputs=["means"],
        reason="column means", signaling_url=signaling_url, identity=alice,
        host_key=host_identity.public_key, max_seconds=30,
    )  # fmt: skip
    assert job.record.state == "submitted"
    assert job.status == "submitted"  # nobody has read the host's mailbox yet
    policy = JobPolicy(approve_clients=frozenset({alice.id}),
                       release=(ReleaseRule(outputs=frozenset({"means"}), op="mean",
                                            max_elements=3, min_aggregation=1),))  # fmt: skip
    host = start_host(signaling_url, home, host_identity, policy, [alice.id])
    try:
        assert job.wait(WAIT) == "delivered"
        result = job.result()
        assert torch.equal(result["means"], DATA.mean(dim=0))
        job.receipt.verify(host_identity.id)  # type: ignore[union-attr]
        trail = [str(e.new) for e in host._jobs.events(job.job_id)]
        assert trail[:4] == ["submitted", "pending_review", "auto_approved", "queued"]
        assert trail[-2:] == ["released", "delivered"]
        assert [j.job_id for j in sy.jobs(host_identity.id, identity=alice)] == [job.job_id]
    finally:
        host.close()


def test_a_job_from_a_scientist_not_admitted_is_refused(signaling_url: str,
                                                       tmp_path: Path) -> None:  # fmt: skip
    ids = identities(tmp_path)
    host_identity = Identity.load("strict-host", directory=ids)
    mallory = Identity.load("mallory", directory=ids)
    home = tmp_path / "host"
    home.mkdir(mode=0o700)
    host = start_host(signaling_url, home, host_identity, JobPolicy(), [])
    try:
        job = sy.submit_job(
            host_identity.id, column_means, inputs={"x": "table"}, outputs=["means"],
            reason="let me in", signaling_url=signaling_url, identity=mallory,
            host_key=host_identity.public_key,
        )  # fmt: skip
        assert job.wait(WAIT) == "rejected"
        assert "may not submit jobs" in job.reason
        assert host._jobs.store.get(job.job_id) is None
    finally:
        host.close()


def test_a_host_key_that_is_not_the_hosts_is_refused(signaling_url: str, tmp_path: Path) -> None:
    ids = identities(tmp_path)
    host_identity = Identity.load("h", directory=ids)
    other = Identity.load("other", directory=ids)
    with pytest.raises(sy.DuetError, match="not the key of host"):
        sy.submit_job(host_identity.id, column_means, inputs={"x": "table"}, outputs=["m"],
                      reason="r", signaling_url=signaling_url, identity=other,
                      host_key=other.public_key)  # fmt: skip


def test_a_job_that_cannot_be_mailed_leaves_no_record(tmp_path: Path) -> None:
    ids = identities(tmp_path)
    host_identity = Identity.load("gone-host", directory=ids)
    alice = Identity.load("alice2", directory=ids)
    with pytest.raises(sy.DuetError):
        sy.submit_job(host_identity.id, column_means, inputs={"x": "table"}, outputs=["m"],
                      reason="r", signaling_url="http://127.0.0.1:9", identity=alice,
                      host_key=host_identity.public_key)  # fmt: skip
    assert len(sy.jobs(identity=alice)) == 0
