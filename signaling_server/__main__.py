"""Command line: `python -m signaling_server --host 127.0.0.1 --port 8765` (or `duet-signaling`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections.abc import Sequence

from signaling_server.app import start_server
from signaling_server.config import ServerConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="duet-signaling",
        description="Relay WebRTC offers and answers by Duet ID. Knows nothing else.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port to bind; 0 picks a free one")
    p.add_argument("--ttl", type=float, default=600.0, help="seconds an offer lives")
    p.add_argument("--max-body", type=int, default=65536, help="largest request body, bytes")
    p.add_argument("--rate", type=float, default=20.0, help="requests/s per client IP")
    p.add_argument("--burst", type=int, default=60, help="requests a client may make at once")
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
        ice_servers=ice_servers,
        turn_secret=args.turn_secret or None,
        turn_urls=[u.strip() for u in args.turn_urls.split(",") if u.strip()],
        turn_ttl=args.turn_ttl,
    )


async def serve(config: ServerConfig, host: str, port: int) -> None:
    """Listen until SIGINT or SIGTERM, then close cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await start_server(config, host, port)
    try:
        print(f"duet signaling server listening on {server.url}", flush=True)
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
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(serve(config, args.host, args.port))
    except OSError as exc:
        parser.exit(1, f"duet-signaling: cannot listen on {args.host}:{args.port}: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
