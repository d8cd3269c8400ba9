"""Standing hosts on the signaling server: scientists post offers to a host, the host proves
its key and long-polls for them, answers or refuses each. A real server on 127.0.0.1 and
SignalingClient; the attacks; a hostile server; the in-memory registry with a fake clock."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from duet_p2p.errors import ConnectionTimeout, SignalingError, SignalingNotFound
from duet_p2p.signaling.client import HostProofRefused, SignalingClient
from duet_p2p.signaling.client import wait_message as client_wait_message
from signaling_server import ServerConfig, start_server
from signaling_server.app import RunningServer
from signaling_server.hosts import (
    CHALLENGE_BYTES,
    CHALLENGE_TTL,
    MAX_CHALLENGES,
    HostOffer,
    HostRegistry,
    host_id_of,
    wait_message,
)
from signaling_server.state import StateFull

REPO = Path(__file__).resolve().parents[2]
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"
ANSWER_SDP = "v=0\r\no=- 2 2 IN IP4 127.0.0.1\r\n"


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Host:
    """A standing host: its key, and the next challenge it holds."""

    def __init__(self, client: SignalingClient) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_key = public_bytes(self.key)
        self.id = host_id_of(self.public_key)
        self.client = client
        self.challenge: bytes | None = None

    async def wait(self, wait: float = 0.0) -> list[dict]:
        challenge = self.challenge or await self.client.host_challenge(self.id)
        self.challenge = None
        signature = self.key.sign(wait_message(self.id, challenge))
        offers, self.challenge = await self.client.host_wait(
            self.id,
            public_key=self.public_key,
            challenge=challenge,
            signature=signature,
            wait=wait,
        )
        return offers

    async def answer(self, offer_id: str, sdp: str = ANSWER_SDP) -> None:
        answer = {
            "type": "answer",
            "sdp": sdp,
            "public_key": self.public_key,
            "signature": self.key.sign(sdp.encode()),
        }
        await self.client.post_host_answer(self.id, offer_id, answer)


class Scientist:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_key = public_bytes(self.key)
        self.id = host_id_of(self.public_key)
        self.nonce = os.urandom(32)

    async def offer(self, client: SignalingClient, host_id: str, sdp: str = SDP) -> str:
        return await client.post_host_offer(
            host_id,
            sdp=sdp,
            client_id=self.id,
            public_key=self.public_key,
            nonce=self.nonce,
            signature=self.key.sign(self.nonce),
        )

    def body(self, sdp: str = SDP) -> dict:
        return {
            "type": "offer",
            "sdp": sdp,
            "client_id": self.id,
            "public_key": b64(self.public_key),
            "nonce": b64(self.nonce),
            "signature": b64(self.key.sign(self.nonce)),
        }


Start = Callable[..., Awaitable[tuple[RunningServer, SignalingClient]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start servers (generous rate limits) with a client each; all closed after the test."""
    opened: list[tuple[RunningServer, SignalingClient]] = []

    async def _start(**config: object) -> tuple[RunningServer, SignalingClient]:
        server = await start_server(ServerConfig(**{"rate": 1000, "burst": 5000, **config}))
        client = SignalingClient(server.url, request_timeout=5.0)
        opened.append((server, client))
        return server, client

    yield _start
    for server, client in opened:
        await client.close()
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, body: object = None):
    """(status, parsed JSON or None, headers) of one request."""
    data = json.dumps(body) if body is not None else None
    async with http.request(method, url, data=data) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None), resp.headers


# -- the exchange ----------------------------------------------------------------------


async def test_round_trip(start):
    _, c = await start()
    host, sci = Host(c), Scientist()
    assert not await c.host_online(host.id)
    waiting = asyncio.create_task(host.wait(wait=10))
    deadline = time.monotonic() + 5
    while not await c.host_online(host.id):
        assert time.monotonic() < deadline, "host never came online"
        await asyncio.sleep(0.02)
    offer_id = await sci.offer(c, host.id)
    [offer] = await asyncio.wait_for(waiting, 5)
    assert offer == {
        "offer_id": offer_id,
        "sdp": SDP,
        "client_id": sci.id,
        "public_key": sci.public_key,
        "nonce": sci.nonce,
        "signature": sci.key.sign(sci.nonce),
        "age": offer["age"],
    }
    assert 0 <= offer["age"] < 5
    answer_task = asyncio.create_task(c.wait_host_answer(host.id, offer_id, timeout=10))
    await asyncio.sleep(0.1)
    assert not answer_task.done()
    await host.answer(offer_id)
    answer = await asyncio.wait_for(answer_task, 5)
    assert answer == {
        "type": "answer",
        "sdp": ANSWER_SDP,
        "public_key": host.public_key,
        "signature": host.key.sign(ANSWER_SDP.encode()),
    }
    assert await c.host_online(host.id)  # the wait ended less than host_idle ago


