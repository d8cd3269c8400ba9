"""A standing host: connect time, many scientists at once, and memory per scientist.

One run, all on loopback with a real signaling server and real WebRTC. Processes: the host
(``sy.launch_host(admit="any")``, a small private tensor and an accept handler), a one-off
owner (``sy.launch_duet``, the baseline of the connect time), and ``SCIENTISTS`` scientist
processes, each with an identity of its own (``join_duet(host.id, identity=...)``).

1. Connect: the scientist's ``join_duet(host.id, ...)`` from its call to its return (Hello
   exchanged), against the one-off ``join_duet(duet_id)`` with the owner already waiting
   (its Client ID passed on by the coordinator at once), interleaved, ``CONNECT_ROUNDS`` of
   each (median). Each scientist closes before the next round.
2. Load: every scientist runs ``(ptr + 1).sum().get()`` ``LOAD_ROUNDS`` times, all
   starting at the same instant; aggregate round trips per second and the p50/p99 of every
   round trip pooled. Baseline: one scientist alone, same loop, same run.
3. Memory: USS and PSS (psutil) summed over the host process and all its descendants (the
   worker fork server, a spare worker and one worker per scientist), with no scientist
   connected and with ``IDLE`` then ``SCIENTISTS`` idle scientists connected:
   (total_N - total_0) / N. Also after the load, with every scientist's worker used.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._peers import (
    DuetPeer,
    Handlers,
    Peer,
    connect_duet,
    disconnect_duet,
    median,
    signaling_server,
)

CONNECT_ROUNDS = 7
SCIENTISTS = 8
IDLE = 4
LOAD_ROUNDS = 250
LOAD_WARMUP = 20
TAG = "numbers"
ELEMENTS = 100
CONNECT_GOAL_RATIO = 1.5
P99_GOAL_SECONDS = 0.010
MEMORY_GOAL_BYTES = 30 * 2**20
SETTLE_SECONDS = 1.5
MiB = 2**20


# -- peer side -------------------------------------------------------------------------------


def warm() -> None:
    """Import what a join needs, so process start-up is not timed."""
    import torch  # noqa: F401

    import duet_p2p  # noqa: F401
    from duet_p2p.runtime import get_runtime

    get_runtime()


class HostPeer:
    """The standing host's process."""

    def __init__(self) -> None:
        self.host: Any = None

    def handlers(self) -> Handlers:
        return {"launch_host": self.launch, "wait_connected": self.wait_connected,
                "close_host": self.close}  # fmt: skip

    def launch(self, url: str, data_dir: str, tag: str, elements: int) -> dict[str, Any]:
        """launch_host with open admission, a private tensor under ``tag``, accept all."""
        import os

        import torch

        import duet_p2p as sy

        self.host = sy.launch_host(url, name="bench", admit="any", data_dir=data_dir,
                                   max_scientists=2 * SCIENTISTS)  # fmt: skip
        self.host.send(torch.arange(elements, dtype=torch.float32), tags=[tag])
        self.host.requests.add_handler("accept")
        return {"id": self.host.id, "pid": os.getpid()}

    def wait_connected(self, count: int, timeout: float = 30.0) -> list[str]:
        """Wait until exactly ``count`` scientists are connected; their Client IDs."""
        deadline = time.monotonic() + timeout
        while len(self.host.connected()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.host.connected())} connected, expected {count}")
            time.sleep(0.02)
        return self.host.connected()

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
        self.host = None


