"""A standing host as its owner runs it, end to end: ``duet-host serve`` processes, scientists
in processes of their own (tests/peers/restart_scientist.py), a real signaling server and
real WebRTC on loopback.

What a restart keeps (pending requests, handlers' quotas, the scientist's identity and
accepted values), a clean stop with a scientist connected (state and audit log intact), a
signaling server that substitutes offers or answers (tests/peers/tampering_signaling.py), a
third party that tries to take the host's offers, and a host.toml with a mistake. The
owner's commands (``duet-host id``, ``requests``, ``accept``) are processes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from duet_p2p.errors import SignalingError
from duet_p2p.identity import Identity
from duet_p2p.runtime import get_runtime
from duet_p2p.signaling import SignalingClient
from duet_p2p.signaling.client import HostProofRefused, wait_message
from tests.conftest import PEERS, ROOT, wait_for
from tests.peers.tampering_signaling import MODES, TamperingSignaling

AGES = np.array([[31, 70], [45, 82], [52, 64], [29, 90], [60, 77], [38, 71]], dtype=np.int64)
HOST_NAME = "lab"
START_SECONDS = 90.0
"""A cold host imports torch twice (itself and its worker) before it is listed."""
STOP_SECONDS = 20.0
CLI_SECONDS = 30.0
SCIENTIST_SECONDS = 90.0
_BIN = Path(sys.executable).parent
DUET_HOST = [str(_BIN / "duet-host")] if (_BIN / "duet-host").exists() else [
    sys.executable, "-m", "duet_p2p.host.cli"]  # fmt: skip


# -- processes ----------------------------------------------------------------------------


class Child:
    """A process of ours, its stdout and stderr in files, in a session of its own (so its
    own children, e.g. a host's workers, are ended with it)."""

    def __init__(
        self, argv: list[str], folder: Path, name: str, home: Path, held: bool = False
    ) -> None:
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        env = {**os.environ, "DUET_HOME": str(home), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(ROOT), "DUET_ICE_HOST_ADDRESSES": "127.0.0.1"}  # fmt: skip
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE if held else subprocess.DEVNULL, stdout=out,
                stderr=err, env=env, cwd=ROOT, start_new_session=True,
            )  # fmt: skip

    def go(self) -> None:
        """Let a process started ``held`` go on (it waits for a line on stdin)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def results(self) -> list[dict[str, Any]]:
        """The ``RESULT {json}`` lines a scientist printed so far (whole lines only)."""
        lines = self.stdout().split("\n")[:-1]
        return [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]

    def wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``done()`` until true; fail (with the stderr tail) on timeout or early exit."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc.poll() is not None and not done():
                pytest.fail(f"{what}: exited {self.proc.returncode}\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout:g} s\n{self.stderr()[-3000:]}")
            time.sleep(0.05)

    def wait_results(self, count: int, timeout: float = SCIENTIST_SECONDS) -> list[dict]:
        self.wait_until(lambda: len(self.results()) >= count, timeout, f"{count} results")
        return self.results()

    def finish(self, timeout: float = SCIENTIST_SECONDS) -> list[dict[str, Any]]:
        """Wait for a clean exit; the results."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"did not exit within {timeout:g} s\n{self.stderr()[-3000:]}")
        assert code == 0, self.stderr()[-3000:]
        return self.results()

    def kill(self) -> None:
        """End the process and whatever it left in its session (e.g. a host's workers)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class Children:
    """Every process a test starts; all killed at teardown."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[Child] = []

    def start(self, argv: list[str], name: str, home: Path, held: bool = False) -> Child:
        child = Child(argv, self.folder, f"{name}-{len(self.started)}", home, held)
        self.started.append(child)
        return child

    def host(self, config: Path) -> tuple[Child, str]:
        """``duet-host serve --config config``, once it prints its Host ID."""
        host = self.start([*DUET_HOST, "serve", "--config", str(config)], "host",
                          self.folder / "host_home")  # fmt: skip
        host.wait_until(lambda: "Host ID: " in host.stdout(), START_SECONDS, "host start")
        match = re.search(r"Host ID: ([0-9a-f]{32})", host.stdout())
        assert match is not None, host.stdout()
        return host, match.group(1)

    def scientist(
        self, mode: str, url: str, host_id: str, identity: str, *extra: str, held: bool = False
    ) -> Child:
        """tests/peers/restart_scientist.py; ``held``: it waits for ``go()`` to connect."""
        argv = [sys.executable, str(PEERS / "restart_scientist.py"), mode, url, host_id,
                identity, *extra]  # fmt: skip
        return self.start(argv, f"scientist-{mode}", self.folder / "scientist_home", held)

    def kill_all(self) -> None:
        for child in self.started:
            child.kill()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    started = Children(tmp_path)
    yield started
    started.kill_all()


