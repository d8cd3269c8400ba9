"""Build the registry's aiohttp application, and run it in-process.

:func:`create_app` wires the parts: the JSON API (:mod:`registry_server.api`, and sessions,
reviews and inboxes in :mod:`registry_server.api_inbox`), the website
(:mod:`registry_server.site`), the database (migrated to the latest schema at startup) and
the stores. Middlewares, outermost first: errors (JSON under ``/api/``, a small HTML page
elsewhere; a 500 never shows internals), then per-client rate limits (one bucket for every
request, a stricter one for writes). Every response carries the security headers
(:data:`SECURITY_HEADERS`), set as it is prepared, whichever part made it.

The app also works mounted under a prefix (``parent.add_subapp("/registry", app)``): the
routes take the prefix, and "under /api/" means under ``<prefix>/api/``.
"""

from __future__ import annotations

import html
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from sqlalchemy.ext.asyncio import AsyncEngine

from registry_server import api, api_inbox, migrate, site
from registry_server.api import ENGINE
from registry_server.db import make_engine
from registry_server.http import ApiError, error_response, rate_limit_middleware
from registry_server.inbox_store import InboxStore
from registry_server.keys import INBOX, PUBLIC_URL, SETTINGS, STORE, RegistrySettings
from registry_server.store import RegistryStore
from signaling_server.ratelimit import RateLimiter, in_networks, parse_networks

__all__ = [
    "SECURITY_HEADERS", "RunningRegistry", "check_public_url", "check_settings", "create_app", "start_registry",
]  # fmt: skip

logger = logging.getLogger(__name__)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
DEFAULT_SETTINGS = RegistrySettings()
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_HTTP_TEXT = {
    400: "Bad request",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Invalid",
    429: "Too many requests",
    500: "Server error",
    503: "Unavailable",
}


def check_public_url(url: str) -> str:
    """``url`` without a trailing slash if it is an absolute http(s) URL with no query,
    fragment or credentials; ValueError otherwise."""
    if type(url) is not str or not 0 < len(url) <= 500 or not url.isprintable():
        raise ValueError("the public URL is an http(s) URL of at most 500 characters")
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or parts.username is not None
        or parts.password is not None
        or " " in url
    ):
        raise ValueError(f"not a public URL (http(s)://host[:port][/path]): {url!r}")
    return url.rstrip("/")


def _api_root(app: web.Application) -> str:
    """The path the API lives under, with the mount prefix (``/registry/api/``)."""
    try:
        index = str(app.router["api_index"].url_for())
    except KeyError:
        return "/api/"
    return index.rsplit("/", 1)[0] + "/"


def _error_page(status: int, message: str) -> web.Response:
    title = _HTTP_TEXT.get(status, f"HTTP {status}")
    body = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head><body><main><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(message)}</p></main></body></html>\n"
    )
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )


