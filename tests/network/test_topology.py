"""The namespace harness, validated with two bare aiortc peers behind NATs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from netns import PREFIX, Topology, cleanup_leftovers, list_namespaces, topology

pytestmark = [pytest.mark.network, pytest.mark.usefixtures("require_netns")]

RAW_PEER = Path(__file__).resolve().parent / "raw_peer.py"
PEER_TIMEOUT = 15.0


def run_peers(topo: Topology, workdir: Path, source: list[str]) -> list[tuple[int, dict, str]]:
    """Run offerer in home1 and answerer in home2; (returncode, JSON result, stderr) each."""
    procs = [
        topo.run(
            ns,
            [sys.executable, str(RAW_PEER), role, "--dir", str(workdir), "--timeout"]
            + [str(PEER_TIMEOUT), *source],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ns, role in ((topo.home1, "offerer"), (topo.home2, "answerer"))
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=PEER_TIMEOUT + 15)
        lines = out.strip().splitlines()
        results.append((proc.returncode, json.loads(lines[-1]) if lines else {}, err))
    return results


def connect(topo: Topology, tmp_path: Path, with_turn: bool) -> list[dict[str, Any]]:
    """Both peers connect and echo; return their JSON reports."""
    source = ["--ice-servers", json.dumps(topo.ice_servers(with_turn=with_turn))]
    results = run_peers(topo, tmp_path, source)
    for code, report, err in results:
        assert code == 0 and report.get("ok"), f"peer failed ({code}): {report} {err[-3000:]}"
    return [report for _, report, _ in results]


def pair_types(reports: list[dict[str, Any]]) -> set[str]:
    return {r[side]["type"] for r in reports for side in ("local", "remote")}


def assert_nothing_left(prefix: str) -> None:
    assert not [n for n in list_namespaces() if n.startswith(prefix)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10)
    assert prefix not in links.stdout and PREFIX not in links.stdout


def test_cone_nat_connects_directly_over_srflx(tmp_path: Path) -> None:
    with topology("a") as topo:
        mapped = topo.stun_probe(topo.home1, local_port=40123)
        assert mapped["mapped"] == ["198.51.100.11", 40123]  # port kept: cone-like
        reports = connect(topo, tmp_path, with_turn=False)
        prefix = topo.prefix
    types = pair_types(reports)
    assert "relay" not in types
    assert {r["remote"]["type"] for r in reports} == {"srflx"}
    assert all(r["local"]["type"] == "host" and r["local_reflexive"] for r in reports)
    assert_nothing_left(prefix)


def test_cone_nat_prefers_direct_path_when_turn_is_offered(tmp_path: Path) -> None:
    with topology("a") as topo:
        reports = connect(topo, tmp_path, with_turn=True)
    assert all("relay" in r["gathered"] for r in reports)
    assert "relay" not in pair_types(reports)


def test_symmetric_nat_connects_through_turn_relay(tmp_path: Path) -> None:
    with topology("b") as topo:
        first = topo.stun_probe(topo.home1, local_port=40124)
        assert first["mapped"][0] == "198.51.100.11"
        assert first["mapped"][1] != 40124  # random mapping: endpoint-dependent
        reports = connect(topo, tmp_path, with_turn=True)
        turn_log = topo.log("turnserver.log")
        assert "ALLOCATE processed, success" in turn_log  # TURN REST credentials accepted
        assert "403: Forbidden IP" in turn_log  # the relay refuses the home LAN addresses
    assert "relay" in pair_types(reports)


def test_blocked_direct_udp_connects_through_turn_relay(tmp_path: Path) -> None:
    with topology("blocked") as topo:
        reports = connect(topo, tmp_path, with_turn=True)
    assert "relay" in pair_types(reports)


def test_symmetric_nat_without_turn_fails_clearly(tmp_path: Path) -> None:
    with topology("c") as topo:
        assert topo.turn_url is None
        assert [s["urls"] for s in topo.ice_servers(with_turn=True)] == [[topo.stun_url]]
        source = ["--ice-servers", json.dumps(topo.ice_servers(with_turn=True))]
        results = run_peers(topo, tmp_path, source)
    for code, report, err in results:
        assert code == 2 and report["ok"] is False
        assert "no connection within" in err and "data channel did not open" in err


def test_signaling_server_hands_out_working_turn_credentials(tmp_path: Path) -> None:
    if not (Path(__file__).resolve().parents[2] / "signaling_server" / "__main__.py").exists():
        pytest.skip("signaling_server is not there yet")
    with topology("b") as topo:
        base = topo.start_signaling(8765)
        probe = (
            "import json, sys, urllib.request\n"
            "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        )
        health = topo.check_output(topo.home2, [sys.executable, "-c", probe, base + "/health"])
        assert json.loads(health)["status"] == "ok"
        source = ["--ice-servers-url", base + "/v1/ice-servers"]
        results = run_peers(topo, tmp_path, source)
    for code, report, err in results:
        assert code == 0 and report.get("ok"), f"peer failed ({code}): {report} {err[-3000:]}"
    assert "relay" in pair_types([r for _, r, _ in results])


def test_teardown_on_error_and_leftovers_of_dead_runs_are_removed() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with topology("a") as topo:
            prefix = topo.prefix
            raise RuntimeError("boom")
    assert_nothing_left(prefix)

    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    stale = f"{PREFIX}{dead.pid}-dead00-public"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    try:
        removed = cleanup_leftovers()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, timeout=10)
    assert stale in removed
    assert_nothing_left(f"{PREFIX}{dead.pid}-")


def test_ice_servers_never_fall_back_to_public_stun() -> None:
    # An absent or null list must never reach aiortc as None (its default is a public STUN).
    sys.path.insert(0, str(RAW_PEER.parent))
    import raw_peer

    assert raw_peer.ice_servers_from_json("[]") == []
    with pytest.raises(ValueError):
        raw_peer.ice_servers_from_json("null")
