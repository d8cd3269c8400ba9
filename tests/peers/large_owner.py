"""Owner peer for large-transfer tests: hosts one big float32 tensor, reports its SHA-256
and its memory use on stdout, and exits once the scientist closes the session.

Usage: large_owner.py SIGNALING_URL ELEMENTS AUDIT_PATH [--private] [--wait SECONDS]
Stdout lines: ``SHA256 <hex>``, ``DUET_ID <id>``, ``READY <idle_rss_kib>``,
``DONE <idle_rss_kib> <peak_rss_kib> <closed:0|1>``. The Client ID is read from stdin.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import resource
import sys

import torch

import duet_p2p as sy


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        found = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(found.group(1)) if found else 0


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("elements", type=int)
    parser.add_argument("audit")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--wait", type=float, default=120.0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(1234)
    value = torch.rand(args.elements, generator=generator, dtype=torch.float32)
    say(f"SHA256 {hashlib.sha256(value.numpy().data).hexdigest()}")

    def confirm(duet_id: str) -> str:
        say(f"DUET_ID {duet_id}")
        return sys.stdin.readline().strip()

    duet = sy.launch_duet(args.url, client_id_callback=confirm, audit_path=args.audit)
    if args.private:
        duet.requests.add_handler("accept", tags=["big"])
    duet.store.send(value, tags=["big"], public=not args.private)
    idle = status_kib("VmRSS")
    if not reset_peak():
        idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    say(f"READY {idle}")
    closed = duet.wait_closed(timeout=args.wait)
    peak = max(status_kib("VmHWM"), 0)
    say(f"DONE {idle} {peak} {int(closed)}")
    duet.close()


if __name__ == "__main__":
    main()
