"""The registry's JSON API v1: listings (publish, edit, search, get, delete), heartbeats,
hosts, Croissant JSON-LD and the OpenAPI document.

Bodies are signed documents in their wire form, sent as ``application/json`` (415
otherwise, 413 past the cap); the store parses and verifies them. A malformed or forged
document is 422, one refused because of what the registry holds (stale version, replay,
deleted, another host's listing, quota) 409, a bad query parameter 400, an unknown or
deleted listing 404. A LISTING carries the signed wire (``signed``): clients check it
and trust nothing else for content; presence (``online``, ``last_seen``) and ``rating``
are the registry's word.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from duet_p2p.registry.croissant import croissant_jsonld, jsonld_dumps
from duet_p2p.registry.listing import (
    MAX_SMALL_BODY_BYTES,
    MAX_WIRE_EXTRA,
    InvalidListing,
    SignedDeletion,
    SignedListing,
)
from registry_server import openapi
from registry_server.db import hosts, listings
from registry_server.http import ApiError, json_response, json_text_response, read_json
from registry_server.keys import INBOX, PUBLIC_URL, SETTINGS, STORE
from registry_server.store import (
    MAX_OFFSET,
    MAX_TOTAL,
    ONLINE_WINDOW_SECONDS,
    Conflict,
    InvalidQuery,
    RegistryStore,
    StoredListing,
)

__all__ = [
    "ENGINE", "MAX_HOST_LISTINGS", "MAX_PAGE", "HostView", "add_api_routes", "host_view",
    "listing_json", "parse_search", "ratings",
]  # fmt: skip

ENGINE = web.AppKey("registry_engine", AsyncEngine)
"""The database engine the stores use (set at startup by :mod:`registry_server.app`)."""
API_VERSION = 1
MAX_PAGE = 100
MAX_HOST_LISTINGS = 100
"""A host page lists at most this many of the host's listings, newest first."""
RESPONSE_BUDGET_BYTES = 3 << 20
"""Most bytes of listings one response carries (clients read at most 4 MiB): a page holds
fewer results rather than more bytes (always at least one; a listing is at most 1 MiB,
2 MiB once escaped), so large listings cannot make a search unreadable."""
SEARCH_PARAMS = frozenset(
    {"q", "kind", "modality", "license", "keyword", "online", "limit", "offset"}
)
_HEX32 = re.compile(r"[0-9a-f]{32}")
_INT = re.compile(r"[0-9]{1,6}")
_BOOLS = {"true": True, "1": True, "false": False, "0": False}
_NO_RATING: dict[str, Any] = {"count": 0, "average": None}


@dataclass(frozen=True)
class HostView:
    """A host as the registry knows it: presence and current listings (newest first)."""

    host_id: str
    last_seen: float | None
    online: bool
    listings: list[StoredListing]


# -- helpers -----------------------------------------------------------------------------


def _path_id(request: web.Request, name: str, what: str) -> str:
    """A 32-hex ID from the path; 404 for anything else."""
    value = request.match_info.get(name, "")
    if not _HEX32.fullmatch(value):
        raise ApiError(404, "not_found", f"no such {what}")
    return value


def _one(query: Mapping[str, str], allowed: frozenset[str]) -> dict[str, str]:
    """The query parameters, each at most once and all in ``allowed`` (400 otherwise)."""
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise ApiError(400, "bad_request", f"unknown query parameter {unknown[0][:40]!r}")
    found: dict[str, str] = {}
    for key, value in query.items():
        if key in found:
            raise ApiError(400, "bad_request", f"query parameter {key!r} given twice")
        found[key] = value
    return found


def _int(params: dict[str, str], name: str, default: int, least: int, most: int) -> int:
    raw = params.get(name, "")
    if raw == "":
        return default
    if not _INT.fullmatch(raw) or not least <= int(raw) <= most:
        raise ApiError(400, "bad_request", f"{name} is a whole number from {least} to {most}")
    return int(raw)


def _bool(params: dict[str, str], name: str) -> bool | None:
    raw = params.get(name, "")
    if raw == "":
        return None
    if raw not in _BOOLS:
        raise ApiError(400, "bad_request", f"{name} is true or false")
    return _BOOLS[raw]


def parse_search(query: Mapping[str, str], *, page_size: int = 20) -> dict[str, Any]:
    """Search keyword arguments for :meth:`RegistryStore.search` from URL query parameters
    (``q``, ``kind``, ``modality``, ``license``, ``keyword``, ``online``, ``limit``,
    ``offset``); ApiError 400 on an unknown, repeated or malformed one. An empty value is
    no filter; ``online=false`` is no filter either (any presence)."""
    params = _one(query, SEARCH_PARAMS)
    found: dict[str, Any] = {
        "query": params.get("q", ""),
        "limit": _int(params, "limit", page_size, 1, MAX_PAGE),
        "offset": _int(params, "offset", 0, 0, MAX_OFFSET),
    }
    for name in ("kind", "modality", "license", "keyword"):
        found[name] = params.get(name) or None
    found["online_within"] = ONLINE_WINDOW_SECONDS if _bool(params, "online") else None
    return found


