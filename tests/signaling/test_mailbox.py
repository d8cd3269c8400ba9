"""The mailbox on the signaling server: anyone posts sealed envelopes for a recipient ID,
only the recipient (a signed one-time challenge) fetches and deletes them. A real server on
127.0.0.1; the attacks; quotas; expiry with a fake clock; the SQLite backend across a
restart; the state backends directly."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from duet_p2p.signaling.client import SignalingClient
from signaling_server import ServerConfig, start_server
from signaling_server.app import RunningServer
from signaling_server.hosts import CHALLENGE_BYTES, host_id_of, wait_message
from signaling_server.mailbox import (
    FETCH_BUDGET,
    MAX_FETCH,
    InMemoryMailbox,
    MailboxFull,
    MailboxLimits,
    MailboxStoreError,
    SenderQuotaExceeded,
    SqliteMailbox,
    mailbox_message,
)
from signaling_server.state import StateFull

REPO = Path(__file__).resolve().parents[2]
SENDER = "5e" * 16


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Recipient:
    """A key holder and what it signs."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_key = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.id = host_id_of(self.public_key)

    def proof(self, challenge: bytes, action: bytes, **extra: object) -> dict:
        signature = self.key.sign(mailbox_message(self.id, challenge, action))
        return {
            "public_key": b64(self.public_key),
            "challenge": b64(challenge),
            "signature": b64(signature),
            **extra,
        }


class Api:
    """Raw HTTP calls to one server."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def call(self, path: str, body: object = None, data: bytes | None = None):
        """(status, parsed JSON or None) of one POST."""
        if data is None:
            data = json.dumps(body).encode() if body is not None else b""
        async with self.http.post(self.url + path, data=data) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None)

    async def post(self, recipient_id: str, envelope: bytes, sender_id: str = SENDER):
        body = {"sender_id": sender_id, "envelope": b64(envelope)}
        return await self.call(f"/v1/mailbox/{recipient_id}", body)

    async def challenge(self, recipient_id: str) -> bytes:
        status, data = await self.call(f"/v1/mailbox/{recipient_id}/challenge")
        assert status == 200 and data["expires_in"] == 60
        return base64.b64decode(data["challenge"])

    async def fetch(self, who: Recipient, wait: float = 0, after: str | None = None):
        body = who.proof(await self.challenge(who.id), b"fetch")
        if after is not None:
            body["after"] = after
        return await self.call(f"/v1/mailbox/{who.id}/fetch?wait={wait}", body)

    async def messages(self, who: Recipient, **options: object) -> list[dict]:
        status, data = await self.fetch(who, **options)
        assert status == 200, data
        return data["messages"]

    async def delete(self, who: Recipient, ids: list[str]):
        body = who.proof(await self.challenge(who.id), b"delete", message_ids=ids)
        return await self.call(f"/v1/mailbox/{who.id}/delete", body)


Start = Callable[..., Awaitable[tuple[RunningServer, Api]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start servers (generous rate limits); all closed after the test."""
    opened: list[tuple[RunningServer, aiohttp.ClientSession]] = []

    async def _start(mailbox=None, **config: object) -> tuple[RunningServer, Api]:
        settings = {"rate": 1000, "burst": 5000, **config}
        server = await start_server(ServerConfig(**settings), mailbox=mailbox)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        opened.append((server, http))
        return server, Api(server.url, http)

    yield _start
    for server, http in opened:
        await http.close()
        await server.close()


# -- the exchange ----------------------------------------------------------------------


