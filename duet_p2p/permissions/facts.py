"""What handlers and the audit log read of a request (``request.Request`` has all of it).

Kept apart so that ``policy`` and ``audit`` depend on these facts, and ``request`` on them.
"""

from __future__ import annotations

from typing import Any, Protocol


class RequestFacts(Protocol):
    request_id: str
    object_id: str
    name: str
    reason: str
    lineage: str
    ops: tuple[str, ...]
    tags: frozenset[str]
    size_bytes: int
    elements: int
    aggregation: float
    requested_at: float
    requester: str
    status: Any
    decided_by: str | None
    decision_reason: str
    dp: Any
    """The DP release it asks for (None: an exact value)."""
    checks: tuple[str, ...]
    error: str | None
