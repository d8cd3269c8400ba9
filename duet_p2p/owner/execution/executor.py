"""Running the peer's actions in a worker process: allowlisted, capped, recorded.

Each action names an op on the allowlist, its receiver and arguments (literals and
references to stored objects). The executor checks everything before running it, runs it,
bounds the result, and stores it (or the error) under the ID the scientist chose. It
decides nothing about privacy: the monitor labels every object from the action graph
(``duet_p2p.owner.monitor``); these checks only keep the worker's work sane and its errors
clear, while the kernel bounds its memory and time.

Its parts: ``actions`` (failures), ``sizes`` (result sizes predicted before running),
``inplace`` (writes into the owner's objects, refused early with a clear error; the memory
is read-only anyway) and ``plan_runner`` (plans).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch

from duet_p2p import lineage
from duet_p2p.allowlist import AllowedOp, Allowlist, ReturnKind, check_path_syntax
from duet_p2p.errors import DuetError, OperationNotAllowed, RemoteError
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.execution import inplace, sizes
from duet_p2p.owner.execution.actions import ActionFailed, Inputs, op_error, refusal
from duet_p2p.owner.execution.plan_runner import PlanRunner
from duet_p2p.owner.execution.sizes import warm_up
from duet_p2p.rpc import plan_spec
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.errors import error_info
from duet_p2p.rpc.messages import Action
from duet_p2p.rpc.ops import INDEX_OP
from duet_p2p.rpc.refs import action_refs
from duet_p2p.store import OwnerStore, StoredObject, value_nbytes

__all__ = ["FORBIDDEN_KWARGS", "INDEX_OP", "ActionFailed", "Executor", "action_refs", "warm_up"]

log = logging.getLogger(__name__)
FORBIDDEN_KWARGS = frozenset({"out", "pin_memory", "generator", "closure", "layout"})


class Executor(PlanRunner):
    """Runs actions against an OwnerStore under an Allowlist and OwnerLimits."""

    def __init__(
        self,
        store: OwnerStore,
        allowlist: Allowlist,
        limits: OwnerLimits,
        *,
        render_lineage: bool = True,
    ) -> None:
        self.store = store
        self.render_lineage = render_lineage
        self.budget = "public"
        """The memory budget the current action's results count against (see StoredObject)."""
        self.allowlist = allowlist
        self.limits = limits
        self.actions_run = 0
        self.actions_failed = 0
        self._entries: dict[str, AllowedOp] = {}

    def run(self, action: Action) -> StoredObject:
        """Run one action and store its result or its error; returns the stored record. An
        action whose result the monitor labelled private carries ``private=True``."""
        self.actions_run += 1
        self.budget = "private" if getattr(action, "private", False) else "public"
        try:
            record = self._run(action)
        except ActionFailed as failure:
            self.actions_failed += 1
            record = StoredObject(
                id=action.result, value=None, origin="peer", error=failure.info,
                expression=action.op, ops=(action.op,),
            )  # fmt: skip
            if self.store.peer_object_count() >= self.limits.max_peer_objects:
                return record  # not kept: failures must not grow the store past its cap
        record.budget = self.budget
        try:
            self.store.put(record)
        except KeyError:
            log.warning("refused to overwrite owner object %s", action.result)
        return record

    # -- the steps ---------------------------------------------------------------------

    def _run(self, action: Action, env: dict[str, StoredObject] | None = None) -> StoredObject:
        """Run one action; inside a plan's replay, ``env`` holds the plan's own values (the
        result goes there, not into the store)."""
        op = action.op
        if env is None:
            if self.store.get(action.result) is not None:
                existing = self.store.get(action.result)
                if existing is not None and existing.origin == "owner":
                    raise ActionFailed(refusal(op, "the result ID is taken by an owner object"))
            if self.store.peer_object_count() >= self.limits.max_peer_objects:
                raise ActionFailed(refusal(op, "too many objects held for the peer; free some"))
            if op in plan_spec.PLAN_OPS:
                return self._plan(action)
        entry = self._entry(op)
        inputs = Inputs([])
        target = self._resolve(action.target, inputs, op, env)
        args = self._resolve(action.args, inputs, op, env)
        kwargs = self._resolve(action.kwargs, inputs, op, env)
        self._check_kwargs(op, kwargs)
        module_bytes = 0
        if entry is not None:
            inplace.check_mutation(
                entry, self.allowlist, self.limits, self.store, target, args, kwargs, inputs
            )
            sizes.check_size(entry, self.allowlist, self.limits, target, args, kwargs, inputs)
            module_bytes = sizes.check_module_size(
                entry,
                self.allowlist,
                self.limits,
                self.store,
                args,
                kwargs,
                inputs,
                budget=self.budget,
            )
        args, kwargs = inplace.shield_owner_inputs(
            entry, self.limits, self.store, target, args, kwargs
        )
        started = time.perf_counter()
        try:
            with torch.no_grad() if action.no_grad else contextlib.nullcontext():
                value = self._call(entry, op, target, args, kwargs)
        except ActionFailed:
            raise
        except DuetError as exc:
            raise ActionFailed(error_info(exc, op=op)) from None
        except Exception as exc:  # noqa: BLE001 - any failure of the op becomes its result
            raise ActionFailed(op_error(op, exc, inputs)) from None
        elapsed = time.perf_counter() - started
        if elapsed > self.limits.max_op_seconds:
            raise ActionFailed(
                refusal(op, f"took longer than the {self.limits.max_op_seconds:g} s time budget")
            )
        value = _normalise(entry, value)
        # a module method returns the module itself: only a constructor's new tensors count
        nbytes = module_bytes if isinstance(value, torch.nn.Module) else value_nbytes(value)
        self._check_result(op, value, nbytes, inputs)
        return self._record(
            action, entry, value, nbytes, inputs, render=env is None and self.render_lineage
        )

    def _entry(self, op: str) -> AllowedOp | None:
        if op == INDEX_OP:
            return None
        entry = self._entries.get(op)
        if entry is not None:
            return entry
        try:
            check_path_syntax(op)
            entry = self.allowlist.get(op)
        except OperationNotAllowed as exc:
            raise ActionFailed(error_info(exc, op=op[:200])) from None
        self._entries[op] = entry  # the allowlist never changes; only its paths are kept
        return entry

    def _resolve(
        self, value: Any, inputs: Inputs, op: str, env: dict[str, StoredObject] | None = None
    ) -> Any:
        """Swap ObjectRefs for stored values (or a plan's own values; collecting the records)."""
        if isinstance(value, ObjectRef):
            record = env.get(value.id) if env is not None else None
            if record is None:
                record = self.store.get(value.id)
            if record is None:
                raise ActionFailed(
                    {"code": "not_found", "type": "KeyError", "op": op,
                     "message": f"no object {value.id} on the owner's side (freed or never made)"}
                )  # fmt: skip
            if record.error is not None:
                raise ActionFailed(record.error)
            inputs.records.append(record)
            return record.value
        if isinstance(value, list):
            return [self._resolve(v, inputs, op, env) for v in value]
        if isinstance(value, tuple):
            return tuple(self._resolve(v, inputs, op, env) for v in value)
        if isinstance(value, dict):
            return {k: self._resolve(v, inputs, op, env) for k, v in value.items()}
        if isinstance(value, slice):
            parts = (value.start, value.stop, value.step)
            return slice(*(self._resolve(p, inputs, op, env) for p in parts))
        return value

    def _check_kwargs(self, op: str, kwargs: dict[str, Any]) -> None:
        for name, value in kwargs.items():
            if name in FORBIDDEN_KWARGS:
                raise ActionFailed(refusal(op, f"the argument {name!r} is not allowed"))
            if name == "device" and value not in (None, "cpu") and value != torch.device("cpu"):
                raise ActionFailed(refusal(op, "only device='cpu' is allowed"))

    def _call(
        self, entry: AllowedOp | None, op: str, target: Any, args: list[Any], kwargs: dict[str, Any]
    ) -> Any:
        if entry is None:
            return _index(target, args)
        if entry.receiver is not None:
            if target is None:
                raise OperationNotAllowed(f"{op} needs a receiver")
            bound = self.allowlist.bind(op, target)
            return bound if entry.attribute else bound(*args, **kwargs)
        if target is not None:
            raise OperationNotAllowed(f"{op} is a function: it takes no receiver")
        return self.allowlist.resolve(op)(*args, **kwargs)

    def _check_result(self, op: str, value: Any, nbytes: int, inputs: Inputs) -> None:
        if (
            isinstance(value, (torch.Tensor, list, tuple))
            and sizes.numel(value) > self.limits.max_result_elements
        ):
            raise ActionFailed(refusal(op, "the result exceeds the owner's element limit"))
        if nbytes > self.limits.max_result_bytes:
            raise ActionFailed(refusal(op, "the result exceeds the owner's size limit"))
        if self.store.bytes_of(self.budget) + nbytes > self.limits.max_peer_bytes:
            raise ActionFailed(
                refusal(op, "the owner's memory budget for this peer is used up; free pointers")
            )

    def _record(
        self, action: Action, entry: AllowedOp | None, value: Any, nbytes: int,
        inputs: Inputs, *, render: bool = True,
    ) -> StoredObject:  # fmt: skip
        """The result's record; ``render=False`` (a plan's inner step) skips the expression."""
        expression = ""
        if render:
            names = {}
            for ref, record in zip(action_refs(action), inputs.records, strict=False):
                names[ref.id] = record.expression or f"obj_{ref.id[:8]}"
            expression = lineage.render_call(
                action.op, action.target, action.args, action.kwargs, names,
                attribute=bool(entry and entry.attribute),
            )  # fmt: skip
        return StoredObject(
            id=action.result,
            value=value,
            origin="peer",
            private=bool(inputs.private),  # only for what error texts say: labels are the monitor's
            expression=expression,
            ops=lineage.merge_ops(*(r.ops for r in inputs.records), (action.op,)),
            nbytes=nbytes,
        )


def _normalise(entry: AllowedOp | None, value: Any) -> Any:
    if entry is None:
        return value
    kind = entry.returns
    if kind is ReturnKind.PARAMETERS:
        return list(value)
    if kind is ReturnKind.NONE or entry.name in ("load_state_dict",):
        return None
    if kind is ReturnKind.SIZE and isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, list) and kind is ReturnKind.TUPLE:
        return tuple(value)
    if kind is ReturnKind.STATE_DICT:
        return dict(value)
    return value


def _index(target: Any, args: list[Any]) -> Any:
    if len(args) != 1:
        raise RemoteError("an index takes one argument")
    key = args[0]
    if isinstance(target, (tuple, list)) and isinstance(key, int) and not isinstance(key, bool):
        return target[key]
    if isinstance(target, dict) and isinstance(key, str):
        return target[key]
    raise RemoteError(f"cannot index a {type(target).__name__} with a {type(key).__name__}")
