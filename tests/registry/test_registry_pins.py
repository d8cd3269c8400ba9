"""Rollback and equivocation protection on the scientist's side (``registry/pins.py``).

An honest registry (``registry_server.app.start_registry``) holds the newest versions; a
replaying one (a small aiohttp app here) serves whatever signed versions a test gives it,
older ones included. A listing older than one this machine has seen, or the same version
with other content, must never reach the caller; pins persist, are private, bounded and
survive a corrupt file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import duet_p2p.registry.pins as pins_module
from duet_p2p.identity import Identity
from duet_p2p.registry.client import RegistryClient, RegistryError
from duet_p2p.registry.listing import ListingSpec, SignedDeletion, SignedListing
from duet_p2p.registry.pins import MAX_PINS, PINS_FILE, Pins, default_pins

ROOT = Path(__file__).resolve().parents[2]
HOST = Identity.generate()
OTHER = Identity.generate()
SUBPROCESS_TIMEOUT = 60


def spec_v1(identity: Identity = HOST, **changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Ward admissions", summary="Admissions by ward",
        description="One row per stay.", license="CC-BY-4.0",
        signaling_url="http://127.0.0.1:9/", modality="tabular", keywords=["health"],
        schema=[{"name": "age", "dtype": "int32"}], access_modes=["live"],
        usage_conditions="Any research use.",
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(identity, **fields)


def versions() -> tuple[SignedListing, SignedListing]:
    """Version 1, and version 2 with tightened usage conditions and another server."""
    v1 = spec_v1()
    v2 = v1.edit(usage_conditions="Non-commercial use only.",
                 signaling_url="http://127.0.0.1:10/")  # fmt: skip
    return v1.sign(HOST), v2.sign(HOST)


@dataclasses.dataclass(frozen=True)
class Fake:
    """A stand-in for a verified listing (for the pins file alone)."""

    listing_id: str
    host_id: str
    version: int
    content: str = ""

    def hash(self) -> str:
        return hashlib.sha256(f"{self.listing_id}{self.version}{self.content}".encode()).hexdigest()


def fake(n: int, version: int = 1, content: str = "") -> Fake:
    return Fake(f"{n:032x}", HOST.id, version, content)


# -- a registry that replays old signed versions -----------------------------------------


class Replaying:
    """Serves ``self.listings`` (signed listings, any versions) as search results and by
    ID (the first one of that ID)."""

    def __init__(self) -> None:
        self.listings: list[SignedListing] = []
        self.gone: dict[str, object] = {}
        """Listing ID -> what a 410 answer carries as its ``deletion``."""
        self.url = ""
        app = web.Application()
        app.router.add_get("/api/v1/listings", self.search)
        app.router.add_get("/api/v1/listings/{id}", self.get)
        self.app = app

    @staticmethod
    def item(signed: SignedListing) -> dict[str, Any]:
        spec = signed.spec
        return {"id": spec.listing_id, "host_id": spec.host_id, "kind": spec.kind,
                "version": spec.version, "online": False, "last_seen": None,
                "rating": None, "signed": signed.to_wire().decode()}  # fmt: skip

    async def search(self, request: web.Request) -> web.Response:
        results = [self.item(s) for s in self.listings]
        return web.json_response({"total": len(results), "results": results})

    async def get(self, request: web.Request) -> web.Response:
        if request.match_info["id"] in self.gone:
            gone = {
                "error": "deleted",
                "message": "deleted",
                "deletion": self.gone[request.match_info["id"]],
            }
            return web.json_response(gone, status=410)
        for signed in self.listings:
            if signed.listing_id == request.match_info["id"]:
                return web.json_response(self.item(signed))
        return web.json_response({"error": "not_found", "message": "no"}, status=404)


@pytest.fixture
async def replaying() -> AsyncIterator[Replaying]:
    server = Replaying()
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


@pytest.fixture
async def real(tmp_path: Path) -> AsyncIterator[str]:
    from registry_server.app import start_registry
    from registry_server.keys import RegistrySettings

    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'real.db'}",
                                requests_per_second=1000.0, burst=5000,
                                writes_per_minute=6000.0)  # fmt: skip
    running = await start_registry(settings)
    yield running.url
    await running.close()


@pytest.fixture
def pins(tmp_path: Path) -> Pins:
    return Pins(tmp_path / "pins" / "pins.sqlite")


# -- rollback and equivocation through the client ----------------------------------------


async def test_rollback_refused_by_search_and_get(replaying: Replaying, pins: Pins) -> None:
    v1, v2 = versions()
    async with RegistryClient(replaying.url, pins=pins) as client:
        replaying.listings = [v2]
        assert (await client.get(v2.listing_id)).version == 2
        replaying.listings = [v1]
        found = await client.search()
        assert len(found) == 0 and found.dropped == 1 and found.rolled_back == 1
        assert "1 older than a version seen before" in repr(found)
        with pytest.raises(RegistryError) as caught:
            await client.get(v1.listing_id)
    error = caught.value
    assert error.code == "rolled_back"
    assert "version 1" in error.message and "version 2" in error.message
    assert replaying.url in error.message
    pin = pins.get(v1.listing_id, HOST.id)
    assert pin is not None and pin.version == 2 and pin.hash == v2.hash()


async def test_rollback_across_registries(real: str, replaying: Replaying, pins: Pins) -> None:
    """The honest registry shows version 2; another serving version 1 is refused."""
    v1, v2 = versions()
    async with RegistryClient(real, pins=pins) as honest:
        await honest.publish(v1)
        await honest.publish(v2)
        assert (await honest.search("admissions"))[0].version == 2
    replaying.listings = [v1]
    async with RegistryClient(replaying.url, pins=pins) as other:
        assert len(await other.search()) == 0
        with pytest.raises(RegistryError, match="rollback"):
            await other.get(v1.listing_id)


async def test_equivocation_refused(replaying: Replaying, pins: Pins) -> None:
    v1 = spec_v1()
    a = v1.edit(summary="one thing").sign(HOST)
    b = v1.edit(summary="another thing").sign(HOST)
    assert a.version == b.version == 2 and a.hash() != b.hash()
    async with RegistryClient(replaying.url, pins=pins) as client:
        replaying.listings = [a]
        assert (await client.get(a.listing_id)).summary == "one thing"
        replaying.listings = [b]
        with pytest.raises(RegistryError) as caught:
            await client.get(b.listing_id)
        assert caught.value.code == "equivocation"
        assert "two listings as the same version" in caught.value.message
        found = await client.search()
        assert len(found) == 0 and found.rolled_back == 1
        replaying.listings = [a]
        assert len(await client.search()) == 1  # the pinned one still passes


async def test_equivocation_in_one_answer(replaying: Replaying, pins: Pins) -> None:
    v1 = spec_v1()
    a = v1.edit(summary="one").sign(HOST)
    b = v1.edit(summary="two").sign(HOST)
    replaying.listings = [a, b]
    async with RegistryClient(replaying.url, pins=pins) as client:
        found = await client.search()
    assert [x.summary for x in found] == ["one"] and found.rolled_back == 1


async def test_newer_version_raises_the_pin(real: str, pins: Pins) -> None:
    v1, v2 = versions()
    v3 = v2.spec.edit(summary="v3").sign(HOST)
    async with RegistryClient(real, pins=pins) as client:
        await client.publish(v1)
        assert (await client.get(v1.listing_id)).version == 1
        assert pins.get(v1.listing_id, HOST.id).version == 1  # type: ignore[union-attr]
        await client.publish(v2)
        found = await client.search("admissions")
        assert found[0].version == 2 and found.rolled_back == 0
        assert pins.get(v1.listing_id, HOST.id).version == 2  # type: ignore[union-attr]
        await client.publish(v3)
        assert (await client.get(v1.listing_id)).version == 3
    assert pins.get(v1.listing_id, HOST.id).hash == v3.hash()  # type: ignore[union-attr]


async def test_older_version_in_the_same_answer(replaying: Replaying, pins: Pins) -> None:
    """Both orders: the answer itself shows version 2, so version 1 is not shown."""
    for order in (0, 1):
        v1, v2 = versions()
        replaying.listings = [v1, v2] if order == 0 else [v2, v1]
        async with RegistryClient(replaying.url, pins=pins) as client:
            found = await client.search()
        assert [x.version for x in found] == [2], order
        assert found.dropped == 1 and found.rolled_back == 1


async def test_another_host_cannot_poison_a_pin(replaying: Replaying, pins: Pins) -> None:
    """A listing of the same ID signed by another key, at a huge version, is pinned apart:
    the genuine listing's version 1 still passes."""
    v1, _ = versions()
    impostor = dataclasses.replace(
        v1.spec, host_id=OTHER.id, host_key=OTHER.public_key, version=2**40
    ).sign(OTHER)
    replaying.listings = [impostor, v1]
    async with RegistryClient(replaying.url, pins=pins) as client:
        found = await client.search()
    assert len(found) == 1 and found.rolled_back == 0  # the second of one ID: a duplicate
    assert pins.get(v1.listing_id, HOST.id).version == 1  # type: ignore[union-attr]
    assert pins.get(v1.listing_id, OTHER.id).version == 2**40  # type: ignore[union-attr]


