"""Large values: a progress hook while they arrive, a clear error if the connection breaks
mid-transfer, and a 200 MB get between two OS processes with both sides' peak memory."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

import duet_p2p as sy
from duet_p2p.rpc import codec
from duet_p2p.runtime import get_runtime
from duet_p2p.transport.channel import PROGRESS_THRESHOLD_BYTES, ChannelOptions
from tests.conftest import run_peer

WAIT = 30.0
MIB = 1024 * 1024
LARGE_ELEMENTS = 50_000_000  # float32: 200 MB
PROGRESS_ELEMENTS = PROGRESS_THRESHOLD_BYTES // 4 + 256 * 1024  # 11 MiB


# -- helpers -------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        found = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(found.group(1)) if found else 0


class PeakMeter:
    """Peak RSS above the RSS at entry: the kernel's high-water mark, reset at entry
    (/proc/self/clear_refs), or if that is not allowed, VmRSS sampled every 5 ms."""

    def __init__(self) -> None:
        self.idle_kib = 0
        self.peak_kib = 0
        self._exact = False
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> PeakMeter:
        self.idle_kib = self.peak_kib = status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
                clear.write("5")
            self._exact = True
        except OSError:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_kib = max(self.peak_kib, status_kib("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(5)
        if self._exact:
            self.peak_kib = status_kib("VmHWM")

    @property
    def above_idle_bytes(self) -> int:
        return max(0, self.peak_kib - self.idle_kib) * 1024


class PeerOutput:
    """Lines a peer process prints, read on threads (stderr drained so it never blocks)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []
        for stream, sink in (
            (process.stdout, self.lines.put),
            (process.stderr, self.errors.append),
        ):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream: object, sink: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink(line.rstrip("\n"))  # type: ignore[operator]

    def expect(self, key: str, timeout: float) -> list[str]:
        """The fields after ``key`` on the next line that starts with it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.01, remaining))
            except queue.Empty:
                raise AssertionError(
                    f"the peer printed no {key!r} line within {timeout:g} s; stdout: "
                    f"{self.seen[-20:]}; stderr: {self.errors[-20:]}"
                ) from None
            self.seen.append(line)
            if line.startswith(key + " "):
                return line.split()[1:]

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(10)


def join_peer(url: str, tmp_path: Path, elements: int, *options: str, **join_options: object):
    """Start the owner peer script, join it as the scientist; returns (peer, output, duet, sha)."""
    process = run_peer(
        "large_owner.py", url, str(elements), str(tmp_path / "audit.jsonl"), *options
    )
    output = PeerOutput(process)
    try:
        [sha] = output.expect("SHA256", WAIT)
        [duet_id] = output.expect("DUET_ID", WAIT)
        scientist = sy.join_duet(duet_id, url, on_client_id=output.send, **join_options)
        output.expect("READY", WAIT)
    except BaseException:
        stop(process)
        raise
    return process, output, scientist, sha


def record_progress(scientist: sy.Duet) -> list[tuple[int, int]]:
    """Record every progress call (and keep the session's own bar running)."""
    transport = scientist._connection.transport
    installed = transport.on_progress
    assert installed is not None, "the scientist's session installs a progress hook"
    calls: list[tuple[int, int]] = []

    def hook(received: int, total: int) -> None:
        calls.append((received, total))
        installed(received, total)

    transport.on_progress = hook
    return calls


# -- progress and broken connections (in one process, fast) -------------------------------


def test_progress_hook_fires_for_large_values_only(
    duet_pair: tuple[sy.Duet, sy.Duet], capsys: pytest.CaptureFixture[str]
) -> None:
    owner, scientist = duet_pair
    scientist._core.show_progress = True
    calls = record_progress(scientist)
    owner.store.send(torch.ones(1000), tags=["small"], public=True)
    owner.store.send(torch.ones(PROGRESS_ELEMENTS), tags=["large"], public=True)
    store = scientist.store.refresh()

    assert store["small"].get(timeout_secs=WAIT).sum().item() == 1000
    assert calls == [], "small values arrive without progress reports"

    value = store["large"].get(timeout_secs=WAIT)
    assert value.numel() == PROGRESS_ELEMENTS and bool((value == 1).all())
    totals = {total for _, total in calls}
    assert len(totals) == 1 and totals.pop() >= PROGRESS_THRESHOLD_BYTES
    received = [r for r, _ in calls]
    assert received == sorted(received) and len(received) > 10
    assert calls[-1][0] == calls[-1][1], "the last report is the whole message"
    assert scientist._core._progress_bar is None, "the bar is closed once the value is in"
    assert "receiving" in capsys.readouterr().err


def test_connection_lost_mid_transfer_raises_peer_closed(
    duet_pair: tuple[sy.Duet, sy.Duet],
) -> None:
    owner, scientist = duet_pair
    owner.store.send(torch.ones(8 * 1024 * 1024), tags=["large"], public=True)  # 32 MiB
    large = scientist.store.refresh()["large"]
    calls = record_progress(scientist)
    owner_pc = owner._connection.pc
    handle = large.request()

    deadline = time.monotonic() + WAIT
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls, "the transfer did not start"
    get_runtime().run(owner_pc.close(), timeout=10)  # the owner's side vanishes mid-transfer

    started = time.monotonic()
    with pytest.raises(sy.PeerClosed, match="lost before the value arrived"):
        handle.result(timeout=WAIT)
    assert time.monotonic() - started < 10
    assert calls[-1][0] < calls[-1][1], "the value was cut off mid-transfer"
    assert scientist._core._progress_bar is None
    with pytest.raises(sy.DuetConnectionError):
        large.get(timeout_secs=WAIT)


def test_owner_killed_mid_transfer_raises_peer_closed(signaling_url: str, tmp_path: Path) -> None:
    """A peer that dies without a word is noticed by the heartbeat."""
    channel = ChannelOptions(heartbeat_interval=0.5, heartbeat_timeout=2.0)
    process, _, scientist, _ = join_peer(signaling_url, tmp_path, 16 * MIB, channel=channel)
    try:
        calls = record_progress(scientist)
        handle = scientist.store["big"].request()
        deadline = time.monotonic() + WAIT
        while sum(1 for _ in calls) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls, "the transfer did not start"
        process.kill()
        started = time.monotonic()
        with pytest.raises(sy.PeerClosed) as caught:
            handle.result(timeout=WAIT)
        assert time.monotonic() - started < 10
        assert "lost before the value arrived" in str(caught.value)
        assert calls[-1][0] < calls[-1][1]
    finally:
        stop(process)
        scientist.close()


# -- 200 MB between two processes --------------------------------------------------------


@pytest.mark.timeout(180)
def test_200mb_get_between_processes(signaling_url: str, tmp_path: Path) -> None:
    """Private, released by an accept handler: the request queue, the audit hash and the
    transfer all see the full 200 MB (~25 s at aiortc's ~8-10 MiB/s)."""
    process, output, scientist, owner_sha = join_peer(
        signaling_url, tmp_path, LARGE_ELEMENTS, "--private"
    )
    try:
        calls = record_progress(scientist)
        pointer = scientist.store["big"]
        started = time.monotonic()
        with PeakMeter() as scientist_memory:
            value = pointer.get(reason="the whole table", timeout_secs=180)
        seconds = time.monotonic() - started
        payload = value.numel() * value.element_size()
        assert payload == LARGE_ELEMENTS * 4
        assert hashlib.sha256(value.numpy().data).hexdigest() == owner_sha, "the value changed"
        audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        [release] = [e for e in audit if e["event"] == "release"]
        assert release["sha256"] == hashlib.sha256(codec.encode(value)).hexdigest()
        del value
        scientist.close()
        idle_kib, peak_kib, closed = (int(x) for x in output.expect("DONE", WAIT))
        assert closed == 1
    finally:
        stop(process)
        scientist.close()

    owner_extra = max(0, peak_kib - idle_kib) * 1024
    scientist_extra = scientist_memory.above_idle_bytes
    print(
        f"\n200 MB get: {seconds:.1f} s, "
        f"{payload / MIB / seconds:.1f} MiB/s; peak above idle: owner "
        f"{owner_extra / MIB:.0f} MiB ({owner_extra / payload:.2f}x payload), scientist "
        f"{scientist_extra / MIB:.0f} MiB ({scientist_extra / payload:.2f}x payload); "
        f"{len(calls)} progress reports; pid {os.getpid()}"
    )
    assert calls and calls[-1][0] == calls[-1][1]
    assert owner_extra < 4 * payload
    assert scientist_extra < 4 * payload
