"""`make bench`: every benchmark, a table on stdout, benchmarks/results.json and BENCHMARKS.md.

Each benchmark starts its own peer processes (two, on loopback; the standing host's, ten)
and measures its baseline in the same run. The training benchmark (benchmarks/training.py)
is included when present.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.json"
RESULTS_LARGE = HERE / "results_large.json"
REPORT = ROOT / "BENCHMARKS.md"
MB = 1_000_000


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "")
    except OSError:
        pass
    versions = {}
    for name in ("aiortc", "aioice", "torch", "uvloop", "pydantic", "cryptography"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _run(name: str, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"-- {name} ...", flush=True)
    started = time.perf_counter()
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001 - one failed benchmark must not hide the others
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}
    result["benchmark_seconds"] = time.perf_counter() - started
    print(f"   done in {result['benchmark_seconds']:.0f} s", flush=True)
    return result


def _training() -> dict[str, Any] | None:
    """benchmarks/training.py's run(), if that module exists."""
    try:
        module = importlib.import_module("benchmarks.training")
    except ImportError:
        return None
    run = getattr(module, "run", None)
    return run() if callable(run) else None


def run_all() -> dict[str, Any]:
    from benchmarks import channel, connect, dp, gets, host, jobs, ops, registry, worker

    results: dict[str, Any] = {"machine": _machine()}
    results["connect"] = _run("connect", connect.run_benchmark)
    results["worker"] = _run("worker", worker.run_benchmark)
    results["channel"] = _run("channel", channel.run_benchmark)
    results["ops"] = _run("ops", ops.run_benchmark)
    results["gets"] = _run("gets", gets.run_benchmark)
    results["dp"] = _run("dp", dp.run_benchmark)
    results["host"] = _run("host", host.run_benchmark)
    results["jobs"] = _run("jobs", jobs.run_benchmark)
    results["registry"] = _run("registry", registry.run_benchmark)
    training = _run("training", lambda: _training() or {"skipped": "no benchmarks/training.py"})
    results["training"] = training
    results["machine"]["load_average_at_end"] = os.getloadavg()
    return results


# -- the table --------------------------------------------------------------------------------


