"""Streams: large payloads in chunks; any arrival order, but nothing dropped, duplicated,
swapped, reordered or truncated gets through."""

from __future__ import annotations

import io
import os
import random

import pytest

from duet_p2p.identity import Identity
from duet_p2p.mailbox import stream as st
from duet_p2p.mailbox.envelope import (
    MAX_ENVELOPE_BYTES,
    EnvelopeRefused,
    SeenMessages,
    open_envelope,
    peek_header,
    seal_envelope,
    sign_envelope,
)
from duet_p2p.mailbox.known_keys import KeyNotPinned
from duet_p2p.mailbox.stream import StreamAssembler, seal_stream

SIZE = 5_000_000
CHUNK = 256 * 1024


@pytest.fixture(scope="module")
def people() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()  # host, scientist


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture(scope="module")
def sealed(people, data) -> list[bytes]:
    host, scientist = people
    return list(seal_stream(host, scientist.id, scientist.public_key, "result", data))


def _assembler(people, **kw) -> StreamAssembler:
    host, scientist = people
    kw.setdefault("max_bytes", SIZE)
    return StreamAssembler(scientist, sender_id=host.id, **kw)


def _feed(assembler: StreamAssembler, envelopes: list[bytes]) -> None:
    for envelope in envelopes:
        assembler.add(envelope)


