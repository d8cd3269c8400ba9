"""The scientist's registry client against a registry on 127.0.0.1, honest and lying.

The honest registry is the real one (``registry_server.app.start_registry``). A lying one is
a small aiohttp app in this file serving what a real store holds, then altering answers
(``StandIn.tamper``): altered or re-signed listings, mismatched claims, oversize, non-JSON,
wrongly typed and slow answers. Nothing it alters may reach the caller as valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import duet_p2p.registry as registry
from duet_p2p.errors import DuetError
from duet_p2p.identity import Identity
from duet_p2p.registry import client as client_module
from duet_p2p.registry import results as results_module
from duet_p2p.registry.access import ACCESS_HEADER, SignedAccess
from duet_p2p.registry.client import RegistryClient, RegistryError, resolve_url, run_sync
from duet_p2p.registry.croissant import croissant_jsonld
from duet_p2p.registry.listing import InvalidListing, ListingSpec, SignedHeartbeat, SignedListing
from duet_p2p.registry.review import SignedReview, write_review
from duet_p2p.registry.session import (
    SignedSessionReply,
    SignedSessionRequest,
    check_reply,
    reply_session,
)
from duet_p2p.runtime import get_runtime
from registry_server.db import create_schema, make_engine
from registry_server.store import RegistryStore, StoredListing

ROOT = Path(__file__).resolve().parents[2]
HOST = Identity.generate()
OTHER = Identity.generate()
SCIENTIST = Identity.generate()
SIGNALING = "http://127.0.0.1:9/"


def table_spec(identity: Identity = HOST, **changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Hospital admissions 2024", summary="Daily admissions by ward",
        description="One row per stay.", license="CC-BY-4.0", signaling_url=SIGNALING,
        modality="tabular", keywords=["Health", "admissions"],
        schema=[{"name": "ward", "dtype": "category", "description": "the ward"},
                {"name": "age", "dtype": "int32"}, {"name": "cost", "dtype": "float64"},
                {"name": "urgent", "dtype": "bool"}, {"name": "day", "dtype": "date"}],
        access_modes=["live", "offline_jobs"],
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(identity, **fields)


def tensor_spec(identity: Identity = HOST, **changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="model", name="Digits classifier", summary="An MLP for 8x8 digits",
        description="", license="MIT", signaling_url=SIGNALING, modality="image",
        keywords=["digits"],
        schema=[{"name": "images", "dtype": "float32", "shape": [-1, 64]},
                {"name": "labels", "dtype": "int64", "shape": [-1]},
                {"name": "mask", "dtype": "bool", "shape": [2, 3]},
                {"name": "half", "dtype": "bfloat16", "shape": [5]}],
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(identity, **fields)


def future_minutes(*hours: int) -> list[float]:
    base = (math.floor(time.time() / 60) + 24 * 60) * 60.0
    return [base + h * 3600 for h in hours]


# -- a registry that can lie ---------------------------------------------------------------


Tamper = Callable[[web.Request, Any], Any]


class StandIn:
    """The registry API over a real RegistryStore (sessions and reviews in memory, checked
    with the same documents); ``tamper(request, data)`` may alter any JSON answer or return
    a web.StreamResponse of its own."""

    def __init__(self, store: RegistryStore) -> None:
        self.store = store
        self.url = ""
        self.tamper: Tamper | None = None
        self.closing = asyncio.Event()
        self.reviews: dict[tuple[str, str], SignedReview] = {}
        self.sessions: dict[str, tuple[SignedSessionRequest, list[SignedSessionReply]]] = {}
        app = web.Application()
        routes = [
            ("GET", "/api/v1", self.info),
            ("GET", "/api/v1/listings", self.search),
            ("POST", "/api/v1/listings", self.publish),
            ("GET", "/api/v1/listings/{id}", self.get),
            ("GET", "/api/v1/listings/{id}/croissant.json", self.croissant),
            ("POST", "/api/v1/heartbeats", self.heartbeat),
            ("POST", "/api/v1/listings/{id}/reviews", self.post_review),
            ("GET", "/api/v1/listings/{id}/reviews", self.get_reviews),
            ("POST", "/api/v1/sessions", self.post_session),
            ("POST", "/api/v1/sessions/{rid}/replies", self.post_reply),
            ("GET", "/api/v1/sessions", self.my_sessions),
            ("GET", "/api/v1/inbox", self.inbox),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, self._wrap(handler))
        self.app = app

    def _wrap(self, handler: Callable[[web.Request], Any]) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            status, data = await handler(request)
            if self.tamper is not None:
                data = self.tamper(request, data)
                if asyncio.iscoroutine(data):
                    data = await data
                if isinstance(data, web.StreamResponse):
                    return data
            return web.json_response(data, status=status)

        return wrapped

    @staticmethod
    def listing_json(stored: StoredListing) -> dict[str, Any]:
        return {
            "id": stored.listing_id, "host_id": stored.host_id, "kind": stored.kind,
            "version": stored.version, "name": stored.name, "summary": stored.summary,
            "modality": stored.modality, "license": stored.license,
            "keywords": list(stored.keywords), "created_at": stored.created_at,
            "updated_at": stored.updated_at, "published_at": stored.published_at,
            "last_seen": stored.last_seen, "online": stored.online,
            "rating": {"count": 0, "average": None}, "signed": stored.wire,
        }  # fmt: skip

    async def info(self, request: web.Request) -> tuple[int, Any]:
        return 200, {"name": "stand-in", "api": 1, "public_url": self.url}

    async def search(self, request: web.Request) -> tuple[int, Any]:
        q = request.query
        filters = {k: q[k] for k in ("kind", "modality", "license", "keyword") if k in q}
        found, total = await self.store.search(
            q.get("q", ""), **filters, limit=int(q.get("limit", "20")),
            offset=int(q.get("offset", "0")),
            online_within=600.0 if q.get("online") == "true" else None,
        )  # fmt: skip
        results = [self.listing_json(s) for s in found]
        return 200, {"total": total, "limit": len(results), "offset": 0, "results": results}

    async def publish(self, request: web.Request) -> tuple[int, Any]:
        signed = await self.store.publish(await request.read())
        stored = await self.store.get(signed.listing_id)
        assert stored is not None
        return 201, {"listing": self.listing_json(stored)}

    async def get(self, request: web.Request) -> tuple[int, Any]:
        stored = await self.store.get(request.match_info["id"])
        if stored is None:
            return 404, {"error": "not_found", "message": "no such listing"}
        return 200, self.listing_json(stored)

    async def croissant(self, request: web.Request) -> tuple[int, Any]:
        stored = await self.store.get(request.match_info["id"])
        assert stored is not None
        spec = SignedListing.from_wire(stored.wire.encode()).spec
        return 200, croissant_jsonld(spec.to_map(), url=f"{self.url}/listings/{spec.listing_id}")

    async def heartbeat(self, request: web.Request) -> tuple[int, Any]:
        await self.store.heartbeat(await request.read(), time.time())
        return 200, {"host_id": HOST.id, "last_seen": time.time()}

    async def post_review(self, request: web.Request) -> tuple[int, Any]:
        signed = SignedReview.from_wire(await request.read())
        self.reviews[(signed.listing_id, signed.reviewer_id)] = signed
        return 201, {"review": signed.to_json()}

    async def get_reviews(self, request: web.Request) -> tuple[int, Any]:
        found = [r for r in self.reviews.values() if r.listing_id == request.match_info["id"]]
        return 200, {"total": len(found), "average": None,
                     "results": [r.to_json() for r in found]}  # fmt: skip

    def session_json(self, request_id: str) -> dict[str, Any]:
        request, replies = self.sessions[request_id]
        return {
            "request_id": request_id, "listing_id": request.listing_id,
            "host_id": request.host_id, "scientist_id": request.scientist_id,
            "status": "pending", "start": None, "created_at": time.time(),
            "request": request.to_wire().decode(),
            "replies": [r.to_wire().decode() for r in replies],
        }  # fmt: skip

    async def post_session(self, request: web.Request) -> tuple[int, Any]:
        signed = SignedSessionRequest.from_wire(await request.read())
        self.sessions[signed.request_id] = (signed, [])
        return 201, {"session": self.session_json(signed.request_id)}

    async def post_reply(self, request: web.Request) -> tuple[int, Any]:
        reply = SignedSessionReply.from_wire(await request.read())
        signed, replies = self.sessions[request.match_info["rid"]]
        check_reply(signed, replies, reply)
        replies.append(reply)
        return 201, {"session": self.session_json(signed.request_id)}

    def _caller(self, request: web.Request, purpose: str) -> str:
        access = SignedAccess.from_header(request.headers[ACCESS_HEADER])
        access.verify(purpose, self.url, time.time())
        return access.identity_id

    async def my_sessions(self, request: web.Request) -> tuple[int, Any]:
        who = self._caller(request, "sessions")
        ids = [rid for rid, (r, _) in self.sessions.items() if r.scientist_id == who]
        return 200, {"results": [self.session_json(rid) for rid in reversed(ids)]}

    async def inbox(self, request: web.Request) -> tuple[int, Any]:
        who = self._caller(request, "inbox")
        ids = [rid for rid, (r, _) in self.sessions.items() if r.host_id == who]
        return 200, {"results": [self.session_json(rid) for rid in reversed(ids)]}


async def start_stand_in(path: Path) -> tuple[StandIn, web.AppRunner, Any]:
    engine = make_engine(f"sqlite:///{path}")
    await create_schema(engine)
    stand_in = StandIn(RegistryStore(engine))
    runner = web.AppRunner(stand_in.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    stand_in.url = f"http://127.0.0.1:{port}"
    return stand_in, runner, engine


@pytest.fixture
async def lying(tmp_path: Path) -> AsyncIterator[StandIn]:
    stand_in, runner, engine = await start_stand_in(tmp_path / "lying.db")
    yield stand_in
    stand_in.closing.set()
    await runner.cleanup()
    await engine.dispose()


async def start_real(path: Path) -> Any:
    from registry_server.app import start_registry
    from registry_server.keys import RegistrySettings

    settings = RegistrySettings(database_url=f"sqlite:///{path}", requests_per_second=1000.0,
                                burst=5000, writes_per_minute=6000.0)  # fmt: skip
    return await start_registry(settings)


@pytest.fixture
async def real(tmp_path: Path) -> AsyncIterator[str]:
    """The real registry app on 127.0.0.1 (a free port); its URL."""
    running = await start_real(tmp_path / "real.db")
    yield running.url
    await running.close()


@pytest.fixture(scope="module")
def sync_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real registry on duet_p2p's background loop, for the synchronous API."""
    path = tmp_path_factory.mktemp("sync") / "real.db"
    running = get_runtime().run(start_real(path), timeout=30)
    client = RegistryClient(running.url)
    run_sync(client.publish(table_spec().sign(HOST)))
    run_sync(client.publish(tensor_spec().sign(HOST)))
    run_sync(client.close())
    yield running.url
    get_runtime().run(running.close(), timeout=30)


