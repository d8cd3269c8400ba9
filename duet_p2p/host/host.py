"""A standing host: one owner serving many scientists, concurrently and over time.

The host has a persistent identity (its Host ID is the hash of its key), waits on the
signaling server for offers addressed to it, admits scientists by its rule, and serves each
in a session of its own (a monitor and a sandboxed worker of its own) against one
``Owner``: the hosted data, requests and handlers, audit log and privacy ledger are
shared; a scientist's objects, requests and quotas are theirs alone. Requests, decisions,
admissions and handlers' counters are kept in the host's directory, so they survive a
restart; a value accepted while its scientist was away waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from duet_p2p.allowlist import DEFAULT_ALLOWLIST, Allowlist
from duet_p2p.connect import ConnectOptions
from duet_p2p.connect_host import HostListener, HostOffer
from duet_p2p.errors import DuetError
from duet_p2p.host.admissions import ADMITTED, REFUSED, AdmissionPolicy, AdmissionsView
from duet_p2p.host.config import RegistryOptions
from duet_p2p.host.inbox_view import InboxView
from duet_p2p.host.jobs import HostJobs, JobSettings
from duet_p2p.host.jobs_view import JobsView
from duet_p2p.host.registry_link import PublishedListing, RegistryLink
from duet_p2p.host.state import HostState, StoredRequest
from duet_p2p.identity import Identity
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.dp_controls import OwnerDP
from duet_p2p.owner.owner import Owner
from duet_p2p.owner.session import OwnerCore, new_supervisor
from duet_p2p.owner.store_view import OwnerStoreView
from duet_p2p.owner.worker import WorkerSupervisor
from duet_p2p.permissions import AuditLog, Request
from duet_p2p.permissions.disclosure import DisclosureRules
from duet_p2p.permissions.ledger import open_ledger
from duet_p2p.table import Table, TableView, format_clock

if TYPE_CHECKING:
    from duet_p2p.registry.results import Listing

log = logging.getLogger(__name__)

ADMISSION_WAIT = 240.0
"""Seconds an offer waits for the owner to decide an admission (the scientist waits too)."""
HOUSEKEEPING_SECONDS = 1.0
KEPT_REQUESTS = 100_000
"""Decided requests remembered in the host's state (the audit log keeps every one)."""


