"""The host's control socket: commands round trip, and hostile or broken clients are refused."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from duet_p2p.errors import ConfigurationError, DuetError, PermissionDenied
from duet_p2p.host import control
from duet_p2p.host.control import MAX_REQUEST_BYTES, ControlServer, request, socket_path

RID = "0123456789abcdef0123456789abcdef"
CID = "fedcba9876543210fedcba9876543210"
JOB = "00112233445566778899aabbccddeeff"
WAIT = 10.0


class FakeHost:
    """A HostControl that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.release = threading.Event()
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()
        self.fail: BaseException | None = None

    def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, args))
        if self.fail is not None:
            raise self.fail

    def control_status(self) -> dict[str, Any]:
        self._call("status")
        return {"name": "lab", "sessions": 2}

    def control_requests(self, all: bool) -> list[dict[str, Any]]:
        self._call("requests", all)
        return [{"request_id": RID, "name": "mean", "status": "pending", "reason": "why"}]

    def control_accept(self, request_id: str) -> dict[str, Any]:
        self._call("accept", request_id)
        return {"request_id": request_id, "status": "accepted"}

    def control_deny(self, request_id: str, reason: str) -> dict[str, Any]:
        self._call("deny", request_id, reason)
        return {"request_id": request_id, "status": "denied"}

    def control_admissions(self) -> list[dict[str, Any]]:
        self._call("admissions")
        return [{"client_id": CID, "status": "pending", "requested_at": 1.0, "note": ""}]

    def control_admit(self, client_id: str) -> dict[str, Any]:
        self._call("admit", client_id)
        return {"client_id": client_id, "status": "admitted"}

    def control_refuse(self, client_id: str, reason: str) -> dict[str, Any]:
        self._call("refuse", client_id, reason)
        return {"client_id": client_id, "status": "refused"}

    def control_audit(self, last: int) -> list[dict[str, Any]]:
        self._call("audit", last)
        if last == 7:  # a slow command: holds a worker until released
            with self._lock:
                self.running += 1
                self.most_running = max(self.most_running, self.running)
            try:
                self.release.wait(WAIT)
            finally:
                with self._lock:
                    self.running -= 1
        return [{"ts": "2026-01-01T00:00:00.000Z", "event": "connect"}] * min(last, 3)

    def control_jobs(self, all: bool) -> list[dict[str, Any]]:
        self._call("jobs", all)
        return [{"job_id": JOB, "state": "pending_review"}]

    def control_job(self, job_id: str) -> dict[str, Any]:
        self._call("job", job_id)
        return {"job": {"job_id": job_id}, "review": None, "outputs": [], "events": []}

    def control_approve(self, job_id: str) -> dict[str, Any]:
        self._call("approve", job_id)
        return {"job_id": job_id, "state": "queued"}

    def control_reject(self, job_id: str, reason: str) -> dict[str, Any]:
        self._call("reject", job_id, reason)
        return {"job_id": job_id, "state": "rejected"}

    def control_release(self, job_id: str) -> dict[str, Any]:
        self._call("release", job_id)
        return {"job_id": job_id, "state": "released"}

    def control_withhold(self, job_id: str, reason: str) -> dict[str, Any]:
        self._call("withhold", job_id, reason)
        return {"job_id": job_id, "state": "withheld"}

    def control_cancel(self, job_id: str) -> dict[str, Any]:
        self._call("cancel", job_id)
        return {"job_id": job_id, "state": "cancelled"}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (AF_UNIX paths are limited to 108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="dh", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def served(short_dir: Path) -> AsyncIterator[tuple[ControlServer, FakeHost]]:
    host = FakeHost()
    server = ControlServer(short_dir / "host" / "control.sock", host)
    await asyncio.wait_for(server.start(), WAIT)
    yield server, host
    host.release.set()
    await asyncio.wait_for(server.close(), WAIT)


async def ask(path: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(request, path, command, args, 5.0), WAIT)


async def raw(path: Path, data: bytes, *, close_write: bool = False) -> dict[str, Any]:
    """Send raw bytes; the server's one response line, parsed."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), WAIT)
    try:
        writer.write(data)
        await writer.drain()
        if close_write:
            writer.write_eof()
        line = await asyncio.wait_for(reader.readline(), WAIT)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # then it closes
    finally:
        writer.close()
    return json.loads(line)


# --- round trips ------------------------------------------------------------------------


async def test_every_command_round_trips(served: tuple[ControlServer, FakeHost]) -> None:
    server, host = served
    path = server.path
    assert await ask(path, "status") == {"name": "lab", "sessions": 2}
    assert (await ask(path, "requests"))[0]["request_id"] == RID
    await ask(path, "requests", {"all": True})
    assert await ask(path, "accept", {"request_id": f"<UID:{RID.upper()}>"}) == {
        "request_id": RID,
        "status": "accepted",
    }
    await ask(path, "deny", {"request_id": RID, "reason": "too fine"})
    await ask(path, "deny", {"request_id": RID})
    assert (await ask(path, "admissions"))[0]["client_id"] == CID
    assert (await ask(path, "admit", {"client_id": f" {CID} "}))["status"] == "admitted"
    await ask(path, "refuse", {"client_id": CID, "reason": "unknown"})
    assert len(await ask(path, "audit", {"last": 2})) == 2
    await ask(path, "audit")
    assert host.calls == [
        ("status", ()),
        ("requests", (False,)),
        ("requests", (True,)),
        ("accept", (RID,)),
        ("deny", (RID, "too fine")),
        ("deny", (RID, "")),
        ("admissions", ()),
        ("admit", (CID,)),
        ("refuse", (CID, "unknown")),
        ("audit", (2,)),
        ("audit", (control.DEFAULT_AUDIT_LAST,)),
    ]


async def test_job_commands_round_trip(served: tuple[ControlServer, FakeHost]) -> None:
    server, host = served
    path = server.path
    assert (await ask(path, "jobs"))[0]["job_id"] == JOB
    await ask(path, "jobs", {"all": True})
    assert (await ask(path, "job", {"job_id": f"<UID:{JOB.upper()}>"}))["job"]["job_id"] == JOB
    assert await ask(path, "approve", {"job_id": f" {JOB} "}) == {"job_id": JOB, "state": "queued"}
    await ask(path, "reject", {"job_id": JOB, "reason": "raw labels"})
    await ask(path, "release", {"job_id": JOB})
    await ask(path, "withhold", {"job_id": JOB, "reason": "too fine"})
    await ask(path, "cancel", {"job_id": JOB})
    assert host.calls == [
        ("jobs", (False,)), ("jobs", (True,)), ("job", (JOB,)), ("approve", (JOB,)),
        ("reject", (JOB, "raw labels")), ("release", (JOB,)), ("withhold", (JOB, "too fine")),
        ("cancel", (JOB,)),
    ]  # fmt: skip
    assert {"jobs", "job", "approve", "reject", "release", "withhold", "cancel"} <= (
        control.COMMANDS
    )


async def test_socket_is_private(served: tuple[ControlServer, FakeHost]) -> None:
    server, _ = served
    info = os.lstat(server.path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700


async def test_host_refusal_reaches_the_client(served: tuple[ControlServer, FakeHost]) -> None:
    server, host = served
    host.fail = PermissionDenied("request already decided")
    with pytest.raises(DuetError, match="request already decided"):
        await ask(server.path, "accept", {"request_id": RID})


async def test_unexpected_host_error_is_not_leaked(served: tuple[ControlServer, FakeHost]) -> None:
    server, host = served
    host.fail = RuntimeError("secret internals /etc/x")
    with pytest.raises(DuetError) as caught:
        await ask(server.path, "status")
    assert "secret" not in str(caught.value)
    assert "failed to run status" in str(caught.value)
    host.fail = None
    assert await ask(server.path, "status")  # still serving


async def test_answer_that_is_not_json_is_refused(served: tuple[ControlServer, FakeHost]) -> None:
    server, host = served
    host.control_status = lambda: {"x": object()}  # type: ignore[method-assign]
    with pytest.raises(DuetError, match="not plain JSON"):
        await ask(server.path, "status")
    host.control_status = lambda: {"x": float("nan")}  # type: ignore[method-assign]
    with pytest.raises(DuetError, match="not plain JSON"):
        await ask(server.path, "status")


async def test_error_text_is_made_printable(served: tuple[ControlServer, FakeHost]) -> None:
    server, host = served
    host.fail = PermissionDenied("no\x1b]0;pwned\x07 \x1b[2Jway\u202e")
    with pytest.raises(DuetError) as caught:
        await ask(server.path, "status")
    text = str(caught.value)
    assert text.startswith("no") and "way" in text
    assert not any(ch in text for ch in "\x1b\x07\u202e")


# --- hostile and broken requests --------------------------------------------------------


def line(command: str, **args: object) -> bytes:
    return json.dumps({"command": command, "args": args}).encode() + b"\n"


BAD_LINES = {
    "not json": b"hello\n",
    "not utf-8": b'{"command": "\xff"}\n',
    "a list": b'["status"]\n',
    "extra key": b'{"command": "status", "args": {}, "x": 1}\n',
    "unknown command": line("shutdown"),
    "command not text": b'{"command": 5}\n',
    "args not object": b'{"command": "status", "args": []}\n',
    "unknown argument": line("status", x=1),
    "missing id": line("accept"),
    "short id": line("accept", request_id="abc"),
    "id not hex": line("accept", request_id="g" * 32),
    "id a number": line("admit", client_id=12345),
    "id path": line("admit", client_id="../../etc/passwd"),
    "id with newline": line("admit", client_id=CID + "\n"),
    "long reason": line("deny", request_id=RID, reason="x" * 1001),
    "escape in reason": line("refuse", client_id=CID, reason="a\x1b[2Jb"),
    "reason not text": line("deny", request_id=RID, reason=1),
    "all not bool": line("requests", all=1),
    "last zero": line("audit", last=0),
    "last huge": line("audit", last=10001),
    "last bool": line("audit", last=True),
    "last float": line("audit", last=2.0),
    "NaN": b'{"command": "audit", "args": {"last": NaN}}\n',
    "job without id": line("job"),
    "job id short": line("job", job_id=JOB[:-1]),
    "job id not hex": line("approve", job_id="z" * 32),
    "job id a list": line("release", job_id=[JOB]),
    "job id path": line("release", job_id="../" + JOB),
    "reject without reason": line("reject", job_id=JOB),
    "reject with blank reason": line("reject", job_id=JOB, reason=" \t"),
    "withhold escape in reason": line("withhold", job_id=JOB, reason="a\x1b]0;x\x07b"),
    "withhold long reason": line("withhold", job_id=JOB, reason="x" * 1001),
    "approve with reason": line("approve", job_id=JOB, reason="x"),
    "jobs all not bool": line("jobs", all="true"),
    "Cancel is not a command": line("Cancel", job_id=JOB),
    "deep nesting": b'{"command": "status", "args": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
}


@pytest.mark.parametrize("data", list(BAD_LINES.values()), ids=list(BAD_LINES))
async def test_bad_request_is_refused_and_server_keeps_serving(
    served: tuple[ControlServer, FakeHost], data: bytes
) -> None:
    server, host = served
    answer = await raw(server.path, data)
    assert answer["ok"] is False and isinstance(answer["error"], str) and answer["error"]
    assert host.calls == []  # the host never saw it
    assert await ask(server.path, "status")


async def test_oversize_request_is_refused(served: tuple[ControlServer, FakeHost]) -> None:
    server, host = served
    answer = await raw(
        server.path, b'{"command": "status", "x": "' + b"a" * (MAX_REQUEST_BYTES + 10)
    )
    assert answer == {"ok": False, "error": f"the request is larger than {MAX_REQUEST_BYTES} bytes"}
    assert host.calls == []
    assert await ask(server.path, "status")


async def test_line_without_newline_is_refused(served: tuple[ControlServer, FakeHost]) -> None:
    server, host = served
    answer = await raw(server.path, b'{"command": "status"}', close_write=True)
    assert answer["ok"] is False and "ended early" in answer["error"]
    assert host.calls == []


async def test_slow_client_is_cut_off(
    served: tuple[ControlServer, FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, host = served
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.3)
    started = time.monotonic()
    answer = await raw(server.path, b'{"command": "sta')  # never finishes the line
    assert time.monotonic() - started < 3.0
    assert answer["ok"] is False and "no request line" in answer["error"]
    assert host.calls == []
    assert await ask(server.path, "status")


async def test_other_users_are_refused(
    served: tuple[ControlServer, FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, host = served
    monkeypatch.setattr(
        control, "_peer_credentials", lambda sock: (1, os.getuid() + 1, os.getgid())
    )
    answer = await raw(server.path, b'{"command": "status"}\n')
    assert answer["ok"] is False and "own user only" in answer["error"]
    assert host.calls == []


async def test_client_refuses_a_socket_served_by_another_user(
    served: tuple[ControlServer, FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, host = served
    monkeypatch.setattr(
        control, "_peer_credentials", lambda sock: (1, os.getuid() + 1, os.getgid())
    )
    with pytest.raises(DuetError, match="another user"):
        await ask(server.path, "accept", {"request_id": RID})
    assert host.calls == []


async def test_at_most_eight_commands_run_at_once(served: tuple[ControlServer, FakeHost]) -> None:
    server, host = served
    results: list[Any] = []

    def client() -> None:  # its own thread: the clients must not share the server's pool
        results.append(request(server.path, "audit", {"last": 7}, timeout=WAIT))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(12)]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + WAIT
    while len(host.calls) < control.MAX_CONCURRENT_COMMANDS and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # had more been let through, they would be running by now
    assert host.running == control.MAX_CONCURRENT_COMMANDS
    assert len(host.calls) == control.MAX_CONCURRENT_COMMANDS
    host.release.set()
    for thread in clients:
        await asyncio.to_thread(thread.join, WAIT)
    assert len(results) == 12 and len(host.calls) == 12
    assert host.most_running == control.MAX_CONCURRENT_COMMANDS


# --- the socket file --------------------------------------------------------------------


async def test_second_server_on_a_live_path_is_refused(
    served: tuple[ControlServer, FakeHost],
) -> None:
    server, _ = served
    other = ControlServer(server.path, FakeHost())
    with pytest.raises(ConfigurationError, match="another host is serving"):
        await asyncio.wait_for(other.start(), WAIT)
    assert await ask(server.path, "status")  # the first one is untouched


async def test_stale_socket_is_replaced(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens
    os.chmod(path, 0o666)
    server = ControlServer(path, FakeHost())
    await asyncio.wait_for(server.start(), WAIT)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert await ask(path, "status")
    finally:
        await asyncio.wait_for(server.close(), WAIT)


async def test_a_file_that_is_not_a_socket_is_left_alone(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    path.write_text("keep me")
    with pytest.raises(ConfigurationError, match="not a socket"):
        await asyncio.wait_for(ControlServer(path, FakeHost()).start(), WAIT)
    assert path.read_text() == "keep me"


async def test_a_directory_others_may_write_is_refused(short_dir: Path) -> None:
    folder = short_dir / "open"
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(ConfigurationError, match="written by other users"):
        await asyncio.wait_for(ControlServer(folder / "c.sock", FakeHost()).start(), WAIT)
    assert not (folder / "c.sock").exists()


async def test_close_finishes_commands_in_flight_then_removes_the_file(
    served: tuple[ControlServer, FakeHost],
) -> None:
    server, host = served
    slow = asyncio.create_task(ask(server.path, "audit", {"last": 7}))
    deadline = time.monotonic() + WAIT
    while host.running == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert host.running == 1
    closing = asyncio.create_task(server.close())
    await asyncio.sleep(0.1)
    assert not closing.done()
    host.release.set()
    assert len(await asyncio.wait_for(slow, WAIT)) == 3
    await asyncio.wait_for(closing, WAIT)
    assert not server.path.exists()
    with pytest.raises(DuetError, match="no host is serving at .*duet-host serve"):
        await ask(server.path, "status")


async def test_close_leaves_a_newer_servers_socket(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    first = ControlServer(path, FakeHost())
    await asyncio.wait_for(first.start(), WAIT)
    os.unlink(path)  # someone removed it; a second host now serves there
    second = ControlServer(path, FakeHost())
    await asyncio.wait_for(second.start(), WAIT)
    try:
        await asyncio.wait_for(first.close(), WAIT)
        assert await ask(path, "status")
    finally:
        await asyncio.wait_for(second.close(), WAIT)
    assert not path.exists()


# --- the client against broken servers --------------------------------------------------


def one_shot_server(path: Path, reply: bytes) -> threading.Thread:
    """A plain listener that answers one connection with ``reply`` and closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(WAIT)

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(WAIT)
                conn.recv(1 << 16)
                conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"", "without answering"),
        (b"garbage\n", "malformed"),
        (b'{"ok": "yes", "result": 1}\n', "malformed"),
        (b'{"ok": true}\n', "malformed"),
        (b'{"ok": false, "error": 5}\n', "malformed"),
        (b'{"ok": true, "result": NaN}\n', "malformed"),
    ],
)
def test_client_refuses_malformed_answers(short_dir: Path, reply: bytes, message: str) -> None:
    path = short_dir / "fake.sock"
    thread = one_shot_server(path, reply)
    with pytest.raises(DuetError, match=message):
        request(path, "status", timeout=5.0)
    thread.join(WAIT)


