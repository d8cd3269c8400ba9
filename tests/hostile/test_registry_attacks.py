"""Attacks on the OpenGrid registry from every side: a hostile owner whose listing text
reaches the scientist's Python prompt through the website's copy-paste snippet, a hostile
registry whose signed-but-absurd dates must not break the host's inbox loop or the
scientist's cards, spammers who fill a host's inbox for good, and listings whose words
(approval policy, where to connect) must read as the owner's."""

from __future__ import annotations

import ast
import asyncio
import html
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from duet_p2p.identity import Identity
from duet_p2p.registry.listing import ListingSpec, SignedListing
from duet_p2p.registry.results import Listing, Session, format_local
from duet_p2p.registry.session import MAX_AHEAD_SECONDS, MAX_TIME, reply_session, request_session
from registry_server.app import RunningRegistry, start_registry
from registry_server.inbox_store import InboxStore
from registry_server.keys import RegistrySettings
from registry_server.store import Conflict

HOST = Identity.generate()
JSON = {"Content-Type": "application/json"}
TIMEOUT = aiohttp.ClientTimeout(total=20)
CODE = re.compile(r"<pre><code>(.*?)</code></pre>", re.S)
# Printable, at most 64 characters: a valid tag that closes the snippet's string literal.
EVIL_TAG = 'x"]; __import__("os").system("id") #'


