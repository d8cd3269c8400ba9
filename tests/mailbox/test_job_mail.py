"""Job mail through a mailbox the server may tamper with: every flipped byte, replay,
substituted key, misrouted or unwanted sender is refused, and nothing is decrypted for it."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from duet_p2p.identity import Identity
from duet_p2p.mailbox import envelope as env
from duet_p2p.mailbox import stream as st
from duet_p2p.mailbox.client import Delivered
from duet_p2p.mailbox.envelope import (
    MAX_ENVELOPE_BYTES,
    MAX_PAYLOAD_BYTES,
    SeenMessages,
    new_header,
    peek_header,
    sign_envelope,
)
from duet_p2p.mailbox.known_keys import KeyNotPinned
from duet_p2p.offline import mail as job_mail
from duet_p2p.offline.mail import (
    CANCEL,
    HOST_KINDS,
    JOB,
    RESULT,
    SCIENTIST_KINDS,
    UPDATE,
    Mail,
    MailOpener,
    cancel_payload,
    iter_mail,
    parse_cancel,
    post_mail,
    seal_mail,
)
from duet_p2p.offline.results import JobUpdate
from duet_p2p.offline.spec import InvalidJob, SignedJob
from tests.offline.test_spec import NOW, SCIENTIST, make_spec

MB = 1 << 20
BIG = 3 * MB + 12345


@pytest.fixture(scope="module")
def host() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def mallory() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def big() -> bytes:
    return os.urandom(BIG)


@pytest.fixture(scope="module")
def big_stream(host: Identity, big: bytes) -> list[bytes]:
    return seal_mail(host, SCIENTIST.id, SCIENTIST.public_key, RESULT, big)


@pytest.fixture
def seen(tmp_path: Path) -> Iterator[SeenMessages]:
    with SeenMessages(tmp_path / "seen.sqlite") as store:
        yield store


@pytest.fixture
def decrypted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every decryption made (empty: nothing was decrypted)."""
    calls: list[str] = []

    def spy(name: str, real):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(env, "box_open", spy("box", env.box_open))
    monkeypatch.setattr(st, "box_open", spy("stream opening", st.box_open))
    pull = "crypto_secretstream_xchacha20poly1305_pull"
    monkeypatch.setattr(st.sodium, pull, spy("chunk", getattr(st.sodium, pull)))
    return calls


def deliver(envelopes: Iterable[bytes], sender_id: str) -> list[Delivered]:
    """The messages as a mailbox server hands them out (fresh message IDs)."""
    return [Delivered(os.urandom(16).hex(), sender_id, e, NOW) for e in envelopes]


def host_opener(host: Identity, seen: SeenMessages | None = None, **kw) -> MailOpener:
    kw.setdefault("senders", {SCIENTIST.id}.__contains__)
    return MailOpener(host, kinds=HOST_KINDS, seen=seen, max_bytes=2 * MB, **kw)


def scientist_opener(host: Identity, seen: SeenMessages | None = None, **kw) -> MailOpener:
    kw.setdefault("senders", {host.id}.__contains__)
    return MailOpener(SCIENTIST, kinds=SCIENTIST_KINDS, seen=seen, max_bytes=8 * MB, **kw)


def assert_refused(opener: MailOpener, messages: list[Delivered], match: str) -> None:
    refused = dict(opener.refused)
    for message in messages:
        assert message.message_id in refused, f"{message.message_id} was not refused"
        assert match in refused[message.message_id], refused[message.message_id]


# -- the way it works ----------------------------------------------------------------------


def test_a_job_goes_in_one_envelope(host: Identity, seen: SeenMessages, decrypted) -> None:
    job = make_spec(host_id=host.id).sign(SCIENTIST)
    envelopes = seal_mail(SCIENTIST, host.id, host.public_key, JOB, job.to_wire())
    assert len(envelopes) == 1 and job.to_wire() not in envelopes[0]
    opener = host_opener(host, seen)
    [message] = deliver(envelopes, SCIENTIST.id)
    [mail] = opener.add([message])
    assert mail == Mail(JOB, SCIENTIST.id, SCIENTIST.public_key, job.to_wire(),
                        (message.message_id,))  # fmt: skip
    assert SignedJob.from_wire(mail.payload) == job
    assert opener.done_ids() == opener.deletable_ids() == [message.message_id]
    assert opener.refused == [] and decrypted == ["box"]
    assert opener.add(message) == [] and opener.refused == []  # fetched again, not deleted yet
    opener.forget([message.message_id])
    assert opener.done_ids() == []


