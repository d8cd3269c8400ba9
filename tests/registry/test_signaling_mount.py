"""The registry mounted in the signaling server (``--registry-database``): both serve, the
registry's URLs keep the /registry prefix, and the signaling server stays light."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from duet_p2p.identity import Identity
from duet_p2p.registry.listing import ListingSpec
from registry_server.app import CONTENT_SECURITY_POLICY
from registry_server.keys import RegistrySettings
from signaling_server.app import RunningServer, start_server
from signaling_server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0
HOST = Identity.generate()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.get(url) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response


async def test_mounted_registry_serves_beside_signaling(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}")
    server: RunningServer = await start_server(ServerConfig(), registry=settings)
    async with server:
        base = f"{server.url}/registry"
        status, info, response = await get(http, f"{base}/api/v1")
        assert status == 200 and info["public_url"] == base
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        status, health, _ = await get(http, f"{server.url}/health")
        assert status == 200
        spec = ListingSpec.new(
            HOST, kind="dataset", name="Mounted", summary="", description="", license="MIT",
            signaling_url=f"{server.url}/",
        )  # fmt: skip
        async with http.post(
            f"{base}/api/v1/listings",
            data=spec.sign(HOST).to_wire(),
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 201, await response.text()
        status, found, _ = await get(http, f"{base}/api/v1/listings?q=mounted")
        assert found["total"] == 1
        async with http.get(f"{base}/api/v1/listings/{spec.listing_id}/croissant.json") as resp:
            doc = await resp.json(content_type=None)
        assert doc["url"] == f"{base}/listings/{spec.listing_id}"
        status, error, _ = await get(http, f"{base}/api/v1/nope")
        assert status == 404 and error["error"] == "not_found"  # the registry's JSON error
        status, _, response = await get(http, f"{base}/no-such-page")
        assert status == 404 and response.content_type == "text/html"
        status, doc, _ = await get(http, f"{base}/api/v1/openapi.json")
        assert doc["servers"] == [{"url": base}]


async def test_no_registry_without_the_flag(http: aiohttp.ClientSession) -> None:
    async with await start_server(ServerConfig()) as server:
        status, _, _ = await get(http, f"{server.url}/registry/api/v1")
        assert status == 404
        assert (await get(http, f"{server.url}/health"))[0] == 200


async def test_cli_flag(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling_server", "--port", "0", "--state", "memory",
        "--registry-database", f"sqlite:///{tmp_path / 'r.db'}",
        "--registry-public-url", "http://127.0.0.1:9/registry",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        lines = []
        for _ in range(20):
            line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode()
            assert line, "the server exited"
            lines.append(line)
            if "registry at" in line:
                break
        url = next(line for line in lines if "listening on" in line).rsplit(" ", 1)[1].strip()
        status, info, _ = await get(http, f"{url}/registry/api/v1")
        assert status == 200 and info["public_url"] == "http://127.0.0.1:9/registry"
        assert (await get(http, f"{url}/health"))[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
        finally:
            if proc.returncode is None:
                proc.kill()


def test_public_url_flag_needs_database() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "signaling_server", "--registry-public-url", "http://127.0.0.1:1"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 2 and "--registry-database" in done.stderr


def test_signaling_stays_light() -> None:
    code = (
        "import sys, signaling_server.app, signaling_server.__main__; "
        "assert 'torch' not in sys.modules, 'torch'; "
        "assert 'registry_server.app' not in sys.modules, 'registry loaded eagerly'; "
        "assert 'sqlalchemy' not in sys.modules, 'sqlalchemy loaded eagerly'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    code = (
        "import sys; from signaling_server.app import create_app; "
        "from signaling_server.config import ServerConfig; "
        "from registry_server.keys import RegistrySettings; "
        "create_app(ServerConfig(), registry=RegistrySettings(public_url='http://127.0.0.1:1')); "
        "assert 'torch' not in sys.modules, 'torch'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
