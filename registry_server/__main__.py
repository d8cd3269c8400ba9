"""Command line: ``python -m registry_server`` (or ``duet-registry``): serve the registry,
``duet-registry migrate`` to bring a database's schema up to date and exit, or
``duet-registry reports`` to read and dismiss visitors' reports about listings."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from duet_p2p.text import printable
from registry_server.keys import DEFAULT_DATABASE, RegistrySettings

if TYPE_CHECKING:
    from registry_server.reports import StoredReport

__all__ = ["main"]

_DESCRIPTION = """\
Serve the OpenGrid Registry: a website and JSON API (/api/v1) where data owners list the
datasets and models their standing hosts hold (signed descriptions, never the data) and
data scientists find them, connect, ask for sessions and review them.
"""
_EPILOG = """\
examples:
  # a registry on this machine, kept in the SQLite file ./registry.db
  duet-registry --host 127.0.0.1 --port 8780 --database sqlite:///registry.db

  # PostgreSQL (asyncpg) for production; the password can come from ~/.pgpass
  duet-registry --database postgresql://registry@127.0.0.1:5432/registry

  # behind a reverse proxy (TLS terminated there, forwarding to 127.0.0.1:8780): name the
  # address clients use, and exempt the proxy, through which every client looks alike,
  # from the per-client limits (then rate-limit in the proxy)
  duet-registry --public-url https://registry.example --exempt 127.0.0.0/8

  # create or upgrade the database schema only, then exit
  duet-registry migrate --database postgresql://registry@127.0.0.1:5432/registry

  # visitors' reports about listings, newest first; dismiss one, or all from one client
  duet-registry reports --database sqlite:///registry.db [--listing ID] [--limit N] [--json]
  duet-registry reports --database sqlite:///registry.db --dismiss REPORT_ID
  duet-registry reports --database sqlite:///registry.db --dismiss-client CLIENT_KEY

