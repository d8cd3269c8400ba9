"""The seed flow between two processes on different networks, behind NATs.

Owner in home1 (behind nat1), scientist in home2 (behind nat2), signaling server and
coturn on the "public" network; each peer uses only the public API (tests/network/duet_*.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from duet_pair import PeerRun, run_pair
from netns import Topology, topology

pytestmark = [pytest.mark.network, pytest.mark.usefixtures("require_netns")]

SIGNALING_PORT = 8765
FAIL_TIMEOUT = 10.0


def assert_seed_flow(owner: PeerRun, scientist: PeerRun) -> None:
    assert owner.ok, owner.describe()
    assert scientist.ok, scientist.describe()
    assert scientist.report["nbytes"] == owner.report["nbytes"] == 10 * 1024 * 1024
    assert scientist.report["sha256"] == owner.report["expected_sha256"]
    assert owner.report["partner_closed"] is True
    assert owner.report["releases"] == 1


def pair_types(*runs: PeerRun) -> set[str]:
    return {kind for run in runs for kind in run.report["candidate_types"]}


def start(topo: Topology, *extra: str) -> str:
    return topo.start_signaling(SIGNALING_PORT, extra_args=extra)


def test_cone_nats_connect_directly_with_server_handed_ice(tmp_path: Path) -> None:
    # The server offers STUN and TURN; the direct server-reflexive pair must still win.
    with topology("a") as topo:
        owner, scientist = run_pair(topo, tmp_path, start(topo))
        turn_log = topo.log("turnserver.log")
    assert_seed_flow(owner, scientist)
    # aioice names the local side of a srflx path "host" (same socket); the remote is srflx.
    assert owner.report["candidate_types"] == ["host", "srflx"]
    assert scientist.report["candidate_types"] == ["host", "srflx"]
    assert "ALLOCATE processed, success" in turn_log  # TURN was offered and allocated


def test_symmetric_nat_relays_through_turn_with_server_handed_credentials(
    tmp_path: Path,
) -> None:
    with topology("b") as topo:
        owner, scientist = run_pair(topo, tmp_path, start(topo))
        turn_log = topo.log("turnserver.log")
    assert_seed_flow(owner, scientist)
    assert "relay" in owner.report["candidate_types"]
    assert "relay" in scientist.report["candidate_types"]
    assert "ALLOCATE processed, success" in turn_log


def test_ice_servers_from_argument_and_environment_override_the_server(tmp_path: Path) -> None:
    # The server hands out TURN credentials made with a wrong secret, which coturn refuses,
    # so the relay can only come from the owner's ice_servers=[...] and the scientist's
    # DUET_ICE_SERVERS.
    with topology("b") as topo:
        url = start(topo, "--turn-secret", "not-the-coturn-secret")
        servers = json.dumps(topo.ice_servers(with_turn=True))
        owner, scientist = run_pair(
            topo,
            tmp_path,
            url,
            owner_args=["--ice-servers", servers],
            scientist_env={"DUET_ICE_SERVERS": servers},
        )
    assert_seed_flow(owner, scientist)
    assert "relay" in pair_types(owner, scientist)


def assert_clear_timeout(run: PeerRun, *hints: str) -> None:
    """The peer gave up with ConnectionTimeout after the open timeout, naming the cause."""
    assert run.returncode == 3, run.describe()
    report = run.report
    assert report["error_type"] == "ConnectionTimeout", run.describe()
    for hint in hints:
        assert hint in report["error"], report["error"]
    # From the Client ID's confirmation (owner) or the join call (scientist) it waited
    # for the open timeout: not an instant failure, and not ICE's own ~40 s give-up (the
    # slack above the timeout is for a loaded CI machine; one run took 15.0 s).
    assert FAIL_TIMEOUT - 0.5 < report["wait_seconds"] < FAIL_TIMEOUT + 15, report


def test_symmetric_nat_without_turn_fails_with_the_no_turn_hint(tmp_path: Path) -> None:
    with topology("c") as topo:
        url = start(topo)
        owner, scientist = run_pair(
            topo, tmp_path, url, timeout=FAIL_TIMEOUT, wall=FAIL_TIMEOUT + 40
        )
    for run in (owner, scientist):
        assert_clear_timeout(run, "symmetric NATs", "configure a TURN server", "DUET_ICE_SERVERS")


def test_refused_turn_credentials_fail_with_the_turn_hint(tmp_path: Path) -> None:
    with topology("b") as topo:
        url = start(topo, "--turn-secret", "not-the-coturn-secret")
        owner, scientist = run_pair(
            topo, tmp_path, url, timeout=FAIL_TIMEOUT, wall=FAIL_TIMEOUT + 40
        )
        turn_log = topo.log("turnserver.log")
    for run in (owner, scientist):
        assert_clear_timeout(run, "TURN relay was not reachable or refused the credentials")
    assert "Cannot find credentials of user" in turn_log
