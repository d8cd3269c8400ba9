"""The registry website: pages, search and filters, pagination, stored XSS in every text
field, the report form's CSRF defences, time zones, errors, external URLs, page weight."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from duet_p2p.identity import Identity
from duet_p2p.registry.listing import ListingSpec, SignedHeartbeat
from duet_p2p.registry.review import write_review
from registry_server.app import RunningRegistry, create_app, start_registry
from registry_server.keys import INBOX, STORE, RegistrySettings
from registry_server.site import REPORTS
from registry_server.site_view import availability_slots, is_zone, mock_preview, page_numbers

ROOT = Path(__file__).resolve().parents[2]
HOST = Identity.generate()
OTHER = Identity.generate()
TIMEOUT = aiohttp.ClientTimeout(total=20)
ROOMY = dict(requests_per_second=1000.0, burst=1000, writes_per_minute=60_000.0)
XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>"\'&'
SHORT_XSS = "<img src=x onerror=alert(1)>"  # fits a keyword (64 characters)
FORM = "application/x-www-form-urlencoded"


def make(identity: Identity = HOST, **changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Hospital admissions 2024", summary="Daily admissions by ward",
        description="# Admissions\n\nOne row per *stay*.", license="CC-BY-4.0",
        signaling_url="http://127.0.0.1:8765/", modality="tabular",
        keywords=["health", "admissions"], access_modes=["live", "offline_jobs"],
        schema=[
            {"name": "ward", "dtype": "string", "description": "ward name"},
            {"name": "count", "dtype": "int64"},
        ],
        policy_summary="Aggregates over at least 10 stays are released automatically.",
        usage_conditions="Research only.",
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(identity, **fields)


async def publish(registry: RunningRegistry, spec: ListingSpec, *, online: bool = False) -> str:
    identity = HOST if spec.host_id == HOST.id else OTHER
    store = registry.app[STORE]
    await store.publish(spec.sign(identity).to_wire())
    if online:
        beat = SignedHeartbeat.issue(identity, [spec.listing_id])
        await store.heartbeat(beat.to_wire(), time.time())
    return spec.listing_id


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}", **ROOMY)
    async with await start_registry(settings) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    jar = aiohttp.CookieJar(unsafe=True)  # keep cookies of 127.0.0.1
    async with aiohttp.ClientSession(timeout=TIMEOUT, cookie_jar=jar) as session:
        yield session


async def page(client: aiohttp.ClientSession, url: str, status: int = 200, **kwargs: Any) -> str:
    async with client.get(url, **kwargs) as response:
        text = await response.text()
        assert response.status == status, text[:500]
        assert response.content_type == "text/html"
        return text


class Elements(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def assert_inert(html: str) -> None:
    """No element a listing could have injected: no handlers, no foreign scripts or images."""
    parser = Elements()
    parser.feed(html)
    parser.close()
    for tag, attrs in parser.tags:
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        if tag == "script":
            assert (attrs.get("src") or "").startswith("/static/site.js?"), attrs
        if tag == "img":
            assert (attrs.get("src") or "").startswith("/static/logo.svg?"), attrs
        for name in ("href", "src", "action"):
            assert not (attrs.get(name) or "").strip().lower().startswith("javascript:"), attrs
        assert (
            tag not in ("iframe", "object", "embed", "base", "meta")
            or tag == "meta"
            and ("http-equiv" not in attrs)
        ), (tag, attrs)


def links(html: str) -> list[str]:
    return re.findall(r'(?:href|src|action)="([^"]*)"', html)


async def test_pages_render(registry: RunningRegistry, client: aiohttp.ClientSession) -> None:
    listing_id = await publish(registry, make(), online=True)
    home = await page(client, registry.url + "/")
    assert "Hospital admissions 2024" in home and "online" in home
    assert f'href="/listings/{listing_id}"' in home
    assert '<a class="skip" href="#content">' in home and 'id="content"' in home
    for input_id in ("q", "kind", "modality", "license", "keyword", "online"):
        assert f'<label for="{input_id}">' in home
    listing = await page(client, f"{registry.url}/listings/{listing_id}")
    assert "<h2>Admissions</h2>" in listing and "<em>stay</em>" in listing
    assert "ward name" in listing and "<code>count</code>" in listing  # the schema table
    assert "Aggregates over at least 10 stays" in listing  # the policy
    assert "Research only." in listing
    assert f'sy.registry.get("{listing_id}", registry_url="{registry.url}")' in listing
    assert "listing.submit_job(" in listing and "listing.request_session(" in listing
    assert f"/api/v1/listings/{listing_id}/croissant.json" in listing
    assert make().hash() not in listing  # another listing's hash
    assert "Mock rows" in listing and "value_" in listing
    host = await page(client, f"{registry.url}/hosts/{HOST.id}")
    assert "Hospital admissions 2024" in host and "online" in host
    about = await page(client, registry.url + "/about")
    assert "Signed by owners" in about
    async with client.get(registry.url + "/static/site.css") as response:
        assert response.status == 200 and "immutable" in response.headers["Cache-Control"]
        assert response.content_type == "text/css"
        etag = response.headers["ETag"]
    async with client.get(
        registry.url + "/static/site.css", headers={"If-None-Match": etag}
    ) as response:
        assert response.status == 304


async def test_listing_page_shows_the_signature_evidence(
    registry: RunningRegistry, client: aiohttp.ClientSession
) -> None:
    spec = make()
    await publish(registry, spec)
    html = await page(client, f"{registry.url}/listings/{spec.listing_id}")
    assert spec.hash() in html
    assert spec.sign(HOST).to_wire().decode().split('"key":"')[1].split('"')[0] in html
    assert "offline" in html


async def test_empty_state_explains_publishing(
    registry: RunningRegistry, client: aiohttp.ClientSession
) -> None:
    html = await page(client, registry.url + "/")
    assert "No listings yet" in html and "host.publish(" in html and "duet-host publish" in html
    none = await page(client, registry.url + "/?q=nothing+here")
    assert "Nothing found" in none


async def test_search_and_filters(registry: RunningRegistry, client: aiohttp.ClientSession) -> None:
    await publish(registry, make(name="Ward census", keywords=["beds"]), online=True)
    await publish(
        registry, make(OTHER, name="Chest X-rays", modality="image", license="MIT", schema=[])
    )
    model = make(OTHER, kind="model", name="Pneumonia classifier", modality="image", schema=[])
    await publish(registry, model)

    async def names(query: str) -> set[str]:
        html = await page(client, registry.url + "/" + query)
        return {n for n in ("Ward census", "Chest X-rays", "Pneumonia classifier") if n in html}

    assert await names("?q=census") == {"Ward census"}
    assert await names("?modality=image") == {"Chest X-rays", "Pneumonia classifier"}
    assert await names("?kind=model") == {"Pneumonia classifier"}
    assert await names("?license=MIT") == {"Chest X-rays"}
    assert await names("?keyword=beds") == {"Ward census"}
    assert await names("?online=1") == {"Ward census"}
    models_page = await page(client, registry.url + "/models")
    assert "Pneumonia classifier" in models_page and "Ward census" not in models_page
    assert await names("?kind=bogus") == {"Ward census", "Chest X-rays", "Pneumonia classifier"}
    await page(client, registry.url + "/?q=" + "x" * 501, status=400)
    await page(client, registry.url + "/?license=%3Cscript%3E", status=400)
    await page(client, registry.url + "/?keyword=" + "k" * 65, status=400)
    # FTS syntax is a word, not an error
    assert await names("?q=census%22+OR+NEAR(*") == set()


async def test_pagination(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'p.db'}", page_size=3, **ROOMY)
    async with await start_registry(settings) as registry:
        for number in range(8):
            await publish(registry, make(name=f"Series {number:02d}"))
        first = await page(client, registry.url + "/?q=series")
        assert first.count('class="card"') == 3 and "page 1 of 3" in first
        assert 'href="?q=series&amp;page=2" rel="next"' in first
        assert 'aria-current="page"' in first and "Previous" not in first
        last = await page(client, registry.url + "/?q=series&page=3")
        assert last.count('class="card"') == 2 and "Next" not in last
        assert 'href="?q=series&amp;page=2" rel="prev"' in last
        huge = await page(client, registry.url + "/?q=series&page=999999")
        assert "Nothing found" in huge  # capped, not an error
        junk = await page(client, registry.url + "/?page=-1")
        assert junk.count('class="card"') == 3
    assert page_numbers(5, 10) == [1, None, 3, 4, 5, 6, 7, None, 10]
    assert page_numbers(1, 1) == [1]


HOSTILE_FIELDS: dict[str, Any] = dict(
    name="N" + XSS, summary="S" + XSS, description="D" + XSS + "\n\n[x](javascript:alert(1))",
    citation="C" + XSS, creators=[{"name": "A" + XSS, "affiliation": "F" + XSS}],
    keywords=["K" + SHORT_XSS], usage_conditions="U" + XSS, policy_summary="P" + XSS,
    availability=[{"days": ["mon"], "start": "09:00", "end": "10:00", "tz": "UTC"}],
)  # fmt: skip


async def test_stored_xss_is_inert_in_every_field(
    registry: RunningRegistry, client: aiohttp.ClientSession
) -> None:
    dataset = make(
        **HOSTILE_FIELDS,
        schema=[{"name": "col" + XSS, "dtype": "string", "description": "d" + XSS}],
        sample={"col" + XSS: ["s" + XSS, None]},
    )
    model = make(
        kind="model", modality="image", **HOSTILE_FIELDS,
        schema=[{"name": "t" + XSS, "dtype": "float32", "shape": [2], "description": "e" + XSS}],
        metrics=[{"name": "m" + XSS, "value": 0.5, "dataset": dataset.listing_id}],
        architecture={"type" + XSS: "v" + XSS},
    )  # fmt: skip
    for spec in (dataset, model):
        await publish(registry, spec, online=True)
    urls = [
        "/", "/?q=N", "/?keyword=K" + quote(SHORT_XSS), f"/listings/{dataset.listing_id}",
        f"/listings/{model.listing_id}", f"/hosts/{HOST.id}", "/models",
    ]  # fmt: skip
    for url in urls:
        html = await page(client, registry.url + url)
        assert "<script>window" not in html and "<img src=x" not in html
        assert_inert(html)
    listing = await page(client, f"{registry.url}/listings/{model.listing_id}")
    for prefix in ("N", "S", "C", "U", "P", "K", "t", "e", "m", "A", "F", "type", "v"):
        assert prefix + "&lt;img src=x onerror=" in listing, prefix
    described = await page(client, f"{registry.url}/listings/{dataset.listing_id}")
    assert "Sample from the owner" in described
    for prefix in ("D", "col", "d", "s"):
        assert prefix + "&lt;img src=x onerror=" in described, prefix


async def csrf_form(client: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    """The form's token and the Set-Cookie header that came with it."""
    async with client.get(url) as response:
        html = await response.text()
        set_cookie = response.headers.get("Set-Cookie", "")
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match is not None
    return match.group(1), set_cookie


