"""Command line: `python -m signaling_server --host 127.0.0.1 --port 8765` (or `duet-signaling`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from signaling_server.app import REGISTRY_PREFIX, start_server
from signaling_server.config import LOOPBACK, ServerConfig
from signaling_server.mailbox import MailboxStoreError

if TYPE_CHECKING:
    from registry_server.keys import RegistrySettings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="duet-signaling",
        description="Relay WebRTC offers and answers by ID, and hold end-to-end encrypted "
        "mailbox messages it cannot read. Knows nothing else.",
        epilog="Per-client limits count an IPv4 address, or an IPv6 /64 prefix (one host "
        "often owns a whole /64), as one client.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port to bind; 0 picks a free one")
    p.add_argument("--ttl", type=float, default=600.0, help="seconds an offer lives")
    p.add_argument(
        "--max-body",
        type=int,
        default=65536,
        help="largest request body, bytes "
        "(a mailbox post's cap follows --mailbox-max-message-bytes instead)",
    )
    p.add_argument("--rate", type=float, default=20.0, help="requests/s per client IP")
    p.add_argument("--burst", type=int, default=60, help="requests a client may make at once")
    _add_abuse_limits(p)
    _add_mailbox(p)
    _add_registry(p)
    p.add_argument(
        "--ice-servers",
        default=os.environ.get("DUET_ICE_SERVERS"),
        help='JSON list like [{"urls": "stun:stun.example.org:3478"}] (env DUET_ICE_SERVERS)',
    )
    p.add_argument(
        "--turn-secret",
        default=os.environ.get("DUET_TURN_SECRET"),
        help="TURN REST shared secret (env DUET_TURN_SECRET, preferred: it stays out of ps)",
    )
    p.add_argument(
        "--turn-urls",
        default=os.environ.get("DUET_TURN_URLS", ""),
        help="comma-separated turn:/turns: URLs for TURN REST credentials (env DUET_TURN_URLS)",
    )
    p.add_argument("--turn-ttl", type=int, default=3600, help="TURN credential lifetime, s")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO; SDP text is never logged)",
    )
    return p


def _add_abuse_limits(p: argparse.ArgumentParser) -> None:
    """Flags that stop one client from filling or starving the server.

    A client is an IPv4 address, or an IPv6 /64 prefix (one host may own a whole /64).
    """
    c = ServerConfig
    p.add_argument(
        "--max-entries-per-client",
        metavar="N",
        type=int,
        default=c.max_entries_per_client,
        help="live Duet IDs (posted offers) one client may hold until they expire; more "
        "get HTTP 429, so one client cannot fill the server. Raise it when many hosts "
        "share one NAT address (default %(default)s)",
    )
    p.add_argument(
        "--max-offers-per-host",
        metavar="N",
        type=int,
        default=c.max_offers_per_host,
        help="scientists' offers waiting for one standing host (not yet answered); more "
        "get HTTP 503 until the host catches up (default %(default)s)",
    )
    p.add_argument(
        "--host-idle",
        metavar="SECONDS",
        type=float,
        default=c.host_idle,
        help="seconds a standing host stays listed as online after its last wait ended "
        "(it waits again at once while it runs) (default %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        default=c.max_connections,
        help="open TCP connections, all clients together; more are closed at once. Keep "
        "it well below the open-file limit (ulimit -n) (default %(default)s)",
    )
    p.add_argument(
        "--max-connections-per-client",
        metavar="N",
        type=int,
        default=c.max_connections_per_client,
        help="open TCP connections per client; more are closed at once (default %(default)s)",
    )
    p.add_argument(
        "--exempt-networks",
        metavar="CIDRS",
        default=",".join(LOOPBACK),
        help="comma-separated client networks free of the per-client offer quota and "
        "connection cap; '' for none. The default, loopback, is this host: local tools, or "
        "a same-host reverse proxy through which all clients look alike (default %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        metavar="SECONDS",
        type=float,
        default=c.header_timeout,
        help="seconds a connection gets to send a complete request head, from opening or "
        "from its previous request, before it is closed (slowloris) (default %(default)s)",
    )
    p.add_argument(
        "--body-timeout",
        metavar="SECONDS",
        type=float,
        default=c.body_timeout,
        help="seconds a request body gets to arrive after its head; then HTTP 408 and the "
        "connection is closed (default %(default)s)",
    )
    p.add_argument(
        "--keepalive-timeout",
        metavar="SECONDS",
        type=float,
        default=c.keepalive_timeout,
        help="seconds an idle keep-alive connection stays open; long-polls the server "
        "holds are not idle (default %(default)s)",
    )


def _add_mailbox(p: argparse.ArgumentParser) -> None:
    """Flags of the mailbox: end-to-end encrypted messages held for offline recipients."""
    c = ServerConfig
    p.add_argument(
        "--state",
        metavar="SPEC",
        default=c.mailbox_state,
        help="where mailbox messages live: 'memory' (lost on restart), or "
        "'sqlite:///absolute/path.sqlite' (a file, 0600 in a 0700 directory, one server "
        "instance per file; a restart loses nothing) (default %(default)s)",
    )
    p.add_argument(
        "--mailbox-ttl",
        metavar="SECONDS",
        type=float,
        default=c.mailbox_ttl,
        help="seconds a message is held unless its recipient deletes it (default %(default)s)",
    )
    p.add_argument(
        "--mailbox-max-message-bytes",
        metavar="N",
        type=int,
        default=c.mailbox_max_message_bytes,
        help="largest envelope accepted; at most the default, so that any message fits in "
        "one fetch response (default %(default)s)",
    )
    for what, default, unit in (
        ("messages-per-recipient", c.mailbox_max_messages_per_recipient, "messages held "
         "for one recipient; more get HTTP 507 until it deletes some"),
        ("bytes-per-recipient", c.mailbox_max_bytes_per_recipient, "envelope bytes held "
         "for one recipient; more get HTTP 507 until it deletes some"),
        ("messages-per-client", c.mailbox_max_messages_per_client, "live messages one "
         "client may have posted; more get HTTP 429"),
        ("bytes-per-client", c.mailbox_max_bytes_per_client, "live envelope bytes one "
         "client may have posted; more get HTTP 429"),
        ("bytes", c.mailbox_max_bytes, "envelope bytes held, all recipients together; "
         "more get HTTP 503"),
    ):  # fmt: skip
        p.add_argument(
            f"--mailbox-max-{what}",
            metavar="N",
            type=int,
            default=default,
            help=f"{unit} (default %(default)s)",
        )


def _add_registry(p: argparse.ArgumentParser) -> None:
    """Flags of the optional OpenGrid registry served by the same process."""
    p.add_argument(
        "--registry-database",
        metavar="URL",
        default=None,
        help="also serve an OpenGrid registry (website and /api/v1) under /registry, its "
        "listings in this database: sqlite:///registry.db or "
        "postgresql://user@host:port/dbname (default: no registry)",
    )
    p.add_argument(
        "--registry-public-url",
        metavar="URL",
        default=None,
        help="the registry's address as clients reach it, e.g. behind a reverse proxy "
        f"(default http://HOST:PORT{REGISTRY_PREFIX})",
    )


def registry_from_args(args: argparse.Namespace) -> RegistrySettings | None:
    """The mounted registry's settings, None without --registry-database; ValueError on a
    bad flag."""
    if args.registry_database is None:
        if args.registry_public_url is not None:
            raise ValueError("--registry-public-url needs --registry-database")
        return None
    from registry_server.app import check_settings
    from registry_server.keys import RegistrySettings

    settings = RegistrySettings(
        database_url=args.registry_database, public_url=args.registry_public_url
    )
    check_settings(settings)
    return settings


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build a ServerConfig from parsed arguments; raise ValueError naming the bad one."""
    try:
        ice_servers = json.loads(args.ice_servers) if args.ice_servers else []
    except ValueError as exc:
        raise ValueError(f"--ice-servers is not valid JSON: {exc}") from None
    return ServerConfig(
        ttl=args.ttl,
        max_body=args.max_body,
        max_sdp=min(ServerConfig.max_sdp, args.max_body),
        rate=args.rate,
        burst=args.burst,
        max_entries_per_client=args.max_entries_per_client,
        max_offers_per_host=args.max_offers_per_host,
        host_idle=args.host_idle,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keepalive_timeout=args.keepalive_timeout,
        exempt_networks=[n for n in args.exempt_networks.split(",") if n.strip()],
        ice_servers=ice_servers,
        turn_secret=args.turn_secret or None,
        turn_urls=[u.strip() for u in args.turn_urls.split(",") if u.strip()],
        turn_ttl=args.turn_ttl,
        mailbox_state=args.state,
        mailbox_ttl=args.mailbox_ttl,
        mailbox_max_message_bytes=args.mailbox_max_message_bytes,
        mailbox_max_messages_per_recipient=args.mailbox_max_messages_per_recipient,
        mailbox_max_bytes_per_recipient=args.mailbox_max_bytes_per_recipient,
        mailbox_max_messages_per_client=args.mailbox_max_messages_per_client,
        mailbox_max_bytes_per_client=args.mailbox_max_bytes_per_client,
        mailbox_max_bytes=args.mailbox_max_bytes,
    )


async def serve(
    config: ServerConfig, host: str, port: int, registry: RegistrySettings | None = None
) -> None:
    """Listen until SIGINT or SIGTERM, then close cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await start_server(config, host, port, registry=registry)
    try:
        print(f"duet signaling server listening on {server.url}", flush=True)
        if registry is not None:
            print(f"OpenGrid registry at {server.url}{REGISTRY_PREFIX}", flush=True)
        await stop.wait()
    finally:
        await server.close()
        logging.getLogger("signaling_server").info("signaling server stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
        registry = registry_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(serve(config, args.host, args.port, registry))
    except MailboxStoreError as exc:
        parser.exit(1, f"duet-signaling: cannot use the mailbox state: {exc}\n")
    except OSError as exc:
        parser.exit(1, f"duet-signaling: cannot listen on {args.host}:{args.port}: {exc}\n")
    except Exception as exc:
        if registry is None:
            raise
        parser.exit(1, f"duet-signaling: cannot start the registry: {type(exc).__name__}: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
