"""`make bench-network`: connect time and get throughput, TURN relay against the direct path.

Both paths run in the same run, between the same two peer processes as the network tests
(tests/network/duet_owner.py in home1, duet_scientist.py in home2), through network
namespaces with NAT routers (needs root, iproute2, nftables, coturn):

- direct: variant "a", cone NATs; the peers connect over their server-reflexive addresses.
- relay:  variant "blocked" (default; same cone NATs, but UDP between the NATs is dropped)
  or "b" (symmetric NAT); everything goes through coturn.

Both topologies are up at once and the rounds alternate between them, so both paths see
the same machine load. Each round starts a fresh owner and scientist, connects (ICE
servers handed out by the signaling server) and gets a 10 MiB tensor ``--gets`` times.
Connect time is the scientist's ``join_duet`` (signaling, ICE, DTLS, SCTP, session
start). A get's time is the wall time of ``get`` (request, owner's decision, transfer,
decoding); the first of each connection is accepted at the owner's prompt and runs on a
fresh SCTP association, the others are accepted by a handler. Throughput is 10 MiB over
the median of those later ("warm") gets. Medians; the samples are in the JSON.

Results: a table on stdout and benchmarks/results_network.json.

    sudo .venv/bin/python -m benchmarks.network [--rounds 3] [--gets 3] [--relay-variant b]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NETWORK_TESTS = ROOT / "tests" / "network"
RESULTS = Path(__file__).resolve().parent / "results_network.json"
SIGNALING_PORT = 8765
SIZE_MB = 10


def _harness() -> tuple[Any, Any]:
    """The namespace harness and the peer runner from tests/network."""
    if str(NETWORK_TESTS) not in sys.path:
        sys.path.insert(0, str(NETWORK_TESTS))
    import duet_pair
    import netns

    return netns, duet_pair


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _coturn_version() -> str | None:
    try:
        done = subprocess.run(
            ["turnserver", "--version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else None


def one_round(
    duet_pair: Any, topo: Any, url: str, name: str, index: int, gets: int, timeout: float
) -> dict[str, Any]:
    """A fresh owner and scientist: connect, get ``gets`` times; checked raw sample."""
    workdir = topo.workdir / f"{name}-{index}"  # removed with the topology
    repeats = ["--repeats", str(gets)]
    owner, scientist = duet_pair.run_pair(
        topo,
        workdir,
        url,
        timeout=timeout,
        owner_args=repeats,
        scientist_args=repeats,
        wall=timeout + 60 + 30 * gets,
    )
    where = f"bench-network: {name} round {index + 1}"
    for run in (owner, scientist):
        if not run.ok:
            raise SystemExit(f"{where}: {run.describe()}")
    if scientist.report["sha256"] != owner.report["expected_sha256"]:
        raise SystemExit(f"{where}: the tensor's hash does not match")
    types = owner.report["candidate_types"] + scientist.report["candidate_types"]
    if ("relay" in types) != (name == "relay"):
        raise SystemExit(
            f"{where}: unexpected candidate pairs {owner.report['candidate_types']} (owner), "
            f"{scientist.report['candidate_types']} (scientist)"
        )
    return {
        "owner_pair": owner.report["candidate_types"],
        "scientist_pair": scientist.report["candidate_types"],
        "connect_seconds": scientist.report["join_seconds"],
        "owner_open_seconds": owner.report["open_seconds"],
        "get_seconds": scientist.report["get_seconds"],
        "nbytes": scientist.report["nbytes"],
    }


def measure(
    paths: dict[str, str], rounds: int, gets: int, timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """Both topologies up at once; rounds alternate between the paths so that both see
    the same machine load over time."""
    netns, duet_pair = _harness()
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    with contextlib.ExitStack() as stack:
        topos = {name: stack.enter_context(netns.topology(v)) for name, v in paths.items()}
        urls = {name: topo.start_signaling(SIGNALING_PORT) for name, topo in topos.items()}
        names = list(paths)
        for index in range(rounds):
            for name in names if index % 2 == 0 else reversed(names):
                sample = one_round(duet_pair, topos[name], urls[name], name, index, gets, timeout)
                samples[name].append(sample)
                print(
                    f"  {name:6} round {index + 1}/{rounds}: connect "
                    f"{sample['connect_seconds']:.3f} s, gets {sample['get_seconds']} s",
                    flush=True,
                )
    return samples


def summarise(name: str, variant: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians: connect time over rounds; get time over the warm gets (all but each
    connection's first, which also waits for the owner's decision) when there are any."""
    connects = [s["connect_seconds"] for s in samples]
    firsts = [s["get_seconds"][0] for s in samples]
    warm = [g for s in samples for g in s["get_seconds"][1:]] or firsts
    nbytes = samples[0]["nbytes"]
    get_median = statistics.median(warm)
    return {
        "path": name,
        "variant": variant,
        "candidate_pair": samples[0]["scientist_pair"],
        "connect_seconds_median": round(statistics.median(connects), 3),
        "first_get_seconds_median": round(statistics.median(firsts), 3),
        "get_seconds_median": round(get_median, 3),
        "throughput_mb_per_s": round(nbytes / 1e6 / get_median, 2),
        "best_throughput_mb_per_s": round(nbytes / 1e6 / min(warm), 2),
        "samples": samples,
    }


