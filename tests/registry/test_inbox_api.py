"""The review, session and inbox API over HTTP on 127.0.0.1, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from duet_p2p.identity import Identity
from duet_p2p.registry.access import ACCESS_HEADER, SignedAccess
from duet_p2p.registry.canonical_json import b64url_encode, canonical_json
from duet_p2p.registry.listing import ListingSpec, SignedListing
from duet_p2p.registry.review import SignedReview, write_review
from duet_p2p.registry.session import (
    SignedSessionReply,
    SignedSessionRequest,
    reply_session,
    request_session,
    session_state,
)
from registry_server.app import start_registry
from registry_server.keys import RegistrySettings

HOST = Identity.generate()
OTHER_HOST = Identity.generate()
SCIENTIST = Identity.generate()
THIRD = Identity.generate()
TIMEOUT = aiohttp.ClientTimeout(total=20)


@dataclass
class Registry:
    url: str
    http: aiohttp.ClientSession

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        sent = {"Content-Type": content_type} if body is not None else {}
        async with self.http.request(
            method, self.url + path, data=body, headers={**sent, **(headers or {})}
        ) as response:
            data = await response.read()
            assert len(data) < 4 << 20
            return response.status, json.loads(data) if data else None

    def access(self, identity: Identity, purpose: str, **kw: Any) -> dict[str, str]:
        audience = kw.pop("audience", self.url)
        doc = SignedAccess.issue(identity, purpose, audience, now=kw.pop("now", None))
        return {ACCESS_HEADER: doc.header()}


@pytest.fixture
async def registry(database_url: str, registry_engine: AsyncEngine) -> AsyncIterator[Registry]:
    """A registry on 127.0.0.1 over a migrated database (SQLite and PostgreSQL)."""
    settings = RegistrySettings(
        database_url=database_url, requests_per_second=1000.0, burst=1000,
        writes_per_minute=60_000.0,
    )  # fmt: skip
    running = await start_registry(settings, engine=registry_engine)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            yield Registry(running.url, http)
    finally:
        await running.close()


async def publish(registry: Registry, identity: Identity = HOST) -> SignedListing:
    spec = ListingSpec.new(
        identity, kind="dataset", name="Admissions", summary="", description="",
        license="MIT", signaling_url="http://127.0.0.1:8765/",
    )  # fmt: skip
    signed = spec.sign(identity)
    status, data = await registry.call("POST", "/api/v1/listings", signed.to_wire())
    assert status == 201, data
    return signed


def later(hours: int) -> float:
    return (int(time.time()) // 60 + 60 * hours) * 60.0


def ask(listing: SignedListing, who: Identity = SCIENTIST) -> SignedSessionRequest:
    return request_session(who, listing, [later(24), later(48)], message="Hello", time_zone="UTC")


async def test_session_exchange(registry: Registry) -> None:
    listing = await publish(registry)
    req = ask(listing)
    status, data = await registry.call("POST", "/api/v1/sessions", req.to_wire())
    assert status == 201, data
    session = data["session"]
    assert session["status"] == "pending" and session["request"] == req.to_wire().decode()
    assert "Hello" not in json.dumps(data)

    status, data = await registry.call(
        "GET", "/api/v1/inbox", headers=registry.access(HOST, "inbox")
    )
    assert status == 200, data
    (got,) = data["results"]
    request = SignedSessionRequest.from_wire(got["request"])
    assert request.open_message(HOST) == "Hello"

    accept = reply_session(HOST, request, "accept", start=later(48), message="See you")
    path = f"/api/v1/sessions/{req.request_id}/replies"
    status, data = await registry.call("POST", path, accept.to_wire())
    assert status == 201, data
    assert (data["session"]["status"], data["session"]["start"]) == ("accepted", later(48))

    status, data = await registry.call(
        "GET", "/api/v1/sessions", headers=registry.access(SCIENTIST, "sessions")
    )
    assert status == 200, data
    (mine,) = data["results"]
    replies = [SignedSessionReply.from_wire(w) for w in mine["replies"]]
    state = session_state(SignedSessionRequest.from_wire(mine["request"]), replies)
    assert (state.status, state.start) == ("accepted", later(48))
    assert replies[0].open_message(SCIENTIST) == "See you"

    # replays are refused
    status, data = await registry.call("POST", "/api/v1/sessions", req.to_wire())
    assert (status, data["error"]) == (409, "conflict")
    status, _ = await registry.call("POST", path, accept.to_wire())
    assert status == 409


async def test_reading_other_peoples_sessions_is_impossible(registry: Registry) -> None:
    listing = await publish(registry)
    other = await publish(registry, OTHER_HOST)
    await registry.call("POST", "/api/v1/sessions", ask(listing).to_wire())
    await registry.call("POST", "/api/v1/sessions", ask(other, THIRD).to_wire())
    # another host's inbox, another scientist's sessions: each sees only its own
    status, data = await registry.call(
        "GET", "/api/v1/inbox", headers=registry.access(OTHER_HOST, "inbox")
    )
    assert status == 200 and [s["host_id"] for s in data["results"]] == [OTHER_HOST.id]
    status, data = await registry.call(
        "GET", "/api/v1/sessions", headers=registry.access(THIRD, "sessions")
    )
    assert status == 200 and [s["scientist_id"] for s in data["results"]] == [THIRD.id]
    status, data = await registry.call(
        "GET", "/api/v1/inbox", headers=registry.access(SCIENTIST, "inbox")
    )
    assert status == 200 and data["results"] == []
    # a scientist's sessions document does not open an inbox, and vice versa
    status, data = await registry.call(
        "GET", "/api/v1/inbox", headers=registry.access(HOST, "sessions")
    )
    assert (status, data["error"]) == (401, "unauthorized")
    status, _ = await registry.call(
        "GET", "/api/v1/sessions", headers=registry.access(SCIENTIST, "inbox")
    )
    assert status == 401


async def test_access_header_attacks(registry: Registry) -> None:
    status, data = await registry.call("GET", "/api/v1/inbox")
    assert status == 401 and data["error"] == "unauthorized"
    headers = registry.access(HOST, "inbox")
    status, _ = await registry.call("GET", "/api/v1/inbox", headers=headers)
    assert status == 200
    status, data = await registry.call("GET", "/api/v1/inbox", headers=headers)  # replayed
    assert status == 401 and "already used" in data["message"]
    for bad in (
        registry.access(HOST, "inbox", audience="http://127.0.0.1:1"),
        registry.access(HOST, "inbox", now=time.time() - 3600),
        registry.access(HOST, "inbox", now=time.time() + 3600),
        {ACCESS_HEADER: "garbage"},
        {ACCESS_HEADER: "A" * 5000},
    ):
        status, data = await registry.call("GET", "/api/v1/inbox", headers=bad)
        assert (status, data["error"]) == (401, "unauthorized"), data
    # a header claiming the host's ID with the scientist's key
    doc = json.loads(SignedAccess.issue(SCIENTIST, "inbox", registry.url).to_wire())
    doc["body"]["identity_id"] = HOST.id
    forged = {ACCESS_HEADER: b64url_encode(canonical_json(doc))}
    status, _ = await registry.call("GET", "/api/v1/inbox", headers=forged)
    assert status == 401


async def test_bad_session_posts(registry: Registry) -> None:
    listing = await publish(registry)
    req = ask(listing)
    status, data = await registry.call(
        "POST", "/api/v1/sessions", req.to_wire(), content_type="text/plain"
    )
    assert status == 415
    status, data = await registry.call("POST", "/api/v1/sessions", b"x" * (1 << 17))
    assert status == 413
    for body in (b"{}", b"[]", b'"x"', b"null", b'{"v":1,"body":{},"key":"","sig":""}'):
        status, data = await registry.call("POST", "/api/v1/sessions", body)
        assert (status, data["error"]) == (422, "invalid"), body
    status, data = await registry.call("POST", "/api/v1/sessions", b"not json")
    assert status == 400
    doc = json.loads(req.to_wire())
    doc["body"]["minutes"] = 30
    status, data = await registry.call("POST", "/api/v1/sessions", canonical_json(doc))
    assert status == 422 and "signature" in data["message"]
    never = ListingSpec.new(
        HOST, kind="dataset", name="Never", summary="", description="", license="MIT",
        signaling_url="http://127.0.0.1:8765/",
    ).sign(HOST)  # fmt: skip
    status, data = await registry.call("POST", "/api/v1/sessions", ask(never).to_wire())
    assert status == 404
    # a message too long never gets signed; an oversize sealed blob is refused
    doc = json.loads(req.to_wire())
    doc["body"]["sealed_message"] = "A" * 20000
    status, _ = await registry.call("POST", "/api/v1/sessions", canonical_json(doc))
    assert status == 422


async def test_bad_replies(registry: Registry) -> None:
    listing = await publish(registry)
    req = ask(listing)
    await registry.call("POST", "/api/v1/sessions", req.to_wire())
    path = f"/api/v1/sessions/{req.request_id}/replies"
    never = reply_session(HOST, req, "accept", start=later(72))
    status, data = await registry.call("POST", path, never.to_wire())
    assert status == 409 and "proposed" in data["message"]
    own = reply_session(SCIENTIST, req, "accept", start=later(24))
    status, _ = await registry.call("POST", path, own.to_wire())
    assert status == 409
    ok = reply_session(HOST, req, "decline")
    status, _ = await registry.call("POST", f"/api/v1/sessions/{'0' * 32}/replies", ok.to_wire())
    assert status == 422  # the reply names another request
    status, _ = await registry.call("POST", "/api/v1/sessions/nothex/replies", ok.to_wire())
    assert status == 404
    other = ask(listing)
    reply = reply_session(HOST, other, "decline")
    status, _ = await registry.call(
        "POST", f"/api/v1/sessions/{other.request_id}/replies", reply.to_wire()
    )
    assert status == 404  # never submitted
    doc = json.loads(ok.to_wire())
    doc["body"]["action"] = "propose"
    status, _ = await registry.call("POST", path, canonical_json(doc))
    assert status == 422
    status, data = await registry.call("POST", path, ok.to_wire())
    assert status == 201 and data["session"]["status"] == "declined"
    status, data = await registry.call(
        "POST", path, reply_session(SCIENTIST, req, "withdraw").to_wire()
    )
    assert status == 409


async def test_reviews(registry: Registry) -> None:
    listing = await publish(registry)
    lid = listing.listing_id
    path = f"/api/v1/listings/{lid}/reviews"
    xss = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    first = write_review(SCIENTIST, lid, 2, xss, now=time.time() - 10)
    status, data = await registry.call("POST", path, first.to_wire())
    assert status == 201, data
    assert data["review"]["text"] == xss  # stored as signed; the website escapes it
    status, data = await registry.call("POST", path, first.to_wire())
    assert status == 200
    newer = write_review(SCIENTIST, lid, 4, "better")
    status, data = await registry.call("POST", path, newer.to_wire())
    assert status == 200 and data["review"]["stars"] == 4
    status, data = await registry.call("POST", path, first.to_wire())
    assert status == 409  # older than the stored one
    status, data = await registry.call("POST", path, write_review(HOST, lid, 5).to_wire())
    assert status == 409 and "own listing" in data["message"]
    await registry.call("POST", path, write_review(THIRD, lid, 5).to_wire())
    status, data = await registry.call("GET", path)
    assert status == 200
    assert data["total"] == 2 and data["average"] == pytest.approx(4.5)
    assert {SignedReview.from_wire(r["signed"]).stars for r in data["results"]} == {4, 5}
    status, data = await registry.call("GET", path + "?limit=1&offset=1")
    assert status == 200 and len(data["results"]) == 1
    for query in ("?limit=x", "?offset=-1", "?limit=1&limit=2", "?limit=99999999"):
        status, data = await registry.call("GET", path + query)
        assert status == 400, query
    status, data = await registry.call("GET", f"/api/v1/listings/{lid}")
    assert status == 200 and data["rating"] == {"count": 2, "average": pytest.approx(4.5)}
    # forged, wrong listing, wrong types
    doc = json.loads(newer.to_wire())
    doc["body"]["stars"] = 1
    status, data = await registry.call("POST", path, canonical_json(doc))
    assert status == 422
    doc = json.loads(newer.to_wire())
    doc["body"]["stars"] = "5"
    status, data = await registry.call("POST", path, canonical_json(doc))
    assert status == 422
    status, _ = await registry.call("POST", f"/api/v1/listings/{'1' * 32}/reviews", newer.to_wire())
    assert status == 422
    other = write_review(THIRD, "1" * 32, 5)
    status, _ = await registry.call("POST", f"/api/v1/listings/{'1' * 32}/reviews", other.to_wire())
    assert status == 404
    status, _ = await registry.call("GET", "/api/v1/listings/NOPE/reviews")
    assert status == 404
