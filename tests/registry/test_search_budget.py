"""Large listings cannot make a search unreadable: three listings near the 1 MiB cap would
make a page larger than the 4 MiB a client reads, so the registry sends fewer results per
page (never fewer than one) and the client pages on after what it was sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from duet_p2p.identity import Identity
from duet_p2p.registry.client import MAX_RESPONSE_BYTES, RegistryClient
from duet_p2p.registry.listing import MAX_BODY_BYTES, ListingSpec
from registry_server.api import RESPONSE_BUDGET_BYTES
from registry_server.app import RunningRegistry, start_registry
from registry_server.keys import STORE, RegistrySettings

OWNER = Identity.generate()
ROOMY = dict(requests_per_second=1000.0, burst=1000, writes_per_minute=60_000.0)
QUOTES = '"' * 500  # each quote is escaped twice on its way out: the worst case


def big(number: int) -> ListingSpec:
    """A model listing of about 0.9 MB (1.6 MB in a search response)."""
    schema = [{"name": f"c{j:03d}" + "x" * 190, "dtype": "float64", "description": QUOTES}
              for j in range(500)]  # fmt: skip
    return ListingSpec.new(
        OWNER, kind="model", name=f"Big ward model {number}", summary="ward",
        description="ü" * 50_000, license="MIT", signaling_url="http://127.0.0.1:9/",
        modality="other", schema=schema, architecture={"type": "Sequential",
                                                       "blob": ['"' * 1000] * 100},
    )  # fmt: skip


def small(number: int) -> ListingSpec:
    return ListingSpec.new(
        OWNER, kind="dataset", name=f"Ward counts {number}", summary="ward", description="",
        license="MIT", signaling_url="http://127.0.0.1:9/",
    )  # fmt: skip


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}", **ROOMY)
    async with await start_registry(settings) as running:
        yield running


async def test_a_search_of_large_listings_pages_within_what_a_client_reads(
    registry: RunningRegistry,
) -> None:
    specs = [big(0), small(0), big(1), small(1), big(2)]
    sizes = [len(spec.canonical_bytes()) for spec in specs]
    assert max(sizes) <= MAX_BODY_BYTES and sum(sizes[::2]) > 2 << 20
    for spec in specs:
        await registry.app[STORE].publish(spec.sign(OWNER).to_wire())
    async with aiohttp.ClientSession() as http:
        params = {"q": "ward", "limit": "20"}
        async with http.get(f"{registry.url}/api/v1/listings", params=params) as response:
            raw = await response.read()
    page = json.loads(raw)
    assert page["total"] == 5 and 1 <= len(page["results"]) < 5
    assert len(raw) <= MAX_RESPONSE_BYTES and len(raw) <= RESPONSE_BUDGET_BYTES + 4096
    async with RegistryClient(registry.url) as client:
        found = await client.search("ward", limit=20)
        seen = [item.id for item in found]
        assert found.total == 5 and found.returned == len(found) < 5
        for _ in range(10):  # bounded
            found = await found.next_page_async()
            if not len(found):
                break
            seen += [item.id for item in found]
        assert sorted(seen) == sorted(spec.listing_id for spec in specs)
        assert len(await found.next_page_async()) == 0
        host = await client.host(OWNER.id)
        assert 1 <= len(host["listings"]) < 5 and host["truncated"]  # held to the budget too


async def test_one_listing_always_fits_a_page(registry: RunningRegistry) -> None:
    await registry.app[STORE].publish(big(7).sign(OWNER).to_wire())
    async with RegistryClient(registry.url) as client:
        found = await client.search("ward")
    assert len(found) == 1 and found[0].name == "Big ward model 7" and found.dropped == 0
