"""The signaling server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from signaling_server import ServerConfig, start_server

DUET_ID = "0123456789abcdef0123456789abcdef"
OTHER_ID = "fedcba9876543210fedcba9876543210"
OFFER = {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"}
ANSWER = {"type": "answer", "sdp": "v=0\r\no=- 2 2 IN IP4 127.0.0.1\r\n"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
async def start():
    """Start servers with the given ServerConfig fields; all are closed after the test."""
    servers = []

    async def _start(**config):
        server = await start_server(ServerConfig(**config))
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def call(http, method, url, body=None, **kw):
    """(status, parsed JSON or None, headers) of one request; dict/list bodies become JSON."""
    if isinstance(body, dict | list):
        body = json.dumps(body)
    async with http.request(method, url, data=body, **kw) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None), resp.headers


async def assert_healthy(http, url):
    status, data, _ = await call(http, "GET", f"{url}/health")
    assert status == 200 and data["status"] == "ok"


async def test_offer_answer_exchange(start, http):
    s = await start()
    base = f"{s.url}/v1/duets/{DUET_ID}"
    status, data, headers = await call(http, "POST", f"{base}/offer", OFFER)
    assert (status, data) == (201, {"duet_id": DUET_ID, "expires_in": 600.0})
    assert headers["Content-Type"].startswith("application/json")
    assert (await call(http, "GET", f"{base}/offer"))[:2] == (200, OFFER)
    assert (await call(http, "GET", f"{base}/answer?wait=0"))[:2] == (204, None)
    assert (await call(http, "POST", f"{base}/answer", ANSWER))[:2] == (201, {"duet_id": DUET_ID})
    assert (await call(http, "GET", f"{base}/answer"))[:2] == (200, ANSWER)
    assert (await call(http, "GET", f"{s.url}/health"))[:2] == (200, {"status": "ok", "duets": 1})


@pytest.mark.parametrize("kind", ["offer", "answer"])
async def test_long_poll_wakes_at_once(start, http, kind):
    s = await start()
    base = f"{s.url}/v1/duets/{DUET_ID}"
    if kind == "answer":
        await call(http, "POST", f"{base}/offer", OFFER)
    waiter = asyncio.create_task(call(http, "GET", f"{base}/{kind}?wait=10"))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    posted = time.monotonic()
    body = OFFER if kind == "offer" else ANSWER
    assert (await call(http, "POST", f"{base}/{kind}", body))[0] == 201
    status, data, _ = await asyncio.wait_for(waiter, 5)
    assert (status, data) == (200, body)
    assert time.monotonic() - posted < 0.5


async def test_long_poll_runs_out(start, http):
    s = await start()
    began = time.monotonic()
    status, data, _ = await call(http, "GET", f"{s.url}/v1/duets/{DUET_ID}/offer?wait=0.3")
    assert (status, data["error"]) == (404, "unknown_id")
    assert 0.25 < time.monotonic() - began < 3


def _bad_requests():
    base = f"/v1/duets/{DUET_ID}"
    big = json.dumps({"type": "offer", "sdp": "x" * 70_000})
    return [
        ("POST", f"{base}/offer", "{not json", 400, "malformed_json"),
        ("POST", f"{base}/offer", b"\xff\xfe\x00", 400, "malformed_json"),
        ("POST", f"{base}/offer", "[" * 5000 + "]" * 5000, 400, "malformed_json"),
        ("POST", f"{base}/offer", "", 400, "malformed_json"),
        ("POST", f"{base}/offer", [OFFER], 400, "invalid_body"),
        ("POST", f"{base}/offer", {"type": "offer"}, 400, "invalid_body"),
        ("POST", f"{base}/offer", {"type": "offer", "sdp": 5}, 400, "invalid_body"),
        ("POST", f"{base}/offer", {"type": "offer", "sdp": ""}, 400, "invalid_body"),
        ("POST", f"{base}/offer", ANSWER, 400, "invalid_body"),
        ("POST", f"{base}/offer", {"type": "offer", "sdp": "x" * 2000}, 400, "invalid_body"),
        ("POST", f"{base}/offer", big, 413, "body_too_large"),
        ("POST", f"/v1/duets/{DUET_ID.upper()}/offer", OFFER, 400, "malformed_id"),
        ("POST", f"/v1/duets/{DUET_ID}0/offer", OFFER, 400, "malformed_id"),
        ("GET", "/v1/duets/xyz/answer", None, 400, "malformed_id"),
        ("GET", f"{base}/offer?wait=abc", None, 400, "invalid_wait"),
        ("GET", f"{base}/offer?wait=-1", None, 400, "invalid_wait"),
        ("GET", f"{base}/offer?wait=nan", None, 400, "invalid_wait"),
        ("GET", f"{base}/offer", None, 404, "unknown_id"),
        ("GET", f"{base}/answer", None, 404, "unknown_id"),
        ("POST", f"{base}/answer", ANSWER, 404, "unknown_id"),
        ("DELETE", f"{base}/offer", None, 405, "method_not_allowed"),
        ("PUT", "/health", None, 405, "method_not_allowed"),
        ("GET", "/v1/nothing/here", None, 404, "not_found"),
        ("GET", "/", None, 404, "not_found"),
    ]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), _bad_requests())
async def test_bad_input_gets_json_error(start, http, method, path, body, status, code):
    s = await start(max_body=65536, max_sdp=1000)
    got, data, headers = await call(http, method, s.url + path, body)
    assert (got, data["error"]) == (status, code)
    assert isinstance(data["message"], str) and data["message"]
    assert headers["Content-Type"].startswith("application/json")
    await assert_healthy(http, s.url)


async def test_chunked_oversize_body_is_refused(start, http):
    s = await start(max_body=4096)

    async def chunks():
        for _ in range(16):
            yield b"x" * 1024

    status, data, _ = await call(http, "POST", f"{s.url}/v1/duets/{DUET_ID}/offer", chunks())
    assert (status, data["error"]) == (413, "body_too_large")
    await assert_healthy(http, s.url)


async def test_second_offer_and_answer_conflict(start, http):
    s = await start()
    base = f"{s.url}/v1/duets/{DUET_ID}"
    assert (await call(http, "POST", f"{base}/offer", OFFER))[0] == 201
    status, data, _ = await call(http, "POST", f"{base}/offer", OFFER)
    assert (status, data["error"]) == (409, "offer_exists")
    assert (await call(http, "POST", f"{base}/answer", ANSWER))[0] == 201
    status, data, _ = await call(http, "POST", f"{base}/answer", {**ANSWER, "sdp": "v=1"})
    assert (status, data["error"]) == (409, "answer_exists")
    assert (await call(http, "GET", f"{base}/answer"))[:2] == (200, ANSWER)


async def test_expired_id_answers_410(start, http):
    s = await start(ttl=0.3)
    base = f"{s.url}/v1/duets/{DUET_ID}"
    assert (await call(http, "POST", f"{base}/offer", OFFER))[0] == 201
    await asyncio.sleep(0.4)
    for method, kind, body in [
        ("GET", "offer", None),
        ("GET", "answer", None),
        ("POST", "answer", ANSWER),
    ]:
        status, data, _ = await call(http, method, f"{base}/{kind}", body)
        assert (status, data["error"]) == (410, "expired"), (method, kind)
    # The owner may post again under the same ID.
    assert (await call(http, "POST", f"{base}/offer", OFFER))[0] == 201


async def test_expiry_ends_a_long_poll(start, http):
    s = await start(ttl=0.3)
    base = f"{s.url}/v1/duets/{DUET_ID}"
    await call(http, "POST", f"{base}/offer", OFFER)
    began = time.monotonic()
    status, data, _ = await call(http, "GET", f"{base}/answer?wait=10")
    assert (status, data["error"]) == (410, "expired")
    assert time.monotonic() - began < 2


async def test_rate_limit(start, http):
    s = await start(rate=1, burst=3)
    for _ in range(3):
        await assert_healthy(http, s.url)
    status, data, headers = await call(http, "GET", f"{s.url}/health")
    assert (status, data["error"]) == (429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1


async def test_full_server_refuses_new_ids(start, http):
    s = await start(max_entries=1)
    assert (await call(http, "POST", f"{s.url}/v1/duets/{DUET_ID}/offer", OFFER))[0] == 201
    status, data, headers = await call(http, "POST", f"{s.url}/v1/duets/{OTHER_ID}/offer", OFFER)
    assert (status, data["error"]) == (503, "server_full")
    assert "Retry-After" in headers


async def test_concurrent_long_polls_are_capped(start, http):
    s = await start(max_waits_per_client=1)
    url = f"{s.url}/v1/duets/{DUET_ID}/offer"
    waiter = asyncio.create_task(call(http, "GET", f"{url}?wait=5"))
    await asyncio.sleep(0.2)
    status, data, _ = await call(http, "GET", f"{url}?wait=5")
    assert (status, data["error"]) == (429, "too_many_waits")
    await call(http, "POST", url, OFFER)
    assert (await asyncio.wait_for(waiter, 5))[0] == 200


async def test_close_ends_open_long_polls(http):
    s = await start_server(ServerConfig())
    waiter = asyncio.create_task(call(http, "GET", f"{s.url}/v1/duets/{DUET_ID}/offer?wait=30"))
    await asyncio.sleep(0.2)
    began = time.monotonic()
    await s.close()
    await asyncio.wait_for(asyncio.gather(waiter, return_exceptions=True), 5)
    assert time.monotonic() - began < 4


async def test_ice_servers_with_turn_rest_credentials(start, http):
    stun = {"urls": "stun:127.0.0.1:3478"}
    turn_urls = ["turn:127.0.0.1:3478?transport=udp", "turns:127.0.0.1:5349"]
    s = await start(ice_servers=[stun], turn_secret="s3cret", turn_urls=turn_urls, turn_ttl=600)
    status, data, headers = await call(http, "GET", f"{s.url}/v1/ice-servers")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    first, turn = data["iceServers"]
    assert first == stun and turn["urls"] == turn_urls
    expiry, label = turn["username"].split(":")
    assert label == "duet" and abs(int(expiry) - (time.time() + 600)) < 5
    mac = hmac.new(b"s3cret", turn["username"].encode(), hashlib.sha1).digest()
    assert turn["credential"] == base64.b64encode(mac).decode()


async def test_ice_servers_plain(start, http):
    s = await start()
    assert (await call(http, "GET", f"{s.url}/v1/ice-servers"))[:2] == (200, {"iceServers": []})


@pytest.mark.parametrize(
    "config",
    [
        {"ice_servers": [{"urls": "http://127.0.0.1"}]},
        {"ice_servers": [{"urls": []}]},
        {"ice_servers": [{"urls": "stun:127.0.0.1", "password": "x"}]},
        {"ice_servers": {"urls": "stun:127.0.0.1"}},
        {"turn_secret": "s"},
        {"turn_secret": "s", "turn_urls": ["stun:127.0.0.1"]},
        {"ttl": 0},
        {"max_body": 0},
        {"max_entries_per_client": 0},
        {"max_connections": 0},
        {"max_connections_per_client": 0},
        {"header_timeout": 0},
        {"body_timeout": -1},
        {"keepalive_timeout": float("nan")},
        {"exempt_networks": ["not-a-network"]},
        {"exempt_networks": "127.0.0.1"},
    ],
)
def test_bad_config_is_refused(config):
    with pytest.raises(ValueError):
        ServerConfig(**config)


async def test_info_log_has_ids_and_sizes_not_sdp(start, http, caplog):
    caplog.set_level(logging.DEBUG)
    marker = "a=secret-marker-7f3a"
    s = await start()
    base = f"{s.url}/v1/duets/{DUET_ID}"
    await call(http, "POST", f"{base}/offer", {"type": "offer", "sdp": f"v=0\r\n{marker}\r\n"})
    await call(http, "GET", f"{base}/offer")
    await call(http, "POST", f"{base}/answer", {"type": "answer", "sdp": f"{marker}\r\n"})
    await call(http, "GET", f"{base}/answer")
    assert "offer posted for duet 01234567" in caplog.text
    assert marker not in caplog.text


def test_cli_sets_the_abuse_limits():
    from signaling_server.__main__ import _parser, config_from_args

    args = _parser().parse_args(
        "--max-entries-per-client 5 --max-connections 50 --max-connections-per-client 4 "
        "--header-timeout 2.5 --body-timeout 3 --keepalive-timeout 1 "
        "--exempt-networks 10.0.0.0/8,2001:db8::/32".split()
    )
    config = config_from_args(args)
    assert (config.max_entries_per_client, config.max_connections) == (5, 50)
    assert config.max_connections_per_client == 4
    assert (config.header_timeout, config.body_timeout, config.keepalive_timeout) == (2.5, 3, 1)
    assert config.exempt_networks == ["10.0.0.0/8", "2001:db8::/32"]
    assert config_from_args(_parser().parse_args(["--exempt-networks", ""])).exempt_networks == []
    defaults = config_from_args(_parser().parse_args([]))
    assert defaults.max_entries_per_client == ServerConfig().max_entries_per_client


async def spawn_cli(*args):
    """`python -m signaling_server ARGS` with pipes, run from the repository."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "signaling_server",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=env,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_cli_serves_and_stops_on_signal(http, sig):
    proc = await spawn_cli("--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING")
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        match = re.fullmatch(
            r"duet signaling server listening on (http://127\.0\.0\.1:\d+)\n", line
        )
        assert match, line
        await assert_healthy(http, match.group(1))
        proc.send_signal(sig)
        began = time.monotonic()
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        assert time.monotonic() - began < 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_refuses_bad_ice_servers():
    proc = await spawn_cli("--port", "0", "--ice-servers", "[{nope")
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert b"--ice-servers" in err
