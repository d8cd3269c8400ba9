"""Run duet_owner.py in home1 and duet_scientist.py in home2 of a topology; collect reports.

Shared by tests/network/test_duet_nat.py and benchmarks/network.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netns import REPO_ROOT, Topology

HERE = Path(__file__).resolve().parent
OWNER = HERE / "duet_owner.py"
SCIENTIST = HERE / "duet_scientist.py"


@dataclass
class PeerRun:
    """One peer process: exit code, its last JSON line, and its stderr."""

    role: str
    returncode: int | None
    report: dict[str, Any]
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.report.get("ok"))

    def describe(self) -> str:
        return f"{self.role} exit {self.returncode}: {self.report}\n{self.stderr[-3000:]}"


def peer_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without DUET_* settings (the loopback tests set some)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUET_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(extra or {})
    return env


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def run_pair(
    topo: Topology,
    workdir: Path,
    url: str,
    *,
    timeout: float = 30.0,
    owner_args: Sequence[str] = (),
    scientist_args: Sequence[str] = (),
    owner_env: Mapping[str, str] | None = None,
    scientist_env: Mapping[str, str] | None = None,
    wall: float | None = None,
) -> tuple[PeerRun, PeerRun]:
    """Start both peers at once and return their runs; both together may take ``wall``
    seconds (default: the connect timeout plus a minute), then they are killed."""
    workdir.mkdir(parents=True, exist_ok=True)
    common = [url, "--dir", str(workdir), "--timeout", f"{timeout:g}"]
    specs = [
        ("owner", topo.home1, OWNER, owner_args, owner_env),
        ("scientist", topo.home2, SCIENTIST, scientist_args, scientist_env),
    ]
    procs = []
    for role, ns, script, args, env in specs:
        proc = topo.run(
            ns,
            [sys.executable, str(script), *common, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=peer_env(env),
            cwd=str(REPO_ROOT),
        )
        procs.append((role, proc))
    limit = wall if wall is not None else timeout + 60
    deadline = time.monotonic() + limit
    runs = []
    for role, proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
            err += f"\n[{role} killed after {limit:g} s]"
        runs.append(PeerRun(role, proc.returncode, _last_json(out), err))
    return runs[0], runs[1]
