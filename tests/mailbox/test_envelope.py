"""Envelopes: sealed to a pinned key, signed by the sender; every change, substitution,
misaddressing, stale date or replay refused before anything is decrypted."""

from __future__ import annotations

import os
import stat
import time

import pytest

from duet_p2p.identity import Identity
from duet_p2p.mailbox import envelope as env
from duet_p2p.mailbox.envelope import (
    DEFAULT_MAX_AGE,
    MAX_CLOCK_SKEW,
    MAX_ENVELOPE_BYTES,
    MAX_PAYLOAD_BYTES,
    EnvelopeRefused,
    Header,
    SeenMessages,
    StreamInfo,
    box_seal,
    new_header,
    open_envelope,
    peek_header,
    seal_envelope,
    sign_envelope,
)
from duet_p2p.mailbox.known_keys import KeyNotPinned, KnownKeys
from duet_p2p.rpc import codec

SECRET = b"SECRET-PAYLOAD-7f3a"


@pytest.fixture
def scientist() -> Identity:
    return Identity.generate()


@pytest.fixture
def host() -> Identity:
    return Identity.generate()


@pytest.fixture
def decrypted(monkeypatch) -> list[bytes]:
    """Every Box opened by open_envelope (empty = nothing was decrypted)."""
    calls: list[bytes] = []
    real = env.box_open

    def spy(recipient, header, body):
        calls.append(body)
        return real(recipient, header, body)

    monkeypatch.setattr(env, "box_open", spy)
    return calls


def _seal(sender: Identity, recipient: Identity, payload: bytes = SECRET, **kw) -> bytes:
    return seal_envelope(sender, recipient.id, recipient.public_key, "job", payload, **kw)


def _refused(recipient: Identity, envelope: bytes, sender_id: str, **kw) -> EnvelopeRefused:
    with pytest.raises(EnvelopeRefused) as info:
        open_envelope(recipient, envelope, sender_id=sender_id, **kw)
    assert SECRET.decode() not in str(info.value)
    return info.value


def test_round_trip(scientist, host):
    sealed = _seal(scientist, host, now=1_800_000_000.5)
    assert SECRET not in sealed
    opened = open_envelope(host, sealed, sender_id=scientist.id, now=1_800_000_100)
    assert opened.payload == SECRET
    assert (opened.kind, opened.sender_id, opened.created_at) == (
        "job",
        scientist.id,
        1_800_000_000,
    )
    assert len(opened.nonce) == 24 and opened.header.recipient_id == host.id
    assert SECRET.decode() not in repr(opened)
    again = _seal(scientist, host)
    assert open_envelope(host, again, sender_id=scientist.id).nonce != opened.nonce
    empty = _seal(scientist, host, b"")
    assert open_envelope(host, empty, sender_id=scientist.id).payload == b""


def test_the_sender_can_require_a_pinned_sender_key(scientist, host, tmp_path):
    known = KnownKeys(tmp_path)
    known.remember(scientist.public_key)
    sealed = _seal(scientist, host)
    pinned = known.get(scientist.id)
    assert open_envelope(host, sealed, sender_id=scientist.id, sender_key=pinned).payload == SECRET
    _refused(host, sealed, scientist.id, sender_key=Identity.generate().public_key)


def test_every_flipped_byte_is_refused_and_nothing_decrypted(scientist, host, decrypted):
    sealed = _seal(scientist, host)
    for i in range(len(sealed)):
        changed = bytearray(sealed)
        changed[i] ^= 0x01
        _refused(host, bytes(changed), scientist.id)
    assert decrypted == []
    for cut in (sealed[:-1], sealed[:-64], sealed[:40], sealed + b"\x00", b"", sealed[1:]):
        _refused(host, cut, scientist.id)
    assert decrypted == []
    open_envelope(host, sealed, sender_id=scientist.id)
    assert len(decrypted) == 1


def test_wrong_recipient_or_sender_is_refused(scientist, host, decrypted):
    sealed = _seal(scientist, host)
    other = Identity.generate()
    assert "addressed to" in str(_refused(other, sealed, scientist.id))
    assert "not " + other.id in str(_refused(host, sealed, other.id))
    assert decrypted == []