def test_cancel_and_update_payloads(host: Identity) -> None:
    payload = cancel_payload("ab" * 16)
    assert parse_cancel(payload) == "ab" * 16
    for bad in (b"", payload + b"\x00", payload.replace(b"ab", b"AB"), b"\xa1\x61x\x01"):
        with pytest.raises(InvalidJob):
            parse_cancel(bad)
    update = JobUpdate("ab" * 16, "rejected", "uses an op not allowed", NOW)
    opener = scientist_opener(host)
    envelopes = seal_mail(host, SCIENTIST.id, SCIENTIST.public_key, UPDATE, update.to_bytes())
    [mail] = opener.add(deliver(envelopes, host.id))
    assert mail.kind == UPDATE and JobUpdate.from_bytes(mail.payload) == update


def test_a_large_result_streams_over_several_fetches(
    host: Identity, big: bytes, big_stream: list[bytes], seen: SeenMessages
) -> None:
    assert len(big_stream) > 10 and all(len(e) <= MAX_ENVELOPE_BYTES for e in big_stream)
    assert all(big[5000:5100] not in e for e in big_stream)
    messages = deliver(big_stream, host.id)
    arrived = messages[:]
    random.Random(1).shuffle(arrived)  # the server may reorder: allowed
    opener = scientist_opener(host, seen)
    mails: list[Mail] = []
    for start in range(0, len(arrived), 5):  # several fetches
        assert mails == []
        mails += opener.add(arrived[start : start + 5])
        if start + 5 < len(arrived):
            assert set(opener.pending_ids()) == {m.message_id for m in arrived[: start + 5]}
    [mail] = mails
    assert mail.payload == big and mail.kind == RESULT and mail.sender_id == host.id
    assert set(mail.message_ids) == {m.message_id for m in messages}
    assert set(opener.done_ids()) == set(mail.message_ids) and opener.pending_ids() == []
    assert opener.refused == []


def test_buffers_stream_without_being_joined(host: Identity, big: bytes) -> None:
    parts = [memoryview(big)[:1000], big[1000 : 2 * MB], bytearray(big[2 * MB :])]
    envelopes = iter_mail(host, SCIENTIST.id, SCIENTIST.public_key, RESULT, parts)
    assert not isinstance(envelopes, list)  # sealed one at a time
    [mail] = scientist_opener(host).add(deliver(envelopes, host.id))
    assert mail.payload == big
    small = [b"ab", memoryview(b"cd")]
    [one] = seal_mail(host, SCIENTIST.id, SCIENTIST.public_key, RESULT, small)
    assert scientist_opener(host).add(deliver([one], host.id))[0].payload == b"abcd"
    edge = os.urandom(MAX_PAYLOAD_BYTES)
    assert len(seal_mail(host, SCIENTIST.id, SCIENTIST.public_key, RESULT, edge)) == 1
    assert len(seal_mail(host, SCIENTIST.id, SCIENTIST.public_key, RESULT, edge + b"x")) == 3
    with pytest.raises(TypeError):
        seal_mail(host, SCIENTIST.id, SCIENTIST.public_key, RESULT, "text")  # type: ignore[arg-type]


async def test_post_mail_posts_in_order(host: Identity) -> None:
    posted: list[tuple[str, bytes]] = []

    class Client:
        async def post(self, recipient_id: str, envelope: bytes) -> str:
            posted.append((recipient_id, envelope))
            return f"{len(posted):032x}"

    envelopes = [b"one", b"two", b"three"]
    ids = await post_mail(Client(), host.id, iter(envelopes))  # type: ignore[arg-type]
    assert ids == [f"{i:032x}" for i in (1, 2, 3)]
    assert posted == [(host.id, e) for e in envelopes]