async def test_several_offers_each_answered_separately(start):
    _, c = await start()
    host = Host(c)
    await host.wait()
    scientists = [Scientist() for _ in range(3)]
    ids = [await s.offer(c, host.id, sdp=f"{SDP}a=n:{i}\r\n") for i, s in enumerate(scientists)]
    assert len(set(ids)) == 3
    offers = await host.wait(wait=5)
    assert [o["offer_id"] for o in offers] == ids  # oldest first
    assert [o["client_id"] for o in offers] == [s.id for s in scientists]
    assert await host.wait() == []  # delivered offers left the queue
    for i in (2, 0, 1):
        await host.answer(ids[i], sdp=f"answer {i}")
    for i, offer_id in enumerate(ids):
        answer = await c.wait_host_answer(host.id, offer_id, timeout=1)
        assert answer["sdp"] == f"answer {i}"


async def test_refusal_reaches_the_scientist_cleaned(start):
    _, c = await start()
    host = Host(c)
    await host.wait()
    offer_id = await Scientist().offer(c, host.id)
    await c.post_host_answer(host.id, offer_id, {"type": "refusal", "reason": "full\x1b[31m"})
    assert await c.wait_host_answer(host.id, offer_id, timeout=1) == {
        "type": "refusal",
        "reason": "full?[31m",
    }
    assert await host.wait() == []  # a refused offer is not delivered any more


async def test_wait_answer_times_out(start):
    _, c = await start()
    host = Host(c)
    await host.wait()
    offer_id = await Scientist().offer(c, host.id)
    began = time.monotonic()
    with pytest.raises(ConnectionTimeout, match="did not answer within 0.4 s"):
        await c.wait_host_answer(host.id, offer_id, timeout=0.4)
    assert time.monotonic() - began < 3


async def test_offline_host_refuses_offers(start):
    _, c = await start(host_idle=0.3)
    host, sci = Host(c), Scientist()
    with pytest.raises(SignalingNotFound, match="is not serving now"):
        await sci.offer(c, host.id)
    await host.wait()
    assert await c.host_online(host.id)
    await sci.offer(c, host.id)
    await asyncio.sleep(0.4)
    assert not await c.host_online(host.id)
    with pytest.raises(SignalingNotFound, match="is not serving now"):
        await sci.offer(c, host.id)


async def test_a_newer_wait_replaces_the_older(start):
    _, c = await start()
    host = Host(c)
    first = asyncio.create_task(host.wait(wait=10))
    await asyncio.sleep(0.2)
    other = Host(c)  # same key, its own challenge
    other.key, other.public_key, other.id = host.key, host.public_key, host.id
    second = asyncio.create_task(other.wait(wait=10))
    assert await asyncio.wait_for(first, 5) == []
    offer_id = await Scientist().offer(c, host.id)
    [offer] = await asyncio.wait_for(second, 5)
    assert offer["offer_id"] == offer_id


async def test_closing_the_server_wakes_the_host(start):
    server, c = await start()
    host = Host(c)
    waiting = asyncio.create_task(host.wait(wait=20))
    await asyncio.sleep(0.2)
    began = time.monotonic()
    await server.close()
    assert await asyncio.wait_for(waiting, 5) == []
    assert time.monotonic() - began < 4


async def test_offers_expire(start):
    _, c = await start(ttl=0.3)
    host = Host(c)
    await host.wait()
    offer_id = await Scientist().offer(c, host.id)
    await asyncio.sleep(0.4)
    assert await host.wait() == []
    with pytest.raises(SignalingNotFound, match="expired"):
        await c.wait_host_answer(host.id, offer_id, timeout=1)
    with pytest.raises(SignalingNotFound, match="expired"):
        await host.answer(offer_id)


# -- limits and refusals ---------------------------------------------------------------


