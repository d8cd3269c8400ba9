"""Reports about listings kept in the database: the store, its caps, what it never keeps
(the reporter's address), the website's form writing to it, and the operator's
``duet-registry reports`` command (list, filter, JSON, dismiss, hostile text printed safe)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import column, inspect, select, table, update
from sqlalchemy.ext.asyncio import AsyncEngine

from duet_p2p.identity import Identity
from duet_p2p.registry.listing import ListingSpec
from registry_server import migrate
from registry_server.app import RunningRegistry, start_registry
from registry_server.db import make_engine, reports
from registry_server.keys import STORE, RegistrySettings
from registry_server.reports import (
    MAX_PER_CLIENT_PER_DAY,
    MAX_REPORT_CHARS,
    InvalidReport,
    ReportsFull,
    ReportStore,
    TooManyReports,
)
from registry_server.site import REPORTS

ROOT = Path(__file__).resolve().parents[2]
HOST = Identity.generate()
A = "1" * 32
B = "2" * 32
NOW = 1_750_000_000.0
DAY = 86400.0
TIMEOUT = aiohttp.ClientTimeout(total=20)
ROOMY = dict(requests_per_second=1000.0, burst=1000, writes_per_minute=60_000.0)
# what a terminal must never receive from a report: escapes, overwrites, reordering, hiding
HOSTILE = (
    "before\x1b[2J\x1b]0;pwned\x07\x1b]8;;http://127.0.0.1:9/\x1b\\link\x1b]8;;\x1b\\"
    "\rover\x08\x7f\u202egnp.exe\u202c\u200bhidden\u2066iso\u2069\x9b31m\nafter"
)


def make(**changes: object) -> ListingSpec:
    fields: dict[str, object] = dict(
        kind="dataset", name="Ward counts", summary="Daily admissions", description="Rows.",
        license="MIT", signaling_url="http://127.0.0.1:9/", modality="tabular",
        keywords=["health"], schema=[{"name": "ward", "dtype": "string"}],
        access_modes=["live"],
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(HOST, **fields)  # type: ignore[arg-type]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "registry_server", "reports", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def every_stored_value(engine: AsyncEngine) -> str:
    """Every value of every table (the registry's own and the search tables), as text."""
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda c: inspect(c).get_table_names())
        seen = []
        for name in names:
            columns = await conn.run_sync(
                lambda c, n=name: [col["name"] for col in inspect(c).get_columns(n)]
            )
            rows = (await conn.execute(select(table(name, *map(column, columns))))).all()
            for row in rows:
                for value in row:
                    seen.append(value.hex() if isinstance(value, bytes) else str(value))
                    if isinstance(value, bytes):
                        seen.append(value.decode("latin-1"))
    return "\n".join(seen)


# -- the store, on SQLite and PostgreSQL -----------------------------------------------------


async def test_reports_are_stored_and_listed_newest_first(registry_engine: AsyncEngine) -> None:
    store = ReportStore(registry_engine)
    first = await store.add(A, "spam", "buy now", "127.0.0.1", now=NOW)
    second = await store.add(B, "misleading", "", "127.0.0.2", now=NOW + 1)
    third = await store.add(A, "other", "ünïcode ✓ 日本", "127.0.0.1", now=NOW + 2)
    assert [r.report_id for r in await store.newest()] == [
        third.report_id, second.report_id, first.report_id,
    ]  # fmt: skip
    assert [r.report_id for r in await store.newest(listing_id=A)] == [
        third.report_id, first.report_id,
    ]  # fmt: skip
    assert [r.report_id for r in await store.newest(limit=1)] == [third.report_id]
    (again,) = await ReportStore(registry_engine).newest(listing_id=B)  # another process
    assert again == second
    assert (await store.newest(listing_id=A))[0].text == "ünïcode ✓ 日本"
    assert first.client_key == third.client_key != second.client_key
    assert re.fullmatch(r"[0-9a-f]{64}", first.client_key)
    assert re.fullmatch(r"[0-9a-f]{32}", first.report_id) and first.report_id != third.report_id
    assert await store.count() == 3
    # dismissing deletes; an unknown or malformed ID is refused
    assert await store.dismiss(second.report_id)
    assert not await store.dismiss(second.report_id)
    assert await store.count() == 2
    with pytest.raises(InvalidReport):
        await store.dismiss("'; DROP TABLE reports; --")
    assert await store.dismiss_client(first.client_key[:16]) == 2
    assert await store.newest() == []