The schema is created or migrated at every start. Owners publish with
`duet-host publish TAG --registry URL`; scientists search with
`duet_p2p.registry.search("words", registry_url=URL)`; DUET_REGISTRY_URL sets the default.
"""


def _add_database(p: argparse.ArgumentParser, default: object = DEFAULT_DATABASE) -> None:
    p.add_argument(
        "--database",
        metavar="URL",
        default=default,
        help="where listings live: sqlite:///relative/path.db, sqlite:////absolute/path.db, "
        "or postgresql://user@host:port/dbname (default "
        + (DEFAULT_DATABASE if default is argparse.SUPPRESS else "%(default)s")
        + ")",
    )


def _parser() -> argparse.ArgumentParser:
    defaults = RegistrySettings()
    p = argparse.ArgumentParser(
        prog="duet-registry",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(
        dest="command", metavar="{migrate,reports}", title="command (default: serve)"
    )
    migrate = sub.add_parser("migrate", help="create or upgrade the database schema and exit")
    _add_database(migrate, argparse.SUPPRESS)
    _reports_parser(sub)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument(
        "--port", type=int, default=8780, help="port to bind; 0 picks a free one (default 8780)"
    )
    _add_database(p)
    p.add_argument(
        "--public-url",
        metavar="URL",
        default=None,
        help="the address clients reach this registry at, e.g. behind a reverse proxy "
        "(access documents name it); default http://HOST:PORT as bound",
    )
    p.add_argument("--title", default=defaults.title, help="the site's name (default %(default)s)")
    p.add_argument(
        "--rate",
        type=float,
        default=defaults.requests_per_second,
        help="requests per second per client address (default %(default)s)",
    )
    p.add_argument(
        "--burst",
        type=int,
        default=defaults.burst,
        help="requests a client may make at once before --rate applies (default %(default)s)",
    )
    p.add_argument(
        "--writes-per-minute",
        type=float,
        default=defaults.writes_per_minute,
        help="publishes, edits, deletions, heartbeats, reviews and session messages per "
        "minute per client address (default %(default)s)",
    )
    p.add_argument(
        "--max-body",
        metavar="BYTES",
        type=int,
        default=defaults.max_body_bytes,
        help="largest request body (default %(default)s: a listing is at most 1 MiB)",
    )
    p.add_argument(
        "--exempt",
        metavar="CIDR",
        action="append",
        default=[],
        help="client network free of the rate limits, e.g. a same-host reverse proxy's "
        "127.0.0.0/8; repeatable (default: none)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default %(default)s)",
    )
    return p


def _reports_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reports = sub.add_parser(
        "reports",
        help="list visitors' reports about listings (newest first), or dismiss them",
        description="List the reports visitors made with the website's form, newest first, "
        "or dismiss (delete) them. Report text is the reporter's: control and invisible "
        "characters are removed before it is printed (--json escapes them instead). A "
        "client key is a keyed hash of the reporter's address (never the address itself): "
        "many reports with one key are one source.",
    )
    _add_database(reports, argparse.SUPPRESS)
    reports.add_argument("--listing", metavar="ID", help="only the reports about this listing")
    reports.add_argument(
        "--limit",
        type=int,
        default=50,
        metavar="N",
        help=f"show at most N reports, 1..{MAX_REPORTS_SHOWN} (default %(default)s)",
    )
    reports.add_argument(
        "--json", action="store_true", help="print JSON (one array, non-ASCII escaped)"
    )
    action = reports.add_mutually_exclusive_group()
    action.add_argument("--dismiss", metavar="REPORT_ID", help="delete this report and exit")
    action.add_argument(
        "--dismiss-client",
        metavar="CLIENT_KEY",
        help="delete every report from this client (its key, or the first 16+ characters "
        "shown) and exit",
    )


MAX_REPORTS_SHOWN = 1000
CLIENT_SHOWN = 16
"""Characters of a client key shown in the text listing (enough for --dismiss-client)."""


def _report_lines(report: StoredReport) -> list[str]:
    """One report for a terminal: a header line and its text, every character printable."""
    at = datetime.fromtimestamp(report.created_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    head = (
        f"{printable(report.report_id, 32)}  {at}  listing {printable(report.listing_id, 32)}"
        f"  {printable(report.reason, 16)}  client {printable(report.client_key[:CLIENT_SHOWN], CLIENT_SHOWN)}"
    )
    body = printable(report.text, 1000) if report.text else "(no text)"
    return [head, "    " + body]


async def reports_command(args: argparse.Namespace) -> int:
    """``duet-registry reports``: list, or dismiss; the exit status."""
    from registry_server import migrate
    from registry_server.db import make_engine
    from registry_server.reports import InvalidReport, ReportStore

    engine = make_engine(args.database)
    try:
        if await migrate.current(engine) != migrate.head():
            print(
                "duet-registry: the database schema is not current; run "
                "`duet-registry migrate` first",
                file=sys.stderr,
            )
            return 1
        store = ReportStore(engine)
        try:
            if args.dismiss is not None:
                if not await store.dismiss(args.dismiss):
                    print(
                        f"duet-registry: no report {printable(args.dismiss, 64)}", file=sys.stderr
                    )
                    return 1
                print(f"dismissed report {args.dismiss}")
                return 0
            if args.dismiss_client is not None:
                count = await store.dismiss_client(args.dismiss_client)
                print(f"dismissed {count} report{'s' if count != 1 else ''}")
                return 0
            found = await store.newest(listing_id=args.listing, limit=args.limit)
        except InvalidReport as exc:
            print(f"duet-registry: {exc}", file=sys.stderr)
            return 2
    finally:
        await engine.dispose()
    if args.json:
        print(json.dumps([report.to_json() for report in found], ensure_ascii=True, indent=1))
        return 0
    if not found:
        print("no open reports")
        return 0
    for report in found:
        print("\n".join(_report_lines(report)))
    return 0


def settings_from_args(args: argparse.Namespace) -> RegistrySettings:
    """Settings from parsed arguments (checked when the app is made)."""
    return RegistrySettings(
        database_url=args.database,
        public_url=args.public_url,
        title=args.title,
        max_body_bytes=args.max_body,
        requests_per_second=args.rate,
        burst=args.burst,
        writes_per_minute=args.writes_per_minute,
        exempt_networks=tuple(args.exempt),
    )


async def serve(settings: RegistrySettings, host: str, port: int) -> None:
    """Listen until SIGINT or SIGTERM, then close cleanly."""
    from registry_server.app import start_registry

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    registry = await start_registry(settings, host, port)
    try:
        print(f"OpenGrid registry listening on {registry.url}", flush=True)
        if settings.public_url:
            print(f"public URL: {settings.public_url}", flush=True)
        await stop.wait()
    finally:
        await registry.close()


async def migrate_only(database_url: str) -> None:
    """Create or upgrade the schema of ``database_url``."""
    from registry_server.db import make_engine
    from registry_server.migrate import upgrade

    engine = make_engine(database_url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "reports":
        if not 1 <= args.limit <= MAX_REPORTS_SHOWN:
            parser.error(f"--limit is 1..{MAX_REPORTS_SHOWN}")
        try:
            return asyncio.run(reports_command(args))
        except Exception as exc:  # a bad URL, an unreachable or unusable database
            parser.exit(1, f"duet-registry: cannot read reports from {args.database}: {exc}\n")
    if args.command == "migrate":
        try:
            asyncio.run(migrate_only(args.database))
        except Exception as exc:  # a bad URL, an unreachable or unusable database
            parser.exit(1, f"duet-registry: cannot migrate {args.database}: {exc}\n")
        print(f"database schema is up to date: {args.database}", flush=True)
        return 0
    try:
        settings = settings_from_args(args)
        from registry_server.app import check_settings

        check_settings(settings)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(serve(settings, args.host, args.port))
    except OSError as exc:
        parser.exit(1, f"duet-registry: cannot listen on {args.host}:{args.port}: {exc}\n")
    except Exception as exc:  # the database at startup
        parser.exit(1, f"duet-registry: cannot start: {type(exc).__name__}: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
