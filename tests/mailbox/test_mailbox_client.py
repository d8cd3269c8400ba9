"""MailboxClient against a small fake mailbox server, and against hostile ones."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from duet_p2p.errors import SignalingError
from duet_p2p.identity import Identity
from duet_p2p.mailbox.client import (
    MAX_DELETE_IDS,
    Delivered,
    MailboxClient,
    MailboxProofRefused,
    mailbox_message,
)
from duet_p2p.mailbox.envelope import open_envelope, seal_envelope


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class FakeMailbox:
    """The mailbox API in memory: one-time challenges, signed fetch and delete."""

    def __init__(self) -> None:
        self.boxes: dict[str, list[dict[str, Any]]] = {}
        self.challenges: set[bytes] = set()
        self.challenge_requests = 0
        self.fetch_bodies: list[dict[str, Any]] = []
        self.refuse_all = False
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/mailbox/{rid}", self.post)
        app.router.add_post("/v1/mailbox/{rid}/challenge", self.challenge)
        app.router.add_post("/v1/mailbox/{rid}/fetch", self.fetch)
        app.router.add_post("/v1/mailbox/{rid}/delete", self.delete)
        return app

    async def post(self, request: web.Request) -> web.Response:
        body = await request.json()
        message_id = os.urandom(16).hex()
        self.boxes.setdefault(request.match_info["rid"], []).append({
            "message_id": message_id, "sender_id": body["sender_id"],
            "envelope": body["envelope"], "posted_at": time.time(),
        })  # fmt: skip
        self.arrived.set()
        return web.json_response({"message_id": message_id, "expires_in": 3600}, status=201)

    async def challenge(self, request: web.Request) -> web.Response:
        self.challenge_requests += 1
        challenge = os.urandom(40)
        self.challenges.add(challenge)
        return web.json_response({"challenge": _b64(challenge), "expires_in": 60})

    def _proved(self, rid: str, body: dict[str, Any], action: bytes) -> bool:
        key = base64.b64decode(body["public_key"])
        challenge = base64.b64decode(body["challenge"])
        if self.refuse_all or challenge not in self.challenges:
            return False
        if hashlib.sha256(key).hexdigest()[:32] != rid:
            return False
        try:
            VerifyKey(key).verify(
                mailbox_message(rid, challenge, action), base64.b64decode(body["signature"])
            )
        except BadSignatureError:
            return False
        self.challenges.discard(challenge)
        return True

    async def fetch(self, request: web.Request) -> web.Response:
        rid, body = request.match_info["rid"], await request.json()
        self.fetch_bodies.append(body)
        if not self._proved(rid, body, b"fetch"):
            return web.json_response({"error": "bad_proof", "message": "no"}, status=403)
        wait = float(request.query.get("wait", "0"))
        if not self.boxes.get(rid) and wait > 0:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), wait)
            except TimeoutError:
                pass
        messages = self.boxes.get(rid, [])
        if "after" in body:
            ids = [m["message_id"] for m in messages]
            messages = messages[ids.index(body["after"]) + 1 :] if body["after"] in ids else []
        challenge = os.urandom(40)
        self.challenges.add(challenge)
        return web.json_response({"messages": messages, "challenge": _b64(challenge)})

    async def delete(self, request: web.Request) -> web.Response:
        rid, body = request.match_info["rid"], await request.json()
        if not self._proved(rid, body, b"delete"):
            return web.json_response({"error": "bad_proof"}, status=403)
        box = self.boxes.get(rid, [])
        keep = [m for m in box if m["message_id"] not in body["message_ids"]]
        self.boxes[rid] = keep
        return web.json_response({"deleted": len(box) - len(keep)})


async def _serve(app: web.Application):
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest.fixture
async def fake():
    mailbox = FakeMailbox()
    runner, url = await _serve(mailbox.app())
    yield mailbox, url
    await runner.cleanup()


async def test_post_fetch_delete(fake):
    server, url = fake
    host, scientist = Identity.generate(), Identity.generate()
    envelope = seal_envelope(scientist, host.id, host.public_key, "job", b"train please")
    async with MailboxClient(url, scientist) as outbox, MailboxClient(url, host) as inbox:
        message_id = await outbox.post(host.id, envelope)
        assert await outbox.fetch() == []  # the scientist's own mailbox is empty
        (delivered,) = await inbox.fetch()
        assert delivered.message_id == message_id and delivered.envelope == envelope
        assert delivered.sender_id == scientist.id and delivered.posted_at > 0
        opened = open_envelope(host, delivered.envelope, sender_id=delivered.sender_id)
        assert opened.payload == b"train please"
        assert await inbox.fetch(after=message_id) == []
        assert await inbox.delete([message_id, message_id]) == 1
        assert await inbox.fetch() == []
        assert await inbox.delete([]) == 0


async def test_challenges_are_chained(fake):
    server, url = fake
    host = Identity.generate()
    async with MailboxClient(url, host) as inbox:
        await inbox.fetch()
        assert server.challenge_requests == 1
        await inbox.fetch()
        await inbox.fetch()
        assert server.challenge_requests == 1  # each fetch brought the next challenge
        await inbox.delete(["a" * 32])  # uses the kept challenge, which brings none back
        assert server.challenge_requests == 1
        await inbox.fetch()
        assert server.challenge_requests == 2
        server.challenges.clear()  # the server forgot (or expired) the kept challenge
        await inbox.fetch()
        assert server.challenge_requests == 3
        assert len({b["challenge"] for b in server.fetch_bodies}) == len(server.fetch_bodies)


async def test_a_refused_proof_raises(fake):
    server, url = fake
    server.refuse_all = True
    async with MailboxClient(url, Identity.generate()) as inbox:
        with pytest.raises(MailboxProofRefused, match="bad_proof"):
            await inbox.fetch()
        with pytest.raises(MailboxProofRefused):
            await inbox.delete(["1" * 32])


async def test_fetch_waits_for_a_message(fake):
    server, url = fake
    host, scientist = Identity.generate(), Identity.generate()
    envelope = seal_envelope(scientist, host.id, host.public_key, "job", b"x")
    async with MailboxClient(url, scientist) as outbox, MailboxClient(url, host) as inbox:
        waiter = asyncio.create_task(inbox.fetch(wait=10))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        await outbox.post(host.id, envelope)
        (delivered,) = await asyncio.wait_for(waiter, 5)
        assert delivered.envelope == envelope
        began = time.monotonic()
        assert await inbox.fetch(wait=0.4, after=delivered.message_id) == []
        assert 0.3 < time.monotonic() - began < 3


async def test_arguments_are_checked(fake):
    _, url = fake
    async with MailboxClient(url, Identity.generate()) as client:
        with pytest.raises(ValueError):
            await client.post("not-an-id", b"x")
        with pytest.raises(ValueError):
            await client.post("a" * 32, b"")
        with pytest.raises(ValueError):
            await client.post("a" * 32, b"x" * (512 * 1024 + 1))
        with pytest.raises(ValueError):
            await client.fetch(wait=-1)
        with pytest.raises(TypeError):
            await client.fetch(wait=True)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await client.fetch(after="../x")
        with pytest.raises(ValueError):
            await client.delete(["ok", "not ok"])


def test_mailbox_message_layout():
    message = mailbox_message("ab" * 16, b"C" * 40, b"fetch")
    expected = (
        (19).to_bytes(4, "big") + b"duet_p2p mailbox v1" + (32).to_bytes(4, "big") + b"ab" * 16
        + (40).to_bytes(4, "big") + b"C" * 40 + (5).to_bytes(4, "big") + b"fetch"
    )  # fmt: skip
    assert message == expected
    assert mailbox_message("ab" * 16, b"C" * 40, b"delete") != message
    with pytest.raises(ValueError):
        mailbox_message("ab" * 16, b"C" * 40, b"read")
    assert "envelope" not in repr(Delivered("m", "a" * 32, b"secret", 1.0)).split("(")[1]


# -- hostile servers -------------------------------------------------------------------

SENDER = "c" * 32
M1, M2 = "1" * 32, "2" * 32
GOOD_CHALLENGE = _b64(b"k" * 40)


def _message(**changes: Any) -> dict[str, Any]:
    message = {"message_id": M1, "sender_id": SENDER, "envelope": _b64(b"env"),
               "posted_at": 1.0}  # fmt: skip
    message.update(changes)
    return {k: v for k, v in message.items() if v is not ...}


class Hostile:
    """Answers every mailbox call with whatever the test set."""

    def __init__(self) -> None:
        self.fetch: Callable[[], web.StreamResponse] = lambda: web.json_response(
            {"messages": [], "challenge": GOOD_CHALLENGE}
        )
        self.challenge: Callable[[], web.StreamResponse] = lambda: web.json_response(
            {"challenge": GOOD_CHALLENGE, "expires_in": 60}
        )
        self.post: Callable[[], web.StreamResponse] = lambda: web.json_response(
            {"message_id": M1, "expires_in": 60}, status=201
        )
        self.delete: Callable[[], web.StreamResponse] = lambda: web.json_response({"deleted": 1})

    def app(self) -> web.Application:
        app = web.Application()

        def route(name: str):
            async def handler(request: web.Request) -> web.StreamResponse:
                await request.read()
                return getattr(self, name)()

            return handler

        app.router.add_post("/v1/mailbox/{rid}", route("post"))
        for name in ("challenge", "fetch", "delete"):
            app.router.add_post(f"/v1/mailbox/{{rid}}/{name}", route(name))
        return app


@pytest.fixture
async def hostile():
    server = Hostile()
    runner, url = await _serve(server.app())
    async with MailboxClient(url, Identity.generate(), request_timeout=2.0) as client:
        yield server, client
    await runner.cleanup()


def _json(body: Any, status: int = 200) -> Callable[[], web.StreamResponse]:
    return lambda: web.json_response(body, status=status)


MALFORMED_FETCHES = [
    {"messages": {}, "challenge": GOOD_CHALLENGE},
    {"challenge": GOOD_CHALLENGE},
    {"messages": []},
    {"messages": [], "challenge": _b64(b"k" * 8)},
    {"messages": [], "challenge": _b64(b"k" * 65)},
    {"messages": [], "challenge": GOOD_CHALLENGE.rstrip("=") + "A"},
    {"messages": [], "challenge": "not base64!"},
    {"messages": [], "challenge": 7},
    {"messages": ["x"], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(extra=1)], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(posted_at=...)], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(message_id="../etc")], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(message_id=7)], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(message_id="a" * 33)], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(sender_id="C" * 32)], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(envelope="ZW5=")], "challenge": GOOD_CHALLENGE},  # not canonical
    {"messages": [_message(envelope="")], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(envelope=_b64(bytes(512 * 1024 + 1)))], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(posted_at=float("nan"))], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(posted_at=True)], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(posted_at=-1)], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(posted_at="1")], "challenge": GOOD_CHALLENGE},
    {"messages": [_message(), _message()], "challenge": GOOD_CHALLENGE},
    {
        "messages": [_message(message_id=f"{i:032x}") for i in range(65)],
        "challenge": GOOD_CHALLENGE,
    },
    [],
    "messages",
]


@pytest.mark.parametrize("body", MALFORMED_FETCHES)
async def test_malformed_fetch_responses_are_refused(hostile, body):
    server, client = hostile
    server.fetch = _json(body)
    with pytest.raises(SignalingError, match="malformed"):
        await client.fetch()
    assert client._challenge is None  # nothing kept from a malformed answer


async def test_a_wellformed_fetch_is_accepted(hostile):
    server, client = hostile
    server.fetch = _json({"messages": [_message(), _message(message_id=M2)],
                          "challenge": GOOD_CHALLENGE, "later": "ignored"})  # fmt: skip
    delivered = await client.fetch()
    assert [d.message_id for d in delivered] == [M1, M2]
    assert delivered[0].envelope == b"env" and delivered[0].sender_id == SENDER


async def test_other_hostile_answers_are_refused(hostile):
    server, client = hostile
    server.fetch = lambda: web.Response(text="<html>hi</html>", content_type="text/html")
    with pytest.raises(SignalingError, match="not JSON"):
        await client.fetch()
    server.fetch = lambda: web.Response(
        body=b'{"messages": [' + b"0," * (2 << 20) + b'0], "challenge": ""}',
        content_type="application/json",
    )
    with pytest.raises(SignalingError, match="larger than"):
        await client.fetch()
    server.fetch = lambda: web.Response(status=302, headers={"Location": "http://127.0.0.1:1/"})
    with pytest.raises(SignalingError, match="HTTP 302"):
        await client.fetch()
    server.fetch = _json({"error": "quota", "message": "x" * 5000 + "\x1b[31m"}, status=429)
    with pytest.raises(SignalingError, match="HTTP 429 quota") as info:
        await client.fetch()
    assert "\x1b" not in str(info.value) and len(str(info.value)) < 600


@pytest.mark.parametrize(
    "body",
    [
        {"challenge": _b64(b"k" * 15), "expires_in": 60},
        {"challenge": GOOD_CHALLENGE},
        {"challenge": GOOD_CHALLENGE, "expires_in": float("inf")},
        {"challenge": None, "expires_in": 60},
        ["challenge"],
    ],
)
async def test_malformed_challenges_are_refused(hostile, body):
    server, client = hostile
    server.challenge = _json(body)
    with pytest.raises(SignalingError, match="malformed challenge"):
        await client.fetch()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"message_id": M1}, 201),
        ({"message_id": "A" * 32, "expires_in": 60}, 201),
        ({"message_id": None, "expires_in": 60}, 201),
        ({"message_id": M1, "expires_in": -5}, 201),
        ({"message_id": M1, "expires_in": 60}, 200),
        ({"error": "too_large"}, 413),
    ],
)
async def test_malformed_post_answers_are_refused(hostile, body, status):
    server, client = hostile
    server.post = _json(body, status)
    with pytest.raises(SignalingError):
        await client.post("a" * 32, b"envelope")


@pytest.mark.parametrize("deleted", [2, -1, True, 1.0, None, "1"])
async def test_malformed_delete_counts_are_refused(hostile, deleted):
    server, client = hostile
    server.delete = _json({"deleted": deleted})
    with pytest.raises(SignalingError, match="malformed count"):
        await client.delete([M1])


async def test_many_deletes_go_in_batches(hostile):
    server, client = hostile
    assert await client.delete([f"{i:032x}" for i in range(MAX_DELETE_IDS + 5)]) == 2


async def test_against_the_real_signaling_server():
    """The same client against signaling_server's mailbox: a message and a whole stream,
    long-polled, fetched page by page (challenges chained), opened and deleted."""
    from duet_p2p.mailbox.stream import StreamAssembler, seal_stream
    from signaling_server import ServerConfig, start_server

    host, scientist = Identity.generate(), Identity.generate()
    data = os.urandom(1_500_000)
    async with (
        await start_server(ServerConfig()) as server,
        MailboxClient(server.url, scientist) as outbox,
        MailboxClient(server.url, host) as inbox,
    ):
        job = seal_envelope(scientist, host.id, host.public_key, "job", b"train please")
        first = await outbox.post(host.id, job)
        waiter = asyncio.create_task(inbox.fetch(wait=10, after=first))
        await asyncio.sleep(0.2)
        for envelope in seal_stream(scientist, host.id, host.public_key, "result", data):
            await outbox.post(host.id, envelope)
        assert len(await asyncio.wait_for(waiter, 5)) >= 1
        delivered: list[Delivered] = []
        while batch := await inbox.fetch(after=delivered[-1].message_id if delivered else None):
            delivered += batch
        assert len(delivered) == 1 + 1 + 6
        opened = open_envelope(host, delivered[0].envelope, sender_id=delivered[0].sender_id)
        assert opened.payload == b"train please"
        assembler = StreamAssembler(host, sender_id=scientist.id, max_bytes=len(data))
        for message in reversed(delivered[1:]):
            assembler.add(message.envelope)
        assert assembler.payload() == data
        assert await inbox.delete([m.message_id for m in delivered]) == len(delivered)
        assert await inbox.fetch() == []