def test_client_caps_the_answer(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "MAX_RESPONSE_BYTES", 1000)
    path = short_dir / "fake.sock"
    thread = one_shot_server(path, b'{"ok": true, "result": "' + b"a" * 5000 + b'"}\n')
    with pytest.raises(DuetError, match="larger than"):
        request(path, "status", timeout=5.0)
    thread.join(WAIT)


def test_client_times_out_on_a_silent_server(short_dir: Path) -> None:
    path = short_dir / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        started = time.monotonic()
        with pytest.raises(DuetError, match="did not answer within"):
            request(path, "status", timeout=0.3)
        assert time.monotonic() - started < 3.0
    finally:
        listener.close()


def test_no_host_serving_is_a_clear_error(short_dir: Path) -> None:
    with pytest.raises(DuetError, match=r"no host is serving at .*duet-host serve --config"):
        request(short_dir / "nothing.sock", "status", timeout=5.0)


# --- where the socket lives -------------------------------------------------------------


def test_socket_path_in_the_host_directory(short_dir: Path) -> None:
    assert socket_path(short_dir / "hosts" / "lab") == short_dir / "hosts" / "lab" / "control.sock"


def test_long_host_directory_gets_a_short_private_path(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "_SHORT_BASE", short_dir)
    deep = short_dir / ("d" * 60) / ("e" * 60)
    path = socket_path(deep)
    assert len(os.fsencode(path)) <= control.MAX_SOCKET_PATH_BYTES
    assert path.parent == short_dir / f"duet-{os.getuid()}"
    assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
    assert socket_path(deep) == path  # the CLI finds what serve bound
    assert socket_path(deep / "x") != path


def test_short_directory_open_to_others_is_refused(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "_SHORT_BASE", short_dir)
    folder = short_dir / f"duet-{os.getuid()}"
    folder.mkdir()
    os.chmod(folder, 0o755)
    with pytest.raises(ConfigurationError, match="no one else can open"):
        socket_path(short_dir / ("d" * 120))


def test_short_directory_that_is_a_symlink_is_refused(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "_SHORT_BASE", short_dir)
    target = short_dir / "elsewhere"
    target.mkdir(mode=0o700)
    (short_dir / f"duet-{os.getuid()}").symlink_to(target)
    with pytest.raises(ConfigurationError, match="no one else can open"):
        socket_path(short_dir / ("d" * 120))
