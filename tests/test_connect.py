"""Connecting two peers end to end: real processes, a real signaling server, real WebRTC.

The signaling server runs as ``python -m signaling_server --port 0``; the other peer is a
script in tests/peers/ run as its own OS process. ICE uses loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from aiohttp import web
from aiortc import RTCSessionDescription

import duet_p2p as sy
from duet_p2p import ids
from duet_p2p.connect import Connection, ConnectOptions, OwnerHandshake, join
from duet_p2p.errors import ConnectionTimeout, PeerClosed, PeerVerificationError
from duet_p2p.transport.peer import new_peer_connection
from signaling_server.app import ServerConfig, create_app
from signaling_server.state import InMemoryState
from tests.conftest import run_peer

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
PEER_ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": str(ROOT),
    "DUET_ICE_HOST_ADDRESSES": "127.0.0.1",
}


# -- processes -----------------------------------------------------------------------------


class Lines:
    """The lines a process prints, read by a thread so waits can have timeouts."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._ended = False
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line (seen before or arriving within ``timeout`` s) matching ``pattern``."""
        regex = re.compile(pattern)
        for line in self.seen:
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout
        while not self._ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self._ended = True
                break
            self.seen.append(line)
            if match := regex.search(line):
                return match
        why = "the output ended" if self._ended else f"{timeout:g} s passed"
        raise AssertionError(f"{why} before a line matched {pattern!r}; output: {self.seen}")


class Peer:
    """A script from tests/peers/ running as its own process; stderr goes to a file."""

    def __init__(self, script: str, args: list[str], log_dir: Path) -> None:
        self.stderr_path = log_dir / f"{Path(script).stem}-{time.monotonic_ns()}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.proc = run_peer(script, *args, stderr=self._stderr)
        assert self.proc.stdout is not None
        self.lines = Lines(self.proc.stdout)

    def wait(self, pattern: str, timeout: float) -> re.Match[str]:
        try:
            return self.lines.wait(pattern, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstderr: {self.stderr()}") from None

    async def await_line(self, pattern: str, timeout: float) -> re.Match[str]:
        return await asyncio.to_thread(self.wait, pattern, timeout)

    def type_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._stderr.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m signaling_server --port 0`` as a separate process; its printed URL."""
    log = (tmp_path_factory.mktemp("signaling") / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "signaling_server", "--port", "0"]
        + ["--rate", "1000", "--burst", "5000", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=PEER_ENV,
        cwd=str(ROOT),
    )
    try:
        assert proc.stdout is not None
        url = Lines(proc.stdout).wait(r"listening on (http://\S+)", 20)[1]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def options(url: str, timeout: float = 20.0) -> ConnectOptions:
    return ConnectOptions(
        signaling_url=url, ice_servers=[], host_addresses=["127.0.0.1"], timeout=timeout
    )


@contextlib.asynccontextmanager
async def owner_with_echo_peer(url: str, log_dir: Path) -> AsyncIterator[tuple[Connection, Peer]]:
    """This process as the owner, tests/peers/echo_peer.py as the scientist, connected.

    The Client ID is confirmed the way a person would: read off the peer's output.
    """
    handshake = OwnerHandshake(options(url))
    await handshake.start()
    peer = Peer("echo_peer.py", [url, handshake.duet_id], log_dir)
    connection: Connection | None = None
    try:
        client_id = (await peer.await_line(r"^CLIENT_ID ([0-9a-f]{32})$", 30))[1]
        connection = await asyncio.wait_for(handshake.complete(client_id), 30)
        assert connection.client_id == client_id
        assert connection.duet_id == handshake.duet_id
        await peer.await_line("^CONNECTED$", 10)
        yield connection, peer
    finally:
        if connection is None:
            await handshake.abort()
        else:
            await asyncio.wait_for(connection.close(), 10)
        await asyncio.to_thread(peer.stop)


async def recv(connection: Connection, timeout: float = 30.0) -> bytes:
    return bytes(await asyncio.wait_for(connection.transport.recv(), timeout))


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# -- 1. messages between two processes ------------------------------------------------------


async def test_messages_arrive_intact_between_processes(server_url: str, tmp_path: Path) -> None:
    async with owner_with_echo_peer(server_url, tmp_path) as (connection, peer):
        transport = connection.transport
        for size in (10, MiB, 64 * MiB):
            payload = os.urandom(size)
            await asyncio.wait_for(transport.send(b"D", payload), 60)
            assert (await recv(connection, 60)).decode() == sha256(payload), size
        for size in (10, MiB):
            await transport.send(b"G%d" % size)
            digest = (await recv(connection)).decode()
            payload = await recv(connection)
            assert len(payload) == size
            assert sha256(payload) == digest
        await transport.send(b"Q")
        with pytest.raises(PeerClosed):
            await recv(connection, 10)
        assert await asyncio.to_thread(peer.proc.wait, 10) == 0, peer.stderr()