def _f(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "—"


def _met(flag: Any) -> str:
    return {True: "yes", False: "**no**"}.get(flag, "—")


def rows(results: dict[str, Any]) -> list[list[str]]:
    """[what, duet_p2p, baseline, ratio, goal, met, PySyft 0.5] per line of the table."""
    out: list[list[str]] = []
    c = results.get("connect", {})
    if "join_s" in c:
        out.append([
            f"1. Connect: `join_duet()` call to open session (median of {c['rounds']})",
            f"{c['join_s'] * 1e3:.0f} ms (channel open {c['open_s'] * 1e3:.0f} ms)",
            f"raw aiortc setup {c['raw_s'] * 1e3:.0f} ms",
            f"{c['ratio']:.2f}x time", "<= 250 ms", _met(c["goal_met"]),
            "join 1.70 s, both connected 3.10 s",
        ])  # fmt: skip
    w = results.get("worker", {})
    if "warm_s" in w:
        out.append([
            f"1. Worker start: forked by the fork server, confined, ready (median of {w['rounds']})",
            f"{w['warm_s'] * 1e3:.0f} ms (first in a process {w['cold_s']:.2f} s, during "
            "the connection setup)",
            f"spawning one: python -c 'import torch' {w['spawn_s']:.2f} s",
            f"{w['warm_s'] / w['spawn_s']:.2f}x time", "<= 0.5 s", _met(w["goal_met"]), "—",
        ])  # fmt: skip
    ch = results.get("channel", {})
    if "raw" in ch:
        raw, ours = ch["raw"], ch["ours"]
        out.append([
            "2. Channel round trip (16 B echo, median of 300)",
            f"{ours['rtt_ms']:.2f} ms", f"plain aiortc {raw['rtt_ms']:.2f} ms",
            f"{ch['rtt_ratio']:.2f}x time", "—", "—", "—",
        ])  # fmt: skip
        out.append([
            f"2. Channel bulk, {ch['bulk_bytes'] // 2**20} MiB (median of "
            f"{len(ours['bulk_samples'])})",
            f"{ours['bulk_mib_s']:.1f} MiB/s", f"plain aiortc {raw['bulk_mib_s']:.1f} MiB/s",
            f"{ch['bulk_ratio']:.2f}x", "—", "—", "—",
        ])  # fmt: skip
        out.append([
            "2. Small messages sent back to back (5,000 x 16 B, best of 3)",
            f"{ours['msgs_per_s']:,.0f} msg/s", f"plain aiortc {raw['msgs_per_s']:,.0f} msg/s",
            f"{ch['rate_ratio']:.1f}x", "—", "—", "—",
        ])  # fmt: skip
    o = results.get("ops", {})
    if "chain_ops_per_s" in o:
        out.append([
            f"3. Chain of {o['chain_length']:,} `p = p + 1`, then one get (median of "
            f"{o['chain_runs']})",
            f"{o['chain_ops_per_s']:,.0f} ops/s ({o['chain_total_s'] * 1e3:.0f} ms; issued in "
            f"{o['chain_issue_s'] * 1e3:.0f} ms)",
            f"raw channel {o['raw_msgs_per_s']:,.0f} msg/s",
            f"{o['chain_ratio_to_raw_rate']:.1f}x", ">= 8,000 ops/s", _met(o["chain_goal_met"]),
            "100 ops took 338 ms just to issue",
        ])  # fmt: skip
        out.append([
            "4. op + get round trip, accepting handler (median of 100)",
            f"{o['op_rtt_s'] * 1e3:.2f} ms", f"raw aiortc ping {o['raw_rtt_s'] * 1e3:.2f} ms",
            f"{o['op_rtt_ratio']:.1f}x time", "<= 3 ms", _met(o["op_rtt_goal_met"]), "1,116 ms",
        ])  # fmt: skip
    g = results.get("gets", {})
    for row in g.get("rows", []):
        size = row["bytes"] // MB
        out.append([
            f"5. get of {size} MB (median of {row['repeats']})",
            f"{row['get_mib_s']:.1f} MiB/s ({row['get_s']:.2f} s)",
            f"raw aiortc {row['raw_mib_s']:.1f} MiB/s ({row['raw_s']:.2f} s)",
            f"{row['ratio']:.2f}x", ">= 0.85x raw", _met(row["ratio"] >= 0.85),
            "3.5 MB/s for 100 MB" if size == 100 else "—",
        ])  # fmt: skip
    if g.get("rows"):
        big = g["rows"][-1]
        size = big["bytes"] // MB
        for side in ("owner", "scientist"):
            ratio = big.get(f"{side}_peak_ratio")
            out.append([
                f"6. Peak RSS above idle during a {size} MB get, {side}",
                f"{_f(big.get(f'{side}_peak_above_idle_bytes', 0) / MB, '.0f')} MB "
                f"({_f(ratio, '.2f')}x payload)",
                "—", "—", "<= 1.5x payload", _met(ratio is not None and ratio <= 1.5), "~13x",
            ])  # fmt: skip
    d = results.get("dp", {})
    if "dp_mean_s" in d:
        out.append([
            f"7. DP query (mean) vs the exact get, accepting handlers (median of {d['rounds']})",
            f"{d['dp_mean_s'] * 1e3:.1f} ms (OpenDP alone, in process: "
            f"{d['release_mean_s'] * 1e3:.1f} ms)",
            f"exact `ptr[:, age].mean().get()` {d['exact_mean_s'] * 1e3:.1f} ms",
            f"{d['ratio']:.1f}x time", f"<= {d['goal_ratio']:g}x time", _met(d["goal_met"]),
            "no DP",
        ])  # fmt: skip
        out.append([
            f"7. DP histogram, 10 bins, vs the exact get (median of {d['rounds']})",
            f"{d['dp_histogram_s'] * 1e3:.1f} ms (OpenDP alone, in process: "
            f"{d['release_histogram_s'] * 1e3:.1f} ms)",
            f"exact mean get {d['exact_mean_s'] * 1e3:.1f} ms",
            f"{d['histogram_ratio']:.1f}x time", "—", "—", "no DP",
        ])  # fmt: skip
    from benchmarks.host import rows as host_rows

    out += [[*row, "—"] for row in host_rows(results.get("host", {}))]
    from benchmarks.jobs import rows as jobs_rows

    out += [[*row, "—"] for row in jobs_rows(results.get("jobs", {}))]
    from benchmarks.registry import rows as registry_rows

    out += [[*row, "—"] for row in registry_rows(results.get("registry", {}))]
    t = results.get("training", {})
    if "ratio_remote_to_local" in t:
        mode = t.get("best_mode")
        remote = t.get("remote_steps_per_s") or t.get(mode or "", {}).get("steps_per_s")
        label = f" ({mode})" if mode else ""
        out.append([
            f"Training steps/s, remote{label} vs local (benchmarks/training.py)",
            f"{_f(remote, '.0f')} steps/s", f"local {_f(t.get('local_steps_per_s'), '.0f')} steps/s",
            f"{t['ratio_remote_to_local']:.2f}x", f">= {t.get('goal_ratio', 0.5)}x",
            _met(t.get("goal_met")), "—",
        ])  # fmt: skip
    return out


HEADER = ["Benchmark", "duet_p2p", "Baseline, same run", "Ratio", "Goal", "Met", "PySyft 0.5"]


def markdown_table(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
    return "\n".join(lines)


def text_table(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *table]) for i in range(len(HEADER))]
    widths[0] = min(widths[0], 66)
    lines = []
    for row in [HEADER, *table]:
        lines.append("  ".join(cell[: widths[i]].ljust(widths[i]) for i, cell in enumerate(row)))
    return "\n".join(lines)