def test_a_box_sealed_to_another_key_does_not_open(scientist, host):
    """The header names the host but the Box is sealed to someone else's key."""
    other = Identity.generate()
    header = new_header(scientist, host.id, "job")
    body = box_seal(scientist, other.public_key, header.nonce, SECRET)
    forged = sign_envelope(scientist, header, body)
    assert "does not decrypt" in str(_refused(host, forged, scientist.id))


def test_a_substituted_sender_key_is_refused(scientist, host, decrypted):
    """A server (or anyone) signs with its own key but claims the scientist's ID."""
    intruder = Identity.generate()
    header = Header(
        "job", scientist.id, intruder.public_key, host.id, os.urandom(24), int(time.time())
    )
    forged = sign_envelope(intruder, header, box_seal(intruder, host.public_key, header.nonce,
                                                      SECRET))  # fmt: skip
    assert "sender key" in str(_refused(host, forged, scientist.id))
    # the scientist's own key in the header, but the intruder's signature
    header = new_header(scientist, host.id, "job")
    body = box_seal(intruder, host.public_key, header.nonce, SECRET)
    encoded = header.encode()
    fake = env._signed_message(encoded, body)
    forged = b"".join((env.MAGIC, len(encoded).to_bytes(4, "big"), encoded, body,
                       intruder.sign_bytes(fake)))  # fmt: skip
    assert "signature" in str(_refused(host, forged, scientist.id))
    assert decrypted == []


def test_a_recipient_key_that_is_not_pinned_is_refused(scientist, host, tmp_path):
    intruder = Identity.generate()
    with pytest.raises(KeyNotPinned, match="does not hash"):
        seal_envelope(scientist, host.id, intruder.public_key, "job", SECRET)
    with pytest.raises(KeyNotPinned, match="no verified key"):
        KnownKeys(tmp_path).get(host.id)
    with pytest.raises(ValueError):
        seal_envelope(scientist, "not-an-id", host.public_key, "job", SECRET)


def test_stale_and_future_envelopes_are_refused(scientist, host):
    now = 1_800_000_000
    sealed = _seal(scientist, host, now=now)
    assert open_envelope(host, sealed, sender_id=scientist.id, now=now + DEFAULT_MAX_AGE)
    assert "days ago" in str(_refused(host, sealed, scientist.id, now=now + DEFAULT_MAX_AGE + 1))
    _refused(host, sealed, scientist.id, now=now + 61, max_age=60)
    assert open_envelope(host, sealed, sender_id=scientist.id, now=now - MAX_CLOCK_SKEW)
    assert "future" in str(_refused(host, sealed, scientist.id, now=now - MAX_CLOCK_SKEW - 1))


def test_a_replayed_envelope_is_refused(scientist, host, tmp_path):
    sealed = _seal(scientist, host)
    with SeenMessages.open(tmp_path / "mailbox") as seen:
        open_envelope(host, sealed, sender_id=scientist.id, seen=seen)
        assert "replay" in str(_refused(host, sealed, scientist.id, seen=seen))
        other = _seal(scientist, host)
        open_envelope(host, other, sender_id=scientist.id, seen=seen)
        assert len(seen) == 2
    path = tmp_path / "mailbox" / "seen.sqlite"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    with SeenMessages(path) as seen:  # a restart forgets nothing
        _refused(host, sealed, scientist.id, seen=seen)


def test_seen_messages_are_forgotten_when_they_expire(tmp_path):
    sender = Identity.generate().id
    with SeenMessages(tmp_path / "seen.sqlite", max_entries=2) as seen:
        seen.add(sender, b"\x01" * 24, expires_at=100, now=50)
        with pytest.raises(EnvelopeRefused, match="replay"):
            seen.add(sender, b"\x01" * 24, expires_at=100, now=60)
        seen.add(Identity.generate().id, b"\x01" * 24, expires_at=100, now=60)  # another sender
        with pytest.raises(EnvelopeRefused, match="remembered already"):
            seen.add(sender, b"\x02" * 24, expires_at=100, now=60)
        assert len(seen) == 2
        seen.add(sender, b"\x01" * 24, expires_at=300, now=200)  # expired, so forgotten
        assert len(seen) == 1


