"""Offline jobs: a job's latency against the same plan run live, and a 100 MB result through
the mailbox against the live channel.

One run, on loopback with a real signaling server (its mailbox caps raised for 100 MB) and
real WebRTC. Processes: a standing host (``sy.launch_host``; ``JobSettings`` whose policy
auto-approves the scientist's Client ID and whose release rule covers both outputs), a
scientist with an identity, and later a fresh scientist process that collects from the
mailbox.

1. Latency: ``duet.submit(fn, inputs={"x": SMALL_TAG}, ...).result()`` (submit to verified
   result, one job at a time, nothing else queued) against ``plan = duet.plan(fn);
   plan(ptr).get()`` with an accept handler on the host (on only for the live rounds, so
   the job's output is released by the release rule). ``WARMUP`` rounds of each, then
   ``ROUNDS`` interleaved; medians. Each job's trail on the host splits its time.
2. A 100 MB result (``x * 1.0`` of a hosted float32 tensor of ``BIG_ELEMENTS`` elements),
   twice each way in the order ``BIG_ORDER``: live (``duet.submit(...).result()``, the
   scientist connected) and through the mailbox (the scientist disconnected,
   ``sy.submit_job``; once the host has mailed the release, a fresh scientist process
   calls ``job.result()``). Time from the release (the host's trail) to the verified
   result (medians); peak RSS above idle (the worst round) of the host's process tree,
   sampled, and of the scientist's process (VmHWM).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import host as host_bench
from benchmarks._peers import (
    DuetPeer,
    Handlers,
    Peer,
    PeerFailed,
    median,
    print_standalone,
    signaling_server,
)

ROUNDS = 7
WARMUP = 2
SMALL_TAG = "table"
SMALL_SHAPE = (100, 8)
SMALL_OUT = "sums"
BIG_TAG = "big"
BIG_OUT = "copy"
BIG_ELEMENTS = 25_000_000
"""float32: 100 MB."""
BIG_RESULT_BYTES = 256 * 2**20
"""The 100 MB job's max_result_bytes (default 64 MiB), and the host's mailbox_max_result_bytes."""
BIG_RESULT_ELEMENTS = 32 * 2**20
"""Its max_result_elements (the default is 16 Mi)."""
BIG_ORDER = ("live", "mail", "mail", "live")
"""The 100 MB job's rounds (each way once early, once late)."""
EXTRA_GOAL_SECONDS = 0.2
RSS_GOAL_RATIO = 1.5
SAMPLE_SECONDS = 0.02
HOST_NAME = "bench-jobs"
SCIENTIST = "bench-scientist"
MB = 1_000_000
MiB = 2**20
MAILBOX_ARGS = [
    "--mailbox-max-messages-per-recipient", "4000",
    "--mailbox-max-bytes-per-recipient", str(1024 * MiB),
    "--mailbox-max-messages-per-client", "4000",
    "--mailbox-max-bytes-per-client", str(1024 * MiB),
]  # fmt: skip


# -- the job and the plan --------------------------------------------------------------------


def column_sums(x):  # noqa: ANN001, ANN201 - pointers in, a pointer out (job and plan alike)
    return (x * 2.0).sum(dim=0)


def copy_of(x):  # noqa: ANN001, ANN201
    return x * 1.0


def small_table() -> Any:
    import torch

    return torch.arange(SMALL_SHAPE[0] * SMALL_SHAPE[1], dtype=torch.float32).reshape(SMALL_SHAPE)


# -- peer side -------------------------------------------------------------------------------


def warm() -> None:
    """Import what the peers need, so start-up is not timed."""
    import aiortc  # noqa: F401
    import torch  # noqa: F401

    import duet_p2p.connect_host  # noqa: F401
    import duet_p2p.duet  # noqa: F401
    import duet_p2p.scientist.jobs  # noqa: F401
    import duet_p2p.scientist.session  # noqa: F401
    from duet_p2p.runtime import get_runtime

    get_runtime()


