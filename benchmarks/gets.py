"""Get throughput (1, 10, 100 MB) against the raw aiortc data channel, and peak RSS.

Both run between the same two processes in the same run, alternating (raw, get, raw, get,
...), and each figure is the median of its repeats. Raw: the owner's process sends the
same number of bytes over a plain aiortc channel (64 KiB messages, its fastest size, with
bufferedAmount flow control) until the receiver confirms.
Ours: the scientist's ``ptr.get()`` of a private float32 tensor that an accept handler
releases: request, decision, encode, hash, audit, transfer, decode.

Peak RSS (VmHWM, reset before the first get of each size) is reported above the idle RSS
of each process; on the scientist's side it includes the received tensor itself. Only the
first get of a size is measured: later ones reuse memory the allocator kept.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks._peers import (
    DuetPeer,
    Handlers,
    Peer,
    connect_duet,
    connect_raw,
    disconnect_duet,
    median,
    peers,
    signaling_server,
)
from benchmarks.channel import ChannelPeer

MB = 1_000_000
SIZES = ((1 * MB, 5), (10 * MB, 3), (100 * MB, 3))
RAW_MESSAGE_BYTES = 64 * 1024
THROUGHPUT_GOAL = 0.85
RSS_GOAL = 1.5


class GetsPeer(DuetPeer):
    def handlers(self) -> Handlers:
        return {**super().handlers(), "get": self.get, "drop": self.drop}

    def get(self, tag: str, nbytes: int) -> float:
        """Scientist: ``ptr.get()``; seconds. Keeps the value until ``drop``."""
        pointer = self.objects[tag]
        started = time.perf_counter()
        value = pointer.get(reason="benchmark", timeout_secs=3600)
        seconds = time.perf_counter() - started
        got = value.numel() * value.element_size()
        if abs(got - nbytes) > 8:
            raise AssertionError(f"got {got} bytes, expected {nbytes}")
        self.objects[tag + ":value"] = value
        return seconds

    def drop(self, tag: str, pointer: bool = False) -> None:
        """Scientist: let go of the value got for ``tag`` (and of its pointer)."""
        self.objects.pop(tag + ":value", None)
        if pointer:
            self.objects.pop(tag, None)


def peer() -> Handlers:
    return {**ChannelPeer().handlers(), **GetsPeer().handlers()}


def raw_transfer(owner: Peer, scientist: Peer, nbytes: int) -> float:
    """Seconds for ``nbytes`` from the owner's process to the scientist's on plain aiortc."""
    scientist.call("serve", mode="count", target=nbytes)
    return float(owner.call("bulk", total=nbytes, message_size=RAW_MESSAGE_BYTES, timeout=1800))


def timed_get(owner: Peer, scientist: Peer, tag: str, nbytes: int, rss: bool) -> dict[str, Any]:
    """One get; with ``rss``, also the peak RSS above idle on both sides."""
    if rss:
        idle = {
            "owner": owner.call("reset_peak_rss"),
            "scientist": scientist.call("reset_peak_rss"),
        }
    seconds = scientist.call("get", tag=tag, nbytes=nbytes, timeout=3600)
    result: dict[str, Any] = {"seconds": seconds}
    if rss:
        for side, peer in (("owner", owner), ("scientist", scientist)):
            above = peer.call("peak_rss") - idle[side]
            result[f"{side}_peak_above_idle_bytes"] = above
            result[f"{side}_peak_ratio"] = above / nbytes
    return result


def run_benchmark(sizes: tuple[tuple[int, int], ...] = SIZES) -> dict[str, Any]:
    rows = []
    with (
        signaling_server() as url,
        peers(("benchmarks.gets:peer", "owner"), ("benchmarks.gets:peer", "scientist")) as (
            owner,
            scientist,
        ),
    ):
        connect_raw(owner, scientist)
        connect_duet(owner, scientist, url)
        owner.call("accept_all")
        raw_transfer(owner, scientist, 4 * MB)  # warm-up of both links
        owner.call("host", tag="warm", nbytes=4 * MB)
        scientist.call("find", tag="warm")
        scientist.call("get", tag="warm", nbytes=4 * MB)
        scientist.call("drop", tag="warm", pointer=True)
        for nbytes, repeats in sizes:
            tag = f"t{nbytes}"
            owner.call("host", tag=tag, nbytes=nbytes)
            scientist.call("find", tag=tag)
            raw_times, get_times, rss = [], [], {}
            for i in range(repeats):
                raw_times.append(raw_transfer(owner, scientist, nbytes))
                measured = timed_get(owner, scientist, tag, nbytes, rss=i == 0)
                get_times.append(measured.pop("seconds"))
                rss.update(measured)
                scientist.call("drop", tag=tag)
            scientist.call("drop", tag=tag, pointer=True)
            raw_s, get_s = median(raw_times), median(get_times)
            rows.append(
                {
                    "bytes": nbytes,
                    "repeats": repeats,
                    "raw_s": raw_s,
                    "get_s": get_s,
                    "raw_mib_s": nbytes / raw_s / 2**20,
                    "get_mib_s": nbytes / get_s / 2**20,
                    "ratio": raw_s / get_s,
                    **rss,
                }
            )
        disconnect_duet(owner, scientist)
        owner.call("raw_close")
        scientist.call("raw_close")
    largest = rows[-1]
    return {
        "rows": rows,
        "throughput_goal_met": all(r["ratio"] >= THROUGHPUT_GOAL for r in rows),
        "rss_goal_met": largest["owner_peak_ratio"] <= RSS_GOAL
        and largest["scientist_peak_ratio"] <= RSS_GOAL,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run_benchmark(), indent=2))
