"""Middleware: every error leaves as JSON {"error", "message"}; per-client rate limits."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from signaling_server.connections import BodyTimeout
from signaling_server.ratelimit import RateLimiter, address_key
from signaling_server.responses import error_response, retry_after
from signaling_server.state import StateError

logger = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "body_too_large",
    429: "rate_limited",
    503: "unavailable",
}

MAX_BODY = web.AppKey("max_body", int)
"""The app's body limit in bytes, named in 413 messages."""


class ApiError(Exception):
    """A refusal the client should see: HTTP status, error code and a human message."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def client_key(request: web.BaseRequest) -> str:
    """Who a request counts against: its remote IPv4 address or IPv6 /64 (see address_key)."""
    return address_key(request.remote)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every refusal (ours, the state's, aiohttp's) into the JSON error shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except StateError as exc:
        headers = retry_after(exc.retry_after) if exc.retry_after is not None else None
        return error_response(exc.status, exc.code, str(exc), headers)
    except BodyTimeout as exc:
        return error_response(exc.status, exc.code, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        message = _message_for(request, exc)
        return error_response(
            exc.status, _CODES.get(exc.status, f"http_{exc.status}"), message, headers
        )
    except Exception:
        logger.exception("internal error on %s %s", request.method, request.path[:100])
        return error_response(500, "internal_error", "the server failed; it keeps running")


def _message_for(request: web.Request, exc: web.HTTPException) -> str:
    where = f"{request.method} {request.path[:100]}"
    if exc.status == 404:
        return f"no such endpoint: {where}"
    if exc.status == 405:
        return f"method not allowed: {where} (allowed: {exc.headers.get('Allow', 'none')})"
    if exc.status == 413:
        return f"request body too large (limit {request.app[MAX_BODY]} bytes)"
    return exc.reason


def rate_limit_middleware(limiter: RateLimiter) -> Middleware:
    """Refuse with 429 and Retry-After once a client's bucket is empty."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        wait = limiter.acquire(client_key(request))
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                "too many requests from this address; slow down",
                retry_after(wait),
            )
        return await handler(request)

    return middleware
