"""SignalingClient against a real signaling server, and against hostile ones."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiohttp import web

from duet_p2p.errors import (
    ConfigurationError,
    ConnectionTimeout,
    SignalingError,
    SignalingNotFound,
)
from duet_p2p.signaling import SignalingClient
from signaling_server import ServerConfig, start_server

DUET_ID = "0123456789abcdef0123456789abcdef"
OFFER_SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"
ANSWER_SDP = "v=0\r\no=- 2 2 IN IP4 127.0.0.1\r\n"


@pytest.fixture
async def client():
    async with await start_server(ServerConfig()) as server, SignalingClient(server.url) as c:
        yield c


async def test_round_trip(client):
    await client.post_offer(DUET_ID, OFFER_SDP)
    assert await client.get_offer(DUET_ID, wait=0) == OFFER_SDP
    waiter = asyncio.create_task(client.wait_answer(DUET_ID, timeout=10))
    await asyncio.sleep(0.1)
    await client.post_answer(DUET_ID, ANSWER_SDP)
    assert await asyncio.wait_for(waiter, 5) == ANSWER_SDP
    assert await client.ice_servers() == []


async def test_get_offer_waits_for_the_owner(client):
    waiter = asyncio.create_task(client.get_offer(DUET_ID, wait=10))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await client.post_offer(DUET_ID, OFFER_SDP)
    assert await asyncio.wait_for(waiter, 5) == OFFER_SDP


async def test_wait_answer_times_out_in_time(client):
    await client.post_offer(DUET_ID, OFFER_SDP)
    began = time.monotonic()
    with pytest.raises(ConnectionTimeout, match="did not join within 0.5 s"):
        await client.wait_answer(DUET_ID, timeout=0.5)
    assert 0.4 < time.monotonic() - began < 2


async def test_get_offer_unknown_id(client):
    began = time.monotonic()
    with pytest.raises(SignalingNotFound, match=DUET_ID):
        await client.get_offer(DUET_ID, wait=0.3)
    assert time.monotonic() - began < 2


async def test_errors_map_to_exceptions(client):
    with pytest.raises(SignalingNotFound, match="expired or be mistyped"):
        await client.wait_answer(DUET_ID, timeout=1)
    with pytest.raises(SignalingNotFound, match="expired or be mistyped"):
        await client.post_answer(DUET_ID, ANSWER_SDP)
    with pytest.raises(SignalingNotFound, match="not a Duet ID"):
        await client.get_offer("ABC", wait=0)
    await client.post_offer(DUET_ID, OFFER_SDP)
    with pytest.raises(SignalingError, match="offer_exists") as info:
        await client.post_offer(DUET_ID, OFFER_SDP)
    assert not isinstance(info.value, SignalingNotFound)
    await client.post_answer(DUET_ID, ANSWER_SDP)
    with pytest.raises(SignalingError, match="answer was already accepted"):
        await client.post_answer(DUET_ID, ANSWER_SDP)
    with pytest.raises(SignalingError, match="invalid_body"):
        await client.post_offer("f" * 32, "")


async def test_expired_id_is_not_found():
    server = await start_server(ServerConfig(ttl=0.3))
    async with server, SignalingClient(server.url) as c:
        await c.post_offer(DUET_ID, OFFER_SDP)
        await asyncio.sleep(0.4)
        with pytest.raises(SignalingNotFound, match="expired"):
            await c.get_offer(DUET_ID, wait=0)


async def test_unreachable_server_says_how_to_start_one():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with SignalingClient(url) as c:
        with pytest.raises(SignalingError, match="python -m signaling_server") as info:
            await c.post_offer(DUET_ID, OFFER_SDP)
    assert url in str(info.value)


def test_bad_url_is_a_configuration_error():
    with pytest.raises(ConfigurationError):
        SignalingClient("ftp://127.0.0.1/")
    with pytest.raises(ConfigurationError):
        SignalingClient("127.0.0.1:8765")


# -- a hostile server ------------------------------------------------------------------


async def _huge(request):
    return web.Response(body=b"[" + b"0," * 600_000 + b"0]", content_type="application/json")


async def _huge_streamed(request):
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    for _ in range(40):
        await resp.write(b" " * 65536)
    await resp.write_eof()
    return resp


async def _html(request):
    return web.Response(text="<html>hello</html>", content_type="text/html")


async def _wrong_shape(request):
    return web.json_response({"type": "answer", "sdp": 7})


async def _error_page(request):
    return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")


async def _slow(request):
    await asyncio.sleep(5)
    return web.json_response({})


@pytest.fixture
async def hostile():
    app = web.Application()
    app.router.add_get("/v1/ice-servers", _huge)
    app.router.add_get(f"/v1/duets/{DUET_ID}/offer", _huge_streamed)
    app.router.add_get(f"/v1/duets/{DUET_ID}/answer", _wrong_shape)
    app.router.add_get("/v1/duets/" + "a" * 32 + "/offer", _html)
    app.router.add_post(f"/v1/duets/{DUET_ID}/offer", _error_page)
    app.router.add_post(f"/v1/duets/{DUET_ID}/answer", _slow)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


async def test_client_refuses_hostile_responses(hostile):
    async with SignalingClient(hostile, request_timeout=1.0) as c:
        with pytest.raises(SignalingError, match="larger than"):
            await c.ice_servers()
        with pytest.raises(SignalingError, match="larger than"):
            await c.get_offer(DUET_ID, wait=0)
        with pytest.raises(SignalingError, match="not JSON"):
            await c.get_offer("a" * 32, wait=0)
        with pytest.raises(SignalingError, match="malformed answer"):
            await c.wait_answer(DUET_ID, timeout=1)
        with pytest.raises(SignalingError, match="HTTP 502"):
            await c.post_offer(DUET_ID, OFFER_SDP)
        began = time.monotonic()
        with pytest.raises(SignalingError, match="did not answer within"):
            await c.post_answer(DUET_ID, ANSWER_SDP)
        assert time.monotonic() - began < 3
