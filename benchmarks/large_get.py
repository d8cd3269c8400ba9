"""`make bench-large`: a 1000 MB get against raw aiortc, then a 3 GiB tensor get.

PySyft 0.5 could not move 2 GB at all. Here the 3 GiB value crosses in 64 KiB frames
under the credit window; the time and each side's peak RSS above idle are printed.
Takes about five minutes on a quiet two-core machine (aiortc's pure-Python SCTP moves
15-30 MiB/s on loopback), and needs ~10 GB of free memory (the owner holds the tensor and
its snapshot, the scientist the received copy). Writes benchmarks/results_large.json,
which `make bench` puts into BENCHMARKS.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks import gets
from benchmarks._peers import connect_duet, disconnect_duet, peers, signaling_server

LARGE_BYTES = 3 * 1024**3
GIB = 1024**3


def three_gib_get(nbytes: int = LARGE_BYTES) -> dict[str, Any]:
    """One get of a ``nbytes`` float32 tensor between two processes; time and peak RSS."""
    with (
        signaling_server() as url,
        peers(("benchmarks.gets:peer", "owner"), ("benchmarks.gets:peer", "scientist")) as (
            owner,
            scientist,
        ),
    ):
        connect_duet(owner, scientist, url)
        owner.call("accept_all")
        started = time.perf_counter()
        owner.call("host", tag="large", nbytes=nbytes, timeout=600)
        hosted = time.perf_counter() - started
        scientist.call("find", tag="large")
        measured = gets.timed_get(owner, scientist, "large", nbytes, rss=True)
        scientist.call("drop", tag="large", pointer=True)
        disconnect_duet(owner, scientist)
    seconds = measured.pop("seconds")
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "mib_s": nbytes / seconds / 2**20,
        "host_seconds": hosted,
        **measured,
    }


def run_benchmark() -> dict[str, Any]:
    return {
        "get_1000mb": gets.run_benchmark(sizes=((1000 * gets.MB, 1),))["rows"][0],
        "get_3gib": three_gib_get(),
    }


def main() -> None:
    result = run_benchmark()
    row = result["get_1000mb"]
    print(
        f"1000 MB get: {row['get_s']:.1f} s ({row['get_mib_s']:.2f} MiB/s); raw aiortc "
        f"{row['raw_s']:.1f} s ({row['raw_mib_s']:.2f} MiB/s); ratio {row['ratio']:.2f}"
    )
    big = result["get_3gib"]
    print(
        f"3 GiB get: transferred in {big['seconds']:.1f} s ({big['mib_s']:.2f} MiB/s); "
        f"peak RSS above idle: owner {big['owner_peak_above_idle_bytes'] / GIB:.2f} GiB "
        f"({big['owner_peak_ratio']:.2f}x), scientist "
        f"{big['scientist_peak_above_idle_bytes'] / GIB:.2f} GiB "
        f"({big['scientist_peak_ratio']:.2f}x the payload)"
    )
    out = Path(__file__).resolve().parent / "results_large.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
