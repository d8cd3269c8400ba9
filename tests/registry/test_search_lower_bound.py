"""A broad search is counted to ``MAX_TOTAL`` and then says "at least": the API flags it,
the website shows "N+" and keeps a next page, the client's table says "N+" and pages on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from duet_p2p.identity import Identity
from duet_p2p.registry.client import RegistryClient
from duet_p2p.registry.listing import ListingSpec
from registry_server import api, site, store
from registry_server.app import RunningRegistry, start_registry
from registry_server.keys import STORE, RegistrySettings

CAP = 3
LISTINGS = 5
OWNER = Identity.generate()
ROOMY = dict(requests_per_second=1000.0, burst=1000, writes_per_minute=60_000.0, page_size=2)


@pytest.fixture
async def registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RunningRegistry]:
    for module in (store, api, site):
        monkeypatch.setattr(module, "MAX_TOTAL", CAP)
    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}", **ROOMY)
    async with await start_registry(settings) as running:
        for i in range(LISTINGS):
            spec = ListingSpec.new(
                OWNER, kind="dataset", name=f"Ward counts {i}", summary="admissions",
                description="", license="MIT", signaling_url="http://127.0.0.1:8765",
            )  # fmt: skip
            await running.app[STORE].publish(spec.sign(OWNER).to_wire())
        yield running


async def test_the_api_flags_a_lower_bound(registry: RunningRegistry) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{registry.url}/api/v1/listings", params={"q": "ward"}) as r:
            page = await r.json()
        async with http.get(f"{registry.url}/api/v1/listings", params={"q": "nothing"}) as r:
            none = await r.json()
    assert (page["total"], page["total_at_least"]) == (CAP, True)
    assert (none["total"], none["total_at_least"]) == (0, False)


async def test_the_site_shows_n_plus_and_a_next_page(registry: RunningRegistry) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{registry.url}/?q=ward&page=2") as r:
            html = await r.text()
    assert f"{CAP}+ listings match, page 2." in html
    assert 'rel="next"' in html  # page 3 exists although the count stopped at CAP


async def test_the_client_pages_past_the_count(registry: RunningRegistry) -> None:
    async with RegistryClient(registry.url) as client:
        first = await client.search("ward", limit=2)
    assert first.at_least and f"{CAP}+ listing(s)" in str(first)
    seen = {item.id for item in first}
    page = first
    for _ in range(LISTINGS):  # bounded
        page = await page.next_page_async()
        if not len(page):
            break
        seen |= {item.id for item in page}
    assert len(seen) == LISTINGS
