"""The registry store on SQLite and PostgreSQL: publish, edit, delete, heartbeats, search,
and attacks."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from duet_p2p.identity import Identity
from duet_p2p.registry.listing import (
    InvalidListing,
    ListingSpec,
    SignedDeletion,
    SignedHeartbeat,
    SignedListing,
)
from registry_server import db
from registry_server.db import create_schema, make_engine, query_words, search_join
from registry_server.store import Conflict, InvalidQuery, RegistryStore

ROOT = Path(__file__).resolve().parents[2]
URLS = {"sqlite": "sqlite:///registry.db", "postgresql": "postgresql://duet@127.0.0.1/registry"}
HOST = Identity.generate()
OTHER = Identity.generate()
NOW = 1_750_000_000.0


def make(identity: Identity = HOST, *, at: float = NOW, **changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Hospital admissions 2024", summary="Daily admissions by ward",
        description="# Admissions\n\nOne row per stay.", license="CC-BY-4.0",
        signaling_url="https://127.0.0.1:8765/", modality="tabular",
        keywords=["Health", "admissions"],
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(identity, now=at, **fields)


def wire(spec: ListingSpec) -> bytes:
    """The signed listing's wire form, signed by the host it names."""
    return spec.sign(HOST if spec.host_id == HOST.id else OTHER).to_wire()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[RegistryStore]:
    engine = make_engine(database_url)
    await create_schema(engine)
    await create_schema(engine)  # a second time changes nothing
    yield RegistryStore(engine)
    await engine.dispose()


async def names(store: RegistryStore, query: str, **filters: Any) -> list[str]:
    found, total = await store.search(query, now=NOW, **filters)
    assert total == len(found)
    return sorted(item.name for item in found)


# -- publish and edit ----------------------------------------------------------------


async def test_publish_then_get(store: RegistryStore) -> None:
    spec = make()
    signed = await store.publish(wire(spec), now=NOW)
    assert signed.spec == spec
    got = await store.get(spec.listing_id, now=NOW)
    assert got is not None
    assert (got.host_id, got.kind, got.version, got.name) == (HOST.id, "dataset", 1, spec.name)
    assert got.keywords == ("Health", "admissions") and got.license == "CC-BY-4.0"
    assert got.wire.encode() == wire(spec)
    assert SignedListing.from_wire(got.wire.encode()).spec == spec
    assert got.last_seen is None and not got.online
    assert await store.get("ab" * 16) is None
    assert await store.get("not an id") is None
    assert await store.get(None) is None  # type: ignore[arg-type]


async def test_edit_replaces_the_listing_and_its_index(store: RegistryStore) -> None:
    spec = make()
    await store.publish(wire(spec), now=NOW)
    edited = spec.edit(now=NOW + 10, name="Clinic visits", keywords=["clinics"])
    await store.publish(wire(edited), now=NOW + 10)
    got = await store.get(spec.listing_id, now=NOW)
    assert got is not None and got.version == 2 and got.name == "Clinic visits"
    assert await names(store, "hospital") == []
    assert await names(store, "clinic visits") == ["Clinic visits"]
    assert await names(store, "", keyword="health") == []
    assert await names(store, "", keyword="CLINICS") == ["Clinic visits"]


async def test_the_same_document_again_is_a_no_op(store: RegistryStore) -> None:
    spec = make()
    await store.publish(wire(spec), now=NOW)
    await store.publish(wire(spec), now=NOW + 1)
    assert (await store.search("", now=NOW))[1] == 1


async def test_forged_or_malformed_listings_are_refused(store: RegistryStore) -> None:
    spec = make()
    good = wire(spec)
    signed = spec.sign(HOST)
    forged = SignedListing(spec, signed.public_key, bytes(64)).to_wire()
    altered = good.replace(b"Hospital admissions", b"Hospital Admissions")
    for bad in (forged, altered, b"", b"{", b"[]", good[:-1], b" " + good, b"x" * (2 << 20)):
        with pytest.raises(InvalidListing):
            await store.publish(bad, now=NOW)
    with pytest.raises(InvalidListing):
        await store.publish("text", now=NOW)  # type: ignore[arg-type]
    assert await store.get(spec.listing_id) is None