async def test_report_form_is_csrf_safe(
    registry: RunningRegistry, client: aiohttp.ClientSession
) -> None:
    listing_id = await publish(registry, make())
    listing_url = f"{registry.url}/listings/{listing_id}"
    report_url = listing_url + "/report"
    token, set_cookie = await csrf_form(client, listing_url)
    assert set_cookie.startswith(f"registry_csrf={token};")
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    assert (await csrf_form(client, listing_url)) == (token, "")  # kept, not set again
    reports = registry.app[REPORTS]

    async def post(data: dict[str, str], headers: dict[str, str] | None = None) -> int:
        async with client.post(
            report_url, data=data, headers=headers or {}, allow_redirects=False
        ) as response:
            await response.read()
            return response.status

    good = {"csrf": token, "reason": "spam", "text": "<b>buy</b>"}
    assert await post({"reason": "spam", "text": "x"}) == 403  # no token
    assert await post({**good, "csrf": "A" * 43}) == 403  # wrong token
    assert await post(good, {"Origin": "http://127.0.0.2:9"}) == 403
    assert await post(good, {"Sec-Fetch-Site": "cross-site"}) == 403
    assert await post(good, {"Origin": "null"}) == 403
    assert await post({**good, "reason": "nope"}) == 400
    assert await post({**good, "text": "x" * 1001}) == 400
    assert await post({**good, "text": "a\x00b"}) == 400
    assert await reports.count() == 0
    async with client.post(
        report_url, data=good, headers={"Origin": registry.url, "Sec-Fetch-Site": "same-origin"},
        allow_redirects=False,
    ) as response:  # fmt: skip
        assert response.status == 303
        thanks = response.headers["Location"]
    assert thanks == f"/listings/{listing_id}/reported"
    assert "Thank you" in await page(client, registry.url + thanks)
    (stored,) = await reports.newest()
    assert (stored.listing_id, stored.reason, stored.text) == (listing_id, "spam", "<b>buy</b>")
    # a token is the visitor's own: another visitor's cookie does not match it
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(timeout=TIMEOUT, cookie_jar=jar) as other:
        await csrf_form(other, listing_url)
        async with other.post(report_url, data=good, allow_redirects=False) as response:
            assert response.status == 403
    # a JSON body or an oversize form is refused
    async with client.post(report_url, json=good, allow_redirects=False) as response:
        assert response.status == 400
    big = {**good, "text": "x" * 9000}
    async with client.post(report_url, data=big, allow_redirects=False) as response:
        assert response.status == 413
    unknown = f"{registry.url}/listings/{'0' * 32}/report"
    async with client.post(unknown, data=good, allow_redirects=False) as response:
        assert response.status == 404
    assert await reports.count() == 1


