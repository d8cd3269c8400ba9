"""The website's one state-changing form, "Report this listing": its CSRF checks and fields.

CSRF: each visitor gets a random token in a ``SameSite=Strict; HttpOnly`` cookie; the form
carries it again as a hidden field, and a POST passes only if both are present and equal
(:func:`hmac.compare_digest`) and neither ``Origin`` nor ``Sec-Fetch-Site`` says the
request came from another site. The reports themselves are kept in the database, for the
operator (:mod:`registry_server.reports`, ``duet-registry reports``).
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web

from registry_server.http import read_body
from registry_server.keys import PUBLIC_URL
from registry_server.reports import MAX_REPORT_CHARS, REASONS

__all__ = [
    "CSRF_COOKIE", "CSRF_FIELD", "MAX_REPORT_CHARS", "REASONS", "csrf_token", "form_fields",
    "is_cross_site", "same_token", "set_token",
]  # fmt: skip

CSRF_COOKIE = "registry_csrf"
CSRF_FIELD = "csrf"
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 64
MAX_FORM_BYTES = 8192
MAX_FORM_FIELDS = 8


def _valid_token(value: object) -> bool:
    return (
        type(value) is str
        and 20 <= len(value) <= MAX_TOKEN_CHARS
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in value)
    )


def csrf_token(request: web.Request) -> tuple[str, bool]:
    """The visitor's CSRF token and whether it is new (then set it with :func:`set_token`)."""
    token = request.cookies.get(CSRF_COOKIE)
    if _valid_token(token):
        return token, False  # type: ignore[return-value]
    return secrets.token_urlsafe(TOKEN_BYTES), True


def set_token(response: web.StreamResponse, token: str, path: str, *, secure: bool) -> None:
    response.set_cookie(
        CSRF_COOKIE, token, path=path, httponly=True, samesite="Strict", secure=secure,
        max_age=7 * 86400,
    )  # fmt: skip


def same_token(request: web.Request, submitted: object) -> bool:
    """True if the cookie and the form carry the same valid token."""
    cookie = request.cookies.get(CSRF_COOKIE)
    if not _valid_token(cookie) or not _valid_token(submitted):
        return False
    return hmac.compare_digest(str(cookie).encode(), str(submitted).encode())


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def is_cross_site(request: web.Request) -> bool:
    """True if the browser says the request comes from another origin."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    own = {f"{request.scheme}://{request.host}".lower()}
    public = request.app.get(PUBLIC_URL)
    if public:
        own.add(_origin(public))
    return origin.lower() not in own


async def form_fields(request: web.Request) -> dict[str, str] | None:
    """A small urlencoded form's fields (first value of each); None if it is not one."""
    if request.content_type != "application/x-www-form-urlencoded":
        return None
    raw = await read_body(request, MAX_FORM_BYTES)
    try:
        pairs = parse_qsl(
            raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
            max_num_fields=MAX_FORM_FIELDS,
        )  # fmt: skip
    except (UnicodeDecodeError, ValueError):
        return None
    fields: dict[str, str] = {}
    for key, value in pairs:
        fields.setdefault(key, value)
    return fields