async def test_another_hosts_edit_is_refused(store: RegistryStore) -> None:
    spec = make()
    await store.publish(wire(spec), now=NOW)
    hijack = dataclasses.replace(
        spec.edit(now=NOW + 1, name="Mine now"), host_id=OTHER.id, host_key=OTHER.public_key
    )
    for version in (1, 2):
        with pytest.raises(Conflict):
            await store.publish(wire(dataclasses.replace(hijack, version=version)), now=NOW)
    got = await store.get(spec.listing_id, now=NOW)
    assert got is not None and got.host_id == HOST.id and got.name == spec.name


async def test_old_skipped_and_new_at_version_two_are_refused(store: RegistryStore) -> None:
    spec = make()
    v2 = spec.edit(now=NOW + 1, name="Second")
    v3 = v2.edit(now=NOW + 2, name="Third")
    with pytest.raises(Conflict, match="version 1"):
        await store.publish(wire(v2), now=NOW)  # a listing new here starts at 1
    await store.publish(wire(spec), now=NOW)
    with pytest.raises(Conflict):
        await store.publish(wire(v3), now=NOW)  # skips a version
    await store.publish(wire(v2), now=NOW)
    with pytest.raises(Conflict):
        await store.publish(wire(spec), now=NOW)  # a replayed old version
    changed_kind = dataclasses.replace(v3, kind="model")
    with pytest.raises(Conflict):
        await store.publish(wire(changed_kind), now=NOW)
    got = await store.get(spec.listing_id, now=NOW)
    assert got is not None and got.name == "Second"


async def test_future_dated_listing_is_refused(store: RegistryStore) -> None:
    with pytest.raises(InvalidListing, match="future"):
        await store.publish(wire(make(at=NOW + 3600)), now=NOW)


async def test_a_host_whose_stored_key_differs_is_refused(store: RegistryStore) -> None:
    await store.publish(wire(make()), now=NOW)
    async with store._engine.begin() as conn:
        await conn.execute(
            update(db.hosts).where(db.hosts.c.host_id == HOST.id).values(host_key=bytes(32))
        )
    with pytest.raises(Conflict, match="another key"):
        await store.publish(wire(make(name="Another")), now=NOW)


async def test_listings_per_host_are_capped(database_url: str) -> None:
    engine = make_engine(database_url)
    await create_schema(engine)
    store = RegistryStore(engine, max_listings_per_host=2)
    try:
        for name in ("One", "Two"):
            await store.publish(wire(make(name=name)), now=NOW)
        with pytest.raises(Conflict, match="most allowed"):
            await store.publish(wire(make(name="Three")), now=NOW)
        await store.publish(wire(make(OTHER, name="Other's")), now=NOW)
    finally:
        await engine.dispose()


async def test_concurrent_edits_of_one_listing_keep_one(store: RegistryStore) -> None:
    spec = make()
    await store.publish(wire(spec), now=NOW)
    edits = [wire(spec.edit(now=NOW + 1, name=f"Edit {i}")) for i in range(5)]
    results = await asyncio.wait_for(
        asyncio.gather(*(store.publish(w, now=NOW + 1) for w in edits), return_exceptions=True),
        timeout=30,
    )
    assert sum(isinstance(r, SignedListing) for r in results) == 1
    assert all(isinstance(r, SignedListing | Conflict) for r in results)
    got = await store.get(spec.listing_id, now=NOW)
    assert got is not None and got.version == 2
    assert await names(store, "edit") == [got.name]


async def test_a_new_hosts_concurrent_first_listings_all_land(database_url: str) -> None:
    engine = make_engine(database_url)
    await create_schema(engine)
    store = RegistryStore(engine, max_listings_per_host=6)
    try:
        wires = [wire(make(name=f"Parallel {i}")) for i in range(8)]
        results = await asyncio.wait_for(
            asyncio.gather(*(store.publish(w, now=NOW) for w in wires), return_exceptions=True),
            timeout=30,
        )
        stored = [r for r in results if isinstance(r, SignedListing)]
        refused = [r for r in results if isinstance(r, Conflict)]
        assert (len(stored), len(refused)) == (6, 2), results  # the quota holds under races
        assert all("most allowed" in str(r) for r in refused)
        assert (await store.search("parallel", now=NOW))[1] == 6
        async with engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(db.hosts))).one() == (1,)
    finally:
        await engine.dispose()


# -- delete ------------------------------------------------------------------------------