class HostPeer(host_bench.HostPeer):
    """The standing host, jobs on."""

    def __init__(self) -> None:
        super().__init__()
        self.handler: Any = None

    def handlers(self) -> Handlers:
        return {"launch_host": self.launch, "accept_on": self.accept_on,
                "accept_off": self.accept_off, "trail": self.trail,
                "wait_state": self.wait_state, "wait_connected": self.wait_connected,
                "close_host": self.close}  # fmt: skip

    def launch(self, url: str, data_dir: str, client_id: str) -> dict[str, Any]:
        import torch

        import duet_p2p as sy

        identity = sy.Identity.load(HOST_NAME, directory=Path(data_dir) / "identities")
        # min_aggregation=1: the 100 MB output is a copy, row for row (a rule naming no
        # minimum releases only values summarising at least two records)
        rule = sy.ReleaseRule(outputs=frozenset({SMALL_OUT, BIG_OUT}), min_aggregation=1)
        policy = sy.JobPolicy(approve_clients=frozenset({client_id}), release=(rule,))
        settings = sy.JobSettings(policy=policy, mailbox_max_result_bytes=BIG_RESULT_BYTES)
        self.host = sy.launch_host(url, name=HOST_NAME, admit=[client_id], data_dir=data_dir,
                                   identity=identity, jobs=settings)  # fmt: skip
        self.host.send(small_table(), tags=[SMALL_TAG])
        self.host.send(torch.rand(BIG_ELEMENTS), tags=[BIG_TAG])
        return {"id": self.host.id, "key": identity.public_key.hex(), "pid": os.getpid()}

    def accept_on(self) -> None:
        """An accept handler for every request (the live rounds)."""
        self.handler = self.host.requests.add_handler("accept")

    def accept_off(self) -> None:
        if self.handler is not None:
            self.host.requests.remove_handler(self.handler)
        self.handler = None

    def trail(self, job_id: str) -> list[list[Any]]:
        """The job's trail: [state, at (time.time), reason], and "requested" (the audit
        log's ``job_run``: its session started and its outputs asked for; to the ms)."""
        import json
        from datetime import datetime

        rows = [[str(e.new), e.at, e.reason] for e in self.host._jobs.events(job_id)]
        with open(self.host.audit.path, encoding="utf-8") as f:
            for line in f:
                entry = json.loads(line)
                if entry.get("event") == "job_run" and entry.get("job_id") == job_id:
                    at = datetime.fromisoformat(entry["ts"]).timestamp()
                    rows.append(["requested", at, ""])
        return sorted(rows, key=lambda row: row[1])

    def wait_state(self, job_id: str, state: str, timeout: float = 120.0) -> list[list[Any]]:
        """Wait until the job is in ``state`` (or has passed through it); its trail."""
        deadline = time.monotonic() + timeout
        while True:
            trail = self.trail(job_id)
            if any(row[0] == state for row in trail):
                return trail
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not {state}: {trail}")
            time.sleep(0.01)