def table(direct: dict[str, Any], relay: dict[str, Any], ratios: dict[str, float]) -> str:
    """The results as a plain-text table."""
    lines = [
        f"{'path':7} {'pair (scientist)':17} {'connect s':>9} {'1st get s':>9} "
        f"{'get s':>7} {'MB/s':>7}"
    ]
    for row in (direct, relay):
        pair = "/".join(row["candidate_pair"])
        lines.append(
            f"{row['path']:7} {pair:17} {row['connect_seconds_median']:>9.3f} "
            f"{row['first_get_seconds_median']:>9.3f} {row['get_seconds_median']:>7.3f} "
            f"{row['throughput_mb_per_s']:>7.2f}"
        )
    lines.append(
        f"relay / direct: connect time x{ratios['connect_time']:.2f}, "
        f"throughput x{ratios['throughput']:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="connections per path")
    parser.add_argument("--gets", type=int, default=3, help="gets of the tensor per connection")
    parser.add_argument("--relay-variant", choices=["blocked", "b"], default="blocked")
    parser.add_argument("--timeout", type=float, default=30.0, help="connect timeout, s")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.gets < 1:
        parser.error("--rounds and --gets must be at least 1")

    if os.geteuid() != 0:
        print(
            "bench-network needs root to create network namespaces: run "
            "'sudo make bench-network' (and apt-get install -y iproute2 nftables coturn)",
            file=sys.stderr,
        )
        return 2
    netns, _ = _harness()
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        print(f"bench-network cannot run: {reason}", file=sys.stderr)
        return 2

    started = time.time()
    print(f"bench-network: {args.rounds} connections x {args.gets} gets of {SIZE_MB} MiB per path")
    paths = {"direct": "a", "relay": args.relay_variant}
    samples = measure(paths, args.rounds, args.gets, args.timeout)
    direct = summarise("direct", paths["direct"], samples["direct"])
    relay = summarise("relay", paths["relay"], samples["relay"])
    ratios = {
        "connect_time": round(
            relay["connect_seconds_median"] / direct["connect_seconds_median"], 3
        ),
        "throughput": round(relay["throughput_mb_per_s"] / direct["throughput_mb_per_s"], 3),
    }
    print()
    print(table(direct, relay, ratios))
    result = {
        "benchmark": "network",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "size_bytes": SIZE_MB * 1024 * 1024,
        "rounds": args.rounds,
        "gets_per_round": args.gets,
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "aiortc": _version("aiortc"),
            "aioice": _version("aioice"),
            "torch": _version("torch"),
            "coturn": _coturn_version(),
        },
        "direct": direct,
        "relay": relay,
        "relay_over_direct": ratios,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
