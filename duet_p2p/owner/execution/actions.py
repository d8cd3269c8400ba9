"""What the executor's parts share about one action: the records it reads, and what the
scientist is told when it fails (error texts that could describe private data are withheld).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from duet_p2p.errors import DuetError, OperationNotAllowed
from duet_p2p.rpc.errors import error_info
from duet_p2p.store import StoredObject

log = logging.getLogger(__name__)


class ActionFailed(DuetError):
    """An action could not run; ``info`` is what the scientist may see."""

    def __init__(self, info: dict[str, Any]):
        super().__init__(info.get("message", "failed"))
        self.info = info


@dataclass
class Inputs:
    records: list[StoredObject]

    @property
    def private(self) -> list[StoredObject]:
        return [r for r in self.records if r.private]


def refusal(op: str, why: str) -> dict[str, Any]:
    return error_info(OperationNotAllowed(f"{op} was refused: {why}"), op=op)


def op_error(op: str, exc: Exception, inputs: Inputs) -> dict[str, Any]:
    log.info("op %s failed: %s: %s", op, type(exc).__name__, exc)
    if inputs.private:
        safe = (
            "the details are withheld because they may describe private data; "
            "the owner's log has them"
        )
        return error_info(exc, op=op, safe_message=safe)
    return error_info(exc, op=op, safe_message=str(exc)[:500])
