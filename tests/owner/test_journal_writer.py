"""The journal's writer thread: in order, batched into transactions, failures apart."""

from __future__ import annotations

import contextlib
import threading

import pytest

from duet_p2p.owner.journal_writer import JournalWriter


class Recorder:
    def __init__(self) -> None:
        self.transactions: list[list[str]] = []
        self.gate = threading.Event()

    @contextlib.contextmanager
    def transaction(self):
        self.transactions.append([])
        yield

    def write(self, name: str) -> str:
        self.gate.wait(10)
        self.transactions[-1].append(name)
        return name


def test_writes_run_in_order_and_queued_ones_commit_together():
    recorder = Recorder()
    writer = JournalWriter(recorder.transaction)
    try:
        futures = [writer.submit(recorder.write, f"w{i}") for i in range(20)]
        recorder.gate.set()
        assert [f.result(10) for f in futures] == [f"w{i}" for i in range(20)]
        written = [name for batch in recorder.transactions for name in batch]
        assert written == [f"w{i}" for i in range(20)]
        assert len(recorder.transactions) < 20  # the ones queued behind the first batched
    finally:
        writer.close()


def test_one_failing_write_fails_alone_and_a_failed_commit_fails_all():
    recorder = Recorder()
    recorder.gate.set()
    writer = JournalWriter(recorder.transaction)

    def boom() -> None:
        raise ValueError("bad row")

    try:
        bad, good = writer.submit(boom), writer.submit(recorder.write, "ok")
        with pytest.raises(ValueError, match="bad row"):
            bad.result(10)
        assert good.result(10) == "ok"
    finally:
        writer.close()

    @contextlib.contextmanager
    def failing():
        yield
        raise OSError("disk full")

    broken = JournalWriter(failing)
    try:
        with pytest.raises(OSError, match="disk full"):
            broken.submit(recorder.write, "lost").result(10)
    finally:
        broken.close()


def test_close_commits_what_is_queued_then_refuses():
    recorder = Recorder()
    recorder.gate.set()
    writer = JournalWriter(recorder.transaction)
    futures = [writer.submit(recorder.write, str(i)) for i in range(5)]
    writer.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(recorder.write, "late").result(1)