class ScientistPeer(DuetPeer):
    """The scientist: live rounds, jobs live and by mail, and collecting from the mailbox."""

    def handlers(self) -> Handlers:
        return {**super().handlers(), "warm": warm, "identity": self.identity,
                "join_host": self.join_host, "live_round": self.live_round,
                "job_round": self.job_round, "big_live": self.big_live,
                "submit_mail": self.submit_mail, "collect": self.collect}  # fmt: skip

    @staticmethod
    def identity() -> str:
        import duet_p2p as sy

        return sy.Identity.load(SCIENTIST).id

    def join_host(self, host_id: str, url: str) -> None:
        import duet_p2p as sy

        self.duet = sy.join_duet(host_id, url, identity=SCIENTIST)
        self.find(SMALL_TAG)

    def live_round(self) -> float:
        """``duet.plan(fn)``, ``plan(ptr).get()``: seconds."""
        import torch

        expected = (small_table() * 2.0).sum(dim=0)
        started = time.perf_counter()
        plan = self.duet.plan(column_sums)
        value = plan(self.objects[SMALL_TAG]).get(reason="benchmark", timeout_secs=60)
        seconds = time.perf_counter() - started
        if not torch.equal(value, expected):
            raise AssertionError(f"live: got {value}, expected {expected}")
        return seconds

    def job_round(self) -> dict[str, Any]:
        """``duet.submit(fn, ...).result()``: seconds, and when (time.time) it began,
        ``submit`` returned and ``result`` returned."""
        import torch

        expected = (small_table() * 2.0).sum(dim=0)
        began, started = time.time(), time.perf_counter()
        job = self.duet.submit(column_sums, inputs={"x": SMALL_TAG}, outputs=[SMALL_OUT],
                               reason="benchmark", max_seconds=60)  # fmt: skip
        submitted = time.time()
        result = job.result(timeout=60)
        seconds = time.perf_counter() - started
        if not torch.equal(result[SMALL_OUT], expected):
            raise AssertionError(f"job: got {result}, expected {expected}")
        return {"seconds": seconds, "job_id": job.job_id, "began": began,
                "submitted": submitted, "done": time.time()}  # fmt: skip

    def big_live(self) -> dict[str, Any]:
        """The 100 MB job, live: submit, result; RSS before and peak."""
        from benchmarks._peers import peak_rss_bytes, reset_peak_rss

        idle = reset_peak_rss()
        began = time.time()
        job = self.duet.submit(copy_of, inputs={"x": BIG_TAG}, outputs=[BIG_OUT],
                               reason="benchmark", max_seconds=120,
                               max_result_bytes=BIG_RESULT_BYTES,
                               max_result_elements=BIG_RESULT_ELEMENTS)  # fmt: skip
        result = job.result(timeout=300)
        done = time.time()
        _check_big(result)
        del result
        return {"job_id": job.job_id, "began": began, "done": done, "idle_rss": idle,
                "peak_rss": peak_rss_bytes()}  # fmt: skip

    def submit_mail(self, host_id: str, url: str, host_key: str) -> dict[str, Any]:
        """The 100 MB job through the mailbox (this process is not connected)."""
        import duet_p2p as sy

        began = time.time()
        job = sy.submit_job(host_id, copy_of, inputs={"x": BIG_TAG}, outputs=[BIG_OUT],
                            reason="benchmark", signaling_url=url, identity=SCIENTIST,
                            host_key=host_key, max_seconds=120,
                            max_result_bytes=BIG_RESULT_BYTES,
                            max_result_elements=BIG_RESULT_ELEMENTS)  # fmt: skip
        return {"job_id": job.job_id, "began": began, "submitted": time.time()}

    @staticmethod
    def collect(job_id: str) -> dict[str, Any]:
        """A fresh process: ``job.result()`` from the mailbox; RSS before and peak."""
        import duet_p2p as sy
        from benchmarks._peers import peak_rss_bytes, reset_peak_rss

        idle = reset_peak_rss()
        began, started = time.time(), time.perf_counter()
        result = sy.jobs(identity=SCIENTIST)[job_id].result(timeout=300)
        seconds = time.perf_counter() - started
        done = time.time()
        _check_big(result)
        del result
        return {"began": began, "done": done, "seconds": seconds, "idle_rss": idle,
                "peak_rss": peak_rss_bytes()}  # fmt: skip


def _check_big(result: dict[str, Any]) -> None:
    import torch

    value = result[BIG_OUT]
    if not isinstance(value, torch.Tensor) or value.numel() != BIG_ELEMENTS:
        raise AssertionError(f"the 100 MB result is {type(value).__name__}")
    if value.dtype != torch.float32 or not 0.0 <= float(value[:1000].mean()) <= 1.0:
        raise AssertionError("the 100 MB result is not the hosted tensor")


def host_peer() -> Handlers:
    return HostPeer().handlers()


def scientist_peer() -> Handlers:
    return ScientistPeer().handlers()


# -- memory ----------------------------------------------------------------------------------


def _status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes; (0, 0) if it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