# -- what the server may try ---------------------------------------------------------------


def test_a_flipped_byte_is_refused_before_decryption(host: Identity, decrypted) -> None:
    [envelope] = seal_mail(SCIENTIST, host.id, host.public_key, JOB, b"SECRET job")
    opener = host_opener(host)
    positions = range(0, len(envelope), 3)
    for index in positions:
        tampered = bytearray(envelope)
        tampered[index] ^= 0x40
        assert opener.add(deliver([bytes(tampered)], SCIENTIST.id)) == []
    assert len(opener.refused) == len(positions)
    assert all("SECRET" not in reason for _, reason in opener.refused)
    assert decrypted == []


def test_a_flipped_byte_in_a_stream_refuses_all_of_it(
    host: Identity, big_stream: list[bytes]
) -> None:
    for part in (0, 3, len(big_stream) - 1):
        messages = deliver(big_stream, host.id)
        tampered = bytearray(messages[part].envelope)
        tampered[-65] ^= 1  # the last byte of the body
        messages[part] = Delivered(messages[part].message_id, host.id, bytes(tampered), NOW)
        opener = scientist_opener(host)
        assert opener.add(messages) == []
        assert_refused(opener, messages, "refused")
        assert opener.pending_ids() == [] and opener.done_ids() == []


def test_replays_are_refused_without_decrypting(
    host: Identity, seen: SeenMessages, decrypted
) -> None:
    [envelope] = seal_mail(SCIENTIST, host.id, host.public_key, JOB, b"job")
    opener = host_opener(host, seen)
    [first] = deliver([envelope], SCIENTIST.id)
    assert len(opener.add(first)) == 1
    decrypted.clear()
    again = deliver([envelope], SCIENTIST.id)  # the same envelope, as a new message
    assert opener.add(again) == []
    assert_refused(opener, again, "replay")
    opener.forget([first.message_id])
    assert opener.add(first) == []  # delivered again after it was deleted
    assert_refused(opener, [first], "replay")
    later = host_opener(host, seen)  # the host restarted: the store remembers
    assert later.add(deliver([envelope], SCIENTIST.id)) == []
    assert "replay" in later.refused[0][1]
    assert decrypted == []
    memory_only = host_opener(host)  # without a store, it still remembers while it lives
    assert len(memory_only.add(deliver([envelope], SCIENTIST.id))) == 1
    replayed = deliver([envelope], SCIENTIST.id)
    assert memory_only.add(replayed) == []
    assert_refused(memory_only, replayed, "replay")


def test_replayed_or_dropped_stream_parts_never_yield_mail(
    host: Identity, big_stream: list[bytes], seen: SeenMessages
) -> None:
    clock = [time.time()]
    # A part replayed as a new message, while the stream is arriving.
    messages = deliver(big_stream, host.id)
    replay = deliver([big_stream[2]], host.id)
    opener = scientist_opener(host, seen, clock=lambda: clock[0])
    assert opener.add([*messages[:4], *replay, *messages[4:]]) == []
    assert_refused(opener, [*messages, *replay], "refused")
    # A part dropped: never complete; dropped as idle, every part listed for deletion.
    opener = scientist_opener(host, clock=lambda: clock[0], idle_seconds=60)
    dropped = deliver(big_stream, host.id)
    del dropped[5]
    assert opener.add(dropped) == []
    assert len(opener.pending_ids()) == len(dropped) and opener.refused == []
    clock[0] += 61
    assert opener.expire() == 1
    assert_refused(opener, dropped, "incomplete")
    assert opener.pending_ids() == []
    # A whole stream replayed after it was delivered.
    opener = scientist_opener(host)
    assert len(opener.add(deliver(big_stream, host.id))) == 1
    again = deliver(big_stream, host.id)
    assert opener.add(again) == []
    assert_refused(opener, again, "")