async def test_time_zones(registry: RunningRegistry, client: aiohttp.ClientSession) -> None:
    every_day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    window = {"days": every_day, "start": "09:00", "end": "10:00", "tz": "UTC"}
    listing_id = await publish(registry, make(availability=[window]))
    url = f"{registry.url}/listings/{listing_id}"
    default = await page(client, url)
    assert "Times are shown in <strong>UTC</strong> (the default" in default
    assert "09:00–10:00</td><td>" in default and "data-auto" in default
    kolkata = await page(client, url + "?tz=Asia/Kolkata")
    assert "Asia/Kolkata" in kolkata and "14:30–15:30</td>" in kolkata  # UTC+5:30
    assert (
        client.cookie_jar.filter_cookies(URL(registry.url))["registry_tz"].value == "Asia/Kolkata"
    )
    remembered = await page(client, url)  # the cookie
    assert "14:30–15:30</td>" in remembered and "data-auto" not in remembered
    bad = await page(client, url + "?tz=Mars/Olympus_Mons")
    assert "not known here" in bad and "09:00–10:00</td><td>" in bad
    hostile = await page(client, url + "?tz=%3Cscript%3E")
    assert "<script>" not in hostile.split("</main>")[0]
    assert is_zone("Europe/Paris") and not is_zone("../../etc/passwd") and not is_zone("x" * 99)


