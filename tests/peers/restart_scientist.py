"""A scientist of a standing host, in its own process, for the host restart tests.

    python restart_scientist.py ask URL HOST_ID IDENTITY OPS
    python restart_scientist.py return URL HOST_ID IDENTITY REQUEST_ID OPS
    python restart_scientist.py join URL HOST_ID IDENTITY [URL ...]

The identity is kept in $DUET_HOME/identities/IDENTITY.key, so a second run is the same
scientist. It first reads one line from stdin (an empty stdin goes on at once), so a test
can start it early, while torch loads, and say when to connect. Each step prints one line
``RESULT {json}`` on stdout (the other lines are the library's messages); a failed
connection prints its exception's type and message instead.

``ask``: connect; for each op of OPS (comma-separated: sum, max, min) ask for
``ages.<op>()`` with ``request_block=False``, give a handler ``DECIDE_SECONDS`` to decide
(``WAIT_SECONDS`` for an op marked ``!``, one a handler should accept), and report the
request's ID, status and value if accepted; leave.
``return``: connect; report ``duet.requests``, fetch REQUEST_ID's value with ``get()`` and
try a second ``get()``; ask OPS as above; then report ``{"holding": ...}`` and stay until the
host ends the session (report ``{"closed": bool}``).
``join``: connect through each signaling server URL in turn, the Nth as identity
IDENTITY-N (a host makes one connection per Client ID at a time); report the Client ID and
how many datasets it sees, or the error.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("DUET_ICE_HOST_ADDRESSES", "127.0.0.1")

import duet_p2p as sy  # noqa: E402

DECIDE_SECONDS = 2.0
WAIT_SECONDS = 20.0
HOLD_SECONDS = 60.0
OPS = ("sum", "max", "min")


def report(**fields: Any) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def plain(value: Any) -> Any:
    """A tensor or number as JSON."""
    return value.tolist() if hasattr(value, "tolist") else value


def failure(exc: BaseException) -> dict[str, str]:
    return {"error": type(exc).__name__, "message": str(exc)}


def connect(url: str, host_id: str, identity: str | sy.Identity) -> sy.Duet:
    return sy.join_duet(host_id, url, identity=identity, timeout=WAIT_SECONDS)


def ask(duet: sy.Duet, ops: str) -> None:
    for item in ops.split(","):
        op = item.removesuffix("!")
        if op not in OPS:
            raise SystemExit(f"unknown op {op!r}")
        handle = getattr(duet.store["ages"], op)().get(reason="restart test", request_block=False)
        status = handle.wait(WAIT_SECONDS if item.endswith("!") else DECIDE_SECONDS)
        value = plain(handle.result(timeout=WAIT_SECONDS)) if status == "accepted" else None
        report(op=op, request_id=handle.request_id, status=status, value=value)


def get_twice(duet: sy.Duet, request_id: str) -> None:
    rows = [{"request_id": r.request_id, "status": r.status, "kept": r.kept} for r in duet.requests]
    values: list[Any] = []
    for _ in range(2):
        try:
            values.append(plain(duet.requests[request_id].get(timeout=WAIT_SECONDS)))
        except sy.DuetError as exc:
            values.append(failure(exc))
    after = duet.requests[request_id]
    report(rows=rows, first=values[0], second=values[1], kept_after=after.kept)


def main(mode: str, url: str, host_id: str, identity: str, *extra: str) -> int:
    sys.stdin.readline()
    if mode == "join":
        for index, attempt in enumerate((url, *extra)):
            who = sy.Identity.load(f"{identity}-{index}")
            try:
                duet = connect(attempt, host_id, who)
            except Exception as exc:  # noqa: BLE001 - the failure is what the test checks
                report(url=attempt, client_id=who.id, **failure(exc))
                continue
            report(url=attempt, client_id=duet.client_id, hosted=len(duet.store))
            duet.close()
        return 0
    duet = connect(url, host_id, identity)
    try:
        if mode == "ask":
            report(client_id=duet.client_id)
            ask(duet, extra[0])
        elif mode == "return":
            report(client_id=duet.client_id)
            get_twice(duet, extra[0])
            ask(duet, extra[1])
            report(holding=True)
            report(closed=duet.wait_closed(timeout=HOLD_SECONDS))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        duet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