async def test_delete_leaves_a_tombstone(store: RegistryStore) -> None:
    spec = make()
    await store.publish(wire(spec), now=NOW)
    deletion = SignedDeletion.issue(HOST, spec, at=NOW + 5)
    await store.delete(deletion.to_wire(), now=NOW + 5)
    await store.delete(deletion.to_wire(), now=NOW + 6)  # the same deletion again
    assert await store.get(spec.listing_id, now=NOW) is None
    assert await store.search("hospital", now=NOW) == ([], 0)
    assert await store.search("", now=NOW) == ([], 0)
    assert await store.search("", keyword="health", now=NOW) == ([], 0)
    for again in (spec, spec.edit(now=NOW + 9), spec.edit(now=NOW + 9).edit(now=NOW + 9)):
        with pytest.raises(Conflict, match="deleted"):
            await store.publish(wire(again), now=NOW + 10)
    other = SignedDeletion.issue(HOST, spec, at=NOW + 7)
    with pytest.raises(Conflict, match="already deleted"):
        await store.delete(other.to_wire(), now=NOW + 10)
    async with store._engine.connect() as conn:
        row = (await conn.execute(select(db.tombstones))).one()
    assert (row.listing_id, row.version, row.wire) == (
        spec.listing_id, 2, deletion.to_wire().decode(),
    )  # fmt: skip


async def test_bad_deletions_are_refused(store: RegistryStore) -> None:
    spec = make()
    await store.publish(wire(spec), now=NOW)
    with pytest.raises(Conflict, match="no listing"):
        await store.delete(SignedDeletion.issue(HOST, make(), at=NOW).to_wire(), now=NOW)
    impostor = dataclasses.replace(spec, host_id=OTHER.id, host_key=OTHER.public_key)
    with pytest.raises(Conflict):
        await store.delete(SignedDeletion.issue(OTHER, impostor, at=NOW).to_wire(), now=NOW)
    v2 = spec.edit(now=NOW + 1)
    await store.publish(wire(v2), now=NOW + 1)
    stale = SignedDeletion.issue(HOST, spec, at=NOW + 2)  # deletes version 1, not 2
    with pytest.raises(Conflict):
        await store.delete(stale.to_wire(), now=NOW + 2)
    good = SignedDeletion.issue(HOST, v2, at=NOW + 3).to_wire()
    for bad in (good.replace(b'"at":', b'"at": '), good[:-2] + b"}", b"null"):
        with pytest.raises(InvalidListing):
            await store.delete(bad, now=NOW + 3)
    with pytest.raises(InvalidListing, match="future"):
        await store.delete(SignedDeletion.issue(HOST, v2, at=NOW + 9999).to_wire(), now=NOW + 3)
    assert await store.get(spec.listing_id, now=NOW) is not None


# -- heartbeats --------------------------------------------------------------------------


async def test_heartbeat_marks_the_host_online_once(store: RegistryStore) -> None:
    spec = make()
    beat = SignedHeartbeat.issue(HOST, [spec.listing_id], at=NOW)
    with pytest.raises(Conflict, match="no listing"):
        await store.heartbeat(beat.to_wire(), NOW)  # an unknown host
    await store.publish(wire(spec), now=NOW)
    await store.heartbeat(beat.to_wire(), NOW + 1)
    got = await store.get(spec.listing_id, now=NOW + 1)
    assert got is not None and got.online and got.last_seen == NOW
    with pytest.raises(Conflict, match="already received"):
        await store.heartbeat(beat.to_wire(), NOW + 2)  # a replay within the window
    with pytest.raises(InvalidListing):
        await store.heartbeat(beat.to_wire(), NOW + 1000)  # and stale after it
    later = await store.get(spec.listing_id, now=NOW + 1000)
    assert later is not None and later.online is False
    fresh = SignedHeartbeat.issue(HOST, [], at=NOW + 1000)
    await store.heartbeat(fresh.to_wire(), NOW + 1000)
    async with store._engine.connect() as conn:
        kept = (await conn.execute(select(func.count()).select_from(db.heartbeat_nonces))).one()
    assert kept == (1,)  # the expired nonce is forgotten


