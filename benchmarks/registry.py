"""The registry's database: search latency with 100,000 listings, and publish throughput,
on SQLite and on PostgreSQL.

One run per database, each on a fresh database migrated by ``registry_server.migrate``
(SQLite: a file in a temporary directory; PostgreSQL: a throwaway server from Debian's
binaries, ``tests/registry/postgres_server.py``, with its default durability settings).

1. Setup: ``LISTINGS`` listings from ``HOSTS`` hosts (a third of them seen recently), text
   drawn with a fixed seed from a word list with Zipf-like frequencies (a few words are in
   a large share of the listings, most are rare), written by a bulk path (the same tables
   and full-text index as ``RegistryStore.publish``; the wire column is filler of a
   listing's size, not signed).
2. Publish: ``PUBLISH`` signed listings (signed beforehand) through
   ``RegistryStore.publish``, one after another (each verified, checked against the store
   and committed): listings per second.
3. Search: ``QUERIES`` varied queries through ``RegistryStore.search`` (one to three words,
   common to rare, some with filters, some on a later page; each is the count and the page
   of 20), after ``WARMUP`` others: p50 and p99. Baselines on the same database and the
   same queries: the unindexed scan a registry without full-text search would run (``LIKE``
   on name, summary and keywords, newest first, also counted), and the no-words newest-first
   page.

Goal: search p99 <= 50 ms on both. Then the listing page's weight on a first visit
(``benchmarks/registry_page.py``; goal <= 100 KB, nothing loaded from elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from sqlalchemy import and_, exists, func, insert, or_, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from benchmarks.registry_page import page_row, run_page_weight
from duet_p2p.identity import Identity
from duet_p2p.registry.listing import KINDS, MODALITIES, ListingSpec
from registry_server import db
from registry_server.db import listing_keywords, listings, make_engine
from registry_server.migrate import upgrade
from registry_server.store import RegistryStore

ROOT = Path(__file__).resolve().parent.parent
LISTINGS = 100_000
HOSTS = 2_000
PUBLISH = 500
QUERIES = 200
WARMUP = 30
BASELINE_QUERIES = 60
PAGE = 20
SEED = 13
GOAL_P99_MS = 50.0
NOW = 1_750_000_000.0
BATCH = 2_000
PG_DROP_INDEXES = "DROP INDEX ix_listings_search_document, ix_listings_search_facets"
PG_CREATE_INDEXES = (
    "CREATE INDEX ix_listings_search_document ON listings_search USING GIN (document)",
    "CREATE INDEX ix_listings_search_facets ON listings_search USING GIN (facets)",
)
"""The GIN indexes of migration 0001 (dropped during the bulk load, then built)."""
LICENSES = ("CC-BY-4.0", "CC0-1.0", "MIT", "Apache-2.0", "CC-BY-NC-4.0", "ODbL-1.0")

WORDS = """
health hospital admissions clinic patients ward diagnosis cancer diabetes cardiology
imaging radiology scans xray mri retina skin pathology genome genomic protein cells
climate weather rainfall temperature ocean sea ice glacier drought flood wind solar
energy grid electricity consumption household smart meter battery vehicle traffic
road bicycle transit bus train airport flight shipping port freight logistics supply
retail sales prices market stock finance bank loans credit fraud transactions payments
insurance claims tax census population survey income education school students exam
reading language speech audio music podcast text news articles tweets reviews books
legal contracts court patents emails chat dialogue translation corpus sentiment
images photos satellite aerial drone crops soil farm yield wheat maize rice livestock
forest wildlife birds species biodiversity fish marine coral pollution air quality
water rivers lakes groundwater sensors iot factory manufacturing defects machines
maintenance vibration turbine engine robot warehouse inventory orders customers churn
marketing clicks ads web sessions search queries logs security intrusion malware network
telecom mobile calls towers wifi location gps trajectories taxi rides mobility city
urban housing rent property buildings construction crime police fire emergency disaster
earthquake seismic volcano astronomy galaxies stars telescope physics particles chemistry
molecules drugs trials vaccine epidemic covid influenza mortality birth nutrition food
recipes restaurants hotels tourism travel sports football games players video frames
faces pose handwriting digits documents invoices receipts forms tables spreadsheets
graph social friends citations knowledge molecules circuits code software commits bugs
benchmark classifier regression detection segmentation embeddings transformer model
anonymized synthetic daily hourly monthly yearly regional national european african
asian american nordic alpine coastal rural metropolitan historic archive annual weekly
""".split()
ADJECTIVES = """
regional national daily hourly historic annual curated cleaned raw labelled annotated
synthetic anonymized private public open longitudinal cross sectional multilingual
""".split()


SYLLABLES = """
ka lo mi nu re sa ti vo ba de fi gu ha je ko lu ma ne po ri su ta ve wi ya zo an el in
or us ar en is on ul ber dan fel gor hin jun kel lom mar nor pel quin ros sel tor vin
""".split()


def _cumulative(count: int, exponent: float) -> list[float]:
    """Cumulative Zipf-like weights of ``count`` ranks."""
    total, out = 0.0, []
    for rank in range(count):
        total += 1.0 / (rank + 1) ** exponent
        out.append(total)
    return out


class Corpus:
    """Listing text and queries drawn with a fixed seed: topic words (``WORDS``, Zipf-like,
    the kind of word people search for) in names, summaries and keywords; descriptions
    mostly of a general vocabulary of ``GENERAL`` made-up words (Zipf, as in prose)."""

    GENERAL = 20_000

    def __init__(self, seed: int = SEED) -> None:
        self.random = random.Random(seed)
        self.words = list(dict.fromkeys(WORDS))
        self.random.shuffle(self.words)
        self.topic_weights = _cumulative(len(self.words), 0.8)
        general: dict[str, None] = {}
        while len(general) < self.GENERAL:
            parts = self.random.choices(SYLLABLES, k=self.random.randint(2, 4))
            general["".join(parts)] = None
        self.general = list(general)
        self.general_weights = _cumulative(len(self.general), 1.0)

    def topics(self, k: int) -> list[str]:
        return self.random.choices(self.words, cum_weights=self.topic_weights, k=k)

    def prose(self, k: int) -> list[str]:
        words = self.random.choices(self.general, cum_weights=self.general_weights, k=k)
        for i in range(0, k, 8):  # a topic word now and then
            words[i] = self.topics(1)[0]
        return words

    def listing(self) -> dict[str, Any]:
        r = self.random
        year = r.randint(1990, 2025)
        name = f"{r.choice(ADJECTIVES).title()} {' '.join(self.topics(r.randint(2, 3)))} {year}"
        summary = " ".join(self.topics(3) + self.prose(r.randint(6, 12))).capitalize() + "."
        paragraphs = [
            " ".join(self.prose(r.randint(30, 90))).capitalize() + "."
            for _ in range(r.randint(1, 3))
        ]
        description = f"# {name}\n\n" + "\n\n".join(paragraphs)
        keywords = list(dict.fromkeys(self.topics(r.randint(2, 6))))
        return {
            "name": name[:200], "summary": summary[:500], "description": description,
            "keywords": keywords, "kind": "model" if r.random() < 0.2 else "dataset",
            "modality": r.choices(MODALITIES, (5, 3, 3, 1, 2, 1, 1))[0],
            "license": r.choice(LICENSES),
        }  # fmt: skip

    def queries(self, count: int) -> list[dict[str, Any]]:
        """Varied searches: common, middling and rare topic words, a word of prose now and
        then, filters, later pages."""
        r = self.random
        common, middle, rare = self.words[:15], self.words[15:80], self.words[80:]
        out = []
        for _ in range(count):
            shape = r.random()
            if shape < 0.2:
                words = [r.choice(common)]
            elif shape < 0.4:
                words = [r.choice(middle)]
            elif shape < 0.5:
                words = [r.choice(rare)]
            elif shape < 0.55:
                words = [r.choice(self.general[:2000])]
            elif shape < 0.8:
                words = [r.choice(common), r.choice(middle + rare)]
            else:
                words = [r.choice(common), r.choice(middle), r.choice(middle + rare)]
            query: dict[str, Any] = {"query": " ".join(words)}
            if r.random() < 0.3:
                choice = r.randrange(5)
                if choice == 0:
                    query["kind"] = r.choice(KINDS)
                elif choice == 1:
                    query["modality"] = r.choice(MODALITIES)
                elif choice == 2:
                    query["license"] = r.choice(LICENSES)
                elif choice == 3:
                    query["keyword"] = r.choice(common + middle)
                else:
                    query["online_within"] = 600.0
            if r.random() < 0.1:
                query["offset"] = PAGE * r.randint(1, 5)
            out.append(query)
        return out


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_ms": statistics.median(ordered) * 1e3, "p99_ms": p99 * 1e3,
            "max_ms": ordered[-1] * 1e3}  # fmt: skip


# -- setup ------------------------------------------------------------------------------------


async def bulk_load(engine: AsyncEngine, corpus: Corpus, count: int) -> float:
    """Write ``count`` listings (and their index) the fast way; seconds taken."""
    started = time.perf_counter()
    r = corpus.random
    postgres = engine.dialect.name == "postgresql"
    if postgres:  # build the GIN indexes once at the end, not row by row
        async with engine.begin() as conn:
            await conn.execute(text(PG_DROP_INDEXES))
    host_ids = [os.urandom(16).hex() for _ in range(HOSTS)]
    async with engine.begin() as conn:
        await conn.execute(
            insert(db.hosts),
            [
                {
                    "host_id": h,
                    "host_key": os.urandom(32),
                    "first_seen": NOW - 86400,
                    "last_seen": NOW - (60 if i % 3 == 0 else 86400),
                }
                for i, h in enumerate(host_ids)
            ],  # fmt: skip
        )
    for start in range(0, count, BATCH):
        rows, keywords, texts = [], [], []
        for i in range(start, min(count, start + BATCH)):
            item = corpus.listing()
            listing_id = os.urandom(16).hex()
            published = NOW - (count - i) * 10.0
            wire = json.dumps({"filler": "x" * (len(item["description"]) + 900)})
            rows.append({
                "listing_id": listing_id, "host_id": host_ids[i % HOSTS], "kind": item["kind"],
                "version": 1, "name": item["name"], "summary": item["summary"],
                "modality": item["modality"], "license": item["license"],
                "keywords": json.dumps(item["keywords"]), "wire": wire,
                "created_at": published, "updated_at": published, "published_at": published,
                "deleted": r.random() < 0.02,
            })  # fmt: skip
            folded = dict.fromkeys(k.casefold() for k in item["keywords"])
            keywords += [{"listing_id": listing_id, "keyword": k} for k in folded]
            if not rows[-1]["deleted"]:
                texts.append((listing_id, {**item, "host_id": rows[-1]["host_id"]}))
        async with engine.begin() as conn:
            await conn.execute(insert(listings), rows)
            await conn.execute(insert(listing_keywords), keywords)
            await _bulk_index(conn, texts)
    if postgres:
        async with engine.begin() as conn:
            for statement in PG_CREATE_INDEXES:
                await conn.execute(text(statement))
    await _analyze(engine)
    return time.perf_counter() - started


def _facets(item: dict[str, Any]) -> str:
    return " ".join(
        db.facet_tokens(kind=item["kind"], modality=item["modality"], license=item["license"],
                        keywords=item["keywords"])
    )  # fmt: skip


async def _bulk_index(conn: Any, texts: list[tuple[str, dict[str, Any]]]) -> None:
    """What ``db.index_listing`` writes, many rows per statement."""
    if conn.dialect.name == "postgresql":
        await conn.execute(
            db._PG_INDEX,
            [
                {
                    "listing_id": listing_id,
                    "host_id": item["host_id"],
                    "name": db.search_text(item["name"]),
                    "keywords": db.search_text(" ".join(item["keywords"])),
                    "summary": db.search_text(item["summary"]),
                    "description": db.search_text(item["description"]),
                    "facets": _facets(item),
                }
                for listing_id, item in texts
            ],  # fmt: skip
        )
        return
    await conn.execute(
        text("INSERT INTO listings_search_ids (listing_id, host_id) VALUES (:listing_id, :host)"),
        [{"listing_id": listing_id, "host": item["host_id"]} for listing_id, item in texts],
    )
    await conn.execute(
        text(
            "INSERT INTO listings_fts (rowid, name, summary, description, keywords, facets) "
            "SELECT id, :name, :summary, :description, :keywords, :facets "
            "FROM listings_search_ids WHERE listing_id = :listing_id"
        ),
        [
            {
                "listing_id": listing_id,
                "name": item["name"],
                "summary": item["summary"],
                "description": item["description"],
                "keywords": " ".join(item["keywords"]),
                "facets": _facets(item),
            }
            for listing_id, item in texts
        ],  # fmt: skip
    )


async def _analyze(engine: AsyncEngine) -> None:
    """What a running database does by itself in time: statistics, index maintenance."""
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await auto.execute(text("VACUUM ANALYZE"))
        return
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO listings_fts (listings_fts) VALUES ('optimize')"))
        await conn.execute(text("ANALYZE"))


# -- measurements -----------------------------------------------------------------------------


def signed_listings(corpus: Corpus, count: int) -> list[bytes]:
    """``count`` first versions, each from one of a few identities, signed."""
    identities = [Identity.generate() for _ in range(5)]
    wires = []
    for i in range(count):
        item = corpus.listing()
        spec = ListingSpec.new(
            identities[i % len(identities)], now=NOW,
            signaling_url="https://127.0.0.1:8765/", **item,
        )  # fmt: skip
        wires.append(spec.sign(identities[i % len(identities)]).to_wire())
    return wires


async def publish_rate(store: RegistryStore, wires: list[bytes]) -> dict[str, Any]:
    started = time.perf_counter()
    for wire in wires:
        await store.publish(wire, now=NOW)
    seconds = time.perf_counter() - started
    return {"count": len(wires), "seconds": seconds, "per_s": len(wires) / seconds}


async def search_times(store: RegistryStore, queries: list[dict[str, Any]]) -> dict[str, Any]:
    times, hits = [], []
    for query in queries:
        options = dict(query)
        started = time.perf_counter()
        _, total = await store.search(options.pop("query"), now=NOW, limit=PAGE, **options)
        times.append(time.perf_counter() - started)
        hits.append(total)
    return {**_ms(times), "matches_median": statistics.median(hits),
            "matches_max": max(hits), "no_match": sum(h == 0 for h in hits)}  # fmt: skip


def _like_statement(query: dict[str, Any]) -> Any:
    """The unindexed search a registry without full-text search runs (same filters)."""
    stmt = RegistryStore._base()
    for word in db.query_words(query["query"]):
        pattern = f"%{word}%"
        stmt = stmt.where(
            or_(listings.c.name.ilike(pattern), listings.c.summary.ilike(pattern),
                listings.c.keywords.ilike(pattern))
        )  # fmt: skip
    for name in ("kind", "modality", "license"):
        if name in query:
            stmt = stmt.where(listings.c[name] == query[name])
    if "keyword" in query:
        stmt = stmt.where(
            exists().where(and_(listing_keywords.c.listing_id == listings.c.listing_id,
                                listing_keywords.c.keyword == query["keyword"]))
        )  # fmt: skip
    if "online_within" in query:
        stmt = stmt.where(db.hosts.c.last_seen >= NOW - query["online_within"])
    return stmt.order_by(listings.c.published_at.desc(), listings.c.listing_id)


async def like_times(engine: AsyncEngine, queries: list[dict[str, Any]]) -> dict[str, Any]:
    times = []
    for query in queries:
        stmt = _like_statement(query)
        counted = select(func.count()).select_from(stmt.order_by(None).subquery())
        started = time.perf_counter()
        async with engine.connect() as conn:
            (await conn.execute(counted)).scalar_one()
            (await conn.execute(stmt.limit(PAGE).offset(query.get("offset", 0)))).all()
        times.append(time.perf_counter() - started)
    return _ms(times)


async def newest_times(store: RegistryStore, rounds: int) -> dict[str, Any]:
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        await store.search("", now=NOW, limit=PAGE, offset=PAGE * (i % 5))
        times.append(time.perf_counter() - started)
    return _ms(times)


async def measure(url: str) -> dict[str, Any]:
    """Every measurement on the (empty) database at ``url``."""
    corpus = Corpus()
    engine = make_engine(url)
    try:
        await upgrade(engine)
        load_s = await bulk_load(engine, corpus, LISTINGS)
        store = RegistryStore(engine)
        publish = await publish_rate(store, signed_listings(corpus, PUBLISH))
        queries = corpus.queries(WARMUP + QUERIES)
        await search_times(store, queries[:WARMUP])
        search = await search_times(store, queries[WARMUP:])
        like = await like_times(engine, queries[WARMUP : WARMUP + BASELINE_QUERIES])
        newest = await newest_times(store, 50)
    finally:
        await engine.dispose()
    return {
        "listings": LISTINGS + PUBLISH, "load_s": load_s, "publish": publish, "search": search,
        "like_scan": like, "newest": newest,
        "ratio_like_to_search_p50": like["p50_ms"] / search["p50_ms"],
        "goal_met": search["p99_ms"] <= GOAL_P99_MS,
    }  # fmt: skip


def _postgres_helper() -> ModuleType:
    path = ROOT / "tests" / "registry" / "postgres_server.py"
    spec = importlib.util.spec_from_file_location("duet_bench_postgres_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="duet_bench_registry_") as directory:
        yield f"sqlite:///{Path(directory) / 'registry.db'}"


def run_benchmark() -> dict[str, Any]:
    result: dict[str, Any] = {
        "queries": QUERIES, "page": PAGE, "goal_p99_ms": GOAL_P99_MS,
        "load_average": {"start": os.getloadavg()},
    }  # fmt: skip
    with _sqlite_url() as url:
        print("   sqlite ...", flush=True)
        result["sqlite"] = asyncio.run(measure(url))
    helper = _postgres_helper()
    if helper.find_binaries() is None:
        result["postgresql"] = {"skipped": "no PostgreSQL binaries (Debian's postgresql)"}
    else:
        print("   postgresql ...", flush=True)
        with helper.postgres_server(durable=True) as server:
            result["postgresql"] = asyncio.run(measure(server.create_database("registry")))
    print("   listing page ...", flush=True)
    result["listing_page"] = run_page_weight()
    result["load_average"]["end"] = os.getloadavg()
    return result


# -- reporting --------------------------------------------------------------------------------


def _met(flag: Any) -> str:
    return {True: "yes", False: "**no**"}.get(flag, "—")


NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def rows(r: dict[str, Any]) -> list[list[str]]:
    """[what, duet_p2p, baseline, ratio, goal, met] per line of the table."""
    out = []
    for key, label in NAMES.items():
        d = r.get(key, {})
        if "search" not in d:
            continue
        s, like, new = d["search"], d["like_scan"], d["newest"]
        out.append([
            f"10. Registry search, {d['listings']:,} listings, {label} (p50/p99 of "
            f"{r['queries']} queries, count + page of {r['page']})",
            f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} ms",
            f"unindexed LIKE scan {like['p50_ms']:.0f} / {like['p99_ms']:.0f} ms",
            f"{d['ratio_like_to_search_p50']:.0f}x faster (p50)",
            f"p99 <= {r['goal_p99_ms']:g} ms", _met(d["goal_met"]),
        ])  # fmt: skip
        p = d["publish"]
        out.append([
            f"10. Registry publish, signed and verified, one at a time, {label} "
            f"({p['count']} into {d['listings'] - p['count']:,})",
            f"{p['per_s']:,.0f} listings/s",
            f"newest-first page, no words: {new['p50_ms']:.1f} ms p50", "—", "—", "—",
        ])  # fmt: skip
    if "total_bytes" in r.get("listing_page", {}):
        out.append(page_row(r["listing_page"]))
    return out


def markdown_section(r: dict[str, Any]) -> str:
    """The registry's section of BENCHMARKS.md."""
    title = "## Registry search and publish (benchmarks/registry.py)\n\n"
    table = rows(r)
    if not table:
        return title + "Not measured in this run.\n"
    lines = [
        "| Measurement | Registry | Baseline, same run | Ratio | Goal | Met |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in table),
    ]
    la0 = ", ".join(f"{x:.1f}" for x in r["load_average"]["start"])
    la1 = ", ".join(f"{x:.1f}" for x in r["load_average"]["end"])
    details = []
    for key, label in NAMES.items():
        d = r.get(key, {})
        if "search" not in d:
            details.append(f"{label}: {d.get('skipped', 'not measured')}.")
            continue
        s = d["search"]
        details.append(
            f"{label}: bulk load {d['load_s']:.0f} s; matches per query (counted to 1,000) "
            f"median {s['matches_median']:,.0f}, most {s['matches_max']:,}, {s['no_match']} with none; "
            f"slowest search {s['max_ms']:.1f} ms."
        )
    intro = (
        "One run of `python -m benchmarks.registry` (also part of `make bench`): "
        f"{LISTINGS:,} listings from {HOSTS:,} hosts, text drawn with a fixed seed from a word "
        "list with Zipf-like frequencies, then signed listings published through the store, "
        "then searches through `RegistryStore.search` (full-text: SQLite FTS5 with bm25, "
        "PostgreSQL tsvector + GIN with ts_rank; best match first; each search is the total "
        "count and one page). The baseline runs the same queries as unindexed `LIKE` "
        f"(name, summary, keywords only; the first {BASELINE_QUERIES}). Load average at "
        f"start {la0}, at end {la1}."
    )
    paragraphs = [intro, "\n".join(lines), " ".join(details)]
    return (
        title
        + "\n\n".join(
            p if p.startswith("|") else textwrap.fill(p, 90, break_on_hyphens=False)
            for p in paragraphs
        )
        + "\n"
    )


def main() -> int:
    from benchmarks._peers import print_standalone

    return print_standalone(run_benchmark(), rows, markdown_section)


if __name__ == "__main__":
    sys.exit(main())
