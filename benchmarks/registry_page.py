"""The registry's listing page: how many bytes a visitor loads, and from where.

A realistic dataset listing (a 3 KB Markdown description, 24 columns, availability
windows, a policy) is published to a registry on 127.0.0.1; the page is fetched with
everything it references (stylesheets, scripts, images: ``href``/``src`` of ``link``,
``script`` and ``img``), as a browser would on a first visit. Baseline, same run: the
API's JSON for the same listing (the signed document the page renders). Goal: <= 100 KB,
no request to any other origin.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from duet_p2p.identity import Identity
from duet_p2p.registry.listing import ListingSpec
from registry_server.app import start_registry
from registry_server.keys import STORE, RegistrySettings

GOAL_KB = 100.0
_ASSET = re.compile(r"<(?:link|script|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
_DESCRIPTION = "\n\n".join(
    f"## Part {i}\n\nAdmissions per ward and day, **de-identified**; see the codebook for "
    "the exact definitions of each column, the collection period and known gaps.\n\n"
    "- one row per stay\n- wards coded A-Z\n- times in local time"
    for i in range(12)
)


def _listing(owner: Identity) -> ListingSpec:
    columns = [
        {"name": f"column_{i}", "dtype": ("int64", "float64", "string", "category")[i % 4],
         "description": f"what column {i} measures, in its unit"}
        for i in range(24)
    ]  # fmt: skip
    return ListingSpec.new(
        owner, kind="dataset", name="Hospital admissions 2024",
        summary="Daily admissions by ward in a mid-size hospital", description=_DESCRIPTION,
        license="CC-BY-4.0", signaling_url="http://127.0.0.1:8765", modality="tabular",
        keywords=["health", "admissions", "hospital", "wards"], schema=columns,
        approx_size={"rows": 120_000, "bytes": 48_000_000},
        usage_conditions="Research only; cite the dataset.",
        policy_summary="The owner reviews every request; DP means within a budget at once.",
        availability=[{"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00",
                       "end": "17:00", "tz": "Europe/Berlin"}],
        access_modes=["live", "offline_jobs"], tag="admissions",
        citation="Clinic A (2024). Hospital admissions.",
        creators=[{"name": "Clinic A data team"}],
    )  # fmt: skip


async def measure() -> dict[str, Any]:
    owner = Identity.generate()
    with tempfile.TemporaryDirectory(prefix="duet_bench_page_") as directory:
        url = f"sqlite:///{Path(directory) / 'registry.db'}"
        async with await start_registry(RegistrySettings(database_url=url)) as registry:
            spec = _listing(owner)
            await registry.app[STORE].publish(spec.sign(owner).to_wire())
            page_url = f"{registry.url}/listings/{spec.listing_id}"
            async with aiohttp.ClientSession() as http:
                async with http.get(page_url) as response:
                    html = await response.read()
                assets: dict[str, int] = {}
                foreign: list[str] = []
                for ref in _ASSET.findall(html.decode()):
                    absolute = urljoin(page_url, ref.replace("&amp;", "&"))
                    if urlsplit(absolute).netloc != urlsplit(page_url).netloc:
                        foreign.append(absolute)
                        continue
                    async with http.get(absolute) as response:
                        assets[urlsplit(absolute).path] = len(await response.read())
                async with http.get(f"{registry.url}/api/v1/listings/{spec.listing_id}") as r:
                    document = len(await r.read())
    total = len(html) + sum(assets.values())
    return {
        "html_bytes": len(html), "assets": assets, "total_bytes": total,
        "document_bytes": document, "ratio_to_document": total / document,
        "foreign_requests": foreign, "goal_kb": GOAL_KB,
        "goal_met": total <= GOAL_KB * 1024 and not foreign,
    }  # fmt: skip


def run_page_weight() -> dict[str, Any]:
    return asyncio.run(measure())


def page_row(p: dict[str, Any]) -> list[str]:
    """[what, registry, baseline, ratio, goal, met] for the page weight."""
    met = {True: "yes", False: "**no**"}[bool(p["goal_met"])]
    return [
        f"10. Registry listing page, first visit (HTML + {len(p['assets'])} assets, "
        f"{len(p['foreign_requests'])} requests elsewhere)",
        f"{p['total_bytes'] / 1024:.1f} KB (HTML {p['html_bytes'] / 1024:.1f} KB)",
        f"the listing's API JSON {p['document_bytes'] / 1024:.1f} KB",
        f"{p['ratio_to_document']:.2f}x bytes", f"<= {p['goal_kb']:g} KB, none elsewhere", met,
    ]  # fmt: skip