async def test_post_fetch_delete_round_trip(start):
    _, api = await start()
    bob = Recipient()
    status, first = await api.post(bob.id, b"sealed one")
    assert status == 201 and first["expires_in"] == 7 * 86400
    status, second = await api.post(bob.id, b"sealed two", sender_id="77" * 16)
    assert status == 201 and first["message_id"] != second["message_id"]

    status, data = await api.fetch(bob)
    assert status == 200 and len(base64.b64decode(data["challenge"])) == CHALLENGE_BYTES
    got = data["messages"]
    assert [m["message_id"] for m in got] == [first["message_id"], second["message_id"]]
    assert [base64.b64decode(m["envelope"]) for m in got] == [b"sealed one", b"sealed two"]
    assert [m["sender_id"] for m in got] == [SENDER, "77" * 16]
    assert got[0]["posted_at"] <= got[1]["posted_at"]
    assert set(got[0]) == {"message_id", "sender_id", "envelope", "posted_at"}

    # The next challenge is chained; fetching deletes nothing; `after` is a cursor.
    body = bob.proof(base64.b64decode(data["challenge"]), b"fetch", after=first["message_id"])
    status, data = await api.call(f"/v1/mailbox/{bob.id}/fetch", body)
    assert status == 200 and [m["message_id"] for m in data["messages"]] == [second["message_id"]]
    assert len(await api.messages(bob, after=second["message_id"])) == 0
    assert len(await api.messages(bob, after="00" * 16)) == 2  # unknown cursor: from the oldest

    status, data = await api.delete(bob, [first["message_id"], first["message_id"]])
    assert (status, data) == (200, {"deleted": 1})
    assert [m["message_id"] for m in await api.messages(bob)] == [second["message_id"]]
    assert (await api.delete(bob, [second["message_id"], "ab" * 16]))[1] == {"deleted": 1}
    assert await api.messages(bob) == []


async def test_long_poll_wakes_on_post(start):
    _, api = await start()
    bob = Recipient()
    waiting = asyncio.create_task(api.fetch(bob, wait=10))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await api.post(Recipient().id, b"for someone else")
    await asyncio.sleep(0.2)
    assert not waiting.done()
    _, posted = await api.post(bob.id, b"wake up")
    status, data = await asyncio.wait_for(waiting, 5)
    assert status == 200 and [m["message_id"] for m in data["messages"]] == [posted["message_id"]]


async def test_long_poll_times_out_empty_and_closing_wakes_it(start):
    server, api = await start(max_wait=0.3)
    bob = Recipient()
    assert await asyncio.wait_for(api.messages(bob, wait=30), 5) == []  # capped at max_wait
    server2, api2 = await start()
    waiting = asyncio.create_task(api2.fetch(bob, wait=20))
    await asyncio.sleep(0.2)
    await asyncio.wait_for(server2.close(), 5)
    status, data = await asyncio.wait_for(waiting, 5)
    assert status in (200, 503) and not (data or {}).get("messages")


async def test_full_size_messages_fit_one_response_of_the_real_client(start):
    _, api = await start()
    bob = Recipient()
    big = [os.urandom(512 * 1024) for _ in range(2)]
    for envelope in big:
        assert (await api.post(bob.id, envelope))[0] == 201
    client = SignalingClient(api.url, request_timeout=10)  # reads 1 MiB of a response, at most
    try:
        got = []
        for _ in range(2):
            after = {"after": got[-1]["message_id"]} if got else {}
            body = bob.proof(await api.challenge(bob.id), b"fetch", **after)
            status, data = await client._request("POST", f"/v1/mailbox/{bob.id}/fetch", body)
            assert status == 200 and len(data["messages"]) == 1  # two do not fit one response
            got += data["messages"]
    finally:
        await client.close()
    assert [base64.b64decode(m["envelope"]) for m in got] == big


# -- only the recipient ------------------------------------------------------------------