def test_a_foreign_database_is_refused(tmp_path):
    import sqlite3

    from duet_p2p.errors import ConfigurationError

    path = tmp_path / "seen.sqlite"
    path.touch(mode=0o600)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE other (x)")
    db.commit()
    db.close()
    with pytest.raises(ConfigurationError):
        SeenMessages(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        SeenMessages(path)


def test_kinds_and_stream_parts(scientist, host):
    sealed = _seal(scientist, host)
    assert open_envelope(host, sealed, sender_id=scientist.id, kinds={"job"}).kind == "job"
    assert "kind" in str(_refused(host, sealed, scientist.id, kinds={"result"}))
    header = new_header(scientist, host.id, "result", stream=StreamInfo(os.urandom(16), 0, 1))
    part = sign_envelope(scientist, header, box_seal(scientist, host.public_key, header.nonce, b""))
    assert "stream" in str(_refused(host, part, scientist.id))
    assert peek_header(part).stream.index == 0
    with pytest.raises(ValueError):
        seal_envelope(scientist, host.id, host.public_key, "Job!", SECRET)


def test_sizes_are_capped(scientist, host):
    sealed = _seal(scientist, host, bytes(MAX_PAYLOAD_BYTES))
    assert len(sealed) <= MAX_ENVELOPE_BYTES
    with pytest.raises(ValueError, match="seal_stream"):
        _seal(scientist, host, bytes(MAX_PAYLOAD_BYTES + 1))
    _refused(host, sealed + bytes(MAX_ENVELOPE_BYTES), scientist.id)
    huge = env.MAGIC + (1 << 31).to_bytes(4, "big") + bytes(100)
    assert "header length" in str(_refused(host, huge, scientist.id))


def _craft(sender: Identity, fields: dict, body: bytes = b"x" * 32) -> bytes:
    encoded = codec.encode(fields)
    signature = sender.sign_bytes(env._signed_message(encoded, body))
    return b"".join((env.MAGIC, len(encoded).to_bytes(4, "big"), encoded, body, signature))


def _fields(sender: Identity, recipient: Identity, **changes) -> dict:
    fields = {
        "version": 1, "kind": "job", "sender_id": sender.id, "sender_key": sender.public_key,
        "recipient_id": recipient.id, "nonce": os.urandom(24), "created_at": 1_800_000_000,
    }  # fmt: skip
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not ...}


@pytest.mark.parametrize(
    "changes",
    [
        {"version": 2},
        {"version": True},
        {"extra": 1},
        {"kind": ...},
        {"kind": "J"},
        {"kind": b"job"},
        {"nonce": b"\x00" * 23},
        {"nonce": "n" * 24},
        {"created_at": 1.5},
        {"created_at": -1},
        {"created_at": True},
        {"sender_key": b"\x00" * 31},
        {"recipient_id": "Z" * 32},
        {"stream": {"id": b"\x00" * 16, "index": 2, "count": 1}},
        {"stream": {"id": b"\x00" * 15, "index": 0, "count": 1}},
        {"stream": {"id": b"\x00" * 16, "index": 0, "count": 0}},
        {"stream": {"id": b"\x00" * 16, "index": 0}},
        {"stream": [1, 2, 3]},
    ],
)
def test_malformed_signed_headers_are_refused(scientist, host, decrypted, changes):
    _refused(host, _craft(scientist, _fields(scientist, host, **changes)), scientist.id)
    assert decrypted == []


def test_a_header_that_is_not_a_map_is_refused(scientist, host):
    _refused(host, _craft(scientist, [1, 2]), scientist.id)  # type: ignore[arg-type]
    deep = _fields(scientist, host, extra=[[[[[1]]]]])
    _refused(host, _craft(scientist, deep), scientist.id)
    ok = _craft(scientist, _fields(scientist, host), b"")
    assert "does not decrypt" in str(_refused(host, ok, scientist.id, now=1_800_000_000))