class TreeSampler:
    """The host's process tree (its monitor, the fork server, the workers) every
    ``SAMPLE_SECONDS``: the sum of VmRSS and the monitor's, with the time; and each
    process's VmHWM (reset at the start, so a spike between two samples still counts)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int, int]] = []
        self.hwm: dict[int, int] = {}
        self.first: dict[int, int] = {}
        """Each process's VmRSS when first seen."""
        self.names: dict[int, str] = {}
        self.idle = self.monitor_idle = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _tree(self) -> list[tuple[int, str]]:
        """(pid, role) of the monitor and its descendants."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            found = [(self.pid, "monitor")]
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    found.append((child.pid, "fork server" if child.ppid() == self.pid
                                  else "worker"))  # fmt: skip
            return found
        except psutil.NoSuchProcess:
            return []

    def __enter__(self) -> TreeSampler:
        tree = self._tree()
        for pid, _ in tree:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        self.monitor_idle = _status(self.pid)[0]
        self.idle = sum(_status(pid)[0] for pid, _ in tree)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid, role in self._tree():
                rss, hwm = _status(pid)
                total += rss
                self.hwm[pid] = max(self.hwm.get(pid, 0), hwm)
                if pid not in self.first:
                    self.first[pid], self.names[pid] = rss, role
            self.samples.append((time.time(), total, _status(self.pid)[0]))
            self._stop.wait(SAMPLE_SECONDS)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _peak(self, column: int, since: float = 0.0, until: float = float("inf")) -> int:
        return max((row[column] for row in self.samples if since <= row[0] < until), default=0)

    def _trough(self, column: int, since: float) -> int:
        return min((row[column] for row in self.samples if since <= row[0]), default=0)

    def summary(self, released_at: float) -> dict[str, Any]:
        """Peaks over the whole job; the monitor's until the release (run and settle) and
        from it on (the delivery: its peak over its lowest, once the settle's buffers are
        freed); each process's VmHWM."""
        return {
            "idle_rss": self.idle,
            "peak_rss": self._peak(1),
            "monitor_idle_rss": self.monitor_idle,
            "monitor_peak_before_release": self._peak(2, until=released_at),
            "monitor_low_from_release": self._trough(2, released_at),
            "monitor_peak_from_release": self._peak(2, released_at),
            "hwm_sum": sum(self.hwm.values()),
            "samples": len(self.samples),
            "processes": [{"pid": pid, "role": self.names.get(pid, "?"),
                           "first_rss": self.first.get(pid, 0), "hwm": hwm}
                          for pid, hwm in self.hwm.items()],
        }  # fmt: skip


# -- coordinator -----------------------------------------------------------------------------


class Processes:
    """The host, the scientist, and a fresh collector per mailbox round (the scientist's
    DUET_HOME: its identity and job book); all stopped on exit."""

    def __init__(self, home: Path) -> None:
        self.host_home, self.scientist_home = home / "host", home / "scientist"
        for folder in (self.host_home, self.scientist_home):
            folder.mkdir(mode=0o700)
        self.started: list[Peer] = []
        self.host = self._start("host", "host", self.host_home)
        self.scientist = self._start("scientist", "scientist", self.scientist_home)

    def _start(self, factory: str, name: str, home: Path) -> Peer:
        peer = Peer(f"benchmarks.jobs:{factory}_peer", name, env={"DUET_HOME": str(home)})
        self.started.append(peer)
        return peer

    def collector(self) -> Peer:
        """A new scientist process, imports done."""
        peer = self._start("scientist", f"collector {len(self.started) - 1}",
                           self.scientist_home)  # fmt: skip
        peer.call("warm", timeout=180)
        return peer

    def close(self, failed: bool) -> None:
        if failed:  # the other side of a failure is often in another log
            for peer in self.started:
                print(f"--- log of {peer.name} ---", *peer.log[-15:], sep="\n", file=sys.stderr)
        for peer in reversed(self.started):
            peer.close()


@contextlib.contextmanager
def _processes(home: Path) -> Iterator[Processes]:
    procs = Processes(home)
    failed = True
    try:
        yield procs
        failed = False
    finally:
        procs.close(failed)


def _at(trail: list[list[Any]], state: str) -> float:
    found = [row[1] for row in trail if row[0] == state]
    if not found:
        raise PeerFailed(f"the job never was {state}: {trail}")
    return float(found[0])


PHASES = (
    ("submit", None, "submitted"),
    ("review", "submitted", "queued"),
    ("start", "queued", "requested"),
    ("run", "requested", "finished"),
    ("to_review", "finished", "pending_output_review"),
    ("release", "pending_output_review", "released"),
    ("fetch", "released", "delivered"),
    ("verify", "delivered", None),
)
"""Where a job's time goes: (name, from, to); None: the scientist's clock. "requested" is
the audit log's job_run (the job's session started, its outputs asked for)."""


def _phases(round_: dict[str, Any], trail: list[list[Any]]) -> dict[str, float]:
    out = {}
    for name, first, last in PHASES:
        begin = round_["began"] if first is None else _at(trail, first)
        end = round_["done"] if last is None else _at(trail, last)
        out[name] = end - begin
    return out