async def test_graceful_close_by_peer_delivers_everything_first(
    server_url: str, tmp_path: Path
) -> None:
    count, size = 40, 250_000  # 10 MB: more than the credit window, so sends must wait
    async with owner_with_echo_peer(server_url, tmp_path) as (connection, peer):
        await connection.transport.send(b"B%d %d" % (count, size))
        for i in range(count):
            assert await recv(connection) == bytes((i % 256,)) * size, i
        with pytest.raises(PeerClosed):
            await recv(connection, 10)
        assert await asyncio.to_thread(peer.proc.wait, 10) == 0, peer.stderr()
        await peer.await_line("^CLOSED$", 1)


# -- 4. a killed peer ----------------------------------------------------------------------


async def test_killed_peer_is_noticed_within_ten_seconds(server_url: str, tmp_path: Path) -> None:
    async with owner_with_echo_peer(server_url, tmp_path) as (connection, peer):
        await connection.transport.send(b"Dhello")
        assert (await recv(connection)).decode() == sha256(b"hello")
        peer.proc.kill()
        await asyncio.to_thread(peer.proc.wait, 5)
        started = time.monotonic()
        with pytest.raises(PeerClosed):
            await recv(connection, 15)
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"the dead peer was noticed after {elapsed:.1f} s"
        assert connection.transport.closed
        with pytest.raises(PeerClosed):
            await connection.transport.send(b"Dlate")


# -- 2. a signaling server that substitutes descriptions -----------------------------------


class TamperingState(InMemoryState):
    """Relays like the real state, but hands out another peer's offer or answer."""

    def __init__(self, swap: str) -> None:
        super().__init__(ttl=60)
        self.swap = swap
        self.forgers: list[Any] = []

    async def _forge(self, offer: str | None) -> str:
        pc, _ = new_peer_connection([])
        self.forgers.append(pc)
        if offer is None:
            await pc.setLocalDescription(await pc.createOffer())
        else:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp

    async def wait_for_offer(self, duet_id: str, timeout: float) -> str | None:
        sdp = await super().wait_for_offer(duet_id, timeout)
        if sdp is None or self.swap != "offer":
            return sdp
        return await self._forge(None)

    async def put_answer(self, duet_id: str, sdp: str) -> None:
        if self.swap == "answer":
            sdp = await self._forge(await self.get_offer(duet_id))
        await super().put_answer(duet_id, sdp)


@pytest.fixture
async def tampering_server() -> AsyncIterator[Callable[[str], Awaitable[tuple[str, Any]]]]:
    runners: list[web.AppRunner] = []
    states: list[TamperingState] = []

    async def start(swap: str) -> tuple[str, TamperingState]:
        state = TamperingState(swap)
        runner = web.AppRunner(create_app(ServerConfig(rate=1000, burst=5000), state))
        await runner.setup()
        runners.append(runner)
        states.append(state)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}", state

    yield start
    for runner in runners:
        await runner.cleanup()
    for state in states:
        for pc in state.forgers:
            await pc.close()


async def test_scientist_refuses_a_swapped_offer(tampering_server: Any) -> None:
    url, state = await tampering_server("offer")
    owner = OwnerHandshake(options(url, timeout=5))
    await owner.start()
    try:
        with pytest.raises(PeerVerificationError, match="owner's description does not match"):
            await asyncio.wait_for(join(owner.duet_id, options(url, timeout=5)), 15)
        assert await state.get_answer(owner.duet_id) is None, "answered a forged offer"
    finally:
        await owner.abort()


@contextlib.asynccontextmanager
async def owner_with_joining_scientist(url: str) -> AsyncIterator[tuple[OwnerHandshake, str]]:
    """An owner whose offer is posted and a scientist joining it; yields (owner, the Client
    ID the scientist announced). Both are released afterwards."""
    owner = OwnerHandshake(options(url, timeout=5))
    await owner.start()
    client_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    scientist = asyncio.ensure_future(
        join(owner.duet_id, options(url, timeout=10), on_client_id=client_id.set_result)
    )
    try:
        yield owner, await asyncio.wait_for(client_id, 15)
    finally:
        scientist.cancel()
        await asyncio.gather(scientist, return_exceptions=True)
        await owner.abort()


async def test_owner_refuses_a_swapped_answer(tampering_server: Any) -> None:
    url, _ = await tampering_server("answer")
    async with owner_with_joining_scientist(url) as (owner, confirmed):
        with pytest.raises(PeerVerificationError, match="scientist's description does not match"):
            await asyncio.wait_for(owner.complete(confirmed), 15)


async def test_owner_refuses_a_wrong_client_id(server_url: str) -> None:
    stranger, _ = new_peer_connection([])
    await stranger.setLocalDescription(await stranger.createOffer())
    wrong_id = ids.fingerprint_id(stranger.localDescription.sdp)
    await stranger.close()

    async with owner_with_joining_scientist(server_url) as (owner, real_id):
        assert real_id != wrong_id
        with pytest.raises(PeerVerificationError, match=wrong_id):
            await asyncio.wait_for(owner.complete(wrong_id), 15)


