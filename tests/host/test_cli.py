"""The ``duet-host`` command: administering a running host, help, init, and its errors."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from duet_p2p.errors import PermissionDenied
from duet_p2p.host.cli import TEMPLATE, main
from duet_p2p.host.control import ControlServer, socket_path
from duet_p2p.identity import Identity

RID = "0123456789abcdef0123456789abcdef"
CID = "fedcba9876543210fedcba9876543210"
EVIL = "ok\x1b]0;owned\x07\x1b[2J\x1b[31mred\u202eevil\r\nnext"
WAIT = 10.0
T = TypeVar("T")
SUBCOMMANDS = [
    "init", "serve", "id", "status", "requests", "accept", "deny",
    "admissions", "admit", "refuse", "audit", "jobs", "job", "approve", "reject", "release",
    "withhold",
]  # fmt: skip
JOB = "00112233445566778899aabbccddeeff"
REPO = Path(__file__).resolve().parents[2]


class FakeHost:
    """A HostControl whose scientists chose hostile text."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.refuse_with: str | None = None

    def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, args))
        if self.refuse_with is not None:
            raise PermissionDenied(self.refuse_with)

    def control_status(self) -> dict[str, Any]:
        self._call("status")
        return {"host_id": RID, "sessions": 2, "datasets": ["ages"], "motd": EVIL}

    def control_requests(self, all: bool) -> list[dict[str, Any]]:
        self._call("requests", all)
        row = {
            "request_id": RID,
            "name": "mean " + EVIL,
            "client_id": CID,
            "reason": EVIL,
            "status": "pending",
            "size_bytes": 1_200_000,
            "requested_at": 1_700_000_000.0,
            "decided_at": None,
            "decided_by": None,
            "lineage": "ages.mean()",
            "checks": ["small group " + EVIL],
            "dp": "",
        }
        return [row]

    def control_accept(self, request_id: str) -> dict[str, Any]:
        self._call("accept", request_id)
        return {"request_id": request_id, "status": "accepted"}

    def control_deny(self, request_id: str, reason: str) -> dict[str, Any]:
        self._call("deny", request_id, reason)
        return {"request_id": request_id, "status": "denied"}

    def control_admissions(self) -> list[dict[str, Any]]:
        self._call("admissions")
        return [{"client_id": CID, "status": "pending", "requested_at": 1e9, "note": EVIL}]

    def control_admit(self, client_id: str) -> dict[str, Any]:
        self._call("admit", client_id)
        return {"client_id": client_id, "status": "admitted"}

    def control_refuse(self, client_id: str, reason: str) -> dict[str, Any]:
        self._call("refuse", client_id, reason)
        return {"client_id": client_id, "status": "refused"}

    def control_audit(self, last: int) -> list[dict[str, Any]]:
        self._call("audit", last)
        entry = {"ts": "2026-01-01T00:00:00.000Z", "event": "decision", "reason": EVIL}
        return [entry] * min(last, 2)

    job_answer: Any = None

    def control_jobs(self, all: bool) -> list[dict[str, Any]]:
        self._call("jobs", all)
        return [JOB_ROW]

    def control_job(self, job_id: str) -> Any:
        self._call("job", job_id)
        if self.job_answer is not None:
            return self.job_answer
        return {"job": JOB_ROW, "review": REVIEW, "review_error": None,
                "outputs": [OUTPUT, {**OUTPUT, "name": "loss", "status": "not computed",
                                     "size_bytes": None, "error": "ran out " + EVIL}],
                "events": [EVENT, {**EVENT, "old": "submitted", "new": "pending_review"}]}  # fmt: skip

    def _job_decision(self, name: str, job_id: str, *reason: str) -> dict[str, Any]:
        self._call(name, job_id, *reason)
        state = {"approve": "queued", "reject": "rejected", "release": "pending_output_review",
                 "withhold": "withheld"}[name]  # fmt: skip
        if name == "reject":  # an older host: no decision in its answer
            return {"job_id": job_id, "state": state}
        decided = {"approve": "approved", "release": "released", "withhold": "withheld"}
        return {"job_id": job_id, "decision": decided[name], "state": state}

    def control_approve(self, job_id: str) -> dict[str, Any]:
        return self._job_decision("approve", job_id)

    def control_reject(self, job_id: str, reason: str) -> dict[str, Any]:
        return self._job_decision("reject", job_id, reason)

    def control_release(self, job_id: str) -> dict[str, Any]:
        return self._job_decision("release", job_id)

    def control_withhold(self, job_id: str, reason: str) -> dict[str, Any]:
        return self._job_decision("withhold", job_id, reason)