# -- honest registry ---------------------------------------------------------------------


async def test_publish_search_get_verify(real: str) -> None:
    table, model = table_spec(), tensor_spec()
    other = table_spec(
        OTHER, name="Clinic visits", summary="Visits by day", keywords=["visits"], license="MIT"
    )
    async with RegistryClient(real + "/") as client:
        assert client.url == real  # trailing slash stripped
        info = await client.info()
        assert info["api"] == 1 and info["public_url"].startswith("http://127.0.0.1:")
        published = await client.publish(table.sign(HOST))
        assert published.spec == table and published.id == table.listing_id
        await client.publish(model.sign(HOST))
        await client.publish(other.sign(OTHER))
        assert await client.heartbeat(SignedHeartbeat.issue(HOST, [table.listing_id])) > 0

        found = await client.search("admissions")
        assert [x.id for x in found] == [table.listing_id] and found.total == 1
        assert found.dropped == 0
        listing = found[0]
        assert listing.online and listing.last_seen is not None
        assert listing.rating == {"count": 0, "average": None}
        assert listing.signed.spec == table and listing.host_key == HOST.public_key
        assert found[table.listing_id] is listing
        with pytest.raises(KeyError):
            found["0" * 32]

        models = await client.search(kind="model")
        assert [x.id for x in models] == [model.listing_id]
        online = await client.search(online=True)
        assert {x.id for x in online} == {table.listing_id, model.listing_id}  # HOST's
        everything = await client.search(limit=2)
        assert everything.total == 3 and len(everything) == 2
        second = await everything.next_page_async()
        assert len(second) == 1 and second.offset == 2
        assert {x.id for x in [*everything, *second]} == {
            table.listing_id, model.listing_id, other.listing_id}  # fmt: skip
        assert len(await second.next_page_async()) == 0
        by_keyword = await client.search(keyword="visits")
        assert [x.id for x in by_keyword] == [other.listing_id]

        got = await client.get(model.listing_id)
        assert got.spec == model and got.kind == "model" and got.online
        with pytest.raises(RegistryError) as caught:
            await client.get("ab" * 16)
        assert caught.value.status == 404 and caught.value.code


