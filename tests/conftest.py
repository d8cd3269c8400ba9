"""Shared fixtures: a real signaling server and real WebRTC peer pairs on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import duet_p2p as sy
from duet_p2p.runtime import get_runtime
from signaling_server.app import ServerConfig, start_server

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "tests" / "peers"
os.environ.setdefault("DUET_ICE_HOST_ADDRESSES", "127.0.0.1")
os.environ["DUET_HOME"] = tempfile.mkdtemp(prefix="duet_home_")  # never the user's own files
T = TypeVar("T")


@pytest.fixture(scope="session")
def signaling_url() -> Iterator[str]:
    """An in-process signaling server on 127.0.0.1, on duet_p2p's background loop."""
    runtime = get_runtime()
    server = runtime.run(start_server(ServerConfig(rate=1000, burst=5000)), timeout=10)
    yield server.url
    runtime.run(server.close(), timeout=10)


async def launch_owner_with(
    url: str,
    audit_path: Path,
    join_scientist: Callable[[str, Callable[[str], None]], Awaitable[T]],
    **owner_options: Any,
) -> tuple[sy.Duet, T]:
    """Launch an owner and connect a scientist to it: ``join_scientist(duet_id,
    on_client_id)`` joins (it must also do whatever the owner's start waits for)."""
    loop = asyncio.get_running_loop()
    duet_id: asyncio.Future[str] = loop.create_future()
    client_id: asyncio.Future[str] = loop.create_future()

    async def confirm(announced: str) -> str:
        duet_id.set_result(announced)
        return await client_id

    owner_task = asyncio.ensure_future(
        sy.launch_duet_async(
            url, client_id_callback=confirm, audit_path=audit_path, **owner_options
        )
    )
    try:
        scientist = await join_scientist(await asyncio.wait_for(duet_id, 10), client_id.set_result)
        owner = await asyncio.wait_for(owner_task, 20)
    except BaseException:
        owner_task.cancel()
        raise
    return owner, scientist


async def _pair(url: str, audit_path: Path, **owner_options: object) -> tuple[sy.Duet, sy.Duet]:
    def join(duet_id: str, on_client_id: Callable[[str], None]) -> Awaitable[sy.Duet]:
        return sy.join_duet_async(duet_id, url, on_client_id=on_client_id)

    return await launch_owner_with(url, audit_path, join, **owner_options)


def make_pair(url: str, audit_path: Path, **owner_options: object) -> tuple[sy.Duet, sy.Duet]:
    """Owner and scientist in this process, connected over real WebRTC on loopback,
    both on duet_p2p's background loop so the synchronous API works from the test."""
    return get_runtime().run(_pair(url, audit_path, **owner_options), timeout=30)


def close_pair(*duets: sy.Duet) -> None:
    for duet in duets:
        duet.close()


@pytest.fixture
def duet_pair(signaling_url: str, tmp_path: Path) -> Iterator[tuple[sy.Duet, sy.Duet]]:
    """(owner, scientist), connected; closed afterwards."""
    owner, scientist = make_pair(signaling_url, tmp_path / "audit.jsonl")
    yield owner, scientist
    close_pair(scientist, owner)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` every 20 ms for up to ``timeout`` s; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def accept_next(owner: sy.Duet, timeout: float) -> threading.Thread:
    """Accept the next request from a thread (as the owner at the keyboard would)."""

    def accept() -> None:
        request = owner.requests.wait(timeout=timeout)
        if request is not None:
            request.accept()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread


def run_peer(script: str, *args: str, stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start tests/peers/<script> as a separate OS process (text pipes, unbuffered)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(PEERS / script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
