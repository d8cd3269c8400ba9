"""The owner's side: a trusted monitor in the owner's process, sandboxed worker processes.

``session`` serves one connected scientist; ``monitor`` labels every object from the action
graph and decides what may run; ``worker`` starts and polices the worker process that runs
the scientist's actions (``worker_main``) on read-only mapped copies of the hosted data.
"""

from duet_p2p.owner.session import OwnerCore, listing_entry

__all__ = ["OwnerCore", "listing_entry"]