async def test_croissant_checked_against_the_signed_listing(real: str) -> None:
    spec = table_spec()
    async with RegistryClient(real) as client:
        listing = await client.publish(spec.sign(HOST))
        doc = await client.croissant(listing)
    assert doc["name"] == spec.name and doc["url"].startswith("http")
    assert doc == json.loads(json.dumps(croissant_jsonld(spec.to_map(), url=doc["url"])))


def test_results_table_text_html_pandas(sync_url: str) -> None:
    found = registry.search(registry_url=sync_url)
    assert found.total == 2 and len(found) == 2
    text = str(found)
    for column in ("#", "name", "kind", "modality", "license", "online", "rating", "id"):
        assert column in text
    assert "Hospital admissions 2024" in text and "Digits classifier" in text
    frame = found.to_pandas()
    assert list(frame.columns) == ["#", "name", "kind", "modality", "license", "online",
                                   "rating", "id"]  # fmt: skip
    assert sorted(frame["kind"]) == ["dataset", "model"]
    assert "<table>" in found._repr_html_()
    assert [x.id for x in found] == list(frame["id"])
    one = registry.get(found[0].id, registry_url=sync_url)
    assert one.spec == found[0].spec


def test_env_var_is_the_default(sync_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.DEFAULT_REGISTRY_ENV, sync_url + "/")
    assert registry.DEFAULT_REGISTRY_ENV == "DUET_REGISTRY_URL"
    assert registry.search("digits").total == 1
    monkeypatch.delenv(registry.DEFAULT_REGISTRY_ENV)
    with pytest.raises(ValueError, match="DUET_REGISTRY_URL"):
        registry.search("digits")


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1/", "javascript:alert(1)", "file:///etc/passwd", "127.0.0.1:8780",
     "http://user:pw@127.0.0.1/", "http://", "http://127.0.0.1/?q=1", "http://127.0.0.1/#x",
     "http://127.0.0.1:99999/", "http://127.0.0.1/a b", "http://127.0.0.1/\x1b[0m", " ", "http://127.0.0.1/" + "a" * 600],
)  # fmt: skip
def test_non_http_urls_refused(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        RegistryClient(url)


def test_url_normalised() -> None:
    assert resolve_url("http://127.0.0.1:8780/registry/") == "http://127.0.0.1:8780/registry"
    assert resolve_url("https://127.0.0.1") == "https://127.0.0.1"


def test_sync_api_inside_a_running_loop(sync_url: str) -> None:
    async def cell() -> Any:
        asyncio.get_running_loop()  # as in a notebook cell
        found = registry.search("digits", registry_url=sync_url, timeout=5)
        return found, found[0].mock(seed=1)

    found, mock = asyncio.run(cell())
    assert found.total == 1 and set(mock) == {"images", "labels", "mask", "half"}


async def test_async_twins(sync_url: str) -> None:
    found = await registry.search_async("admissions", registry_url=sync_url)
    assert found.total == 1
    got = await registry.get_async(found[0].id, registry_url=sync_url)
    assert got.name == "Hospital admissions 2024"


# -- a lying registry --------------------------------------------------------------------


async def publish_two(lying: StandIn) -> tuple[ListingSpec, ListingSpec]:
    table, model = table_spec(), tensor_spec()
    async with RegistryClient(lying.url) as client:
        await client.publish(table.sign(HOST))
        await client.publish(model.sign(HOST))
    return table, model


def alter_signed(item: dict[str, Any], **changes: Any) -> None:
    """Change fields of the listing inside ``item["signed"]``, keeping the signature."""
    wire = json.loads(item["signed"])
    wire["body"].update(changes)
    item["signed"] = json.dumps(wire, separators=(",", ":"), sort_keys=True)


def on_results(change: Callable[[list[dict[str, Any]]], None]) -> Tamper:
    def tamper(request: web.Request, data: Any) -> Any:
        if request.path == "/api/v1/listings" and request.method == "GET":
            change(data["results"])
        return data

    return tamper


def dataset(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The table listing's entry (the change is made there)."""
    return next(item for item in items if item["kind"] == "dataset")


def _alter_name(items: list[dict[str, Any]]) -> None:
    alter_signed(dataset(items), name="Better data")


def _resign_by_other(items: list[dict[str, Any]]) -> None:
    item = dataset(items)
    spec = SignedListing.from_wire(item["signed"].encode()).spec
    forged = SignedListing(spec, OTHER.public_key, OTHER.sign_bytes(spec.canonical_bytes()))
    item["signed"] = forged.to_wire().decode()


def _other_hosts_listing(items: list[dict[str, Any]]) -> None:
    # a valid listing of another host, presented under this listing's claims
    forged = table_spec(OTHER, name="Hospital admissions 2024").sign(OTHER)
    dataset(items)["signed"] = forged.to_wire().decode()


def _claim(name: str, value: Any, case: str) -> Any:
    def change(items: list[dict[str, Any]]) -> None:
        dataset(items)[name] = value

    return pytest.param(change, id=f"claim-{name}-{case}")


def _duplicate(items: list[dict[str, Any]]) -> None:
    items[:] = [items[0], dict(items[0])]


def _signed_missing(items: list[dict[str, Any]]) -> None:
    del dataset(items)["signed"]


def _not_an_object(items: list[dict[str, Any]]) -> None:
    items[items.index(dataset(items))] = "listing"  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "change",
    [_alter_name, _resign_by_other, _other_hosts_listing, _claim("id", "ab" * 16, "other"),
     _claim("host_id", OTHER.id, "other"), _claim("kind", "model", "other"),
     _claim("version", 2, "other"), _claim("version", 1.0, "float"),
     _claim("online", "yes", "text"), _claim("last_seen", "now", "text"),
     _claim("rating", {"count": 1, "average": 9}, "nine-stars"),
     _claim("rating", {"count": -1}, "negative"), _claim("rating", [5], "list"),
     _claim("signed", 7, "number"), _claim("signed", "x" * (2 << 20), "huge"),
     _duplicate, _signed_missing, _not_an_object],
)  # fmt: skip
async def test_a_lie_in_search_results_is_dropped(lying: StandIn, change: Any) -> None:
    table, model = await publish_two(lying)
    lying.tamper = on_results(change)
    async with RegistryClient(lying.url) as client:
        found = await client.search()
    assert len(found) == 1 and found.dropped == 1
    for listing in found:  # what is shown is exactly what a host signed
        assert listing.spec in (table, model)
        listing.signed.verify()
    assert "failed verification" in str(found)


async def test_listings_not_matching_the_filters_are_dropped(lying: StandIn) -> None:
    await publish_two(lying)

    def ignore_filters(request: web.Request, data: Any) -> Any:
        if request.path == "/api/v1/listings":
            return {"total": 2, "results": [
                StandIn.listing_json(s) for s in lying_all]}  # fmt: skip
        return data

    lying_all, _ = await lying.store.search("")
    lying.tamper = ignore_filters
    async with RegistryClient(lying.url) as client:
        for filters in ({"kind": "model"}, {"modality": "tabular"}, {"license": "MIT"},
                        {"keyword": "digits"}, {"online": True}):  # fmt: skip
            found = await client.search(**filters)
            assert found.dropped == (2 if "online" in filters else 1), filters
            assert len(found) == (0 if "online" in filters else 1)


async def test_get_refuses_a_forged_or_substituted_listing(lying: StandIn) -> None:
    table, model = await publish_two(lying)

    def swap(request: web.Request, data: Any) -> Any:
        if request.path == f"/api/v1/listings/{table.listing_id}":
            alter_signed(data, summary="altered")
        if request.path == f"/api/v1/listings/{model.listing_id}":
            stored = json.loads(json.dumps(data))
            stored["signed"] = table.sign(HOST).to_wire().decode()
            stored["id"] = table.listing_id
            return stored
        return data

    lying.tamper = swap
    async with RegistryClient(lying.url) as client:
        for listing_id in (table.listing_id, model.listing_id):
            with pytest.raises(RegistryError) as caught:
                await client.get(listing_id)
            assert caught.value.code == "forged"
        with pytest.raises(ValueError, match="hex"):
            await client.get("../etc")


async def test_croissant_altered_by_the_registry_is_refused(lying: StandIn) -> None:
    table, _ = await publish_two(lying)

    def alter(request: web.Request, data: Any) -> Any:
        if request.path.endswith("croissant.json"):
            data["license"] = "https://127.0.0.1/free-for-all"
        return data

    lying.tamper = alter
    async with RegistryClient(lying.url) as client:
        listing = await client.get(table.listing_id)
        with pytest.raises(RegistryError, match="does not match"):
            await client.croissant(listing)


async def test_publish_answer_for_another_listing_refused(lying: StandIn) -> None:
    table, model = await publish_two(lying)

    async def other_answer(request: web.Request, data: Any) -> Any:
        if request.method == "POST" and request.path == "/api/v1/listings":
            stored = await lying.store.get(model.listing_id)
            assert stored is not None
            return {"listing": StandIn.listing_json(stored)}
        return data

    lying.tamper = other_answer
    async with RegistryClient(lying.url) as client:
        with pytest.raises(RegistryError, match="other than the one published"):
            await client.publish(table.edit(summary="new").sign(HOST))


def raw(body: bytes, status: int = 200, content_type: str = "application/json") -> Tamper:
    def tamper(request: web.Request, data: Any) -> Any:
        return web.Response(body=body, status=status, content_type=content_type)

    return tamper


async def test_huge_answers_refused(lying: StandIn) -> None:
    await publish_two(lying)
    huge = b'{"total": 1, "results": [], "pad": "' + b"x" * (5 << 20) + b'"}'
    async with RegistryClient(lying.url) as client:
        lying.tamper = raw(huge)  # Content-Length says so
        with pytest.raises(RegistryError) as caught:
            await client.search()
        assert caught.value.code == "too_large"

        async def streamed(request: web.Request, data: Any) -> web.StreamResponse:
            response = web.StreamResponse()  # chunked: no length declared
            response.content_type = "application/json"
            await response.prepare(request)
            for _ in range(6 * 16):
                await response.write(b" " * (1 << 16))
            await response.write_eof()
            return response

        lying.tamper = streamed
        with pytest.raises(RegistryError) as caught:
            await client.search()
        assert caught.value.code == "too_large"
        # a smaller cap applies as given
    async with RegistryClient(lying.url, max_response_bytes=100) as small:
        lying.tamper = None
        with pytest.raises(RegistryError, match="larger than 100 bytes"):
            await small.search()


@pytest.mark.parametrize(
    "body",
    [b"<html>hello</html>", b"", b'{"total": 1, "total": 2, "results": []}',
     b'{"total": NaN, "results": []}', b'{"total": 1e999, "results": []}', b"\xff\xfe{}",
     b"[" * 100_000 + b"]" * 100_000, b'{"total": "3", "results": []}',
     b'{"total": -1, "results": []}', b'{"total": 1, "results": {}}', b"[]", b"null",
     b'{"total": true, "results": []}'],
)  # fmt: skip
async def test_malformed_answers_raise(lying: StandIn, body: bytes) -> None:
    lying.tamper = raw(body)
    async with RegistryClient(lying.url) as client:
        with pytest.raises(RegistryError) as caught:
            await client.search()
    assert caught.value.code == "malformed"


async def test_more_results_than_asked_refused(lying: StandIn) -> None:
    await publish_two(lying)

    def pad(request: web.Request, data: Any) -> Any:
        data["results"] = data["results"] * 3
        return data

    lying.tamper = pad
    async with RegistryClient(lying.url) as client:
        with pytest.raises(RegistryError, match="at most 2"):
            await client.search(limit=2)


async def test_errors_carry_code_status_and_message(lying: StandIn) -> None:
    lying.tamper = raw(b'{"error": "rate_limited", "message": "slow \\u001b[31mdown"}', 429)
    async with RegistryClient(lying.url) as client:
        with pytest.raises(RegistryError) as caught:
            await client.search()
        error = caught.value
        assert (error.code, error.status) == ("rate_limited", 429)
        assert "slow" in str(error) and "\x1b" not in str(error)
        assert isinstance(error, registry.RegistryError)

        lying.tamper = raw(b"oops", 500, "text/plain")
        with pytest.raises(RegistryError) as caught:
            await client.search()
        assert caught.value.status == 500

        def redirect(request: web.Request, data: Any) -> Any:
            raise web.HTTPFound("http://127.0.0.1:1/elsewhere")

        lying.tamper = redirect
        with pytest.raises(RegistryError) as caught:
            await client.search()
        assert caught.value.status == 302  # never followed


async def test_slow_registry_times_out(lying: StandIn) -> None:
    async def slow(request: web.Request, data: Any) -> Any:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lying.closing.wait(), 5)  # until the test ends
        return data

    lying.tamper = slow
    started = time.monotonic()
    async with RegistryClient(lying.url, timeout=0.5) as client:
        with pytest.raises(RegistryError) as caught:
            await client.search()
    assert caught.value.code == "timeout"
    assert time.monotonic() - started < 3