def stop(host: Child) -> None:
    """SIGTERM the host (the process, not its group): it must exit 0, in time, quietly."""
    host.proc.send_signal(signal.SIGTERM)
    try:
        code = host.proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the host did not stop within {STOP_SECONDS:g} s of SIGTERM\n"
                    f"{host.stderr()[-3000:]}")  # fmt: skip
    assert code == 0, host.stderr()[-3000:]
    assert "Traceback" not in host.stderr(), host.stderr()[-3000:]


def write_config(folder: Path, url: str) -> Path:
    """host.toml for a host named lab serving ages.npy, with a one-sum handler."""
    np.save(folder / "ages.npy", AGES)
    settings = {"name": HOST_NAME, "signaling_url": url, "admit": "any",
                "data_dir": str(folder / "hostdata"), "host_addresses": ["127.0.0.1"],
                "log_level": "info"}  # fmt: skip
    lines = ["[host]", *(f"{key} = {json.dumps(value)}" for key, value in settings.items())]
    lines += [
        "", "[limits]", "worker_threads = 1",
        "", "[[datasets]]", 'name = "ages"', 'path = "ages.npy"', 'columns = ["age", "weight"]',
        "", "[[handlers]]", 'name = "one sum"', 'action = "accept"', 'tags = ["ages"]',
        'op = "sum"', "max_requests = 1",
    ]  # fmt: skip
    config = folder / "host.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def cli(*argv: str) -> tuple[int, str, str]:
    """``duet-host ARGV`` as the owner types it in another terminal; (status, out, err)."""
    try:
        done = subprocess.run([*DUET_HOST, *argv], capture_output=True, text=True, cwd=ROOT,
                              timeout=CLI_SECONDS, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"duet-host {' '.join(argv)} did not finish within {CLI_SECONDS:g} s")
    return done.returncode, done.stdout, done.stderr


def host_dir(config: Path) -> Path:
    return config.parent / "hostdata" / "hosts" / HOST_NAME