class Host:
    """A standing host. Like an owner's Duet for hosting and deciding: ``data.send(host)``,
    ``host.store``, ``host.requests`` (with handlers), ``host.audit``, ``host.dp``; and
    ``host.admissions``, ``host.scientists``, ``host.id``, ``host.close()``; on an OpenGrid
    registry: ``host.publish(...)``, ``host.unpublish(tag)``, ``host.listings``,
    ``host.inbox``."""

    def __init__(
        self,
        *,
        identity: Identity,
        options: ConnectOptions,
        host_dir: Path,
        admit: str | Iterable[str] = "ask",
        allowlist: Allowlist | None = None,
        limits: OwnerLimits | None = None,
        min_aggregation: float = 1,
        disclosure: DisclosureRules | None = None,
        keep_released: float = 7 * 24 * 3600.0,
        request_expiry: float | None = None,
        max_scientists: int = 16,
        max_pending_admissions: int = 32,
        jobs: JobSettings | None = None,
        registry: RegistryOptions | None = None,
    ) -> None:
        host_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.identity = identity
        self.id = identity.id
        self.host_dir = host_dir
        self.options = options
        self.state = HostState.open(host_dir)
        self.audit = AuditLog(host_dir / "audit.jsonl")
        self.owner = Owner(
            allowlist=allowlist or DEFAULT_ALLOWLIST, limits=limits or OwnerLimits(),
            audit=self.audit, min_aggregation=min_aggregation, ledger=None,
            disclosure=disclosure, journal=self.state, keep_released=keep_released,
            expire_after=request_expiry,
        )  # fmt: skip
        self._ledger_path = host_dir / "privacy_ledger.sqlite"
        self.admission = AdmissionPolicy(
            admit if isinstance(admit, str) else tuple(admit), self.state, self.audit,
            max_pending=max_pending_admissions,
        )  # fmt: skip
        self.max_scientists = max_scientists
        self.store = OwnerStoreView(self.owner)
        self.dp = OwnerDP(self.owner)
        """Privacy budgets (``set_budget``, ``set_total_budget``, ``budget``)."""
        self.admissions = AdmissionsView(self.admission)
        """Scientists waiting to be let in (``[0].accept()``), and earlier decisions."""
        self._sessions: dict[str, OwnerCore] = {}
        self._connecting: dict[str, asyncio.Task[Any]] = {}
        """Connections being made, one per Client ID (a newer attempt replaces the older)."""
        self._listener = HostListener(identity, options, self._on_offer)
        self._tasks: list[asyncio.Task[None]] = []
        self._session_tasks: set[asyncio.Task[None]] = set()
        self._spare: WorkerSupervisor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started_at = time.time()
        self._closed = False
        settings = JobSettings() if jobs is None else jobs
        self._jobs: HostJobs | None = HostJobs(self, settings) if settings.enabled else None
        self.owner.jobs = self._jobs
        self.registry = RegistryLink(self, registry)
        """Listings on registries, heartbeats and the inbox (``[registry]`` in host.toml)."""

    # -- the owner's API ----------------------------------------------------------------

    @property
    def requests(self) -> Any:
        """The requests of every scientist: a table; ``[i].accept()``; handlers."""
        return self.owner.requests

    def send(self, obj: Any, **options: Any) -> Any:
        """Host ``obj`` (see ``host.store.send``); every connected scientist is told."""
        return self.store.send(obj, **options)

    @property
    def jobs(self) -> JobsView:
        """Offline jobs: a table; ``[i].approve()``, ``.reject(reason)``, ``.release()``,
        ``.withhold(reason)``, ``.review``, ``.outputs``, ``.preview()``."""
        if self._jobs is None:
            raise DuetError("this host does not take jobs (JobSettings(enabled=False))")
        return JobsView(self._jobs)

    @property
    def scientists(self) -> ScientistsView:
        """The scientists connected now."""
        return ScientistsView(self)

    def connected(self) -> list[str]:
        """Client IDs of the scientists connected now."""
        return list(self._sessions)

    @property
    def online(self) -> bool:
        """Whether the signaling server lists this host now."""
        return self._listener.online.is_set() and not self._closed

    # -- on a registry ----------------------------------------------------------------------

    async def publish_async(
        self,
        obj_or_tag: Any,
        *,
        registry_url: str | None = None,
        name: str,
        license: str,
        summary: str = "",
        description: str = "",
        tags: Iterable[str] = (),
        modality: str | None = None,
        citation: str | None = None,
        creators: Iterable[str | Mapping[str, str]] = (),
        usage_conditions: str = "",
        availability: Sequence[Mapping[str, Any]] = (),
        kind: str | None = None,
        metrics: Iterable[Mapping[str, Any]] | Mapping[str, float] = (),
        architecture: Mapping[str, Any] | None = None,
        schema: Sequence[Mapping[str, Any]] | None = None,
        policy_summary: str | None = None,
        sample: Any = None,
        sample_copies_data: bool = False,
    ) -> Listing:
        """:meth:`publish` on the host's loop."""
        return await self.registry.publish_async(
            obj_or_tag, registry_url=registry_url, name=name, license=license, summary=summary,
            description=description, keywords=list(tags), modality=modality, citation=citation,
            creators=creators, usage_conditions=usage_conditions, availability=availability,
            kind=kind, metrics=metrics, architecture=architecture, schema=schema,
            policy=policy_summary, sample=sample, sample_copies_data=sample_copies_data,
        )  # fmt: skip

    def publish(self, obj_or_tag: Any, **listing: Any) -> Listing:
        """List a hosted object on an OpenGrid registry: a signed description, never the
        data. Returns the listing (``.id``); publishing the same object again is an edit.

        ``obj_or_tag``: the hosted tensor, module or DataFrame, what ``host.send`` returned,
        or its name. ``registry_url`` (default ``[registry] url``, ``$DUET_REGISTRY_URL``),
        ``name`` and ``license`` (SPDX) are required; ``summary``, ``description``
        (Markdown), ``tags``, ``modality``, ``citation``, ``creators``,
        ``usage_conditions``, ``availability`` (``[{"days": ["mon"], "start": "09:00",
        "end": "17:00", "tz": "Europe/Paris"}]``) are the owner's words. The schema (a
        tensor's dtype and shape, a table's columns, a model's architecture), size, access
        modes, signaling URL and a summary of this host's approval rules are filled in
        (``schema=``, ``policy_summary=`` override). Models (``kind="model"``, inferred
        for modules) take ``metrics``: ``{"accuracy": 0.98}`` (self-reported) or
        ``[{"name", "value", "dataset": listing_id, "receipt": job.receipt}]`` (a job on
        this host produced it). ``sample`` (a DataFrame, a tensor, or ``{name: values}``;
        at most 100 records) is a small example published to everyone, held to the schema;
        one that copies a record of the hosted data is refused unless
        ``sample_copies_data=True`` (the data is public)."""
        return self.registry.call(self.publish_async(obj_or_tag, **listing))

    async def unpublish_async(self, tag: str, *, registry_url: str | None = None) -> list[str]:
        """:meth:`unpublish` on the host's loop."""
        return await self.registry.unpublish_async(tag, registry_url=registry_url)

    def unpublish(self, tag: str, *, registry_url: str | None = None) -> list[str]:
        """Delete what was published as ``tag`` (on every registry, or ``registry_url``),
        with signed deletions; the listing IDs deleted."""
        return self.registry.call(self.unpublish_async(tag, registry_url=registry_url))

    @property
    def listings(self) -> ListingsView:
        """What this host published: name, listing ID, version, registry."""
        return ListingsView(self.registry.published())

    async def inbox_async(self) -> InboxView:
        """:attr:`inbox` on the host's loop."""
        return await self.registry.inbox_async()

    @property
    def inbox(self) -> InboxView:
        """Session requests scientists sent through the registries this host published to,
        read now, times in your time zone: ``[i].accept()``, ``.decline(reason)``,
        ``.propose(times, message)``."""
        return self.registry.call(self.registry.inbox_async())

    # -- starting -----------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Restore kept requests, then wait for scientists; returns once the signaling
        server lists the host."""
        self.loop = asyncio.get_running_loop()
        self.owner._ledger = await asyncio.to_thread(open_ledger, self._ledger_path)
        self._restore()
        self._spare = new_supervisor(self.owner.allowlist, self.owner.limits)
        await self._spare.warm()
        self.audit.event("host_started", host_id=self.id)
        if self._jobs is not None:
            await self._jobs.start()
        self._tasks = [asyncio.ensure_future(self._listener.run()),
                       asyncio.ensure_future(self._housekeeping())]  # fmt: skip
        try:
            await asyncio.wait_for(self._listener.online.wait(), timeout)
        except TimeoutError:
            await self.aclose()
            raise DuetError(
                f"the signaling server at {self.options.signaling_url} did not list this host "
                f"within {timeout:g} s ({self._listener.last_error or 'no answer'})"
            ) from None
        self.registry.start()
        log.info("host %s is waiting for scientists at %s", self.id, self.options.signaling_url)

    def _restore(self) -> None:
        """Requests pending when the host last stopped are pending again (a DP query's
        budget reservation did not survive: those end as expired)."""
        self.state.expire_dp_pending("the host restarted before a decision")
        for stored in self.state.pending():
            if not stored.has_value:  # still being computed when the host stopped: lost
                self.state.decide(
                    stored.request_id, status="expired", decided_by="host (restarted)",
                    reason="the value was still being computed when the host stopped; ask "
                    "again", decided_at=time.time(), keep_until=None,
                )  # fmt: skip
                continue
            self.owner.requests.restore(_request_of(stored, self.owner.preview_kept))

    async def _housekeeping(self) -> None:
        """Let timed handlers and expiry decide requests while nobody is connected, and
        free kept values past their time."""
        ticks = 0
        while not self._closed:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            ticks += 1
            try:
                self.owner.requests.expire_overdue()
                await asyncio.to_thread(self.state.free_expired)
                if ticks % 600 == 1:
                    await asyncio.to_thread(self.state.prune, KEPT_REQUESTS)
            except Exception:  # noqa: BLE001 - e.g. a full disk: retry next tick
                log.exception("host housekeeping failed")

    # -- scientists arriving ------------------------------------------------------------

    async def _on_offer(self, offer: HostOffer) -> None:
        client_id = offer.client_id
        verdict = self.admission.verdict(client_id)
        if verdict == REFUSED:
            self.audit.event("admission_refused", client_id=client_id)
            await self._listener.refuse(offer, "the host's owner has not admitted you")
            return
        if verdict != ADMITTED:
            log.info("scientist %s asks to connect: waiting for the owner", client_id)
            admitted = await self.admission.ask(client_id, ADMISSION_WAIT)
            if admitted is None:
                await self._listener.refuse(
                    offer, "the host's owner has not decided yet (or too many are waiting); "
                    "try again later")  # fmt: skip
                return
            if not admitted:
                await self._listener.refuse(offer, "the host's owner did not admit you")
                return
        earlier = self._connecting.pop(client_id, None)
        if earlier is not None:  # the newer attempt wins (the earlier one may have failed)
            earlier.cancel()
        if len(self._sessions) - (client_id in self._sessions) + len(self._connecting) >= (
            self.max_scientists
        ):
            await self._listener.refuse(offer, "the host serves as many scientists as it may "
                                        "now; try again later")  # fmt: skip
            return
        attempt = asyncio.current_task()
        assert attempt is not None
        self._connecting[client_id] = attempt
        try:
            await self._connect(offer)
        except asyncio.CancelledError:
            if self._closed:
                raise
            log.info("a newer connection attempt of %s replaced one being made", client_id)
        except Exception as exc:  # noqa: BLE001 - one scientist's failure never stops the host
            log.warning("connecting scientist %s failed: %s", client_id, exc)
        finally:
            if self._connecting.get(client_id) is attempt:
                del self._connecting[client_id]

    async def _connect(self, offer: HostOffer) -> None:
        owner = self.owner
        supervisor = self._take_supervisor()
        try:
            connection = await self._listener.accept(offer)
        except BaseException:
            await asyncio.shield(supervisor.close())
            raise
        core = OwnerCore(
            connection, allowlist=owner.allowlist, limits=owner.limits, audit=owner.audit,
            supervisor=supervisor, owner=owner,
        )  # fmt: skip
        try:
            old = self._sessions.pop(offer.client_id, None)
            if old is not None:  # the same scientist again (e.g. after a crash): newer wins
                await old.close()  # shielded: a newer attempt cannot cut it short
            await core.start()
        except BaseException:
            await core.close()  # closes the connection and the worker supervisor too
            raise
        if self._closed:
            await core.close()
            return
        self._sessions[offer.client_id] = core
        task = asyncio.ensure_future(self._serve_until_closed(core))
        self._session_tasks.add(task)
        task.add_done_callback(self._session_tasks.discard)
        log.info("scientist %s connected", offer.client_id)
        self.owner.later(self.state.seen, offer.client_id)

    def _take_supervisor(self) -> WorkerSupervisor:
        """A worker supervisor with a worker warming up; another is readied for the next
        scientist, so nobody waits for a worker to start."""
        supervisor = self._spare or new_supervisor(self.owner.allowlist, self.owner.limits)
        supervisor.prestart()
        self._spare = None
        if not self._closed:
            self._spare = new_supervisor(self.owner.allowlist, self.owner.limits)
            self._spare.prestart()
        return supervisor

    async def _serve_until_closed(self, core: OwnerCore) -> None:
        client_id = core.connection.client_id
        try:
            await core.endpoint.closed_event.wait()
        finally:
            if self._sessions.get(client_id) is core:
                del self._sessions[client_id]
            await core.close()
            log.info("scientist %s disconnected", client_id)

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop waiting for scientists, close every session (its in-flight replies sent),
        and close the state, ledger and audit log."""
        if self._closed:
            return
        self._closed = True
        await self._listener.close()
        await self.registry.aclose()
        if self._jobs is not None:
            await self._jobs.aclose()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(core.close() for core in sessions), return_exceptions=True)
        for task in list(self._session_tasks):
            task.cancel()
        if self._spare is not None:
            await self._spare.close()
            self._spare = None
        self.audit.event("host_stopped", host_id=self.id)
        self.owner.close()
        if self.owner._ledger is not None:
            with contextlib.suppress(Exception):
                self.owner._ledger.close()
        self.state.close()
        self.audit.close()

    def close(self) -> None:
        """``aclose`` from synchronous code (the host runs on duet_p2p's background loop)."""
        from duet_p2p.runtime import get_runtime

        runtime = get_runtime()
        runtime.run(self.aclose(), timeout=60)
        runtime.remove_closer(self.aclose)

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._sessions)} connected"
        return f"<Host {self.id} {state}>"