async def test_unreachable_registry(tmp_path: Path) -> None:
    stand_in, runner, engine = await start_stand_in(tmp_path / "gone.db")
    url = stand_in.url
    await runner.cleanup()
    await engine.dispose()
    async with RegistryClient(url, timeout=3) as client:
        with pytest.raises(RegistryError) as caught:
            await client.search()
    assert caught.value.code == "unreachable"


async def test_bad_search_parameters_refused_before_sending(lying: StandIn) -> None:
    async with RegistryClient(lying.url) as client:
        for kwargs in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"kind": "cat"},
                       {"modality": "smell"}, {"license": ""}, {"online": "yes"},
                       {"keyword": "x" * 65}, {"limit": True}):  # fmt: skip
            with pytest.raises(ValueError):
                await client.search(**kwargs)
        with pytest.raises(ValueError):
            await client.search("x" * 501)
    with pytest.raises(ValueError, match="timeout"):
        RegistryClient(lying.url, timeout=0)


# -- mock data ---------------------------------------------------------------------------


def listing_of(spec: ListingSpec, identity: Identity = HOST) -> results_module.Listing:
    return results_module.Listing(spec.sign(identity), registry_url="http://127.0.0.1:9")


def test_mock_table_is_a_dataframe_shaped_like_the_schema() -> None:
    listing = listing_of(table_spec())
    frame = listing.mock()
    assert list(frame.columns) == ["ward", "age", "cost", "urgent", "day"] and len(frame) == 20
    assert frame["age"].dtype.kind == "i" and frame["cost"].dtype.kind == "f"
    assert frame["urgent"].dtype == bool
    assert len(listing.mock(rows=3)) == 3
    assert listing.mock(seed=4).equals(listing.mock(seed=4))
    assert not listing.mock(seed=4).equals(listing.mock(seed=5))
    with pytest.raises(ValueError):
        listing.mock(rows=10**9)