def audit_events(config: Path) -> list[dict[str, Any]]:
    """Every line of the host's audit log, each parsed as one JSON object."""
    lines = (host_dir(config) / "audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(entry, dict) for entry in entries)
    return entries


# -- a restart: pending requests, quotas, values kept for a scientist ----------------------


@pytest.mark.timeout(300)
def test_restart_keeps_requests_and_quotas_and_stops_cleanly(
    signaling_url: str, tmp_path: Path, children: Children
) -> None:
    config = write_config(tmp_path, signaling_url)
    code, out, err = cli("id", "--config", str(config))  # creates the identity
    host_id = out.strip()
    assert code == 0 and re.fullmatch(r"[0-9a-f]{32}", host_id), (out, err)

    # A scientist's sum is accepted by the handler (its one use); the max waits for the owner.
    first = children.scientist("ask", signaling_url, host_id, "alice", "sum!,max", held=True)
    host, listed_id = children.host(config)
    assert listed_id == host_id
    first.go()
    hello, summed, maxed = first.wait_results(3)
    assert summed == {"op": "sum", "request_id": summed["request_id"], "status": "accepted",
                      "value": int(AGES.sum())}  # fmt: skip
    assert maxed["status"] == "pending", maxed
    request_id = maxed["request_id"]
    host.wait_until(lambda: "disconnected" in host.stderr(), 20, "the scientist leaving")

    stop(host)
    back = children.scientist("return", signaling_url, host_id, "alice", request_id, "sum",
                              held=True)  # fmt: skip
    host, listed_id = children.host(config)
    assert listed_id == host_id  # the same identity, from the host's data dir

    code, out, err = cli("requests", "--json", "--config", str(config))
    assert code == 0, err
    pending = json.loads(out)
    assert [(r["request_id"], r["client_id"], r["name"], r["status"]) for r in pending] == [
        (request_id, hello["client_id"], "max", "pending")
    ]
    code, out, err = cli("accept", request_id, "--config", str(config))
    assert code == 0 and "accepted" in out, (out, err)
    code, out, err = cli("requests", "--json", "--config", str(config))
    assert (code, json.loads(out)) == (0, [])

    # The same scientist comes back: the value waits for them, once; the quota is spent.
    back.go()
    hello2, fetched, summed2, holding = back.wait_results(4)
    assert hello2 == hello and holding == {"holding": True}
    rows = {row["request_id"]: row for row in fetched["rows"]}
    assert rows[request_id] == {"request_id": request_id, "status": "accepted", "kept": True}
    assert rows[summed["request_id"]]["status"] == "accepted"
    assert fetched["first"] == int(AGES.max())
    second = fetched["second"]
    assert isinstance(second, dict) and second["error"] == "DuetError", second
    assert "already fetched, or is no longer kept" in second["message"]
    assert fetched["kept_after"] is False
    assert summed2["status"] == "pending", "the handler's quota did not survive the restart"
    code, out, err = cli("requests", "--json", "--config", str(config))
    assert [(r["request_id"], r["status"]) for r in json.loads(out)] == [
        (summed2["request_id"], "pending")
    ]

    # SIGTERM with the scientist connected: a clean stop, within the bound.
    stop(host)
    assert back.wait_results(5)[-1] == {"closed": True}

    state = host_dir(config) / "state.sqlite"
    with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = db.execute("SELECT request_id, name, status FROM requests ORDER BY seq")
        assert stored.fetchall() == [
            (summed["request_id"], "sum", "accepted"),
            (request_id, "max", "accepted"),
            (summed2["request_id"], "sum", "pending"),
        ]
        counts = db.execute("SELECT name, count FROM handler_counts").fetchall()
        assert counts == [("one sum", 1)]
    events = [entry["event"] for entry in audit_events(config)]
    assert events.count("host_started") == 2 and events.count("host_stopped") == 2
    assert "host_stopped" in events[-3:], events[-6:]


# -- a hostile signaling server, and a third party ----------------------------------------


@dataclass
class GuardedHost:
    """A host that waits for offers through the tampering proxy's pass-through port."""

    host: Child
    host_id: str
    config: Path
    proxy: TamperingSignaling
    urls: dict[str, str]
    children: Children


@pytest.fixture(scope="module")
def guarded(signaling_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardedHost]:
    folder = tmp_path_factory.mktemp("guarded")
    runtime = get_runtime()
    proxy = TamperingSignaling(signaling_url)
    urls = runtime.run(proxy.start(MODES), timeout=10)
    started = Children(folder)
    try:
        config = write_config(folder, urls["none"])
        host, host_id = started.host(config)
        yield GuardedHost(host, host_id, config, proxy, urls, started)
    finally:
        started.kill_all()
        runtime.run(proxy.close(), timeout=10)


@pytest.mark.timeout(200)
def test_a_signaling_server_that_substitutes_offers_or_answers_is_caught(
    guarded: GuardedHost,
) -> None:
    urls = guarded.urls
    modes = ["answer-fingerprint", "answer-key", "offer-fingerprint", "offer-key"]
    attempts = [urls[mode] for mode in modes]
    bob = guarded.children.scientist("join", attempts[0], guarded.host_id, "bob", *attempts[1:])
    results = {result["url"]: result for result in bob.finish()}
    answer_fingerprint, answer_key, offer_fingerprint, offer_key = (results[u] for u in attempts)

    # The host's answer with other fingerprints, or signed by another key: the scientist
    # refuses it before its DTLS even starts.
    assert answer_fingerprint["error"] == "PeerVerificationError", answer_fingerprint
    assert "signature does not cover this connection" in answer_fingerprint["message"]
    assert answer_key["error"] == "PeerVerificationError", answer_key
    assert f"does not belong to {guarded.host_id}" in answer_key["message"]
    # The scientist's offer with other fingerprints: the host refuses it, and says so.
    assert offer_fingerprint["error"] == "PermissionDenied", offer_fingerprint
    assert "signature did not verify" in offer_fingerprint["message"]
    host = guarded.host
    assert wait_for(lambda: "refused an offer that failed verification" in host.stderr(), 10)
    # The attacker's own offer in its place: the host answers the attacker, and the
    # scientist sees that the answer was not made for them.
    assert offer_key["error"] == "PeerVerificationError", offer_key
    assert "signature does not cover this connection" in offer_key["message"]
    # Each attack was made (through the proxy), and nobody connected.
    assert sorted({mode for mode, _ in guarded.proxy.tampered}) == sorted(modes)
    tried = {result["client_id"] for result in results.values()} | {guarded.proxy.attacker.id}
    connected = [e["client_id"] for e in audit_events(guarded.config) if e["event"] == "connected"]
    assert len(tried) == len(modes) + 1 and not tried & set(connected), connected
    assert host.proc.poll() is None


class Intruder:
    """Another key asking the real signaling server for the host's offers, over and over."""

    def __init__(self, url: str, host_id: str) -> None:
        self.url, self.host_id = url, host_id
        self.key = Identity.generate()
        self.refused = 0
        self.delivered = 0
        self.failed: list[str] = []
        """Other errors (none expected: the server refuses, and keeps answering)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._poll()), daemon=True)

    async def attempt(self, client: SignalingClient, public_key: bytes, signer: str) -> None:
        """One wait for the host's offers with a proof the host did not make."""
        challenge = await client.host_challenge(self.host_id)
        signature = self.key.sign_bytes(wait_message(signer, challenge))
        await client.host_wait(self.host_id, public_key=public_key, challenge=challenge,
                               signature=signature, wait=5.0)  # fmt: skip

    async def _poll(self) -> None:
        async with SignalingClient(self.url) as client:
            while not self._stop.is_set():
                try:
                    await self.attempt(client, self.key.public_key, self.host_id)
                    self.delivered += 1
                except HostProofRefused:
                    self.refused += 1
                except SignalingError as exc:
                    self.failed.append(str(exc))
                await asyncio.sleep(0.05)

    def __enter__(self) -> Intruder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive()


async def _proofs_refused(url: str, host_id: str, host_key: bytes) -> list[str]:
    """Each way a third party might prove to be the host; the ones refused. Last, the
    third party proves its own key for its own ID: that one must work."""
    intruder = Intruder(url, host_id)
    own = intruder.key.id
    refused = []
    async with SignalingClient(url) as client:
        for name, public_key, signer in [
            ("its own key", intruder.key.public_key, host_id),
            ("the host's public key", host_key, host_id),
            ("a proof made for its own ID", intruder.key.public_key, own),
        ]:
            try:
                await intruder.attempt(client, public_key, signer)
            except HostProofRefused:
                refused.append(name)
        challenge = await client.host_challenge(own)
        offers, _ = await client.host_wait(
            own, public_key=intruder.key.public_key, challenge=challenge,
            signature=intruder.key.sign_bytes(wait_message(own, challenge)), wait=0,
        )  # fmt: skip
        assert offers == []
    return refused


@pytest.mark.timeout(200)
def test_a_third_party_cannot_wait_for_the_hosts_offers(
    guarded: GuardedHost, signaling_url: str
) -> None:
    host_id = guarded.host_id
    key_dir = guarded.config.parent / "hostdata" / "identities"
    host_key = Identity.load(HOST_NAME, directory=key_dir).public_key
    refused = get_runtime().run(_proofs_refused(signaling_url, host_id, host_key), timeout=30)
    assert refused == ["its own key", "the host's public key", "a proof made for its own ID"]

    # While the third party keeps trying, a scientist's offer still reaches the host: through
    # the real server, and through the proxy's pass-through port (so the attacks above, not
    # the proxy itself, are what the other test's scientist ran into).
    through = [signaling_url, guarded.urls["none"]]
    with Intruder(signaling_url, host_id) as intruder:
        carol = guarded.children.scientist("join", through[0], host_id, "carol", through[1])
        joined = carol.finish()
        assert wait_for(lambda: intruder.refused >= 3, 10)
    assert [(j["url"], j.get("error"), j.get("hosted")) for j in joined] == [
        (url, None, 1) for url in through
    ], joined
    assert (intruder.delivered, intruder.failed) == (0, [])
    connected = [e["client_id"] for e in audit_events(guarded.config) if e["event"] == "connected"]
    assert {j["client_id"] for j in joined} <= set(connected)


# -- a host.toml with a mistake ------------------------------------------------------------


def test_a_bad_host_toml_stops_serve_with_one_line_naming_the_field(
    tmp_path: Path, children: Children
) -> None:
    good = write_config(tmp_path, "http://127.0.0.1:9").read_text()
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1000, 2), dtype=np.int64))
    (tmp_path / "short.npy").write_bytes(buffer.getvalue()[:200])  # its header claims more
    mistakes = [  # (what, the field named, the file)
        ("a missing file", "datasets[0].path", good.replace('"ages.npy"', '"missing.npy"')),
        ("out of range", "host.max_scientists",
         good.replace("[limits]", "max_scientists = 0\n\n[limits]")),
        ("a lying npy header", "datasets[0].path", good.replace('"ages.npy"', '"short.npy"')),
    ]  # fmt: skip
    runs = []
    for index, (what, field, text) in enumerate(mistakes):
        bad = tmp_path / f"bad{index}.toml"
        bad.write_text(text)
        argv = [*DUET_HOST, "serve", "--config", str(bad)]
        runs.append((what, field, children.start(argv, "bad", tmp_path / "bad_home")))
    for what, field, run in runs:
        try:
            code = run.proc.wait(SCIENTIST_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve with {what} did not exit\n{run.stderr()[-2000:]}")
        err = run.stderr()
        assert code == 1, (what, err)
        assert "Host ID" not in run.stdout()
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (what, err)
        assert err.startswith("duet-host: error: ") and f": {field}: " in err, (what, err)