async def test_per_host_cap(start, http):
    server, c = await start(max_offers_per_host=2)
    host, sci = Host(c), Scientist()
    await host.wait()
    first = await sci.offer(c, host.id)
    await sci.offer(c, host.id)
    with pytest.raises(SignalingError, match="host_busy"):
        await sci.offer(c, host.id)
    status, data, headers = await call(
        http, "POST", f"{server.url}/v1/hosts/{host.id}/offers", sci.body()
    )
    assert (status, data["error"]) == (503, "host_busy")
    assert int(headers["Retry-After"]) >= 1
    assert len(await host.wait()) == 2  # delivered but unanswered: still pending
    with pytest.raises(SignalingError, match="host_busy"):
        await sci.offer(c, host.id)
    await host.answer(first)
    await sci.offer(c, host.id)  # an answered offer no longer counts


async def test_per_client_quota_applies_to_host_offers(start):
    _, c = await start(max_entries_per_client=2, exempt_networks=[])
    host, sci = Host(c), Scientist()
    await host.wait()
    await sci.offer(c, host.id)
    await sci.offer(c, host.id)
    with pytest.raises(SignalingError, match="too_many_offers"):
        await sci.offer(c, host.id)


async def test_answer_accepted_once(start):
    _, c = await start()
    host = Host(c)
    await host.wait()
    offer_id = await Scientist().offer(c, host.id)
    await host.answer(offer_id)
    with pytest.raises(SignalingError, match="answer_exists"):
        await host.answer(offer_id, sdp="another")
    with pytest.raises(SignalingError, match="answer_exists"):
        await c.post_host_answer(host.id, offer_id, {"type": "refusal", "reason": "no"})
    assert (await c.wait_host_answer(host.id, offer_id, timeout=0))["sdp"] == ANSWER_SDP


async def test_offer_of_one_host_is_unknown_under_another(start, http):
    server, c = await start()
    host, other = Host(c), Host(c)
    await host.wait()
    await other.wait()
    offer_id = await Scientist().offer(c, host.id)
    with pytest.raises(SignalingNotFound):
        await other.answer(offer_id)
    with pytest.raises(SignalingNotFound):
        await c.post_host_answer(other.id, offer_id, {"type": "refusal", "reason": "x"})
    with pytest.raises(SignalingNotFound):
        await c.wait_host_answer(other.id, offer_id, timeout=0)
    # An answer must carry the key of the host it is posted for.
    forged = {
        "type": "answer",
        "sdp": ANSWER_SDP,
        "public_key": b64(other.public_key),
        "signature": b64(bytes(64)),
    }
    url = f"{server.url}/v1/hosts/{host.id}/offers/{offer_id}/answer"
    status, data, _ = await call(http, "POST", url, forged)
    assert (status, data["error"]) == (403, "not_host")
    await host.answer(offer_id)  # still open for the real host


async def test_malformed_requests_are_refused(start, http):
    server, c = await start()
    host, sci = Host(c), Scientist()
    await host.wait()
    url = f"{server.url}/v1/hosts/{host.id}/offers"
    good = sci.body()
    key = good["public_key"]
    bad_bodies = [
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "nonce"},
        {**good, "type": "answer"},
        {**good, "client_id": Scientist().id},  # not the ID of public_key
        {**good, "client_id": sci.id.upper()},
        {**good, "public_key": key.rstrip("=")},  # unpadded
        {**good, "public_key": key[:-2] + "B="},  # non-canonical trailing bits
        {**good, "public_key": "\n" + key[1:]},
        {**good, "nonce": b64(bytes(31))},
        {**good, "signature": b64(bytes(65))},
        {**good, "sdp": ""},
        {**good, "sdp": "x" * 40000},
        [good],
    ]
    for body in bad_bodies:
        status, data, _ = await call(http, "POST", url, body)
        assert status == 400, body
        assert data["error"] in ("invalid_body", "malformed_json"), body
    status, data, _ = await call(http, "POST", f"{server.url}/v1/hosts/{'Z' * 32}/offers", good)
    assert (status, data["error"]) == (400, "malformed_id")
    status, data, _ = await call(http, "GET", f"{url}/{'a' * 32}/answer?wait=nan")
    assert (status, data["error"]) == (400, "invalid_wait")
    long_reason = {"type": "refusal", "reason": "x" * 501}
    offer_id = await sci.offer(c, host.id)
    status, data, _ = await call(http, "POST", f"{url}/{offer_id}/answer", long_reason)
    assert (status, data["error"]) == (400, "invalid_body")
    assert await host.wait() != []  # nothing above consumed the offer