async def test_a_seen_deletion_is_not_hidden(real: str, replaying: Replaying, pins: Pins) -> None:
    v1, v2 = versions()
    async with RegistryClient(real, pins=pins) as client:
        await client.publish(v1)
        await client.publish(v2)
        await client.delete(SignedDeletion.issue(HOST, v2))
    pin = pins.get(v1.listing_id, HOST.id)
    assert pin is not None and pin.deleted and pin.version == 3
    replaying.listings = [v2]
    async with RegistryClient(replaying.url, pins=pins) as client:
        with pytest.raises(RegistryError, match="delete") as caught:
            await client.get(v2.listing_id)
        assert caught.value.code == "rolled_back"
        assert (await client.search()).rolled_back == 1


async def test_host_page_drops_rolled_back(real: str, replaying: Replaying, pins: Pins) -> None:
    v1, v2 = versions()
    async with RegistryClient(real, pins=pins) as client:
        await client.publish(v1)
        await client.publish(v2)
        assert [x.version for x in (await client.host(HOST.id))["listings"]] == [2]

    async def host_page(request: web.Request) -> web.Response:
        return web.json_response({"online": False, "last_seen": None,
                                  "listings": [Replaying.item(v1)]})  # fmt: skip

    app = web.Application()
    app.router.add_get("/api/v1/hosts/{id}", host_page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with RegistryClient(f"http://127.0.0.1:{port}", pins=pins) as client:
            assert (await client.host(HOST.id))["listings"] == []
    finally:
        await runner.cleanup()


async def test_pins_false_checks_nothing(
    replaying: Replaying, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_default() -> Pins:
        raise AssertionError("pins=False must not open the machine's pins")

    monkeypatch.setattr("duet_p2p.registry.client.default_pins", no_default)
    v1, v2 = versions()
    async with RegistryClient(replaying.url, pins=False) as client:
        replaying.listings = [v2]
        await client.get(v2.listing_id)
        replaying.listings = [v1]
        assert (await client.get(v1.listing_id)).version == 1  # no memory: shown
        assert (await client.search()).rolled_back == 0
    for bad in ("yes", 0, Path("x")):
        with pytest.raises(TypeError):
            RegistryClient(replaying.url, pins=bad)  # type: ignore[arg-type]


# -- the machine's pins: where, for how long, by whom -------------------------------------


async def test_default_pins_in_the_data_dir_and_persist(
    replaying: Replaying, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("DUET_HOME", str(home))
    v1, v2 = versions()
    replaying.listings = [v2]
    async with RegistryClient(replaying.url) as client:
        await client.get(v2.listing_id)
    path = home / PINS_FILE
    assert default_pins().path == path and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    replaying.listings = [v1]
    async with RegistryClient(replaying.url) as again:  # another client instance
        with pytest.raises(RegistryError, match="rollback"):
            await again.get(v1.listing_id)
    # and another process, through the synchronous API
    code = (
        "import sys\n"
        "from duet_p2p.registry import get, RegistryError\n"
        "try:\n"
        f"    get({v1.listing_id!r}, registry_url={replaying.url!r})\n"
        "except RegistryError as exc:\n"
        "    print(exc.code)\n"
        "else:\n"
        "    print('shown')\n"
    )
    env = {**os.environ, "DUET_HOME": str(home)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), SUBPROCESS_TIMEOUT)
    assert out.decode().strip() == "rolled_back", err.decode()[-2000:]


async def test_another_process_raises_the_pin(
    replaying: Replaying, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("DUET_HOME", str(home))
    v1, v2 = versions()
    replaying.listings = [v2]
    code = (
        "from duet_p2p.registry import search\n"
        f"print(len(search(registry_url={replaying.url!r})))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=ROOT, env={**os.environ, "DUET_HOME": str(home)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), SUBPROCESS_TIMEOUT)
    assert out.decode().strip() == "1", err.decode()[-2000:]
    replaying.listings = [v1]
    async with RegistryClient(replaying.url) as client:
        assert (await client.search()).rolled_back == 1


def test_loose_modes_are_tightened(tmp_path: Path) -> None:
    folder = tmp_path / "loose"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    path = folder / "pins.sqlite"
    pins = Pins(path)
    assert pins.check([fake(1)]) == [None]
    path.chmod(0o644)
    assert pins.check([fake(1)]) == [None]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_cap_prunes_the_least_recently_seen(tmp_path: Path) -> None:
    assert MAX_PINS == 100_000 and Pins().max_pins == MAX_PINS
    pins = Pins(tmp_path / "pins.sqlite", max_pins=3)
    for n in range(3):
        assert pins.check([fake(n)]) == [None]
    assert pins.check([fake(0)]) == [None]  # seen again: now the most recent
    assert pins.check([fake(3)]) == [None]
    assert len(pins) == 3
    assert pins.get(fake(1).listing_id, HOST.id) is None  # the least recently seen
    assert all(pins.get(fake(n).listing_id, HOST.id) for n in (0, 2, 3))
    assert pins.check([fake(n) for n in range(10, 20)]) == [None] * 10
    assert len(pins) == 3
    for bad in (0, 10 * MAX_PINS + 1, 1.5):
        with pytest.raises(ValueError):
            Pins(tmp_path / "x.sqlite", max_pins=bad)  # type: ignore[arg-type]


def test_bad_values_are_refused_before_writing(pins: Pins) -> None:
    for bad in (Fake("A" * 32, HOST.id, 1), Fake("0" * 31, HOST.id, 1),
                Fake("0" * 32, HOST.id, 0), Fake("0" * 32, "x", 1),
                Fake("0" * 32, HOST.id, True)):  # fmt: skip
        with pytest.raises(ValueError):
            pins.check([bad])
    assert len(pins) == 0


def test_threads_share_pins(pins: Pins) -> None:
    errors: list[BaseException] = []

    def work(base: int) -> None:
        try:
            for version in range(1, 6):
                assert pins.check([fake(base), fake(base + 1000, version)]) == [None, None]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(pins) == 16
    assert pins.check([fake(1003, 4)])[0].code == "rolled_back"  # type: ignore[union-attr]


# -- a corrupt or unusable file -----------------------------------------------------------


def corrupt_by_sql(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    with db:
        for statement in statements:
            db.execute(statement)
    db.close()


CORRUPTIONS = ["garbage", "bad_version", "bad_hash", "bad_time", "bad_deleted", "foreign",
               "schema_version", "columns"]  # fmt: skip


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_file_moved_aside(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pins.sqlite"
    pins = Pins(path)
    assert pins.check([fake(1, 5)]) == [None]
    if how == "garbage":
        path.write_bytes(b"this is not a database at all" * 200)
    elif how == "foreign":
        path.unlink()
        corrupt_by_sql(path, "CREATE TABLE other (x)")
    elif how == "schema_version":
        corrupt_by_sql(path, "PRAGMA user_version = 99")
    elif how == "columns":
        corrupt_by_sql(path, "ALTER TABLE pins ADD COLUMN extra TEXT")
    else:
        column, value = {"bad_version": ("version", "'five'"), "bad_hash": ("hash", "'zz'"),
                         "bad_time": ("seen_at", "1e300"),
                         "bad_deleted": ("deleted", "7")}[how]  # fmt: skip
        corrupt_by_sql(path, f"UPDATE pins SET {column} = {value}")
    with caplog.at_level(logging.WARNING, logger=pins_module.__name__):
        assert pins.check([fake(1, 2)]) == [None]  # afresh: version 2 is the newest seen
    assert any("moved aside" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "pins.sqlite.corrupt").is_file()
    assert pins.get(fake(1).listing_id, HOST.id).version == 2  # type: ignore[union-attr]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_corrupt_file_never_breaks_a_search(
    replaying: Replaying, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pins.sqlite"
    path.write_bytes(os.urandom(8192))
    path.chmod(0o600)
    v1, _ = versions()
    replaying.listings = [v1]
    with caplog.at_level(logging.WARNING, logger=pins_module.__name__):
        async with RegistryClient(replaying.url, pins=Pins(path)) as client:
            assert len(await client.search()) == 1
    assert any("moved aside" in r.getMessage() for r in caplog.records)


async def test_unusable_file_warns_and_leaves_listings_unchecked(
    replaying: Replaying, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pins.sqlite"
    path.mkdir()  # a directory where the file should be
    link = tmp_path / "link.sqlite"
    link.symlink_to(tmp_path / "elsewhere.sqlite")
    v1, _ = versions()
    replaying.listings = [v1]
    for where in (path, link):
        caplog.clear()
        pins = Pins(where)
        with caplog.at_level(logging.WARNING, logger=pins_module.__name__):
            async with RegistryClient(replaying.url, pins=pins) as client:
                assert len(await client.search()) == 1
                assert (await client.get(v1.listing_id)).version == 1
        warnings = [r for r in caplog.records if "not checked for rollback" in r.getMessage()]
        assert len(warnings) == 1  # once per Pins, not per call
    assert not (tmp_path / "elsewhere.sqlite").exists()  # the symlink was not followed


def test_pins_do_not_import_torch() -> None:
    code = ("import sys, duet_p2p.registry.pins, duet_p2p.registry.client; "
            "assert 'torch' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                   timeout=SUBPROCESS_TIMEOUT)  # fmt: skip


# -- a deleted listing: the registry answers 410 with the host's signed deletion ---------


async def test_a_deletion_seen_through_get_is_pinned(
    real: str, replaying: Replaying, tmp_path: Path
) -> None:
    v1, _v2 = versions()
    owner_pins, reader_pins = Pins(tmp_path / "a" / "p.sqlite"), Pins(tmp_path / "b" / "p.sqlite")
    async with RegistryClient(real, pins=owner_pins) as owner:
        await owner.publish(v1)
        await owner.delete(SignedDeletion.issue(HOST, v1))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{real}/api/v1/listings/{v1.listing_id}") as response:
            assert response.status == 410
            answer = await response.json()
    SignedDeletion.from_wire(answer["deletion"].encode()).verify(HOST.id)
    async with RegistryClient(real, pins=reader_pins) as reader:  # never saw the listing
        with pytest.raises(RegistryError) as deleted:
            await reader.get(v1.listing_id)
    assert (deleted.value.code, deleted.value.status) == ("deleted", 410)
    # a registry that hides the deletion and serves the old version is refused from now on
    replaying.listings = [v1]
    async with RegistryClient(replaying.url, pins=reader_pins) as client:
        with pytest.raises(RegistryError) as refused:
            await client.get(v1.listing_id)
        assert refused.value.code == "rolled_back"
        assert len(await client.search("")) == 0


async def test_a_forged_or_foreign_deletion_in_a_410_is_refused(
    replaying: Replaying, pins: Pins
) -> None:
    v1, _v2 = versions()
    foreign_listing = spec_v1(OTHER).sign(OTHER)
    foreign = SignedDeletion.issue(OTHER, foreign_listing).to_wire().decode()
    honest = SignedDeletion.issue(HOST, v1).to_wire().decode()
    tampered = honest.replace('"version":2', '"version":3')
    assert tampered != honest
    for wire in (foreign, tampered, "not a deletion", 12, None):
        replaying.gone[v1.listing_id] = wire
        async with RegistryClient(replaying.url, pins=pins) as client:
            with pytest.raises(RegistryError) as refused:
                await client.get(v1.listing_id)
        assert refused.value.code == "forged", wire
    assert pins.get(v1.listing_id, HOST.id) is None  # nothing pinned from a bad 410
