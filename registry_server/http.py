"""HTTP plumbing shared by the registry's API and website: JSON errors, body caps, limits.

Every refusal leaves the API as JSON ``{"error": code, "message": text}`` with a 4xx
status; the website turns the same :class:`ApiError` into a small HTML error page.
Bodies are read with a cap (:func:`read_body`), never trusted for their declared length.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from signaling_server.ratelimit import RateLimiter, address_key
from signaling_server.responses import (
    error_response,
    json_response,
    json_text_response,
    retry_after,
)

__all__ = [
    "ApiError", "error_response", "json_response", "rate_limit_middleware", "read_body",
    "json_text_response", "read_json", "retry_after",
]  # fmt: skip

logger = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(Exception):
    """A refusal the client should see: HTTP status, error code and a human message."""

    def __init__(
        self,
        status: int,
        code: str | None = None,
        message: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, f"http_{status}")
        self.message = message or self.code.replace("_", " ")
        self.headers = dict(headers or {})


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 beyond, whatever Content-Length says)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ApiError(413, "body_too_large", f"request body too large (limit {limit} bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body too large (limit {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, limit: int) -> tuple[bytes, Any]:
    """A JSON body (``application/json`` only: a cross-site form cannot send one without
    a CORS preflight) as its raw bytes and parsed value; 415/413/400 otherwise."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await read_body(request, limit)
    try:
        return raw, json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", "the body is not JSON") from None


def rate_limit_middleware(limiter: RateLimiter) -> Middleware:
    """Refuse with 429 and Retry-After once a client's bucket is empty."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        wait = limiter.acquire(address_key(request.remote))
        if wait > 0:
            raise ApiError(
                429, "rate_limited", "too many requests from this address; slow down",
                retry_after(wait),
            )  # fmt: skip
        return await handler(request)

    return middleware