async def test_only_the_recipient_fetches_or_deletes(start):
    _, api = await start()
    bob, eve = Recipient(), Recipient()
    _, posted = await api.post(bob.id, b"for bob only")
    ch = await api.challenge(bob.id)
    host_ch = base64.b64decode((await api.call(f"/v1/hosts/{bob.id}/challenge"))[1]["challenge"])
    spent = await api.challenge(bob.id)
    assert (await api.call(f"/v1/mailbox/{bob.id}/fetch", bob.proof(spent, b"fetch")))[0] == 200
    eve_ch = await api.challenge(eve.id)

    def forged(action: bytes, other: bytes) -> list[dict]:
        eve_sig = b64(eve.key.sign(mailbox_message(bob.id, ch, action)))
        host_sig = b64(bob.key.sign(wait_message(bob.id, ch)))
        good = bob.proof(ch, action)
        return [
            eve.proof(ch, action),  # eve's key: its ID is not bob's
            {**good, "public_key": b64(eve.public_key), "signature": eve_sig},
            {**good, "signature": eve_sig},  # bob's key, eve's signature
            {**good, "signature": b64(bytes(64))},
            bob.proof(ch, other),  # signed for the other action
            bob.proof(eve_ch, action),  # eve's challenge
            bob.proof(host_ch, action),  # a host challenge for the same ID
            bob.proof(spent, action),  # replayed
            bob.proof(bytes(CHALLENGE_BYTES), action),
            {**good, "signature": host_sig},  # a host wait signature over the same challenge
            {k: v for k, v in good.items() if k != "signature"},
            {**good, "challenge": b64(ch)[:-4]},
            {**good, "public_key": b64(bob.public_key + b"\x00")},
        ]

    for body in forged(b"fetch", b"delete"):
        status, data = await api.call(f"/v1/mailbox/{bob.id}/fetch", body)
        assert (status, data["error"]) == (403, "not_recipient"), body
        assert "messages" not in data
    for body in forged(b"delete", b"fetch"):
        body["message_ids"] = [posted["message_id"]]
        status, data = await api.call(f"/v1/mailbox/{bob.id}/delete", body)
        assert (status, data["error"]) == (403, "not_recipient"), body
    # Nothing was deleted, and no failed attempt spent bob's challenge.
    status, data = await api.call(f"/v1/mailbox/{bob.id}/fetch", bob.proof(ch, b"fetch"))
    assert status == 200 and [m["message_id"] for m in data["messages"]] == [posted["message_id"]]
    # Eve proving her own key deletes nothing of bob's.
    assert (await api.delete(eve, [posted["message_id"]]))[1] == {"deleted": 0}
    assert len(await api.messages(bob)) == 1


async def test_a_refused_long_poll_slot_leaves_the_challenge_usable(start):
    _, api = await start(max_waits_per_client=0)
    bob = Recipient()
    ch = await api.challenge(bob.id)
    status, data = await api.call(f"/v1/mailbox/{bob.id}/fetch?wait=5", bob.proof(ch, b"fetch"))
    assert (status, data["error"]) == (429, "too_many_waits")
    status, _ = await api.call(f"/v1/mailbox/{bob.id}/fetch?wait=0", bob.proof(ch, b"fetch"))
    assert status == 200


async def test_a_challenge_flood_changes_nothing(start):
    mailbox = InMemoryMailbox()
    _, api = await start(mailbox=mailbox)
    bob = Recipient()
    own = await api.challenge(bob.id)
    flood = await asyncio.gather(*(api.challenge(bob.id) for _ in range(300)))
    assert len(set(flood)) == 300 and not mailbox._challenges.spent
    assert await mailbox.count() == 0
    assert (await api.call(f"/v1/mailbox/{bob.id}/fetch", bob.proof(own, b"fetch")))[0] == 200
    assert len(mailbox._challenges.spent) == 1


# -- quotas and sizes -----------------------------------------------------------------------


