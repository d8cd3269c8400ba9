"""A running host's link to OpenGrid registries: publish, edit and delete its listings,
send signed heartbeats, and read its inbox of session requests.

What the host published is remembered in ``registry.sqlite`` in its directory (0600, in a
0700 directory): per registry and hosted name, the last signed listing it sent. Publishing
the same name again is an edit of that listing (version + 1, same ID); ``unpublish`` sends
a signed deletion. Rows are verified when read back (the signature, and that they are this
host's); a row that fails is skipped with a warning, never sent.

While the host serves and has listings, two loops run on its event loop: one sends a
:class:`~duet_p2p.registry.listing.SignedHeartbeat` for its listings every
``heartbeat_seconds`` (so they show online), the other reads its inbox every
``inbox_seconds`` and logs new session requests. A registry that is down or refuses costs
a log line and a retry with back-off, never the host. Without listings no loop contacts
any registry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from duet_p2p.errors import DuetError
from duet_p2p.host.config import RegistryOptions
from duet_p2p.host.inbox_view import InboxEntry, InboxView, format_local
from duet_p2p.host.publish import PublishError, PublishingHost, find_hosted, listing_fields
from duet_p2p.host.publish_sample import TextTable
from duet_p2p.host.sqlite_file import SqliteFile, init_schema
from duet_p2p.registry.listing import (
    MAX_HEARTBEAT_LISTINGS,
    InvalidListing,
    ListingSpec,
    SignedDeletion,
    SignedHeartbeat,
    SignedListing,
)
from duet_p2p.text import printable

if TYPE_CHECKING:
    from duet_p2p.identity import Identity
    from duet_p2p.permissions import AuditLog
    from duet_p2p.registry.results import Listing, Session

__all__ = [
    "LISTINGS_FILE", "LinkedHost", "ListingStore", "PublishedListing", "RegistryAdmin",
    "RegistryHost", "RegistryLink",
]  # fmt: skip

log = logging.getLogger(__name__)
T = TypeVar("T")

LISTINGS_FILE = "registry.sqlite"
SCHEMA_VERSION = 1
MAX_LISTINGS = MAX_HEARTBEAT_LISTINGS
"""Listings one host keeps on one registry (one heartbeat names them all)."""
MAX_REGISTRIES = 8
"""Registries one host publishes to."""
MAX_SEEN = 10_000
CALL_TIMEOUT = 15.0
"""Seconds one exchange with a registry may take."""
FIRST_RETRY = 5.0
"""Seconds before the first retry after a failure (then doubling, up to the interval)."""
_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT",
    """CREATE TABLE listings (
        registry TEXT NOT NULL, tag TEXT NOT NULL, listing_id TEXT NOT NULL,
        version INTEGER NOT NULL, wire BLOB NOT NULL, published_at REAL NOT NULL,
        PRIMARY KEY (registry, tag)) STRICT""",
)


# -- what the host remembers -----------------------------------------------------------------


@dataclass(frozen=True)
class PublishedListing:
    """One listing this host published: where, under which hosted name, its last version."""

    registry: str
    tag: str
    signed: SignedListing
    published_at: float

    @property
    def listing_id(self) -> str:
        return self.signed.listing_id

    @property
    def version(self) -> int:
        return self.signed.version

    @property
    def name(self) -> str:
        return self.signed.spec.name

    def row(self) -> dict[str, Any]:
        return {"tag": self.tag, "listing_id": self.listing_id, "version": self.version,
                "name": self.name, "kind": self.signed.spec.kind, "registry": self.registry,
                "published_at": self.published_at,
                "updated_at": self.signed.spec.updated_at}  # fmt: skip


class ListingStore(SqliteFile):
    """``registry.sqlite``: the listings a host published; thread-safe."""

    what = "the host's registry listings"

    def __init__(self, path: Path, host_id: str) -> None:
        super().__init__(path)
        self.host_id = host_id
        self._set_up(_init_schema)

    @classmethod
    def open(cls, host_dir: Path, host_id: str) -> ListingStore:
        return cls(Path(host_dir) / LISTINGS_FILE, host_id)

    def all(self) -> list[PublishedListing]:
        """Every listing remembered, oldest first (rows that fail to verify are skipped)."""
        with self._connection() as db:
            rows = db.execute(
                "SELECT registry, tag, listing_id, version, wire, published_at FROM listings "
                "ORDER BY published_at, registry, tag LIMIT ?",
                (MAX_LISTINGS * MAX_REGISTRIES,),
            ).fetchall()
        return [found for found in map(self._read, rows) if found is not None]

    def get(self, registry: str, tag: str) -> PublishedListing | None:
        with self._connection() as db:
            row = db.execute(
                "SELECT registry, tag, listing_id, version, wire, published_at FROM listings "
                "WHERE registry = ? AND tag = ?",
                (registry, tag),
            ).fetchone()
        return None if row is None else self._read(row)

    def put(self, published: PublishedListing) -> None:
        """Remember ``published`` (replacing the row of its registry and name)."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO listings VALUES (?, ?, ?, ?, ?, ?)",
                (published.registry, published.tag, published.listing_id, published.version,
                 published.signed.to_wire(), published.published_at),
            )  # fmt: skip

    def count(self, registry: str) -> int:
        with self._connection() as db:
            row = db.execute("SELECT COUNT(*) FROM listings WHERE registry = ?", (registry,))
            return int(row.fetchone()[0])

    def remove(self, registry: str, tag: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM listings WHERE registry = ? AND tag = ?", (registry, tag))

    def _read(self, row: tuple[Any, ...]) -> PublishedListing | None:
        registry, tag, listing_id, version, wire, published_at = row
        try:
            signed = SignedListing.from_wire(bytes(wire))
            signed.verify(self.host_id)
            if signed.listing_id != listing_id or signed.version != version:
                raise InvalidListing("the row's columns do not match its signed listing")
            if not isinstance(registry, str) or not isinstance(tag, str):
                raise InvalidListing("the row's registry and name are text")
            return PublishedListing(registry, tag, signed, float(published_at))
        except (InvalidListing, TypeError, ValueError) as exc:
            log.warning("%s: skipping a listing row that does not verify: %s", self.path, exc)
            return None


def _init_schema(db: sqlite3.Connection, path: Path) -> None:
    init_schema(db, path, statements=_SCHEMA, version=SCHEMA_VERSION,
                tables=frozenset({"schema_version", "listings"}),
                what="host registry listings")  # fmt: skip


# -- the link ------------------------------------------------------------------------------


class LinkedHost(PublishingHost, Protocol):
    """What the link needs of its host (a ``Host``; this module sits below it)."""

    identity: Identity
    host_dir: Path
    audit: AuditLog
    loop: asyncio.AbstractEventLoop | None


class RegistryLink:
    """A host's listings on registries, its heartbeats and its inbox (see the module
    docstring). Async methods run on the host's loop; ``call`` runs one from other threads."""

    def __init__(self, host: LinkedHost, options: RegistryOptions | None = None) -> None:
        self.host = host
        self.options = options or RegistryOptions()
        self._store: ListingStore | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self._sessions: dict[str, list[Session]] = {}
        """Per registry, the inbox as last read."""
        self._inbox_read_at: float | None = None
        self._seen: set[str] = set()
        self._failing: dict[str, str] = {}
        """What failed last, per loop and registry (cleared when it works again)."""
        self.last_heartbeat: dict[str, float] = {}
        """Per registry, when it last took a heartbeat (its ``last_seen``)."""
        self._closed = False

    # -- settings and state -----------------------------------------------------------------

    def configure(self, options: RegistryOptions) -> None:
        """Use ``options`` from now on (the loops read the intervals at each turn)."""
        if not isinstance(options, RegistryOptions):
            raise TypeError("configure takes a RegistryOptions")
        self.options = options
        self._poke()

    @property
    def store(self) -> ListingStore:
        if self._store is None:
            if self._closed:
                raise DuetError("the host is closed")
            self._store = ListingStore.open(self.host.host_dir, self.host.id)
        return self._store

    def published(self) -> list[PublishedListing]:
        """What this host published, oldest first."""
        return self.store.all()

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    # -- publishing ----------------------------------------------------------------------------

    async def publish_async(
        self, obj_or_tag: Any, *, registry_url: str | None = None, **description: Any
    ) -> Listing:
        """List a hosted object (see ``Host.publish``); an edit when its name was listed on
        that registry before."""
        from duet_p2p.registry.client import RegistryClient

        self._check_open()
        record = find_hosted(self.host, obj_or_tag)
        tag = record.tags[0]
        url = self.options.resolved_url(registry_url)
        value = obj_or_tag if not isinstance(obj_or_tag, str) else None
        words = _owner_words(description)
        kind, fields = await asyncio.to_thread(listing_fields, self.host, record, value, **words)
        if not record.searchable:
            log.warning("%r is hosted with searchable=False: scientists who connect will not "
                        "see it listed in duet.store", tag)  # fmt: skip
        identity = self.host.identity
        async with self._lock():
            previous = await asyncio.to_thread(self.store.get, url, tag)
            if previous is None:
                await self._check_room(url)
                spec = ListingSpec.new(identity, kind=kind, **fields)
            else:
                if previous.signed.spec.kind != kind:
                    raise PublishError(
                        f"{tag!r} is listed as a {previous.signed.spec.kind}; unpublish it "
                        f"first to list it as a {kind}"
                    )
                spec = previous.signed.spec.edit(**fields)
            signed = spec.sign(identity)
            async with RegistryClient(url, timeout=CALL_TIMEOUT) as client:
                listing = await client.publish(signed)
            published = PublishedListing(
                url, tag, signed, previous.published_at if previous else time.time()
            )
            await asyncio.to_thread(self.store.put, published)
        self.host.audit.event(
            "listing_published", registry=url, tag=tag, listing_id=signed.listing_id,
            version=signed.version,
        )  # fmt: skip
        log.info("published %r on %s as listing %s (version %d)", tag, url, signed.listing_id,
                 signed.version)  # fmt: skip
        self.start()
        self._poke()
        return listing

    async def _check_room(self, url: str) -> None:
        rows = await asyncio.to_thread(self.store.all)
        registries = {row.registry for row in rows}
        if url not in registries and len(registries) >= MAX_REGISTRIES:
            raise PublishError(f"a host publishes to at most {MAX_REGISTRIES} registries")
        if sum(row.registry == url for row in rows) >= MAX_LISTINGS:
            raise PublishError(f"a host keeps at most {MAX_LISTINGS} listings on one registry")

    async def unpublish_async(self, tag: str, *, registry_url: str | None = None) -> list[str]:
        """Delete the listings of hosted name ``tag`` (on ``registry_url`` only, if given)
        with signed deletions; the IDs deleted. A listing the registry no longer knows is
        forgotten here too."""
        from duet_p2p.registry.client import RegistryClient, RegistryError

        self._check_open()
        if not isinstance(tag, str):
            raise PublishError("unpublish takes the hosted name a listing was published as")
        only = None if registry_url is None else self.options.resolved_url(registry_url)
        deleted: list[str] = []
        async with self._lock():
            rows = [r for r in await asyncio.to_thread(self.store.all)
                    if r.tag == tag and (only is None or r.registry == only)]  # fmt: skip
            if not rows:
                where = f" on {only}" if only else ""
                raise PublishError(f"this host has published nothing as {tag[:100]!r}{where}")
            for row in rows:
                deletion = SignedDeletion.issue(self.host.identity, row.signed)
                try:
                    async with RegistryClient(row.registry, timeout=CALL_TIMEOUT) as client:
                        await client.delete(deletion)
                except RegistryError as exc:
                    if exc.status != 404:
                        raise
                    log.info("listing %s is unknown to %s already; forgetting it",
                             row.listing_id, row.registry)  # fmt: skip
                await asyncio.to_thread(self.store.remove, row.registry, row.tag)
                self.host.audit.event("listing_deleted", registry=row.registry, tag=tag,
                                      listing_id=row.listing_id)  # fmt: skip
                deleted.append(row.listing_id)
        return deleted

    # -- the inbox -----------------------------------------------------------------------------

    async def inbox_async(self, *, refresh: bool = True) -> InboxView:
        """The session requests to this host's listings, newest first. ``refresh``: read
        every registry now (one that cannot be reached shows as last read)."""
        problems: list[str] = []
        if refresh:
            problems = await self._poll()
        names = {row.listing_id: row.name for row in await asyncio.to_thread(self.store.all)}
        entries = [
            self._entry(registry, session, names)
            for registry, sessions in list(self._sessions.items())
            for session in sessions
        ]
        entries.sort(key=lambda e: e.requested_at, reverse=True)
        note = None
        if problems:
            note = "Could not read " + "; ".join(problems)
        return InboxView(entries, note=note)

    def _entry(self, registry: str, session: Session, names: Mapping[str, str]) -> InboxEntry:
        try:
            message = session.request.open_message(self.host.identity)
        except (InvalidListing, ValueError):
            message = "(a message this host cannot open or show)"
        name = names.get(session.listing_id, "(unpublished listing)")
        return InboxEntry(self, registry, session, name, message)

    async def find_async(self, request_id: str) -> InboxEntry:
        """The inbox entry of ``request_id`` (read afresh); KeyError-like DuetError if none."""
        view = await self.inbox_async()
        for entry in view:
            if entry.request_id == request_id:
                return entry
        raise DuetError(f"no session request {printable(request_id, 64)!r} in this host's inbox")

    async def reply_async(
        self,
        entry: InboxEntry,
        action: str,
        *,
        start: datetime | float | None = None,
        proposed: Sequence[datetime | float] = (),
        message: str = "",
    ) -> InboxEntry:
        """Sign the host's ``action`` on ``entry``'s request and send it; the entry as the
        registry now holds it."""
        from duet_p2p.registry.client import RegistryClient
        from duet_p2p.registry.session import reply_session

        self._check_open()
        session = entry.session
        signed = reply_session(
            self.host.identity, session.request, action, start=start, proposed=proposed,
            message=message, replies=session.replies,
        )  # fmt: skip
        async with RegistryClient(entry.registry, timeout=CALL_TIMEOUT) as client:
            updated = await client.reply(signed)
        sessions = self._sessions.setdefault(entry.registry, [])
        self._sessions[entry.registry] = [
            updated if s.request_id == updated.request_id else s for s in sessions
        ]
        self.host.audit.event("session_reply", request_id=entry.request_id, action=action,
                              start=signed.reply.start)  # fmt: skip
        log.info("session request %s: %s", entry.request_id, action)
        names = {row.listing_id: row.name for row in await asyncio.to_thread(self.store.all)}
        return self._entry(entry.registry, updated, names)

    # -- loops ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the heartbeat and inbox loops, on the host's loop, when the host serves and
        has listings (a no-op otherwise, or when they run)."""
        loop = self.host.loop
        if self._closed or self._tasks or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.start)
            return
        if not self.store.all():
            return
        self._wake = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._heartbeats()),
                       asyncio.ensure_future(self._inbox_loop())]  # fmt: skip

    @property
    def running(self) -> bool:
        """Whether the loops run."""
        return any(not task.done() for task in self._tasks)

    def _poke(self) -> None:
        """Send a heartbeat now (e.g. just after publishing), from any thread."""
        loop, wake = self.host.loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake.set)

    async def _heartbeats(self) -> None:
        failures = 0
        while not self._closed:
            ok = await self._beat()
            failures = 0 if ok else failures + 1
            await self._nap(_delay(self.options.heartbeat_seconds, failures), wakeable=True)

    async def _inbox_loop(self) -> None:
        failures = 0
        while not self._closed:
            await self._nap(_delay(self.options.inbox_seconds, failures))
            problems = await self._poll()
            failures = failures + 1 if problems else 0

    async def _nap(self, seconds: float, *, wakeable: bool = False) -> None:
        wake = self._wake
        if not wakeable or wake is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)
        wake.clear()

    async def _beat(self) -> bool:
        """One heartbeat to each registry this host has listings on; whether all took it."""
        from duet_p2p.registry.client import RegistryClient

        ok = True
        for registry, ids in (await self._by_registry()).items():
            try:
                beat = SignedHeartbeat.issue(self.host.identity, ids[:MAX_HEARTBEAT_LISTINGS])
                async with RegistryClient(registry, timeout=CALL_TIMEOUT) as client:
                    seen = await asyncio.wait_for(client.heartbeat(beat), CALL_TIMEOUT + 5)
                self.last_heartbeat[registry] = seen
                self._recovered("heartbeat", registry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a registry's trouble never stops the host
                ok = False
                self._failed("heartbeat", registry, exc)
        return ok

    async def _poll(self) -> list[str]:
        """Read the inbox on each registry this host has listings on; what failed."""
        from duet_p2p.registry.client import RegistryClient

        problems = []
        registries = await self._by_registry()
        for gone in set(self._sessions) - set(registries):
            del self._sessions[gone]
        for registry in registries:
            try:
                async with RegistryClient(registry, timeout=CALL_TIMEOUT) as client:
                    sessions = await asyncio.wait_for(client.inbox(self.host.identity),
                                                      2 * CALL_TIMEOUT + 5)  # fmt: skip
                self._recovered("inbox", registry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a registry's trouble never stops the host
                self._failed("inbox", registry, exc)
                problems.append(f"{registry} ({printable(str(exc), 200)})")
                continue
            self._sessions[registry] = sessions
            try:
                self._announce(registry, sessions)
            except Exception:  # noqa: BLE001 - what a registry sent never stops the loop
                log.exception("registry %s: cannot announce its session requests", registry)
        self._inbox_read_at = time.time()
        return problems

    def _announce(self, registry: str, sessions: Iterable[Session]) -> None:
        """Log each session request not seen before that waits for the owner."""
        for session in sessions:
            if session.request_id in self._seen:
                continue
            if len(self._seen) >= MAX_SEEN:
                self._seen.clear()
            self._seen.add(session.request_id)
            if session.state.status != "pending":
                continue
            when = format_local(min(session.request.request.proposed))
            log.info(
                "session request %s from scientist %s for listing %s (first proposed %s); "
                "answer with `duet-host inbox` or host.inbox", session.request_id,
                session.scientist_id, session.listing_id, when,
            )  # fmt: skip
            self.host.audit.event("session_requested", registry=registry,
                                  request_id=session.request_id,
                                  listing_id=session.listing_id,
                                  scientist_id=session.scientist_id)  # fmt: skip

    async def _by_registry(self) -> dict[str, list[str]]:
        rows = await asyncio.to_thread(self.store.all)
        found: dict[str, list[str]] = {}
        for row in rows:
            found.setdefault(row.registry, []).append(row.listing_id)
        return found

    def _failed(self, what: str, registry: str, exc: BaseException) -> None:
        key = f"{what} {registry}"
        text = printable(str(exc) or type(exc).__name__, 300)
        if key not in self._failing:
            log.warning("registry %s: %s failed (%s); retrying with back-off", registry, what,
                        text)  # fmt: skip
        else:
            log.debug("registry %s: %s failed again (%s)", registry, what, text)
        self._failing[key] = text

    def _recovered(self, what: str, registry: str) -> None:
        if self._failing.pop(f"{what} {registry}", None) is not None:
            log.info("registry %s: %s works again", registry, what)

    def status(self) -> dict[str, Any]:
        """For ``duet-host status``: listings, loops, the last heartbeats and failures."""
        return {"listings": 0 if self._closed else len(self.store.all()), "loops": self.running, "last_heartbeat": dict(self.last_heartbeat),
                "failing": dict(self._failing)}  # fmt: skip

    # -- closing and calling ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DuetError("the host is closed")

    async def aclose(self) -> None:
        """Stop the loops and close the listings file."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        store, self._store = self._store, None
        if store is not None:
            await asyncio.to_thread(store.close)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 4 * CALL_TIMEOUT) -> T:
        """Run ``coro`` on the host's loop from another thread and wait (on duet_p2p's
        background loop if the host has not started)."""
        loop = self.host.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            from duet_p2p.runtime import get_runtime

            return get_runtime().run(coro, timeout)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise DuetError("a blocking host call was made on the host's own loop; await the "
                            "*_async method instead")  # fmt: skip
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DuetError(f"the registry did not answer within {timeout:g} s") from None


