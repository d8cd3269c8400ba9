"""The session object users hold (``duet``), and the calls that create it.

``launch_duet`` (owner) and ``join_duet`` (scientist) are synchronous and safe in notebooks:
all I/O runs on duet_p2p's own background loop. ``launch_duet_async`` and
``join_duet_async`` run on the caller's asyncio loop instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from duet_p2p import config, patches
from duet_p2p.allowlist import DEFAULT_ALLOWLIST, Allowlist
from duet_p2p.connect import Connection, ConnectOptions, OwnerHandshake, join
from duet_p2p.connect_host import host_is_online, join_host
from duet_p2p.errors import DuetError
from duet_p2p.identity import Identity
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner import OwnerCore
from duet_p2p.owner.dp_controls import OwnerDP
from duet_p2p.owner.session import new_supervisor
from duet_p2p.owner.store_view import OwnerStoreView
from duet_p2p.owner.worker import WorkerSupervisor
from duet_p2p.permissions import AuditLog
from duet_p2p.permissions.disclosure import DisclosureRules
from duet_p2p.permissions.ledger import PrivacyLedger, open_ledger
from duet_p2p.runtime import get_runtime
from duet_p2p.scientist.dp import RemoteDP
from duet_p2p.scientist.my_requests import MyRequests
from duet_p2p.scientist.remote_store import RemoteStore
from duet_p2p.scientist.remote_torch import RemoteNamespace
from duet_p2p.scientist.session import ScientistCore
from duet_p2p.signaling import SignalingClient
from duet_p2p.transport.channel import ChannelOptions

log = logging.getLogger(__name__)
patches.install()  # tensor.send(duet), .tag(...), .describe(...)
ClientIdCallback = Callable[[str], Any]


def _say(line: str) -> None:
    print(f"> {line}", file=sys.stdout, flush=True)


class Duet:
    """A connected session, as the owner or as the scientist."""

    def __init__(
        self,
        connection: Connection,
        core: OwnerCore | ScientistCore,
        *,
        background: bool,
        identity: Identity | None = None,
        signaling_url: str | None = None,
    ) -> None:
        self._connection = connection
        self._identity = identity
        """The scientist's identity on a standing host (None in a one-off Duet)."""
        self._signaling_url = signaling_url
        self._core = core
        self._background = background
        self.role = connection.role
        self.duet_id = connection.duet_id
        self.client_id = connection.client_id
        if isinstance(core, OwnerCore):
            self.store: OwnerStoreView | RemoteStore = OwnerStoreView(core.owner)
            self.dp: OwnerDP | RemoteDP = OwnerDP(core.owner)
            """Owner: privacy budgets (``set_budget``, ``budget``)."""
        else:
            self.store = RemoteStore(core)
            self.torch = RemoteNamespace(core)
            self.dp = RemoteDP(core, self.store)
            """Scientist: differentially private statistics (``mean``, ``histogram``...)."""
        self._closed = False

    # -- owner ------------------------------------------------------------------------

    @property
    def requests(self) -> Any:
        """Owner: the requests, a table; ``[i].accept()`` / ``.deny(reason)``; handlers.
        Scientist: your own requests with their status (on a standing host, earlier
        sessions' too); ``[i].get()`` fetches a value accepted while you were away."""
        if isinstance(self._core, ScientistCore):
            return MyRequests(self._core)
        return self._owner_core().requests

    @property
    def audit(self) -> AuditLog:
        """The owner's audit log (append-only JSON Lines), shown as a table."""
        return self._owner_core().audit

    def _owner_core(self) -> OwnerCore:
        if not isinstance(self._core, OwnerCore):
            raise DuetError("only the data owner's session has this")
        return self._core

    # -- both -------------------------------------------------------------------------

    def send(self, obj: Any, **options: Any) -> Any:
        """Owner: host ``obj`` in the store. Scientist: place a local tensor or module in
        the owner's process and get its pointer."""
        if isinstance(self._core, OwnerCore):
            return self.store.send(obj, **options)  # type: ignore[union-attr]
        if options:
            raise TypeError(f"the scientist's send takes no options: {sorted(options)}")
        return self._core.sync(self._core.upload(obj))

    def no_grad(self) -> contextlib.AbstractContextManager[None]:
        """Scientist: ops issued inside ``with duet.no_grad():`` (also spelled
        ``duet.torch.no_grad()``) run owner-side under ``torch.no_grad()``: evaluation
        without an autograd graph. Applies to the calling thread only."""
        if isinstance(self._core, OwnerCore):
            raise DuetError("no_grad marks the scientist's remote ops; the owner uses torch's")
        return self._core.no_grad()

    def submit(
        self,
        fn: Callable[..., Any],
        *,
        inputs: Mapping[str, str],
        outputs: Sequence[str] | str,
        reason: str,
        max_seconds: float = 600.0,
        deadline: float | None = None,
        max_result_bytes: int | None = None,
        max_result_elements: int | None = None,
    ) -> Any:
        """Submit an offline job to this standing host (see ``sy.submit_job``): the host
        reviews and runs it later; collect it with ``job.result()`` now or after a
        reconnect (``duet.jobs``), or from the mailbox when offline (``sy.jobs()``)."""
        core = self._scientist_core("submit jobs")
        from duet_p2p.scientist.job_recording import build_job
        from duet_p2p.scientist.jobs import Job, JobBook, _caps, record_job

        extra = _caps(max_result_bytes, max_result_elements)
        allowlist = dict(core._allowlist)
        signed = build_job(self._identity, self.duet_id, fn, inputs=inputs, outputs=outputs,
                           reason=reason, max_seconds=max_seconds, deadline=deadline,
                           allowlist=allowlist, **extra)  # type: ignore[arg-type]  # fmt: skip
        row = core.sync(core.submit_job(signed.to_wire()))
        book = JobBook(self._identity.id)  # type: ignore[union-attr]
        record_job(book, signed, self._signaling_url, "live",
                   row if isinstance(row, dict) else None)  # fmt: skip
        return Job(self._identity, signed.job_id, core=core, book=book)  # type: ignore[arg-type]

    @property
    def jobs(self) -> Any:
        """Your offline jobs on this host, newest first (a table; ``[0].result()``)."""
        core = self._scientist_core("list jobs")
        from duet_p2p.scientist.jobs import JobsList

        return JobsList(self._identity, self.duet_id, core=core)  # type: ignore[arg-type]

    def _scientist_core(self, what: str) -> ScientistCore:
        if not isinstance(self._core, ScientistCore) or self._identity is None:
            raise DuetError(f"only a scientist connected to a standing host can {what} "
                            "(sy.join_duet(host_id, identity=...))")  # fmt: skip
        return self._core

    def plan(self, function: Callable[..., Any], name: str | None = None) -> Any:
        """Scientist: record ``function``'s remote ops once; the owner replays them per call.

        ``step = duet.plan(lambda x, y: ...)`` runs ``function`` on placeholder pointers
        (its arguments) and sends the recorded ops; ``step(x_ptr, y_ptr)`` then runs them
        all from one action, ``step.map(batches, ...)`` once per item of a remote sequence.
        See ``duet_p2p.scientist.plans``.
        """
        if isinstance(self._core, OwnerCore):
            raise DuetError("plans are recorded by the scientist")
        return self._core.plan(function, name)

    @property
    def connected(self) -> bool:
        return not self._closed and not self._connection.transport.closed

    def candidate_types(self) -> tuple[str, str] | None:
        """(local, remote) ICE candidate types in use: host, srflx or relay."""
        return self._connection.candidate_types()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the partner closes the session (True) or ``timeout`` passes (False)."""
        try:
            get_runtime().run(self._wait_closed(timeout))
        except TimeoutError:
            return False
        return True

    async def _wait_closed(self, timeout: float | None) -> None:
        await asyncio.wait_for(self._core.endpoint.closed_event.wait(), timeout)

    def close(self) -> None:
        """Deliver what is queued, tell the partner, release the connection."""
        if self._closed:
            return
        if not self._background:
            raise DuetError("this session runs on your asyncio loop: use 'await duet.aclose()'")
        runtime = get_runtime()
        runtime.run(self.aclose(), timeout=15)
        runtime.remove_closer(self.aclose)

    async def aclose(self) -> None:
        """``close`` for asyncio code."""
        if self._closed:
            return
        self._closed = True
        await self._core.close()

    def __enter__(self) -> Duet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Duet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed"
        return f"<Duet {self.role} {self.duet_id} {state}>"


# -- launching (owner) ------------------------------------------------------------------


@dataclasses.dataclass
class _OwnerSettings:
    allowlist: Allowlist
    limits: OwnerLimits
    audit: AuditLog
    supervisor: WorkerSupervisor
    min_aggregation: int = 1
    ledger: PrivacyLedger | None = None
    disclosure: DisclosureRules | None = None


def _prepare_owner(
    options: ConnectOptions, allowlist: Allowlist | None, limits: OwnerLimits | None,
    audit_path: Any, min_aggregation: int, dp_ledger: Any, disclosure: DisclosureRules | None,
) -> _OwnerSettings:  # fmt: skip
    """The owner's settings; caps incoming messages. Start the worker with ``prestart()``
    on the session's loop, so importing torch there overlaps the connection setup."""
    allowlist, limits = allowlist or DEFAULT_ALLOWLIST, limits or OwnerLimits()
    cap_owner_messages(options, limits)
    if dp_ledger is not None and not isinstance(dp_ledger, PrivacyLedger):
        dp_ledger = open_ledger(dp_ledger)
    return _OwnerSettings(
        allowlist, limits, AuditLog(audit_path), new_supervisor(allowlist, limits),
        min_aggregation, dp_ledger, disclosure,
    )  # fmt: skip