def _latency(host: Peer, scientist: Peer) -> dict[str, Any]:
    """Live plan rounds against job rounds, interleaved."""
    live, jobs, phases = [], [], []
    for round_ in range(WARMUP + ROUNDS):
        host.call("accept_on")
        live_s = scientist.call("live_round")
        host.call("accept_off")
        job = scientist.call("job_round")
        if round_ < WARMUP:
            continue
        live.append(live_s)
        jobs.append(job["seconds"])
        phases.append(_phases(job, host.call("trail", job_id=job["job_id"])))
    live_s, job_s = median(live), median(jobs)
    extra = job_s - live_s
    return {
        "rounds": ROUNDS,
        "live_s": live_s,
        "job_s": job_s,
        "extra_s": extra,
        "ratio": job_s / live_s,
        "live_all_s": live,
        "job_all_s": jobs,
        "phases_s": {name: median([p[name] for p in phases]) for name, _, _ in PHASES},
        "goal_extra_s": EXTRA_GOAL_SECONDS,
        "goal_met": extra <= EXTRA_GOAL_SECONDS,
    }


def _big_live(procs: Processes, pid: int) -> dict[str, Any]:
    host, scientist = procs.host, procs.scientist
    with TreeSampler(pid) as sampler:
        run = scientist.call("big_live", timeout=400)
        trail = host.call("wait_state", job_id=run["job_id"], state="delivered")
    released = _at(trail, "released")
    return {
        **_delivery(run["began"], released, run["done"], trail),
        "host": sampler.summary(released),
        "scientist": {"idle_rss": run["idle_rss"], "peak_rss": run["peak_rss"]},
    }


def _big_mail(procs: Processes, pid: int, ids: dict[str, Any], url: str) -> dict[str, Any]:
    host, scientist = procs.host, procs.scientist
    collector = procs.collector()
    with TreeSampler(pid) as sampler:
        sent = scientist.call("submit_mail", host_id=ids["id"], url=url, host_key=ids["key"])
        trail = host.call("wait_state", job_id=sent["job_id"], state="delivered", timeout=400)
        got = collector.call("collect", job_id=sent["job_id"], timeout=400)
    collector.close()
    released = _at(trail, "released")
    mailed = _at(trail, "delivered")
    return {
        **_delivery(sent["began"], released, got["done"], trail),
        "host_mail_s": mailed - released,
        "collect_s": got["seconds"],
        "host": sampler.summary(released),
        "scientist": {"idle_rss": got["idle_rss"], "peak_rss": got["peak_rss"]},
    }


def _delivery(began: float, released: float, done: float,
              trail: list[list[Any]]) -> dict[str, Any]:  # fmt: skip
    seconds = done - released
    return {"began": began, "submit_to_release_s": released - began,
            "release_to_result_s": seconds, "mb_s": BIG_ELEMENTS * 4 / MB / seconds,
            "trail": [[state, at - began] for state, at, _ in trail]}  # fmt: skip