# -- a third party cannot drain the host's offers ---------------------------------------


async def test_third_parties_cannot_take_offers(start):
    _, c = await start()
    host, thief = Host(c), Host(c)
    seen_challenge = await c.host_challenge(host.id)
    seen_signature = host.key.sign(wait_message(host.id, seen_challenge))
    await c.host_wait(
        host.id,
        public_key=host.public_key,
        challenge=seen_challenge,
        signature=seen_signature,
        wait=0,
    )
    sci = Scientist()
    offer_ids = [await sci.offer(c, host.id) for _ in range(2)]

    async def attempt(public_key: bytes, challenge: bytes, signature: bytes) -> None:
        with pytest.raises(HostProofRefused, match="refused the host's proof"):
            await c.host_wait(
                host.id, public_key=public_key, challenge=challenge, signature=signature, wait=0
            )

    def fresh() -> Awaitable[bytes]:
        return c.host_challenge(host.id)

    # Its own key, signing properly, on the host's challenge: not the host's key.
    ch = await fresh()
    await attempt(thief.public_key, ch, thief.key.sign(wait_message(host.id, ch)))
    # The host's public key with the thief's signature, or a made-up one.
    ch = await fresh()
    await attempt(host.public_key, ch, thief.key.sign(wait_message(host.id, ch)))
    ch = await fresh()
    await attempt(host.public_key, ch, os.urandom(64))
    # The host's signature over another message (its own ID signed for another challenge).
    ch, other_ch = await fresh(), await fresh()
    await attempt(host.public_key, ch, host.key.sign(wait_message(host.id, other_ch)))
    # A challenge issued for another host, signed by the real host.
    ch = await c.host_challenge(thief.id)
    await attempt(host.public_key, ch, host.key.sign(wait_message(host.id, ch)))
    # A challenge never issued.
    ch = os.urandom(CHALLENGE_BYTES)
    await attempt(host.public_key, ch, host.key.sign(wait_message(host.id, ch)))
    # A replay of the wait the host made before the offers came (its challenge is spent).
    await attempt(host.public_key, seen_challenge, seen_signature)
    # The offers are still queued for the real host.
    offers = await host.wait()
    assert [o["offer_id"] for o in offers] == offer_ids


async def test_a_failed_attempt_does_not_spend_the_challenge(start):
    _, c = await start()
    host = Host(c)
    ch = await c.host_challenge(host.id)
    signature = host.key.sign(wait_message(host.id, ch))
    with pytest.raises(HostProofRefused):  # a forged signature on the host's challenge
        await c.host_wait(
            host.id, public_key=host.public_key, challenge=ch, signature=bytes(64), wait=0
        )
    await c.host_wait(
        host.id, public_key=host.public_key, challenge=ch, signature=signature, wait=0
    )
    with pytest.raises(HostProofRefused):  # spent by the valid wait: a replay is refused
        await c.host_wait(
            host.id, public_key=host.public_key, challenge=ch, signature=signature, wait=0
        )


async def test_a_challenge_flood_evicts_nothing(start):
    _, c = await start()
    host = Host(c)
    await host.wait()  # now holds a challenge handed out with the wait response
    assert host.challenge is not None
    public = await c.host_challenge(host.id)
    for _ in range(100):
        await c.host_challenge(host.id)  # anyone may ask, as often as the rate limit allows
    signature = host.key.sign(wait_message(host.id, public))
    await c.host_wait(
        host.id, public_key=host.public_key, challenge=public, signature=signature, wait=0
    )
    assert await host.wait() == []  # the chained challenge still works too
    with pytest.raises(HostProofRefused):
        await c.host_wait(
            host.id, public_key=host.public_key, challenge=public, signature=signature, wait=0
        )


