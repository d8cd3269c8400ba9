"""The registry website: server-rendered pages that work without JavaScript.

Pages: home with search and filters (``/``, ``/models``), a listing (``/listings/{id}``),
a host (``/hosts/{host_id}``), ``/about``, and the "Report this listing" form (the only
POST: see :mod:`registry_server.site_forms`). Templates (jinja2, autoescape on, strict
undefined) live in ``registry_server/templates``; the CSS, logo and a tiny optional script
in ``registry_server/static``, served from memory with long cache lifetimes (their URLs
carry a content hash). Every link is built from the app's router or is relative, so the
site keeps a mount prefix (``/registry``). Nothing on a page is fetched from elsewhere.

Every listing value is hostile: templates escape it; only the description, rendered by
:func:`registry_server.render.render_markdown` when it was published (and kept with the
listing), is inserted as HTML. Reports go to :class:`registry_server.reports.ReportStore`.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from markupsafe import Markup

from duet_p2p.registry.listing import KINDS, MODALITIES, InvalidListing, SignedListing
from registry_server import api, site_forms
from registry_server.api import ENGINE
from registry_server.keys import INBOX, PUBLIC_URL, SETTINGS, STORE
from registry_server.reports import (
    MAX_PER_CLIENT_PER_DAY,
    REASONS,
    InvalidReport,
    ReportsFull,
    ReportStore,
    TooManyReports,
)
from registry_server.site_view import (
    DEFAULT_ZONE,
    is_zone,
    listing_model,
    page_numbers,
    when,
)
from registry_server.store import (
    MAX_OFFSET,
    MAX_QUERY_CHARS,
    MAX_TOTAL,
    ONLINE_WINDOW_SECONDS,
    InvalidQuery,
)
from signaling_server.ratelimit import in_networks, parse_networks

__all__ = ["REPORTS", "add_site_routes", "error_page", "render"]

logger = logging.getLogger(__name__)

REPORTS = web.AppKey("registry_site_reports", ReportStore)
"""The visitors' reports (in the registry's database; set at startup)."""
RENDERING = web.AppKey("registry_site_rendering", asyncio.Semaphore)
"""Listing pages being computed in worker threads at once (the rest wait, off the loop)."""
MAX_RENDERING = 2
TZ_COOKIE = "registry_tz"
MAX_FILTER_CHARS = 64
MAX_REVIEWS = 20
STATIC_FILES = {
    "site.css": "text/css",
    "logo.svg": "image/svg+xml",
    "site.js": "text/javascript",
}
_HEX32 = re.compile(r"[0-9a-f]{32}")
_LICENSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,63}")
_PAGE = re.compile(r"[0-9]{1,6}")
_TITLES = {
    400: "Bad request", 403: "Forbidden", 404: "Not found", 405: "Method not allowed",
    413: "Request too large", 429: "Too many requests", 500: "Server error",
    503: "Unavailable",
}  # fmt: skip

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("registry_server", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _python_literal(value: object) -> Markup:
    """``value`` (text) as a Python string literal, HTML-escaped for element text (not for
    attributes: quotes stay as they are). The copy-paste snippets on a page put
    owner-chosen text (a tag) into code, where it must stay one literal."""
    text = str(value)
    if text.isprintable() and '"' not in text and "\\" not in text:
        literal = f'"{text}"'
    else:
        literal = repr(text)
    return Markup(html.escape(literal, quote=False))


_ENV.filters["pyrepr"] = _python_literal


@dataclass(frozen=True)
class _Static:
    body: bytes
    content_type: str
    etag: str


def _load_static() -> dict[str, _Static]:
    root = resources.files("registry_server") / "static"
    out = {}
    for name, content_type in STATIC_FILES.items():
        body = (root / name).read_bytes()
        out[name] = _Static(body, content_type, hashlib.sha256(body).hexdigest()[:16])
    return out


_STATIC = _load_static()


# -- rendering ---------------------------------------------------------------------------


def _home_path(request: web.Request) -> str:
    return str(request.app.router["site_home"].url_for())


def _url(
    request: web.Request, route: str, query: dict[str, str] | None = None, **parts: str
) -> str:
    url = request.app.router[route].url_for(**parts)
    if query:
        url = url.with_query(query)
    return str(url)


def _public_url(request: web.Request) -> str:
    public = request.app.get(PUBLIC_URL)
    if public:
        return str(public)
    home = _home_path(request).rstrip("/")
    return f"{request.scheme}://{request.host}{home}"


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """A page from ``template`` with the common context (title, URLs, static files)."""
    settings = request.app.get(SETTINGS)

    def url(route: str, query: dict[str, str] | None = None, **parts: str) -> str:
        return _url(request, route, query, **parts)

    def static(name: str) -> str:
        return _url(request, "site_static", {"v": _STATIC[name].etag}, file=name)

    page = _ENV.get_template(template).render(
        site_title=settings.title if settings else "OpenGrid Registry",
        url=url, static=static, request_path=request.path, **context,
    )  # fmt: skip
    return web.Response(
        text=page, status=status, content_type="text/html", charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )  # fmt: skip


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    """A small HTML error page with ``status`` (usable by the app's error middleware)."""
    title = _TITLES.get(status, f"Error {status}")
    return render(request, "error.html", status, title=title, message=message[:500])


# -- handlers ----------------------------------------------------------------------------


def _choice(value: str | None, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else ""


def _text_param(request: web.Request, name: str, limit: int) -> str:
    value = request.query.get(name, "")
    if len(value) > limit:
        raise ValueError(f"{name} is at most {limit} characters")
    return value.strip()


async def home(request: web.Request) -> web.Response:
    """Search and browse listings."""
    return await _search_page(request, default_kind="")


async def models(request: web.Request) -> web.Response:
    """Model listings (the home page's search, kind=model)."""
    return await _search_page(request, default_kind="model")


async def _search_page(request: web.Request, *, default_kind: str) -> web.Response:
    try:
        q = _text_param(request, "q", MAX_QUERY_CHARS)
        license_ = _text_param(request, "license", MAX_FILTER_CHARS)
        keyword = _text_param(request, "keyword", MAX_FILTER_CHARS)
    except ValueError as exc:
        return error_page(request, 400, str(exc))
    if license_ and not _LICENSE.fullmatch(license_):
        return error_page(request, 400, "license is an SPDX identifier such as MIT")
    kind = _choice(request.query.get("kind", default_kind), KINDS)
    modality = _choice(request.query.get("modality"), MODALITIES)
    online = request.query.get("online") in ("1", "on", "true")
    settings = request.app[SETTINGS]
    size = max(1, min(settings.page_size, 100))
    last_page = MAX_OFFSET // size + 1
    raw_page = request.query.get("page", "1")
    page = int(raw_page) if _PAGE.fullmatch(raw_page) else 1
    page = min(max(page, 1), last_page)
    try:
        found, total = await request.app[STORE].search(
            q, kind=kind or None, modality=modality or None, license=license_ or None,
            keyword=keyword or None, online_within=ONLINE_WINDOW_SECONDS if online else None,
            limit=size, offset=(page - 1) * size,
        )  # fmt: skip
    except InvalidQuery as exc:
        return error_page(request, 400, str(exc))
    rated = await api.ratings(request.app, [item.listing_id for item in found])
    filters = {
        "q": q, "kind": kind, "modality": modality, "license": license_, "keyword": keyword,
        "online": "1" if online else "",
    }  # fmt: skip
    kept = {key: value for key, value in filters.items() if value}
    at_least = total >= MAX_TOTAL  # the store counts to MAX_TOTAL: "1,000+"
    pages = min(max(1, math.ceil(total / size)), last_page)
    if at_least:
        pages = min(max(pages, page + (1 if len(found) == size else 0)), last_page)

    def page_url(number: int) -> str:
        query = {**kept, "page": str(number)} if number > 1 else kept
        return "?" + urlencode(query) if query else "?"

    return render(
        request, "home.html",
        title="Models" if default_kind == "model" else "Find datasets and models",
        filters=filters, kinds=KINDS, modalities=MODALITIES, results=found, ratings=rated,
        total=total, at_least=at_least, page=page, pages=pages,
        numbers=page_numbers(page, pages),
        page_url=page_url, searched=bool(kept), now_zone=DEFAULT_ZONE, when=when,
        form_action=request.path, public_url=_public_url(request),
    )  # fmt: skip


def _viewer_zone(request: web.Request) -> tuple[str, str | None, str]:
    """The viewer's zone, a note if ``?tz`` was refused, and where the zone came from
    (``"query"``: remember it in a cookie, ``"cookie"``, or ``"default"``)."""
    asked = request.query.get("tz")
    if asked is not None:
        if is_zone(asked):
            return asked, None, "query"
        note = "That time zone is not known here; times are shown in UTC."
        return DEFAULT_ZONE, note, "refused"
    cookie = request.cookies.get(TZ_COOKIE)
    if cookie is not None and is_zone(cookie):
        return cookie, None, "cookie"
    return DEFAULT_ZONE, None, "default"


async def _reviews(request: web.Request, listing_id: str) -> list[dict[str, Any]]:
    """The newest :data:`MAX_REVIEWS` reviews (verified by the inbox store when read)."""
    found, _total, _average = await request.app[INBOX].reviews(listing_id, limit=MAX_REVIEWS)
    return [
        {
            "stars": signed.review.stars,
            "text": signed.review.text,
            "reviewer_id": signed.review.reviewer_id,
            "at": signed.review.at,
        }  # fmt: skip
        for signed in found[:MAX_REVIEWS]
    ]


def _page_model(
    wire: str, description_html: str | None, zone: str, now: float
) -> tuple[SignedListing, dict[str, Any]]:
    """The stored listing verified again (up to 1 MiB) and what its page shows (its
    description as rendered at publish; rendered here only for rows older than that)."""
    signed = SignedListing.from_wire(wire.encode())
    model = listing_model(signed.spec, viewer_zone=zone, now=now, description_html=description_html)
    return signed, model


async def listing_page(request: web.Request) -> web.Response:
    """One listing: everything it says, how to connect, and its evidence."""
    listing_id = request.match_info["listing_id"]
    if not _HEX32.fullmatch(listing_id):
        return error_page(request, 404, "There is no listing with that ID.")
    stored = await request.app[STORE].get(listing_id)
    if stored is None:
        return error_page(request, 404, "There is no listing with that ID (or it was deleted).")
    zone, zone_note, source = _viewer_zone(request)
    try:
        async with request.app[RENDERING]:  # parsing, Markdown, mock: not on the event loop
            signed, model = await asyncio.to_thread(
                _page_model, stored.wire, stored.description_html, zone, time.time()
            )
    except InvalidListing:
        logger.error("stored listing %s fails verification", listing_id)
        return error_page(request, 500, "This listing's signature does not hold.")
    if stored.description_html is None:  # written before descriptions were kept rendered
        await request.app[STORE].keep_description_html(
            listing_id, stored.version, str(model["description_html"])
        )
    token, new_token = site_forms.csrf_token(request)
    rated = await api.ratings(request.app, [listing_id])
    reviews = await _reviews(request, listing_id)
    home_url = _home_path(request)
    response = render(
        request, "listing.html",
        title=signed.spec.name, stored=stored, model=model,
        zone=zone, zone_note=zone_note, zone_default=source == "default", rating=rated[listing_id],
        reviews=reviews, when=when, public_url=_public_url(request),
        croissant_url=f"{home_url}api/v1/listings/{listing_id}/croissant.json",
        api_url=f"{home_url}api/v1/listings/{listing_id}",
        csrf=token, reasons=REASONS, max_report=site_forms.MAX_REPORT_CHARS,
    )  # fmt: skip
    if new_token:
        site_forms.set_token(response, token, home_url, secure=request.secure)
    if source == "query":
        response.set_cookie(
            TZ_COOKIE, zone, path=home_url, max_age=365 * 86400, samesite="Lax",
            httponly=True, secure=request.secure,
        )  # fmt: skip
    return response


async def report(request: web.Request) -> web.Response:
    """Take a report about a listing (CSRF-checked), then redirect to a thank-you page."""
    listing_id = request.match_info["listing_id"]
    if site_forms.is_cross_site(request):
        return error_page(request, 403, "Reports are taken only from this site's own pages.")
    fields = await site_forms.form_fields(request)
    if fields is None:
        return error_page(request, 400, "Send the report with the form on the listing page.")
    if not site_forms.same_token(request, fields.get(site_forms.CSRF_FIELD)):
        return error_page(
            request, 403, "The form expired or did not come from this site; reload the "
            "listing page and try again.",
        )  # fmt: skip
    reason = fields.get("reason", "")
    text = fields.get("text", "")
    if reason not in REASONS or len(text) > site_forms.MAX_REPORT_CHARS or "\x00" in text:
        return error_page(
            request, 400,
            f"Choose a reason and write at most {site_forms.MAX_REPORT_CHARS} characters.",
        )  # fmt: skip
    if not _HEX32.fullmatch(listing_id) or await request.app[STORE].get(listing_id) is None:
        return error_page(request, 404, "There is no listing with that ID.")
    try:
        await request.app[REPORTS].add(
            listing_id, reason, text, request.remote, per_client=not _shared_address(request)
        )
    except InvalidReport:
        return error_page(request, 400, "Choose a reason and write a short report.")
    except TooManyReports:
        return error_page(
            request, 429, f"You have sent {MAX_PER_CLIENT_PER_DAY} reports about this listing "
            "today; they have reached the operator.",
        )  # fmt: skip
    except ReportsFull:
        return error_page(request, 503, "Reports cannot be taken right now; try again later.")
    raise web.HTTPSeeOther(_url(request, "site_reported", listing_id=listing_id))


def _shared_address(request: web.Request) -> bool:
    """True if the client is in the exempt networks (a reverse proxy: every visitor has
    its address, so a per-client cap would be one cap for all)."""
    settings = request.app.get(SETTINGS)
    if settings is None or not settings.exempt_networks:
        return False
    return in_networks(request.remote, parse_networks(settings.exempt_networks))


async def reported(request: web.Request) -> web.Response:
    listing_id = request.match_info["listing_id"]
    if not _HEX32.fullmatch(listing_id):
        return error_page(request, 404, "There is no listing with that ID.")
    return render(request, "reported.html", title="Thank you", listing_id=listing_id)


async def host_page(request: web.Request) -> web.Response:
    """A host: its presence and its listings."""
    host_id = request.match_info["host_id"]
    view = await api.host_view(request.app, host_id)
    if view is None:
        return error_page(request, 404, "This registry does not know that host.")
    rated = await api.ratings(request.app, [item.listing_id for item in view.listings])
    return render(
        request, "host.html", title=f"Host {host_id}", view=view, ratings=rated, when=when,
        now_zone=DEFAULT_ZONE, limit=api.MAX_HOST_LISTINGS,
    )  # fmt: skip


async def about(request: web.Request) -> web.Response:
    return render(request, "about.html", title="About", public_url=_public_url(request))


async def static(request: web.Request) -> web.Response:
    item = _STATIC.get(request.match_info["file"])
    if item is None:
        return error_page(request, 404, "No such file.")
    etag = f'"{item.etag}"'
    headers = {"Cache-Control": "public, max-age=31536000, immutable", "ETag": etag}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=item.body, content_type=item.content_type, headers=headers)


async def _report_store(app: web.Application) -> AsyncIterator[None]:
    """The report store, on the database the app opened before (see ``create_app``)."""
    app[REPORTS] = ReportStore(app[ENGINE])
    yield


def add_site_routes(app: web.Application) -> None:
    """Add the website's pages and static files to ``app`` (and, at startup, its report
    store: add the site after the part that opens the database)."""
    app.cleanup_ctx.append(_report_store)
    app[RENDERING] = asyncio.Semaphore(MAX_RENDERING)
    r = app.router
    r.add_get("/", home, name="site_home")
    r.add_get("/models", models, name="site_models")
    r.add_get("/about", about, name="site_about")
    r.add_get("/listings/{listing_id}", listing_page, name="site_listing")
    r.add_post("/listings/{listing_id}/report", report, name="site_report")
    r.add_get("/listings/{listing_id}/reported", reported, name="site_reported")
    r.add_get("/hosts/{host_id}", host_page, name="site_host")
    r.add_get("/static/{file}", static, name="site_static")