def _delay(interval: float, failures: int) -> float:
    """``interval``, or after failures a shorter first retry doubling up to it."""
    if failures <= 0:
        return interval
    return min(interval, min(FIRST_RETRY, interval) * 2 ** min(failures - 1, 20))


_OWNER_WORDS = frozenset({
    "name", "summary", "description", "license", "keywords", "modality", "citation",
    "creators", "usage_conditions", "availability", "kind", "metrics", "architecture",
    "schema", "policy", "sample", "sample_copies_data",
})  # fmt: skip


def _owner_words(given: Mapping[str, Any]) -> dict[str, Any]:
    """The owner's description of a listing; ``tags`` is another name for ``keywords``,
    ``policy_summary`` for ``policy``."""
    words = dict(given)
    if "tags" in words:
        if "keywords" in words:
            raise PublishError("pass tags= or keywords=, not both")
        words["keywords"] = words.pop("tags")
    if "policy_summary" in words:
        words["policy"] = words.pop("policy_summary")
    unknown = sorted(set(words) - _OWNER_WORDS)
    if unknown:
        raise PublishError(f"publish takes no argument {unknown[0]!r}")
    for key in ("name", "license"):
        if key not in words:
            raise PublishError(f"publish needs {key}= (e.g. name='Ages', license='CC-BY-4.0')")
    if isinstance(words.get("keywords"), str):
        words["keywords"] = [words["keywords"]]
    return words