async def test_a_refused_long_poll_slot_leaves_the_challenge_usable(start, http):
    server, c = await start(max_waits_per_client=1)
    host, other = Host(c), Host(c)
    blocking = asyncio.create_task(other.wait(wait=10))  # holds this address's one slot
    deadline = time.monotonic() + 5
    while not await c.host_online(other.id):
        assert time.monotonic() < deadline, "the other host never came online"
        await asyncio.sleep(0.02)
    ch = await c.host_challenge(host.id)
    body = {
        "public_key": b64(host.public_key),
        "challenge": b64(ch),
        "signature": b64(host.key.sign(wait_message(host.id, ch))),
    }
    url = f"{server.url}/v1/hosts/{host.id}/wait"
    status, data, _ = await call(http, "POST", f"{url}?wait=5", body)
    assert (status, data["error"]) == (429, "too_many_waits")
    status, data, _ = await call(http, "POST", f"{url}?wait=0", body)  # needs no slot
    assert status == 200 and data["offers"] == []
    status, data, _ = await call(http, "POST", f"{url}?wait=0", body)
    assert (status, data["error"]) == (403, "not_host")  # now it is spent
    blocking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocking


async def test_a_full_spent_set_refuses_waits(start, http):
    server, c = await start(max_entries=1)  # room for MAX_CHALLENGES spent challenges
    host = Host(c)
    for _ in range(MAX_CHALLENGES):
        await host.wait()
    ch = await c.host_challenge(host.id)
    body = {
        "public_key": b64(host.public_key),
        "challenge": b64(ch),
        "signature": b64(host.key.sign(wait_message(host.id, ch))),
    }
    status, data, _ = await call(http, "POST", f"{server.url}/v1/hosts/{host.id}/wait", body)
    assert (status, data["error"]) == (503, "server_full")
    with pytest.raises(SignalingError, match="HTTP 503 server_full"):
        await host.wait()


# -- a hostile server ------------------------------------------------------------------

HOST_ID = "0123456789abcdef0123456789abcdef"
OFFER_ID = "fedcba9876543210fedcba9876543210"
_sci = Scientist()
GOOD_OFFER = {
    "offer_id": OFFER_ID,
    "sdp": SDP,
    "client_id": _sci.id,
    "public_key": b64(_sci.public_key),
    "nonce": b64(_sci.nonce),
    "signature": b64(bytes(64)),
    "age": 1.5,
}


def _hostile_offers() -> list[object]:
    bad: list[object] = [
        "not an offer",
        {**GOOD_OFFER, "offer_id": "X" * 32},
        {**GOOD_OFFER, "client_id": Scientist().id},  # not the ID of the key
        {**GOOD_OFFER, "public_key": b64(bytes(31))},
        {**GOOD_OFFER, "nonce": "!!!!"},
        {**GOOD_OFFER, "signature": b64(bytes(64)).rstrip("=")},
        {**GOOD_OFFER, "sdp": 5},
        {**GOOD_OFFER, "sdp": "x" * 70000},
        {**GOOD_OFFER, "age": -1},
        {**GOOD_OFFER, "age": True},
        {**GOOD_OFFER, "extra": 1},
    ]
    return [*bad, GOOD_OFFER, GOOD_OFFER]  # the duplicate is dropped


RESPONSES: dict[str, object] = {
    "online": {"host_id": HOST_ID, "online": "yes"},
    "online_other": {"host_id": OFFER_ID, "online": True},
    "offer": {"offer_id": "../../x", "expires_in": 600},
    "challenge": {"challenge": b64(bytes(16)), "expires_in": 60},
    "wait_shape": {"offers": {"a": 1}, "challenge": b64(bytes(CHALLENGE_BYTES))},
    "wait_challenge": {"offers": [], "challenge": "A" * 43},
    "wait_mixed": {"offers": _hostile_offers(), "challenge": b64(bytes(CHALLENGE_BYTES))},
    "wait_many": {"offers": [GOOD_OFFER] * 40, "challenge": b64(bytes(CHALLENGE_BYTES))},
    "answer_key": {"type": "answer", "sdp": SDP, "public_key": "AA==", "signature": b64(bytes(64))},
    "answer_extra": {"type": "refusal", "reason": "x", "sdp": SDP},
    "refusal_long": {"type": "refusal", "reason": "\x00" * 100_000},
}


