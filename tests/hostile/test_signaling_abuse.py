"""Abuse of the signaling server from a few loopback addresses: filling it, hoarding
connections, slowloris heads and bodies. A real server on 127.0.0.1; the addresses of
127.0.0.0/8 stand in for distinct remote clients (loopback is exempt from per-client caps
by default, so the servers here exempt nothing)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from signaling_server import ServerConfig, start_server
from signaling_server.app import RunningServer
from signaling_server.ratelimit import address_key
from signaling_server.state import InMemoryState, QuotaExceeded

OFFER = {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"}
ATTACKER = "127.0.0.2"
BYSTANDER = "127.0.0.3"

Start = Callable[..., Awaitable[RunningServer]]
Raw = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def duet_id(n: int) -> str:
    return f"{n:032x}"


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start servers (generous rate limits, no exempt networks unless given); all are
    closed after the test."""
    servers: list[RunningServer] = []

    async def _start(**config: object) -> RunningServer:
        defaults = {"rate": 1000, "burst": 5000, "exempt_networks": []}
        server = await start_server(ServerConfig(**{**defaults, **config}))
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.close()


@pytest.fixture
async def session_from() -> AsyncIterator[Callable[[str], aiohttp.ClientSession]]:
    """HTTP sessions whose connections come from a given source address."""
    sessions: list[aiohttp.ClientSession] = []

    def _session(source: str) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=10)
        )
        sessions.append(session)
        return session

    yield _session
    for session in sessions:
        await session.close()


@pytest.fixture
async def raw() -> AsyncIterator[Raw]:
    """Raw TCP connections to a server from a given source address; closed after the test."""
    writers: list[asyncio.StreamWriter] = []

    async def _open(server: RunningServer, source: str = "127.0.0.1"):
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), local_addr=(source, 0)), 5
        )
        writers.append(writer)
        return reader, writer

    yield _open
    for writer in writers:
        writer.close()