async def _prestart(settings: _OwnerSettings) -> None:
    settings.supervisor.prestart()


def cap_owner_messages(options: ConnectOptions, limits: OwnerLimits) -> None:
    """The owner's transport takes no message larger than an upload may be (plus room for
    the header), so a peer cannot make it buffer more than that."""
    cap = limits.max_upload_bytes + 1024**2
    if options.channel.max_message_bytes > cap:
        options.channel = dataclasses.replace(options.channel, max_message_bytes=cap)


def _join_line(handshake: OwnerHandshake, explicit_url: str | None) -> str:
    from_env = explicit_url is None and config.signaling_url(None) == handshake.signaling_url
    if from_env:
        return f"duet = sy.join_duet('{handshake.duet_id}')"
    return f"duet = sy.join_duet('{handshake.duet_id}', signaling_url='{handshake.signaling_url}')"


def _announce_owner(handshake: OwnerHandshake, explicit_url: str | None) -> None:
    _say("Send the following code to your Duet Partner!")
    _say("import duet_p2p as sy")
    _say(_join_line(handshake, explicit_url))


def launch_duet(
    signaling_url: str | None = None,
    *,
    client_id: str | None = None,
    client_id_callback: ClientIdCallback | None = None,
    ice_servers: list[dict[str, Any]] | None = None,
    host_addresses: list[str] | None = None,
    timeout: float | None = None,
    allowlist: Allowlist | None = None,
    limits: OwnerLimits | None = None,
    audit_path: Any = None,
    min_aggregation: int = 1,
    channel: ChannelOptions | None = None,
    dp_ledger: Any = None,
    disclosure: DisclosureRules | None = None,
) -> Duet:
    """Start a Duet as the data owner and wait for the scientist to join.

    Prints the line to send to the scientist, then confirms the scientist's Client ID:
    ``client_id=`` if given, else ``client_id_callback(duet_id)``, else typed at a prompt.

    ``min_aggregation``: accept handlers never release an exact value summarising fewer
    records. ``disclosure``: further checks on exact releases (DisclosureRules).
    ``dp_ledger``: the privacy budget ledger's file (default: in the owner's data
    directory, ``$DUET_HOME`` if set), shared by all the owner's sessions.
    """
    options = ConnectOptions.resolve(signaling_url, ice_servers, host_addresses, timeout, channel)
    settings = _prepare_owner(options, allowlist, limits, audit_path, min_aggregation,
                              dp_ledger, disclosure)  # fmt: skip
    runtime = get_runtime()
    runtime.run(_prestart(settings))
    handshake = OwnerHandshake(options)
    try:
        runtime.run(handshake.start())
        _announce_owner(handshake, signaling_url)
        confirmed = _confirm_client_id(handshake.duet_id, client_id, client_id_callback)
        connection = runtime.run(handshake.complete(confirmed))
    except BaseException:
        with contextlib.suppress(Exception):
            runtime.run(handshake.abort(), timeout=5)
        with contextlib.suppress(Exception):
            runtime.run(settings.supervisor.close(), timeout=10)
        raise
    duet = runtime.run(_start_owner(connection, settings))
    runtime.add_closer(duet.aclose)
    _say("Connected!")
    return duet