@pytest.fixture
async def hostile() -> AsyncIterator[Callable[[str, int], Awaitable[SignalingClient]]]:
    """A fake signaling server answering every request with one canned response."""
    runners: list[web.AppRunner] = []
    clients: list[SignalingClient] = []

    async def _serve(name: str, status: int = 200) -> SignalingClient:
        async def handler(request: web.Request) -> web.Response:
            if name == "nan_age":
                text = json.dumps(
                    {"offers": [GOOD_OFFER], "challenge": b64(bytes(CHALLENGE_BYTES))}
                )
                text = text.replace('"age": 1.5', '"age": NaN')
                return web.Response(text=text, status=status, content_type="application/json")
            return web.json_response(RESPONSES[name], status=status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        client = SignalingClient(f"http://{host}:{port}", request_timeout=2.0)
        clients.append(client)
        return client

    yield _serve
    for client in clients:
        await client.close()
    for runner in runners:
        await runner.cleanup()


def _wait_args() -> dict:
    challenge = bytes(CHALLENGE_BYTES)
    return {"public_key": bytes(32), "challenge": challenge, "signature": bytes(64), "wait": 0}


async def test_client_refuses_hostile_responses(hostile):
    with pytest.raises(SignalingError, match="malformed host status"):
        await (await hostile("online")).host_online(HOST_ID)
    with pytest.raises(SignalingError, match="malformed host status"):
        await (await hostile("online_other")).host_online(HOST_ID)
    with pytest.raises(SignalingError, match="malformed offer ID"):
        await _sci.offer(await hostile("offer", 201), HOST_ID)
    with pytest.raises(SignalingError, match="malformed challenge"):
        await (await hostile("challenge")).host_challenge(HOST_ID)
    with pytest.raises(SignalingError, match="malformed host offers"):
        await (await hostile("wait_shape")).host_wait(HOST_ID, **_wait_args())
    with pytest.raises(SignalingError, match="malformed challenge"):
        await (await hostile("wait_challenge")).host_wait(HOST_ID, **_wait_args())
    for name in ("answer_key", "answer_extra"):
        with pytest.raises(SignalingError, match="malformed host answer"):
            await (await hostile(name)).wait_host_answer(HOST_ID, OFFER_ID, timeout=1)
    with pytest.raises(HostProofRefused):
        await (await hostile("online", 403)).host_wait(HOST_ID, **_wait_args())
    with pytest.raises(SignalingError, match="HTTP 500"):
        await _sci.offer(await hostile("online", 500), HOST_ID)


async def test_client_skips_malformed_offers(hostile):
    offers, challenge = await (await hostile("wait_mixed")).host_wait(HOST_ID, **_wait_args())
    assert challenge == bytes(CHALLENGE_BYTES)
    assert [o["offer_id"] for o in offers] == [OFFER_ID]
    assert offers[0]["public_key"] == _sci.public_key and offers[0]["age"] == 1.5
    offers, _ = await (await hostile("wait_many")).host_wait(HOST_ID, **_wait_args())
    assert len(offers) == 1  # at most 16 looked at, duplicates dropped
    offers, _ = await (await hostile("nan_age")).host_wait(HOST_ID, **_wait_args())
    assert offers == []


async def test_client_cleans_and_caps_a_refusal_reason(hostile):
    refusal = await (await hostile("refusal_long")).wait_host_answer(HOST_ID, OFFER_ID, timeout=1)
    assert refusal["type"] == "refusal"
    assert len(refusal["reason"]) <= 503 and refusal["reason"].startswith("???")


# -- the registry, with a fake clock -----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _offer(sdp: str = SDP) -> HostOffer:
    s = Scientist()
    return HostOffer(sdp, s.id, s.public_key, s.nonce, bytes(64))


async def test_registry_issuing_challenges_stores_nothing():
    reg = HostRegistry(600)
    a = "a" * 32
    own = await reg.new_challenge(a)
    flood = [await reg.new_challenge(a) for _ in range(1000)]
    assert len(own) == CHALLENGE_BYTES and len(set(flood)) == 1000
    assert not reg._spent and not reg._hosts
    assert await reg.check_challenge(a, own) and await reg.check_challenge(a, flood[0])
    assert await reg.check_challenge(a, own)  # checking spends nothing
    assert await reg.take_challenge(a, own)
    assert not await reg.check_challenge(a, own)
    assert not await reg.take_challenge(a, own)  # one-time
    assert await reg.take_challenge(a, flood[-1])


async def test_registry_refuses_forged_expired_and_foreign_challenges():
    clock = Clock()
    reg, other_reg = HostRegistry(600, clock=clock), HostRegistry(600, clock=clock)
    a, b = "a" * 32, "b" * 32
    good = await reg.new_challenge(a)
    expiry = int.from_bytes(good[16:24], "big")
    assert expiry == 1000 + CHALLENGE_TTL
    later = good[:16] + (expiry + 3600).to_bytes(8, "big") + good[24:]
    forged = [
        bytes([good[0] ^ 1]) + good[1:],  # random part changed
        later,  # expiry pushed back, same MAC
        good[:-1] + bytes([good[-1] ^ 1]),  # MAC changed
        os.urandom(CHALLENGE_BYTES),
        bytes(CHALLENGE_BYTES),
        good[:-1],
        good + b"\x00",
        b"",
        await reg.new_challenge(b),  # issued for another host
        await other_reg.new_challenge(a),  # issued by another server (another secret)
    ]
    for challenge in forged:
        assert not await reg.check_challenge(a, challenge), challenge
        assert not await reg.take_challenge(a, challenge), challenge
    assert not await reg.take_challenge(b, good)
    assert not reg._spent  # refused proofs remember nothing
    clock.now += CHALLENGE_TTL - 1
    assert await reg.check_challenge(a, good)
    clock.now += 1
    assert not await reg.check_challenge(a, good)
    assert not await reg.take_challenge(a, good)


async def test_registry_spent_set_is_bounded_and_fails_closed():
    clock = Clock()
    reg = HostRegistry(600, max_spent=3, clock=clock)
    a = "a" * 32
    early = [await reg.new_challenge(a) for _ in range(2)]
    clock.now += 30
    late = [await reg.new_challenge(a) for _ in range(2)]
    for challenge in [*early, late[0]]:
        assert await reg.take_challenge(a, challenge)
    with pytest.raises(StateFull):
        await reg.take_challenge(a, late[1])
    assert await reg.check_challenge(a, late[1])  # a refusal spends nothing
    clock.now += 31  # the early ones expired: their places are free again
    assert await reg.take_challenge(a, late[1])
    assert not await reg.take_challenge(a, late[0])  # still remembered until it expires
    assert len(reg._spent) == 2
    clock.now += 30
    await reg.sweep()
    assert not reg._spent and not reg._spent_order


async def test_registry_hosts_and_offers_are_bounded():
    clock = Clock()
    reg = HostRegistry(600, host_idle=60, max_entries=2, clock=clock)
    await reg.wait_offers("a" * 32, 0)
    await reg.wait_offers("b" * 32, 0)
    with pytest.raises(StateFull):
        await reg.wait_offers("c" * 32, 0)  # both still online
    await reg.put_offer("a" * 32, _offer())
    await reg.put_offer("a" * 32, _offer())
    with pytest.raises(StateFull):
        await reg.put_offer("b" * 32, _offer())
    clock.now += 61
    await reg.wait_offers("c" * 32, 0)  # idle b was dropped; a still holds offers
    assert await reg.online("c" * 32) and not await reg.online("a" * 32)
    clock.now += 600
    assert await reg.sweep() == 2
    assert await reg.count() == 0
    assert not reg._hosts  # idle, and no offers left


async def test_registry_delivery_is_bounded_by_size():
    reg = HostRegistry(600)
    host_id = "a" * 32
    await reg.wait_offers(host_id, 0)
    for _ in range(6):
        await reg.put_offer(host_id, _offer("\x01" * 30000))  # 6 JSON characters each
    first, _ = await reg.wait_offers(host_id, 0)
    second, _ = await reg.wait_offers(host_id, 0)
    assert 1 <= len(first) < 6 and len(first) + len(second) == 6
    for _ in range(20):
        await reg.put_offer(host_id, _offer())
    third, _ = await reg.wait_offers(host_id, 0)
    assert len(third) == 16


def test_wait_message_is_the_same_on_both_sides():
    challenge = bytes(range(32))
    assert client_wait_message(HOST_ID, challenge) == wait_message(HOST_ID, challenge)
    assert wait_message(HOST_ID, challenge) == (
        b"\x00\x00\x00\x15duet_p2p host wait v1"
        + b"\x00\x00\x00\x20"
        + HOST_ID.encode()
        + b"\x00\x00\x00\x20"
        + challenge
    )


def test_server_does_not_import_the_library():
    code = (
        "import signaling_server.app, sys; "
        "bad = [m for m in sys.modules if m.startswith(('duet_p2p', 'torch'))]; "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
