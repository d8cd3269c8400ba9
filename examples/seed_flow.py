"""`make demo`: the seed flow end to end on this machine, as three processes.

Starts a signaling server, the owner and the scientist; passes the Duet ID to the
scientist and types the scientist's Client ID at the owner's prompt, as two people would
over chat. Every line each process prints is shown, prefixed with its role.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ID = re.compile(r"[0-9a-f]{32}")


def start(name: str, argv: list[str], lines: list[str], ready: threading.Event) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DUET_ICE_HOST_ADDRESSES": "127.0.0.1"}
    proc = subprocess.Popen(
        [sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=env, cwd=HERE.parent,
    )  # fmt: skip

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            print(f"[{name:9}] {line}", end="", flush=True)
            ready.set()

    threading.Thread(target=pump, daemon=True).start()
    return proc


def wait_for(lines: list[str], pattern: re.Pattern[str], what: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            match = pattern.search(line)
            if match:
                return match
        time.sleep(0.02)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> int:
    procs: list[subprocess.Popen] = []
    try:
        server_lines: list[str] = []
        procs.append(start("signaling", ["-m", "signaling_server", "--port", "0"],
                           server_lines, threading.Event()))  # fmt: skip
        url = wait_for(server_lines, re.compile(r"(http://\S+)"), "the signaling server", 20)[1]

        owner_lines: list[str] = []
        owner = start("owner", [str(HERE / "seed_owner.py"), url], owner_lines, threading.Event())
        procs.append(owner)
        duet_id = wait_for(owner_lines, re.compile(r"join_duet\('([0-9a-f]{32})'"), "the ID", 30)[1]

        scientist_lines: list[str] = []
        scientist = start("scientist", [str(HERE / "seed_scientist.py"), duet_id, url],
                          scientist_lines, threading.Event())  # fmt: skip
        procs.append(scientist)
        client_id = wait_for(scientist_lines, re.compile(r"Client ID: ([0-9a-f]{32})"),
                             "the Client ID", 30)[1]  # fmt: skip
        assert owner.stdin is not None
        owner.stdin.write(client_id + "\n")
        owner.stdin.flush()

        scientist_rc = scientist.wait(timeout=90)
        owner_rc = owner.wait(timeout=90)
        if scientist_rc or owner_rc:
            print(f"demo failed: owner exit {owner_rc}, scientist exit {scientist_rc}")
            return 1
        result = scientist_lines[-1].strip() if scientist_lines else ""
        print(f"\nThe scientist got {result}; the data never left the owner's process.")
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())