def _large_section() -> str:
    if not RESULTS_LARGE.exists():
        return "`make bench-large` has not been run on this machine yet.\n"
    stamp = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(RESULTS_LARGE.stat().st_mtime))
    data = json.loads(RESULTS_LARGE.read_text(encoding="utf-8"))
    row, big = data["get_1000mb"], data["get_3gib"]
    gib = 1024**3
    return (
        f"From its own run ({stamp}, `benchmarks/results_large.json`):\n\n"
        f"- 1000 MB get: {row['get_s']:.1f} s ({row['get_mib_s']:.1f} MiB/s) against raw "
        f"aiortc's {row['raw_s']:.1f} s ({row['raw_mib_s']:.1f} MiB/s): "
        f"{row['ratio']:.2f}x.\n"
        f"- 3 GiB tensor get: transferred in {big['seconds']:.0f} s ({big['mib_s']:.1f} MiB/s). "
        f"Peak RSS above idle: owner {big['owner_peak_above_idle_bytes'] / gib:.2f} GiB "
        f"({big['owner_peak_ratio']:.2f}x the payload), scientist "
        f"{big['scientist_peak_above_idle_bytes'] / gib:.2f} GiB "
        f"({big['scientist_peak_ratio']:.2f}x, the received tensor included). "
        "PySyft 0.5 fails at 2 GB.\n"
    )


