"""The inbox store on SQLite and PostgreSQL: sessions, replies, reviews, access, attacks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from duet_p2p.identity import Identity
from duet_p2p.registry.access import AccessDenied, SignedAccess
from duet_p2p.registry.canonical_json import canonical_json
from duet_p2p.registry.listing import InvalidListing, ListingSpec, SignedDeletion, SignedListing
from duet_p2p.registry.review import write_review
from duet_p2p.registry.session import (
    REPLY_CONTEXT,
    SessionReply,
    SignedSessionReply,
    SignedSessionRequest,
    reply_session,
    request_session,
    seal,
    session_state,
    sign_body,
)
from registry_server.db_inbox import access_nonces, session_requests
from registry_server.inbox_store import MAX_REPLIES_PER_SESSION, InboxStore, NotFound
from registry_server.store import Conflict, InvalidQuery, RegistryStore

ROOT = Path(__file__).resolve().parents[2]
HOST = Identity.generate()
OTHER_HOST = Identity.generate()
SCIENTIST = Identity.generate()
THIRD = Identity.generate()
NOW = 1_750_000_020.0
T1, T2, T3 = 1_750_003_200.0, 1_750_006_800.0, 1_750_010_400.0
URL = "http://127.0.0.1:8780"


@pytest.fixture
async def stores(registry_engine: AsyncEngine) -> AsyncIterator[tuple[RegistryStore, InboxStore]]:
    """Stores on a database migrated by ``registry_server.migrate`` (SQLite and PostgreSQL)."""
    yield RegistryStore(registry_engine), InboxStore(registry_engine, max_pending_per_scientist=3)


def make_listing(identity: Identity = HOST) -> SignedListing:
    spec = ListingSpec.new(
        identity, kind="dataset", name="Admissions", summary="", description="",
        license="MIT", signaling_url="http://127.0.0.1:8765/", now=NOW - 100,
    )  # fmt: skip
    return spec.sign(identity)


async def published(store: RegistryStore, identity: Identity = HOST) -> SignedListing:
    signed = make_listing(identity)
    await store.publish(signed.to_wire(), now=NOW - 100)
    return signed


def ask(listing: SignedListing, who: Identity = SCIENTIST, **kw: Any) -> Any:
    return request_session(
        who, listing, kw.pop("proposed", [T1, T2]), message="hi", time_zone="UTC",
        now=kw.pop("now", NOW), **kw,
    )  # fmt: skip


async def test_request_reply_inbox_and_sent(stores: tuple[RegistryStore, InboxStore]) -> None:
    store, inbox = stores
    listing = await published(store)
    req = ask(listing)
    session = await inbox.submit_request(req.to_wire(), NOW)
    assert session.status == "pending" and session.replies == ()
    assert session.to_json()["request"] == req.to_wire().decode()
    found = await inbox.inbox(HOST.id)
    assert [s.request_id for s in found] == [req.request_id]
    assert [s.request_id for s in await inbox.sent(SCIENTIST.id)] == [req.request_id]
    # isolation: nobody else sees it
    assert await inbox.inbox(SCIENTIST.id) == []
    assert await inbox.inbox(OTHER_HOST.id) == []
    assert await inbox.sent(HOST.id) == []
    assert await inbox.inbox("not an id") == []

    counter = reply_session(HOST, req, "propose", proposed=[T3], now=NOW + 10)
    after = await inbox.reply(req.request_id, counter.to_wire(), NOW + 10)
    assert after.status == "proposed" and after.start is None
    accept = reply_session(SCIENTIST, req, "accept", start=T3, message="ok", now=NOW + 20)
    after = await inbox.reply(req.request_id, accept.to_wire().decode(), NOW + 20)
    assert (after.status, after.start) == ("accepted", T3)
    (stored,) = await inbox.sent(SCIENTIST.id)
    assert stored.replies == (counter.to_wire().decode(), accept.to_wire().decode())
    assert (stored.status, stored.start) == ("accepted", T3)
    again = await inbox.session(req.request_id)
    assert again == stored
    assert await inbox.session("0" * 32) is None


async def test_request_attacks(stores: tuple[RegistryStore, InboxStore]) -> None:
    store, inbox = stores
    listing = await published(store)
    req = ask(listing)
    await inbox.submit_request(req.to_wire(), NOW)
    with pytest.raises(Conflict, match="already"):  # replayed
        await inbox.submit_request(req.to_wire(), NOW + 5)
    with pytest.raises(InvalidListing):  # stale
        await inbox.submit_request(ask(listing).to_wire(), NOW + 301)
    with pytest.raises(InvalidListing):  # from the future
        await inbox.submit_request(ask(listing, now=NOW + 400).to_wire(), NOW)
    with pytest.raises(NotFound):  # unknown listing
        await inbox.submit_request(ask(make_listing()).to_wire(), NOW)
    # a listing of another host, the request naming the wrong host: forged by re-signing
    other = await published(store, OTHER_HOST)
    doc = json.loads(ask(other).to_wire())
    doc["body"]["listing_id"] = listing.listing_id
    with pytest.raises(InvalidListing):
        await inbox.submit_request(canonical_json(doc), NOW)
    with pytest.raises(InvalidListing):
        await inbox.submit_request(b"{}", NOW)
    with pytest.raises(InvalidListing):
        await inbox.submit_request(b"x" * (1 << 20), NOW)


async def test_request_for_listing_whose_host_differs(
    stores: tuple[RegistryStore, InboxStore],
) -> None:
    store, inbox = stores
    listing = await published(store)
    # a listing spec with the same id but another host, never published: the stored one wins
    spec = ListingSpec(
        **{**vars_of(make_listing(OTHER_HOST).spec), "listing_id": listing.listing_id}
    )
    with pytest.raises(Conflict, match="not host"):
        await inbox.submit_request(ask(spec.sign(OTHER_HOST)).to_wire(), NOW)


def vars_of(spec: ListingSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


async def test_deleted_listing_takes_no_requests(stores: tuple[RegistryStore, InboxStore]) -> None:
    store, inbox = stores
    listing = await published(store)
    await store.delete(SignedDeletion.issue(HOST, listing, at=NOW - 50).to_wire(), now=NOW - 50)
    with pytest.raises(NotFound):
        await inbox.submit_request(ask(listing).to_wire(), NOW)
    with pytest.raises(NotFound):
        await inbox.add_review(
            listing.listing_id,
            write_review(SCIENTIST, listing.listing_id, 5, now=NOW).to_wire(),
            NOW,
        )


async def test_pending_cap_per_scientist(stores: tuple[RegistryStore, InboxStore]) -> None:
    store, inbox = stores
    listing = await published(store)
    first = ask(listing)
    await inbox.submit_request(first.to_wire(), NOW)
    for _ in range(2):
        await inbox.submit_request(ask(listing).to_wire(), NOW)
    with pytest.raises(Conflict, match="open session"):
        await inbox.submit_request(ask(listing).to_wire(), NOW)
    # a closed session frees a place
    await inbox.reply(
        first.request_id,
        reply_session(SCIENTIST, first, "withdraw", now=NOW + 1).to_wire(),
        NOW + 1,
    )
    await inbox.submit_request(ask(listing).to_wire(), NOW + 2)


async def test_host_inbox_cap(registry_engine: AsyncEngine) -> None:
    store = RegistryStore(registry_engine)
    inbox = InboxStore(registry_engine, max_requests_per_host=2)
    listing = await published(store)
    for who in (SCIENTIST, THIRD):
        await inbox.submit_request(ask(listing, who).to_wire(), NOW)
    with pytest.raises(Conflict, match="full"):
        await inbox.submit_request(ask(listing, Identity.generate()).to_wire(), NOW)


async def test_reply_attacks(stores: tuple[RegistryStore, InboxStore]) -> None:
    store, inbox = stores
    listing = await published(store)
    req = ask(listing)
    await inbox.submit_request(req.to_wire(), NOW)
    other = ask(listing)
    await inbox.submit_request(other.to_wire(), NOW)
    accept = reply_session(HOST, req, "accept", start=T1, now=NOW + 10)
    with pytest.raises(InvalidListing, match="another"):  # posted under another session
        await inbox.reply(other.request_id, accept.to_wire(), NOW + 10)
    with pytest.raises(NotFound):
        unknown = ask(listing)
        await inbox.reply(
            unknown.request_id, reply_session(HOST, unknown, "decline", now=NOW).to_wire(), NOW
        )
    never = reply_session(HOST, req, "accept", start=T3, now=NOW + 10)
    with pytest.raises(Conflict, match="proposed"):
        await inbox.reply(req.request_id, never.to_wire(), NOW + 10)
    with pytest.raises(Conflict):  # the scientist accepting its own times
        await inbox.reply(
            req.request_id,
            reply_session(SCIENTIST, req, "accept", start=T1, now=NOW).to_wire(),
            NOW,
        )
    with pytest.raises(InvalidListing):  # stale
        await inbox.reply(req.request_id, accept.to_wire(), NOW + 400)
    late = InboxStore(inbox.engine, max_skew=1e9)
    with pytest.raises(Conflict, match="passed"):  # accepting a time gone by
        await late.reply(req.request_id, accept.to_wire(), T1 + 60)
    await inbox.reply(req.request_id, accept.to_wire(), NOW + 10)
    with pytest.raises(Conflict, match="already"):  # replayed
        await inbox.reply(req.request_id, accept.to_wire(), NOW + 11)
    forged = json.loads(accept.to_wire())
    forged["body"]["start"] = T2
    with pytest.raises(InvalidListing, match="signature"):
        await inbox.reply(req.request_id, canonical_json(forged), NOW + 12)
    state = await inbox.session(req.request_id)
    assert state is not None and (state.status, state.start) == ("accepted", T1)
    assert len(state.replies) == 1


async def test_third_party_reply_refused(stores: tuple[RegistryStore, InboxStore]) -> None:
    store, inbox = stores
    listing = await published(store)
    req = ask(listing)
    await inbox.submit_request(req.to_wire(), NOW)
    reply = SessionReply(
        reply_id="ab" * 16, request_id=req.request_id, author_id=THIRD.id,
        author_key=THIRD.public_key, action="decline", start=None, proposed=(),
        sealed_message=seal("", HOST.public_key), at=NOW + 5,
    )  # fmt: skip
    signed = SignedSessionReply(
        reply, THIRD.public_key, sign_body(THIRD, REPLY_CONTEXT, reply.body_bytes())
    )
    with pytest.raises(InvalidListing, match="not a party"):
        await inbox.reply(req.request_id, signed.to_wire(), NOW + 5)
    stored = await inbox.session(req.request_id)
    assert stored is not None and stored.status == "pending"


async def test_reply_cap_and_final_state(stores: tuple[RegistryStore, InboxStore]) -> None:
    store, inbox = stores
    listing = await published(store)
    req = ask(listing)
    await inbox.submit_request(req.to_wire(), NOW)
    for i in range(MAX_REPLIES_PER_SESSION):
        counter = reply_session(HOST, req, "propose", proposed=[T1 + 60 * i], now=NOW + i)
        await inbox.reply(req.request_id, counter.to_wire(), NOW + i)
    with pytest.raises(Conflict, match="at most"):
        await inbox.reply(
            req.request_id, reply_session(HOST, req, "decline", now=NOW + 20).to_wire(), NOW + 20
        )
    second = ask(listing)
    await inbox.submit_request(second.to_wire(), NOW)
    await inbox.reply(
        second.request_id, reply_session(HOST, second, "decline", now=NOW).to_wire(), NOW
    )
    with pytest.raises(Conflict, match="declined"):
        await inbox.reply(
            second.request_id,
            reply_session(SCIENTIST, second, "withdraw", now=NOW).to_wire(),
            NOW,
        )


async def test_concurrent_replies_one_wins(stores: tuple[RegistryStore, InboxStore]) -> None:
    store, inbox = stores
    listing = await published(store)
    req = ask(listing)
    await inbox.submit_request(req.to_wire(), NOW)
    accept = reply_session(HOST, req, "accept", start=T1, now=NOW + 1)
    withdraw = reply_session(SCIENTIST, req, "withdraw", now=NOW + 1)
    decline = reply_session(HOST, req, "decline", now=NOW + 1)
    results = await asyncio.wait_for(
        asyncio.gather(
            *(
                inbox.reply(req.request_id, r.to_wire(), NOW + 1)
                for r in (accept, withdraw, decline)
            ),
            return_exceptions=True,
        ),
        timeout=30,
    )
    stored = await inbox.session(req.request_id)
    assert stored is not None
    # whatever the order, the stored history is a valid exchange and matches the status
    replies = [SignedSessionReply.from_wire(w) for w in stored.replies]
    state = session_state(SignedSessionRequest.from_wire(stored.request), replies, strict=True)
    assert state.status == stored.status
    taken = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))
    assert len(taken) == len(stored.replies) >= 1


async def test_reviews(stores: tuple[RegistryStore, InboxStore]) -> None:
    store, inbox = stores
    listing = await published(store)
    lid = listing.listing_id
    xss = "<script>alert(1)</script>"
    review, created = await inbox.add_review(
        lid, write_review(SCIENTIST, lid, 2, xss, now=NOW).to_wire(), NOW
    )
    assert created and review.text == xss
    same = write_review(SCIENTIST, lid, 3, xss, now=NOW).to_wire()  # same time
    with pytest.raises(Conflict, match="newer"):  # another review, not newer
        await inbox.add_review(lid, same, NOW)
    assert (await inbox.add_review(lid, review.to_wire(), NOW))[1] is False  # resend: no-op
    newer, created = await inbox.add_review(
        lid, write_review(SCIENTIST, lid, 4, "better", now=NOW + 5).to_wire(), NOW + 5
    )
    assert not created
    await inbox.add_review(lid, write_review(THIRD, lid, 5, now=NOW + 6).to_wire(), NOW + 6)
    found, total, average = await inbox.reviews(lid)
    assert total == 2 and average == pytest.approx(4.5)
    assert [r.reviewer_id for r in found] == [THIRD.id, SCIENTIST.id]
    assert found[1].text == "better"
    page, total, _ = await inbox.reviews(lid, limit=1, offset=1)
    assert total == 2 and [r.reviewer_id for r in page] == [SCIENTIST.id]
    older = write_review(SCIENTIST, lid, 1, now=NOW + 1).to_wire()
    with pytest.raises(Conflict):
        await inbox.add_review(lid, older, NOW + 7)
    with pytest.raises(Conflict, match="own listing"):
        await inbox.add_review(lid, write_review(HOST, lid, 5, now=NOW).to_wire(), NOW)
    with pytest.raises(InvalidListing, match="another listing"):
        await inbox.add_review("0" * 32, newer.to_wire(), NOW)
    with pytest.raises(InvalidListing, match="future"):
        await inbox.add_review(lid, write_review(THIRD, lid, 5, now=NOW + 999).to_wire(), NOW)
    with pytest.raises(NotFound):
        await inbox.add_review("1" * 32, write_review(THIRD, "1" * 32, 5, now=NOW).to_wire(), NOW)
    rating = await inbox.rating([lid, "1" * 32, "junk"])
    assert rating == {lid: (2, pytest.approx(4.5)), "1" * 32: (0, None)}
    with pytest.raises(InvalidQuery):
        await inbox.rating([f"{i:032x}" for i in range(1001)])
    with pytest.raises(InvalidQuery):
        await inbox.reviews(lid, limit="10")  # type: ignore[arg-type]
    assert await inbox.reviews("nope") == ([], 0, None)


async def test_review_cap(registry_engine: AsyncEngine) -> None:
    store = RegistryStore(registry_engine)
    inbox = InboxStore(registry_engine, max_reviews_per_listing=1)
    lid = (await published(store)).listing_id
    await inbox.add_review(lid, write_review(SCIENTIST, lid, 3, now=NOW).to_wire(), NOW)
    with pytest.raises(Conflict, match="most"):
        await inbox.add_review(lid, write_review(THIRD, lid, 3, now=NOW).to_wire(), NOW)


async def test_access(stores: tuple[RegistryStore, InboxStore]) -> None:
    _, inbox = stores
    doc = SignedAccess.issue(HOST, "inbox", URL, now=NOW)
    assert await inbox.check_access(doc.header(), "inbox", URL + "/", NOW + 1) == HOST.id
    with pytest.raises(AccessDenied, match="already used"):
        await inbox.check_access(doc.header(), "inbox", URL, NOW + 2)
    fresh = SignedAccess.issue(HOST, "inbox", URL, now=NOW)
    with pytest.raises(AccessDenied):  # another purpose
        await inbox.check_access(fresh.header(), "sessions", URL, NOW)
    with pytest.raises(AccessDenied):  # another registry
        await inbox.check_access(fresh.header(), "inbox", "http://127.0.0.1:1", NOW)
    with pytest.raises(AccessDenied):  # stale
        await inbox.check_access(fresh.header(), "inbox", URL, NOW + 301)
    for bad in (None, "", "x" * 5000, 7):
        with pytest.raises(AccessDenied):
            await inbox.check_access(bad, "inbox", URL, NOW)
    # expired nonces are forgotten (the document is refused as stale anyway)
    later = SignedAccess.issue(HOST, "inbox", URL, now=NOW + 1000)
    await inbox.check_access(later.header(), "inbox", URL, NOW + 1000)
    async with inbox.engine.connect() as conn:
        rows = (await conn.execute(select(access_nonces.c.nonce))).all()
    assert [r.nonce for r in rows] == [later.nonce.hex()]


async def test_stored_status_is_not_trusted_by_clients(
    stores: tuple[RegistryStore, InboxStore],
) -> None:
    """A registry that lies about status cannot change what a client computes."""
    store, inbox = stores
    listing = await published(store)
    req = ask(listing)
    await inbox.submit_request(req.to_wire(), NOW)
    async with inbox.engine.begin() as conn:
        await conn.execute(update(session_requests).values(status="accepted", start=T1))
    (stored,) = await inbox.inbox(HOST.id)
    assert stored.status == "accepted"
    assert session_state(SignedSessionRequest.from_wire(stored.request), []).status == "pending"


def test_store_does_not_load_torch() -> None:
    code = (
        "import sys, registry_server.inbox_store, registry_server.api_inbox, "
        "registry_server.db_inbox; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
