"""The data owner's half of the seed flow, as its own process (run inside a namespace).

Launches a Duet through the public API, hosts a seeded random float32 tensor of
``--size-mb`` MiB tagged "data", accepts the scientist's first request at the keyboard
(``duet.requests.wait`` + ``accept``), lets a handler accept ``--repeats - 1`` more, and
waits for the scientist to close. IDs are exchanged through files in ``--dir``, as two
people would over chat: the owner writes ``duet_id``, the scientist writes ``client_id``.

Prints one JSON line last: {"ok": true, "role": "owner", "candidate_types": [...],
"expected_sha256": ..., timings...}; on a duet_p2p error {"ok": false, "error_type": ...,
"error": ..., "wait_seconds": ...} and exit code 3.

    python duet_owner.py http://198.51.100.1:8765 --dir D [--ice-servers JSON] [--timeout 30]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
from duet_common import ice_servers, report, wait_text, write_text
from duet_common import parser as common_parser

import duet_p2p as sy

TAG = "data"
_confirmed_at: list[float] = []  # when the Client ID was confirmed: the open timeout starts


def make_data(size_mb: float, seed: int = 0) -> torch.Tensor:
    """A reproducible float32 tensor of size_mb MiB."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(int(size_mb * 1024 * 1024) // 4, generator=generator)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's raw bytes (contiguous, native order)."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir: Path = args.dir
    confirmed_at = _confirmed_at

    def confirm(duet_id: str) -> str:
        write_text(workdir / "duet_id", duet_id)
        client_id = wait_text(workdir / "client_id", args.timeout)
        confirmed_at.append(time.perf_counter())
        return client_id

    ice = ice_servers(args)
    started = time.perf_counter()
    duet = sy.launch_duet(
        args.signaling_url,
        client_id_callback=confirm,
        ice_servers=ice,
        timeout=args.timeout,
        audit_path=workdir / "audit.jsonl",
    )
    connected = time.perf_counter()
    with duet:
        candidate_types = duet.candidate_types()
        data = make_data(args.size_mb)
        expected = tensor_sha256(data * 2)
        data.tag(TAG).send(duet, searchable=True)
        request = duet.requests.wait(timeout=args.timeout + 30)
        if request is None:
            raise sy.RequestTimeout("no request from the scientist arrived")
        decided = time.perf_counter()
        request.accept()
        if args.repeats > 1:
            duet.requests.add_handler("accept", tags=[TAG], max_requests=args.repeats - 1)
        closed = duet.wait_closed(timeout=args.timeout + 60 + 30 * args.repeats)
        audit_releases = sum(1 for e in duet.audit.entries() if e.get("event") == "release")
    return {
        "ok": True,
        "role": "owner",
        "candidate_types": list(candidate_types) if candidate_types else None,
        "expected_sha256": expected,
        "nbytes": data.numel() * data.element_size(),
        "launch_seconds": round(connected - started, 3),
        "open_seconds": round(connected - confirmed_at[0], 3) if confirmed_at else None,
        "request_seconds": round(decided - connected, 3),
        "partner_closed": closed,
        "releases": audit_releases,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common_parser(__doc__.splitlines()[0], "launch_duet")
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=1, help="gets the scientist will make")
    args = parser.parse_args(argv)
    return report("owner", run, args, _confirmed_at)


if __name__ == "__main__":
    sys.exit(main())