async def test_per_recipient_quotas(start):
    _, api = await start(
        mailbox_max_messages_per_recipient=3,
        mailbox_max_bytes_per_recipient=2048,
        mailbox_max_message_bytes=1024,
    )
    bob, carol = Recipient(), Recipient()
    ids = [(await api.post(bob.id, b"x"))[1]["message_id"] for _ in range(3)]
    status, data = await api.post(bob.id, b"x")
    assert (status, data["error"]) == (507, "mailbox_full")
    assert "mailbox of " + bob.id in data["message"] and "fetch and delete" in data["message"]
    assert (await api.post(carol.id, b"x"))[0] == 201  # other mailboxes are not affected
    await api.delete(bob, ids[:1])
    assert (await api.post(bob.id, b"x"))[0] == 201  # room again

    assert (await api.post(carol.id, os.urandom(1024)))[0] == 201
    status, data = await api.post(carol.id, os.urandom(1024))
    assert (status, data["error"]) == (507, "mailbox_full")  # 1 + 1024 + 1024 > 2048 bytes
    status, data = await api.post(carol.id, os.urandom(1025))
    assert (status, data["error"]) == (400, "invalid_body")
    assert "1 to 1024 bytes" in data["message"]


async def test_per_client_quota(start):
    _, api = await start(exempt_networks=[], mailbox_max_messages_per_client=3)
    for _ in range(3):
        assert (await api.post(Recipient().id, b"x"))[0] == 201
    status, data = await api.post(Recipient().id, b"x")
    assert (status, data["error"]) == (429, "too_many_messages")
    assert "this address" in data["message"]
    _, api2 = await start(mailbox_max_messages_per_client=3)  # loopback is exempt by default
    for _ in range(4):
        assert (await api2.post(Recipient().id, b"x"))[0] == 201


async def test_per_client_byte_quota(start):
    _, api = await start(
        exempt_networks=[], mailbox_max_bytes_per_client=2000, mailbox_max_message_bytes=1000
    )
    assert (await api.post(Recipient().id, bytes(1000)))[0] == 201
    assert (await api.post(Recipient().id, bytes(1000)))[0] == 201
    status, data = await api.post(Recipient().id, b"x")
    assert (status, data["error"]) == (429, "too_many_messages")


async def test_global_caps(start):
    _, api = await start(mailbox_max_messages=2)
    assert (await api.post(Recipient().id, b"x"))[0] == 201
    assert (await api.post(Recipient().id, b"x"))[0] == 201
    status, data = await api.post(Recipient().id, b"x")
    assert (status, data["error"]) == (503, "server_full")
    _, api = await start(mailbox_max_bytes=1500, mailbox_max_message_bytes=1000)
    assert (await api.post(Recipient().id, bytes(1000)))[0] == 201
    status, data = await api.post(Recipient().id, bytes(501))
    assert (status, data["error"]) == (503, "server_full")