async def ratings(app: web.Application, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each listing's ``{"count", "average"}`` from the inbox store (no reviews: 0, None)."""
    found = await app[INBOX].rating(ids) if ids else {}
    result = {}
    for listing_id in ids:
        count, average = found.get(listing_id, (0, None))
        result[listing_id] = {"count": count, "average": average}
    return result


def listing_json(stored: StoredListing, rating: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The API's LISTING object for a stored listing."""
    return {
        "id": stored.listing_id,
        "host_id": stored.host_id,
        "kind": stored.kind,
        "version": stored.version,
        "name": stored.name,
        "summary": stored.summary,
        "modality": stored.modality,
        "license": stored.license,
        "keywords": list(stored.keywords),
        "created_at": stored.created_at,
        "updated_at": stored.updated_at,
        "published_at": stored.published_at,
        "last_seen": stored.last_seen,
        "online": stored.online,
        "rating": dict(rating or _NO_RATING),
        "signed": stored.wire,
    }


async def _listings_json(app: web.Application, found: list[StoredListing]) -> list[dict[str, Any]]:
    rated = await ratings(app, [item.listing_id for item in found])
    return [listing_json(item, rated[item.listing_id]) for item in found]


async def host_view(
    app: web.Application, host_id: str, *, now: float | None = None
) -> HostView | None:
    """The host's presence and its newest :data:`MAX_HOST_LISTINGS` listings; None if the
    registry has never seen the host (or ``host_id`` is not an ID)."""
    if type(host_id) is not str or not _HEX32.fullmatch(host_id):
        return None
    now = time.time() if now is None else now
    engine = app[ENGINE]
    stmt = (
        select(listings, hosts.c.last_seen)
        .join(hosts, hosts.c.host_id == listings.c.host_id)
        .where(listings.c.host_id == host_id, listings.c.deleted.is_(False))
        .order_by(listings.c.published_at.desc(), listings.c.listing_id)
        .limit(MAX_HOST_LISTINGS)
    )
    async with engine.connect() as conn:
        seen = (
            await conn.execute(select(hosts.c.last_seen).where(hosts.c.host_id == host_id))
        ).first()
        if seen is None:
            return None
        rows = (await conn.execute(stmt)).all()
    last_seen: float | None = seen.last_seen
    online = last_seen is not None and last_seen >= now - ONLINE_WINDOW_SECONDS
    items = [
        StoredListing(
            listing_id=row.listing_id,
            host_id=row.host_id,
            kind=row.kind,
            version=row.version,
            name=row.name,
            summary=row.summary,
            modality=row.modality,
            license=row.license,
            keywords=tuple(json.loads(row.keywords)),
            created_at=row.created_at,
            updated_at=row.updated_at,
            published_at=row.published_at,
            wire=row.wire,
            last_seen=last_seen,
            online=online,
        )
        for row in rows
    ]
    return HostView(host_id, last_seen, online, items)


def _utf8_dumps(value: object) -> str:
    """JSON with text as UTF-8, not ``\\u`` escapes (a listing's size stays near its own)."""
    return json.dumps(value, ensure_ascii=False)


def _within_budget(items: list[dict[str, Any]]) -> list[str]:
    """The first ``items`` that fit :data:`RESPONSE_BUDGET_BYTES` together (at least one),
    each encoded (once: the response is made of these)."""
    kept: list[str] = []
    used = 0
    for item in items:
        text = _utf8_dumps(item)
        used += len(text.encode())
        if kept and used > RESPONSE_BUDGET_BYTES:
            break
        kept.append(text)
    return kept


def _list_response(fields: dict[str, Any], name: str, encoded: list[str]) -> web.Response:
    """``fields`` and, as ``name``, the list of already ``encoded`` items."""
    head = _utf8_dumps(fields)[:-1] + (", " if fields else "")
    return json_text_response(f"{head}{_utf8_dumps(name)}: [{', '.join(encoded)}]}}")


def _refusal(exc: Exception) -> ApiError:
    if isinstance(exc, Conflict):
        return ApiError(409, "conflict", str(exc)[:500])
    if isinstance(exc, InvalidQuery):
        return ApiError(400, "bad_request", str(exc)[:500])
    return ApiError(422, "invalid", str(exc)[:500])


def _small_limit(request: web.Request) -> int:
    """The body cap of a deletion or heartbeat."""
    return min(MAX_SMALL_BODY_BYTES + MAX_WIRE_EXTRA, request.app[SETTINGS].max_body_bytes)


def _store(request: web.Request) -> RegistryStore:
    return request.app[STORE]


# -- handlers ----------------------------------------------------------------------------


async def index(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return json_response(
        {"name": settings.title, "api": API_VERSION, "public_url": request.app[PUBLIC_URL]}
    )


async def search(request: web.Request) -> web.Response:
    kwargs = parse_search(request.query, page_size=request.app[SETTINGS].page_size)
    query = kwargs.pop("query")
    try:
        found, total = await _store(request).search(query, **kwargs)
    except (InvalidQuery, InvalidListing) as exc:
        raise _refusal(exc) from None
    fields = {"total": total, "total_at_least": total >= MAX_TOTAL, "limit": kwargs["limit"],
              "offset": kwargs["offset"]}  # fmt: skip
    return _list_response(
        fields, "results", _within_budget(await _listings_json(request.app, found))
    )


async def publish(request: web.Request) -> web.Response:
    raw, _ = await read_json(request, request.app[SETTINGS].max_body_bytes)
    store = _store(request)
    now = time.time()
    try:
        signed = await store.publish(raw, now=now)
    except InvalidListing as exc:
        raise _refusal(exc) from None
    stored = await store.get(signed.listing_id)
    if stored is None:  # deleted meanwhile
        raise ApiError(409, "conflict", f"listing {signed.listing_id} was deleted meanwhile")
    new = stored.version == 1 and stored.published_at == now
    [body] = await _listings_json(request.app, [stored])
    return json_response({"listing": body}, status=201 if new else 200)


async def get_listing(request: web.Request) -> web.Response:
    listing_id = _path_id(request, "id", "listing")
    stored = await _store(request).get(listing_id)
    if stored is None:
        deletion = await _store(request).deletion(listing_id)
        if deletion is None:
            raise ApiError(404, "not_found", f"no listing {listing_id}")
        # the host's signed deletion, so every client can pin it (a registry that later
        # served an old version again would be caught)
        return json_response({"error": "deleted", "message": f"listing {listing_id} was "
                              "deleted by its host", "deletion": deletion}, 410)  # fmt: skip
    [body] = await _listings_json(request.app, [stored])
    return json_response(body)


async def delete_listing(request: web.Request) -> web.Response:
    listing_id = _path_id(request, "id", "listing")
    raw, _ = await read_json(request, _small_limit(request))
    try:
        deletion = SignedDeletion.from_wire(raw)
        if deletion.listing_id != listing_id:
            raise InvalidListing("the deletion names another listing than the URL")
        await _store(request).delete(raw)
    except InvalidListing as exc:
        raise _refusal(exc) from None
    return json_response({"deleted": listing_id})


async def heartbeat(request: web.Request) -> web.Response:
    raw, parsed = await read_json(request, _small_limit(request))
    now = time.time()
    try:
        await _store(request).heartbeat(raw, now)
    except InvalidListing as exc:
        raise _refusal(exc) from None
    host_id = parsed["body"]["host_id"]  # the store has parsed and verified it
    view = await host_view(request.app, host_id, now=now)
    last_seen = None if view is None else view.last_seen
    return json_response({"host_id": host_id, "last_seen": last_seen})


async def get_host(request: web.Request) -> web.Response:
    host_id = _path_id(request, "host_id", "host")
    _one(request.query, frozenset())
    view = await host_view(request.app, host_id)
    if view is None:
        raise ApiError(404, "not_found", f"no host {host_id} here")
    every = await _listings_json(request.app, view.listings)
    shown = _within_budget(every)
    fields = {"host_id": view.host_id, "last_seen": view.last_seen, "online": view.online,
              "truncated": len(shown) < len(every)}  # fmt: skip
    return _list_response(fields, "listings", shown)


async def croissant(request: web.Request) -> web.Response:
    listing_id = _path_id(request, "id", "listing")
    stored = await _store(request).get(listing_id)
    if stored is None:
        raise ApiError(404, "not_found", f"no listing {listing_id}")
    spec = SignedListing.from_wire(stored.wire.encode()).spec
    page = f"{request.app[PUBLIC_URL]}/listings/{listing_id}"
    doc = croissant_jsonld(spec.to_map(), url=page)
    return web.Response(
        text=jsonld_dumps(doc, indent=2),
        content_type="application/ld+json",
        headers={
            "Content-Disposition": f'attachment; filename="{listing_id}.croissant.json"',
            "Cache-Control": "no-cache",
        },
    )


async def openapi_document(request: web.Request) -> web.Response:
    return json_response(openapi.document(request.app[PUBLIC_URL], request.app[SETTINGS].title))


def add_api_routes(app: web.Application) -> None:
    """Add the listings, heartbeats, hosts, Croissant and OpenAPI routes to ``app``."""
    r = app.router
    r.add_get("/api/v1", index, name="api_index")
    r.add_get("/api/v1/openapi.json", openapi_document, name="api_openapi")
    r.add_get("/api/v1/listings", search, name="api_listings")
    r.add_post("/api/v1/listings", publish, name="api_listings_post")
    r.add_get("/api/v1/listings/{id}", get_listing, name="api_listing")
    r.add_delete("/api/v1/listings/{id}", delete_listing, name="api_listing_delete")
    r.add_get("/api/v1/listings/{id}/croissant.json", croissant, name="api_croissant")
    r.add_post("/api/v1/heartbeats", heartbeat, name="api_heartbeats")
    r.add_get("/api/v1/hosts/{host_id}", get_host, name="api_host")