def test_mock_tensors_are_torch_tensors_of_the_listed_dtypes() -> None:
    import torch

    listing = listing_of(tensor_spec())
    tensors = listing.mock(seed=2)
    assert tensors["images"].shape == (4, 64) and tensors["images"].dtype == torch.float32
    assert tensors["labels"].shape == (4,) and tensors["labels"].dtype == torch.int64
    assert tensors["mask"].dtype == torch.bool and tensors["mask"].shape == (2, 3)
    assert tensors["half"].dtype == torch.bfloat16
    batch = listing.mock(rows=32)
    assert batch["images"].shape == (32, 64) and batch["mask"].shape == (2, 3)
    assert torch.equal(listing.mock(seed=2)["images"], tensors["images"])
    with pytest.raises(ValueError, match="elements"):
        listing.mock(rows=10**6, max_elements=1000)


def test_mock_refuses_an_empty_or_mixed_schema() -> None:
    with pytest.raises(ValueError, match="describes no schema"):
        listing_of(table_spec(schema=[])).mock()
    mixed = tensor_spec(schema=[{"name": "x", "dtype": "float32", "shape": [2]},
                                {"name": "y", "dtype": "string"}])  # fmt: skip
    with pytest.raises(ValueError, match="mixes"):
        listing_of(mixed).mock()