async def test_malformed_and_oversize_requests_are_refused(start):
    _, api = await start(mailbox_max_message_bytes=3000)
    bob = Recipient()
    box = f"/v1/mailbox/{bob.id}"
    good = {"sender_id": SENDER, "envelope": b64(b"ok")}
    bad_posts = [
        ({"sender_id": SENDER}, "invalid_body"),
        ({**good, "extra": 1}, "invalid_body"),
        ({**good, "sender_id": SENDER.upper()}, "invalid_body"),
        ({**good, "sender_id": 5}, "invalid_body"),
        ({**good, "envelope": ""}, "invalid_body"),
        ({**good, "envelope": "b2s"}, "invalid_body"),  # unpadded
        ({**good, "envelope": "b2t="}, "invalid_body"),  # not canonical
        ({**good, "envelope": "b2s=\n"}, "invalid_body"),
        ({**good, "envelope": ["b2s="]}, "invalid_body"),
        ([good], "invalid_body"),
    ]
    for body, code in bad_posts:
        status, data = await api.call(box, body)
        assert (status, data["error"]) == (400, code), body
    for raw in (b"{", b"", b'{"sender_id": "a", "sender_id": "b", "envelope": "b2s="}', b"\xff"):
        status, data = await api.call(box, data=raw)
        assert (status, data["error"]) == (400, "malformed_json"), raw
    huge = json.dumps({"sender_id": SENDER, "envelope": b64(bytes(6000))}).encode()
    status, data = await api.call(box, data=huge)
    assert (status, data["error"]) == (413, "body_too_large")

    async def chunks():
        for _ in range(100):
            yield b" " * 1000

    async with api.http.post(api.url + box, data=chunks()) as resp:  # no Content-Length
        assert resp.status == 413 and (await resp.json())["error"] == "body_too_large"
    for path in ("/v1/mailbox/" + "A" * 32, "/v1/mailbox/abc", "/v1/mailbox/" + "g" * 32):
        assert (await api.call(path, good))[1]["error"] == "malformed_id"
        assert (await api.call(path + "/challenge"))[1]["error"] == "malformed_id"

    ch = await api.challenge(bob.id)
    fetch, delete = f"{box}/fetch", f"{box}/delete"
    for after in ("xyz", 5, "00" * 17, ["00" * 16]):
        status, data = await api.call(fetch, bob.proof(ch, b"fetch", after=after))
        assert (status, data["error"]) == (400, "invalid_body"), after
    assert (await api.call(fetch, {**bob.proof(ch, b"fetch"), "x": 1}))[0] == 400
    assert (await api.call(fetch + "?wait=-1", bob.proof(ch, b"fetch")))[0] == 400
    assert (await api.call(fetch + "?wait=nan", bob.proof(ch, b"fetch")))[0] == 400
    for ids in (["zz" * 16], "00" * 16, ["00" * 16] * 257, [None]):
        status, data = await api.call(delete, bob.proof(ch, b"delete", message_ids=ids))
        assert (status, data["error"]) == (400, "invalid_body")
    status, data = await api.call(fetch, data=b'{"x": "' + b"a" * 40_000 + b'"}')
    assert (status, data["error"]) == (413, "body_too_large")
    # None of these spent the challenge.
    assert (await api.call(fetch, bob.proof(ch, b"fetch", after=None)))[0] == 200
    assert await api.messages(bob) == []  # and nothing was stored


async def test_logs_never_carry_envelopes_or_whole_ids(start, caplog):
    _, api = await start()
    bob = Recipient()
    envelope = b"\x00secret-ciphertext-marker\x00" * 4
    with caplog.at_level(logging.DEBUG, logger="signaling_server"):
        _, posted = await api.post(bob.id, envelope)
        messages = await api.messages(bob)
        await api.delete(bob, [m["message_id"] for m in messages])
    text = caplog.text
    assert bob.id[:8] in text
    for secret in (bob.id, SENDER, posted["message_id"], b64(envelope), "marker"):
        assert secret not in text


# -- expiry, with a fake clock ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_messages_expire(start, tmp_path, backend):
    clock = Clock()
    limits = MailboxLimits(ttl=3600)
    if backend == "memory":
        mailbox = InMemoryMailbox(limits, clock=clock)
    else:
        mailbox = SqliteMailbox(tmp_path / "box" / "m.sqlite", limits, clock=clock)
    _, api = await start(mailbox=mailbox)
    bob = Recipient()
    await api.post(bob.id, b"old")
    clock.now += 1800
    _, young = await api.post(bob.id, b"young")
    [old_msg, young_msg] = await api.messages(bob)
    assert old_msg["posted_at"] == 1_700_000_000.0
    clock.now += 1800
    assert [m["message_id"] for m in await api.messages(bob)] == [young["message_id"]]
    assert await mailbox.count() == 2  # until swept
    assert await mailbox.sweep() == 1
    assert await mailbox.count() == 1
    clock.now += 1800
    assert await api.messages(bob) == []
    assert await mailbox.sweep() == 1 and await mailbox.count() == 0


async def test_expired_messages_free_their_quota_at_once():
    clock = Clock()
    box = InMemoryMailbox(MailboxLimits(ttl=10, max_messages_per_recipient=1), clock=clock)
    await box.put("a" * 32, SENDER, b"x")
    with pytest.raises(MailboxFull):
        await box.put("a" * 32, SENDER, b"x")
    clock.now += 10
    await box.put("a" * 32, SENDER, b"y")  # no sweep needed
    [held] = await box.fetch("a" * 32)
    assert held.envelope == b"y"