JOB_ROW = {
    "job_id": JOB, "client_id": CID, "state": "pending_review", "plan": "stats" + EVIL,
    "steps": 2, "submitted_at": 1_700_000_000.0, "updated_at": 1_700_000_000.0,
    "deadline": 1_700_003_600.0, "started_at": None, "finished_at": None, "progress": [0, 0],
    "last_by": "policy", "reason": "no rule matches " + EVIL, "receipt": False,
}  # fmt: skip
REVIEW = {
    "job_id": JOB, "client_id": CID, "host_id": RID, "job_hash": "ab" * 32,
    "plan_hash": "cd" * 32, "plan": "stats", "steps": 2, "reason": "for the paper " + EVIL,
    "inputs": [{"name": "x", "tag": "ages " + EVIL, "hosted": True},
               {"name": "y", "tag": "labels", "hosted": False}],
    "outputs": [{"name": "accuracy", "source": "r1", "lineage": "ages.mean()", "ops": []}],
    "ops": ["torch.Tensor.mean"], "max_seconds": 60.0, "max_result_elements": 100,
    "max_result_bytes": 10000, "created_at": 1_700_000_000.0, "deadline": 1_700_003_600.0,
    "problems": ["input y is bound to 'labels', which this host does not hold " + EVIL],
    "ok": False,
}  # fmt: skip
OUTPUT = {
    "name": "accuracy", "request_id": RID, "status": "pending", "lineage": "ages.mean()",
    "elements": 1, "size_bytes": 1_200_000, "aggregation": 40.0,
    "aggregation_text": ">= 40 records", "checks": ["small group " + EVIL], "error": None,
}  # fmt: skip
EVENT = {"at": 1_700_000_000.0, "old": None, "new": "submitted", "by": CID,
         "reason": "submitted " + EVIL}  # fmt: skip


