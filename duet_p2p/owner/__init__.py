"""The owner's side: a trusted monitor in the owner's process, sandboxed worker processes.

``session`` serves one connected scientist; ``monitor`` labels every object from the action
graph and decides what may run; ``worker`` starts and polices the worker process that runs
the scientist's actions (``worker_main``, forked by ``zygote``) on read-only mapped copies
of the hosted data. Imported lazily, so a worker does not load the connection stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OwnerCore", "listing_entry"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from duet_p2p.owner import session

        return getattr(session, name)
    raise AttributeError(name)
