"""JSON API for reviews, session requests, replies and inboxes (``/api/v1/...``).

Write bodies are signed documents, sent as ``application/json`` and passed on as their raw
bytes (the store parses them strictly and verifies them). Reading an inbox or one's sent
requests takes an ``X-Duet-Access`` header: a fresh, single-use signed access document for
that purpose, naming this registry's public URL. Refusals: 422 malformed or forged, 409
refused because of what is stored, 404 unknown, 401 missing or bad access document.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from duet_p2p.registry.access import ACCESS_HEADER, AccessDenied
from duet_p2p.registry.listing import InvalidListing
from registry_server.http import ApiError, json_response, read_json
from registry_server.inbox_store import MAX_SESSIONS_PAGE, InboxStore, NotFound
from registry_server.keys import INBOX, PUBLIC_URL, SETTINGS
from registry_server.store import Conflict, InvalidQuery

__all__ = ["MAX_DOCUMENT_BODY", "add_inbox_routes"]

MAX_DOCUMENT_BODY = 1 << 16
"""Largest request body here (a session document is at most 16 KiB)."""
_HEX32 = re.compile(r"[0-9a-f]{32}")
_NUMBER = re.compile(r"[0-9]{1,6}")
_T = TypeVar("_T")


def _inbox(request: web.Request) -> InboxStore:
    return request.config_dict[INBOX]


def _path_id(request: web.Request, name: str) -> str:
    value = request.match_info.get(name, "")
    if not _HEX32.fullmatch(value):
        raise ApiError(404, "not_found", f"{name} is 32 lower-case hex digits")
    return value


def _int_param(request: web.Request, name: str, default: int) -> int:
    values = request.query.getall(name, [])
    if not values:
        return default
    if len(values) > 1 or not _NUMBER.fullmatch(values[0]):
        raise ApiError(400, "bad_request", f"{name} is one whole number")
    return int(values[0])


async def _body(request: web.Request) -> bytes:
    limit = min(request.config_dict[SETTINGS].max_body_bytes, MAX_DOCUMENT_BODY)
    raw, _ = await read_json(request, limit)
    return raw


async def _run(call: Awaitable[_T]) -> _T:
    """The store's refusals as API errors."""
    try:
        return await call
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except AccessDenied as exc:
        raise _unauthorized(str(exc)) from None
    except InvalidListing as exc:
        raise ApiError(422, "invalid", str(exc)) from None
    except InvalidQuery as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "DuetAccess"})


async def _identity(request: web.Request, purpose: str) -> str:
    values = request.headers.getall(ACCESS_HEADER, [])
    if len(values) != 1:
        raise _unauthorized(f"send one {ACCESS_HEADER} header: a signed access document")
    audience = request.config_dict[PUBLIC_URL]
    return await _run(_inbox(request).check_access(values[0], purpose, audience, time.time()))


# -- reviews ------------------------------------------------------------------------------


async def post_review(request: web.Request) -> web.Response:
    listing_id = _path_id(request, "id")
    raw = await _body(request)
    review, created = await _run(_inbox(request).add_review(listing_id, raw, time.time()))
    return json_response({"review": review.to_json()}, 201 if created else 200)


async def get_reviews(request: web.Request) -> web.Response:
    listing_id = _path_id(request, "id")
    limit = _int_param(request, "limit", 20)
    offset = _int_param(request, "offset", 0)
    found, total, average = await _run(_inbox(request).reviews(listing_id, limit, offset))
    return json_response({
        "total": total, "average": average, "limit": min(max(limit, 1), 100),
        "offset": min(offset, 10_000), "results": [review.to_json() for review in found],
    })  # fmt: skip


# -- sessions -----------------------------------------------------------------------------


async def post_session(request: web.Request) -> web.Response:
    raw = await _body(request)
    session = await _run(_inbox(request).submit_request(raw, time.time()))
    return json_response({"session": session.to_json()}, 201)


async def post_reply(request: web.Request) -> web.Response:
    request_id = _path_id(request, "request_id")
    raw = await _body(request)
    session = await _run(_inbox(request).reply(request_id, raw, time.time()))
    return json_response({"session": session.to_json()}, 201)


def _listing_of(
    purpose: str, fetch: Callable[[InboxStore, str, int, int], Awaitable[list[Any]]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", MAX_SESSIONS_PAGE)
        offset = _int_param(request, "offset", 0)
        identity_id = await _identity(request, purpose)
        found = await _run(fetch(_inbox(request), identity_id, limit, offset))
        return json_response({"results": [session.to_json() for session in found]})

    return handler


get_inbox = _listing_of("inbox", lambda store, who, limit, offset: store.inbox(who, limit, offset))
get_sessions = _listing_of(
    "sessions", lambda store, who, limit, offset: store.sent(who, limit, offset)
)


def add_inbox_routes(app: web.Application) -> None:
    """Add the review, session and inbox endpoints to ``app``."""
    router = app.router
    router.add_post("/api/v1/listings/{id}/reviews", post_review, name="api_review_post")
    router.add_get("/api/v1/listings/{id}/reviews", get_reviews, name="api_reviews")
    router.add_post("/api/v1/sessions", post_session, name="api_session_post")
    router.add_get("/api/v1/sessions", get_sessions, name="api_sessions")
    router.add_post("/api/v1/sessions/{request_id}/replies", post_reply, name="api_session_reply")
    router.add_get("/api/v1/inbox", get_inbox, name="api_inbox")