# -- connecting --------------------------------------------------------------------------


def test_connect_calls_join_duet_with_the_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    from duet_p2p import duet

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(duet, "join_duet", lambda *a, **k: calls.append((a, k)) or "duet")
    listing = listing_of(table_spec())
    assert listing.connect() == "duet"
    assert calls[-1] == ((HOST.id,), {"signaling_url": SIGNALING, "identity": None})
    assert listing.connect(SCIENTIST, timeout=5, ice_servers=[]) == "duet"
    assert calls[-1] == ((HOST.id,), {"signaling_url": SIGNALING, "identity": SCIENTIST,
                                      "timeout": 5, "ice_servers": []})  # fmt: skip
    with pytest.raises(TypeError, match="unexpected"):
        listing.connect(signaling_url="http://127.0.0.1:1")
    offline = listing_of(table_spec(access_modes=["offline_jobs"]))
    with pytest.raises(DuetError, match="offline jobs only"):
        offline.connect()
    assert len(calls) == 2


async def test_connect_async(monkeypatch: pytest.MonkeyPatch) -> None:
    from duet_p2p import duet

    async def fake(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return args, kwargs

    monkeypatch.setattr(duet, "join_duet_async", fake)
    args, kwargs = await listing_of(table_spec()).connect_async("alice", timeout=3)
    assert args == (HOST.id,) and kwargs["identity"] == "alice" and kwargs["timeout"] == 3


def test_submit_job_pins_the_listed_host_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from duet_p2p.scientist import jobs

    seen: dict[str, Any] = {}
    monkeypatch.setattr(jobs, "submit_job", lambda host_id, fn, **o: seen.update(o, h=host_id))
    listing_of(table_spec()).submit_job(print, inputs={}, outputs=["x"], reason="r")
    assert seen["h"] == HOST.id and seen["host_key"] == HOST.public_key
    assert seen["signaling_url"] == SIGNALING
    live_only = listing_of(table_spec(access_modes=["live"]))
    with pytest.raises(DuetError, match="offline jobs"):
        live_only.submit_job(print)


# -- display -----------------------------------------------------------------------------


def test_cards_escape_what_the_owner_wrote() -> None:
    evil = "<script>alert(1)</script>"
    spec = table_spec(name=evil, summary=f'<img src=x onerror="x">{evil}',
                      schema=[{"name": evil, "dtype": "int32"}])  # fmt: skip
    listing = listing_of(spec)
    card = listing._repr_html_()
    assert "<script" not in card and "<img" not in card and "&lt;script&gt;" in card
    assert HOST.id in card and "offline" in card and spec.listing_id in card
    text = repr(listing)
    assert evil in text and "dataset" in text and "age" not in text
    page = results_module.SearchResults([listing], total=1)
    assert "<script" not in page._repr_html_()


# -- reviews and sessions ----------------------------------------------------------------


async def test_reviews_verified_and_forgeries_dropped(lying: StandIn) -> None:
    table, _ = await publish_two(lying)
    async with RegistryClient(lying.url) as client:
        listing = await client.get(table.listing_id)
    await listing.review_async(4, "useful", identity=SCIENTIST)
    await listing.review_async(5, "very useful", identity=SCIENTIST)  # replaces
    await listing.review_async(2, identity=OTHER)
    reviews = await listing.reviews_async()
    assert sorted((r.stars, r.text) for r in reviews) == [(2, ""), (5, "very useful")]
    assert "very useful" in str(reviews)

    def forge(request: web.Request, data: Any) -> Any:
        if request.path.endswith("/reviews") and request.method == "GET":
            forged = json.loads(data["results"][0]["signed"])
            forged["body"]["stars"] = 1
            data["results"][0]["signed"] = json.dumps(forged)
            other = write_review(SCIENTIST, "cd" * 16, 5).to_json()  # another listing's
            data["results"].append(other)
        return data

    lying.tamper = forge
    assert len(await listing.reviews_async()) == 1


async def test_session_request_reply_and_local_times(lying: StandIn) -> None:
    table, _ = await publish_two(lying)
    async with RegistryClient(lying.url) as client:
        listing = await client.get(table.listing_id)
    times = future_minutes(0, 2)
    session = await listing.request_session_async(times, minutes=30, message="hello owner",
                                                  identity=SCIENTIST)  # fmt: skip
    assert session.status == "pending" and session.minutes == 30
    assert session.proposed == tuple(datetime.fromtimestamp(t, UTC) for t in times)
    assert all(t.utcoffset() is not None for t in session.proposed_local)
    assert session.message is None  # sealed to the host: the scientist cannot open it

    # the host answers with other times (through its inbox)
    async with RegistryClient(lying.url) as host_client:
        inbox = await host_client.inbox(HOST)
        assert [s.request_id for s in inbox] == [session.request_id]
        assert inbox[0].message == "hello owner"
        counter = future_minutes(5)
        reply = reply_session(HOST, inbox[0].request, "propose", proposed=counter,
                              message="mornings only")  # fmt: skip
        await host_client.reply(reply)

    async with RegistryClient(lying.url) as client:
        mine = await client.sessions(SCIENTIST)
    assert [s.request_id for s in mine] == [session.request_id]
    proposed = mine[0]
    assert proposed.status == "proposed" and proposed.message == "mornings only"
    assert proposed.state.proposed == tuple(counter)
    await proposed._reply_async("accept", SCIENTIST, start=proposed._pick(None))
    assert proposed.status == "accepted"
    assert proposed.start == datetime.fromtimestamp(counter[0], UTC)
    assert proposed.start_local is not None
    assert proposed.start_local.timestamp() == counter[0]
    assert proposed.start_local.tzinfo is not None
    listed = results_module.SessionsList(mine)
    assert "accepted" in str(listed) or "proposed" in str(listed)
    assert session.request_id in str(listed)


async def test_forged_session_replies_and_claims_are_dropped(lying: StandIn) -> None:
    table, _ = await publish_two(lying)
    async with RegistryClient(lying.url) as client:
        listing = await client.get(table.listing_id)
    session = await listing.request_session_async(future_minutes(1), identity=SCIENTIST)
    first = await listing.request_session_async(future_minutes(3), identity=SCIENTIST)

    def forge(request: web.Request, data: Any) -> Any:
        if request.path == "/api/v1/sessions" and request.method == "GET":
            for item in data["results"]:
                if item["request_id"] == session.request_id:
                    # an "accept" the host never signed, signed by the registry's own key
                    accept = reply_session(HOST, session.request, "accept",
                                           start=session.state.proposed[0])  # fmt: skip
                    wire = json.loads(accept.to_wire())
                    wire["body"]["start"] = wire["body"]["start"] + 60  # altered
                    item["replies"].append(json.dumps(wire))
                    item["status"] = "accepted"
                else:
                    item["host_id"] = OTHER.id  # a claim its request does not make
        return data

    lying.tamper = forge
    async with RegistryClient(lying.url) as client:
        mine = await client.sessions(SCIENTIST)
    assert [s.request_id for s in mine] == [session.request_id]
    assert mine[0].status == "pending" and first.request_id not in str(mine)


def test_sessions_sync_api(sync_url: str) -> None:
    listing = registry.search("admissions", registry_url=sync_url)[0]
    made = listing.request_session(future_minutes(1, 2), message="hi", identity=SCIENTIST)
    listed = registry.sessions(identity=SCIENTIST, registry_url=sync_url)
    assert isinstance(listed, registry.SessionsList)
    assert listed[made.request_id].status == "pending"
    for column in ("status", "start (local)", "proposed (local)"):
        assert column in str(listed)
    assert len(listed.to_pandas()) == len(listed)
    made.withdraw(identity=SCIENTIST)
    assert made.status == "withdrawn"
    made.identity = SCIENTIST
    assert made.refresh().status == "withdrawn"


async def test_reviews_and_sessions_on_the_real_registry(real: str) -> None:
    table = table_spec()
    async with RegistryClient(real) as client:
        listing = await client.publish(table.sign(HOST))
    await listing.review_async(3, "ok", identity=SCIENTIST)
    await listing.review_async(5, "great", identity=SCIENTIST)  # replaces the first
    assert [(r.stars, r.text) for r in await listing.reviews_async()] == [(5, "great")]
    assert (await listing.refresh_async()).rating == {"count": 1, "average": 5.0}

    times = future_minutes(1, 3)
    asked = await listing.request_session_async(times, message="may I?", identity=SCIENTIST)
    async with RegistryClient(real) as host_client:
        inbox = await host_client.inbox(HOST)
        assert [s.request_id for s in inbox] == [asked.request_id]
        assert inbox[0].message == "may I?"
        await host_client.reply(
            reply_session(HOST, inbox[0].request, "accept", start=times[1], message="see you")
        )
    async with RegistryClient(real) as client:
        (mine,) = await client.sessions(SCIENTIST)
    assert mine.status == "accepted" and mine.message == "see you"
    assert mine.start == datetime.fromtimestamp(times[1], UTC)
    assert mine.start_local is not None and mine.start_local.timestamp() == times[1]
    with pytest.raises(InvalidListing, match="only a proposed session"):  # checked here
        await mine._reply_async("accept", SCIENTIST, start=times[0])
    late = reply_session(SCIENTIST, mine.request, "accept", start=times[0])
    async with RegistryClient(real) as client:
        with pytest.raises(RegistryError) as caught:  # and by the registry
            await client.reply(late)
    assert caught.value.status == 409


async def test_access_is_never_signed_for_another_registry(lying: StandIn) -> None:
    def elsewhere(request: web.Request, data: Any) -> Any:
        if request.path == "/api/v1":
            data["public_url"] = "http://127.0.0.2:8780"  # another registry
        if request.path in ("/api/v1/sessions", "/api/v1/inbox"):
            raise AssertionError("an access document was sent")
        return data

    lying.tamper = elsewhere
    async with RegistryClient(lying.url) as client:
        for read in (client.sessions(SCIENTIST), client.inbox(HOST)):
            with pytest.raises(RegistryError) as caught:
                await read
            assert caught.value.code == "wrong_audience"


# -- imports -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "absent"),
    [("import duet_p2p.registry.listing", ("torch", "aiohttp", "pandas", "duet_p2p.registry.client")),
     ("import duet_p2p.registry", ("torch", "aiohttp", "pandas")),
     ("import duet_p2p.registry as r; r.search; r.Listing; r.SearchResults; r.Session",
      ("torch", "pandas"))],
)  # fmt: skip
def test_imports_stay_light(code: str, absent: tuple[str, ...]) -> None:
    check = f"import sys; {code}; print([m for m in {absent!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lazy_exports() -> None:
    assert registry.search is client_module.search
    assert registry.Listing is results_module.Listing
    for name in registry.__all__:
        assert getattr(registry, name) is not None
    with pytest.raises(AttributeError):
        registry.nothing_here  # noqa: B018
