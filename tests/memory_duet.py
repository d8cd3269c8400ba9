"""An owner and a scientist session joined by the in-memory transport (no WebRTC).

The owner is the real one (monitor and worker process); only the connection is replaced,
so tests of labels, releases and the worker run in milliseconds instead of a handshake.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duet_p2p as sy
from duet_p2p.connect import Connection
from duet_p2p.duet import Duet
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner import OwnerCore
from duet_p2p.owner.session import new_supervisor
from duet_p2p.permissions import AuditLog
from duet_p2p.runtime import get_runtime
from duet_p2p.scientist.session import ScientistCore
from duet_p2p.transport.memory import memory_pair

DUET_ID = "d" * 32
CLIENT_ID = "c" * 32


async def _open(audit_path: Path, limits: OwnerLimits, **options: Any) -> tuple[Duet, Duet]:
    owner_end, scientist_end = memory_pair()
    owner_connection = Connection("owner", DUET_ID, CLIENT_ID, owner_end, None, "memory", 0.0)
    scientist_connection = Connection(
        "scientist", DUET_ID, CLIENT_ID, scientist_end, None, "memory", 0.0
    )
    allowlist = options.pop("allowlist", sy.DEFAULT_ALLOWLIST)
    supervisor = new_supervisor(allowlist, limits)
    supervisor.prestart()
    owner_core = OwnerCore(
        owner_connection, allowlist=allowlist, limits=limits, audit=AuditLog(audit_path),
        supervisor=supervisor, **options,
    )  # fmt: skip
    scientist_core = ScientistCore(scientist_connection)
    import asyncio

    await asyncio.gather(owner_core.start(), scientist_core.start())
    return (
        Duet(owner_connection, owner_core, background=True),
        Duet(scientist_connection, scientist_core, background=True),
    )


@contextlib.contextmanager
def memory_duet(
    audit_path: Path, limits: OwnerLimits | None = None, **options: Any
) -> Iterator[tuple[Duet, Duet]]:
    """(owner, scientist) on duet_p2p's background loop; closed afterwards."""
    runtime = get_runtime()
    owner, scientist = runtime.run(
        _open(audit_path, limits or OwnerLimits(), **options), timeout=60
    )
    try:
        yield owner, scientist
    finally:
        with contextlib.suppress(Exception):
            runtime.run(scientist.aclose(), timeout=15)
        with contextlib.suppress(Exception):
            runtime.run(owner.aclose(), timeout=15)
