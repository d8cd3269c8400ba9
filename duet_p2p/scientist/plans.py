"""Plans: a sequence of allowlisted ops recorded once by the scientist, replayed by the owner.

A training step is a handful of small ops; sent one action each, the per-message cost
dominates. A plan records them once (``duet.plan(step)``), the owner checks every op of it
against the allowlist when it arrives, and each call then runs the whole sequence from one
action (``step(batch)``), or once per item of a sequence (``step.map(batches)``). Every op
of a replay passes the same checks and caps as a single action, and privacy follows the
same rules; the intermediate results live only while the replay runs.

Wire form: ``Action(op=DEFINE_OP, result=<plan id>, args=[name, input ids, output ids,
steps])`` where each step is an Action as a map; ``Action(op=RUN_OP | MAP_OP, target=<plan
ref>, args=[inputs...])`` runs it.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from duet_p2p.errors import DuetError, OperationNotAllowed
from duet_p2p.rpc.messages import Action, to_wire

if TYPE_CHECKING:
    from duet_p2p.scientist.pointer import Pointer
    from duet_p2p.scientist.protocol import SessionCore

log = logging.getLogger(__name__)

# The wire form (op names, limits, PlanSpec, parse_plan) is shared with the owner.
from duet_p2p.rpc.plan_spec import (  # noqa: E402
    DEFINE_OP,
    MAP_OP,
    MAX_MAP_ITEMS,
    MAX_NAME_CHARS,
    MAX_STEPS,
    PLAN_OPS,
    RUN_OP,
    PlanSpec,
    parse_plan,
)

__all__ = ["DEFINE_OP", "MAP_OP", "MAX_MAP_ITEMS", "MAX_NAME_CHARS", "MAX_STEPS", "PLAN_OPS",
           "RUN_OP", "PlanSpec", "parse_plan"]  # fmt: skip


# -- the scientist's side -----------------------------------------------------------------


@dataclass
class Recording:
    """The actions issued while a plan function runs, in order."""

    actions: list[Action]


_RECORDING: contextvars.ContextVar[Recording | None] = contextvars.ContextVar(
    "duet_plan_recording", default=None
)


def current_recording() -> Recording | None:
    """The plan being recorded in this thread, if any."""
    return _RECORDING.get()


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    if _RECORDING.get() is not None:
        raise DuetError("a plan cannot be recorded while another one is being recorded")
    record = Recording([])
    token = _RECORDING.set(record)
    try:
        yield record
    finally:
        _RECORDING.reset(token)


class RemotePlan:
    """A recorded plan: call it with pointers to run it in the owner's process.

    ``plan(*pointers)`` runs it once and returns a pointer to what the function returned
    (a tuple pointer if it returned several). ``plan.map(sequence)`` runs it once per item
    of a remote sequence (a tuple of tensors, e.g. ``order.split(64)``) bound to its first
    input, the other inputs fixed, and returns a pointer to the tuple of the results.
    Neither waits for the owner.
    """

    def __init__(
        self, core: SessionCore, pointer: Pointer, name: str, arity: int, kind: str
    ) -> None:
        self._core = core
        self._pointer = pointer
        self.name = name
        self.arity = arity
        self._kind = kind

    def __call__(self, *args: Any) -> Pointer:
        self._check_arity(len(args))
        return self._core.run(RUN_OP, target=self._pointer, args=args, kwargs={}, kind=self._kind)

    def map(self, sequence: Pointer, *rest: Any) -> Pointer:
        """Run the plan once per item of ``sequence`` (its first input); one action."""
        self._check_arity(1 + len(rest))
        return self._core.run(
            MAP_OP, target=self._pointer, args=(sequence, *rest), kwargs={}, kind="tuple"
        )

    def _check_arity(self, count: int) -> None:
        if count != self.arity:
            raise TypeError(f"plan {self.name} takes {self.arity} inputs, got {count}")

    def __repr__(self) -> str:
        return f"<RemotePlan {self.name}({self.arity} inputs)>"


def record_plan(core: SessionCore, function: Callable[..., Any], name: str | None) -> RemotePlan:
    """Run ``function`` on placeholder tensor pointers, recording its ops, and send the plan.

    The function may use any pointer it can reach (a model, an optimizer, hosted data);
    its arguments stand for the pointers each call passes. Getting a value inside it is
    refused: a plan runs without round trips.
    """
    from duet_p2p.scientist.pointer import Pointer, TensorPointer

    name = name or getattr(function, "__name__", "plan")
    if not name.isidentifier():
        name = "plan"
    parameters = list(inspect.signature(function).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        raise TypeError("a plan function takes a fixed number of arguments")
    placeholders = [
        TensorPointer(core, uuid.uuid4().hex, expression=p.name, kind="tensor", owned=False)
        for p in parameters
    ]
    with recording() as record:
        returned = function(*placeholders)
    if not record.actions:
        raise OperationNotAllowed(f"plan {name} ran no remote ops; nothing to record")
    outputs = returned if isinstance(returned, tuple) else (returned,)
    if returned is None:
        outputs = ()
    if not all(isinstance(p, Pointer) for p in outputs):
        raise TypeError("a plan function returns pointers (one, a tuple of them, or None)")
    if len(record.actions) > MAX_STEPS:
        raise OperationNotAllowed(f"plan {name} has {len(record.actions)} ops; at most {MAX_STEPS}")
    kind = outputs[0]._kind if len(outputs) == 1 else "tuple" if outputs else "none"
    definition = [
        name,
        [p.id for p in placeholders],
        [p.id for p in outputs],
        [to_wire(action) for action in record.actions],
    ]
    pointer = core.run(DEFINE_OP, target=None, args=tuple(definition), kwargs={}, kind="plan")
    pointer._expression = name
    log.debug("recorded plan %s: %d ops", name, len(record.actions))
    return RemotePlan(core, pointer, name, len(placeholders), kind)
