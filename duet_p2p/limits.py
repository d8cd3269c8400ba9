"""Caps that keep the owner's process safe from a careless or hostile peer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OwnerLimits:
    """Per-result, per-peer and per-op bounds. Breaking one fails that op, never the owner."""

    max_result_elements: int = 2**28
    """Elements in one result (checked before running where the shape is predictable)."""
    max_result_bytes: int = 2 * 1024**3
    """Bytes in one result."""
    max_peer_bytes: int = 8 * 1024**3
    """Bytes held at once in results and uploads made for the peer; results labelled private
    have a budget of this size of their own, so that a public op's refusal never depends on
    how large private results are."""
    max_peer_objects: int = 1_000_000
    """Objects held at once for the peer."""
    max_op_seconds: float = 60.0
    """Wall time of one op; the worker running an op past it is killed (and replaced)."""
    max_plan_seconds: float = 600.0
    """Wall time of one plan run or map, all its steps together."""
    worker_threads: int = 2
    """Compute threads of the worker process that runs the peer's actions."""
    max_worker_restarts: int = 10
    """Times a session's worker may be stopped (time budget, memory, crash) and replaced;
    past that the session stops serving the peer."""
    worker_memory_slack: int = 2 * 1024**3
    """Address space a worker may use beyond the hosted data and ``max_peer_bytes``."""
    max_pending_bytes: int = 2 * 1024**3
    """Bytes held for the peer outside its worker, in each of two separate budgets: uploads
    waiting in the queue, and values kept for requests awaiting a decision (and previews)."""
    max_requests: int = 10_000
    """Requests (pending or decided) remembered at once; the oldest decided go first. A
    standing host keeps at most this many of each scientist's."""
    max_pending_per_scientist: int = 100
    """Requests of one scientist waiting for a decision at once; more are denied at once,
    so one scientist cannot fill the owner's queue for everyone."""
    max_dp_rows: int = 2**24
    """Records a differentially private sum assumes at most (OpenDP samples this many from
    a larger selection); larger values cost a little utility, never privacy."""
    seccomp: bool = True
    """Filter the worker's system calls (where the kernel and libseccomp allow)."""
    max_upload_bytes: int = 1024**3
    """Largest message (and so upload) accepted from the peer."""
    allow_inplace_on_owner_objects: bool = False
    """Whether the peer may mutate the objects the owner hosts (and their views)."""