NOTES = """\
## Where the time goes since the monitor/worker split

The owner's side is now two processes: the monitor (connection, labels, requests, audit)
and a worker per scientist that runs the ops. On two cores a session is three busy
processes (scientist, monitor, worker), which costs the chain benchmark most of what it
lost.
- **Per op:** the monitor spends about 17 us labelling an action from the graph (alias
  groups, aggregation, lineage expression) and a few more forwarding it. Actions go to
  the worker as compact lists, a batch per frame, and are audited in one write per batch.
  The worker spends about 27 us running it (allowlist, size pre-check, the op, storing the
  result). The monitor and the worker work on a batch in parallel.
- **Gets:** the worker encodes the value (one copy, in the worker), the monitor reads it
  from a Unix socket into one buffer (about 1-2 GB/s, far above aiortc's 30 MiB/s), hashing
  it as it arrives, counts its elements by decoding in place (no copy), and sends those
  same bytes. The
  monitor's peak memory stays about 1x the payload; the worker holds its own copy in its
  own process. A private get is answered before the value exists; the value is fetched
  while the owner or a rule decides.
- **Worker start:** a fork of the fork server, which imported torch while the owner waited
  for the scientist, is ready in tens of milliseconds. Spawning an interpreter that imports
  torch takes 1.5-2 s, and that is paid once per owner process, during the connection
  setup.
- `make bench-large` was not rerun for this change: its figures are from before the split.

## Where the time went before, and what was changed

- **aiortc sets the ceiling.** Its SCTP stack is pure Python: every 1,200-byte chunk is a
  packet, a DTLS record and a datagram, and the receiver acknowledges every packet. That
  costs about 32-45 ms of CPU per MiB on *each* side, so two processes on two cores top
  out near 30 MiB/s, and anything else running on the machine shows up directly. A
  cProfile of a bulk transfer shows no duet_p2p function near the top on either side; on
  a quiet machine our transport moves 95-100% of plain aiortc's bytes per second.
- **Frames are 64 KiB.** The 256 KiB default was never used: the frame size was fixed
  before the remote's max message size was known, and fell back to 64 KiB; it is now read
  after negotiation, and 64 KiB is the default on purpose. Measured with plain aiortc
  (16 MB, median of 4): 64 KiB messages cost 37 ms/MiB sending and 36 receiving, 256 KiB
  cost 44 and 50, because aiortc rescans the chunks of a message being reassembled as
  each one arrives; 16 KiB is no better than 64.
- **Small frames are batched.** aiortc neither bundles nor delays (the opposite of
  Nagle): 5,000 sends of 16 B are 5,000 packets and 5,000 acknowledgements. Its rate
  swings between ~1,500 and ~20,000 messages per second with the state of its congestion
  window (for every send its sender rescans all chunks in flight, and each 16 B message
  is a chunk of its own); one at a time, the ~0.4 ms round trip bounds it to ~2,500.
  Our framing, credit window and event loop were not the limit (a few microseconds per
  message; the 1,000/s measured before was aiortc). The transport now
  holds frames under 8 KiB until the event loop turns and sends them together as one
  BATCH frame: back-to-back messages reach well over 100,000 per second. A single message
  waits one loop turn, which no round trip measured could tell from noise (echo within
  0.1 ms of plain aiortc either way; op + get 1.34 ms batched, 1.43 ms unbatched, A/B).
- **Executor pre-check.** The meta-device size check took ~100 us of each 137 us op.
  Python operators (`+`, `*`, `@`, comparisons; not indexing with lists) are now bounded
  by the product of their inputs' sizes, as arithmetic already was, so `p + 1` skips it:
  37 us per op, and the chain went from ~3,500 to 8,000-11,000 ops/s on a quiet machine.
  Two recursive closures in the executor (`action_refs`, `_tensors`) were reference
  cycles, so every op left garbage (and the tensors it found) for the cyclic collector,
  whose full passes paused the owner ~150 ms every second or third chain; they are plain
  functions now and an op leaves no cyclic garbage. What remains per op is spread thin
  (lineage, taint tracking, one audit line each).
- **Copies and memory.** A get copies the value once on the owner: a snapshot (later
  in-place ops cannot change what leaves) that is hashed for the audit log. It used to be
  a `bytes` join that held the GIL, which for 3 GiB stalled the event loop past the 6 s
  heartbeat timeout and broke the transfer; numpy now makes the copy without the GIL.
  Each 64 KiB frame is copied once more (aiortc wants `bytes`). The scientist appends
  frames to one growing buffer (it never reserves what the peer merely announces) and
  decodes tensors in place from it. SHA-256 costs ~1.2 ms/MiB, ~3% of the owner's CPU.
- **Credit window** stays 4 MiB, acknowledged every 1 MiB: it bounds what is buffered per
  direction; 1, 4 and 16 MiB windows gave the same loopback throughput (aiortc's own
  congestion window stays far below them), and 4 MiB leaves room for long round trips.
- **uvloop** is the event loop in every peer process (each peer reports it).
- Left alone: pydantic validation (~2 us per action), CBOR decoding of a 1,000-action
  batch (~10 ms), the audit log's flush per entry (~10 us), `ptr.get()` crossing into the
  event loop twice (request, then result), and aiortc itself.
"""


