"""Encoding a value once, as the exact bytes that will leave (and be hashed for the audit)."""

from __future__ import annotations

from typing import Any

import numpy as np

from duet_p2p.rpc import codec
from duet_p2p.rpc.endpoint import ATTACHMENT_IN_THREAD_BYTES


def encode_snapshot(value: Any) -> bytes | memoryview:
    """The encoded value as one snapshot (later in-place ops cannot change what leaves).
    Large payloads are joined by numpy, which releases the GIL: a ``bytes`` join of
    gigabytes would stall an event loop past the heartbeat timeout."""
    parts = codec.encode_parts(value)
    total = sum(memoryview(part).nbytes for part in parts)
    if total < ATTACHMENT_IN_THREAD_BYTES:
        return b"".join(parts)
    snapshot = np.empty(total, np.uint8)
    offset = 0
    for part in parts:
        size = memoryview(part).nbytes
        snapshot[offset : offset + size] = np.frombuffer(part, np.uint8)
        offset += size
    return memoryview(snapshot)
