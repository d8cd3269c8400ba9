"""Starting a standing host: ``sy.launch_host(...)`` in Python, or from a host.toml."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from duet_p2p.allowlist import Allowlist
from duet_p2p.connect import ConnectOptions
from duet_p2p.duet import cap_owner_messages
from duet_p2p.host.config import RegistryOptions
from duet_p2p.host.host import Host
from duet_p2p.host.jobs import JobSettings
from duet_p2p.identity import Identity
from duet_p2p.limits import OwnerLimits
from duet_p2p.paths import data_dir as default_data_dir
from duet_p2p.permissions.disclosure import DisclosureRules
from duet_p2p.runtime import get_runtime
from duet_p2p.transport.channel import ChannelOptions


def new_host(
    signaling_url: str | None = None,
    *,
    name: str = "host",
    identity: Identity | None = None,
    admit: str | Iterable[str] = "ask",
    data_dir: str | Path | None = None,
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
    ice_servers: list[dict[str, Any]] | None = None,
    host_addresses: list[str] | None = None,
    timeout: float | None = None,
    channel: ChannelOptions | None = None,
) -> Host:
    """A Host, not yet started (see ``launch_host`` for the arguments)."""
    options = ConnectOptions.resolve(signaling_url, ice_servers, host_addresses, timeout, channel)
    limits = limits or OwnerLimits()
    cap_owner_messages(options, limits)
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if identity is None:
        identity = Identity.load(name, directory=base / "identities")
    return Host(
        identity=identity, options=options, host_dir=base / "hosts" / name, admit=admit,
        allowlist=allowlist, limits=limits, min_aggregation=min_aggregation,
        disclosure=disclosure, keep_released=keep_released, request_expiry=request_expiry,
        max_scientists=max_scientists, max_pending_admissions=max_pending_admissions,
        jobs=jobs, registry=registry,
    )  # fmt: skip


def launch_host(signaling_url: str | None = None, **options: Any) -> Host:
    """Start a standing host and return once the signaling server lists it.

    Scientists connect with ``sy.join_duet(host.id, signaling_url=...)``. ``name`` picks
    the identity (and so the Host ID) and the host's directory in ``data_dir`` (default:
    ``$DUET_HOME`` or the per-user data directory): ``identities/<name>.key`` and
    ``hosts/<name>/`` (requests, decisions, admissions, audit log, privacy ledger).
    ``admit``: ``"ask"`` (the owner accepts each new scientist: ``host.admissions``),
    ``"any"``, or a list of Client IDs. ``keep_released``: seconds a value accepted while
    its scientist was away is kept for them. ``request_expiry``: seconds after which an
    undecided request expires (None: never). ``jobs``: how offline jobs are taken, reviewed
    and run (``JobSettings``; default: taken live and from the mailbox, the owner reviews
    each). ``registry``: where ``host.publish`` lists datasets and how often the host
    heartbeats and reads its inbox there (``RegistryOptions``). Other arguments as for ``launch_duet``.
    """
    host = new_host(signaling_url, **options)
    runtime = get_runtime()
    runtime.run(host.start())
    runtime.add_closer(host.aclose)
    print(f"> Host ID: {host.id}", flush=True)
    print(f"> Scientists connect with: sy.join_duet('{host.id}', signaling_url="
          f"'{host.options.signaling_url}')", flush=True)  # fmt: skip
    return host


async def launch_host_async(signaling_url: str | None = None, **options: Any) -> Host:
    """``launch_host`` on the caller's asyncio loop (``await host.aclose()`` to stop)."""
    host = new_host(signaling_url, **options)
    await host.start()
    return host
