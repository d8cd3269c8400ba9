"""The registry's JSON API over HTTP, on SQLite and PostgreSQL: listings, heartbeats, hosts,
Croissant, OpenAPI, and the attacks: forged, altered and replayed documents, other hosts'
listings, wrong bodies, bad parameters, injection-shaped queries, rate limits, errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from duet_p2p.identity import Identity
from duet_p2p.registry.canonical_json import b64url_encode, canonical_json
from duet_p2p.registry.listing import (
    CONTEXT,
    ListingSpec,
    SignedDeletion,
    SignedHeartbeat,
    SignedListing,
    signed_message,
)
from registry_server import site as site_module
from registry_server.app import (
    CONTENT_SECURITY_POLICY,
    RunningRegistry,
    create_app,
    start_registry,
)
from registry_server.keys import RegistrySettings

ROOT = Path(__file__).resolve().parents[2]
HOST = Identity.generate()
OTHER = Identity.generate()
TIMEOUT = aiohttp.ClientTimeout(total=20)
LISTING_KEYS = {
    "id", "host_id", "kind", "version", "name", "summary", "modality", "license", "keywords",
    "created_at", "updated_at", "published_at", "last_seen", "online", "rating", "signed",
}  # fmt: skip
JSON = {"Content-Type": "application/json"}
ROOMY = dict(requests_per_second=1000.0, burst=1000, writes_per_minute=60_000.0)


def make(identity: Identity = HOST, **changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Hospital admissions 2024", summary="Daily admissions by ward",
        description="# Admissions\n\nOne row per stay.", license="CC-BY-4.0",
        signaling_url="http://127.0.0.1:8765/", modality="tabular",
        keywords=["Health", "admissions"],
        schema=[{"name": "ward", "dtype": "string"}, {"name": "count", "dtype": "int64"}],
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(identity, **fields)


def signed_wire(spec: ListingSpec, identity: Identity = HOST) -> bytes:
    return spec.sign(identity).to_wire()


def raw_wire(body: dict[str, Any], signer: Identity) -> bytes:
    """A wire envelope around ``body`` signed by ``signer`` whatever the body says."""
    body_bytes = canonical_json(body)
    signature = signer.sign_bytes(signed_message(CONTEXT, hashlib.sha256(body_bytes).digest()))
    return canonical_json(
        {
            "v": 1,
            "body": body,
            "key": b64url_encode(signer.public_key),
            "sig": b64url_encode(signature),
        }
    )


@pytest.fixture
async def registry(database_url: str) -> AsyncIterator[RunningRegistry]:
    settings = RegistrySettings(database_url=database_url, **ROOMY)
    async with await start_registry(settings) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """Status, parsed JSON (or text) and the response."""
    if body is not None and headers is None:
        headers = JSON
    async with http.request(method, url, data=body, headers=headers, **kwargs) as response:
        text = await response.text()
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = text
        return response.status, data, response


async def publish(
    http: aiohttp.ClientSession, registry: RunningRegistry, wire: bytes
) -> tuple[int, Any]:
    status, data, _ = await call(http, "POST", f"{registry.url}/api/v1/listings", wire)
    return status, data


# -- the happy paths ---------------------------------------------------------------------


async def test_info(registry: RunningRegistry, http: aiohttp.ClientSession) -> None:
    status, data, response = await call(http, "GET", f"{registry.url}/api/v1")
    assert status == 200
    assert data == {"name": "OpenGrid Registry", "api": 1, "public_url": registry.url}
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "same-origin"


async def test_publish_get_edit_search(
    registry: RunningRegistry, http: aiohttp.ClientSession
) -> None:
    spec = make()
    status, data = await publish(http, registry, signed_wire(spec))
    assert status == 201
    listing = data["listing"]
    assert set(listing) == LISTING_KEYS
    assert listing["id"] == spec.listing_id and listing["host_id"] == HOST.id
    assert listing["version"] == 1 and listing["keywords"] == ["Health", "admissions"]
    assert listing["online"] is False and listing["last_seen"] is None
    assert listing["rating"] == {"count": 0, "average": None}
    assert SignedListing.from_wire(listing["signed"].encode()).spec == spec

    status, data = await publish(http, registry, signed_wire(spec))  # the same again
    assert status == 200 and data["listing"]["version"] == 1

    status, got, _ = await call(http, "GET", f"{registry.url}/api/v1/listings/{spec.listing_id}")
    assert status == 200 and got["signed"] == listing["signed"]

    edit = spec.edit(summary="Daily admissions by ward and age band")
    status, data = await publish(http, registry, signed_wire(edit))
    assert status == 200 and data["listing"]["version"] == 2
    assert data["listing"]["summary"] == edit.summary

    status, found, _ = await call(http, "GET", f"{registry.url}/api/v1/listings?q=admissions")
    assert status == 200 and found["total"] == 1
    assert [item["id"] for item in found["results"]] == [spec.listing_id]
    assert found["results"][0]["version"] == 2
    assert (found["limit"], found["offset"]) == (20, 0)

    # with a charset parameter, and filters
    status, _ = await publish(http, registry, signed_wire(make(name="Ward staffing")))
    assert status == 201
    url = f"{registry.url}/api/v1/listings"
    for query, names in (
        ("?q=ward", ["Hospital admissions 2024", "Ward staffing"]),
        ("?q=staffing&kind=dataset", ["Ward staffing"]),
        ("?kind=model", []),
        ("?keyword=health&modality=tabular&license=CC-BY-4.0&q=", None),
        ("?online=true", []),
        ("?online=0", None),
    ):
        status, found, _ = await call(http, "GET", url + query)
        assert status == 200, (query, found)
        got_names = sorted(item["name"] for item in found["results"])
        assert got_names == (names if names is not None else sorted(got_names)), query
        if names is None:
            assert found["total"] == 2


async def test_charset_content_type_accepted(
    registry: RunningRegistry, http: aiohttp.ClientSession
) -> None:
    status, _, _ = await call(
        http,
        "POST",
        f"{registry.url}/api/v1/listings",
        signed_wire(make()),
        {"Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 201


async def test_heartbeat_host_and_delete(
    registry: RunningRegistry, http: aiohttp.ClientSession
) -> None:
    spec = make()
    assert (await publish(http, registry, signed_wire(spec)))[0] == 201
    host_url = f"{registry.url}/api/v1/hosts/{HOST.id}"
    status, host, _ = await call(http, "GET", host_url)
    assert status == 200 and host["online"] is False and host["last_seen"] is None
    assert [item["id"] for item in host["listings"]] == [spec.listing_id]

    beat = SignedHeartbeat.issue(HOST, [spec.listing_id])
    beats = f"{registry.url}/api/v1/heartbeats"
    status, data, _ = await call(http, "POST", beats, beat.to_wire())
    assert status == 200 and data["host_id"] == HOST.id
    assert isinstance(data["last_seen"], float)
    status, data, _ = await call(http, "POST", beats, beat.to_wire())
    assert status == 409, data  # a replayed heartbeat
    status, host, _ = await call(http, "GET", host_url)
    assert host["online"] is True and host["listings"][0]["online"] is True
    status, found, _ = await call(http, "GET", f"{registry.url}/api/v1/listings?online=true")
    assert found["total"] == 1

    stranger = SignedHeartbeat.issue(OTHER, [])
    status, data, _ = await call(http, "POST", beats, stranger.to_wire())
    assert status == 409 and data["error"] == "conflict"  # a host with no listing here

    listing = f"{registry.url}/api/v1/listings/{spec.listing_id}"
    other = make()
    assert (await publish(http, registry, signed_wire(other)))[0] == 201
    wrong = SignedDeletion.issue(HOST, other).to_wire()
    status, data, _ = await call(http, "DELETE", listing, wrong)
    assert status == 422, data  # the body deletes another listing than the URL names
    deletion = SignedDeletion.issue(HOST, spec).to_wire()
    status, data, _ = await call(http, "DELETE", listing, deletion)
    assert status == 200 and data == {"deleted": spec.listing_id}
    status, data, _ = await call(http, "DELETE", listing, deletion)
    assert status == 200  # the same deletion again
    status, data, _ = await call(http, "GET", listing)  # gone, with the host's deletion
    assert status == 410 and data["error"] == "deleted"
    assert data["deletion"].encode() == deletion
    status, data, _ = await call(http, "GET", f"{listing}/croissant.json")
    assert status == 404 and data["error"] == "not_found"
    status, found, _ = await call(http, "GET", f"{registry.url}/api/v1/listings?q=admissions")
    assert [item["id"] for item in found["results"]] == [other.listing_id]
    status, data = await publish(http, registry, signed_wire(spec.edit(name="Back again")))
    assert status == 409  # a deleted listing stays deleted

    status, data, _ = await call(http, "GET", f"{registry.url}/api/v1/hosts/{OTHER.id}")
    assert status == 404
    status, data, _ = await call(http, "GET", f"{registry.url}/api/v1/hosts/not-a-host")
    assert status == 404 and data["error"] == "not_found"
    status, data, _ = await call(http, "GET", f"{host_url}?x=1")
    assert status == 400


async def test_croissant(registry: RunningRegistry, http: aiohttp.ClientSession) -> None:
    spec = make(description="<script>alert(1)</script> rows")
    assert (await publish(http, registry, signed_wire(spec)))[0] == 201
    url = f"{registry.url}/api/v1/listings/{spec.listing_id}/croissant.json"
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "application/ld+json"
        disposition = response.headers["Content-Disposition"]
        assert disposition == f'attachment; filename="{spec.listing_id}.croissant.json"'
        text = await response.text()
    assert "<script>" not in text  # escaped as \u003c (safe inside HTML too)
    doc = json.loads(text)
    assert doc["@type"] == "sc:Dataset" and doc["name"] == spec.name
    assert doc["url"] == f"{registry.url}/listings/{spec.listing_id}"
    assert "<script>alert(1)</script>" in doc["description"]
    status, data, _ = await call(http, "GET", f"{registry.url}/api/v1/listings/{'ab' * 16}")
    assert status == 404


async def test_pagination(registry: RunningRegistry, http: aiohttp.ClientSession) -> None:
    ids = []
    for i in range(5):
        spec = make(name=f"Survey {i}")
        assert (await publish(http, registry, signed_wire(spec)))[0] == 201
        ids.append(spec.listing_id)
    url = f"{registry.url}/api/v1/listings?q=survey"
    seen = []
    for offset in range(0, 6, 2):
        status, page, _ = await call(http, "GET", f"{url}&limit=2&offset={offset}")
        assert status == 200 and page["total"] == 5
        assert (page["limit"], page["offset"]) == (2, offset)
        assert len(page["results"]) == min(2, 5 - offset)
        seen += [item["id"] for item in page["results"]]
    assert sorted(seen) == sorted(ids)
    status, page, _ = await call(http, "GET", f"{url}&limit=100&offset=10000")
    assert status == 200 and page["results"] == [] and page["total"] == 5


# -- attacks -----------------------------------------------------------------------------


async def test_forged_and_altered_listings_refused(
    registry: RunningRegistry, http: aiohttp.ClientSession
) -> None:
    spec = make()
    good = json.loads(signed_wire(spec))
    altered = dict(good, body=dict(good["body"], name="Something else"))
    forged = dict(good, sig=b64url_encode(OTHER.sign_bytes(b"not this listing")))
    other_key = dict(good, key=b64url_encode(OTHER.public_key))
    # the body names HOST, but OTHER's key signs it (and is in the body): the key does not
    # hash to the host ID
    impostor = raw_wire(dict(spec.to_map(), host_key=b64url_encode(OTHER.public_key)), OTHER)
    # OTHER signs a listing that claims to be HOST's (HOST's key in the body)
    claimed = raw_wire(spec.to_map(), OTHER)
    for wire in (
        canonical_json(altered),
        canonical_json(forged),
        canonical_json(other_key),
        impostor,
        claimed,
        json.dumps(good, indent=1).encode(),  # not canonical
        b'{"v": 1}',
        b"[]",
    ):
        status, data = await publish(http, registry, wire)
        assert status == 422, (wire[:80], data)
        assert data["error"] == "invalid" and data["message"]
    status, found, _ = await call(http, "GET", f"{registry.url}/api/v1/listings")
    assert found["total"] == 0


async def test_replayed_and_foreign_edits_refused(
    registry: RunningRegistry, http: aiohttp.ClientSession
) -> None:
    v1 = make()
    v2 = v1.edit(name="v2")
    v3 = v2.edit(name="v3")
    assert (await publish(http, registry, signed_wire(v1)))[0] == 201
    assert (await publish(http, registry, signed_wire(v2)))[0] == 200
    for stale in (v1, v1.edit(name="another v2")):
        status, data = await publish(http, registry, signed_wire(stale))
        assert status == 409 and data["error"] == "conflict", data
    status, data = await publish(http, registry, signed_wire(v3.edit(name="v4")))
    assert status == 409  # skips a version
    # OTHER publishes a listing with HOST's listing ID: refused, and HOST's stays
    theirs = ListingSpec.new(OTHER, kind="dataset", name="Mine now", summary="", description="",
                             license="MIT", signaling_url="http://127.0.0.1:1/")  # fmt: skip
    import dataclasses

    hijack = dataclasses.replace(theirs, listing_id=v1.listing_id, version=3)
    status, data = await publish(http, registry, signed_wire(hijack, OTHER))
    assert status == 409, data
    status, got, _ = await call(http, "GET", f"{registry.url}/api/v1/listings/{v1.listing_id}")
    assert got["name"] == "v2" and got["host_id"] == HOST.id
    # a deletion signed by another identity
    fake = raw_wire(
        {"v": 1, "listing_id": v1.listing_id, "host_id": HOST.id, "version": 3, "at": 1.0},
        OTHER,
    )
    url = f"{registry.url}/api/v1/listings/{v1.listing_id}"
    status, data, _ = await call(http, "DELETE", url, fake)
    assert status == 422
    assert (await call(http, "GET", url))[0] == 200


async def test_bodies_refused(registry: RunningRegistry, http: aiohttp.ClientSession) -> None:
    url = f"{registry.url}/api/v1/listings"
    wire = signed_wire(make())
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        status, data, _ = await call(http, "POST", url, wire, {"Content-Type": content_type})
        assert status == 415 and data["error"] == "unsupported_media_type"
    status, data, _ = await call(http, "POST", url, b"{not json")
    assert status == 400 and data["error"] == "bad_json"
    huge = b'{"v": 1, "pad": "' + b"x" * (2 << 20) + b'"}'
    status, data, _ = await call(http, "POST", url, huge)
    assert status == 413 and data["error"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    status, data, _ = await call(http, "POST", url, chunks())  # type: ignore[arg-type]
    assert status == 413  # no Content-Length: capped as it arrives
    beats = f"{registry.url}/api/v1/heartbeats"
    status, data, _ = await call(http, "POST", beats, b'{"pad": "' + b"x" * 70000 + b'"}')
    assert status == 413
    status, data, _ = await call(http, "PUT", url, wire)
    assert status == 405 and data["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    "query",
    [
        "limit=0", "limit=101", "limit=-1", "limit=abc", "limit=1e3", "limit= 5", "offset=10001",
        "offset=-1", "online=yes", "online=True", "kind=table", "modality=smell", "page=2",
        "q=a&q=b", "limit=1&limit=2", "license=" + "x" * 65, "q=" + "word " * 200,
        "kind=dataset' OR '1'='1",
    ],
)  # fmt: skip
async def test_bad_search_parameters(
    registry: RunningRegistry, http: aiohttp.ClientSession, query: str
) -> None:
    status, data, _ = await call(http, "GET", f"{registry.url}/api/v1/listings?{query}")
    assert status == 400, data
    assert data["error"] == "bad_request" and data["message"]


async def test_hostile_query_text_is_harmless(
    registry: RunningRegistry, http: aiohttp.ClientSession
) -> None:
    spec = make()
    assert (await publish(http, registry, signed_wire(spec)))[0] == 201
    url = f"{registry.url}/api/v1/listings"
    for q in (
        "' OR 1=1 --", "admissions' OR '1'='1", '"unbalanced', "admi*", "NEAR(admissions ward)",
        "name:admissions", "^admissions", "admissions; DROP TABLE listings; --", "a AND b OR c",
        "{name}: x", "\\x00", "%", "_", "admissions)", "(", "-admissions", "💥",
    ):  # fmt: skip
        status, found, _ = await call(http, "GET", url, params={"q": q})
        assert status == 200, (q, found)
        assert found["total"] in (0, 1)
    for params in ({"license": "' OR 1=1 --"}, {"keyword": "%"}, {"license": "%"}):
        status, found, _ = await call(http, "GET", url, params=params)
        assert status == 200 and found["total"] == 0, params
    status, found, _ = await call(http, "GET", url, params={"q": "admissions' OR '1'='1"})
    assert found["total"] == 0  # the words "or", "1": no listing has them
    status, found, _ = await call(http, "GET", url)
    assert found["total"] == 1  # and the table is still there


async def test_unknown_routes(registry: RunningRegistry, http: aiohttp.ClientSession) -> None:
    for path in ("/api/v1/nope", "/api/v2/listings", "/api/", "/api/v1/listings/ZZ",
                 "/api/v1/listings/" + "a" * 33):  # fmt: skip
        status, data, response = await call(http, "GET", registry.url + path)
        assert status == 404, path
        assert data["error"] == "not_found" and response.content_type == "application/json"
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    status, text, response = await call(http, "GET", f"{registry.url}/no/such/<b>page</b>")
    assert status == 404 and response.content_type == "text/html"
    assert "<b>" not in text
    assert response.headers["X-Frame-Options"] == "DENY"


def test_openapi_describes_every_route(tmp_path: Path) -> None:
    from registry_server.openapi import document

    app = create_app(RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}"))
    doc = document("http://127.0.0.1:1")
    assert doc["openapi"].startswith("3.1")
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/api/v1") and route.method != "HEAD":
            routes.add((path, route.method.lower()))
    assert len(routes) >= 15
    for path, method in routes:
        assert method in doc["paths"].get(path, {}), (path, method)
    described = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert described == routes
    for name in ("Listing", "Session", "Review", "Error"):
        assert name in doc["components"]["schemas"]
    assert set(doc["components"]["schemas"]["Listing"]["required"]) == LISTING_KEYS
    json.dumps(doc)


async def test_openapi_served(registry: RunningRegistry, http: aiohttp.ClientSession) -> None:
    status, doc, _ = await call(http, "GET", f"{registry.url}/api/v1/openapi.json")
    assert status == 200 and doc["servers"] == [{"url": registry.url}]
    assert "/api/v1/listings/{id}/croissant.json" in doc["paths"]


# -- limits and errors (SQLite only: they do not depend on the database) -----------------


async def test_rate_limits(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    settings = RegistrySettings(
        database_url=f"sqlite:///{tmp_path / 'r.db'}",
        requests_per_second=0.01, burst=5, writes_per_minute=2.0,
    )  # fmt: skip
    async with await start_registry(settings) as registry:
        url = f"{registry.url}/api/v1/listings"
        assert (await publish(http, registry, signed_wire(make())))[0] == 201
        assert (await publish(http, registry, signed_wire(make())))[0] == 201
        status, data = await publish(http, registry, signed_wire(make()))
        assert status == 429 and data["error"] == "rate_limited"  # the writes' bucket
        statuses = []
        for _ in range(4):
            status, data, response = await call(http, "GET", url)
            statuses.append(status)
        assert statuses == [200, 200, 429, 429]
        assert int(response.headers["Retry-After"]) >= 1
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    exempt = RegistrySettings(
        database_url=f"sqlite:///{tmp_path / 'r.db'}", requests_per_second=0.01, burst=1,
        writes_per_minute=1.0, exempt_networks=("127.0.0.0/8",),
    )  # fmt: skip
    async with await start_registry(exempt) as registry:
        for _ in range(5):
            assert (await call(http, "GET", f"{registry.url}/api/v1"))[0] == 200


async def test_internal_errors_do_not_leak(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(
        RegistrySettings(
            database_url=f"sqlite:///{tmp_path / 'r.db'}", public_url="http://127.0.0.1:1"
        )
    )

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret-detail /etc/passwd")

    app.router.add_get("/api/v1/boom", boom)
    app.router.add_get("/boom", boom)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        status, data, _ = await call(http, "GET", f"http://127.0.0.1:{port}/api/v1/boom")
        assert status == 500 and data == {"error": "internal", "message": "internal error"}
        status, text, response = await call(http, "GET", f"http://127.0.0.1:{port}/boom")
        assert status == 500 and "secret" not in text and response.content_type == "text/html"

        def broken(*args: object) -> web.Response:
            raise RuntimeError("template trouble")

        monkeypatch.setattr(site_module, "error_page", broken)  # the bare fallback page
        status, text, response = await call(http, "GET", f"http://127.0.0.1:{port}/boom")
        assert status == 500 and "secret" not in text and "Server error" in text
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    finally:
        await runner.cleanup()


def test_settings_checked() -> None:
    for bad in (
        dict(public_url="ftp://127.0.0.1/"), dict(public_url="http://127.0.0.1/?q=1"),
        dict(public_url="http://user:pw@127.0.0.1/"), dict(requests_per_second=0),
        dict(burst=0), dict(page_size=101), dict(exempt_networks=("not a network",)),
    ):  # fmt: skip
        with pytest.raises(ValueError):
            create_app(RegistrySettings(**bad))  # type: ignore[arg-type]


async def test_concurrent_publishes(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}", **ROOMY)
    async with await start_registry(settings) as registry:
        specs = [make(name=f"Parallel {i}") for i in range(10)]
        results = await asyncio.gather(
            *(publish(http, registry, signed_wire(spec)) for spec in specs)
        )
        assert [status for status, _ in results] == [201] * 10
        status, found, _ = await call(http, "GET", f"{registry.url}/api/v1/listings?q=parallel")
        assert found["total"] == 10


def test_modules_do_not_import_torch() -> None:
    code = (
        "import sys, registry_server.app, registry_server.api, registry_server.openapi, "
        "registry_server.__main__; assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
