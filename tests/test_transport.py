"""Framing, flow control and closing of the data-channel transport.

Framing is tested as pure functions; the transport itself over a real aiortc pair in this
process (offer and answer handed over directly, ICE on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duet_p2p.errors import PeerClosed, ProtocolError
from duet_p2p.transport import framing
from duet_p2p.transport.channel import SMALL_FRAME_BYTES, ChannelOptions, DataChannelTransport
from duet_p2p.transport.peer import new_peer_connection, restrict_host_addresses, wait_open

MiB = 1024 * 1024

# -- framing -------------------------------------------------------------------------------


def frames_of(parts: list[bytes], max_frame: int) -> list[bytes]:
    frames = list(framing.split_message(parts, max_frame))
    total = sum(len(p) for p in parts)
    assert frames[0][0] == framing.START
    assert framing.read_u64(frames[0]) == total
    assert all(f[0] == framing.CONT for f in frames[1:])
    assert all(len(f) <= max_frame for f in frames)
    assert all(len(f) > framing.CONT_HEADER for f in frames[1:]), "an empty CONT frame"
    return frames


def reassemble(frames: list[bytes], max_message: int = 1 << 30) -> bytes:
    reassembler = framing.Reassembler(max_message)
    for frame in frames[:-1]:
        assert reassembler.feed(frame) is None
        assert reassembler.in_progress
    message = reassembler.feed(frames[-1])
    assert message is not None
    assert not reassembler.in_progress
    return bytes(message)


def split_into(payload: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(payload)) for c in cuts})
    bounds = [0, *points, len(payload)]
    return [payload[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("max_frame", [16, 100, 65536])
def test_round_trip_at_boundary_sizes(max_frame: int) -> None:
    start_room = max_frame - framing.START_HEADER
    cont_room = max_frame - framing.CONT_HEADER
    sizes = {
        0,
        1,
        start_room - 1,  # one frame with a byte to spare
        start_room,  # max_frame - 9: exactly one full frame
        start_room + 1,  # max_frame - 8: one byte spills into a CONT frame
        start_room + cont_room,  # exactly two full frames
        start_room + cont_room - 1,
        start_room + cont_room + 1,
        start_room + 3 * cont_room,  # an exact multiple of frames
        max_frame,
        3 * max_frame,
    }
    for size in sorted(sizes):
        payload = os.urandom(size)
        frames = frames_of([payload], max_frame)
        expected_frames = 1 if size <= start_room else 1 + -(-(size - start_room) // cont_room)
        assert len(frames) == expected_frames, size
        assert reassemble(frames) == payload, size


def test_one_frame_up_to_max_frame_minus_nine_and_eight() -> None:
    # START carries 9 header bytes (type + u64 length): max_frame - 9 payload bytes fit
    # with room to spare, so do max_frame - 9 and the frame is exactly max_frame long.
    max_frame = 64
    assert len(frames_of([b"x" * (max_frame - 10)], max_frame)) == 1
    (frame,) = frames_of([b"x" * (max_frame - 9)], max_frame)
    assert len(frame) == max_frame
    two = frames_of([b"x" * (max_frame - 8)], max_frame)
    assert [len(f) for f in two] == [max_frame, framing.CONT_HEADER + 1]


def test_multi_part_messages_are_concatenated() -> None:
    payload = os.urandom(1000)
    for cuts in (
        [],
        [0],
        [1000],
        [0, 0, 1000],
        [1, 2, 3],
        [55, 56, 500, 999],
        list(range(0, 1000, 7)),
    ):
        parts = split_into(payload, cuts)
        for max_frame in (10, 56, 57, 64, 1009, 2000):
            assert reassemble(frames_of(parts, max_frame)) == payload, (cuts, max_frame)
    parts = [b"", memoryview(b"ab"), bytearray(b"cd"), b""]
    assert reassemble(frames_of(parts, 10)) == b"abcd"  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(
    payload=st.binary(max_size=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
    max_frame=st.integers(min_value=framing.START_HEADER + 1, max_value=300),
)
def test_round_trip_property(payload: bytes, cuts: list[int], max_frame: int) -> None:
    assert reassemble(frames_of(split_into(payload, cuts), max_frame)) == payload


def test_oversize_announced_length_is_refused() -> None:
    reassembler = framing.Reassembler(max_message_bytes=1000)
    with pytest.raises(ProtocolError, match="1001-byte message"):
        reassembler.feed(bytes((framing.START,)) + (1001).to_bytes(8, "big"))
    with pytest.raises(ProtocolError, match="limit"):
        reassembler.feed(bytes((framing.START,)) + (2**64 - 1).to_bytes(8, "big"))
    assert not reassembler.in_progress


def test_continuation_without_start_is_refused() -> None:
    with pytest.raises(ProtocolError, match="outside a message"):
        framing.Reassembler(1000).feed(bytes((framing.CONT,)) + b"data")


def test_other_malformed_frames_are_refused() -> None:
    start_100 = bytes((framing.START,)) + (100).to_bytes(8, "big") + b"x" * 10
    reassembler = framing.Reassembler(1000)
    reassembler.feed(start_100)
    with pytest.raises(ProtocolError, match="before the previous one ended"):
        reassembler.feed(start_100)
    reassembler = framing.Reassembler(1000)
    reassembler.feed(start_100)
    with pytest.raises(ProtocolError, match="longer than its announced length"):
        reassembler.feed(bytes((framing.CONT,)) + b"y" * 91)
    with pytest.raises(ProtocolError, match="truncated"):
        framing.Reassembler(1000).feed(bytes((framing.START,)) + b"\x00\x01")
    with pytest.raises(ProtocolError, match="unknown frame type"):
        framing.Reassembler(1000).feed(b"\x7fabc")
    with pytest.raises(ProtocolError, match="truncated"):
        framing.read_u64(bytes((framing.CREDIT,)) + b"\x00")


def test_control_frames() -> None:
    frame = framing.control_frame(framing.CREDIT, 123456789)
    assert frame[0] == framing.CREDIT and framing.read_u64(frame) == 123456789


# -- the transport over a real aiortc pair -------------------------------------------------

PairFactory = Callable[..., Awaitable[tuple[DataChannelTransport, DataChannelTransport]]]


@pytest.fixture
async def channel_pair() -> AsyncIterator[PairFactory]:
    """Make (a, b): two transports over a real aiortc connection in this process."""
    made: list[DataChannelTransport] = []

    async def make(
        a_options: ChannelOptions | None = None, b_options: ChannelOptions | None = None
    ) -> tuple[DataChannelTransport, DataChannelTransport]:
        restrict_host_addresses(["127.0.0.1"])
        pc_a, channel_a = new_peer_connection([])
        pc_b, channel_b = new_peer_connection([])
        a = DataChannelTransport(pc_a, channel_a, a_options)
        b = DataChannelTransport(pc_b, channel_b, b_options)
        made.extend((a, b))
        await pc_a.setLocalDescription(await pc_a.createOffer())
        await pc_b.setRemoteDescription(pc_a.localDescription)
        await pc_b.setLocalDescription(await pc_b.createAnswer())
        await pc_a.setRemoteDescription(pc_b.localDescription)
        await asyncio.gather(
            wait_open(pc_a, channel_a, 10, has_turn=False),
            wait_open(pc_b, channel_b, 10, has_turn=False),
        )
        a.activate()
        b.activate()
        return a, b

    yield make
    for transport in made:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(transport._abort(), 5)


async def recv(transport: DataChannelTransport, timeout: float = 20.0) -> bytes:
    return bytes(await asyncio.wait_for(transport.recv(), timeout))


async def test_messages_of_every_size_in_order(channel_pair: PairFactory) -> None:
    a, b = await channel_pair()
    frame = a.max_frame_bytes
    sizes = [0, 1, frame - 9, frame - 8, frame, 5 * frame + 3, 2 * MiB]
    payloads = [os.urandom(n) for n in sizes]
    for payload in payloads:
        await asyncio.wait_for(a.send(payload[:7], payload[7:]), 20)
    for payload in payloads:
        assert await recv(b) == payload
    await asyncio.wait_for(b.send(b"back"), 5)
    assert await recv(a) == b"back"
    assert b.protocol_errors == 0 and a.protocol_errors == 0
    assert 0 < await asyncio.wait_for(a.ping(), 5) < 5


async def test_credit_window_bounds_bytes_in_flight(channel_pair: PairFactory) -> None:
    window = 4 * MiB
    a, b = await channel_pair(ChannelOptions(window_bytes=window))
    payload = os.urandom(32 * MiB)
    samples: list[int] = []

    async def sample() -> None:
        while True:
            samples.append(a._in_flight)
            await asyncio.sleep(0)

    async def receive() -> str:
        return hashlib.sha256(await recv(b, 60)).hexdigest()

    sampler = asyncio.ensure_future(sample())
    receiver = asyncio.ensure_future(receive())
    try:
        await asyncio.wait_for(a.send(payload), 60)
        digest = await asyncio.wait_for(receiver, 60)
    finally:
        sampler.cancel()
        receiver.cancel()
    assert digest == hashlib.sha256(payload).hexdigest()
    assert len(samples) > 100
    assert max(samples) <= window, f"{max(samples)} bytes in flight, window {window}"
    assert max(samples) > window // 2, "the window was never used: the sampler saw nothing"


async def test_graceful_close_delivers_queued_messages(channel_pair: PairFactory) -> None:
    a, b = await channel_pair()
    count, size = 60, 100_000  # 6 MB: more than the window, so close must wait for credit
    received: list[bytes] = []

    async def receive() -> None:
        while True:
            received.append(await recv(b))

    receiver = asyncio.ensure_future(receive())
    try:
        for i in range(count):
            await asyncio.wait_for(a.send(bytes((i,)) * size), 20)
        await asyncio.wait_for(a.close(), 10)
        with pytest.raises(PeerClosed):
            await asyncio.wait_for(receiver, 10)
    finally:
        receiver.cancel()
    assert [m[:1] for m in received] == [bytes((i,)) for i in range(count)]
    assert all(len(m) == size for m in received)
    assert a.closed
    with pytest.raises(PeerClosed):
        await a.send(b"after close")
    with pytest.raises(PeerClosed):
        await recv(b, 5)  # stays closed for every later call


async def test_malformed_frame_from_the_peer_ends_the_connection(
    channel_pair: PairFactory,
) -> None:
    a, b = await channel_pair()
    a._channel.send(bytes((framing.CONT,)) + b"no start")
    with pytest.raises(ProtocolError, match="outside a message"):
        await recv(b, 10)
    assert b.protocol_errors == 1
    assert b.closed


async def test_text_frame_from_the_peer_ends_the_connection(channel_pair: PairFactory) -> None:
    a, b = await channel_pair()
    a._channel.send("hello")
    with pytest.raises(ProtocolError, match="text or empty frame"):
        await recv(b, 10)


async def test_oversize_message_from_the_peer_is_refused(channel_pair: PairFactory) -> None:
    a, b = await channel_pair(None, ChannelOptions(max_message_bytes=1000))
    await a.send(b"x" * 1000)
    assert await recv(b) == b"x" * 1000
    await a.send(b"x" * 1001)
    with pytest.raises(ProtocolError, match="1001-byte message"):
        await recv(b, 10)


# -- batches of small frames ---------------------------------------------------------------


def batch_items(frame: bytes) -> list[bytes]:
    items = list(framing.split_batch(frame))
    assert all(isinstance(item, memoryview) for item in items)
    return [bytes(item) for item in items]


def some_frames(count: int) -> list[bytes]:
    """``count`` frames of every kind a batch may carry: whole messages, the first and
    further frames of a split one, and control frames."""
    long_message = list(framing.split_message([os.urandom(300)], 64))
    kinds = [
        lambda i: next(framing.split_message([os.urandom(i % 50)], 1024)),
        lambda i: long_message[0],
        lambda i: long_message[1 + i % (len(long_message) - 1)],
        lambda i: framing.control_frame(framing.CREDIT, i),
        lambda i: framing.control_frame(framing.PING, i),
        lambda i: framing.control_frame(framing.PONG, i),
        lambda i: framing.control_frame(framing.CLOSE),
        lambda i: bytes((framing.CONT,)),  # the smallest frame: a type byte alone
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


@pytest.mark.parametrize("count", [1, 2, 3, 8, 100, 1000])
def test_batch_round_trip(count: int) -> None:
    frames = some_frames(count)
    batch = framing.batch_frame(frames)
    assert batch[0] == framing.BATCH
    assert len(batch) == 1 + sum(framing.BATCH_ITEM_HEADER + len(f) for f in frames)
    assert batch_items(batch) == frames


def test_batch_items_at_boundary_sizes() -> None:
    for size in (1, 2, 255, 256, 65535, 65536, SMALL_FRAME_BYTES - 1, SMALL_FRAME_BYTES):
        frame = bytes((framing.CONT,)) + os.urandom(size - 1)
        assert batch_items(framing.batch_frame([frame])) == [frame], size
        assert batch_items(framing.batch_frame([frame, b"\x10", frame])) == [
            frame,
            b"\x10",
            frame,
        ], size
    # a batch exactly as large as the channel's frames, as the sender fills them
    max_frame = 64 * 1024
    item = bytes((framing.CONT,)) + os.urandom(1000)
    frames = [item] * ((max_frame - 1) // (framing.BATCH_ITEM_HEADER + len(item)))
    room = max_frame - len(framing.batch_frame(frames)) - framing.BATCH_ITEM_HEADER
    frames.append(bytes((framing.CONT,)) + os.urandom(room - 1))
    batch = framing.batch_frame(frames)
    assert len(batch) == max_frame
    assert batch_items(batch) == frames


def test_batch_items_are_views_into_the_batch() -> None:
    batch = framing.batch_frame([b"\x02abc", b"\x02de"])
    first, second = framing.split_batch(batch)
    assert first.obj is batch and second.obj is batch
    assert bytes(first) == b"\x02abc" and bytes(second) == b"\x02de"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.binary(min_size=1, max_size=300).filter(lambda f: f[0] != framing.BATCH),
        min_size=1,
        max_size=40,
    )
)
def test_batch_round_trip_property(frames: list[bytes]) -> None:
    assert batch_items(framing.batch_frame(frames)) == frames


def item(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (framing.batch_frame([]), "empty batch"),
        (bytes((framing.BATCH,)) + b"\x00", "truncated batch"),
        (bytes((framing.BATCH,)) + b"\x00\x00\x00", "truncated batch"),
        (framing.batch_frame([b"\x02ok"]) + b"\x00\x00", "truncated batch"),
        (bytes((framing.BATCH,)) + (5).to_bytes(4, "big") + b"\x02abc", "longer than the batch"),
        (bytes((framing.BATCH,)) + (2**32 - 1).to_bytes(4, "big") + b"\x02", "longer than"),
        (framing.batch_frame([b"\x02ok"])[:-1], "longer than the batch"),
        (framing.batch_frame([b"\x02ok", b""]), "empty"),
        (framing.batch_frame([b""]), "empty"),
        (framing.batch_frame([framing.batch_frame([b"\x02x"])]), "batch inside a batch"),
        (framing.batch_frame([b"\x02ok", bytes((framing.BATCH,))]), "batch inside a batch"),
    ],
    ids=[
        "no-items",
        "1-byte-length",
        "3-byte-length",
        "trailing-partial-length",
        "length-past-end",
        "huge-length",
        "last-item-cut",
        "empty-item-after-good",
        "empty-item",
        "nested-batch",
        "bare-nested-batch",
    ],
)
def test_malformed_batches_are_refused(batch: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        list(framing.split_batch(batch))


def test_batch_refusal_stops_at_the_bad_item() -> None:
    # items before a bad one come out first; nothing after it is read
    batch = framing.batch_frame([b"\x02one", b"\x02two"]) + item(b"") + item(b"\x02three")
    items = framing.split_batch(batch)
    assert bytes(next(items)) == b"\x02one"
    assert bytes(next(items)) == b"\x02two"
    with pytest.raises(ProtocolError):
        next(items)


class SendCounter:
    """Wraps a channel's ``send`` to count the data-channel messages it is handed."""

    def __init__(self, channel: object) -> None:
        self.kinds: list[int] = []
        self.sizes: list[int] = []
        self._send = channel.send  # type: ignore[attr-defined]
        channel.send = self  # type: ignore[attr-defined]

    def __call__(self, data: bytes | str) -> None:
        if isinstance(data, bytes):
            self.kinds.append(data[0])
            self.sizes.append(len(data))
        self._send(data)