class ScientistPeer(DuetPeer):
    """A scientist: joins the host (or a one-off Duet) and runs op + get round trips."""

    def handlers(self) -> Handlers:
        return {**super().handlers(), "warm": warm, "join_host": self.join_host,
                "load": self.load}  # fmt: skip

    def join_host(self, host_id: str, url: str, identity: str) -> dict[str, float]:
        """join_duet(host.id), timed from the call to its return."""
        import duet_p2p as sy

        started = time.perf_counter()
        self.duet = sy.join_duet(host_id, url, identity=identity)
        joined = time.perf_counter() - started
        return {"join_s": joined, "open_s": self.duet._connection.connect_seconds}

    def load(self, tag: str, rounds: int, start_at: float | None = None) -> dict[str, Any]:
        """``(ptr + 1).sum().get()`` ``rounds`` times from ``start_at`` (time.monotonic,
        shared by every process on the machine); each round trip's seconds."""
        pointer = self.objects[tag]
        expected = float(sum(range(1, ELEMENTS + 1)))
        if start_at is not None:
            time.sleep(max(0.0, start_at - time.monotonic()))
        began = time.monotonic()
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            value = (pointer + 1).sum().get(reason="benchmark", timeout_secs=30)
            times.append(time.perf_counter() - started)
            if float(value) != expected:
                raise AssertionError(f"got {float(value)}, expected {expected}")
        return {"times": times, "began": began, "ended": time.monotonic()}


def host_peer() -> Handlers:
    return HostPeer().handlers()


def scientist_peer() -> Handlers:
    return ScientistPeer().handlers()


def owner_peer() -> Handlers:
    return {**DuetPeer().handlers(), "warm": warm}