async def call(session: aiohttp.ClientSession, method: str, url: str, body: object = None):
    """(status, parsed JSON or None, headers) of one request."""
    data = json.dumps(body) if body is not None else None
    async with session.request(method, url, data=data) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None), resp.headers


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `predicate()` holds, polling; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (EOF or reset); fail after `timeout`."""

    async def drain() -> bytes:
        chunks = []
        try:
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)

    return await asyncio.wait_for(drain(), timeout)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    body = await asyncio.wait_for(reader.readexactly(int(length[1]) if length else 0), 5)
    return int(head.split(b" ", 2)[1]), body


async def post_offer(session: aiohttp.ClientSession, server: RunningServer, n: int):
    """(status, parsed JSON, headers) of posting an offer under duet_id(n)."""
    return await call(session, "POST", f"{server.url}/v1/duets/{duet_id(n)}/offer", OFFER)


def get(path: str, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + connection + b"\r\n"


async def served(server: RunningServer, raw: Raw, source: str) -> int:
    """Status of GET /health on a fresh raw connection from `source`."""
    reader, writer = await raw(server, source)
    writer.write(get("/health", close=True))
    status, _ = await read_response(reader)
    return status


# -- 1. one address cannot fill the server ------------------------------------------


async def test_quota_refuses_one_address_but_not_another(start, session_from):
    s = await start(max_entries_per_client=3, max_entries=5)
    attacker, bystander = session_from(ATTACKER), session_from(BYSTANDER)
    for n in range(3):
        assert (await post_offer(attacker, s, n))[0] == 201
    status, data, headers = await post_offer(attacker, s, 3)
    assert (status, data["error"]) == (429, "too_many_offers")
    assert "limit" in data["message"] and int(headers["Retry-After"]) >= 1
    for n in (10, 11):
        assert (await post_offer(bystander, s, n))[0] == 201
    # The global cap still holds for everyone once it is reached.
    status, data, _ = await post_offer(session_from("127.0.0.4"), s, 20)
    assert (status, data["error"]) == (503, "server_full")


async def test_concurrent_posts_cannot_overshoot_the_quota(start, session_from):
    s = await start(max_entries_per_client=3)
    attacker = session_from(ATTACKER)
    results = await asyncio.gather(*(post_offer(attacker, s, n) for n in range(12)))
    assert sorted(r[0] for r in results) == [201] * 3 + [429] * 9
    status, data, _ = await call(attacker, "GET", f"{s.url}/health")
    assert (status, data["duets"]) == (200, 3)


async def test_quota_is_released_when_offers_expire(start, session_from):
    s = await start(max_entries_per_client=2, ttl=1.5)
    attacker = session_from(ATTACKER)
    for n in range(2):
        assert (await post_offer(attacker, s, n))[0] == 201
    assert (await post_offer(attacker, s, 2))[0] == 429
    deadline = time.monotonic() + 5
    while (await call(attacker, "GET", f"{s.url}/v1/duets/{duet_id(0)}/offer"))[0] != 410:
        assert time.monotonic() < deadline, "the offer never expired"
        await asyncio.sleep(0.05)
    assert (await post_offer(attacker, s, 2))[0] == 201


def test_ipv6_clients_count_by_64_prefix():
    same = {address_key("2001:db8:1:2::1"), address_key("2001:db8:1:2:ffff:ffff:ffff:ffff")}
    assert same == {"2001:db8:1:2::/64"}
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("::ffff:192.0.2.7") == address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("192.0.2.7") != address_key("192.0.2.8")


async def test_exempt_networks_skip_per_client_caps(start, raw, session_from):
    s = await start(
        max_entries_per_client=2, max_connections_per_client=2, exempt_networks=["127.0.0.2"]
    )
    exempt = session_from(ATTACKER)
    for n in range(4):
        assert (await post_offer(exempt, s, n))[0] == 201
    held = [await raw(s, ATTACKER) for _ in range(4)]
    await until(lambda: s.open_connections == 4)
    reader, writer = held[-1]
    writer.write(get("/health"))
    assert (await read_response(reader))[0] == 200
    assert ServerConfig().exempt_networks == ["127.0.0.0/8", "::1/128"]


async def test_rotating_through_a_64_does_not_escape_the_quota():
    state = InMemoryState(60, max_entries_per_owner=2)
    for n in range(2):
        await state.put_offer(duet_id(n), "v=0", owner=address_key(f"2001:db8::{n + 1}"))
    with pytest.raises(QuotaExceeded):
        await state.put_offer(duet_id(9), "v=0", owner=address_key("2001:db8::abcd"))
    await state.put_offer(duet_id(9), "v=0", owner=address_key("2001:db8:0:1::1"))


# -- 2. connection caps -------------------------------------------------------------


async def test_connections_over_the_per_address_cap_are_closed(start, raw, session_from):
    s = await start(max_connections_per_client=4)
    held = [await raw(s, ATTACKER) for _ in range(4)]
    await until(lambda: s.open_connections == 4)
    reader, writer = await raw(s, ATTACKER)
    writer.write(get("/health"))
    assert await read_until_closed(reader, 3) == b""  # closed without an answer
    # Another address is served, and so are the connections under the cap.
    assert (await call(session_from(BYSTANDER), "GET", f"{s.url}/health"))[0] == 200
    held_reader, held_writer = held[0]
    held_writer.write(get("/health"))
    assert (await read_response(held_reader))[0] == 200
    # Closing one frees its slot.
    held[1][1].close()
    await until(lambda: s.open_connections == 3)
    assert await served(s, raw, ATTACKER) == 200


async def test_global_connection_cap_closes_excess(start, raw):
    s = await start(max_connections=3, max_connections_per_client=10)
    held = [await raw(s, ATTACKER) for _ in range(3)]
    await until(lambda: s.open_connections == 3)
    reader, _ = await raw(s, BYSTANDER)
    assert await read_until_closed(reader, 3) == b""
    held[0][1].close()
    await until(lambda: s.open_connections == 2)
    assert await served(s, raw, BYSTANDER) == 200


async def test_refused_connections_leave_no_count_behind(start, raw):
    s = await start(max_connections_per_client=4)
    for _ in range(3):
        conns = [await raw(s, ATTACKER) for _ in range(10)]
        for _, writer in conns:
            writer.close()
        await until(lambda: s.open_connections == 0)
    assert await served(s, raw, ATTACKER) == 200


# -- 3. slow heads, slow bodies, idle connections -----------------------------------


async def test_partial_head_is_closed_while_others_are_served(start, raw, session_from):
    s = await start(header_timeout=1.0)
    reader, writer = await raw(s, ATTACKER)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
    began = time.monotonic()
    closed = asyncio.create_task(read_until_closed(reader, 5))
    assert (await call(session_from(BYSTANDER), "GET", f"{s.url}/health"))[0] == 200
    assert not closed.done(), "the bystander should have been served before the cut"
    assert await closed == b""
    assert 0.9 < time.monotonic() - began < 3


async def test_trickled_head_does_not_extend_the_deadline(start, raw):
    s = await start(header_timeout=0.5)
    reader, writer = await raw(s, ATTACKER)
    writer.write(b"GET /health HTTP/1.1\r\nX-Slow: ")
    began = time.monotonic()
    closed = asyncio.create_task(read_until_closed(reader, 5))
    for _ in range(50):  # one byte every 0.1 s, up to 5 s
        if closed.done():
            break
        writer.write(b"a")
        await asyncio.sleep(0.1)
    assert await closed == b""
    assert 0.4 < time.monotonic() - began < 2


async def test_silent_connection_is_closed(start, raw):
    s = await start(header_timeout=0.5, keepalive_timeout=30)
    reader, _ = await raw(s, ATTACKER)
    began = time.monotonic()
    assert await read_until_closed(reader, 5) == b""
    assert 0.4 < time.monotonic() - began < 2
    await until(lambda: s.open_connections == 0)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_slow_body_gets_408_and_is_closed(start, raw, session_from, chunked):
    s = await start(body_timeout=0.5)
    reader, writer = await raw(s, ATTACKER)
    path = f"/v1/duets/{duet_id(1)}/offer"
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 500"
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode() + framing + b"\r\n\r\n")
    writer.write(b'5\r\n{"typ\r\n' if chunked else b'{"typ')
    began = time.monotonic()
    status, body = await read_response(reader)
    assert (status, json.loads(body)["error"]) == (408, "body_timeout")
    assert 0.4 < time.monotonic() - began < 3
    assert await read_until_closed(reader, 3) == b""
    got = await call(session_from(BYSTANDER), "GET", f"{s.url}{path}")
    assert (got[0], got[1]["error"]) == (404, "unknown_id")


async def test_idle_keepalive_connection_is_closed(start, raw):
    s = await start(keepalive_timeout=0.3, header_timeout=30)
    reader, writer = await raw(s, ATTACKER)
    writer.write(get("/health"))
    assert (await read_response(reader))[0] == 200
    began = time.monotonic()
    assert await read_until_closed(reader, 5) == b""
    assert 0.2 < time.monotonic() - began < 3


async def test_long_polls_outlive_every_deadline(start, session_from):
    s = await start(header_timeout=0.3, body_timeout=0.3, keepalive_timeout=0.3)
    host = session_from(ATTACKER)
    base = f"{s.url}/v1/duets/{duet_id(1)}"
    began = time.monotonic()
    status, data, _ = await call(host, "GET", f"{base}/offer?wait=1.2")
    assert (status, data["error"]) == (404, "unknown_id")
    assert time.monotonic() - began > 1.1
    assert (await call(host, "POST", f"{base}/offer", OFFER))[0] == 201
    began = time.monotonic()
    assert (await call(host, "GET", f"{base}/answer?wait=1.2"))[0] == 204
    assert time.monotonic() - began > 1.1


async def test_half_open_flood_does_not_starve_a_normal_request(start, raw, session_from):
    s = await start(header_timeout=1.5, max_connections_per_client=8)
    sources = [f"127.0.0.{n}" for n in range(10, 30)]
    flood = [await raw(s, source) for source in sources for _ in range(12)]
    for _, writer in flood:
        writer.write(b"POST /v1/duets/")
    await until(lambda: s.open_connections == 8 * len(sources))
    began = time.monotonic()
    assert (await call(session_from(BYSTANDER), "GET", f"{s.url}/health"))[0] == 200
    assert time.monotonic() - began < 1.0
    closed = await asyncio.gather(*(read_until_closed(r, 5) for r, _ in flood))
    assert set(closed) == {b""}
    await until(lambda: s.open_connections == 0)
