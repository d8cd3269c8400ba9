"""The worker's confinement, checked in a child process that installs it on itself."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CONFINED = """
import json, os, socket, sys, threading
import torch
from duet_p2p.owner import sandbox

sandbox.limit_resources()
results = {"state": sandbox.install_seccomp()}

def attempt(name, action):
    try:
        action()
        results[name] = "allowed"
    except OSError as exc:
        results[name] = exc.errno
    except ValueError:  # setrlimit reports EPERM this way
        results[name] = 1

def fork():
    if os.fork() == 0:
        os._exit(0)

attempt("socket", lambda: socket.socket())
attempt("create a file", lambda: open(sys.argv[1], "w"))
attempt("append to a file", lambda: open(sys.argv[2], "a"))
attempt("fork", fork)
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("change a limit", lambda: __import__("resource").setrlimit(
    __import__("resource").RLIMIT_NOFILE, (128, 256)))
attempt("read a file", lambda: open(sys.argv[2]).read())
torch.set_num_threads(2)
x = torch.rand(500, 500)
results["matmul"] = float((x @ x).sum()) > 0
thread = threading.Thread(target=lambda: None)
thread.start()
thread.join()
results["threads"] = True
print(json.dumps(results))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="seccomp is Linux's")
def test_a_confined_worker_can_compute_but_not_reach_out(tmp_path: Path) -> None:
    existing = tmp_path / "existing.txt"
    existing.write_text("hello")
    created = tmp_path / "created.txt"
    result = subprocess.run(
        [sys.executable, "-c", CONFINED, str(created), str(existing)],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["state"] != "seccomp":
        assert not os.environ.get("CI"), f"CI must confine workers: {report['state']}"
        pytest.skip(report["state"])
    for name in ("socket", "create a file", "append to a file", "fork", "exec", "change a limit"):
        assert report[name] == errno.EPERM, (name, report)
    assert report["read a file"] == "allowed"
    assert report["matmul"] and report["threads"]
    assert not created.exists()
    assert existing.read_text() == "hello"