def _confirm_client_id(
    duet_id: str, client_id: str | None, callback: ClientIdCallback | None
) -> str:
    if client_id is not None:
        return client_id
    if callback is not None:
        value = callback(duet_id)
        if inspect.isawaitable(value):
            raise DuetError("client_id_callback must return the ID (use the async API for awaits)")
        return str(value)
    _say("Waiting for the Duet Client ID from your partner...")
    return input("Duet Client ID: ")


async def _start_owner(connection: Connection, settings: _OwnerSettings) -> Duet:
    core = OwnerCore(
        connection, allowlist=settings.allowlist, limits=settings.limits,
        audit=settings.audit, min_aggregation=settings.min_aggregation,
        supervisor=settings.supervisor, ledger=settings.ledger, disclosure=settings.disclosure,
    )  # fmt: skip
    try:
        await core.start()
    except BaseException:
        await core.close()
        raise
    return Duet(connection, core, background=_on_runtime_loop())


def _on_runtime_loop() -> bool:
    runtime = get_runtime()
    try:
        return asyncio.get_running_loop() is runtime.loop
    except RuntimeError:
        return False


async def launch_duet_async(
    signaling_url: str | None = None,
    *,
    client_id: str | None = None,
    client_id_callback: ClientIdCallback | None = None,
    ice_servers: list[dict[str, Any]] | None = None,
    host_addresses: list[str] | None = None,
    timeout: float | None = None,
    allowlist: Allowlist | None = None,
    limits: OwnerLimits | None = None,
    audit_path: Any = None,
    min_aggregation: int = 1,
    channel: ChannelOptions | None = None,
    dp_ledger: Any = None,
    disclosure: DisclosureRules | None = None,
) -> Duet:
    """``launch_duet`` on the caller's asyncio loop; the callback may be async."""
    options = ConnectOptions.resolve(signaling_url, ice_servers, host_addresses, timeout, channel)
    settings = _prepare_owner(options, allowlist, limits, audit_path, min_aggregation,
                              dp_ledger, disclosure)  # fmt: skip
    settings.supervisor.prestart()
    handshake = OwnerHandshake(options)
    try:
        await handshake.start()
        _announce_owner(handshake, signaling_url)
        if client_id is None and client_id_callback is not None:
            value = client_id_callback(handshake.duet_id)
            client_id = str(await value if inspect.isawaitable(value) else value)
        elif client_id is None:
            _say("Waiting for the Duet Client ID from your partner...")
            client_id = await asyncio.to_thread(input, "Duet Client ID: ")
        connection = await handshake.complete(client_id)
    except BaseException:
        await handshake.abort()
        await settings.supervisor.close()
        raise
    duet = await _start_owner(connection, settings)
    _say("Connected!")
    return duet


