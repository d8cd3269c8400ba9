"""Offline jobs across host restarts, time budgets and deadlines (one process: a host is
stopped without finishing its work and a new one starts on the same directory, as after a
crash or a restart; real WebRTC on loopback, a real signaling server)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import duet_p2p as sy
from duet_p2p.identity import Identity
from tests.conftest import wait_for

WAIT = 60.0
SIZE = 600


def slow(x: Any) -> Any:
    """A few seconds of matrix products on the host."""
    y = x
    for _ in range(300):
        y = (y @ x).tanh()
    return y.mean()


def quick(x: Any) -> Any:
    return x.mean()


class Site:
    """A host's directory and identity, and a scientist's, over several host lifetimes."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.home = tmp / "host"
        self.home.mkdir(mode=0o700)
        ids = tmp / "ids"
        ids.mkdir(mode=0o700)
        self.host_identity = Identity.load("host", directory=ids)
        self.scientist = Identity.load("sci", directory=ids)
        self.host: sy.Host | None = None
        self.matrix = torch.rand(SIZE, SIZE, generator=torch.Generator().manual_seed(0)) / SIZE

    def start(self, **settings: Any) -> sy.Host:
        policy = sy.JobPolicy(approve_clients=frozenset({self.scientist.id}))
        jobs = sy.JobSettings(policy=policy, mailbox=False, **settings)
        self.host = sy.launch_host(self.url, name="restarts", admit="any", data_dir=self.home,
                                   identity=self.host_identity, jobs=jobs)  # fmt: skip
        self.host.send(self.matrix, tags=["matrix"])
        return self.host

    def stop(self) -> None:
        if self.host is not None:
            self.host.close()
            self.host = None

    def join(self) -> sy.Duet:
        assert self.host is not None
        return sy.join_duet(self.host.id, signaling_url=self.url, identity=self.scientist)


@pytest.fixture
def site(signaling_url: str, tmp_path: Path) -> Iterator[Site]:
    site = Site(signaling_url, tmp_path)
    yield site
    site.stop()


def state_of(site: Site, job_id: str) -> str:
    assert site.host is not None
    return str(site.host._jobs.get(job_id).state)  # type: ignore[union-attr]


def runs_started(site: Site, job_id: str) -> list[str]:
    assert site.host is not None
    return [e.reason for e in site.host._jobs.events(job_id)  # type: ignore[union-attr]
            if e.reason.startswith("run started")]  # fmt: skip


def test_a_restart_mid_run_fails_the_job_once_and_clearly(site: Site) -> None:
    site.start()
    duet = site.join()
    job = duet.submit(slow, inputs={"x": "matrix"}, outputs=["m"], reason="slow", max_seconds=60)
    assert wait_for(lambda: state_of(site, job.job_id) == "running", WAIT)
    duet.close()
    site.stop()  # mid-run: nothing finishes it
    site.start()
    assert state_of(site, job.job_id) == "failed"
    assert runs_started(site, job.job_id) == ["run started (attempt 1)"]
    time.sleep(1.0)  # the job loop has looked: nothing runs it again
    assert state_of(site, job.job_id) == "failed"
    again = site.join()
    try:
        mine = again.jobs[job.job_id]
        assert mine.wait(WAIT) == "failed"
        assert mine.reason == "host restarted"
    finally:
        again.close()


def test_the_owners_policy_may_run_an_interrupted_job_once_more(site: Site) -> None:
    site.start(on_restart="requeue")
    duet = site.join()
    job = duet.submit(slow, inputs={"x": "matrix"}, outputs=["m"], reason="slow", max_seconds=60)
    assert wait_for(lambda: state_of(site, job.job_id) == "running", WAIT)
    duet.close()
    site.stop()
    site.start(on_restart="requeue")
    assert wait_for(lambda: state_of(site, job.job_id) == "pending_output_review", WAIT)
    assert runs_started(site, job.job_id) == ["run started (attempt 1)",
                                               "run started (attempt 2)"]  # fmt: skip
    trail = [e.reason for e in site.host._jobs.events(job.job_id)]  # type: ignore[union-attr]
    assert any("re-queued by the owner's policy" in reason for reason in trail)


def test_outputs_awaiting_review_survive_a_restart_and_are_released_after_it(
    site: Site,
) -> None:
    site.start()
    duet = site.join()
    job = duet.submit(quick, inputs={"x": "matrix"}, outputs=["m"], reason="mean")
    assert wait_for(lambda: state_of(site, job.job_id) == "pending_output_review", WAIT)
    duet.close()
    site.stop()
    host = site.start()
    assert state_of(site, job.job_id) == "pending_output_review"
    host.jobs[job.job_id].release()
    assert wait_for(lambda: state_of(site, job.job_id) == "released", WAIT)
    again = site.join()
    try:
        mine = again.jobs[job.job_id]
        assert mine.wait(WAIT) == "delivered"
        value = mine.result()["m"]
        assert torch.allclose(value, site.matrix.mean())
        mine.receipt.verify(host.id)  # type: ignore[union-attr]
    finally:
        again.close()


def test_a_job_over_its_time_budget_times_out_and_the_host_keeps_serving(site: Site) -> None:
    site.start()
    duet = site.join()
    try:
        late = duet.submit(slow, inputs={"x": "matrix"}, outputs=["m"], reason="slow",
                           max_seconds=0.5)  # fmt: skip
        assert late.wait(WAIT) == "timed_out"
        assert "time budget" in late.reason or "within" in late.reason
        fine = duet.submit(quick, inputs={"x": "matrix"}, outputs=["m"], reason="mean")
        assert wait_for(lambda: state_of(site, fine.job_id) == "pending_output_review", WAIT)
    finally:
        duet.close()


def test_a_job_past_its_deadline_expires(site: Site) -> None:
    host = site.start()
    host._jobs.service.policy = sy.JobPolicy()  # type: ignore[union-attr]  # the owner reviews
    duet = site.join()
    try:
        job = duet.submit(quick, inputs={"x": "matrix"}, outputs=["m"], reason="soon",
                          deadline=time.time() + 2.0)  # fmt: skip
        assert job.status == "pending_review"
        assert job.wait(WAIT) == "expired"
        assert "deadline" in job.reason
    finally:
        duet.close()


def test_a_connected_scientist_sees_the_steps_done(site: Site) -> None:
    site.start()
    duet = site.join()
    try:
        job = duet.submit(slow, inputs={"x": "matrix"}, outputs=["m"], reason="slow")
        seen: set[tuple[int, int]] = set()
        deadline = time.monotonic() + WAIT
        while job.refresh().state != "pending_output_review" and time.monotonic() < deadline:
            seen.add(job.progress)
            time.sleep(0.1)
        steps = len(job.signed.spec.program["steps"])
        assert any(0 < done < steps and total == steps for done, total in seen), seen
        assert job.progress == (steps, steps)
    finally:
        duet.close()
