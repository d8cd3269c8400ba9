"""``python -m registry_server`` (the ``duet-registry`` console script) as a process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "registry_server", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


async def wait_for_url(proc: asyncio.subprocess.Process, marker: str) -> str:
    """The URL printed after ``marker`` on the process's stdout (bounded wait and lines)."""
    assert proc.stdout is not None
    for _ in range(50):
        line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode()
        assert line, "the server exited before listening"
        if marker in line:
            return line.rsplit(" ", 1)[1].strip()
    raise AssertionError(f"no line with {marker!r}")


async def stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    return proc.returncode


async def test_serves_and_stops_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "registry_server", "--host", "127.0.0.1", "--port", "0",
        "--database", f"sqlite:///{db}", "--rate", "100", "--burst", "100",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        url = await wait_for_url(proc, "listening on")
        assert url.startswith("http://127.0.0.1:")
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{url}/api/v1") as response:
                assert response.status == 200
                assert (await response.json())["public_url"] == url
            async with http.get(f"{url}/api/v1/listings") as response:
                assert (await response.json())["total"] == 0
    finally:
        code = await stop(proc)
    assert code == 0
    assert db.exists()
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"listings", "hosts", "tombstones"} <= tables


async def test_public_url_flag(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "registry_server", "--port", "0",
        "--database", f"sqlite:///{tmp_path / 'r.db'}", "--public-url", "http://127.0.0.1:9/reg/",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = await wait_for_url(proc, "listening on")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
            async with http.get(f"{url}/api/v1") as response:
                assert (await response.json())["public_url"] == "http://127.0.0.1:9/reg"
    finally:
        assert await stop(proc) == 0


def test_help_teaches() -> None:
    done = run("--help")
    assert done.returncode == 0
    text = done.stdout
    for needle in (
        "sqlite:///registry.db", "postgresql://", "--public-url", "reverse proxy", "migrate",
        "--rate", "--writes-per-minute", "--exempt", "examples:",
    ):  # fmt: skip
        assert needle in text, needle
    assert "duet-registry reports" in text and "--dismiss" in text
    reports = run("reports", "--help")
    assert reports.returncode == 0, reports.stderr
    for needle in ("--listing", "--limit", "--json", "--dismiss", "--dismiss-client", "hash"):
        assert needle in reports.stdout, needle
    migrate = run("migrate", "--help")
    assert migrate.returncode == 0 and "sqlite:///registry.db" in migrate.stdout


def test_migrate_subcommand(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    done = run("migrate", "--database", f"sqlite:///{db}")
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "listings" in tables
    again = run("--database", f"sqlite:///{db}", "migrate")  # the flag before the command
    assert again.returncode == 0, again.stderr


def test_bad_flags_refused(tmp_path: Path) -> None:
    done = run("--port", "0", "--public-url", "ftp://127.0.0.1/")
    assert done.returncode == 2 and "public URL" in done.stderr
    done = run("--port", "0", "--exempt", "not-a-network")
    assert done.returncode == 2
    done = run("--port", "0", "--database", "mysql://127.0.0.1/x")
    assert done.returncode == 1 and "cannot start" in done.stderr
    done = run("migrate", "--database", "mysql://127.0.0.1/x")
    assert done.returncode == 1 and "cannot migrate" in done.stderr
    json.dumps(done.stderr)  # plain text