async def test_malformed_reports_are_refused(registry_engine: AsyncEngine) -> None:
    store = ReportStore(registry_engine)
    bad = [
        ("not-an-id", "spam", "x"), ("A" * 32, "spam", "x"), (A, "nope", "x"),
        (A, "spam", "x" * (MAX_REPORT_CHARS + 1)), (A, "spam", "nul\x00here"),
        (A, "spam", "lone \ud800 surrogate"), (A, ["spam"], "x"), (A, "spam", b"bytes"),
    ]  # fmt: skip
    for listing_id, reason, text in bad:
        with pytest.raises(InvalidReport):
            await store.add(listing_id, reason, text, "127.0.0.1", now=NOW)  # type: ignore[arg-type]
    await store.add(A, "spam", "x" * MAX_REPORT_CHARS, "127.0.0.1", now=NOW)
    for wrong in ("x", "0" * 31, 5):
        with pytest.raises(InvalidReport):
            await store.newest(listing_id=wrong)  # type: ignore[arg-type]
    for wrong in ("abc", "g" * 16, "0" * 65):
        with pytest.raises(InvalidReport):
            await store.dismiss_client(wrong)
    assert len(await store.newest(limit=10**9)) == 1  # held to the cap, not refused
    assert await store.count() == 1


async def test_one_client_reports_a_listing_at_most_20_times_a_day(
    registry_engine: AsyncEngine,
) -> None:
    store = ReportStore(registry_engine)
    for n in range(MAX_PER_CLIENT_PER_DAY):
        await store.add(A, "spam", str(n), "127.0.0.1", now=NOW + n)
    with pytest.raises(TooManyReports):
        await store.add(A, "spam", "one more", "127.0.0.1", now=NOW + 100)
    await store.add(B, "spam", "another listing", "127.0.0.1", now=NOW + 100)
    await store.add(A, "spam", "another client", "127.0.0.2", now=NOW + 100)
    # an IPv6 client is counted by its /64: a new address in it is the same client
    for n in range(MAX_PER_CLIENT_PER_DAY):
        await store.add(A, "spam", str(n), f"::{n + 1:x}", now=NOW + n)
    with pytest.raises(TooManyReports):
        await store.add(A, "spam", "rotated", "::abcd:1:2", now=NOW + 100)
    # a day after the first, one more is taken; a dismissed one frees a place at once
    await store.add(A, "spam", "next day", "127.0.0.1", now=NOW + DAY + 0.5)
    with pytest.raises(TooManyReports):
        await store.add(A, "spam", "still full", "127.0.0.1", now=NOW + DAY + 0.6)
    (newest,) = await store.newest(listing_id=A, limit=1)
    assert newest.text == "next day" and await store.dismiss(newest.report_id)
    await store.add(A, "spam", "after a dismissal", "127.0.0.1", now=NOW + DAY + 0.7)


async def test_concurrent_reports_keep_the_per_client_cap(registry_engine: AsyncEngine) -> None:
    stores = [ReportStore(registry_engine) for _ in range(3)]
    await stores[0].client_key("127.0.0.1")  # the key exists (its first use is tested below)

    async def one(n: int) -> bool:
        try:
            await stores[n % 3].add(A, "spam", str(n), "127.0.0.1", now=NOW)
        except TooManyReports:
            return False
        return True

    taken = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(30))), 60)
    assert sum(taken) == MAX_PER_CLIENT_PER_DAY
    assert await stores[0].count() == MAX_PER_CLIENT_PER_DAY


