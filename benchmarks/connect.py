"""Connect time: ``join_duet()`` call to an open, verified session, against raw aiortc setup.

Raw baseline: two RTCPeerConnections with the same negotiated channel, offer and answer
handed over directly, timed on the answering side from receiving the offer to channel open.
Ours: the scientist's ``join_duet()`` from its call to its return (fetching the offer from
the signaling server, checking it against the Duet ID, answering, waiting for the owner's
confirmation, ICE, DTLS, SCTP, and the hello exchange). IDs travel between the two
processes through the coordinator, as they would by chat (but instantly).
"""

from __future__ import annotations

from typing import Any

from benchmarks._peers import (
    DuetPeer,
    Handlers,
    RawLink,
    connect_duet,
    connect_raw,
    disconnect_duet,
    median,
    peers,
    signaling_server,
)

ROUNDS = 7
GOAL_SECONDS = 0.25


def peer() -> Handlers:
    return {**RawLink().handlers(), **DuetPeer().handlers()}


def run_benchmark(rounds: int = ROUNDS) -> dict[str, Any]:
    raw: list[float] = []
    joins: list[float] = []
    opens: list[float] = []
    with (
        signaling_server() as url,
        peers(("benchmarks.connect:peer", "owner"), ("benchmarks.connect:peer", "scientist")) as (
            owner,
            scientist,
        ),
    ):
        loops = sorted({owner.call("loop"), scientist.call("loop")})
        connect_raw(owner, scientist)  # warm-up: imports, first-use costs
        owner.call("raw_close")
        scientist.call("raw_close")
        connect_duet(owner, scientist, url)
        disconnect_duet(owner, scientist)
        for _ in range(rounds):
            raw.append(connect_raw(owner, scientist))
            owner.call("raw_close")
            scientist.call("raw_close")
            timing = connect_duet(owner, scientist, url)
            joins.append(timing["join_s"])
            opens.append(timing["open_s"])
            disconnect_duet(owner, scientist)
    result = {
        "loop": loops,
        "rounds": rounds,
        "raw_s": median(raw),
        "join_s": median(joins),
        "open_s": median(opens),
        "join_all_s": joins,
        "raw_all_s": raw,
    }
    result["ratio"] = result["join_s"] / result["raw_s"]
    result["goal_met"] = result["join_s"] <= GOAL_SECONDS
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run_benchmark(), indent=2))