async def test_bad_heartbeats_are_refused(store: RegistryStore, monkeypatch: Any) -> None:
    await store.publish(wire(make()), now=NOW)
    good = SignedHeartbeat.issue(HOST, [], at=NOW).to_wire()
    for bad in (good.replace(b'"at":', b'"at": '), good[:-1], b"{}"):
        with pytest.raises(InvalidListing):
            await store.heartbeat(bad, NOW)
    with pytest.raises(InvalidListing):
        await store.heartbeat(SignedHeartbeat.issue(HOST, [], at=NOW + 3600).to_wire(), NOW)
    with pytest.raises(ValueError):
        await store.heartbeat(good, float("nan"))
    monkeypatch.setattr("registry_server.store.MAX_NONCES_PER_HOST", 2)
    for i in range(2):
        await store.heartbeat(SignedHeartbeat.issue(HOST, [], at=NOW + i).to_wire(), NOW)
    with pytest.raises(Conflict, match="too often"):
        await store.heartbeat(SignedHeartbeat.issue(HOST, [], at=NOW + 3).to_wire(), NOW)


# -- search ------------------------------------------------------------------------------


@pytest.fixture
async def catalogue(store: RegistryStore) -> RegistryStore:
    items = [
        make(name="Hospital admissions", keywords=["health"], description="Stays near wards."),
        make(
            name="Zebra sightings",
            summary="Savanna counts",
            modality="image",
            license="MIT",
            keywords=["wildlife"],
        ),  # fmt: skip
        make(name="Hospitals of Europe", kind="model", modality="text", keywords=[]),
        make(OTHER, name="Secret ledger", description="name: private accounts", license="MIT"),
        make(OTHER, name="Café prices", summary="Crème brûlée, 2024", keywords=["Food"]),
    ]
    for i, spec in enumerate(items):
        await store.publish(wire(spec), now=NOW + i)
    await store.heartbeat(SignedHeartbeat.issue(OTHER, [], at=NOW).to_wire(), NOW)
    return store


async def test_search_words_and_filters(catalogue: RegistryStore) -> None:
    store = catalogue
    assert await names(store, "hospital") == ["Hospital admissions"]  # words, not prefixes
    assert await names(store, "HOSPITALS europe") == ["Hospitals of Europe"]
    assert await names(store, "cafe creme") == ["Café prices"]
    assert await names(store, "wildlife") == ["Zebra sightings"]  # keywords are indexed
    everything, total = await store.search("", now=NOW)
    assert total == 5
    assert [item.name for item in everything][:2] == ["Café prices", "Secret ledger"]  # newest
    assert await names(store, "", kind="model") == ["Hospitals of Europe"]
    assert await names(store, "", modality="image") == ["Zebra sightings"]
    assert await names(store, "", license="MIT") == ["Secret ledger", "Zebra sightings"]
    assert await names(store, "", keyword="FOOD") == ["Café prices"]
    assert await names(store, "", keyword="fo") == []
    assert await names(store, "", online_within=60) == ["Café prices", "Secret ledger"]
    found, _ = await store.search("secret", now=NOW)
    assert found[0].online and found[0].last_seen == NOW
    assert await names(store, "", license="MIT", kind="model") == []
    assert await names(store, "", keyword="' OR 1=1 --") == []
    assert await names(store, "", license="%") == []


async def test_best_match_first(store: RegistryStore) -> None:
    items = [
        make(name="Weather stations", summary="Hourly readings", description="Ocean buoys too."),
        make(name="Ocean temperature", summary="Sea surface", description="From satellites."),
        make(name="Harbour traffic", summary="Ocean ships by port", description="Ports."),
        make(name="Fish market", summary="Prices", keywords=["ocean", "fish"]),
    ]
    for i, spec in enumerate(items):
        await store.publish(wire(spec), now=NOW + i)
    found, total = await store.search("ocean", now=NOW)
    assert total == 4
    ranked = [item.name for item in found]
    assert ranked[0] == "Ocean temperature"  # in the name: first, though not the newest
    assert ranked[-1] == "Weather stations"  # only in the description: last
    assert set(ranked[1:3]) == {"Harbour traffic", "Fish market"}


async def test_filters_are_exact_and_not_words(catalogue: RegistryStore) -> None:
    store = catalogue
    kind_token = db.query_facets(kind="model", modality=None, license=None, keyword=None)[0]
    assert await names(store, kind_token) == []  # a filter's index word is not searchable
    assert await names(store, "hospitals", kind="model") == ["Hospitals of Europe"]
    assert await names(store, "hospital", kind="model") == []
    assert await names(store, "", license="mit") == []  # licenses are exact
    both = ["Hospital admissions", "Secret ledger"]
    assert await names(store, "", keyword="Health", kind="dataset") == both
    assert await names(store, "health", keyword="health", license="CC-BY-4.0") == both[:1]
    assert await names(store, "", modality="text", kind="model") == ["Hospitals of Europe"]
    assert await names(store, "secret", online_within=60, license="MIT") == ["Secret ledger"]
    assert await names(store, "zebra", online_within=60) == []