def test_a_body_moved_between_envelopes_is_refused(host: Identity, decrypted) -> None:
    a, b = (
        seal_mail(SCIENTIST, host.id, host.public_key, JOB, p)[0] for p in (b"A" * 99, b"B" * 99)
    )
    ha, hb = (len(env.MAGIC) + 4 + int.from_bytes(e[4:8], "big") for e in (a, b))
    spliced = a[:ha] + b[hb:-64] + a[-64:]
    opener = host_opener(host)
    assert opener.add(deliver([spliced], SCIENTIST.id)) == []
    assert "signature" in opener.refused[0][1] and decrypted == []


def test_stream_chunks_moved_between_positions_are_refused(
    host: Identity, big_stream: list[bytes]
) -> None:
    """Only the signed envelopes can be reordered; their contents cannot be."""
    bodies = []
    for envelope in big_stream[1:3]:
        start = len(env.MAGIC) + 4 + int.from_bytes(envelope[4:8], "big")
        bodies.append((envelope[:start], envelope[start:-64], envelope[-64:]))
    (h1, b1, s1), (h2, b2, s2) = bodies
    swapped = [big_stream[0], h1 + b2 + s1, h2 + b1 + s2, *big_stream[3:]]
    opener = scientist_opener(host)
    assert opener.add(deliver(swapped, host.id)) == []
    assert "signature" in " ".join(reason for _, reason in opener.refused)


def test_substituted_keys_are_refused(host: Identity, mallory: Identity, decrypted) -> None:
    # Mallory's key in a header claiming the scientist's ID, signed by Mallory.
    header = new_header(SCIENTIST, host.id, JOB)
    forged_header = env.Header(header.kind, SCIENTIST.id, mallory.public_key, host.id,
                               header.nonce, header.created_at)  # fmt: skip
    body = env.box_seal(mallory, host.public_key, header.nonce, b"forged job")
    forged = sign_envelope(mallory, forged_header, body)
    # Mallory's own envelope, which the server says is the scientist's.
    relabelled = seal_mail(mallory, host.id, host.public_key, JOB, b"forged job")[0]
    opener = host_opener(host)
    assert opener.add(deliver([forged], SCIENTIST.id)) == []
    assert "sender key" in opener.refused[-1][1]
    assert opener.add(deliver([relabelled], SCIENTIST.id)) == []
    assert "says it is from" in opener.refused[-1][1]
    # A pinned key other than the one the envelope carries.
    genuine = seal_mail(SCIENTIST, host.id, host.public_key, JOB, b"job")[0]
    pinned = host_opener(host, sender_keys=lambda sender: mallory.public_key)
    assert pinned.add(deliver([genuine], SCIENTIST.id)) == []
    assert "sender key" in pinned.refused[0][1]
    assert decrypted == []
    exact = host_opener(host, sender_keys={SCIENTIST.id: SCIENTIST.public_key}.get)
    assert len(exact.add(deliver([genuine], SCIENTIST.id))) == 1
    # Sealing to a key that the recipient's ID does not stand for is refused outright.
    with pytest.raises(KeyNotPinned):
        seal_mail(SCIENTIST, host.id, mallory.public_key, JOB, b"job")
    with pytest.raises(KeyNotPinned):
        iter_mail(host, SCIENTIST.id, mallory.public_key, RESULT, os.urandom(2 * MB))


def test_a_sender_not_accepted_is_refused_first(
    host: Identity, mallory: Identity, big_stream: list[bytes], decrypted, monkeypatch
) -> None:
    peeked: list[bytes] = []
    monkeypatch.setattr(job_mail, "peek_header", lambda e: peeked.append(e) or peek_header(e))
    envelopes = seal_mail(mallory, host.id, host.public_key, JOB, b"job from a stranger")
    opener = host_opener(host)
    messages = deliver(envelopes, mallory.id)
    assert opener.add(messages) == []
    assert_refused(opener, messages, "not accepted")
    to_scientist = seal_mail(mallory, SCIENTIST.id, SCIENTIST.public_key, RESULT, b"fake")
    opener = scientist_opener(host)
    stream_messages = deliver(to_scientist, mallory.id)
    assert opener.add(stream_messages) == []
    assert_refused(opener, stream_messages, "not accepted")
    assert decrypted == [] and peeked == []
    accepted = deliver(seal_mail(SCIENTIST, host.id, host.public_key, JOB, b"job"), SCIENTIST.id)
    assert len(host_opener(host).add(accepted)) == 1 and decrypted == ["box"]