# -- joining (scientist) ---------------------------------------------------------------


async def _is_host(duet_id: str, options: ConnectOptions) -> bool:
    """Whether ``duet_id`` names a standing host (asked of the signaling server; a wrong
    answer is caught either way: a host signs its answer, a one-off offer hashes to its ID)."""
    if options.signaling_url is None or not isinstance(duet_id, str):
        return False
    async with SignalingClient(options.signaling_url) as client:
        return await host_is_online(client, duet_id.strip().lower())


def _announce_client_id(client_id: str) -> None:
    _say("Send the Duet Client ID back to your Duet Partner!")
    _say(f"Duet Client ID: {client_id}")


def join_duet(
    duet_id: str,
    signaling_url: str | None = None,
    *,
    ice_servers: list[dict[str, Any]] | None = None,
    host_addresses: list[str] | None = None,
    timeout: float | None = None,
    on_client_id: Callable[[str], None] | None = None,
    channel: ChannelOptions | None = None,
    identity: Identity | str | None = None,
) -> Duet:
    """Join the owner's Duet, or connect to a standing host by its Host ID.

    A one-off Duet: prints the Client ID to send back, waits to be connected. A host: signs
    in with your identity (``identity=``: an Identity or its name, default ``"default"``,
    kept in your data directory), so your Client ID stays the same across sessions; the
    host's owner admits it once."""
    options = ConnectOptions.resolve(signaling_url, ice_servers, host_addresses, timeout, channel)
    runtime = get_runtime()
    duet = runtime.run(_join(duet_id, options, on_client_id, identity))
    runtime.add_closer(duet.aclose)
    return duet