def test_in_order(people, sealed, data):
    assert len(sealed) == 1 + -(-SIZE // CHUNK) == 21
    assert all(len(e) <= MAX_ENVELOPE_BYTES for e in sealed)
    assert all(data[1000:1100] not in e for e in sealed)
    assembler = _assembler(people)
    for i, envelope in enumerate(sealed):
        assert assembler.add(envelope) is (i == len(sealed) - 1)
    assert assembler.payload() == data
    assert (assembler.kind, assembler.size, len(assembler.stream_id)) == ("result", SIZE, 16)


def test_shuffled_arrival_into_a_file(people, sealed, data, tmp_path):
    shuffled = sealed[:]
    random.Random(7).shuffle(shuffled)
    path = tmp_path / "result.bin"
    with open(path, "wb") as sink:
        assembler = _assembler(people, sink=sink)
        _feed(assembler, shuffled)
        assembler.finish()
    assert path.read_bytes() == data
    with pytest.raises(ValueError, match="sink"):
        assembler.payload()


def test_opening_envelope_last(people, sealed, data):
    assembler = _assembler(people)
    _feed(assembler, sealed[1:] + sealed[:1])
    assert assembler.payload() == data


def test_a_dropped_chunk_leaves_it_incomplete(people, sealed):
    assembler = _assembler(people)
    _feed(assembler, sealed[:7] + sealed[8:])
    assert not assembler.done
    with pytest.raises(EnvelopeRefused, match="incomplete"):
        assembler.payload()


def test_a_dropped_final_chunk_leaves_it_incomplete(people, sealed):
    assembler = _assembler(people)
    _feed(assembler, sealed[:-1])
    with pytest.raises(EnvelopeRefused, match="20 of 21|incomplete"):
        assembler.finish()


@pytest.mark.parametrize("where", [0, 3, 20])
def test_a_duplicated_envelope_is_refused(people, sealed, where):
    assembler = _assembler(people)
    order = sealed[: where + 1] + [sealed[where]] + sealed[where + 1 :]
    with pytest.raises(EnvelopeRefused, match="twice|after its end"):
        _feed(assembler, order)
    with pytest.raises(EnvelopeRefused, match="refused before"):
        assembler.add(sealed[-1])
    with pytest.raises(EnvelopeRefused):
        assembler.finish()


def test_a_chunk_swapped_in_from_another_stream_is_refused(people, sealed):
    host, scientist = people
    other = list(seal_stream(host, scientist.id, scientist.public_key, "result", os.urandom(SIZE)))
    assembler = _assembler(people)
    with pytest.raises(EnvelopeRefused, match="an envelope of another stream"):
        _feed(assembler, sealed[:5] + [other[5]] + sealed[6:])


def test_a_message_or_another_senders_stream_is_refused(people, sealed):
    host, scientist = people
    single = seal_envelope(host, scientist.id, scientist.public_key, "result", b"x")
    with pytest.raises(EnvelopeRefused, match="not part of a stream"):
        _assembler(people).add(single)
    stranger = Identity.generate()
    theirs = list(seal_stream(stranger, scientist.id, scientist.public_key, "result", b"y"))
    with pytest.raises(EnvelopeRefused, match="it says it is from"):
        _assembler(people).add(theirs[0])
    with pytest.raises(EnvelopeRefused, match="addressed to"):
        StreamAssembler(host, sender_id=host.id, max_bytes=SIZE).add(sealed[0])


def test_a_flipped_byte_in_a_chunk_is_refused(people, sealed):
    changed = bytearray(sealed[4])
    changed[len(changed) // 2] ^= 0x80
    with pytest.raises(EnvelopeRefused, match="signature"):
        _feed(_assembler(people), sealed[:4] + [bytes(changed)])


def test_chunks_relabelled_by_their_sender_do_not_decrypt(people):
    """Even a sender re-signing two chunks under each other's index is caught: the
    secretstream order and the associated data bind each chunk to its place."""
    host, scientist = people
    data = os.urandom(4 * 1024)
    envelopes = list(
        seal_stream(host, scientist.id, scientist.public_key, "result", data, chunk_bytes=1024)
    )
    headers = [peek_header(e) for e in envelopes]
    bodies = [e[8 + _header_len(e) : -64] for e in envelopes]
    swapped = [envelopes[0], sign_envelope(host, headers[1], bodies[2]),
               sign_envelope(host, headers[2], bodies[1]), *envelopes[3:]]  # fmt: skip
    with pytest.raises(EnvelopeRefused, match="chunk 1 does not decrypt"):
        _feed(_assembler(people), swapped)


def _header_len(envelope: bytes) -> int:
    return int.from_bytes(envelope[4:8], "big")


def test_a_final_tag_missing_or_too_early_is_refused(people, monkeypatch):
    host, scientist = people
    data = os.urandom(3000)

    def seal() -> list[bytes]:
        return list(
            seal_stream(host, scientist.id, scientist.public_key, "r", data, chunk_bytes=1024)
        )

    monkeypatch.setattr(st, "_push_tag", lambda index, count: st._TAG_MESSAGE)
    with pytest.raises(EnvelopeRefused, match="end tag"):
        _feed(_assembler(people), seal())
    monkeypatch.setattr(st, "_push_tag", lambda index, count: st._TAG_FINAL)
    with pytest.raises(EnvelopeRefused, match="chunk 1 is not the one expected"):
        _feed(_assembler(people), seal())


def test_buffering_ahead_of_a_missing_chunk_is_capped(people, sealed):
    assembler = _assembler(people, max_buffered=4)
    _feed(assembler, sealed[2:6])
    with pytest.raises(EnvelopeRefused, match="more than 4 chunks"):
        assembler.add(sealed[6])


def test_a_stream_larger_than_accepted_is_refused(people, sealed):
    with pytest.raises(EnvelopeRefused, match="at most 1000000"):
        _assembler(people, max_bytes=1_000_000).add(sealed[0])


def test_a_replayed_stream_is_refused(people, tmp_path):
    host, scientist = people
    envelopes = list(seal_stream(host, scientist.id, scientist.public_key, "result", b"abc"))
    with SeenMessages(tmp_path / "seen.sqlite") as seen:
        first = _assembler(people, seen=seen)
        _feed(first, envelopes)
        assert first.payload() == b"abc"
        with pytest.raises(EnvelopeRefused, match="replay"):
            _feed(_assembler(people, seen=seen), envelopes)
        with pytest.raises(EnvelopeRefused, match="replay"):
            _assembler(people, seen=seen).add(envelopes[1])


def test_stale_stream_envelopes_are_refused(people):
    host, scientist = people
    envelopes = list(
        seal_stream(host, scientist.id, scientist.public_key, "result", b"abc", now=1_000_000)
    )
    with pytest.raises(EnvelopeRefused, match="days ago"):
        _assembler(people, clock=lambda: 1_000_000 + 9 * 86400).add(envelopes[0])
    late = _assembler(people, clock=lambda: 1_000_000 + 60)
    _feed(late, envelopes)
    assert late.payload() == b"abc"


def test_the_opening_envelope_is_not_a_message(people, sealed):
    host, scientist = people
    with pytest.raises(EnvelopeRefused, match="part of a stream"):
        open_envelope(scientist, sealed[0], sender_id=host.id)


def test_iterable_sources_and_edge_sizes(people):
    host, scientist = people
    data = os.urandom(10_000)
    pieces = (data[i : i + 777] for i in range(0, len(data), 777))

    def stream(source, **kw) -> list[bytes]:
        return list(seal_stream(host, scientist.id, scientist.public_key, "result", source, **kw))

    envelopes = stream(pieces, size=len(data), chunk_bytes=1024)
    assert len(envelopes) == 1 + 10
    assembler = _assembler(people)
    _feed(assembler, envelopes)
    assert assembler.payload() == data
    for size in (0, 1024, 2048):  # empty, exactly one chunk, exactly two
        payload = os.urandom(size)
        assembler = _assembler(people)
        _feed(assembler, stream(iter([payload]), size=size, chunk_bytes=1024))
        assert assembler.payload() == payload
    with pytest.raises(ValueError, match="more than"):
        stream(iter([data]), size=100, chunk_bytes=1024)
    with pytest.raises(ValueError, match="not the 20000"):
        stream(iter([data]), size=20_000, chunk_bytes=1024)
    with pytest.raises(ValueError, match="size"):
        stream(iter([data]))
    with pytest.raises(ValueError, match="chunk_bytes"):
        stream(data, chunk_bytes=10)
    with pytest.raises(KeyNotPinned):
        seal_stream(host, scientist.id, host.public_key, "result", data)


def test_memory_sink_holds_only_what_arrived(people):
    host, scientist = people
    sink = io.BytesIO()
    envelopes = list(
        seal_stream(host, scientist.id, scientist.public_key, "r", b"z" * 5000, chunk_bytes=1024)
    )
    assembler = _assembler(people, sink=sink)
    _feed(assembler, envelopes[:3])
    assert sink.getvalue() == b"z" * 2048 and not assembler.done
