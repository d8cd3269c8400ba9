"""JSON responses both servers send (signaling, and the registry beside it): no cache
keeps them; every error is ``{"error": code, "message": text}``."""

from __future__ import annotations

import math
from collections.abc import Mapping

from aiohttp import web

__all__ = ["error_response", "json_response", "json_text_response", "retry_after"]

_NO_STORE = {"Cache-Control": "no-store"}


def json_response(
    data: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response that no cache keeps."""
    return web.json_response(data, status=status, headers={**_NO_STORE, **(headers or {})})


def json_text_response(text: str, status: int = 200) -> web.Response:
    """:func:`json_response` of JSON already encoded (as UTF-8)."""
    return web.Response(text=text, status=status, content_type="application/json",
                        headers=_NO_STORE)  # fmt: skip


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return json_response({"error": code, "message": message}, status, headers)


def retry_after(seconds: float) -> dict[str, str]:
    """A Retry-After header for ``seconds``, rounded up to a whole second (at least 1)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