def test_misaddressed_stale_or_unexpected_mail_is_refused(
    host: Identity, mallory: Identity, decrypted
) -> None:
    opener = host_opener(host)
    to_mallory = seal_mail(SCIENTIST, mallory.id, mallory.public_key, JOB, b"job")
    fresh = seal_mail(SCIENTIST, host.id, host.public_key, JOB, b"job")
    old = env.seal_envelope(SCIENTIST, host.id, host.public_key, JOB, b"job", now=NOW - 1e7)
    result_kind = seal_mail(SCIENTIST, host.id, host.public_key, RESULT, b"not for a host")
    cases = [(to_mallory, "addressed to"), ([old], "days ago"), (result_kind, "kind")]
    for envelopes, reason in cases:
        messages = deliver(envelopes, SCIENTIST.id)
        assert opener.add(messages) == []
        assert_refused(opener, messages, reason)
    assert decrypted == []
    assert len(opener.add(deliver(fresh, SCIENTIST.id))) == 1


def test_garbage_is_refused_and_never_raises(host: Identity) -> None:
    opener = host_opener(host)
    rng = random.Random(4)
    garbage = [b"", b"DMB\x01", env.MAGIC + bytes(100), *(rng.randbytes(rng.randrange(200))
                                                          for _ in range(300))]  # fmt: skip
    messages = deliver(garbage, SCIENTIST.id)
    assert opener.add(messages) == []
    assert len(opener.refused) == len(messages)
    bad_sender = [Delivered("ef" * 16, "not an id", b"x", NOW)]
    assert opener.add(bad_sender) == [] and "malformed sender" in opener.refused[-1][1]


def test_limits_on_size_and_streams(host: Identity, big_stream: list[bytes], big: bytes) -> None:
    small = MailOpener(SCIENTIST, kinds=SCIENTIST_KINDS, max_bytes=MB)
    messages = deliver(big_stream, host.id)
    assert small.add(messages) == []
    assert_refused(small, messages, "")
    tiny = MailOpener(SCIENTIST, kinds=SCIENTIST_KINDS, max_bytes=100)
    single = deliver(seal_mail(host, SCIENTIST.id, SCIENTIST.public_key, UPDATE, bytes(101)),
                     host.id)  # fmt: skip
    assert tiny.add(single) == [] and "over 100 bytes" in tiny.refused[0][1]
    # Two streams at once, one allowed: the second is refused, the first still completes.
    one = MailOpener(SCIENTIST, kinds=SCIENTIST_KINDS, max_bytes=8 * MB, max_streams=1)
    first = deliver(big_stream, host.id)
    second = deliver(seal_mail(host, SCIENTIST.id, SCIENTIST.public_key, RESULT, big), host.id)
    assert one.add([*first[:3], *second[:3]]) == []
    assert_refused(one, second[:1], "at once")
    assert_refused(one, second[1:3], "already ended or refused")
    [mail] = one.add([*first[3:], *second[3:]])
    assert mail.payload == big
    assert_refused(one, second, "")
    both = MailOpener(SCIENTIST, kinds=SCIENTIST_KINDS, max_bytes=8 * MB,
                      max_total_bytes=BIG + 10)  # fmt: skip
    assert both.add([*first[:3], *second[:3]]) == []
    assert_refused(both, second[:1], "bytes at once")
    assert both.pending_ids() == [m.message_id for m in first[:3]]


def test_construction_checks(host: Identity) -> None:
    for bad in ({"kinds": []}, {"kinds": "job"}, {"kinds": ["Job!"]}, {"max_bytes": 0},
                {"max_streams": 0}, {"max_total_bytes": -1}, {"idle_seconds": 0}):  # fmt: skip
        kw = {"kinds": HOST_KINDS, "max_bytes": MB, **bad}
        with pytest.raises(ValueError):
            MailOpener(host, **kw)
    assert CANCEL in HOST_KINDS and UPDATE in SCIENTIST_KINDS
    with pytest.raises(TypeError):
        host_opener(host).add([b"raw envelope"])  # type: ignore[list-item]
