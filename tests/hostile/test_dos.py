"""Denial of service by time, memory, queues and history.

One 178-byte action (``nn.TransformerEncoder(layer, num_layers=15000)``) used to block the
owner for 24 s and add 530 MB with a 1 s budget. Work now runs in a worker process with an
address-space limit, killed by a watchdog past its time budget and replaced; what the
monitor holds for the peer (held values, request history) is bounded.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import pytest
import torch

import duet_p2p as sy
from tests.conftest import wait_for
from tests.hostile.common import WAIT, assert_serving, host, session


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_one_small_action_cannot_stall_the_owner(signaling_url: str, tmp_path: Path) -> None:
    limits = sy.OwnerLimits(max_op_seconds=1.0)
    with session(signaling_url, tmp_path, limits=limits) as (owner, scientist):
        kept = scientist.torch.ones(3)
        assert torch.equal(kept.get(timeout_secs=WAIT), torch.ones(3))
        before = _rss_mib()
        started = time.monotonic()
        layer = scientist.torch.nn.TransformerEncoderLayer(16, 2)
        huge = scientist.torch.nn.TransformerEncoder(layer, num_layers=15_000)
        with pytest.raises(sy.RemoteError, match="1 s time budget"):
            huge.get(timeout_secs=WAIT)
        assert time.monotonic() - started < 6.0
        assert _rss_mib() - before < 100, "the work and its memory were the worker's"
        with pytest.raises(sy.RemoteError, match="lost .*1 s time budget"):
            kept.get(timeout_secs=WAIT)
        assert_serving(owner, scientist)
        assert owner._core.worker.restarts == 1


def test_plans_have_a_total_time_budget(signaling_url: str, tmp_path: Path) -> None:
    limits = sy.OwnerLimits(max_op_seconds=30.0, max_plan_seconds=1.0)
    with session(signaling_url, tmp_path, limits=limits) as (owner, scientist):
        x = scientist.torch.rand(300, 300)

        def slow(t: sy.Pointer) -> sy.Pointer:
            for _ in range(50):
                t = (t @ t).tanh()
            return t

        plan = scientist.plan(slow)
        started = time.monotonic()
        result = plan.map(scientist.torch.rand(2000, 300, 300).unbind())
        with pytest.raises(sy.RemoteError, match="1 s time budget"):
            result.get(timeout_secs=WAIT)
        assert time.monotonic() - started < 8.0
        del x
        assert_serving(owner, scientist)


def test_memory_is_bounded_by_the_kernel(signaling_url: str, tmp_path: Path) -> None:
    """Even with the owner's size caps out of the way, the address-space limit holds."""
    limits = sy.OwnerLimits(
        max_result_elements=2**40, max_result_bytes=2**40, max_peer_bytes=64 * 1024**2,
        worker_memory_slack=512 * 1024**2,
    )  # fmt: skip
    with session(signaling_url, tmp_path, limits=limits) as (owner, scientist):
        before = _rss_mib()
        huge = scientist.torch.ones(2 * 1024**3)  # 8 GiB
        with pytest.raises(sy.DuetError):
            huge.get(timeout_secs=WAIT)
        assert _rss_mib() - before < 100
        assert_serving(owner, scientist)


def test_a_crashed_worker_is_replaced(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        data = host(owner, scientist, torch.arange(4.0), "data")
        kept = scientist.torch.ones(2)
        assert torch.equal(kept.get(timeout_secs=WAIT), torch.ones(2))
        worker = owner._core.worker.current
        assert worker is not None
        os.kill(worker.pid, signal.SIGSEGV)
        assert wait_for(lambda: owner._core.worker.restarts == 1, WAIT)
        with pytest.raises(sy.RemoteError, match="lost"):
            kept.get(timeout_secs=WAIT)
        owner.requests.add_handler("accept")
        assert data.sum().item().get(timeout_secs=WAIT) == 6.0, "hosted data mapped again"
        assert_serving(owner, scientist)


def test_restarts_are_capped(signaling_url: str, tmp_path: Path) -> None:
    limits = sy.OwnerLimits(max_worker_restarts=1)
    with session(signaling_url, tmp_path, limits=limits) as (owner, scientist):
        for expected in (1, 2):
            assert wait_for(lambda: owner._core.worker.current is not None, WAIT)
            worker = owner._core.worker.current
            assert worker is not None
            os.kill(worker.pid, signal.SIGKILL)
            assert wait_for(lambda n=expected: owner._core.worker.restarts == n, WAIT)
        with pytest.raises(sy.RemoteError, match="stopped serving"):
            scientist.torch.ones(2).get(timeout_secs=WAIT)
        assert owner.connected, "the owner's own session is unharmed"


def test_request_history_and_held_values_are_bounded(signaling_url: str, tmp_path: Path) -> None:
    limits = sy.OwnerLimits(max_requests=20, max_pending_bytes=1024**2)
    with session(signaling_url, tmp_path, limits=limits) as (owner, scientist):
        data = host(owner, scientist, torch.rand(512, 1024), "data")  # 2 MiB
        owner.requests.add_handler("deny", reason="no")
        for _ in range(60):
            with pytest.raises(sy.PermissionDenied):
                (data[0] * 2).get(timeout_secs=WAIT)
        assert len(owner.requests.all()) <= 20
        assert owner._core.held_bytes == 0, "decided requests hold no values"
        owner.requests.clear_handlers()
        handle = (data * 2).request(reason="too big to hold")
        request = owner.requests.wait(WAIT)
        assert request is not None and "used up" in (request.error or "")
        assert owner._core.held_bytes == 0
        request.deny("no")
        assert handle.wait(WAIT) == "denied"
        assert_serving(owner, scientist)
