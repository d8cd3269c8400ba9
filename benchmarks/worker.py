"""How long a session's worker process takes to be ready, against spawning a fresh one.

The first worker in a process starts the fork server (a fresh interpreter importing
torch) while the owner waits for the scientist; every later worker, and every replacement
of a stopped one, is a fork of it. Measured in a child process, so "first" is really
first; the baseline is what spawning a worker per session would cost: a fresh interpreter
importing torch.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

ROUNDS = 7
GOAL_SECONDS = 0.5


async def _measure() -> dict[str, Any]:
    from duet_p2p.allowlist import DEFAULT_ALLOWLIST
    from duet_p2p.limits import OwnerLimits
    from duet_p2p.owner.session import new_supervisor

    limits = OwnerLimits()
    started = time.perf_counter()
    first = new_supervisor(DEFAULT_ALLOWLIST, limits)
    await first.start()
    cold = time.perf_counter() - started
    warm = []
    for _ in range(ROUNDS):
        supervisor = new_supervisor(DEFAULT_ALLOWLIST, limits)
        started = time.perf_counter()
        await supervisor.start()
        warm.append(time.perf_counter() - started)
        await supervisor.close()
    await first.close()
    return {"cold_s": cold, "warm_samples": warm, "sandbox": first.sandbox}


def _spawn_seconds() -> float:
    samples = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def run_benchmark() -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", "--child"],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["warm_s"] = statistics.median(result["warm_samples"])
    result["spawn_s"] = _spawn_seconds()
    result["rounds"] = ROUNDS
    result["goal_met"] = result["warm_s"] <= GOAL_SECONDS
    return result


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(asyncio.run(_measure())))
    else:
        print(json.dumps(run_benchmark(), indent=2))