def _way(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One way's rounds: times by median, memory above idle at its worst."""
    host = [r["host"] for r in runs]
    sci = [r["scientist"] for r in runs]
    out = {
        "rounds": runs,
        "release_to_result_s": median([r["release_to_result_s"] for r in runs]),
        "submit_to_release_s": median([r["submit_to_release_s"] for r in runs]),
        "host_above_idle": max(h["peak_rss"] - h["idle_rss"] for h in host),
        "host_peak": max(h["peak_rss"] for h in host),
        "monitor_run_above_idle": max(
            h["monitor_peak_before_release"] - h["monitor_idle_rss"] for h in host
        ),
        "monitor_delivery": max(
            h["monitor_peak_from_release"] - h["monitor_low_from_release"] for h in host
        ),
        "scientist_above_idle": max(s["peak_rss"] - s["idle_rss"] for s in sci),
        "scientist_peak": max(s["peak_rss"] for s in sci),
    }
    out["mb_s"] = BIG_ELEMENTS * 4 / MB / out["release_to_result_s"]
    if "host_mail_s" in runs[0]:
        out["host_mail_s"] = median([r["host_mail_s"] for r in runs])
        out["collect_s"] = median([r["collect_s"] for r in runs])
    return out


def _big(procs: Processes, ids: dict[str, Any], url: str) -> tuple[dict, dict, list[int]]:
    """The 100 MB job live and by mail, in the order BIG_ORDER; also the monitor's idle RSS
    before each."""
    host, scientist = procs.host, procs.scientist
    runs: dict[str, list[dict[str, Any]]] = {"live": [], "mail": []}
    connected = True
    idle = []
    for way in BIG_ORDER:
        if way == "live" and not connected:
            scientist.call("join_host", host_id=ids["id"], url=url)
            host.call("wait_connected", count=1)
        elif way == "mail" and connected:
            scientist.call("close")
            host.call("wait_connected", count=0)
        connected = way == "live"
        runs[way].append(_big_live(procs, ids["pid"]) if connected
                         else _big_mail(procs, ids["pid"], ids, url))  # fmt: skip
        idle.append(runs[way][-1]["host"]["monitor_idle_rss"])
    return _way(runs["live"]), _way(runs["mail"]), idle


def run_benchmark() -> dict[str, Any]:
    load_start = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="duet-bench-jobs-") as home,
        signaling_server(*MAILBOX_ARGS) as url,
        _processes(Path(home)) as procs,
    ):
        host, scientist = procs.host, procs.scientist
        scientist.call("warm", timeout=180)
        client_id = scientist.call("identity")
        ids = host.call("launch_host", url=url, data_dir=str(procs.host_home),
                        client_id=client_id, timeout=180)  # fmt: skip
        scientist.call("join_host", host_id=ids["id"], url=url)
        host.call("wait_connected", count=1)
        latency = _latency(host, scientist)
        live, mail, idle = _big(procs, ids, url)
        host.call("close_host")
    ratios = {
        "host": mail["host_above_idle"] / live["host_above_idle"],
        "host_delivery": mail["monitor_delivery"] / live["monitor_delivery"],
        "scientist": mail["scientist_above_idle"] / live["scientist_above_idle"],
    }
    return {
        "latency": latency,
        "big_bytes": BIG_ELEMENTS * 4,
        "big_live": live,
        "big_mail": mail,
        "monitor_idle_before_each": idle,
        "time_ratio": mail["release_to_result_s"] / live["release_to_result_s"],
        "rss_ratio_above_idle": ratios,
        "rss_goal_ratio": RSS_GOAL_RATIO,
        "rss_goal_met": all(ratio <= RSS_GOAL_RATIO for ratio in ratios.values()),
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }


# -- reporting -------------------------------------------------------------------------------


def _met(flag: Any) -> str:
    return {True: "yes", False: "**no**"}.get(flag, "—")


def rows(r: dict[str, Any]) -> list[list[str]]:
    """[what, duet_p2p, baseline, ratio, goal, met] per line of the table."""
    if "latency" not in r:
        return []
    lat, live, mail, ratio = r["latency"], r["big_live"], r["big_mail"], r["rss_ratio_above_idle"]
    size, n = r["big_bytes"] // MB, len(live["rounds"])
    goal = f"<= {r['rss_goal_ratio']:g}x live"
    host_met = max(ratio["host"], ratio["host_delivery"]) <= r["rss_goal_ratio"]
    return [
        [f"9. Jobs: `duet.submit(fn).result()`, small plan, host online (median of "
         f"{lat['rounds']})",
         f"{lat['job_s'] * 1e3:.0f} ms (+{lat['extra_s'] * 1e3:.0f} ms)",
         f"live `duet.plan(fn)(ptr).get()` {lat['live_s'] * 1e3:.0f} ms",
         f"{lat['ratio']:.0f}x time", f"+<= {lat['goal_extra_s'] * 1e3:.0f} ms",
         _met(lat["goal_met"])],
        [f"9. Jobs: {size} MB result, release to verified result, mailbox to a fresh process "
         f"(median of {n})",
         f"{mail['release_to_result_s']:.1f} s ({mail['mb_s']:.1f} MB/s)",
         f"live channel {live['release_to_result_s']:.1f} s ({live['mb_s']:.1f} MB/s)",
         f"{r['time_ratio']:.2f}x time", "—", "—"],
        [f"9. Jobs: {size} MB result, host peak RSS above idle, process tree (worst of {n})",
         f"mailbox {mail['host_above_idle'] / MB:.0f} MB (delivery: monitor "
         f"+{mail['monitor_delivery'] / MB:.0f} MB)",
         f"live {live['host_above_idle'] / MB:.0f} MB (delivery: monitor "
         f"+{live['monitor_delivery'] / MB:.0f} MB)",
         f"{ratio['host']:.2f}x ({ratio['host_delivery']:.2f}x)", goal, _met(host_met)],
        [f"9. Jobs: {size} MB result, scientist peak RSS above idle (worst of {n})",
         f"mailbox {mail['scientist_above_idle'] / MB:.0f} MB (peak "
         f"{mail['scientist_peak'] / MB:.0f} MB)",
         f"live {live['scientist_above_idle'] / MB:.0f} MB (peak "
         f"{live['scientist_peak'] / MB:.0f} MB)",
         f"{ratio['scientist']:.2f}x", goal, _met(ratio["scientist"] <= r["rss_goal_ratio"])],
    ]  # fmt: skip