class Background:
    """An event loop on its own thread, so tests call the blocking CLI directly."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        self.loop.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="dh", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def host(short_dir: Path) -> Iterator[tuple[Path, FakeHost]]:
    """(socket path, fake host) of a control server serving on a background loop."""
    fake = FakeHost()
    background = Background()
    server = ControlServer(short_dir / "host" / "control.sock", fake)
    background.run(server.start())
    try:
        yield server.path, fake
    finally:
        background.run(server.close())
        background.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_printable(text: str) -> None:
    for bad in ("\x1b", "\x07", "\u202e", "\r"):
        assert bad not in text


# --- commands to a running host ---------------------------------------------------------


def test_status(host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str]) -> None:
    path, fake = host
    code, out, err = run(capsys, "status", "--socket", str(path))
    assert code == 0 and err == ""
    assert f"host_id:  {RID}" in out and "sessions: 2" in out and "datasets: ages" in out
    assert_printable(out)
    assert fake.calls == [("status", ())]


def test_requests_table(host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str]) -> None:
    path, fake = host
    code, out, _ = run(capsys, "requests", "--socket", str(path))
    assert code == 0
    assert f"<UID:{RID}>" in out and CID in out and "1.2 MB" in out and "pending" in out
    assert "Request ID" in out and "Reason" in out and "Decided" not in out
    assert "redevil" in out  # the words stay, the escape sequences go
    assert_printable(out)
    code, out, _ = run(capsys, "requests", "--all", "--socket", str(path))
    assert code == 0 and "Decided" in out
    assert fake.calls == [("requests", (False,)), ("requests", (True,))]


def test_requests_json(host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = host
    code, out, _ = run(capsys, "requests", "--json", "--socket", str(path))
    assert code == 0
    rows = json.loads(out)
    assert rows[0]["request_id"] == RID and rows[0]["reason"] == EVIL  # exact, escaped as JSON
    assert_printable(out)


def test_decisions(host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str]) -> None:
    path, fake = host
    sock = ("--socket", str(path))
    assert run(capsys, "accept", f"<UID:{RID}>", *sock)[:2] == (
        0,
        f"Request <UID:{RID}>: accepted\n",
    )
    assert run(capsys, "deny", RID, "--reason", "too fine", *sock)[1] == (
        f"Request <UID:{RID}>: denied\n"
    )
    assert run(capsys, "admit", CID, *sock)[1] == f"Client {CID}: admitted\n"
    assert run(capsys, "refuse", CID, *sock)[1] == f"Client {CID}: refused\n"
    code, out, _ = run(capsys, "admit", CID, "--json", *sock)
    assert code == 0 and json.loads(out) == {"client_id": CID, "status": "admitted"}
    assert fake.calls == [
        ("accept", (RID,)),
        ("deny", (RID, "too fine")),
        ("admit", (CID,)),
        ("refuse", (CID, "")),
        ("admit", (CID,)),
    ]


def test_admissions_and_audit(
    host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str]
) -> None:
    path, fake = host
    code, out, _ = run(capsys, "admissions", "--socket", str(path))
    assert code == 0 and CID in out and "pending" in out and "Note" in out
    assert_printable(out)
    code, out, _ = run(capsys, "audit", "--last", "5", "--socket", str(path))
    assert code == 0 and "decision" in out and "2026-01-01T00:00:00.000Z" in out
    assert_printable(out)
    assert fake.calls == [("admissions", ()), ("audit", (5,))]


def test_host_refusal_is_a_clean_error(
    host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str]
) -> None:
    path, fake = host
    fake.refuse_with = "already decided " + EVIL
    code, out, err = run(capsys, "accept", RID, "--socket", str(path))
    assert code == 1 and out == ""
    assert err.startswith("duet-host: error: already decided ok")
    assert "Traceback" not in err
    assert_printable(err)


@pytest.mark.parametrize(
    "argv",
    [
        ["accept", "not-an-id"],
        ["deny", RID, "--reason", "x" * 1001],
        ["deny", RID, "--reason", "line\x1b[2Jbreak"],
        ["refuse", "../" + CID],
    ],
)
def test_bad_arguments_are_refused_by_the_host(
    host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    path, fake = host
    code, _, err = run(capsys, *argv, "--socket", str(path))
    assert code == 1 and err.startswith("duet-host: error: ")
    assert fake.calls == []
    assert run(capsys, "status", "--socket", str(path))[0] == 0  # still serving


def test_audit_last_out_of_range(
    host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str]
) -> None:
    path, fake = host
    code, _, err = run(capsys, "audit", "--last", "0", "--socket", str(path))
    assert code == 1 and "--last" in err
    assert fake.calls == []


# --- jobs --------------------------------------------------------------------------------


def test_jobs_table(host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str]) -> None:
    path, fake = host
    code, out, err = run(capsys, "jobs", "--socket", str(path))
    assert code == 0 and err == ""
    for word in ("Job ID", "Client ID", "State", "Plan", "Submitted", "Reason", JOB, CID,
                 "pending_review", "(2 steps)", "no rule matches ok"):  # fmt: skip
        assert word in out
    assert_printable(out)
    assert run(capsys, "jobs", "--all", "--socket", str(path))[0] == 0
    code, out, _ = run(capsys, "jobs", "--json", "--socket", str(path))
    assert code == 0 and json.loads(out)[0]["reason"] == "no rule matches " + EVIL
    assert_printable(out)
    assert fake.calls == [("jobs", (False,)), ("jobs", (True,)), ("jobs", (False,))]


def test_job_shows_review_outputs_and_trail(
    host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str]
) -> None:
    path, fake = host
    code, out, err = run(capsys, "job", f"<UID:{JOB}>", "--socket", str(path))
    assert code == 0 and err == ""
    for word in (f"Job {JOB}", "Code review (cannot run)", "Plan hash", "cd" * 32,
                 "Problem", "which this host does not hold", "Input x", "(hosted)",
                 "Input y", "NOT HOSTED", "Output accuracy", "ages.mean()", "60 s",
                 "Outputs", "1.2 MB", ">= 40 records", "small group ok", "not computed (failed)",
                 "Trail", "submitted", "pending_review",
                 f"duet-host approve {JOB}", f"duet-host reject {JOB} --reason"):  # fmt: skip
        assert word in out, word
    assert_printable(out)
    assert fake.calls == [("job", (JOB,))]


@pytest.mark.parametrize(
    "answer", [[], {"job": "x"}, {"job": {}, "outputs": "x"}, {"job": {}, "events": [1]}]
)
def test_a_malformed_job_answer_is_refused(
    host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str], answer: Any
) -> None:
    path, fake = host
    fake.job_answer = answer
    code, _, err = run(capsys, "job", JOB, "--socket", str(path))
    assert code == 1 and "malformed" in err and "Traceback" not in err


def test_job_decisions(host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str]) -> None:
    path, fake = host
    sock = ("--socket", str(path))
    assert run(capsys, "approve", JOB.upper(), *sock)[:2] == (
        0,
        f"Job {JOB}: approved (now queued)\n",
    )
    assert run(capsys, "reject", JOB, "--reason", "raw labels", *sock)[1] == (
        f"Job {JOB}: rejected\n"
    )
    assert run(capsys, "release", JOB, *sock)[1] == (
        f"Job {JOB}: released (now pending_output_review)\n"
    )
    code, out, _ = run(capsys, "withhold", JOB, "--reason", "too fine", "--json", *sock)
    assert code == 0 and json.loads(out) == {
        "job_id": JOB, "decision": "withheld", "state": "withheld",
    }  # fmt: skip
    assert fake.calls == [
        ("approve", (JOB,)), ("reject", (JOB, "raw labels")), ("release", (JOB,)),
        ("withhold", (JOB, "too fine")),
    ]  # fmt: skip


@pytest.mark.parametrize("command", ["reject", "withhold"])
def test_rejecting_or_withholding_needs_a_reason(
    host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path, fake = host
    with pytest.raises(SystemExit) as exited:
        main([command, JOB, "--socket", str(path)])
    assert exited.value.code == 2 and "--reason" in capsys.readouterr().err
    assert fake.calls == []


@pytest.mark.parametrize(
    "argv",
    [
        ["job", "not-an-id"],
        ["approve", "../" + JOB],
        ["release", JOB + "0"],
        ["reject", JOB, "--reason", "  "],
        ["withhold", JOB, "--reason", "line\x1b[2Jbreak"],
        ["withhold", JOB, "--reason", "x" * 1001],
    ],
)
def test_bad_job_arguments_are_refused_by_the_host(
    host: tuple[Path, FakeHost], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    path, fake = host
    code, _, err = run(capsys, *argv, "--socket", str(path))
    assert code == 1 and err.startswith("duet-host: error: ")
    assert_printable(err)
    assert fake.calls == []


NO_TORCH = """\
import sys
from duet_p2p.host.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded[:5]
raise SystemExit(code)
"""


def test_job_commands_do_not_import_torch(host: tuple[Path, FakeHost], short_dir: Path) -> None:
    path, fake = host
    (short_dir / "hosts").mkdir()
    (short_dir / "hosts" / "lab").symlink_to(path.parent)
    config = short_dir / "host.toml"
    config.write_text(
        f'[host]\nname = "lab"\nsignaling_url = "http://127.0.0.1:8765"\n'
        f'data_dir = "{short_dir}"\n\n[jobs]\nconcurrency = 2\n'
        f'approve_clients = ["{CID}"]\n[[jobs.release]]\noutputs = ["accuracy"]\n'
    )  # fmt: skip
    for argv in (["jobs", "--help"], ["jobs", "--config", str(config)],
                 ["approve", JOB, "--config", str(config)]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", NO_TORCH, *argv], cwd=REPO, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert fake.calls == [("jobs", (False,)), ("approve", (JOB,))]


# --- no host, no config -----------------------------------------------------------------


def test_no_host_serving(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "status", "--socket", str(short_dir / "none.sock"))
    assert code == 1 and out == ""
    assert "no host is serving at" in err and "duet-host serve --config" in err
    assert "Traceback" not in err


def test_stale_socket_means_no_host(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = short_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    code, _, err = run(capsys, "requests", "--socket", str(path))
    assert code == 1 and "no host is serving at" in err


def test_missing_config_points_to_init(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = short_dir / "host.toml"
    code, _, err = run(capsys, "requests", "--config", str(missing))
    assert code == 1 and "no config file at" in err and "duet-host init" in err


def fake_config_module(
    monkeypatch: pytest.MonkeyPatch, host_dir: Path, data_dir: Path
) -> list[Path]:
    """Stand in for duet_p2p.host.config: load_config returns a config at ``host_dir``."""
    loaded: list[Path] = []

    def load_config(path: Path) -> Any:
        loaded.append(Path(path))
        settings = types.SimpleNamespace(name="lab", data_dir=data_dir, log_level="info")
        return types.SimpleNamespace(host_dir=host_dir, settings=settings)

    module = types.ModuleType("duet_p2p.host.config")
    module.load_config = load_config  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "duet_p2p.host.config", module)
    return loaded


def test_config_finds_the_socket(
    host: tuple[Path, FakeHost],
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, fake = host
    assert socket_path(path.parent) == path
    loaded = fake_config_module(monkeypatch, path.parent, short_dir)
    config = short_dir / "lab.toml"
    config.write_text("")
    monkeypatch.setenv("DUET_HOST_CONFIG", str(config))  # the default for --config
    code, out, _ = run(capsys, "admit", CID)
    assert code == 0 and "admitted" in out
    assert loaded == [config] and fake.calls == [("admit", (CID,))]


def test_id_prints_the_host_identity(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_config_module(monkeypatch, short_dir / "hosts" / "lab", short_dir)
    config = short_dir / "host.toml"
    config.write_text("")
    code, out, _ = run(capsys, "id", "--config", str(config))
    assert code == 0
    expected = Identity.load("lab", directory=short_dir / "identities").id
    assert out == expected + "\n"
    assert run(capsys, "id", "--config", str(config))[1] == out  # stable across runs


def test_serve_runs_the_host(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served: list[Path] = []

    def serve(config_path: Path) -> int:
        served.append(config_path)
        return 3

    module = types.ModuleType("duet_p2p.host.serve")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "duet_p2p.host.serve", module)
    assert main(["serve", "--config", str(short_dir / "h.toml")]) == 3
    assert served == [short_dir / "h.toml"]


# --- help and init ----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [[], *([name] for name in SUBCOMMANDS)], ids=repr)
def test_help_teaches_with_an_example(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "duet-host " in out


def test_main_help_describes_a_standing_host(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "standing host" in out
    for step in ("duet-host init", "duet-host serve", "duet-host requests", "duet-host accept"):
        assert step in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2


def test_init_writes_then_refuses_to_overwrite(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = short_dir / "host.toml"
    code, out, _ = run(capsys, "init", str(path))
    assert code == 0 and "duet-host serve --config" in out
    assert path.read_text() == TEMPLATE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    path.write_text("edited")
    code, _, err = run(capsys, "init", str(path))
    assert code == 1 and "exists" in err
    assert path.read_text() == "edited"


def test_init_defaults_to_the_config_path(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = short_dir / "other.toml"
    assert run(capsys, "init", "--config", str(path))[0] == 0
    assert path.read_text() == TEMPLATE


def test_init_template_is_a_valid_config(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = pytest.importorskip("duet_p2p.host.config")
    path = short_dir / "host.toml"
    assert run(capsys, "init", str(path))[0] == 0
    loaded = config.load_config(path)
    assert loaded.settings.name == "host"