async def send_all(transport: DataChannelTransport, payloads: list[bytes]) -> None:
    """Send back to back, one timeout for all: on Python 3.11 ``wait_for`` around each
    send would run it as its own task, so the loop would turn (and flush) between sends."""
    for payload in payloads:
        await transport.send(payload)


async def send_and_receive(
    a: DataChannelTransport, b: DataChannelTransport, payloads: list[bytes]
) -> list[bytes]:
    """Send ``payloads`` back to back from ``a`` while ``b`` receives them all."""

    async def receive() -> list[bytes]:
        return [await recv(b, 10) for _ in payloads]

    receiver = asyncio.ensure_future(receive())
    try:
        await asyncio.wait_for(send_all(a, payloads), 20)
        return await asyncio.wait_for(receiver, 20)
    finally:
        receiver.cancel()


async def test_many_small_messages_travel_in_few_channel_messages(
    channel_pair: PairFactory,
) -> None:
    a, b = await channel_pair()
    counter = SendCounter(a._channel)
    count = 5000
    payloads = [i.to_bytes(4, "big") + os.urandom(i % 200) for i in range(count)]
    payloads[7] = b""  # an empty message is a frame too

    received = await send_and_receive(a, b, payloads)
    assert len(received) == count
    assert received == payloads
    assert b.messages_received == count
    assert a.protocol_errors == 0 and b.protocol_errors == 0
    sent = len(counter.kinds)
    assert sent < count // 50, f"{sent} data-channel messages for {count} messages"
    assert framing.BATCH in counter.kinds
    assert max(counter.sizes) <= a.max_frame_bytes
    # still usable both ways afterwards
    await asyncio.wait_for(b.send(b"back"), 5)
    assert await recv(a, 10) == b"back"