# -- coordinator side ------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def host_memory(pid: int) -> dict[str, Any]:
    """USS, PSS and RSS summed over process ``pid`` and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    total = {"uss": 0, "pss": 0, "rss": 0, "processes": 0}
    per_process = []
    for proc in processes:
        try:
            info = proc.memory_full_info()
            name = " ".join(proc.cmdline()[1:3])[:60]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total["uss"] += info.uss
        total["pss"] += info.pss
        total["rss"] += info.rss
        total["processes"] += 1
        per_process.append({"pid": proc.pid, "cmd": name, "uss": info.uss, "pss": info.pss})
    total["per_process"] = per_process
    return total


def _settled_memory(pid: int, processes: int, timeout: float = 20.0) -> dict[str, Any]:
    """host_memory once ``processes`` processes exist (workers come and go) and after a
    short settling pause."""
    deadline = time.monotonic() + timeout
    while True:
        reading = host_memory(pid)
        if reading["processes"] == processes or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(SETTLE_SECONDS)
    return host_memory(pid)


@contextlib.contextmanager
def _processes(home: str) -> Iterator[tuple[Peer, Peer, list[Peer]]]:
    """The host, a one-off owner and the scientists, all with DUET_HOME ``home``."""
    env = {"DUET_HOME": home}
    started: list[Peer] = []
    try:
        host = Peer("benchmarks.host:host_peer", "host", env=env)
        started.append(host)
        owner = Peer("benchmarks.host:owner_peer", "one-off owner", env=env)
        started.append(owner)
        scientists = []
        for i in range(SCIENTISTS):
            scientists.append(Peer("benchmarks.host:scientist_peer", f"scientist {i}", env=env))
            started.append(scientists[-1])
        yield host, owner, scientists
    except BaseException:
        for peer in started:  # the other side of a failure is often in another log
            print(f"--- log of {peer.name} ---", *peer.log[-15:], sep="\n", file=sys.stderr)
        raise
    finally:
        for peer in reversed(started):
            peer.close()


def _load(scientists: list[Peer]) -> dict[str, Any]:
    """Every scientist in ``scientists`` runs the loop from the same instant."""
    for s in scientists:
        s.call("load", tag=TAG, rounds=LOAD_WARMUP)
    start_at = time.monotonic() + 0.5
    for s in scientists:
        s.send("load", tag=TAG, rounds=LOAD_ROUNDS, start_at=start_at)
    runs = [s.result(timeout=300) for s in scientists]
    times = [t for run in runs for t in run["times"]]
    span = max(r["ended"] for r in runs) - min(r["began"] for r in runs)
    return {
        "scientists": len(scientists),
        "round_trips": len(times),
        "seconds": span,
        "round_trips_per_s": len(times) / span,
        "p50_s": percentile(times, 50),
        "p99_s": percentile(times, 99),
        "max_s": max(times),
        "mean_s": statistics.fmean(times),
    }


def _connect(host: Peer, host_id: str, owner: Peer, scientist: Peer, url: str) -> dict:
    """Joins to the standing host against one-off joins, interleaved (one warm-up each)."""
    host_joins, host_opens, oneoff_joins, oneoff_opens = [], [], [], []
    for round_ in range(CONNECT_ROUNDS + 1):
        timing = scientist.call("join_host", host_id=host_id, url=url, identity="s0")
        host.call("wait_connected", count=1)
        scientist.call("close")
        host.call("wait_connected", count=0)
        oneoff = connect_duet(owner, scientist, url)
        disconnect_duet(owner, scientist)
        if round_ == 0:
            continue
        host_joins.append(timing["join_s"])
        host_opens.append(timing["open_s"])
        oneoff_joins.append(oneoff["join_s"])
        oneoff_opens.append(oneoff["open_s"])
    host_s, oneoff_s = median(host_joins), median(oneoff_joins)
    return {
        "rounds": CONNECT_ROUNDS,
        "host_join_s": host_s,
        "host_open_s": median(host_opens),
        "oneoff_join_s": oneoff_s,
        "oneoff_open_s": median(oneoff_opens),
        "ratio": host_s / oneoff_s,
        "host_join_all_s": host_joins,
        "oneoff_join_all_s": oneoff_joins,
        "goal_ratio": CONNECT_GOAL_RATIO,
        "goal_met": host_s / oneoff_s <= CONNECT_GOAL_RATIO,
    }


def _per_scientist(base: dict[str, Any], now: dict[str, Any], count: int) -> dict[str, Any]:
    return {
        "scientists": count,
        "total_uss": now["uss"],
        "total_pss": now["pss"],
        "processes": now["processes"],
        "uss_per_scientist": (now["uss"] - base["uss"]) / count,
        "pss_per_scientist": (now["pss"] - base["pss"]) / count,
    }


def run_benchmark() -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="duet-bench-host-") as home,
        signaling_server() as url,
        _processes(home) as (host, owner, scientists),
    ):
        for peer in [owner, *scientists]:
            peer.send("warm")
        launched = host.call("launch_host", url=url, data_dir=str(Path(home) / "host"),
                             tag=TAG, elements=ELEMENTS)  # fmt: skip
        for peer in [owner, *scientists]:
            peer.result(120)
        host_id, pid = launched["id"], launched["pid"]
        connect = _connect(host, host_id, owner, scientists[0], url)

        # memory: nobody connected, then IDLE, then every scientist, idle
        base_processes = host_memory(pid)["processes"]
        base = _settled_memory(pid, base_processes)
        memory: dict[str, Any] = {"base": base}
        connected = 0
        for count in (IDLE, SCIENTISTS):
            for i in range(connected, count):
                scientists[i].call("join_host", host_id=host_id, url=url, identity=f"s{i}")
            connected = count
            host.call("wait_connected", count=count)
            now = _settled_memory(pid, base_processes + count)
            memory[f"idle_{count}"] = {**_per_scientist(base, now, count),
                                       "per_process": now["per_process"]}  # fmt: skip

        # load: one scientist alone (the others connected, idle), then all at once
        for s in scientists:
            s.call("find", tag=TAG)
        single = _load(scientists[:1])
        many = _load(scientists)
        after = _settled_memory(pid, base_processes + SCIENTISTS)
        memory["used_all"] = _per_scientist(base, after, SCIENTISTS)
        for s in scientists:
            s.call("close")
        host.call("wait_connected", count=0)
        host.call("close_host")
    idle = memory[f"idle_{SCIENTISTS}"]
    return {
        "connect": connect,
        "load_single": single,
        "load_many": many,
        "load_goal_p99_s": P99_GOAL_SECONDS,
        "load_goal_met": many["p99_s"] <= P99_GOAL_SECONDS,
        "memory": memory,
        "memory_goal_bytes": MEMORY_GOAL_BYTES,
        "memory_goal_met": max(idle["uss_per_scientist"], memory[f"idle_{IDLE}"]["uss_per_scientist"])
        <= MEMORY_GOAL_BYTES,
    }



if __name__ == "__main__":
    import json

    print(json.dumps(run_benchmark(), indent=2, default=str))
