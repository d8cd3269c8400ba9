"""The website's one state-changing form, "Report this listing": CSRF checks and storage.

CSRF: each visitor gets a random token in a ``SameSite=Strict; HttpOnly`` cookie; the form
carries it again as a hidden field, and a POST passes only if both are present and equal
(:func:`hmac.compare_digest`) and neither ``Origin`` nor ``Sec-Fetch-Site`` says the
request came from another site. Reports are kept in memory only, newest last, at most
:data:`MAX_REPORTS` (the oldest are dropped): they are for the operator's eyes and vanish
on restart.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web

from registry_server.http import read_body
from registry_server.keys import PUBLIC_URL

__all__ = [
    "CSRF_COOKIE", "CSRF_FIELD", "MAX_REPORT_CHARS", "MAX_REPORTS", "REASONS", "Report",
    "ReportBox", "csrf_token", "form_fields", "is_cross_site", "same_token",
]  # fmt: skip

CSRF_COOKIE = "registry_csrf"
CSRF_FIELD = "csrf"
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 64
MAX_REPORTS = 1000
MAX_REPORT_CHARS = 1000
MAX_FORM_BYTES = 8192
MAX_FORM_FIELDS = 8
REASONS = {
    "spam": "Spam or advertising",
    "misleading": "Misleading or false description",
    "harmful": "Harmful, abusive or illegal content",
    "personal": "Exposes personal data",
    "other": "Something else",
}


@dataclass(frozen=True)
class Report:
    """A visitor's report about a listing."""

    listing_id: str
    reason: str
    text: str
    at: float


class ReportBox:
    """The newest :data:`MAX_REPORTS` reports, in memory."""

    def __init__(self, limit: int = MAX_REPORTS) -> None:
        self._reports: deque[Report] = deque(maxlen=limit)

    def add(self, report: Report) -> None:
        self._reports.append(report)

    def all(self) -> list[Report]:
        return list(self._reports)

    def __len__(self) -> int:
        return len(self._reports)


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


def now() -> float:
    return time.time()