async def test_small_and_large_messages_keep_their_order(channel_pair: PairFactory) -> None:
    a, b = await channel_pair()
    counter = SendCounter(a._channel)
    # START frames around the size at which a frame stops waiting for a batch
    edge = SMALL_FRAME_BYTES - framing.BATCH_ITEM_HEADER - framing.START_HEADER
    sizes = [10, edge - 1, 20, edge, 30, edge + 1, 40, 3 * a.max_frame_bytes, 50, 0, 60]
    payloads = [bytes((i,)) + os.urandom(max(0, n - 1)) for i, n in enumerate(sizes * 20)]

    received = await send_and_receive(a, b, payloads)
    assert [len(m) for m in received] == [len(p) for p in payloads]
    assert received == payloads
    assert max(counter.sizes) <= a.max_frame_bytes
    assert framing.BATCH in counter.kinds
    assert a.protocol_errors == 0 and b.protocol_errors == 0


async def test_malformed_batch_from_the_peer_ends_the_connection(
    channel_pair: PairFactory,
) -> None:
    a, b = await channel_pair()
    hello = next(framing.split_message([b"hello"], 1024))
    nested = framing.batch_frame([hello, framing.batch_frame([hello])])
    a._channel.send(nested)
    assert await recv(b, 10) == b"hello"  # the good item before the bad one arrived
    with pytest.raises(ProtocolError, match="batch inside a batch"):
        await recv(b, 10)
    assert b.protocol_errors == 1
    assert b.closed