def make(identity: Identity = HOST, **changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Ward counts", summary="Daily admissions", description="Rows.",
        license="MIT", signaling_url="http://127.0.0.1:9/", modality="tabular",
        keywords=["health"], schema=[{"name": "ward", "dtype": "string"}],
        access_modes=["live", "offline_jobs"],
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(identity, **fields)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    settings = RegistrySettings(
        database_url=f"sqlite:///{tmp_path / 'registry.db'}", requests_per_second=1000.0,
        burst=1000, writes_per_minute=60_000.0,
    )  # fmt: skip
    running = await asyncio.wait_for(start_registry(settings), 30)
    try:
        yield running
    finally:
        await asyncio.wait_for(running.close(), 30)


async def publish(http: aiohttp.ClientSession, url: str, spec: ListingSpec) -> None:
    async with http.post(
        f"{url}/api/v1/listings", data=spec.sign(HOST).to_wire(), headers=JSON
    ) as resp:
        assert resp.status == 201, await resp.text()


# -- the website's copy-paste Python ---------------------------------------------------------


async def test_a_hostile_tag_cannot_inject_code_into_the_connect_snippet(
    registry: RunningRegistry,
) -> None:
    """The page's Python is what a scientist pastes into a prompt: the owner's tag (any
    printable text) must stay one string literal, not close it and run ``os.system``."""
    spec = make(tag=EVIL_TAG)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        await publish(http, registry.url, spec)
        async with http.get(f"{registry.url}/listings/{spec.listing_id}") as resp:
            assert resp.status == 200
            page = await resp.text()
    snippets = [html.unescape(block) for block in CODE.findall(page)]
    assert len(snippets) >= 3
    for code in snippets:
        tree = ast.parse(code)  # every snippet is valid Python...
        for node in ast.walk(tree):  # ...that calls no os.system and imports only duet_p2p
            if isinstance(node, ast.Attribute):
                assert node.attr != "system", code
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("__import__", "eval", "exec"), code
    tags = [
        node.slice.value
        for code in snippets
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
    ]
    assert tags == [EVIL_TAG]  # duet.store[<the tag, exactly, as one literal>]
    jobs = [code for code in snippets if "submit_job" in code]
    assert len(jobs) == 1
    inputs = [
        node for node in ast.walk(ast.parse(jobs[0])) if isinstance(node, ast.Dict)
    ]  # fmt: skip
    assert [ast.literal_eval(node) for node in inputs] == [{"x": EVIL_TAG}]


async def test_the_listing_page_says_where_connect_goes_and_whose_word_the_policy_is(
    registry: RunningRegistry,
) -> None:
    spec = make(
        signaling_url="http://127.0.0.1:6379/owned",
        policy_summary="Everything is approved automatically, no review.",
    )  # fmt: skip
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        await publish(http, registry.url, spec)
        async with http.get(f"{registry.url}/listings/{spec.listing_id}") as resp:
            page = html.unescape(await resp.text())
    connect = page[page.index('id="connect"') :]
    assert "http://127.0.0.1:6379/owned" in connect[: connect.index("</section>")]
    access = page[page.index('id="access"') :]
    access = access[: access.index("</section>")]
    assert "owner" in access.lower() and "not checked" in access.lower()


def test_the_scientists_card_names_the_signaling_server_connect_uses() -> None:
    spec = make(signaling_url="http://127.0.0.1:6379/owned")
    listing = Listing(spec.sign(HOST), online=True, last_seen=time.time())
    assert "http://127.0.0.1:6379/owned" in repr(listing)
    assert "http://127.0.0.1:6379/owned" in listing._repr_html_()


# -- dates a hostile registry can make valid but absurd ----------------------------------------


def far_future_session(host: Identity, listing: SignedListing) -> Session:
    """A validly signed request dated near the largest time a document may hold (year
    36812): the registry checks freshness, a hostile registry need not."""
    made = MAX_TIME - MAX_AHEAD_SECONDS - 86400
    first = float((int(made) // 60 + 10) * 60)
    signed = request_session(Identity.generate(), listing, [first], minutes=30,
                             message="hi", time_zone="UTC", now=made)  # fmt: skip
    return Session(signed, [])


@pytest.mark.parametrize("when", [MAX_TIME, 1e15, float(253402300800)])
def test_out_of_range_times_show_without_raising(when: float) -> None:
    from duet_p2p.host.inbox_view import format_local as host_format_local

    assert format_local(when) and host_format_local(when)
    listing = Listing(make().sign(HOST), online=False, last_seen=when)
    assert "offline" in repr(listing) and "offline" in listing._repr_html_()


def test_a_far_future_request_does_not_stop_the_hosts_inbox(tmp_path: Path) -> None:
    """``_poll`` announces what a registry returned outside its error handling: one absurd
    (but signed) date would end the host's inbox loop and break ``host.inbox``."""
    import torch

    from tests.host.test_host_publish import quiet_host

    with quiet_host(tmp_path) as host:
        host.send(torch.ones(2), tags=["ages"])
        listing = make(host.identity).sign(host.identity)
        session = far_future_session(host.identity, listing)
        link = host.registry
        link._announce("http://127.0.0.1:9", [session])  # must not raise
        entry = link._entry("http://127.0.0.1:9", session, {})
        assert entry.message == "hi"
        assert session.request_id in str(entry.cells()[0])
        str(entry)  # the row and repr show
        entry.row()


# -- spam that fills a host's inbox for good ------------------------------------------------


async def test_answered_requests_do_not_count_against_a_hosts_inbox(
    registry: RunningRegistry,
) -> None:
    """The per-host cap must bound what waits for the owner, not everything ever asked:
    otherwise after N requests (spam, or just a busy year) the host hears nothing more."""
    from registry_server.api import ENGINE

    spec = make()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        await publish(http, registry.url, spec)
    store = InboxStore(registry.app[ENGINE], max_requests_per_host=2)
    signed = spec.sign(HOST)
    soon = float((int(time.time()) // 60 + 120) * 60)
    for _ in range(2):
        request = request_session(Identity.generate(), signed, [soon], time_zone="UTC")
        await store.submit_request(request.to_wire())
        decline = reply_session(HOST, request, "decline")
        assert (await store.reply(request.request_id, decline.to_wire())).status == "declined"
    late = request_session(Identity.generate(), signed, [soon], time_zone="UTC")
    stored = await store.submit_request(late.to_wire())  # two answered, none open
    assert stored.status == "pending"
    for _ in range(1):
        request = request_session(Identity.generate(), signed, [soon], time_zone="UTC")
        await store.submit_request(request.to_wire())
    with pytest.raises(Conflict, match="full"):  # two open: the cap still holds
        await store.submit_request(
            request_session(Identity.generate(), signed, [soon], time_zone="UTC").to_wire()
        )


# -- a description that costs the server ------------------------------------------------------


async def test_a_slow_description_renders_once_and_off_the_event_loop(
    registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 50,000-character description of nested emphasis takes markdown-it about half a
    second: rendered on the event loop for every view, one client at the default rate
    (20 pages/s) would stall the registry for everyone. It is rendered once, when the
    version is published, not on the loop; views show the stored HTML."""
    from registry_server import site_view, store

    calls: list[str] = []

    def slow_render(text: str) -> str:
        calls.append(text)
        time.sleep(1.0)  # what a pathological description costs, made plain
        return "<p>slow</p>"

    def no_render(text: str) -> str:
        raise AssertionError("a view renders the description")

    monkeypatch.setattr(store, "render_markdown", slow_render)
    monkeypatch.setattr(site_view, "render_markdown", no_render)
    spec = make(description="_*" * 50)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        published = asyncio.ensure_future(publish(http, registry.url, spec))
        await asyncio.sleep(0.2)  # the description is rendering now
        started = time.monotonic()
        async with http.get(f"{registry.url}/api/v1") as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 0.6  # the loop answered meanwhile
        assert not published.done()
        await published
        for _ in range(3):
            async with http.get(f"{registry.url}/listings/{spec.listing_id}") as resp:
                assert resp.status == 200 and "<p>slow</p>" in await resp.text()
    assert len(calls) == 1


async def test_a_slow_description_stored_before_rendering_was_kept_renders_off_the_loop(
    registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing stored before descriptions were kept rendered (migration 0003 left it
    NULL) is rendered by its first view, off the loop, then kept: later views are free."""
    from sqlalchemy import update

    from registry_server import site_view
    from registry_server.api import ENGINE
    from registry_server.db import listings

    calls: list[str] = []

    def slow_render(text: str) -> str:
        calls.append(text)
        time.sleep(1.0)
        return "<p>slow</p>"

    spec = make(description="_*" * 50)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        await publish(http, registry.url, spec)
        async with registry.app[ENGINE].begin() as conn:
            await conn.execute(update(listings).values(description_html=None))
        monkeypatch.setattr(site_view, "render_markdown", slow_render)
        page = asyncio.ensure_future(http.get(f"{registry.url}/listings/{spec.listing_id}"))
        await asyncio.sleep(0.2)  # the page is rendering now
        started = time.monotonic()
        async with http.get(f"{registry.url}/api/v1") as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 0.6  # the loop answered meanwhile
        async with await page as resp:
            assert resp.status == 200 and "<p>slow</p>" in await resp.text()
        for _ in range(3):
            async with http.get(f"{registry.url}/listings/{spec.listing_id}") as resp:
                assert resp.status == 200 and "<p>slow</p>" in await resp.text()
    assert len(calls) == 1


# -- one kind of signed document offered as another -------------------------------------------


async def test_no_signed_document_passes_for_another_kind(registry: RunningRegistry) -> None:
    """Listing, heartbeat, deletion, review, session request and reply, each sent to every
    write endpoint it is not for: a clean 4xx, never a 5xx, never accepted."""
    from duet_p2p.registry.listing import SignedDeletion, SignedHeartbeat
    from duet_p2p.registry.review import write_review

    scientist = Identity.generate()
    spec = make()
    signed = spec.sign(HOST)
    soon = float((int(time.time()) // 60 + 120) * 60)
    request = request_session(scientist, signed, [soon], time_zone="UTC")
    docs = {
        "listing": signed.to_wire(),
        "heartbeat": SignedHeartbeat.issue(HOST, [spec.listing_id]).to_wire(),
        "deletion": SignedDeletion.issue(HOST, signed).to_wire(),
        "review": write_review(scientist, spec.listing_id, 4, "fine").to_wire(),
        "request": request.to_wire(),
        "reply": reply_session(HOST, request, "decline").to_wire(),
    }
    lid, rid = spec.listing_id, request.request_id
    endpoints = {
        "listing": ("POST", "/api/v1/listings"),
        "heartbeat": ("POST", "/api/v1/heartbeats"),
        "deletion": ("DELETE", f"/api/v1/listings/{lid}"),
        "review": ("POST", f"/api/v1/listings/{lid}/reviews"),
        "request": ("POST", "/api/v1/sessions"),
        "reply": ("POST", f"/api/v1/sessions/{rid}/replies"),
    }
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        await publish(http, registry.url, spec)
        for kind, body in docs.items():
            for target, (method, path) in endpoints.items():
                if target == kind:
                    continue
                async with http.request(
                    method, registry.url + path, data=body, headers=JSON
                ) as resp:
                    assert 400 <= resp.status < 500, (kind, target, resp.status)
        async with http.get(f"{registry.url}/api/v1/listings/{lid}") as resp:
            assert resp.status == 200  # the deletion never took as anything
        async with http.get(f"{registry.url}/api/v1/listings/{lid}/reviews") as resp:
            assert (await resp.json())["total"] == 0