def test_availability_converts_with_each_dates_offset() -> None:
    window = {"days": ["mon"], "start": "09:00", "end": "24:00", "tz": "Europe/Paris"}
    summer = datetime(2025, 7, 6, 12, 0, tzinfo=UTC).timestamp()  # a Sunday
    (slot,) = availability_slots([window], "America/New_York", summer)
    assert slot.text == "Mon 2025-07-07 03:00–18:00"  # Paris UTC+2, New York UTC-4
    assert slot.host_text == "Mon 2025-07-07 09:00–Tue 00:00"
    winter = datetime(2025, 1, 5, 12, 0, tzinfo=UTC).timestamp()
    (slot,) = availability_slots([window], "UTC", winter)
    assert slot.text == "Mon 2025-01-06 08:00–23:00"  # Paris UTC+1
    finished = datetime(2025, 1, 6, 23, 30, tzinfo=UTC).timestamp()  # after Monday's window
    assert [s.text for s in availability_slots([window], "UTC", finished)] == [
        "Mon 2025-01-13 08:00–23:00"  # the next one: today's has ended
    ]


def test_mock_preview_is_small_and_synthetic() -> None:
    schema = [{"name": f"c{n}", "dtype": "float64"} for n in range(20)]
    schema.append({"name": "big", "dtype": "float32", "shape": [100000, 100000]})
    preview = mock_preview(schema)
    assert len(preview["rows"]) == 5 and len(preview["columns"]) == 12
    assert preview["more_columns"] == 8
    (tensor,) = preview["tensors"]
    assert tensor["shape"] == "[100000, 100000]" and len(tensor["first"]) == 6
    assert mock_preview(schema) == preview  # fixed seed


