"""What duet_owner.py and duet_scientist.py share: the ID files, the command line, the report.

Both run as scripts, so this directory is first on their ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duet_p2p as sy


def write_text(path: Path, text: str) -> None:
    """Write atomically so the other process never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_text(path: Path, timeout: float) -> str:
    """The content of a file the other process writes, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        time.sleep(0.02)
    raise TimeoutError(f"{path.name} did not appear within {timeout:g} s")


def ice_servers(args: argparse.Namespace) -> Any:
    """``--ice-servers`` parsed (None when not given)."""
    return json.loads(args.ice_servers) if args.ice_servers else None


def parser(description: str, connect: str) -> argparse.ArgumentParser:
    """The options both peers take; ``connect`` names the call ``--timeout`` is passed to."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("signaling_url")
    result.add_argument("--dir", required=True, type=Path, help="directory shared with the peer")
    result.add_argument("--ice-servers", help="JSON list passed as ice_servers= (default: None)")
    result.add_argument("--timeout", type=float, default=30.0, help=f"{connect}(timeout=...)")
    return result


def report(
    role: str,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    args: argparse.Namespace,
    waiting_since: list[float],
) -> int:
    """Run the peer and print its JSON line; on a duet_p2p error or timeout print the
    error (``wait_seconds`` counts from ``waiting_since[0]``, if set) and return 3."""
    started = time.perf_counter()
    try:
        result = run(args)
    except (sy.DuetError, TimeoutError) as exc:
        failure = {
            "ok": False,
            "role": role,
            "error_type": type(exc).__name__,
            "error": str(exc),
            "seconds": round(time.perf_counter() - started, 3),
            "wait_seconds": (
                round(time.perf_counter() - waiting_since[0], 3) if waiting_since else None
            ),
        }
        print(json.dumps(failure), flush=True)
        return 3
    print(json.dumps(result), flush=True)
    return 0
