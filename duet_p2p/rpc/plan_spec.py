"""The wire form of plans, as both sides know it: op names, limits, and the owner's check.

``Action(op=DEFINE_OP, result=<plan id>, args=[name, input ids, output ids, steps])`` where
each step is an Action as a map; ``Action(op=RUN_OP | MAP_OP, target=<plan ref>,
args=[inputs...])`` runs it. Recording lives on the scientist's side (``duet_p2p.scientist.plans``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from duet_p2p.errors import ProtocolError
from duet_p2p.rpc.messages import MAX_ARGS, Action

DEFINE_OP = "duet.plan.define"
RUN_OP = "duet.plan.run"
MAP_OP = "duet.plan.map"
PLAN_OPS = frozenset({DEFINE_OP, RUN_OP, MAP_OP})
MAX_STEPS = 1000
"""Most ops in one plan."""
MAX_MAP_ITEMS = 100_000
"""Most items one ``map`` runs the plan over."""
MAX_NAME_CHARS = 100


# -- the owner's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSpec:
    """A checked plan, as stored in the owner's process (it holds no data)."""

    name: str
    inputs: tuple[str, ...]
    """Plan-local IDs the caller's arguments are bound to, in order."""
    outputs: tuple[str, ...]
    """IDs of what a run returns: plan-local results, inputs, or stored objects."""
    steps: tuple[Action, ...]

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(step.op for step in self.steps)

    def __repr__(self) -> str:
        return f"<plan {self.name}: {len(self.steps)} ops>"


def parse_plan(args: list[Any]) -> PlanSpec:
    """Check a peer's plan definition; ProtocolError (naming the step) if malformed."""
    if len(args) != 4:
        raise ProtocolError("a plan is defined by [name, inputs, outputs, steps]")
    name, inputs, outputs, raw_steps = args
    if not isinstance(name, str) or not name.isidentifier() or len(name) > MAX_NAME_CHARS:
        raise ProtocolError("a plan's name must be a Python identifier")
    inputs = _ids(inputs, "inputs")
    outputs = _ids(outputs, "outputs")
    if not isinstance(raw_steps, list) or not 0 < len(raw_steps) <= MAX_STEPS:
        raise ProtocolError(f"a plan has 1 to {MAX_STEPS} steps")
    steps: list[Action] = []
    local = set(inputs)
    if len(local) != len(inputs):
        raise ProtocolError("a plan's inputs must be distinct")
    for number, raw in enumerate(raw_steps):
        try:
            step = Action.model_validate(raw)
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.errors()[0].get("loc", ()))
            raise ProtocolError(f"plan step {number}: invalid {where or 'step'}") from None
        if step.op in PLAN_OPS:
            raise ProtocolError(f"plan step {number}: plans cannot define or run plans")
        if step.result in local:
            raise ProtocolError(f"plan step {number}: its result ID is used twice")
        local.add(step.result)
        steps.append(step)
    return PlanSpec(name, inputs, outputs, tuple(steps))


def _ids(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_ARGS:
        raise ProtocolError(f"a plan's {what} are a list of at most {MAX_ARGS} IDs")
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= 64 or not item.isalnum():
            raise ProtocolError(f"a plan's {what} must be object IDs")
    return tuple(value)