async def test_errors_are_html_pages(
    registry: RunningRegistry, client: aiohttp.ClientSession
) -> None:
    for url in ("/listings/" + "0" * 32, "/listings/nothex", "/hosts/" + "0" * 32, "/nope"):
        html = await page(client, registry.url + url, status=404)
        assert "<h1>" in html
    await page(client, registry.url + "/static/nothing.css", status=404)
    async with client.put(registry.url + "/about") as response:
        assert response.status == 405


async def test_no_external_urls_and_small_pages(
    registry: RunningRegistry, client: aiohttp.ClientSession
) -> None:
    many = make(
        description="Long text. " * 2000,
        schema=[{"name": f"column_{n}", "dtype": "float32", "description": "d" * 100}
                for n in range(40)],
        availability=[
            {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:00",
             "tz": "Europe/Paris"},
        ],
    )  # fmt: skip
    await publish(registry, many, online=True)
    for n in range(25):
        await publish(registry, make(name=f"Listing {n}", summary="s" * 400))
    for url in ("/", "/?page=2", "/about", f"/listings/{many.listing_id}", f"/hosts/{HOST.id}"):
        async with client.get(registry.url + url) as response:
            body = await response.read()
            assert response.status == 200
            csp = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        assert len(body) < 100_000, (url, len(body))
        html = body.decode()
        for target in links(html):
            if re.match(r"(?i)(https?:)?//", target):
                assert target.startswith(registry.url), (url, target)
            assert not target.lower().startswith(("javascript:", "data:")), target
        assert "style=" not in html  # the CSP allows no inline styles
        assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline script
        assert "@import" not in html and "fonts.g" not in html


def test_static_files_name_nothing_external() -> None:
    static = ROOT / "registry_server" / "static"
    for path in static.iterdir():
        text = path.read_text()
        urls = re.findall(r"https?://[^\s\"')]+", text)
        # the one URL allowed is the SVG namespace's name (an identifier, never fetched)
        assert all(urlsplit(u).path == "/2000/svg" for u in urls), (path, urls)
        assert "@import" not in text and "url(" not in text


async def test_mounted_under_a_prefix_keeps_the_prefix(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    settings = RegistrySettings(
        database_url=f"sqlite:///{tmp_path / 'm.db'}", public_url="http://127.0.0.1:1/registry",
        **ROOMY,
    )  # fmt: skip
    parent = web.Application()
    registry_app = create_app(settings)
    parent.add_subapp("/registry", registry_app)
    runner = web.AppRunner(parent)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}/registry"
        spec = make()
        await registry_app[STORE].publish(spec.sign(HOST).to_wire())
        home = await page(client, base + "/")
        listing = await page(client, f"{base}/listings/{spec.listing_id}")
        for html in (home, listing):
            for target in links(html):
                if target.startswith("/"):
                    assert target.startswith("/registry/"), target
        assert f"/registry/api/v1/listings/{spec.listing_id}/croissant.json" in listing
        async with client.get(
            f"{base}/api/v1/listings/{spec.listing_id}/croissant.json"
        ) as response:
            assert response.status == 200
    finally:
        await runner.cleanup()