class ScientistsView(TableView):
    """``host.scientists``: who is connected now."""

    def __init__(self, host: Host) -> None:
        self._rows = [
            (client_id, core.connection.connect_seconds) for client_id, core in
            list(host._sessions.items())
        ]  # fmt: skip
        self._host = host

    def __len__(self) -> int:
        return len(self._rows)

    def table(self) -> Table:
        return Table(["Client ID", "Connected in"],
                     [[c, f"{s:.2f} s"] for c, s in self._rows],
                     empty_text="No scientist is connected.")  # fmt: skip


class ListingsView(TableView):
    """``host.listings``: what this host published, oldest first; ``[i]`` is a
    ``PublishedListing`` (``.tag``, ``.listing_id``, ``.version``, ``.signed``)."""

    def __init__(self, listings: Sequence[PublishedListing]) -> None:
        self._listings = list(listings)

    def __len__(self) -> int:
        return len(self._listings)

    def __getitem__(self, index: int) -> PublishedListing:
        return self._listings[index]

    def table(self) -> Table:
        rows = [[p.tag, p.listing_id, p.version, p.name, p.registry] for p in self._listings]
        return Table(["Tag", "Listing ID", "Version", "Name", "Registry"], rows,
                     empty_text="Nothing published: host.publish(obj, name=..., license=...)")  # fmt: skip


def _request_of(stored: StoredRequest, preview: Any) -> Request:
    rid = stored.request_id
    return Request(
        request_id=rid, object_id=stored.object_id, name=stored.name, reason=stored.reason,
        lineage=stored.lineage, ops=stored.ops, tags=stored.tags, size_bytes=stored.size_bytes,
        elements=stored.elements, aggregation=stored.aggregation,
        requested_at=stored.requested_at, requester=stored.client_id, error=stored.error,
        checks=stored.checks, _preview=lambda: preview(rid),
    )  # fmt: skip


__all__ = ["Host", "format_clock"]