async def test_odd_filter_values(store: RegistryStore) -> None:
    odd = ["time-series", "a b", 'x"y', "1e5", "ÉTÉ", "c++", "東京", "-", "'", "k"]
    spec = make(modality="time-series", license="LicenseRef-a.b-c", keywords=odd)
    await store.publish(wire(spec), now=NOW)
    assert await names(store, "", modality="time-series") == [spec.name]
    assert await names(store, "", license="LicenseRef-a.b-c") == [spec.name]
    assert await names(store, "", license="LicenseRef-a.b") == []
    for keyword in odd:
        assert await names(store, "", keyword=keyword.upper()) == [spec.name], keyword
    for missing in ("time", "series", "a", "été x", "東"):
        assert await names(store, "", keyword=missing) == [], missing


async def test_broad_queries_list_newest_first(
    store: RegistryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("registry_server.store.MAX_TOTAL", 4)
    specs = [make(name=f"Survey {i}", summary="survey " * (5 - i)) for i in range(5)]
    for i, spec in enumerate(specs):
        await store.publish(wire(spec), now=NOW + i)
    found, total = await store.search("survey", now=NOW)
    assert total == 4 and [f.name for f in found] == [f"Survey {i}" for i in range(4, -1, -1)]
    page, _ = await store.search("survey", kind="dataset", limit=2, offset=2, now=NOW)
    assert [f.name for f in page] == ["Survey 2", "Survey 1"]
    assert (await store.search("survey", now=NOW))[1] == 4  # counted to the cap
    assert (await store.search("", now=NOW))[1] == 4


@pytest.mark.parametrize(
    "query",
    [
        '"',
        '"hospital',
        'hospital"',
        '""',
        "hospital*",
        "*",
        "hosp*",
        "NEAR(hospital wards)",
        "NEAR(hospital wards, 1)",
        "hospital OR zebra",
        "hospital NOT zebra",
        "name:zebra",
        "{name summary}: zebra",
        "^zebra",
        "-zebra",
        "+zebra",
        "zebra AND",
        "AND",
        "OR OR",
        "(",
        ")(",
        "'; DROP TABLE listings; --",
        "\x00zebra",
        "zebra\u200b",
        "🦓",
        "a" * 500,
        "name : private",
        "rank",
        "listings_fts",
        ":fts_query",
    ],
)
async def test_fts_syntax_is_plain_words(catalogue: RegistryStore, query: str) -> None:
    store = catalogue
    found, total = await store.search(query, now=NOW)
    plain, plain_total = await store.search(" ".join(query_words(query)), now=NOW)
    assert [item.listing_id for item in found] == [item.listing_id for item in plain]
    assert total == plain_total
    assert (await store.search("", now=NOW))[1] == 5  # nothing was harmed


async def test_syntax_does_not_work(catalogue: RegistryStore) -> None:
    store = catalogue
    assert await names(store, "hospital OR zebra") == []  # "or" is a word no listing has
    assert await names(store, "name:zebra") == []  # "name" is a word, not a column
    assert await names(store, "name: private") == ["Secret ledger"]  # both words appear
    assert await names(store, "hosp*") == []  # no prefix queries
    assert await names(store, "NEAR(wards hospital)") == ["Hospital admissions"]  # has "near"
    assert await names(store, "zebra NOT savanna") == []


async def test_bad_search_parameters(catalogue: RegistryStore) -> None:
    store = catalogue
    bad: list[tuple[Any, dict[str, Any]]] = [
        (None, {}), (b"zebra", {}), ("a" * 501, {}), (" ".join("abcdefghijklmnopq"), {}),
        ("", {"kind": "table"}), ("", {"kind": 1}), ("", {"modality": "video"}),
        ("", {"license": ""}), ("", {"license": "x" * 65}), ("", {"keyword": ["health"]}),
        ("", {"online_within": 0}), ("", {"online_within": float("nan")}),
        ("", {"online_within": "60"}), ("", {"limit": "10"}), ("", {"limit": True}),
        ("", {"offset": 1.5}), ("", {"now": float("inf")}),
    ]  # fmt: skip
    for query, options in bad:
        with pytest.raises((InvalidQuery, ValueError)):
            await store.search(query, **options)


async def test_pagination(store: RegistryStore) -> None:
    for i in range(25):
        await store.publish(wire(make(name=f"Survey {i:02}")), now=NOW + i)
    seen: list[str] = []
    for offset in (0, 10, 20):
        page, total = await store.search("survey", limit=10, offset=offset, now=NOW)
        assert total == 25
        seen += [item.name for item in page]
    assert seen == [f"Survey {i:02}" for i in range(24, -1, -1)]  # newest first, no overlap
    assert len((await store.search("", limit=1000, now=NOW))[0]) == 25
    assert len((await store.search("", limit=0, now=NOW))[0]) == 1
    assert len((await store.search("", limit=-5, now=NOW))[0]) == 1
    assert (await store.search("", offset=10**12, now=NOW)) == ([], 25)
    assert (await store.search("", offset=-3, limit=2, now=NOW))[0][0].name == "Survey 24"


async def test_search_limit_is_capped_at_one_hundred(store: RegistryStore) -> None:
    for i in range(101):
        await store.publish(wire(make(name=f"Item {i}")), now=NOW)
    page, total = await store.search("", limit=1000, now=NOW)
    assert (len(page), total) == (100, 101)


# -- the database layer ------------------------------------------------------------------


def test_query_words() -> None:
    assert query_words('  "NEAR(Café*, 3) name:x_y  café ') == [
        "near",
        "café",
        "3",
        "name",
        "x",
        "y",
    ]
    assert query_words("\"'*^-+(){}:") == []
    text_columns = "{name summary description keywords}"
    assert db.fts5_query(["a", 'b"c']) == text_columns + ' : ("a" "b""c")'
    assert db.fts5_query(["a"], ["k6d"]) == text_columns + ' : ("a") AND {facets} : ("k6d")'


def test_search_words_are_bound_parameters() -> None:
    words = ["zebra", "'; drop table listings; --", "a&b|!c:*"]
    for dialect in ("sqlite", "postgresql"):
        stmt = search_join(select(db.listings), dialect, words)
        compiled = stmt.compile(dialect=make_engine(URLS[dialect]).dialect)
        sql = str(compiled)
        assert "zebra" not in sql and "drop" not in sql and "&" not in sql
        assert any("zebra" in str(value) for value in compiled.params.values())
    with pytest.raises(ValueError):
        search_join(select(db.listings), "mysql", ["x"])


def test_search_text_folds_like_fts5() -> None:
    assert db.search_text("Crème Brûlée, CAFÉ_au-lait! ﬁsh ÅNGSTRÖM 2024") == (
        "creme brulee cafe au lait fish angstrom 2024"
    )
    assert db.search_text("'\"*^-+(){}:&|!<->") == ""


def test_only_sqlite_and_postgres() -> None:
    for url in (
        "mysql://127.0.0.1/registry", "postgresql+psycopg2://127.0.0.1/registry",
        "sqlite+pysqlite:///x.db", "oracle://127.0.0.1/x", "registry.db", "", "://",
    ):  # fmt: skip
        with pytest.raises(ValueError):
            make_engine(url)
    with pytest.raises(ValueError):
        make_engine(None)  # type: ignore[arg-type]
    for url, driver in (
        ("postgresql://duet@127.0.0.1:5432/registry", "postgresql+asyncpg"),
        ("postgres://duet@127.0.0.1/registry", "postgresql+asyncpg"),
        ("postgresql+asyncpg://duet@127.0.0.1/registry", "postgresql+asyncpg"),
        ("sqlite:///registry.db", "sqlite+aiosqlite"),
    ):
        assert make_engine(url).url.drivername == driver


async def test_writes_take_the_lock_first(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'lock.db'}")
    await create_schema(engine)
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    from sqlalchemy import event

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        store = RegistryStore(engine)
        await store.publish(wire(make()), now=NOW)
        assert "BEGIN IMMEDIATE" in seen
        seen.clear()
        await store.search("", now=NOW)
        assert "BEGIN" in seen and "BEGIN IMMEDIATE" not in seen
        async with engine.connect() as conn:
            fk = (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one()
        assert fk == 1
    finally:
        await engine.dispose()


def test_importing_the_store_does_not_import_torch() -> None:
    code = "import sys, registry_server.store; assert 'torch' not in sys.modules, 'torch'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