def _error_middleware(app: web.Application) -> Middleware:
    """Every refusal as JSON ``{"error", "message"}`` under /api/, else a small HTML page."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        root = _api_root(app)
        as_json = request.path.startswith(root) or request.path == root[:-1]
        try:
            return await handler(request)
        except ApiError as exc:
            status, code, message, headers = exc.status, exc.code, exc.message, exc.headers
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            status, code = exc.status, _code(exc.status)
            message = exc.reason if exc.status != 500 else "internal error"
            headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        except Exception:
            logger.exception("unexpected error serving %s %s", request.method, request.path)
            status, code, message, headers = 500, "internal", "internal error", {}
        if as_json:
            return error_response(status, code, message, headers)
        try:
            page = site.error_page(request, status, message)
        except Exception:  # the site's template itself: fall back to a bare page
            logger.exception("cannot render the error page")
            page = _error_page(status, message)
        page.headers.update(headers)
        return page

    return middleware


def _code(status: int) -> str:
    return ApiError(status).code


def _rate_limit_middleware(settings: RegistrySettings) -> Middleware:
    """A bucket per client for all requests and a stricter one for writes; clients in
    ``settings.exempt_networks`` (a same-host reverse proxy, say) skip both."""
    everything = rate_limit_middleware(
        RateLimiter(settings.requests_per_second, settings.burst, max_clients=settings.max_clients)
    )
    per_minute = settings.writes_per_minute
    writes = rate_limit_middleware(
        RateLimiter(
            per_minute / 60.0, max(1, min(10, int(per_minute))), max_clients=settings.max_clients
        )
    )
    exempt = parse_networks(settings.exempt_networks)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if exempt and in_networks(request.remote, exempt):
            return await handler(request)
        if request.method in WRITE_METHODS:
            return await everything(request, lambda r: writes(r, handler))
        return await everything(request, handler)

    return middleware


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def check_settings(settings: RegistrySettings) -> None:
    """ValueError naming the first bad setting."""
    if not settings.requests_per_second > 0 or not settings.writes_per_minute > 0:
        raise ValueError("rates must be > 0")
    if settings.burst < 1 or settings.max_clients < 1 or settings.max_body_bytes < 1024:
        raise ValueError("burst and max_clients must be >= 1, max_body_bytes >= 1024")
    if not 1 <= settings.page_size <= 100:
        raise ValueError("page_size must be 1..100")
    if settings.public_url is not None:
        check_public_url(settings.public_url)
    parse_networks(settings.exempt_networks)


def create_app(
    settings: RegistrySettings = DEFAULT_SETTINGS, *, engine: AsyncEngine | None = None
) -> web.Application:
    """The registry app. Its database is ``engine`` if given (left open at cleanup), else an
    engine made from ``settings.database_url`` (disposed at cleanup); either way it is
    migrated to the latest schema at startup. ValueError on bad settings."""
    check_settings(settings)
    app = web.Application(client_max_size=settings.max_body_bytes)
    app.middlewares.append(_error_middleware(app))
    app.middlewares.append(_rate_limit_middleware(settings))
    app.on_response_prepare.append(_security_headers)
    app[SETTINGS] = settings
    app[PUBLIC_URL] = (
        check_public_url(settings.public_url) if settings.public_url else "http://127.0.0.1:8780"
    )
    if settings.public_url is None:
        logger.warning("no public URL set; access documents must name %s", app[PUBLIC_URL])

    async def database(app: web.Application) -> AsyncIterator[None]:
        own = engine is None
        db = make_engine(settings.database_url) if engine is None else engine
        try:
            await migrate.upgrade(db)
            app[ENGINE] = db
            app[STORE] = RegistryStore(db)
            app[INBOX] = InboxStore(db)
            yield
        finally:
            if own:
                await db.dispose()

    app.cleanup_ctx.append(database)
    api.add_api_routes(app)
    api_inbox.add_inbox_routes(app)
    site.add_site_routes(app)
    return app


class RunningRegistry:
    """A registry listening on a socket; ``url`` is where clients reach it (no trailing /)."""

    def __init__(self, runner: web.AppRunner, url: str, app: web.Application) -> None:
        self._runner = runner
        self.url = url
        self.app = app

    async def close(self) -> None:
        """Stop listening and release the database."""
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningRegistry:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _url_of(sock: socket.socket) -> str:
    bound_host, bound_port = sock.getsockname()[:2]
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    return f"http://{bound_host}:{bound_port}"


async def start_registry(
    settings: RegistrySettings,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    engine: AsyncEngine | None = None,
) -> RunningRegistry:
    """Serve a registry on host:port (0: a free port) and return once it listens. Without
    ``settings.public_url`` the public URL is the address it listens on."""
    sock = _bind(host, port)
    url = _url_of(sock)
    try:
        if settings.public_url is None:
            settings = replace(settings, public_url=url)
        app = create_app(settings, engine=engine)
        runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    return RunningRegistry(runner, url, app)