async def test_concurrent_first_uses_agree_on_one_key(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await migrate.upgrade(engine)
        stores = [ReportStore(engine) for _ in range(4)]
        keys = await asyncio.wait_for(
            asyncio.gather(*(s.client_key("127.0.0.1") for s in stores)), 60
        )
        assert len(set(keys)) == 1
    finally:
        await engine.dispose()


async def test_a_full_registry_refuses_new_reports_and_keeps_the_old(
    registry_engine: AsyncEngine,
) -> None:
    store = ReportStore(registry_engine, max_reports=5)
    kept = [await store.add(A, "spam", str(n), f"127.0.0.{n + 1}", now=NOW + n) for n in range(5)]
    with pytest.raises(ReportsFull):
        await store.add(B, "harmful", "late", "127.0.0.99", now=NOW + 10)
    assert {r.report_id for r in await store.newest()} == {r.report_id for r in kept}
    assert await store.dismiss(kept[0].report_id)
    await store.add(B, "harmful", "now taken", "127.0.0.99", now=NOW + 11)
    with pytest.raises(ValueError):
        ReportStore(registry_engine, max_reports=0)


async def test_no_address_is_stored_and_keys_differ_per_database(
    registry_engine: AsyncEngine, tmp_path: Path
) -> None:
    """Only a keyed hash of the reporter's address is kept: not the address, not its
    plain hash; another registry's database (another random key) gives another key."""
    import hashlib

    addresses = ["127.0.0.77", "127.0.0.78", "::1"]
    store = ReportStore(registry_engine)
    for address in addresses:
        await store.add(A, "spam", "x", address, now=NOW)
    stored = await every_stored_value(registry_engine)
    for address in addresses + ["::/64"]:
        assert address not in stored
        assert hashlib.sha256(address.encode()).hexdigest() not in stored
    async with registry_engine.connect() as conn:
        keys = {row.client_key for row in (await conn.execute(select(reports))).all()}
        columns = await conn.run_sync(
            lambda c: {col["name"] for col in inspect(c).get_columns("reports")}
        )
    assert len(keys) == 3
    assert columns == {"report_id", "listing_id", "reason", "text", "created_at", "client_key"}
    other = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        await migrate.upgrade(other)
        elsewhere = await ReportStore(other).client_key("127.0.0.77")
    finally:
        await other.dispose()
    assert elsewhere not in keys
    assert await store.client_key("127.0.0.77") in keys


async def test_a_tampered_key_is_refused(registry_engine: AsyncEngine) -> None:
    from registry_server.db import registry_settings

    await ReportStore(registry_engine).client_key("127.0.0.1")
    async with registry_engine.begin() as conn:
        await conn.execute(update(registry_settings).values(value=b"short"))
    with pytest.raises(RuntimeError, match="too short"):
        await ReportStore(registry_engine).client_key("127.0.0.1")


# -- the website's form ---------------------------------------------------------------------


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}", **ROOMY)
    running = await asyncio.wait_for(start_registry(settings), 30)
    try:
        yield running
    finally:
        await asyncio.wait_for(running.close(), 30)


async def form_token(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as response:
        found = re.search(r'name="csrf" value="([^"]+)"', await response.text())
    assert found is not None
    return found.group(1)


async def test_the_form_stores_reports_that_outlive_the_server(tmp_path: Path) -> None:
    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}", **ROOMY)
    spec = make()
    jar = aiohttp.CookieJar(unsafe=True)
    async with await asyncio.wait_for(start_registry(settings), 30) as running:
        await running.app[STORE].publish(spec.sign(HOST).to_wire())
        listing_url = f"{running.url}/listings/{spec.listing_id}"
        async with aiohttp.ClientSession(timeout=TIMEOUT, cookie_jar=jar) as http:
            token = await form_token(http, listing_url)
            form = {"csrf": token, "reason": "harmful", "text": HOSTILE}
            statuses = []
            for _ in range(MAX_PER_CLIENT_PER_DAY + 1):
                async with http.post(
                    listing_url + "/report", data=form, allow_redirects=False
                ) as response:
                    statuses.append(response.status)
                    if response.status == 303:
                        assert response.headers["Location"].endswith("/reported")
                    else:
                        assert "reports about this listing today" in await response.text()
        assert statuses == [303] * MAX_PER_CLIENT_PER_DAY + [429]
    async with await asyncio.wait_for(start_registry(settings), 30) as again:
        found = await again.app[REPORTS].newest(limit=100)
    assert len(found) == MAX_PER_CLIENT_PER_DAY
    assert {r.text for r in found} == {HOSTILE} and {r.reason for r in found} == {"harmful"}
    assert len({r.client_key for r in found}) == 1