# -- the SQLite backend --------------------------------------------------------------------


async def test_sqlite_survives_a_restart(start, tmp_path):
    path = tmp_path / "state" / "mailbox.sqlite"
    config = {"mailbox_state": f"sqlite://{path}", "exempt_networks": []}
    server, api = await start(**config, mailbox_max_messages_per_client=3)
    bob = Recipient()
    posted = [(await api.post(bob.id, f"m{i}".encode()))[1]["message_id"] for i in range(3)]
    stale = await api.challenge(bob.id)
    await server.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    for side in path.parent.glob("mailbox.sqlite-*"):
        assert stat.S_IMODE(os.stat(side).st_mode) & 0o077 == 0

    _, api = await start(**config, mailbox_max_messages_per_client=3)
    got = await api.messages(bob)
    assert [m["message_id"] for m in got] == posted
    assert [base64.b64decode(m["envelope"]) for m in got] == [b"m0", b"m1", b"m2"]
    status, data = await api.post(Recipient().id, b"x")  # the per-client quota survived too
    assert (status, data["error"]) == (429, "too_many_messages")
    # A challenge of the old process is worthless (its secret is gone).
    status, _ = await api.call(f"/v1/mailbox/{bob.id}/fetch", bob.proof(stale, b"fetch"))
    assert status == 403
    assert (await api.delete(bob, posted[:2]))[1] == {"deleted": 2}
    assert [m["message_id"] for m in await api.messages(bob, after=posted[0])] == posted[2:]
    assert (await api.post(Recipient().id, b"x"))[0] == 201
    stored = sqlite3.connect(path).execute("SELECT owner FROM messages").fetchall()
    assert all(owner[0] != "127.0.0.1" for owner in stored)  # addresses only as keyed hashes


def test_sqlite_refuses_unsafe_or_foreign_files(tmp_path):
    private = tmp_path / "private"
    SqliteMailbox(private / "m.sqlite")._release()
    os.chmod(private / "m.sqlite", 0o644)
    with pytest.raises(MailboxStoreError, match="chmod 600"):
        SqliteMailbox(private / "m.sqlite")
    os.chmod(private / "m.sqlite", 0o600)
    os.chmod(private, 0o777)
    with pytest.raises(MailboxStoreError, match="chmod 700"):
        SqliteMailbox(private / "m.sqlite")
    os.chmod(private, 0o700)
    (private / "link.sqlite").symlink_to(private / "m.sqlite")
    with pytest.raises(MailboxStoreError):
        SqliteMailbox(private / "link.sqlite")
    other = private / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE requests (x)")
    db.commit()
    db.close()
    os.chmod(other, 0o600)
    with pytest.raises(MailboxStoreError, match="not a mailbox"):
        SqliteMailbox(other)
    newer = private / "newer.sqlite"
    SqliteMailbox(newer)._release()
    db = sqlite3.connect(newer)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(MailboxStoreError, match="schema version 99"):
        SqliteMailbox(newer)
    (private / "junk.sqlite").write_bytes(os.urandom(4096))
    os.chmod(private / "junk.sqlite", 0o600)
    with pytest.raises(MailboxStoreError):
        SqliteMailbox(private / "junk.sqlite")


async def test_sqlite_skips_corrupted_rows(tmp_path):
    path = tmp_path / "box" / "m.sqlite"
    box = SqliteMailbox(path)
    good = await box.put("a" * 32, SENDER, b"good")
    bad = await box.put("a" * 32, SENDER, b"bad")
    db = sqlite3.connect(path)
    db.execute(
        "UPDATE messages SET sender_id = 'not an id' WHERE message_id = ?", (bad.message_id,)
    )
    db.commit()
    db.close()
    assert [m.message_id for m in await box.fetch("a" * 32)] == [good.message_id]
    await box.close()


