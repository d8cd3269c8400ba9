"""A throwaway PostgreSQL server for tests and benchmarks, from Debian's binaries.

``start_postgres()`` runs ``initdb`` (trust authentication, superuser ``duet``) in a fresh
temporary directory and ``pg_ctl start`` with the server listening on 127.0.0.1 on a free
port (its Unix socket in that directory too); ``server.stop()`` stops it (``pg_ctl -m
fast``) and removes the directory. PostgreSQL refuses to run as root, so as root both run
as the ``postgres`` user (or ``nobody``) via ``runuser``, owning the directory.
``server.create_database()`` makes an empty database and returns its URL
(``postgresql://duet@127.0.0.1:<port>/<name>``); ``drop_database`` removes it.

Binaries: ``$DUET_PG_BIN`` if set, else the newest ``/usr/lib/postgresql/<n>/bin``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PostgresServer", "find_binaries", "postgres_server", "start_postgres"]

USER = "duet"
START_TIMEOUT = 60.0
COMMAND_TIMEOUT = 60.0
_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_FAST = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")


def find_binaries() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``psql``, or None."""
    override = os.environ.get("DUET_PG_BIN")
    candidates = [Path(override)] if override else []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = [p for p in root.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: -int(p.name))]
    for directory in candidates:
        if all((directory / tool).is_file() for tool in ("initdb", "pg_ctl", "psql")):
            return directory
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_as() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that drops root (and the user it becomes), or nothing."""
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if runuser is None:
        raise RuntimeError("PostgreSQL refuses to run as root, and runuser is missing")
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(name)
            return [runuser, "-u", name, "--"], user
    raise RuntimeError("PostgreSQL refuses to run as root, and no postgres/nobody user exists")


class PostgresServer:
    """A running PostgreSQL server in a temporary directory (see the module)."""

    def __init__(self, bin_dir: Path, *, durable: bool = False) -> None:
        self.bin_dir = bin_dir
        self.durable = durable
        self.port = 0
        self.directory = Path(tempfile.mkdtemp(prefix="duet_pg_"))
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        self._prefix, self._user = _run_as()
        self._started = False

    @property
    def admin_url(self) -> str:
        """The URL of the ``postgres`` maintenance database."""
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _cmd(self, tool: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        result = subprocess.run(
            [*self._prefix, str(self.bin_dir / tool), *args],
            capture_output=True, text=True, timeout=timeout, cwd=self.directory,
            env={**os.environ, "LC_ALL": "C", "PGCONNECT_TIMEOUT": "10"},
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def start(self) -> None:
        """initdb and start the server (a few attempts if the chosen port is taken)."""
        if self._user is not None:
            os.chown(self.directory, self._user.pw_uid, self._user.pw_gid)
        self._cmd(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        last: Exception | None = None
        for _ in range(3):
            self.port = _free_port()
            options = [
                "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                "-c", f"unix_socket_directories={self.directory}", "-c", "max_connections=200",
                *(() if self.durable else _FAST),
            ]  # fmt: skip
            try:
                self._cmd(
                    "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                    "-t", str(int(START_TIMEOUT)), "-o", " ".join(options), "start",
                    timeout=START_TIMEOUT + 10,
                )  # fmt: skip
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                last = exc
                self._stop_quietly()
                continue
            self._started = True
            self._wait_ready()
            return
        log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {last}\n{log}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.psql("postgres", "SELECT 1")
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def psql(self, database: str, sql: str) -> str:
        """Run ``sql`` (our own statements, never outside input) in ``database``."""
        return self._cmd(
            "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(self.port), "-U", USER, "-d", database, "-c", sql,
        )  # fmt: skip

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        name = name or f"t_{uuid.uuid4().hex}"
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a simple database name: {name!r}")
        self.psql("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a simple database name: {name!r}")
        self.psql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _stop_quietly(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._cmd("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        if self._started:
            self._stop_quietly()
            self._started = False
        shutil.rmtree(self.directory, ignore_errors=True)


def start_postgres(*, durable: bool = False) -> PostgresServer:
    """A started server (raises RuntimeError if there are no binaries or it fails)."""
    bin_dir = find_binaries()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL binaries (install Debian's postgresql package)")
    server = PostgresServer(bin_dir, durable=durable)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def postgres_server(*, durable: bool = False) -> Iterator[PostgresServer]:
    """``start_postgres()`` for the length of a ``with`` block."""
    server = start_postgres(durable=durable)
    try:
        yield server
    finally:
        server.stop()
