"""A standing host end to end: real processes, a real signaling server, WebRTC on loopback.

Three hosts run as ``duet-host serve --config host.toml`` processes (admit "ask", a list,
"any"), each hosting the same small dataset with a handler that accepts sums. Three
scientist processes (tests/peers/host_scientist.py) are driven command by command: Alice
and Bob stay connected to the "ask" host together; the third tries the admission rules
under several identities. The processes start once for the module (each imports torch).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from duet_p2p.host.control import request as control_request
from duet_p2p.host.control import socket_path
from duet_p2p.identity import Identity

ROOT = Path(__file__).resolve().parents[2]
SCIENTIST = ROOT / "tests" / "peers" / "host_scientist.py"
DUET_HOST = Path(sys.executable).parent / "duet-host"
START = 90.0
"""Seconds for a process to come up (torch imports compete for two cores)."""
WAIT = 30.0
"""Seconds for one step: a join, a computation, an admin command."""
DATA = np.arange(12, dtype=np.float32).reshape(4, 3)
TOTAL = float(DATA.sum())
_HOST_ID = re.compile(r"Host ID: ([0-9a-f]{32})")


# -- processes -------------------------------------------------------------------------


class Process:
    """A child process whose stdout lines are read by a thread into a queue."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._stderr = open(log, "w")  # noqa: SIM115 - closed in finish_stop()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=env, cwd=str(ROOT), start_new_session=True,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, deadline: float) -> str:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"{self.name}: no output in time\n{self.tail()}") from None
        if line is None:
            self.lines.put(None)
            raise AssertionError(f"{self.name} exited ({self.proc.poll()})\n{self.tail()}")
        return line

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def begin_stop(self) -> None:
        """Ask the process to stop (SIGTERM); ``finish_stop`` waits for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def finish_stop(self, deadline: float) -> None:
        """Wait until ``deadline`` for the process to end, then SIGKILL the process group
        it leads (its own children: a host's workers)."""
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._stderr.close()


class Scientist(Process):
    """tests/peers/host_scientist.py: one JSON command in, one JSON result out."""

    def __init__(self, name: str, url: str, home: Path, log: Path) -> None:
        home.mkdir(mode=0o700, exist_ok=True)
        home.chmod(0o700)
        env = {**os.environ, "DUET_HOME": str(home), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        super().__init__(name, [sys.executable, str(SCIENTIST), url], env, log)
        self.home = home
        self._ids = iter(range(1, 10**9))
        self._results: dict[int, dict[str, Any]] = {}

    def ready(self, timeout: float = START) -> None:
        line = self.next_line(time.monotonic() + timeout)
        assert json.loads(line).get("event") == "ready", line

    def send(self, cmd: str, **args: Any) -> int:
        ident = next(self._ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": ident, "cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return ident

    def result(self, ident: int, timeout: float = WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while ident not in self._results:
            self._take(self.next_line(deadline))
        return self._results.pop(ident)

    def _take(self, line: str) -> None:
        try:
            answer = json.loads(line)
        except ValueError:
            return
        if isinstance(answer, dict) and "id" in answer:
            self._results[answer["id"]] = answer

    def done(self, ident: int) -> bool:
        """Whether the answer to ``ident`` has arrived (without waiting)."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return ident in self._results
            if line is None:
                self.lines.put(None)
                return ident in self._results
            self._take(line)

    def call(self, cmd: str, timeout: float = WAIT, **args: Any) -> dict[str, Any]:
        return self.result(self.send(cmd, **args), timeout)

    def ok(self, cmd: str, timeout: float = WAIT, **args: Any) -> dict[str, Any]:
        answer = self.call(cmd, timeout, **args)
        assert answer["ok"], f"{self.name} {cmd}: {answer}\n{self.tail()}"
        return answer

    def raw(self, session: str, message: dict[str, Any], reply: bool = True) -> Any:
        return self.ok("raw", session=session, message=message, reply=reply)["reply"]

    def begin_stop(self) -> None:
        """Ask the script to close its sessions and exit."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.close()
            except (OSError, ValueError):
                pass


class HostProcess(Process):
    """``duet-host serve --config host.toml``."""

    def __init__(self, name: str, url: str, admit: Any, base: Path, dataset: Path) -> None:
        base.mkdir(mode=0o700)
        self.data_dir = base / "data"
        self.config = base / "host.toml"
        self.config.write_text(
            "[host]\n"
            f"name = {json.dumps(name)}\n"
            f"signaling_url = {json.dumps(url)}\n"
            f"admit = {json.dumps(admit)}\n"
            f"data_dir = {json.dumps(str(self.data_dir))}\n"
            'host_addresses = ["127.0.0.1"]\n'
            "[limits]\n"
            "worker_threads = 1\n"
            "[[datasets]]\n"
            'name = "data"\n'
            f"path = {json.dumps(str(dataset))}\n"
            "[[handlers]]\n"
            'name = "sums"\n'
            'action = "accept"\n'
            'tags = ["data"]\n'
            'op = "sum"\n'
        )
        self.host_name = name
        env = {**os.environ, "DUET_HOME": str(base / "home"), "PYTHONUNBUFFERED": "1"}
        argv = [str(DUET_HOST), "serve", "--config", str(self.config)]
        super().__init__(f"host {name}", argv, env, base / "host.log")
        self.id = ""

    def ready(self, timeout: float = START) -> None:
        deadline = time.monotonic() + timeout
        while not self.id:
            found = _HOST_ID.search(self.next_line(deadline))
            self.id = found.group(1) if found else ""

    @property
    def socket(self) -> Path:
        return socket_path(self.data_dir / "hosts" / self.host_name)

    def control(self, command: str, **args: Any) -> Any:
        """A command through the control socket (what ``duet-host`` sends), in-process."""
        return control_request(self.socket, command, args, timeout=WAIT)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``duet-host ARGS --config host.toml`` as its own process."""
        return subprocess.run(
            [str(DUET_HOST), *args, "--config", str(self.config)], capture_output=True,
            text=True, timeout=60, cwd=str(ROOT), env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

    def pending_admissions(self) -> list[str]:
        return [r["client_id"] for r in self.control("admissions") if r["status"] == "pending"]

    def wait_connected(self, *client_ids: str) -> None:
        """Wait until exactly ``client_ids`` are connected (a session is listed once the
        host has finished starting it, a moment after the scientist's join returns)."""
        wanted = sorted(client_ids)
        wait_until(lambda: sorted(self.control("status")["connected"]) == wanted,
                   what=f"{self.name}: connected {wanted}")  # fmt: skip

    def audit_events(self, event: str, client_id: str) -> list[dict[str, Any]]:
        entries = self.control("audit", last=10_000)
        return [e for e in entries if e.get("event") == event and e.get("client_id") == client_id]


def wait_until(predicate: Any, timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class World:
    ask: HostProcess
    listed: HostProcess
    anyone: HostProcess
    alice: Scientist
    bob: Scientist
    carol: Scientist
    """The third scientist process: tries admissions under several identities."""
    ids: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(signaling_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Every process, started at once; Alice and Bob admitted and connected to the "ask"
    host. Every process is stopped afterwards (killed if it does not stop in time)."""
    base = tmp_path_factory.mktemp("host_e2e")
    dataset = base / "data.npy"
    np.save(dataset, DATA)
    # Dave's key is made here (0600, in the third scientist's data dir): the list names him
    dave = Identity.load("dave", directory=base / "carol" / "identities").id
    started: list[Process] = []
    try:
        for name, admit, folder in (("lab", "ask", "ask"), ("listlab", [dave], "listed"),
                                    ("openlab", "any", "any")):  # fmt: skip
            started.append(HostProcess(name, signaling_url, admit, base / folder, dataset))
        for name in ("alice", "bob", "carol"):
            started.append(Scientist(name, signaling_url, base / name, base / f"{name}.log"))
        for process in started:
            process.ready()  # type: ignore[attr-defined]
        world = World(*started)  # type: ignore[arg-type]
        world.ids["dave"] = dave
        for who in (world.alice, world.bob):
            world.ids[who.name] = who.ok("identity", name=who.name)["client_id"]
            world.ask.control("admit", client_id=world.ids[who.name])
        joins = [(who, who.send("join", session="main", host_id=world.ask.id, identity=who.name))
                 for who in (world.alice, world.bob)]  # fmt: skip
        for who, ident in joins:
            answer = who.result(ident)
            assert answer["ok"] and answer["client_id"] == world.ids[who.name], answer
        yield world
    finally:
        for process in started:
            process.begin_stop()
        deadline = time.monotonic() + 20
        for process in started:
            process.finish_stop(deadline)


def _same_without(ids: list[str], *values: Any) -> bool:
    """Whether ``values`` are equal once every ID in ``ids`` is replaced by one placeholder."""
    pattern = re.compile("|".join(re.escape(i) for i in ids))
    texts = [pattern.sub("<ID>", json.dumps(v, sort_keys=True)) for v in values]
    return all(text == texts[0] for text in texts)


# -- many scientists at once -----------------------------------------------------------


def test_two_scientists_connected_and_computing_at_once(world: World) -> None:
    world.ask.wait_connected(world.ids["alice"], world.ids["bob"])
    status = world.ask.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    connected = json.loads(status.stdout)["connected"]
    assert sorted(connected) == sorted([world.ids["alice"], world.ids["bob"]])

    # both ask at the same moment; each gets its own answer through the sum handler
    asks = [(who, factor, who.send("make", session="main", tag="data", name="scaled",
                                   factor=factor)) for who, factor in
            ((world.alice, 2), (world.bob, 3))]  # fmt: skip
    for who, _, ident in asks:
        assert who.result(ident)["ok"]
    sums = [(who, factor, who.send("sum_of", name="scaled")) for who, factor, _ in asks]
    plain = [(who, who.send("sum", session="main", tag="data")) for who in (world.alice, world.bob)]
    for who, factor, ident in sums:
        answer = who.result(ident)
        assert answer["ok"] and answer["value"] == factor * TOTAL, answer
    for who, ident in plain:
        answer = who.result(ident)
        assert answer["ok"] and answer["value"] == TOTAL, answer
    status = world.ask.control("status")
    assert sorted(status["connected"]) == sorted([world.ids["alice"], world.ids["bob"]])
    assert status["pending_requests"] == 0 and status["pending_admissions"] == 0


# -- isolation -------------------------------------------------------------------------


def test_a_scientist_cannot_reach_another_scientists_objects_or_requests(world: World) -> None:
    alice, bob = world.alice, world.bob
    x = alice.ok("make", session="main", tag="data", name="x", factor=2)["object_id"]
    u = alice.ok("upload", session="main", name="u", values=[1.0, 2.0, 3.0])["object_id"]
    rid = alice.ok("request", name="x")["request_id"]
    assert alice.ok("status", request_id=rid)["status"] == "pending"
    (data_id,) = [e["id"] for e in bob.ok("listing", session="main")["entries"]]
    other, other_rid = uuid.uuid4().hex, uuid.uuid4().hex  # IDs nobody made
    notices = bob.ok("notices")["count"]

    def get(object_id: str) -> Any:
        return bob.raw("main", {"kind": "get", "object_id": object_id, "reason": "mine now"})

    # a get, a describe: the same answer as for an ID that never existed
    for target in (x, u):
        theirs, nobodys = get(target), get(other)
        assert theirs["ok"] is False and theirs["error"]["code"] == "not_found", theirs
        assert _same_without([target, other], theirs, nobodys)
        described = bob.raw("main", {"kind": "describe", "object_id": target})
        assert described == bob.raw("main", {"kind": "describe", "object_id": other})
        assert described["value"] == {"exists": False}

    # ops reading Alice's objects: refused as for an unknown object, nothing computed
    r1, r2, r3, r4 = (uuid.uuid4().hex for _ in range(4))
    bob.raw("main", {"kind": "actions", "actions": [
        {"op": "torch.Tensor.sum", "result": r1, "target": {"$ref": x}},
        {"op": "torch.add", "result": r2, "args": [{"$ref": u}, {"$ref": data_id}]},
        {"op": "torch.Tensor.sum", "result": r3, "target": {"$ref": other}},
        {"op": "torch.add", "result": r4, "args": [{"$ref": other}, {"$ref": data_id}]},
    ]}, reply=False)  # fmt: skip
    for theirs, nobodys, named in ((r1, r3, x), (r2, r4, u)):
        read_theirs, read_nobodys = get(theirs), get(nobodys)
        assert read_theirs["ok"] is False and read_theirs["error"]["code"] == "not_found"
        assert _same_without([named, other, theirs, nobodys], read_theirs, read_nobodys)

    # Bob frees Alice's IDs, writes under them (into his own objects), frees them again,
    # and withdraws her request
    bob.raw("main", {"kind": "delete", "ids": [x, u, rid]}, reply=False)
    bob.raw("main", {"kind": "actions", "actions": [
        {"op": "torch.Tensor.mul", "result": x, "target": {"$ref": data_id}, "args": [0]},
    ]}, reply=False)  # fmt: skip
    bob.raw("main", {"kind": "upload", "result": u, "value": {"$tensor": [0.0, 0.0, 0.0]}},
            reply=False)  # fmt: skip
    for target in (x, u):
        described = bob.raw("main", {"kind": "describe", "object_id": target})
        assert described["value"]["exists"] is True, described
    bob.raw("main", {"kind": "delete", "ids": [x, u]}, reply=False)
    bob.raw("main", {"kind": "cancel_request", "request_id": rid}, reply=False)
    bob.raw("main", {"kind": "cancel_request", "request_id": other_rid}, reply=False)

    # her request is not his to fetch, and not in his list: as for one that never was
    fetched = bob.raw("main", {"kind": "fetch_release", "request_id": rid})
    never = bob.raw("main", {"kind": "fetch_release", "request_id": other_rid})
    assert fetched["ok"] is False and fetched["error"]["code"] == "not_found", fetched
    assert _same_without([rid, other_rid], fetched, never)
    listed = bob.raw("main", {"kind": "list_requests"})
    assert listed["ok"] and rid not in json.dumps(listed["value"])
    # a get on her request's ID as if an object: unknown too
    assert _same_without([rid, other], get(rid), get(other))
    # Bob is still served, and none of this was answered differently (no extra notices)
    assert bob.ok("sum", session="main", tag="data")["value"] == TOTAL
    assert bob.ok("notices")["count"] == notices
    bob.raw("main", {"kind": "no_such_kind"}, reply=False)  # the count does count
    wait_until(lambda: bob.ok("notices")["count"] == notices + 1, what="an error notice")

    # Alice's request is still pending, hers; her objects are intact
    (row,) = [r for r in world.ask.control("requests", all=False) if r["request_id"] == rid]
    assert row["status"] == "pending" and row["client_id"] == world.ids["alice"], row
    assert alice.ok("status", request_id=rid)["status"] == "pending"
    assert alice.ok("sum_of", name="x")["value"] == 2 * TOTAL
    assert alice.ok("sum_of", name="u")["value"] == 6.0
    accepted = world.ask.control("accept", request_id=rid)
    assert accepted["status"] == "accepted"
    assert alice.ok("result", request_id=rid)["value"] == (2 * DATA).tolist()


def test_a_value_accepted_while_away_waits_for_its_scientist_only(world: World) -> None:
    alice, bob, host = world.alice, world.bob, world.ask
    alice.ok("make", session="main", tag="data", name="y", factor=3)
    rid = alice.ok("request", name="y")["request_id"]
    alice.ok("close", session="main")
    host.wait_connected(world.ids["bob"])
    assert host.control("accept", request_id=rid)["status"] == "accepted"  # she is away

    # kept for her: Bob can neither fetch it nor tell it from a request that never was
    never = uuid.uuid4().hex
    fetched = bob.raw("main", {"kind": "fetch_release", "request_id": rid})
    assert fetched["ok"] is False and fetched["error"]["code"] == "not_found", fetched
    assert _same_without(
        [rid, never], fetched, bob.raw("main", {"kind": "fetch_release", "request_id": never})
    )
    assert rid not in json.dumps(bob.ok("my_requests", session="main")["requests"])

    alice.ok("join", session="main", host_id=host.id, identity="alice")
    mine = {r["request_id"]: r for r in alice.ok("my_requests", session="main")["requests"]}
    assert mine[rid]["status"] == "accepted" and mine[rid]["kept"] is True, mine[rid]
    assert alice.ok("fetch", session="main", request_id=rid)["value"] == (3 * DATA).tolist()
    host.wait_connected(world.ids["alice"], world.ids["bob"])


# -- admission -------------------------------------------------------------------------


def test_ask_waits_for_the_owner_then_admits_without_asking_and_refusal_is_denied(
    world: World,
) -> None:
    host, carol = world.ask, world.carol
    cid = carol.ok("identity", name="carol")["client_id"]
    joining = carol.send("join", session="c", host_id=host.id, identity="carol")
    wait_until(lambda: cid in host.pending_admissions(), what="carol's pending admission")
    time.sleep(0.5)
    assert not carol.done(joining), "admitted before the owner decided"
    admitted = host.cli("admit", cid)
    assert admitted.returncode == 0, admitted.stderr
    answer = carol.result(joining)
    assert answer["ok"] and answer["client_id"] == cid, answer
    host.wait_connected(cid, world.ids["alice"], world.ids["bob"])
    carol.ok("close", session="c")

    # the same client again: admitted without asking
    answer = carol.ok("join", session="c", host_id=host.id, identity="carol")
    assert answer["client_id"] == cid
    assert len(host.audit_events("admission_requested", cid)) == 1
    assert cid not in host.pending_admissions()
    assert carol.ok("sum", session="c", tag="data")["value"] == TOTAL
    carol.ok("close", session="c")

    # a client the owner refuses while it waits: PermissionDenied, now and next time
    mid = carol.ok("identity", name="mallory")["client_id"]
    joining = carol.send("join", session="m", host_id=host.id, identity="mallory")
    wait_until(lambda: mid in host.pending_admissions(), what="mallory's pending admission")
    host.control("refuse", client_id=mid, reason="unknown to us")
    answer = carol.result(joining)
    assert not answer["ok"] and answer["error"] == "PermissionDenied", answer
    assert mid in answer["message"]
    again = carol.call("join", session="m", host_id=host.id, identity="mallory")
    assert not again["ok"] and again["error"] == "PermissionDenied", again
    assert again["seconds"] < 15  # turned away at once, not after the owner's wait
    assert mid not in host.pending_admissions()
    assert mid not in host.control("status")["connected"]


def test_admit_list_lets_in_the_listed_and_refuses_the_rest(world: World) -> None:
    host, carol = world.listed, world.carol
    answer = carol.ok("join", session="d", host_id=host.id, identity="dave")
    assert answer["client_id"] == world.ids["dave"]
    assert carol.ok("sum", session="d", tag="data")["value"] == TOTAL
    refused = carol.call("join", session="e", host_id=host.id, identity="erin")
    assert not refused["ok"] and refused["error"] == "PermissionDenied", refused
    assert host.pending_admissions() == []
    host.wait_connected(world.ids["dave"])
    carol.ok("close", session="d")


def test_admit_any_lets_in_everyone(world: World) -> None:
    host, carol = world.anyone, world.carol
    erin = carol.ok("identity", name="erin")["client_id"]
    assert carol.ok("join", session="e", host_id=host.id, identity="erin")["client_id"] == erin
    assert carol.ok("sum", session="e", tag="data")["value"] == TOTAL
    assert host.pending_admissions() == []
    host.wait_connected(erin)
    carol.ok("close", session="e")


# -- identities ------------------------------------------------------------------------


def test_identity_files_are_private_and_the_client_id_is_stable(world: World) -> None:
    alice, host = world.alice, world.ask
    mine = alice.ok("identity", name="alice")
    assert mine["file_mode"] == 0o600 and mine["dir_mode"] == 0o700, mine
    assert Path(mine["path"]) == alice.home / "identities" / "alice.key"
    key = host.data_dir / "identities" / "lab.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert Identity.load("lab", directory=key.parent).id == host.id  # the key it stands for

    alice.ok("close", session="main")
    host.wait_connected(world.ids["bob"])  # her session has ended
    again = alice.ok("join", session="main", host_id=host.id, identity="alice")
    assert again["client_id"] == world.ids["alice"] == mine["client_id"]
    assert again["duet_id"] == host.id
    host.wait_connected(world.ids["alice"], world.ids["bob"])
    assert alice.ok("sum", session="main", tag="data")["value"] == TOTAL