def test_site_modules_do_not_import_torch() -> None:
    code = (
        "import sys, registry_server.site, registry_server.site_view, registry_server.site_forms; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


async def test_reviews_and_ratings_show_escaped(
    registry: RunningRegistry, client: aiohttp.ClientSession
) -> None:
    listing_id = await publish(registry, make())
    review = write_review(OTHER, listing_id, 4, "Useful. " + XSS)
    await registry.app[INBOX].add_review(listing_id, review.to_wire())
    html = await page(client, f"{registry.url}/listings/{listing_id}")
    reviews = html.split('id="reviews"')[1].split("</section>")[0]
    assert "★★★★☆" in reviews and OTHER.id in reviews
    assert "Useful. &lt;img src=x onerror=" in reviews
    assert_inert(html)
    home = await page(client, registry.url + "/")
    assert "4.0 (1)" in home and "★★★★☆" in home


# -- descriptions rendered at publish ---------------------------------------------------------


async def test_the_page_shows_the_description_rendered_at_publish(
    registry: RunningRegistry, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry_server import site_view, store

    listing_id = await publish(registry, make(description="# Admissions\n\n*stay* " + XSS))
    stored = await registry.app[STORE].get(listing_id)
    assert stored is not None and stored.description_html is not None
    assert "<h2>Admissions</h2>" in stored.description_html
    assert "&lt;script&gt;" in stored.description_html
    assert_inert(stored.description_html)

    def no_render(text: str, **kwargs: Any) -> str:
        raise AssertionError("a view must not render the description")

    monkeypatch.setattr(site_view, "render_markdown", no_render)
    monkeypatch.setattr(store, "render_markdown", no_render)
    for _ in range(2):
        html = await page(client, f"{registry.url}/listings/{listing_id}")
        described = html.split('<div class="description">')[1].split("</div>")[0]
        assert described == stored.description_html
        assert_inert(html)
    found, _total = await registry.app[STORE].search("admissions")
    assert [item.description_html for item in found] == [None]  # results do not carry it


async def test_an_edit_stores_its_own_rendering(
    registry: RunningRegistry, client: aiohttp.ClientSession
) -> None:
    spec = make(description="earliest *words*")
    await publish(registry, spec)
    edited = spec.edit(description="second **words**")
    await registry.app[STORE].publish(edited.sign(HOST).to_wire())
    stored = await registry.app[STORE].get(spec.listing_id)
    assert stored is not None and stored.version == 2
    assert stored.description_html == "<p>second <strong>words</strong></p>\n"
    html = await page(client, f"{registry.url}/listings/{spec.listing_id}")
    assert "<strong>words</strong>" in html and "earliest" not in html


async def test_a_row_from_before_the_migration_is_rendered_once_off_the_loop(
    registry: RunningRegistry, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows written before descriptions were kept rendered (description_html NULL): the
    page renders in a worker thread, then keeps the HTML, so later views do not."""
    import threading

    from sqlalchemy import update

    from registry_server import site_view
    from registry_server.api import ENGINE
    from registry_server.db import listings
    from registry_server.render import render_markdown

    listing_id = await publish(registry, make(description="old *row*"))
    async with registry.app[ENGINE].begin() as conn:
        await conn.execute(update(listings).values(description_html=None))
    threads: list[str] = []

    def counted(text: str, **kwargs: Any) -> str:
        threads.append(threading.current_thread().name)
        return render_markdown(text, **kwargs)

    monkeypatch.setattr(site_view, "render_markdown", counted)
    for _ in range(3):
        html = await page(client, f"{registry.url}/listings/{listing_id}")
        assert "<p>old <em>row</em></p>" in html
    assert len(threads) == 1 and threads[0] != threading.main_thread().name
    stored = await registry.app[STORE].get(listing_id)
    assert stored is not None and stored.description_html == "<p>old <em>row</em></p>\n"