# -- the control socket's registry commands ------------------------------------------------


class RegistryHost(Protocol):
    """What the registry commands need of their host (a ``Host``)."""

    registry: RegistryLink


class RegistryAdmin:
    """The registry half of ``HostControl`` (mixed into ``duet_p2p.host.admin.HostAdmin``):
    each method runs on a control worker thread and waits for the host's loop."""

    _host: RegistryHost

    @property
    def _link(self) -> RegistryLink:
        return self._host.registry

    def control_publish(
        self,
        tag: str,
        name: str,
        summary: str,
        description: str,
        license: str,
        keywords: list[str],
        registry: str | None,
        modality: str | None,
        usage_conditions: str,
        citation: str | None,
        sample: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        words: dict[str, Any] = {
            "name": name, "summary": summary, "description": description, "license": license,
            "keywords": keywords, "modality": modality, "usage_conditions": usage_conditions,
            "citation": citation,
            "sample": None if sample is None else TextTable(sample["columns"], sample["rows"]),
        }  # fmt: skip
        listing = self._link.call(self._link.publish_async(tag, registry_url=registry, **words))
        return {"listing_id": listing.id, "version": listing.version, "name": listing.name,
                "tag": tag, "registry": self._link.options.resolved_url(registry),
                "online": listing.online}  # fmt: skip

    def control_unpublish(self, tag: str, registry: str | None) -> dict[str, Any]:
        deleted = self._link.call(self._link.unpublish_async(tag, registry_url=registry))
        return {"tag": tag, "deleted": deleted}

    def control_listings(self) -> list[dict[str, Any]]:
        return [row.row() for row in self._link.published()]

    def control_inbox(self) -> dict[str, Any]:
        view = self._link.call(self._link.inbox_async())
        return {"results": [entry.row() for entry in view], "note": view.note}

    def control_inbox_accept(self, request_id: str, at: float | None) -> dict[str, Any]:
        entry = self._link.call(self._link.find_async(request_id))
        return self._link.call(entry.accept_async(at)).row()

    def control_inbox_decline(self, request_id: str, reason: str) -> dict[str, Any]:
        entry = self._link.call(self._link.find_async(request_id))
        return self._link.call(entry.decline_async(reason)).row()

    def control_inbox_propose(
        self, request_id: str, times: list[float], message: str
    ) -> dict[str, Any]:
        entry = self._link.call(self._link.find_async(request_id))
        return self._link.call(entry.propose_async(times, message)).row()
