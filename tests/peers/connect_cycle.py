"""Owner and scientist in one process, for the runtime tests.

    python connect_cycle.py threads AUDIT_PATH   # connect, work, close twice; report threads
    python connect_cycle.py exit-open AUDIT_PATH # connect, work, exit with the Duets open

``threads`` prints one JSON line: the threads that existed while connected and the ones
left over after both sessions closed (compared with before the first connect).
``exit-open`` prints ``OPEN`` and returns without closing: shutdown must be quiet.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("DUET_ICE_HOST_ADDRESSES", "127.0.0.1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for conftest

import torch  # noqa: E402

import duet_p2p as sy  # noqa: E402
from duet_p2p.runtime import get_runtime  # noqa: E402
from signaling_server.app import ServerConfig, start_server  # noqa: E402


def connect_and_work(url: str, audit_path: str) -> tuple[sy.Duet, sy.Duet]:
    """A pair connected with the synchronous API (the owner in a thread) that has done the
    seed step and an upload, so worker threads ran."""
    duet_ids: queue.Queue[str] = queue.Queue()
    client_ids: queue.Queue[str] = queue.Queue()
    owners: list[sy.Duet] = []

    def confirm(duet_id: str) -> str:
        duet_ids.put(duet_id)
        return client_ids.get(timeout=20)

    def launch() -> None:
        owners.append(
            sy.launch_duet(url, client_id_callback=confirm, audit_path=audit_path, timeout=20)
        )

    launcher = threading.Thread(target=launch)
    launcher.start()
    scientist = sy.join_duet(duet_ids.get(timeout=20), url, on_client_id=client_ids.put)
    launcher.join(20)
    (owner,) = owners
    torch.tensor([[0, 0], [0, 1]]).tag("data").send(owner, searchable=True)
    scientist.send(torch.ones(1000))

    def accept() -> None:
        if owner.requests.wait(timeout=15) is not None:
            owner.requests[0].accept()

    decider = threading.Thread(target=accept)
    decider.start()
    value = scientist.store["data"].sum().item().get(request_block=True, timeout_secs=15)
    decider.join(15)
    assert value == 1, value
    return owner, scientist


def names() -> list[str]:
    return sorted(t.name for t in threading.enumerate())


def threads(audit_path: str) -> None:
    runtime = get_runtime()
    server = runtime.run(start_server(ServerConfig(rate=1000, burst=5000)), timeout=10)
    before = {t.ident for t in threading.enumerate()}
    during: list[str] = []
    for _ in range(2):
        owner, scientist = connect_and_work(server.url, audit_path)
        during = sorted(set(during) | set(names()))
        scientist.close()
        owner.close()
    runtime.run(server.close(), timeout=10)
    deadline = time.monotonic() + 3
    while True:
        left = sorted(t.name for t in threading.enumerate() if t.ident not in before)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print(json.dumps({"during": during, "left": left, "runtime": runtime._thread.name}))


def exit_open(audit_path: str) -> None:
    runtime = get_runtime()
    server = runtime.run(start_server(ServerConfig(rate=1000, burst=5000)), timeout=10)
    _, scientist = connect_and_work(server.url, audit_path)
    runtime.add_closer(server.close)
    scientist.store["data"].sum().item().get(request_block=False)  # a request left pending
    print("OPEN", flush=True)


def exit_fast(audit_path: str) -> None:
    """Connect with the async API on duet_p2p's own loop, close, and exit at once (while
    threads the session started may still be busy)."""
    from conftest import make_pair

    runtime = get_runtime()
    server = runtime.run(start_server(ServerConfig(rate=1000, burst=5000)), timeout=10)
    owner, scientist = make_pair(server.url, Path(audit_path))
    scientist.close()
    owner.close()
    runtime.run(server.close(), timeout=10)
    print("CLOSED", flush=True)


if __name__ == "__main__":
    modes = {"threads": threads, "exit-open": exit_open, "exit-fast": exit_fast}
    modes[sys.argv[1]](sys.argv[2])
