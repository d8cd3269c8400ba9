"""Build the signaling app, and run it in-process (used by tests and the library)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from signaling_server.config import ServerConfig
from signaling_server.connections import ConnectionGuard, GuardedTCPSite
from signaling_server.handlers import SignalingHandlers
from signaling_server.host_handlers import HostHandlers
from signaling_server.hosts import HostRegistry, HostState
from signaling_server.mailbox import MailboxState, mailbox_from_config
from signaling_server.mailbox_handlers import MailboxHandlers
from signaling_server.middleware import MAX_BODY, error_middleware, rate_limit_middleware
from signaling_server.ratelimit import RateLimiter, parse_networks
from signaling_server.state import InMemoryState, SignalingState

if TYPE_CHECKING:  # the registry (SQLAlchemy) loads only when one is mounted
    from registry_server.keys import RegistrySettings

logger = logging.getLogger(__name__)

_FD_HEADROOM = 160
"""Files besides admitted connections: a backlog of accepted-then-refused sockets, and more."""

__all__ = ["REGISTRY_PREFIX", "RunningServer", "ServerConfig", "create_app", "start_server"]

REGISTRY_PREFIX = "/registry"
"""Where an optional OpenGrid registry is mounted (``--registry-database``)."""


def create_app(
    config: ServerConfig,
    state: SignalingState | None = None,
    hosts: HostState | None = None,
    mailbox: MailboxState | None = None,
    *,
    registry: RegistrySettings | None = None,
) -> web.Application:
    """The aiohttp application; `state` defaults to a fresh InMemoryState, `hosts` (the
    standing hosts' offers) to a fresh HostRegistry, `mailbox` to the one
    `config.mailbox_state` names (MailboxStoreError if its file cannot be used). The app
    closes `mailbox` when it shuts down. With `registry` settings, an OpenGrid registry
    (:mod:`registry_server`) is mounted at /registry."""
    if state is None:
        state = InMemoryState(
            config.ttl,
            max_entries=config.max_entries,
            max_entries_per_owner=config.max_entries_per_client,
            tombstone_ttl=config.tombstone_ttl,
        )
    if hosts is None:
        hosts = HostRegistry(
            config.ttl,
            host_idle=config.host_idle,
            max_entries=config.max_entries,
            max_offers_per_host=config.max_offers_per_host,
            max_entries_per_owner=config.max_entries_per_client,
        )
    if mailbox is None:
        mailbox = mailbox_from_config(config)
    limiter = RateLimiter(config.rate, config.burst, max_clients=config.max_clients)
    app = web.Application(
        middlewares=[error_middleware, rate_limit_middleware(limiter)],
        client_max_size=config.max_body,
    )
    app[MAX_BODY] = config.max_body
    h = SignalingHandlers(state, config)
    duet = "/v1/duets/{duet_id}"
    app.router.add_post(f"{duet}/offer", h.post_offer)
    app.router.add_get(f"{duet}/offer", h.get_offer)
    app.router.add_post(f"{duet}/answer", h.post_answer)
    app.router.add_get(f"{duet}/answer", h.get_answer)
    app.router.add_get("/health", h.health)
    app.router.add_get("/v1/ice-servers", h.ice_servers)
    # Host long-polls share the duet handlers' per-client budget of concurrent long-polls.
    HostHandlers(hosts, config, waits=h.waits).add_routes(app)
    MailboxHandlers(mailbox, config, waits=h.waits).add_routes(app)

    async def sweeper(app: web.Application) -> AsyncIterator[None]:
        interval = min(config.ttl, config.host_idle, 30.0)
        task = asyncio.create_task(_sweep_forever((state, hosts, mailbox), interval))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def wake_waiters(app: web.Application) -> None:
        await state.close()
        await hosts.close()
        await mailbox.close()

    app.cleanup_ctx.append(sweeper)
    app.on_shutdown.append(wake_waiters)
    if registry is not None:
        from registry_server.app import create_app as create_registry

        app.add_subapp(REGISTRY_PREFIX, create_registry(registry))
    return app


async def _sweep_forever(
    stores: tuple[SignalingState, HostState, MailboxState], interval: float
) -> None:
    while True:
        await asyncio.sleep(interval)
        names = ("duet IDs", "host offers", "mailbox messages")
        for store, what in zip(stores, names, strict=True):
            try:
                dropped = await store.sweep()
            except Exception:
                logger.exception("expiry sweep of %s failed", what)
                continue
            if dropped:
                logger.debug("expired %d %s", dropped, what)


class RunningServer:
    """A server listening on a socket; `url` is where clients reach it."""

    def __init__(self, runner: web.AppRunner, url: str, guard: ConnectionGuard) -> None:
        self._runner = runner
        self._guard = guard
        self.url = url

    @property
    def open_connections(self) -> int:
        """TCP connections currently admitted (refused ones are never counted)."""
        return self._guard.open_connections

    async def close(self) -> None:
        """Stop listening, wake long-polls, and release everything."""
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_server(
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    mailbox: MailboxState | None = None,
    registry: RegistrySettings | None = None,
) -> RunningServer:
    """Start the app on host:port (port 0 picks a free one) and return once it listens;
    `mailbox` and `registry` as for `create_app` (a registry without a public URL gets
    ``http://host:port/registry``).

    Connections pass a ConnectionGuard (connection caps, head and body deadlines) before
    aiohttp serves them; a bare `create_app` under another runner has no such guard.
    """
    if registry is not None and registry.public_url is None:
        if port == 0:
            port = _free_port(host)
        shown = f"[{host}]" if ":" in host else host
        registry = dataclasses.replace(
            registry, public_url=f"http://{shown}:{port}{REGISTRY_PREFIX}"
        )
    runner = web.AppRunner(
        create_app(config, mailbox=mailbox, registry=registry),
        shutdown_timeout=config.shutdown_timeout,
        keepalive_timeout=config.keepalive_timeout,
    )
    guard = ConnectionGuard(
        max_connections=config.max_connections,
        max_per_client=config.max_connections_per_client,
        header_timeout=config.header_timeout,
        body_timeout=config.body_timeout,
        exempt=parse_networks(config.exempt_networks),
    )
    await runner.setup()
    try:
        await GuardedTCPSite(runner, host, port, guard).start()
    except BaseException:
        await runner.cleanup()
        raise
    _warn_if_over_fd_limit(config.max_connections)
    bound_host, bound_port = runner.addresses[0][:2]
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    return RunningServer(runner, f"http://{bound_host}:{bound_port}", guard)


def _free_port(host: str) -> int:
    """A port free on `host` now (so a mounted registry can know its URL before listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


def _warn_if_over_fd_limit(max_connections: int) -> None:
    """Past the open-file limit, accept() fails for everyone before max_connections does."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_connections > soft - _FD_HEADROOM:
        logger.warning(
            "max_connections (%d) is near or above the open-file limit (%d); "
            "raise `ulimit -n` or lower --max-connections",
            max_connections,
            soft,
        )