def markdown_section(r: dict[str, Any]) -> str:
    """The offline jobs' section of BENCHMARKS.md."""
    title = "## Offline jobs (benchmarks/jobs.py)\n\n"
    if "latency" not in r:
        return title + "Not measured in this run.\n"
    lat, live, mail = r["latency"], r["big_live"], r["big_mail"]
    la0 = ", ".join(f"{x:.1f}" for x in r["load_average"]["start"])
    la1 = ", ".join(f"{x:.1f}" for x in r["load_average"]["end"])
    lines = [
        "| Measurement | Offline job | Baseline, same run | Ratio | Goal | Met |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows(r)),
    ]
    intro = (
        "One run of `python -m benchmarks.jobs` (also part of `make bench`): a standing host "
        "whose job policy auto-approves the scientist and whose release rule covers the "
        "outputs, a scientist with an identity, fresh scientist processes for the mailbox, a "
        "signaling server with its mailbox, WebRTC on loopback. Load average at start "
        f"{la0}, at end {la1}."
    )
    phases = ", ".join(f"{name} {seconds * 1e3:.0f} ms"
                       for name, seconds in lat["phases_s"].items())  # fmt: skip
    latency = (
        "Latency: one job at a time, nothing else queued; the live baseline defines the "
        "plan, runs it and gets the result, an accept handler on (off during the jobs, "
        "whose output the release rule releases). Where a job's time goes (medians, from "
        f"the host's trail): {phases}. Jobs: "
        f"{', '.join(f'{x * 1e3:.0f}' for x in lat['job_all_s'])} ms; live: "
        f"{', '.join(f'{x * 1e3:.0f}' for x in lat['live_all_s'])} ms."
    )
    size = r["big_bytes"] // MB
    big = (
        f"{size} MB result (`x * 1.0` of a hosted float32 tensor), in the order "
        f"{', '.join(BIG_ORDER)}: submit to release took {live['submit_to_release_s']:.1f} s "
        f"live and {mail['submit_to_release_s']:.1f} s by mail. Through the mailbox the host "
        f"sealed and posted it in {mail['host_mail_s']:.1f} s, and the fresh process's "
        f"`job.result()` took {mail['collect_s']:.1f} s. Host memory: the sum of VmRSS over "
        f"its process tree (monitor, fork server, workers; shared pages count in each), "
        f"sampled every {SAMPLE_SECONDS * 1e3:.0f} ms. The monitor alone, until the release "
        f"(run and settle): {live['monitor_run_above_idle'] / MB:.0f} MB above idle live, "
        f"{mail['monitor_run_above_idle'] / MB:.0f} MB by mail; the delivery alone (its peak "
        f"after the release over its lowest): {live['monitor_delivery'] / MB:.0f} MB live, "
        f"{mail['monitor_delivery'] / MB:.0f} MB by mail. Its idle RSS before each job: "
        f"{', '.join(f'{x / MB:.0f}' for x in r['monitor_idle_before_each'])} MB. "
        "Scientist: VmHWM of its process."
    )
    paragraphs = [intro, "\n".join(lines), latency, big]
    return (
        title
        + "\n\n".join(
            p if p.startswith("|") else textwrap.fill(p, 90, break_on_hyphens=False)
            for p in paragraphs
        )
        + "\n"
    )


def main() -> int:
    return print_standalone(run_benchmark(), rows, markdown_section)


if __name__ == "__main__":
    sys.exit(main())
