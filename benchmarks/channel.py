"""Raw channel round trip, bulk throughput and small-message rate: plain aiortc against our
framing (DataChannelTransport) on the same kind of link, two processes, same run.

Plain aiortc sends with the usual bufferedAmount/bufferedamountlow flow control; ours
sends whole messages through the transport (framing, credit window, reassembly).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks._peers import Handlers, Peer, RawLink, connect_raw, median, peers, run

RTT_ROUNDS = 300
ROUNDS = 3
BULK_BYTES = 24 * 1024 * 1024
WARMUP_BYTES = 2 * 1024 * 1024
RAW_MESSAGE_SIZES = (16 * 1024, 64 * 1024, 256 * 1024)
RAW_BULK_MESSAGE = 64 * 1024
BURST_MESSAGES = 5000
BURST_TRIES = 3
RAW_HIGH_WATER = 4 * 1024 * 1024
RAW_LOW_WATER = 1024 * 1024
DONE = b"done"


class ChannelPeer(RawLink):
    """One end of a link: echoes or counts what arrives, or drives a measurement."""

    def __init__(self) -> None:
        super().__init__()
        self._mode = "collect"
        self._target = 0
        self._count = 0
        self._inbox: asyncio.Queue[Any] | None = None
        self._receiver: asyncio.Task[None] | None = None

    def handlers(self) -> Handlers:
        return {
            **super().handlers(),
            "serve": self.serve,
            "rtt": self.rtt,
            "bulk": self.bulk,
            "burst": self.burst,
        }

    def _new(self, framed: bool, options: dict[str, Any] | None = None) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        self._inbox = self._receiver = None
        super()._new(framed, options)

    # -- receiving: one handler for both kinds of link ---------------------------------

    def _attach(self) -> None:
        self._inbox = asyncio.Queue()
        if self.transport is None:
            self.channel.on("message", self._on_message)
        else:
            self._receiver = asyncio.ensure_future(self._receive_loop())

    async def _receive_loop(self) -> None:
        while True:
            self._on_message(await self.transport.recv())

    def _on_message(self, message: Any) -> None:
        if self._mode == "echo":
            self._send_now(message)
        elif self._mode == "count":
            self._count += len(message)
            if self._count >= self._target:
                self._count = 0
                self._send_now(DONE)
        else:
            assert self._inbox is not None
            self._inbox.put_nowait(message)

    def _send_now(self, data: Any) -> None:
        if self.transport is None:
            self.channel.send(bytes(data))
        else:
            asyncio.ensure_future(self.transport.send(data))

    async def _send(self, data: Any) -> None:
        if self.transport is None:
            self.channel.send(data)
        else:
            await self.transport.send(data)

    def serve(self, mode: str, target: int = 0) -> None:
        """Receiver: ``echo`` every message, or ``count`` bytes and answer at ``target``."""

        async def go() -> None:
            if self._inbox is None:
                self._attach()
            self._mode, self._target, self._count = mode, target, 0

        run(go())

    # -- measuring ---------------------------------------------------------------------

    def _ensure_attached(self) -> None:
        if self._inbox is None:
            self._attach()

    def rtt(self, rounds: int = RTT_ROUNDS, size: int = 16) -> dict[str, float]:
        """One message out, its echo back, ``rounds`` times; seconds."""

        async def go() -> dict[str, float]:
            self._ensure_attached()
            assert self._inbox is not None
            payload = b"x" * size
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                await self._send(payload)
                await asyncio.wait_for(self._inbox.get(), 10)
                times.append(time.perf_counter() - started)
            return {"median": median(times), "min": min(times)}

        return run(go())

    def bulk(self, total: int, message_size: int) -> float:
        """Send ``total`` bytes; seconds until the receiver confirms it has them all.

        Plain aiortc: messages of ``message_size`` with bufferedAmount flow control.
        Ours: one message of ``total`` bytes (the transport frames it), like a get.
        The receiver must be counting (``serve("count", total)``).
        """

        async def go() -> float:
            self._ensure_attached()
            assert self._inbox is not None
            payload = memoryview(bytearray(total)) if self.transport is not None else None
            started = time.perf_counter()
            if payload is None:
                await self._raw_bulk(total, message_size)
            else:
                await self.transport.send(payload)
            await asyncio.wait_for(self._inbox.get(), 600)
            return time.perf_counter() - started

        return run(go(), timeout=900)

    async def _raw_bulk(self, total: int, message_size: int) -> None:
        channel = self.channel
        channel.bufferedAmountLowThreshold = RAW_LOW_WATER
        drained = asyncio.Event()
        channel.on("bufferedamountlow", drained.set)
        payload = bytes(message_size)
        sent = 0
        while sent < total:
            if channel.bufferedAmount >= RAW_HIGH_WATER:
                drained.clear()
                await asyncio.wait_for(drained.wait(), 60)
            size = min(message_size, total - sent)
            channel.send(payload if size == message_size else payload[:size])
            sent += size
        channel.remove_listener("bufferedamountlow", drained.set)

    def burst(self, count: int = BURST_MESSAGES, size: int = 16) -> float:
        """``count`` small messages back to back; seconds until the receiver has them all."""

        async def go() -> float:
            self._ensure_attached()
            assert self._inbox is not None
            payload = b"x" * size
            started = time.perf_counter()
            if self.transport is None:
                for _ in range(count):
                    self.channel.send(payload)
            else:
                for _ in range(count):
                    await self.transport.send(payload)
            await asyncio.wait_for(self._inbox.get(), 120)
            return time.perf_counter() - started

        return run(go(), timeout=300)


def peer() -> Handlers:
    return ChannelPeer().handlers()


def best_burst_rate(sender: Peer, receiver: Peer, tries: int = BURST_TRIES) -> float:
    """Messages per second of a burst, the best of ``tries``: plain aiortc's rate swings
    several-fold with the state of its congestion window, so each side gets its best."""
    rates = []
    for _ in range(tries):
        receiver.call("serve", mode="count", target=BURST_MESSAGES * 16)
        seconds = sender.call("burst", count=BURST_MESSAGES, size=16, timeout=300)
        rates.append(BURST_MESSAGES / seconds)
    return max(rates)


def _measure(sender: Peer, receiver: Peer, framed: bool, first: bool) -> dict[str, Any]:
    """One connection: round trip and message rate (first round only), then bulk."""
    connect_raw(sender, receiver, framed=framed)
    result: dict[str, Any] = {}
    receiver.call("serve", mode="count", target=WARMUP_BYTES)
    sender.call("bulk", total=WARMUP_BYTES, message_size=RAW_BULK_MESSAGE)
    if first:
        receiver.call("serve", mode="echo")
        sender.call("rtt", rounds=30)  # warm-up
        result["rtt_ms"] = sender.call("rtt")["median"] * 1e3
        result["msgs_per_s"] = best_burst_rate(sender, receiver)
    receiver.call("serve", mode="count", target=BULK_BYTES)
    sizes = (RAW_BULK_MESSAGE,) if framed or not first else RAW_MESSAGE_SIZES
    for size in sizes:
        seconds = sender.call("bulk", total=BULK_BYTES, message_size=size, timeout=900)
        result[f"bulk_mib_s_{size // 1024}k"] = BULK_BYTES / seconds / 2**20
    sender.call("raw_close")
    receiver.call("raw_close")
    return result


def run_benchmark(rounds: int = ROUNDS) -> dict[str, Any]:
    """Plain aiortc and our transport alternately, between the same two processes.

    Bulk throughput is the median over ``rounds``; plain aiortc's message size is 64 KiB
    (its fastest; 16 and 256 KiB are measured once, for the record). Ours sends one
    message of the whole size, framed at the transport's 64 KiB.
    """
    with peers(("benchmarks.channel:peer", "sender"), ("benchmarks.channel:peer", "receiver")) as (
        sender,
        receiver,
    ):
        loops = {sender.call("loop"), receiver.call("loop")}
        runs: dict[str, list[dict[str, Any]]] = {"raw": [], "ours": []}
        for i in range(rounds):
            runs["raw"].append(_measure(sender, receiver, framed=False, first=i == 0))
            runs["ours"].append(_measure(sender, receiver, framed=True, first=i == 0))
    key = f"bulk_mib_s_{RAW_BULK_MESSAGE // 1024}k"
    raw = {**runs["raw"][0], "bulk_mib_s": median([r[key] for r in runs["raw"]])}
    ours = {**runs["ours"][0], "bulk_mib_s": median([r[key] for r in runs["ours"]])}
    raw["bulk_samples"] = [r[key] for r in runs["raw"]]
    ours["bulk_samples"] = [r[key] for r in runs["ours"]]
    return {
        "loop": sorted(loops),
        "bulk_bytes": BULK_BYTES,
        "raw": raw,
        "ours": ours,
        "rtt_ratio": ours["rtt_ms"] / raw["rtt_ms"],
        "bulk_ratio": ours["bulk_mib_s"] / raw["bulk_mib_s"],
        "rate_ratio": ours["msgs_per_s"] / raw["msgs_per_s"],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run_benchmark(), indent=2))