def _dp_section(d: dict[str, Any]) -> str:
    """Utility of the DP mean and histogram against epsilon, from benchmarks/dp.py."""
    from benchmarks.dp import utility_markdown

    title = "## Differential privacy: utility vs epsilon\n\n"
    if not d.get("utility"):
        return title + "Not measured in this run.\n"
    first = d["utility"][0]
    intro = (
        f"scikit-learn's diabetes table ({first['records']} records, unscaled, bundled with the "
        f"package). Each figure is the median over {first['draws']} releases by the owner's "
        "mechanisms (OpenDP, in process): the mean's |noisy - true| / true, and the "
        "histogram's sum |noisy count - true count| / records (10 equal bins over the "
        "bounds). Beside each, what the Laplace scale predicts (the mean spends half its "
        "epsilon on a noisy count; a median of this many draws is itself within about 15%)."
    )
    cost = (
        "Cost over WebRTC (table rows 7): the DP query is OpenDP's work in the owner's monitor "
        "(it calibrates the noise per query by a binary search over its privacy map) plus one "
        "round trip; the exact get is two ops and a get."
    )
    return (
        f"{title}{textwrap.fill(intro, 90)}\n\n{utility_markdown(d['utility'])}\n\n"
        f"{textwrap.fill(cost, 90)}\n"
    )


def report(results: dict[str, Any]) -> str:
    from benchmarks.host import markdown_section as host_section
    from benchmarks.jobs import markdown_section as jobs_section
    from benchmarks.registry import markdown_section as registry_section

    m = results["machine"]
    v = m["versions"]
    loops = sorted(set(results.get("connect", {}).get("loop", [])))
    load0 = ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
    load1 = ", ".join(f"{x:.1f}" for x in m.get("load_average_at_end", ()))
    return f"""# Benchmarks

Generated by `make bench` (`python -m benchmarks`, a few minutes). **All numbers are
from one run** on {m["cpu"] or "an unnamed CPU"}, {m["cores"]} cores, {m["system"]},
Python {m["python"]}, aiortc {v.get("aiortc")}, torch {v.get("torch")}, event loop
{", ".join(loops) or "unknown"}, {m["date"]}. Load average at start: {load0}; at end: {load1}.

Every benchmark runs two peers as separate OS processes on loopback (127.0.0.1 host
candidates only) and measures its baseline between the same two processes in the same run.
The machine is shared with other work: on two cores, anything else running shifts
throughput by tens of percent from run to run; ratios from the same run are the figures
to compare. Raw JSON: `benchmarks/results.json`.

{markdown_table(rows(results))}

Ratios: for times (connect, round trips) ours divided by the baseline; for rates and
throughput ours divided by the baseline (above 1 is faster). A get's time includes the
request, the owner's accept handler, encoding, hashing for the audit log, the transfer and
decoding; the raw baseline is only the transfer.

{_dp_section(results.get("dp", {}))}
{host_section(results.get("host", {}))}
{jobs_section(results.get("jobs", {}))}
{registry_section(results.get("registry", {}))}
## `make bench-large`

{_large_section()}
{NOTES}"""


def main() -> int:
    results = run_all()
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    table = rows(results)
    print()
    print(text_table(table))
    REPORT.write_text(report(results), encoding="utf-8")
    print(f"\nwrote {RESULTS.relative_to(ROOT)} and {REPORT.relative_to(ROOT)}")
    failed = [
        name for name, value in results.items() if isinstance(value, dict) and "error" in value
    ]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