def test_bad_state_specs_are_refused():
    for spec in ("sqlite://relative.db", "sqlite:///a/../b", "postgres://x", "sqlite:///", ""):
        with pytest.raises(ValueError, match="mailbox state"):
            ServerConfig(mailbox_state=spec)
    with pytest.raises(ValueError, match="fetch response"):
        ServerConfig(mailbox_max_message_bytes=512 * 1024 + 1)
    with pytest.raises(ValueError, match="mailbox_max_bytes_per_recipient"):
        ServerConfig(mailbox_max_bytes_per_recipient=1000, mailbox_max_message_bytes=2000)


def test_command_line_flags(tmp_path):
    from signaling_server.__main__ import _parser, config_from_args

    args = _parser().parse_args(
        [
            f"--state=sqlite://{tmp_path}/m.sqlite",
            "--mailbox-ttl=60",
            "--mailbox-max-message-bytes=1000",
            "--mailbox-max-messages-per-recipient=5",
            "--mailbox-max-bytes-per-recipient=5000",
        ]
    )
    config = config_from_args(args)
    assert config.mailbox_state == f"sqlite://{tmp_path}/m.sqlite"
    assert (config.mailbox_ttl, config.mailbox_max_message_bytes) == (60, 1000)
    assert config.mailbox_max_messages_per_recipient == 5
    assert config.mailbox_max_bytes_per_recipient == 5000
    assert config_from_args(_parser().parse_args([])).mailbox_state == "memory"


# -- the backends directly -----------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request, tmp_path) -> AsyncIterator[Callable[..., InMemoryMailbox]]:
    made = []

    def make(**limits: object):
        lim = MailboxLimits(**limits)
        if request.param == "memory":
            box = InMemoryMailbox(lim)
        else:
            box = SqliteMailbox(tmp_path / "b" / f"{len(made)}.sqlite", lim)
        made.append(box)
        return box

    yield make
    for box in made:
        await box.close()


async def test_delivery_is_bounded(backend):
    box = backend()
    recipient = "c" * 32
    for _ in range(MAX_FETCH + 6):
        await box.put(recipient, SENDER, b"tiny")
    first = await box.fetch(recipient)
    assert len(first) == MAX_FETCH
    rest = await box.fetch(recipient, after=first[-1].message_id)
    assert len(rest) == 6
    big = "d" * 32
    for _ in range(4):
        await box.put(big, SENDER, bytes(200 * 1024))
    batch = await box.fetch(big)
    assert 1 < len(batch) < 4
    assert sum(4 * len(m.envelope) // 3 for m in batch) <= FETCH_BUDGET


async def test_quota_errors_and_closing(backend):
    box = backend(max_messages_per_client=1, max_messages=3)
    await box.put("a" * 32, SENDER, b"x", owner="203.0.113.7")
    with pytest.raises(SenderQuotaExceeded):
        await box.put("b" * 32, SENDER, b"x", owner="203.0.113.7")
    await box.put("b" * 32, SENDER, b"x", owner="203.0.113.8")
    await box.put("b" * 32, SENDER, b"x")  # no owner: no per-client quota
    with pytest.raises(StateFull):
        await box.put("c" * 32, SENDER, b"x")
    assert await box.delete("a" * 32, ["0" * 32]) == 0
    waiter = asyncio.create_task(box.fetch("e" * 32, timeout=30))
    await asyncio.sleep(0.05)
    await box.close()
    assert await asyncio.wait_for(waiter, 5) == []


def test_server_does_not_import_the_library():
    code = (
        "import signaling_server.app, signaling_server.__main__, sys; "
        "import signaling_server.mailbox, signaling_server.mailbox_handlers; "
        "bad = [m for m in sys.modules if m.startswith(('duet_p2p', 'torch'))]; "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