async def test_owner_refuses_a_malformed_client_id(server_url: str) -> None:
    owner = OwnerHandshake(options(server_url, timeout=5))
    await owner.start()
    try:
        with pytest.raises(PeerVerificationError, match="not a valid Duet Client ID"):
            await asyncio.wait_for(owner.complete("my id is 1234"), 5)
    finally:
        await owner.abort()


# -- 3. a partner that never comes --------------------------------------------------------


async def test_owner_times_out_when_nobody_joins(server_url: str) -> None:
    owner = OwnerHandshake(options(server_url, timeout=2))
    await owner.start()
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionTimeout, match=r"did not join within 2 s") as info:
            await asyncio.wait_for(owner.complete("0" * 32), 10)
    finally:
        await owner.abort()
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 4, elapsed
    assert owner.duet_id in str(info.value)


async def test_scientist_times_out_when_the_owner_never_confirms(server_url: str) -> None:
    owner = OwnerHandshake(options(server_url))
    await owner.start()
    announced: list[str] = []
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionTimeout) as info:
            await asyncio.wait_for(
                join(owner.duet_id, options(server_url, timeout=3), on_client_id=announced.append),
                10,
            )
    finally:
        await owner.abort()
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    assert len(announced) == 1
    assert announced[0] in str(info.value)
    assert "has not yet confirmed your Client ID" in str(info.value)


# -- 5. the synchronous API inside running event loops (as in Jupyter) ------------------------


def test_sync_api_works_inside_running_event_loops(server_url: str, tmp_path: Path) -> None:
    duet_ids: queue.Queue[str] = queue.Queue()
    client_ids: queue.Queue[str] = queue.Queue()
    owner_box: dict[str, Any] = {}
    owner_ready = threading.Event()

    def confirm(duet_id: str) -> str:
        duet_ids.put(duet_id)
        return client_ids.get(timeout=20)

    async def owner_main() -> None:
        asyncio.get_running_loop()  # this thread's loop is running, as in a notebook
        owner = sy.launch_duet(
            server_url, client_id_callback=confirm, audit_path=tmp_path / "audit.jsonl", timeout=20
        )
        owner_box["owner"] = owner
        torch.tensor([1.0, 2.0, 3.0]).tag("x").send(owner, searchable=True)
        owner_ready.set()
        owner_box["request"] = owner.requests.wait(timeout=20)
        if owner_box["request"] is not None:
            owner.requests[0].accept()

    def owner_thread() -> None:
        try:
            asyncio.run(owner_main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            owner_box["error"] = exc
        finally:
            owner_ready.set()

    thread = threading.Thread(target=owner_thread, daemon=True)
    thread.start()

    async def scientist_main() -> float:
        asyncio.get_running_loop()
        duet_id = duet_ids.get(timeout=20)
        scientist = sy.join_duet(duet_id, server_url, on_client_id=client_ids.put, timeout=20)
        try:
            assert owner_ready.wait(20) and "error" not in owner_box, owner_box
            assert scientist.connected
            assert len(scientist.store) == 1
            total = scientist.store["x"].sum().item()
            return total.get(reason="sync API test", request_block=True, timeout_secs=15)
        finally:
            scientist.close()

    try:
        assert asyncio.run(scientist_main()) == 6.0
        thread.join(20)
        assert not thread.is_alive()
        assert "error" not in owner_box, owner_box
    finally:
        owner = owner_box.get("owner")
        if owner is not None:
            owner.close()


# -- 6. the Client ID typed at the owner's prompt -----------------------------------------


def test_owner_reads_the_client_id_from_stdin(server_url: str, tmp_path: Path) -> None:
    owner = Peer("connect_stdin_owner.py", [server_url, str(tmp_path / "audit.jsonl")], tmp_path)
    try:
        duet_id = owner.wait(r"join_duet\('([0-9a-f]{32})'", 30)[1]
        owner.wait("Waiting for the Duet Client ID", 5)
        scientist = sy.join_duet(duet_id, server_url, on_client_id=owner.type_line, timeout=20)
        try:
            owner.wait("Connected!", 10)
            owner.wait("^SENT$", 10)
            assert len(scientist.store) == 1
            total = scientist.store["data"].sum().item()
            try:
                value = total.get(reason="stdin test", request_block=True, timeout_secs=15)
            except sy.DuetError as exc:
                raise AssertionError(f"{exc!r}; owner printed {owner.lines.seen}") from exc
            assert value == 1
            owner.wait("^ACCEPTED$", 5)
        finally:
            scientist.close()
        assert owner.proc.wait(15) == 0, owner.stderr()
        assert "Traceback" not in owner.stderr()
    finally:
        owner.stop()
