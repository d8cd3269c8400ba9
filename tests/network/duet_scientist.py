"""The data scientist's half of the seed flow, as its own process (run inside a namespace).

Joins the owner's Duet through the public API (the Duet ID comes from ``--dir/duet_id``,
the Client ID goes back in ``--dir/client_id``), finds the tensor tagged "data", runs one
op on it (``* 2``), requests the result and gets it (``--repeats`` times), then closes.

Prints one JSON line last: {"ok": true, "role": "scientist", "candidate_types": [...],
"sha256": ..., "join_seconds": ..., "get_seconds": [...], ...}; on a duet_p2p error
{"ok": false, "error_type": ..., "error": ..., "wait_seconds": ...} and exit code 3.

    python duet_scientist.py http://198.51.100.1:8765 --dir D [--ice-servers JSON] [--timeout 30]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from typing import Any

from duet_common import ice_servers, report, wait_text, write_text
from duet_common import parser as common_parser

import duet_p2p as sy

TAG = "data"
_join_started: list[float] = []  # when join_duet was called: the open timeout starts


def wait_stored(duet: sy.Duet, timeout: float) -> None:
    """Poll the store listing (as a person would look) until the tensor is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(duet.store) >= 1:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the owner stored nothing within {timeout:g} s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    duet_id = wait_text(args.dir / "duet_id", args.timeout + 30)
    ice = ice_servers(args)
    started = time.perf_counter()
    _join_started.append(started)
    duet = sy.join_duet(
        duet_id,
        args.signaling_url,
        ice_servers=ice,
        timeout=args.timeout,
        on_client_id=lambda client_id: write_text(args.dir / "client_id", client_id),
    )
    joined = time.perf_counter()
    with duet:
        candidate_types = duet.candidate_types()
        wait_stored(duet, 30)
        stored = time.perf_counter()
        doubled = duet.store[TAG] * 2
        get_seconds = []
        digests = set()
        value = None
        for attempt in range(args.repeats):
            t0 = time.perf_counter()
            value = doubled.get(reason=f"hash check {attempt}", timeout_secs=args.timeout + 60)
            get_seconds.append(round(time.perf_counter() - t0, 4))
            digests.add(hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest())
    assert value is not None
    nbytes = value.numel() * value.element_size()
    best = min(get_seconds)
    return {
        "ok": True,
        "role": "scientist",
        "candidate_types": list(candidate_types) if candidate_types else None,
        "sha256": digests.pop() if len(digests) == 1 else sorted(digests),
        "nbytes": nbytes,
        "join_seconds": round(joined - started, 3),
        "store_seconds": round(stored - joined, 3),
        "get_seconds": get_seconds,
        "best_mb_per_s": round(nbytes / 1e6 / best, 2) if best > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common_parser(__doc__.splitlines()[0], "join_duet")
    parser.add_argument("--repeats", type=int, default=1, help="how many times to get the result")
    args = parser.parse_args(argv)
    return report("scientist", run, args, _join_started)


if __name__ == "__main__":
    sys.exit(main())
