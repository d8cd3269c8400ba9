"""Running plans in the owner's process: defining one, and replaying its steps once, or
once per item of a sequence.

Each step runs as a single action would (the executor's ``_run``), its values kept in an
environment dropped after the replay; the stored output carries the lineage and privacy
of everything it was made from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from duet_p2p import lineage
from duet_p2p.errors import DuetError
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.execution.actions import ActionFailed, Inputs, refusal
from duet_p2p.owner.execution.sizes import numel
from duet_p2p.rpc import plan_spec
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.errors import error_info
from duet_p2p.rpc.messages import Action
from duet_p2p.rpc.ops import INDEX_OP
from duet_p2p.store import OwnerStore, StoredObject, value_nbytes


class PlanRunner:
    """The executor's plan ops; a base of ``Executor``, whose ``_run``, ``_entry``,
    ``_resolve`` and ``_check_result`` run and check each step."""

    store: OwnerStore
    limits: OwnerLimits
    budget: str
    on_step: Callable[[int, int], None] | None = None
    """Called with (steps done, steps in all) after each step of a plan run once."""

    def _plan(self, action: Action) -> StoredObject:
        """Define a plan, or run one (once, or once per item of a sequence)."""
        if action.op == plan_spec.DEFINE_OP:
            try:
                spec = plan_spec.parse_plan(list(action.args))
            except DuetError as exc:
                raise ActionFailed(error_info(exc, op=action.op)) from None
            for step in spec.steps:  # refuse an op off the allowlist now, not at a call
                self._entry(step.op)
            return StoredObject(
                id=action.result, value=spec, origin="peer", private=False,
                expression=spec.name, ops=(action.op,),
            )  # fmt: skip
        inputs = Inputs([])
        spec = self._resolve(action.target, inputs, action.op)
        if not isinstance(spec, plan_spec.PlanSpec):
            raise ActionFailed(refusal(action.op, "its target is not a plan"))
        if len(action.args) != len(spec.inputs) or action.kwargs:
            raise ActionFailed(
                refusal(action.op, f"plan {spec.name} takes {len(spec.inputs)} inputs")
            )
        bound = [
            self._bind(pid, arg, action.op)
            for pid, arg in zip(spec.inputs, action.args, strict=True)
        ]
        if action.op == plan_spec.RUN_OP:
            value, meta = self._replay(spec, bound)
            record = _output_record(action.result, value, meta, f"{spec.name}({_names(bound)})")
            self._check_result(action.op, value, record.nbytes, Inputs(bound))
            return record
        sequence = bound[0]
        items = sequence.value
        if not isinstance(items, (list, tuple)) or len(items) > plan_spec.MAX_MAP_ITEMS:
            raise ActionFailed(
                refusal(action.op, f"map runs over a tuple of at most {plan_spec.MAX_MAP_ITEMS}")
            )
        values, metas, held = [], [], 0
        for index, item in enumerate(items):
            element = _derived(sequence, spec.inputs[0], item, f"[{index}]")
            value, meta = self._replay(spec, [element, *bound[1:]])
            held += value_nbytes(value) if not isinstance(value, torch.nn.Module) else 0
            self._check_result(action.op, values, held, Inputs(bound))
            values.append(value)
            metas.append(meta)
        meta = _combined(metas) if metas else sequence
        expression = f"{spec.name}.map({_names(bound)})"
        return _output_record(action.result, tuple(values), meta, expression)

    def _bind(self, plan_id: str, argument: Any, op: str) -> StoredObject:
        """A plan input: the stored record a reference names, or a value (a literal, or a
        container of references) known as what it was made from."""
        inputs = Inputs([])
        value = self._resolve(argument, inputs, op)
        if isinstance(argument, ObjectRef):
            return inputs.records[0]
        meta = _combined(inputs.records)
        return StoredObject(
            id=plan_id, value=value, origin="peer", private=meta.private, ops=meta.ops,
            lineage_tags=meta.lineage_tags, aggregation=meta.aggregation, support=meta.support,
            expression=lineage.render_value(argument, {}),
        )  # fmt: skip

    def _replay(
        self, spec: plan_spec.PlanSpec, bound: list[StoredObject]
    ) -> tuple[Any, StoredObject]:
        """Run every step of ``spec``; its values live in an environment dropped afterwards."""
        env: dict[str, StoredObject] = dict(zip(spec.inputs, bound, strict=True))
        held = 0
        for number, step in enumerate(spec.steps):
            try:
                record = self._run(step, env)
            except ActionFailed as failure:
                info = dict(failure.info)
                info["where"] = f"plan {spec.name}, step {number}"
                info["message"] = f"{info['where']}: {info.get('message', '')}"
                raise ActionFailed(info) from None
            if self.on_step is not None:
                self.on_step(number + 1, len(spec.steps))
            held += record.nbytes
            if self.store.bytes_of(self.budget) + held > self.limits.max_peer_bytes:
                raise ActionFailed(
                    refusal(step.op, f"plan {spec.name} needs more than the peer's memory budget")
                )
            env[step.result] = record
        outputs = []
        for output in spec.outputs:
            record = env.get(output) or self.store.get(output)
            if record is None or record.error is not None:
                raise ActionFailed(refusal(plan_spec.RUN_OP, f"plan {spec.name} lost an output"))
            outputs.append(record)
        if len(outputs) == 1:
            return outputs[0].value, outputs[0]
        meta = _combined(outputs) if outputs else StoredObject(id="", value=None, origin="peer",
                                                               private=False)  # fmt: skip
        return tuple(r.value for r in outputs), meta


def _combined(records: list[StoredObject]) -> StoredObject:
    """What is known of a value made from all of ``records`` (for a plan's outputs)."""
    private = [r for r in records if r.private]
    tags: set[str] = set()
    for r in records:
        tags.update(r.lineage_tags)
    return StoredObject(
        id="", value=None, origin="peer", private=bool(private),
        ops=lineage.merge_ops(*(r.ops for r in records)),
        lineage_tags=frozenset(list(tags)[:64]),
        aggregation=min((r.aggregation for r in private), default=math.inf),
        support=sum((r.support for r in private), 0.0) if private else math.inf,
    )  # fmt: skip


def _derived(source: StoredObject, plan_id: str, value: Any, suffix: str) -> StoredObject:
    """An item of ``source`` (a plan's input while mapping): the same privacy and lineage."""
    return StoredObject(
        id=plan_id, value=value, origin="peer", private=source.private,
        expression=f"{source.expression}{suffix}", ops=lineage.merge_ops(source.ops, (INDEX_OP,)),
        lineage_tags=source.lineage_tags, aggregation=source.aggregation,
        support=min(source.support, max(1, numel(value))), nbytes=0,
    )  # fmt: skip


def _output_record(result: str, value: Any, meta: StoredObject, expression: str) -> StoredObject:
    """The stored result of a plan run, with the lineage of what it was made from."""
    return StoredObject(
        id=result, value=value, origin="peer", private=meta.private,
        expression=_clip_expression(expression), ops=meta.ops, lineage_tags=meta.lineage_tags,
        aggregation=meta.aggregation, support=meta.support,
        nbytes=0 if isinstance(value, torch.nn.Module) else value_nbytes(value),
    )  # fmt: skip


def _clip_expression(text: str) -> str:
    return text if len(text) <= lineage.MAX_EXPRESSION_CHARS else text[:1999] + "…"


def _names(records: list[StoredObject]) -> str:
    return ", ".join(r.expression or f"obj_{r.id[:8]}" for r in records[:16])
