"""Connection-level limits, below HTTP: connection caps and slow-client deadlines.

aiohttp reads requests itself, so these sit under it. `GuardedTCPSite` listens with a
protocol factory that refuses a connection over the caps before reading a byte, and
otherwise wraps aiohttp's per-connection `RequestHandler` in a `GuardedProtocol`. The
guard also wraps the aiohttp server's request handler, which aiohttp calls once a
request's head is parsed: so the guard learns when a head is complete and when the
request has been handled, whatever route or middleware answers it.

Deadlines of one connection:

- head: from opening, and again from the end of each request, the client has
  `header_timeout` seconds to deliver a complete request head, or the connection is
  aborted. Trickling bytes does not extend it. A request being handled (a long-poll the
  server holds open) is not waiting for a head, so it is never cut by this.
- body: once a head is in, its body has `body_timeout` seconds to arrive; then reading it
  fails with `BodyTimeout` (a JSON 408), and aiohttp closes the connection since the
  body is unfinished.
- idle: aiohttp's own keep-alive timeout (`keepalive_timeout` of the runner).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from signaling_server.ratelimit import ConcurrencyLimiter, Network, address_key, in_networks

logger = logging.getLogger(__name__)

_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class BodyTimeout(TimeoutError):
    """A request body did not arrive in time.

    A TimeoutError, so aiohttp's lingering read of an unfinished body gives up on it
    quietly and closes the connection.
    """

    code, status = "body_timeout", 408


class ConnectionGuard:
    """Admits connections under the global and per-address caps; holds the deadlines.

    Clients in `exempt` networks count only against the global cap.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        max_per_client: int,
        header_timeout: float,
        body_timeout: float,
        exempt: Sequence[Network] = (),
    ) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self._max_connections = max_connections
        self._per_client = ConcurrencyLimiter(max_per_client)
        self._exempt = list(exempt)
        self._open = 0

    @property
    def open_connections(self) -> int:
        """Connections admitted and not yet closed."""
        return self._open

    def client_key(self, host: str | None) -> str | None:
        """The key a connection from `host` counts against, None if it is exempt."""
        return None if in_networks(host, self._exempt) else address_key(host)

    def admit(self, key: str | None) -> bool:
        """Count a new connection from `key` if under the caps; pair True with `release`."""
        if self._open >= self._max_connections:
            return False
        if key is not None and not self._per_client.try_acquire(key):
            return False
        self._open += 1
        return True

    def release(self, key: str | None) -> None:
        self._open -= 1
        if key is not None:
            self._per_client.release(key)

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """What `loop.create_server` calls per connection, serving it with `server`."""
        if not isinstance(server.request_handler, _RequestTracker):
            # Connections copy the handler when made, so this runs before any exists.
            server.request_handler = _RequestTracker(server.request_handler)
        return functools.partial(GuardedProtocol, self, server)


class _RequestTracker:
    """The aiohttp server's request handler, telling the connection when a request starts
    (its head is complete) and ends."""

    def __init__(self, handler: _Handler) -> None:
        self._handler = handler

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        conn = transport.get_protocol() if transport is not None else None
        if not isinstance(conn, GuardedProtocol):
            return await self._handler(request)
        conn.request_started(request.content)
        try:
            return await self._handler(request)
        finally:
            conn.request_finished()


def _peer_host(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) and peer else None


class GuardedProtocol(asyncio.Protocol):
    """One TCP connection: closed at once over the caps, else served by aiohttp in time."""

    def __init__(self, guard: ConnectionGuard, server: web.Server) -> None:
        self._guard = guard
        self._server = server
        self._inner: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._host: str | None = None
        self._key: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: typed, not checked
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._host = _peer_host(transport)
        self._key = self._guard.client_key(self._host)
        if not self._guard.admit(self._key):
            logger.debug("connection from %s refused: too many open", self._host)
            transport.abort()
            return
        self._inner = self._server()
        self._inner.connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        inner, self._inner = self._inner, None
        if inner is None:
            return  # refused: never counted
        self._guard.release(self._key)
        inner.connection_lost(exc)

    # -- deadlines --------------------------------------------------------------------

    def request_started(self, body: StreamReader) -> None:
        """A request head is complete: stop the head deadline, start the body's."""
        if self._inner is None:
            return
        self._cancel_timers()
        if not body.is_eof():
            loop = asyncio.get_running_loop()
            self._body_timer = loop.call_later(self._guard.body_timeout, self._body_expired, body)

    def request_finished(self) -> None:
        """A request was handled: the next head is due within header_timeout."""
        if self._inner is not None:
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._guard.header_timeout, self._head_expired)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._transport is not None and self._inner is not None:
            logger.debug("connection from %s closed: no request head in time", self._host)
            self._transport.abort()

    def _body_expired(self, body: StreamReader) -> None:
        self._body_timer = None
        if not body.is_eof():
            logger.debug("request body from %s did not arrive in time", self._host)
            body.set_exception(
                BodyTimeout(
                    f"the request body did not arrive within {self._guard.body_timeout:g} s"
                )
            )


class GuardedTCPSite(web.BaseSite):
    """A TCP site (like web.TCPSite) whose connections pass a ConnectionGuard first."""

    __slots__ = ("_host", "_port", "_guard")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.protocol_factory(server), self._host, self._port, backlog=self._backlog
        )
