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
    """Bytes held at once in results and uploads made for the peer."""
    max_peer_objects: int = 1_000_000
    """Objects held at once for the peer."""
    max_op_seconds: float = 60.0
    """Wall time of one op; a slower op's result is dropped and becomes an error."""
    max_upload_bytes: int = 1024**3
    """Largest message (and so upload) accepted from the peer."""
    allow_inplace_on_owner_objects: bool = False
    """Whether the peer may mutate the objects the owner hosts (and their views)."""
