"""Run a demo as separate processes: a signaling server, the owner and the scientist.

The IDs travel as two people would pass them over chat: the owner's Duet ID is read from
its output and given to the scientist; the scientist's Client ID is read from its output
and typed at the owner's prompt. Every line each process prints is shown, prefixed with
its role. Used by ``seed_flow.py`` (``make demo``) and ``train_digits/run.py``; the
standing-host demos type commands as the owner or the scientist would (:meth:`Demo.command`,
:meth:`Demo.duet_host`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
URL = re.compile(r"(http://\S+)")
DUET_ID = re.compile(r"join_duet\('([0-9a-f]{32})'")
CLIENT_ID = re.compile(r"Client ID: ([0-9a-f]{32})")


class DemoFailed(RuntimeError):
    """A process exited early or did not print what was expected in time."""


class Process:
    """One started process; its output lines are kept and echoed with its name."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            [sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
            print(f"[{self.name:9}] {line}", end="", flush=True)

    def wait_for(self, pattern: re.Pattern[str], what: str, timeout: float) -> re.Match[str]:
        """The first output line matching ``pattern``; DemoFailed if it never comes."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            lines = list(self.lines)
            for line in lines[seen:]:
                match = pattern.search(line)
                if match:
                    return match
            seen = len(lines)
            if self.popen.poll() is not None and not self._pump.is_alive():
                raise DemoFailed(f"{self.name} exited ({self.popen.returncode}) before {what}")
            time.sleep(0.02)
        raise DemoFailed(f"timed out after {timeout:g} s waiting for {what} from {self.name}")

    def type_line(self, text: str) -> None:
        """Type ``text`` and Enter at the process's prompt."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float) -> int:
        """Its exit code; DemoFailed if it is still running after ``timeout`` s."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"{self.name} did not finish within {timeout:g} s") from None
        self._pump.join(5)
        return code

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


class Demo:
    """The processes of one demo; ``with Demo() as demo:`` stops them all on the way out."""

    def __init__(self) -> None:
        self.processes: list[Process] = []
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            "DUET_ICE_HOST_ADDRESSES": "127.0.0.1",
        }

    def start(self, name: str, argv: list[str]) -> Process:
        process = Process(name, argv, self.env)
        self.processes.append(process)
        return process

    def command(self, who: str, home: Path, argv: list[str], timeout: float = 60,
                env: dict[str, str] | None = None) -> str:  # fmt: skip
        """One command as ``who`` would type it, in their own data directory (``env``
        added); its output is shown and returned; DemoFailed if it fails."""
        environment = {**self.env, "DUET_HOME": str(home), **(env or {})}
        shown = " ".join(Path(a).name if a.endswith(".py") else a for a in argv)
        print(f"[{who:<9}] $ {shown}")
        done = subprocess.run([sys.executable, *argv], env=environment, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        for line in (done.stdout + done.stderr).splitlines():
            print(f"[{who:<9}] {line}")
        if done.returncode:
            raise DemoFailed(f"{who}: {shown} failed")
        return done.stdout

    def duet_host(self, home: Path, config: Path, *args: str,
                  env: dict[str, str] | None = None) -> str:  # fmt: skip
        """``duet-host ARGS --config CONFIG`` as the owner."""
        argv = ["-m", "duet_p2p.host.cli", *args, "--config", str(config)]
        return self.command("owner", home, argv, env=env)

    def start_signaling(self, timeout: float = 20.0, extra: list[str] | None = None) -> str:
        """Start a signaling server on a free loopback port (with ``extra`` flags); returns
        its URL."""
        server = self.start(
            "signaling",
            ["-m", "signaling_server", "--port", "0", "--log-level", "WARNING", *(extra or [])],
        )
        return server.wait_for(URL, "the signaling server's URL", timeout)[1]

    def connect(
        self,
        owner_argv: list[str],
        scientist_argv: list[str],
        timeout: float = 30.0,
    ) -> tuple[Process, Process]:
        """Start the signaling server, the owner (``owner_argv + [url]``) and the scientist
        (``scientist_argv + [duet_id, url]``), and pass the IDs between them."""
        url = self.start_signaling()
        owner = self.start("owner", [*owner_argv, url])
        duet_id = owner.wait_for(DUET_ID, "the Duet ID", timeout)[1]
        scientist = self.start("scientist", [*scientist_argv, duet_id, url])
        client_id = scientist.wait_for(CLIENT_ID, "the Client ID", timeout)[1]
        owner.type_line(client_id)
        return owner, scientist

    def run(
        self,
        label: str,
        owner_argv: list[str],
        scientist_argv: list[str],
        *,
        scientist_timeout: float,
        owner_timeout: float,
    ) -> Process | None:
        """Connect the two (see ``connect``) and wait for both to exit; the scientist's
        process, or None after printing ``<label> failed: ...`` when either failed."""
        try:
            owner, scientist = self.connect(owner_argv, scientist_argv)
            scientist_rc = scientist.wait(timeout=scientist_timeout)
            owner_rc = owner.wait(timeout=owner_timeout)
        except DemoFailed as exc:
            print(f"{label} failed: {exc}")
            return None
        if scientist_rc or owner_rc:
            print(f"{label} failed: owner exit {owner_rc}, scientist exit {scientist_rc}")
            return None
        return scientist

    def __enter__(self) -> Demo:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for process in reversed(self.processes):
            process.stop()