async def test_behind_an_exempt_proxy_only_the_total_cap_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every visitor behind a reverse proxy has its address: the per-client cap would be
    one cap for all of them, so it is skipped for the exempt networks, like the rate
    limits; the total cap still holds."""
    settings = RegistrySettings(
        database_url=f"sqlite:///{tmp_path / 'r.db'}", exempt_networks=("127.0.0.0/8",)
    )
    spec = make()
    jar = aiohttp.CookieJar(unsafe=True)
    async with await asyncio.wait_for(start_registry(settings), 30) as running:
        await running.app[STORE].publish(spec.sign(HOST).to_wire())
        monkeypatch.setattr(running.app[REPORTS], "_max", MAX_PER_CLIENT_PER_DAY + 5)
        listing_url = f"{running.url}/listings/{spec.listing_id}"
        statuses = []
        async with aiohttp.ClientSession(timeout=TIMEOUT, cookie_jar=jar) as http:
            token = await form_token(http, listing_url)
            for n in range(MAX_PER_CLIENT_PER_DAY + 6):
                async with http.post(
                    listing_url + "/report", data={"csrf": token, "reason": "spam", "text": str(n)},
                    allow_redirects=False,
                ) as response:  # fmt: skip
                    statuses.append(response.status)
    assert statuses == [303] * (MAX_PER_CLIENT_PER_DAY + 5) + [503]


async def test_a_full_report_table_says_so(
    registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make()
    await registry.app[STORE].publish(spec.sign(HOST).to_wire())
    monkeypatch.setattr(registry.app[REPORTS], "_max", 1)
    await registry.app[REPORTS].add(spec.listing_id, "spam", "first", "127.0.0.5")
    listing_url = f"{registry.url}/listings/{spec.listing_id}"
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(timeout=TIMEOUT, cookie_jar=jar) as http:
        token = await form_token(http, listing_url)
        async with http.post(
            listing_url + "/report", data={"csrf": token, "reason": "spam", "text": "x"},
            allow_redirects=False,
        ) as response:  # fmt: skip
            assert response.status == 503
            assert "cannot be taken right now" in await response.text()
    assert [r.text for r in await registry.app[REPORTS].newest()] == ["first"]


# -- the operator's command ----------------------------------------------------------------


async def seeded(database_url: str) -> list[str]:
    """A migrated database with three reports (the hostile one newest); their IDs, newest
    first."""
    engine = make_engine(database_url)
    try:
        await migrate.upgrade(engine)
        store = ReportStore(engine)
        made = [
            await store.add(A, "spam", "plain words", "127.0.0.1", now=NOW),
            await store.add(B, "personal", "", "127.0.0.2", now=NOW + 1),
            await store.add(A, "harmful", HOSTILE, "127.0.0.3", now=NOW + 2),
        ]
    finally:
        await engine.dispose()
    return [r.report_id for r in reversed(made)]


def assert_terminal_safe(text: str) -> None:
    for line in text.splitlines():
        assert line.isprintable(), repr(line)
        assert not any(unicodedata.category(ch) in ("Cc", "Cf") for ch in line), repr(line)


async def test_cli_lists_filters_and_dismisses(database_url: str) -> None:
    newest, middle, oldest = await seeded(database_url)
    listed = await asyncio.to_thread(run_cli, "--database", database_url)
    assert listed.returncode == 0, listed.stderr
    assert_terminal_safe(listed.stdout)
    ids = re.findall(r"^([0-9a-f]{32})  ", listed.stdout, re.M)
    assert ids == [newest, middle, oldest]
    assert "beforepwned" not in listed.stdout  # the OSC title went whole, not its payload
    assert "before" in listed.stdout and "after" in listed.stdout and "gnp.exe" in listed.stdout
    assert "2025-06-15 15:06:42Z" in listed.stdout and "plain words" in listed.stdout
    assert "(no text)" in listed.stdout and "127.0.0" not in listed.stdout
    only_a = await asyncio.to_thread(run_cli, "--database", database_url, "--listing", A)
    assert re.findall(r"^([0-9a-f]{32})  ", only_a.stdout, re.M) == [newest, oldest]
    one = await asyncio.to_thread(run_cli, "--database", database_url, "--limit", "1", "--json")
    assert one.returncode == 0 and one.stdout.isascii()
    (as_json,) = json.loads(one.stdout)
    assert as_json["report_id"] == newest and as_json["text"] == HOSTILE  # exact, escaped
    assert set(as_json) == {
        "report_id", "listing_id", "reason", "text", "created_at", "client_key",
    }  # fmt: skip
    gone = await asyncio.to_thread(run_cli, "--database", database_url, "--dismiss", middle)
    assert gone.returncode == 0 and f"dismissed report {middle}" in gone.stdout
    again = await asyncio.to_thread(run_cli, "--database", database_url, "--dismiss", middle)
    assert again.returncode == 1 and "no report" in again.stderr
    left = await asyncio.to_thread(run_cli, "--database", database_url, "--json")
    assert [r["report_id"] for r in json.loads(left.stdout)] == [newest, oldest]


async def test_cli_refuses_bad_input_and_old_schemas(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    await seeded(url)
    for args, code, needle in (
        (["--dismiss", "x'; DROP TABLE reports;--"], 2, "report ID"),
        (["--listing", "NOT-AN-ID"], 2, "listing ID"),
        (["--limit", "0"], 2, "--limit"),
        (["--limit", "1001"], 2, "--limit"),
        (["--dismiss", A, "--dismiss-client", "0" * 16], 2, "not allowed"),
        (["--dismiss-client", "xyz"], 2, "client key"),
    ):
        done = await asyncio.to_thread(run_cli, "--database", url, *args)
        assert done.returncode == code and needle in done.stderr, (args, done.stderr)
    assert (
        len(json.loads((await asyncio.to_thread(run_cli, "--database", url, "--json")).stdout)) == 3
    )
    old = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{old}")
    try:
        await migrate.upgrade(engine)
        await migrate.downgrade(engine, "0002")
    finally:
        await engine.dispose()
    done = await asyncio.to_thread(run_cli, "--database", f"sqlite:///{old}")
    assert done.returncode == 1 and "duet-registry migrate" in done.stderr
    done = await asyncio.to_thread(run_cli, "--database", "mysql://127.0.0.1/x")
    assert done.returncode == 1 and "cannot read reports" in done.stderr
    empty = tmp_path / "empty.db"
    engine = make_engine(f"sqlite:///{empty}")
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()
    done = await asyncio.to_thread(run_cli, "--database", f"sqlite:///{empty}")
    assert done.returncode == 0 and "no open reports" in done.stdout


async def test_cli_dismisses_a_flood_by_client(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    engine = make_engine(url)
    try:
        await migrate.upgrade(engine)
        store = ReportStore(engine)
        for n in range(5):
            await store.add(A, "spam", f"flood {n}", "127.0.0.9", now=NOW + n)
        keep = await store.add(A, "misleading", "genuine", "127.0.0.1", now=NOW + 9)
        flood_key = await store.client_key("127.0.0.9")
    finally:
        await engine.dispose()
    listed = await asyncio.to_thread(run_cli, "--database", url)
    shown = re.findall(r"client ([0-9a-f]{16})$", listed.stdout, re.M)
    assert shown.count(flood_key[:16]) == 5
    done = await asyncio.to_thread(run_cli, "--database", url, "--dismiss-client", flood_key[:16])
    assert done.returncode == 0 and "dismissed 5 reports" in done.stdout
    left = json.loads((await asyncio.to_thread(run_cli, "--database", url, "--json")).stdout)
    assert [r["report_id"] for r in left] == [keep.report_id]


def test_reports_module_does_not_import_torch() -> None:
    code = (
        "import sys, registry_server.reports, registry_server.__main__; "
        "assert 'torch' not in sys.modules, 'torch'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