async def join_duet_async(
    duet_id: str,
    signaling_url: str | None = None,
    *,
    ice_servers: list[dict[str, Any]] | None = None,
    host_addresses: list[str] | None = None,
    timeout: float | None = None,
    on_client_id: Callable[[str], None] | None = None,
    channel: ChannelOptions | None = None,
    identity: Identity | str | None = None,
) -> Duet:
    """``join_duet`` on the caller's asyncio loop."""
    options = ConnectOptions.resolve(signaling_url, ice_servers, host_addresses, timeout, channel)
    return await _join(duet_id, options, on_client_id, identity)


async def _join(
    duet_id: str,
    options: ConnectOptions,
    on_client_id: Callable[[str], None] | None,
    identity: Identity | str | None = None,
) -> Duet:
    def announce(client_id: str) -> None:
        _announce_client_id(client_id)
        if on_client_id is not None:
            on_client_id(client_id)

    def announce_host(client_id: str) -> None:
        _say(f"Connecting to host {duet_id} as Client ID {client_id}")
        _say("(a host asks its owner to admit a new Client ID once; waiting if need be)")
        if on_client_id is not None:
            on_client_id(client_id)

    standing = await _is_host(duet_id, options)
    who = None
    if standing:
        who = identity if isinstance(identity, Identity) else Identity.load(identity or "default")
        connection = await join_host(duet_id, options, who, on_waiting=announce_host)
    else:
        connection = await join(duet_id, options, on_client_id=announce)
    core = ScientistCore(connection)
    try:
        await core.start()
    except BaseException:
        await core.close()
        raise
    _say("Connected!")
    if standing:
        _say("Objects you compute live in the host's memory until you disconnect; your "
             "requests and the values approved for you are kept (duet.requests).")  # fmt: skip
    return Duet(connection, core, background=_on_runtime_loop(),
                identity=who if standing else None, signaling_url=options.signaling_url)  # fmt: skip
