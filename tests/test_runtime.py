"""The background runtime: one I/O thread, a sync bridge to it, and a quiet shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from duet_p2p.errors import DuetError
from duet_p2p.runtime import Runtime, get_runtime

ROOT = Path(__file__).resolve().parent.parent
CYCLE = ROOT / "tests" / "peers" / "connect_cycle.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "DUET_ICE_HOST_ADDRESSES": "127.0.0.1"}


def test_one_daemon_io_thread() -> None:
    runtime = get_runtime()
    assert get_runtime() is runtime
    assert runtime._thread.daemon and runtime._thread.is_alive()
    assert runtime._thread.name == "duet-p2p-io"
    assert runtime.run(asyncio.sleep(0, result=7), timeout=5) == 7
    assert not runtime.in_loop_thread()
    assert runtime.run(_in_loop_thread(runtime), timeout=5)


async def _in_loop_thread(runtime: Runtime) -> bool:
    return runtime.in_loop_thread()


def test_run_from_a_thread_whose_loop_is_running() -> None:
    runtime = get_runtime()

    async def main() -> int:
        asyncio.get_running_loop()  # as in a notebook cell
        return runtime.run(asyncio.sleep(0.01, result=3), timeout=5)

    assert asyncio.run(main()) == 3


def test_blocking_call_from_the_runtime_loop_is_refused() -> None:
    runtime = get_runtime()

    async def callback() -> None:
        runtime.run(asyncio.sleep(0))

    with pytest.raises(DuetError, match="use the async API"):
        runtime.run(callback(), timeout=5)


def test_errors_and_timeouts_reach_the_caller() -> None:
    runtime = get_runtime()

    async def fail() -> None:
        raise ValueError("from the loop")

    with pytest.raises(ValueError, match="from the loop"):
        runtime.run(fail(), timeout=5)

    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        runtime.run(slow(), timeout=0.2)
    assert time.monotonic() - started < 2
    assert cancelled.wait(5), "the timed-out coroutine was not cancelled"


def test_shutdown_runs_closers_and_stops_the_thread() -> None:
    runtime = Runtime()
    closed: list[str] = []

    async def closer() -> None:
        closed.append("closed")

    runtime.add_closer(closer)
    runtime.shutdown(timeout=5)
    assert closed == ["closed"]
    assert not runtime._thread.is_alive()
    coro = asyncio.sleep(0)
    with pytest.raises(DuetError, match="shut down"):
        runtime.submit(coro)
    runtime.shutdown()  # idempotent


def test_release_threads_ends_idle_workers() -> None:
    runtime = Runtime()
    try:
        name = runtime.run(_worker_thread_name(), timeout=5)
        assert name.startswith("duet-p2p-worker")
        runtime.release_threads()
        assert _gone(name, 3), f"{name} still runs after release_threads()"
        assert runtime.run(_worker_thread_name(), timeout=5).startswith("duet-p2p-worker")
    finally:
        runtime.shutdown(timeout=5)


async def _worker_thread_name() -> str:
    return await asyncio.to_thread(lambda: threading.current_thread().name)


def _gone(name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(t.name == name for t in threading.enumerate()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _cycle(mode: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CYCLE), mode, str(tmp_path / "audit.jsonl")],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=str(ROOT),
        timeout=60,
    )


def test_closing_duets_leaves_no_threads(tmp_path: Path) -> None:
    result = _cycle("threads", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # worker threads did run while connected, so their absence afterwards means something
    assert any(name.startswith("duet-p2p-worker") for name in report["during"]), report
    assert report["left"] == [], f"threads left after closing both Duets: {report}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_exit_with_open_duets_is_quiet(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _cycle("exit-open", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OPEN" in result.stdout
    for noise in ("Traceback", "Exception ignored", "never retrieved", "was destroyed"):
        assert noise not in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - started < 30
    audit = (tmp_path / "audit.jsonl").read_text()
    assert '"disconnected"' in audit, "the owner's session was not closed at exit"


def test_exit_right_after_closing_is_clean(tmp_path: Path) -> None:
    """Exiting while threads the session started are still busy must not abort."""
    result = _cycle("exit-fast", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CLOSED" in result.stdout
    assert "terminate called" not in result.stderr, result.stderr[-3000:]
