"""Running the peer's actions in the owner's process: allowlisted, capped, recorded.

Each action names an op on the allowlist, its receiver and arguments (literals and
references to stored objects). The executor checks everything before running it, runs it,
bounds the result, and stores it (or the error) under the ID the scientist chose, with its
lineage and privacy. Error texts that could describe private data are withheld.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from duet_p2p import lineage, plans
from duet_p2p.allowlist import AllowedOp, Allowlist, ReturnKind, check_path_syntax
from duet_p2p.errors import DuetError, OperationNotAllowed, RemoteError
from duet_p2p.limits import OwnerLimits
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.errors import error_info
from duet_p2p.rpc.messages import Action
from duet_p2p.store import OwnerStore, StoredObject, value_nbytes

log = logging.getLogger(__name__)
INDEX_OP = "duet.index"
FORBIDDEN_KWARGS = frozenset({"out", "pin_memory", "generator", "closure", "layout"})
_BOUNDED_CATEGORIES = frozenset(
    {"arithmetic", "comparison", "reduction", "conversion", "loss", "operator"}
)
_GROWING = frozenset({"diag", "diag_embed", "cartesian_prod", "block_diag", "__getitem__"})
"""Ops of those categories whose result can hold more elements than their inputs together
(a tensor index is bounded, and checked by ``_tensor_index``; a list index is not)."""
_MODULE_RECEIVERS = ("torch.nn.Module", "torch.optim.Optimizer")
_MAX_CLEAN = 1_000_000


_warmed = threading.Event()


def warm_up() -> None:
    """Load what the first size prediction on the meta device imports (about a second),
    so the peer's first op does not pay for it. Safe to call more than once.

    Not a daemon thread: one killed inside torch at interpreter exit aborts the process.
    """
    if not _warmed.is_set():
        _warmed.set()
        threading.Thread(target=_meta_add, name="duet-warm-up").start()


def _meta_add() -> None:
    torch.ones(1, device="meta") + 1


class ActionFailed(DuetError):
    """An action could not run; ``info`` is what the scientist may see."""

    def __init__(self, info: dict[str, Any]):
        super().__init__(info.get("message", "failed"))
        self.info = info


@dataclass
class _Inputs:
    records: list[StoredObject]

    @property
    def private(self) -> list[StoredObject]:
        return [r for r in self.records if r.private]


class Executor:
    """Runs actions against an OwnerStore under an Allowlist and OwnerLimits."""

    def __init__(self, store: OwnerStore, allowlist: Allowlist, limits: OwnerLimits) -> None:
        self.store = store
        self.allowlist = allowlist
        self.limits = limits
        self.actions_run = 0
        self.actions_failed = 0
        self._entries: dict[str, AllowedOp] = {}
        self._clean: dict[int, tuple[float, frozenset[str]]] = {}
        """Storage address -> (aggregation, tags) that every record holding that memory is
        known to be at least as restrictive as (all private); see ``_taint``."""

    def run(self, action: Action) -> StoredObject:
        """Run one action and store its result or its error; returns the stored record."""
        self.actions_run += 1
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
                    raise ActionFailed(_refusal(op, "the result ID is taken by an owner object"))
            if self.store.peer_object_count() >= self.limits.max_peer_objects:
                raise ActionFailed(_refusal(op, "too many objects held for the peer; free some"))
            if op in plans.PLAN_OPS:
                return self._plan(action)
        entry = self._entry(op)
        inputs = _Inputs([])
        target = self._resolve(action.target, inputs, op, env)
        args = self._resolve(action.args, inputs, op, env)
        kwargs = self._resolve(action.kwargs, inputs, op, env)
        self._check_kwargs(op, kwargs)
        module_bytes = 0
        if entry is not None:
            self._check_mutation(entry, target, args, kwargs, inputs)
            self._check_size(entry, target, args, kwargs, inputs)
            module_bytes = self._check_module_size(entry, args, kwargs, inputs)
        watched = _watch(inputs.records, _forward_of(entry, target)) if inputs.private else []
        backward = entry is not None and entry.name == "backward"
        if inputs.private and backward and isinstance(target, torch.Tensor):
            grads_before = [(leaf, leaf.grad) for leaf in _graph_leaves(target)]
        else:
            grads_before = []
        args = self._shield_owner_inputs(entry, target, args)
        started = time.perf_counter()
        try:
            with torch.no_grad() if action.no_grad else contextlib.nullcontext():
                value = self._call(entry, op, target, args, kwargs)
        except ActionFailed:
            raise
        except DuetError as exc:
            raise ActionFailed(error_info(exc, op=op)) from None
        except Exception as exc:  # noqa: BLE001 - any failure of the op becomes its result
            raise ActionFailed(self._op_error(op, exc, inputs)) from None
        elapsed = time.perf_counter() - started
        if elapsed > self.limits.max_op_seconds:
            raise ActionFailed(
                _refusal(op, f"took longer than the {self.limits.max_op_seconds:g} s time budget")
            )
        value = _normalise(entry, value)
        # a module method returns the module itself: only a constructor's new tensors count
        nbytes = module_bytes if isinstance(value, torch.nn.Module) else value_nbytes(value)
        self._check_result(op, value, nbytes, inputs)
        record = self._record(action, entry, value, nbytes, inputs, render=env is None)
        if self._clean:
            self._unclean(value)  # a new holder of that memory, not yet checked
        self._taint(entry, target, args, kwargs, record, watched, grads_before, env)
        return record

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
        self, value: Any, inputs: _Inputs, op: str, env: dict[str, StoredObject] | None = None
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

    # -- plans ---------------------------------------------------------------------------

    def _plan(self, action: Action) -> StoredObject:
        """Define a plan, or run one (once, or once per item of a sequence)."""
        if action.op == plans.DEFINE_OP:
            try:
                spec = plans.parse_plan(list(action.args))
            except DuetError as exc:
                raise ActionFailed(error_info(exc, op=action.op)) from None
            for step in spec.steps:  # refuse an op off the allowlist now, not at a call
                self._entry(step.op)
            return StoredObject(
                id=action.result, value=spec, origin="peer", private=False,
                expression=spec.name, ops=(action.op,),
            )  # fmt: skip
        inputs = _Inputs([])
        spec = self._resolve(action.target, inputs, action.op)
        if not isinstance(spec, plans.PlanSpec):
            raise ActionFailed(_refusal(action.op, "its target is not a plan"))
        if len(action.args) != len(spec.inputs) or action.kwargs:
            raise ActionFailed(
                _refusal(action.op, f"plan {spec.name} takes {len(spec.inputs)} inputs")
            )
        bound = [
            self._bind(pid, arg, action.op)
            for pid, arg in zip(spec.inputs, action.args, strict=True)
        ]
        if action.op == plans.RUN_OP:
            value, meta = self._replay(spec, bound)
            record = _output_record(action.result, value, meta, f"{spec.name}({_names(bound)})")
            self._check_result(action.op, value, record.nbytes, _Inputs(bound))
            return record
        sequence = bound[0]
        items = sequence.value
        if not isinstance(items, (list, tuple)) or len(items) > plans.MAX_MAP_ITEMS:
            raise ActionFailed(
                _refusal(action.op, f"map runs over a tuple of at most {plans.MAX_MAP_ITEMS}")
            )
        values, metas, held = [], [], 0
        for index, item in enumerate(items):
            element = _derived(sequence, spec.inputs[0], item, f"[{index}]")
            value, meta = self._replay(spec, [element, *bound[1:]])
            held += value_nbytes(value) if not isinstance(value, torch.nn.Module) else 0
            self._check_result(action.op, values, held, _Inputs(bound))
            values.append(value)
            metas.append(meta)
        meta = _combined(metas) if metas else sequence
        expression = f"{spec.name}.map({_names(bound)})"
        return _output_record(action.result, tuple(values), meta, expression)

    def _bind(self, plan_id: str, argument: Any, op: str) -> StoredObject:
        """A plan input: the stored record a reference names, or a value (a literal, or a
        container of references) known as what it was made from."""
        inputs = _Inputs([])
        value = self._resolve(argument, inputs, op)
        if isinstance(argument, ObjectRef):
            return inputs.records[0]
        meta = _combined(inputs.records)
        return StoredObject(
            id=plan_id, value=value, origin="peer", private=meta.private, ops=meta.ops,
            lineage_tags=meta.lineage_tags, aggregation=meta.aggregation, support=meta.support,
            expression=lineage.render_value(argument, {}),
        )  # fmt: skip

    def _replay(self, spec: plans.PlanSpec, bound: list[StoredObject]) -> tuple[Any, StoredObject]:
        """Run every step of ``spec``; its values live in an environment dropped afterwards."""
        env: dict[str, StoredObject] = dict(zip(spec.inputs, bound, strict=True))
        held = 0
        for number, step in enumerate(spec.steps):
            try:
                record = self._run(step, env)
            except ActionFailed as failure:
                info = dict(failure.info)
                info["message"] = f"plan {spec.name}, step {number}: {info.get('message', '')}"
                raise ActionFailed(info) from None
            held += record.nbytes
            if self.store.peer_bytes + held > self.limits.max_peer_bytes:
                raise ActionFailed(
                    _refusal(step.op, f"plan {spec.name} needs more than the peer's memory budget")
                )
            env[step.result] = record
        outputs = []
        for output in spec.outputs:
            record = env.get(output) or self.store.get(output)
            if record is None or record.error is not None:
                raise ActionFailed(_refusal(plans.RUN_OP, f"plan {spec.name} lost an output"))
            outputs.append(record)
        if len(outputs) == 1:
            return outputs[0].value, outputs[0]
        meta = _combined(outputs) if outputs else StoredObject(id="", value=None, origin="peer",
                                                               private=False)  # fmt: skip
        return tuple(r.value for r in outputs), meta

    def _check_kwargs(self, op: str, kwargs: dict[str, Any]) -> None:
        for name, value in kwargs.items():
            if name in FORBIDDEN_KWARGS:
                raise ActionFailed(_refusal(op, f"the argument {name!r} is not allowed"))
            if name == "device" and value not in (None, "cpu") and value != torch.device("cpu"):
                raise ActionFailed(_refusal(op, "only device='cpu' is allowed"))

    def _check_mutation(
        self,
        entry: AllowedOp,
        target: Any,
        args: list[Any],
        kwargs: dict[str, Any],
        inputs: _Inputs,
    ) -> None:
        if self.limits.allow_inplace_on_owner_objects:
            return
        mutated: list[Any] = []
        if entry.inplace and target is not None:
            mutated.append(target)
        if entry.receiver is None and (entry.inplace or entry.path.startswith("torch.optim.")):
            mutated.extend(args[:1])  # nn.init.*_(tensor), optimizers' params
            mutated.extend(v for k, v in kwargs.items() if k in ("params", "tensor"))
        if _updates_running_stats(entry, args, kwargs):
            mutated.extend(args[1:3])
            mutated.extend(v for k, v in kwargs.items() if k in ("running_mean", "running_var"))
        if entry.category == "nn.functional" and self._inplace_requested(entry, args, kwargs):
            mutated.extend(args[:1])  # F.relu(x, inplace=True) and the like
            mutated.extend(v for k, v in kwargs.items() if k == "input")
        for value in mutated:
            candidates = value if isinstance(value, (list, tuple)) else [value]
            for candidate in list(candidates)[:100_000]:
                if isinstance(candidate, dict):
                    candidate = candidate.get("params", [])
                if self.store.shares_owner_memory(candidate):
                    raise ActionFailed(
                        _refusal(entry.path, "it would modify an object the owner hosts")
                    )
        for record in inputs.records:
            if record.origin == "owner" and entry.inplace and record.value is target:
                raise ActionFailed(
                    _refusal(entry.path, "it would modify an object the owner hosts")
                )

    def _inplace_requested(self, entry: AllowedOp, args: list[Any], kwargs: dict[str, Any]) -> bool:
        """Whether a functional op was asked to write into its input (``inplace=True``)."""
        if kwargs.get("inplace") is True:
            return True
        if not any(a is True for a in args):
            return False
        try:
            bound = inspect.signature(self.allowlist.resolve(entry.path)).bind(*args, **kwargs)
        except (TypeError, ValueError):
            return True  # cannot tell: assume it writes
        return bound.arguments.get("inplace") is True

    def _shield_owner_inputs(
        self, entry: AllowedOp | None, target: Any, args: list[Any]
    ) -> list[Any]:
        """A module with an in-place layer (``ReLU(inplace=True)``) may write into its input:
        give it a copy of any input that is (or views) an object the owner hosts."""
        if (
            entry is None
            or self.limits.allow_inplace_on_owner_objects
            or entry.receiver != "torch.nn.Module"
            or entry.name not in ("__call__", "forward")
            or not isinstance(target, torch.nn.Module)
        ):
            return args
        exposed = [isinstance(a, torch.Tensor) and self.store.shares_owner_memory(a) for a in args]
        if not any(exposed) or not any(
            getattr(m, "inplace", False) is True for m in target.modules()
        ):
            return args
        return [a.clone() if hit else a for a, hit in zip(args, exposed, strict=True)]

    def _check_size(
        self,
        entry: AllowedOp,
        target: Any,
        args: list[Any],
        kwargs: dict[str, Any],
        inputs: _Inputs,
    ) -> None:
        """Refuse before running an op whose result would break the element cap."""
        if entry.receiver in _MODULE_RECEIVERS or entry.returns in (
            ReturnKind.MODULE,
            ReturnKind.OPTIMIZER,
            ReturnKind.NONE,
        ):
            return
        tensors = [t for t in _tensors(target, args, kwargs)]
        if (entry.category in _BOUNDED_CATEGORIES and entry.name not in _GROWING) or _tensor_index(
            entry, args
        ):
            bound = math.prod(max(1, t.numel()) for t in tensors[:64])
            if bound <= self.limits.max_result_elements:
                return
        predicted = _predict_elements(entry, self.allowlist, target, args, kwargs)
        if predicted is not None and predicted > self.limits.max_result_elements:
            detail = "" if inputs.private else f" ({predicted} elements)"
            raise ActionFailed(
                _refusal(
                    entry.path,
                    f"the result would exceed the owner's limit of "
                    f"{self.limits.max_result_elements} elements{detail}",
                )
            )

    def _check_module_size(
        self, entry: AllowedOp, args: list[Any], kwargs: dict[str, Any], inputs: _Inputs
    ) -> int:
        """Build a module constructor on the meta device first (no memory, no init) and
        refuse it if its new parameters and buffers would break the caps; returns their bytes.
        """
        if entry.returns is not ReturnKind.MODULE or entry.receiver is not None:
            return 0
        cls = self.allowlist.resolve(entry.path)
        reused: set[int] = set()
        try:
            bound = inspect.signature(cls).bind(*args, **kwargs)
            if "device" in bound.arguments:
                bound.arguments["device"] = "meta"
            meta_args = _meta_arguments(list(bound.args), reused)
            meta_kwargs = _meta_arguments(dict(bound.kwargs), reused)
            with torch.device("meta"):
                meta = cls(*meta_args, **meta_kwargs)
        except Exception as exc:  # noqa: BLE001 - the real constructor would fail the same way
            raise ActionFailed(self._op_error(entry.path, exc, inputs)) from None
        new = {id(t): t for t in (*meta.parameters(), *meta.buffers()) if id(t) not in reused}
        elements = sum(t.numel() for t in new.values())
        nbytes = sum(t.numel() * t.element_size() for t in new.values())
        detail = "" if inputs.private else f" ({elements:,} elements)"
        if elements > self.limits.max_result_elements:
            raise ActionFailed(
                _refusal(
                    entry.path,
                    f"the module's parameters would exceed the owner's limit of "
                    f"{self.limits.max_result_elements:,} elements{detail}",
                )
            )
        if self.store.peer_bytes + nbytes > self.limits.max_peer_bytes:
            raise ActionFailed(
                _refusal(entry.path, "the owner's memory budget for this peer is used up")
            )
        return nbytes

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

    def _op_error(self, op: str, exc: Exception, inputs: _Inputs) -> dict[str, Any]:
        log.info("op %s failed: %s: %s", op, type(exc).__name__, exc)
        if inputs.private:
            safe = (
                "the details are withheld because they may describe private data; "
                "the owner's log has them"
            )
            return error_info(exc, op=op, safe_message=safe)
        return error_info(exc, op=op, safe_message=str(exc)[:500])

    def _check_result(self, op: str, value: Any, nbytes: int, inputs: _Inputs) -> None:
        if (
            isinstance(value, (torch.Tensor, list, tuple))
            and _numel(value) > self.limits.max_result_elements
        ):
            raise ActionFailed(_refusal(op, "the result exceeds the owner's element limit"))
        if nbytes > self.limits.max_result_bytes:
            raise ActionFailed(_refusal(op, "the result exceeds the owner's size limit"))
        if self.store.peer_bytes + nbytes > self.limits.max_peer_bytes:
            raise ActionFailed(
                _refusal(op, "the owner's memory budget for this peer is used up; free pointers")
            )

    def _record(
        self, action: Action, entry: AllowedOp | None, value: Any, nbytes: int,
        inputs: _Inputs, *, render: bool = True,
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
        private = bool(inputs.private)
        aggregation = support = math.inf
        if private:
            aggregation, support = _aggregation(entry, inputs.private, value)
        tags: set[str] = set()
        for record in inputs.records:
            tags.update(record.lineage_tags)
        return StoredObject(
            id=action.result,
            value=value,
            origin="peer",
            private=private,
            expression=expression,
            ops=lineage.merge_ops(*(r.ops for r in inputs.records), (action.op,)),
            lineage_tags=frozenset(list(tags)[:64]),
            aggregation=aggregation,
            support=support,
            nbytes=nbytes,
        )

    def _taint(
        self,
        entry: AllowedOp | None,
        target: Any,
        args: list[Any],
        kwargs: dict[str, Any],
        record: StoredObject,
        watched: list[tuple[torch.Tensor, int]],
        grads_before: list[tuple[torch.Tensor, torch.Tensor | None]],
        env: dict[str, StoredObject] | None = None,
    ) -> None:
        """Mutations carry privacy: what a private op changed becomes private, and so does
        every object sharing its memory (a view, ``.data``, the module holding a parameter).

        Changes are found by the tensors' version counters, so ops that write into an
        argument (``copy_``, ``__setitem__``, ``nn.init.*``) count too; running statistics
        (which torch updates without a version bump) are named explicitly; ``backward``
        writes into the gradients of the leaves its graph reaches. A module evaluated on
        private data (eval mode, or no buffers) is not changed by it and stays as it was.

        The store is scanned only when an op on private data wrote into memory, so most
        ops (everything that makes a new tensor) cost nothing here. After a scan, the memory
        it covered is remembered as clean (every holder at least as restrictive as the
        source) until a new record holding it is made; writing again into clean memory from
        a source no more restrictive (a training loop's steps) needs no scan. A gradient
        that ``backward`` creates is new memory: only the holders of its parameter hold it.
        """
        if entry is None or not record.private:
            return
        mutated = [t for t, version in watched if t._version != version]
        mutated.extend(_running_stats(entry, args, kwargs))  # changed without a version bump
        if _updates_buffers(entry, target):
            mutated.extend(target.buffers())
        for leaf, before in grads_before:  # backward wrote into their gradients
            mutated.append(leaf)
            if before is not None and leaf.grad is before:  # accumulated in place
                mutated.append(before)
        if not mutated:
            return
        keys = {_storage_of(t) for t in mutated}
        owners = self.store.owner_records()  # not made here: always looked at
        if all(_restricts(self._clean.get(key), record) for key in keys):
            for other in owners:
                if not _covered(other, record) and _holds(other, keys):
                    _make_private(other, record)
            return
        local = env.values() if env else ()  # a plan's values, while it runs
        for other in (*self.store.peer_records(), *owners, *local):
            if other is not record and not _covered(other, record) and _holds(other, keys):
                _make_private(other, record)
        for key in keys:
            known = self._clean.get(key)
            tags = record.lineage_tags | known[1] if known else record.lineage_tags
            aggregation = min(record.aggregation, known[0]) if known else record.aggregation
            self._clean[key] = (aggregation, tags)
        if len(self._clean) > _MAX_CLEAN:
            self._clean.clear()

    def _unclean(self, value: Any) -> None:
        for tensor in _held_tensors(value):
            self._clean.pop(_storage_of(tensor), None)


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
        support=min(source.support, max(1, _numel(value))), nbytes=0,
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


def _restricts(known: tuple[float, frozenset[str]] | None, source: StoredObject) -> bool:
    """Whether a clean memory's holders are known to be at least as restrictive as
    ``source`` (a private record)."""
    return known is not None and known[0] <= source.aggregation and known[1] >= source.lineage_tags


def _holds(record: StoredObject, keys: set[int]) -> bool:
    return any(_storage_of(t) in keys for t in _held_tensors(record.value))


def _covered(record: StoredObject, source: StoredObject) -> bool:
    """Whether making ``record`` private from ``source`` would change nothing."""
    return (
        record.private
        and record.aggregation <= source.aggregation
        and record.lineage_tags >= source.lineage_tags
    )


def _tensor_index(entry: AllowedOp, args: list[Any]) -> bool:
    """``tensor[key]`` with a key of ints, slices, None, Ellipsis and tensors only: its
    result is bounded by the product of the tensors' sizes (a Python list index is not)."""
    if entry.path != "torch.Tensor.__getitem__" or len(args) != 1:
        return False
    key = args[0]
    parts = key if isinstance(key, tuple) else (key,)
    return len(parts) <= 64 and not any(isinstance(part, (list, tuple)) for part in parts)


def _updates_buffers(entry: AllowedOp, target: Any) -> bool:
    """Whether calling a module may write into its buffers (batch-norm statistics)."""
    return (
        entry.receiver == "torch.nn.Module"
        and entry.name in ("__call__", "forward")
        and isinstance(target, torch.nn.Module)
        and target.training
        and next(target.buffers(), None) is not None
    )


def _running_stats(entry: AllowedOp, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    """The running statistics a functional normalisation updates in place."""
    if not _updates_running_stats(entry, args, kwargs):
        return []
    found = [a for a in args[1:3] if isinstance(a, torch.Tensor)]
    found += [kwargs[k] for k in ("running_mean", "running_var") if k in kwargs]
    return [t for t in found if isinstance(t, torch.Tensor)]


def _held_tensors(value: Any, limit: int = 100_000) -> list[torch.Tensor]:
    """Every tensor ``value`` holds: a module's parameters, buffers and gradients, an
    optimizer's parameters, gradients and state, the items of containers."""
    if isinstance(value, torch.Tensor):  # the common case, kept fast
        grad = value.grad if value.is_leaf and value.requires_grad else None
        return [value] if grad is None else [value, grad]
    found: list[torch.Tensor] = []
    stack = [value]
    while stack and len(found) < limit:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
            if item.is_leaf and item.requires_grad and item.grad is not None:
                found.append(item.grad)
        elif isinstance(item, torch.nn.Module):
            stack.extend(item.parameters())
            stack.extend(item.buffers())
        elif isinstance(item, torch.optim.Optimizer):
            for group in item.param_groups:
                stack.extend(group["params"])
            stack.extend(item.state.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item[:10_000])
        elif isinstance(item, dict):
            stack.extend(list(item.values())[:10_000])
    return found


def _forward_of(entry: AllowedOp | None, target: Any) -> Any:
    """The module a forward pass runs: it writes into nothing of its own but its buffers
    (see ``_updates_buffers``), so its tensors need no watching."""
    if (
        entry is not None
        and entry.receiver == "torch.nn.Module"
        and entry.name in ("__call__", "forward")
    ):
        return target
    return None


def _watch(records: list[StoredObject], skip: Any = None) -> list[tuple[torch.Tensor, int]]:
    """The version counter of every tensor the input records hold (but ``skip``'s), to spot
    in-place writes."""
    seen: set[int] = set()
    watched = []
    for record in records:
        if id(record) not in seen and (skip is None or record.value is not skip):
            seen.add(id(record))
            watched.extend((t, t._version) for t in _held_tensors(record.value))
    return watched


def _graph_leaves(tensor: torch.Tensor, limit: int = 100_000) -> list[torch.Tensor]:
    """The leaf tensors ``tensor.backward()`` accumulates gradients into."""
    leaves: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [tensor.grad_fn]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _storage_of(tensor: torch.Tensor) -> int:
    """The address of the memory ``tensor`` lives in (shared by its views and aliases)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return id(tensor)


def _meta_arguments(value: Any, reused: set[int]) -> Any:
    """Constructor arguments with every tensor and module moved to the meta device;
    ``reused`` collects the ids of the meta tensors standing for existing ones."""
    if isinstance(value, torch.nn.Module):
        memo: dict[int, Any] = {}
        for tensor in (*value.parameters(), *value.buffers()):
            meta = torch.empty_like(tensor, device="meta")
            if isinstance(tensor, torch.nn.Parameter):
                meta = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = meta
            reused.add(id(meta))
        return copy.deepcopy(value, memo)
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, list):
        return [_meta_arguments(v, reused) for v in value]
    if isinstance(value, tuple):
        return tuple(_meta_arguments(v, reused) for v in value)
    if isinstance(value, dict):
        return {k: _meta_arguments(v, reused) for k, v in value.items()}
    return value


def _updates_running_stats(entry: AllowedOp, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether a functional norm writes into the running statistics it is given."""
    if entry.path == "torch.nn.functional.batch_norm":
        return bool(args[5] if len(args) > 5 else kwargs.get("training", False))
    if entry.path == "torch.nn.functional.instance_norm":
        return bool(args[5] if len(args) > 5 else kwargs.get("use_input_stats", True))
    return False


def _make_private(record: StoredObject, source: StoredObject) -> None:
    record.private = True
    record.aggregation = min(record.aggregation, source.aggregation)
    record.lineage_tags = record.lineage_tags | source.lineage_tags


def _aggregation(
    entry: AllowedOp | None, private: list[StoredObject], value: Any
) -> tuple[float, float]:
    """(aggregation, support) of a result computed from ``private`` inputs.

    Aggregation: the fewest private elements each value summarises. Support: roughly how
    many distinct private elements the result can depend on; it caps the aggregation a
    later reduction may claim, so broadcasting one private element over many (``x[0] *
    ones(1000)``) and then averaging still counts as one element, not a thousand.
    """
    aggregation = min(r.aggregation for r in private)
    support = sum(r.support for r in private)
    numel_out = max(1, _numel(value))
    if entry is not None and entry.reduction:
        numel_in = max(_numel(r.value) for r in private)
        summarised = aggregation * max(1.0, numel_in / numel_out)
        return min(summarised, max(1.0, support / numel_out)), support
    return aggregation, min(support, numel_out)


def _refusal(op: str, why: str) -> dict[str, Any]:
    return error_info(OperationNotAllowed(f"{op} was refused: {why}"), op=op)


# The walkers below are module-level functions that take the result list: a nested
# recursive closure is a reference cycle, which left every op's garbage (and the tensors
# it had found) to the cyclic collector, whose full passes then paused the owner ~150 ms.


def action_refs(action: Action) -> list[ObjectRef]:
    found: list[ObjectRef] = []
    _walk_refs(action.target, found)
    _walk_refs(action.args, found)
    _walk_refs(action.kwargs, found)
    return found


def _walk_refs(value: Any, found: list[ObjectRef]) -> None:
    if isinstance(value, ObjectRef):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk_refs(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _walk_refs(v, found)
    elif isinstance(value, slice):
        for v in (value.start, value.stop, value.step):
            _walk_refs(v, found)


def _tensors(target: Any, args: list[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _walk_tensors(target, found)
    _walk_tensors(args, found)
    _walk_tensors(list(kwargs.values()), found)
    return found


def _walk_tensors(value: Any, found: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value[:1000]:
            _walk_tensors(v, found)


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(_numel(v) for v in value[:10_000])
    return 1


def _to_meta(value: Any, scalars: bool = False) -> Any:
    """Tensors as meta tensors; with ``scalars``, one-element 0-d tensors as numbers."""
    if isinstance(value, torch.Tensor):
        if scalars and value.dim() == 0 and value.device.type != "meta":
            return value.item()
        return torch.empty_like(value, device="meta")
    if isinstance(value, list):
        return [_to_meta(v, scalars) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_meta(v, scalars) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v, scalars) for k, v in value.items()}
    return value


def _predict_elements(
    entry: AllowedOp, allowlist: Allowlist, target: Any, args: list[Any], kwargs: dict[str, Any]
) -> int | None:
    """Elements the op would produce, computed without running it on the data.

    On the meta device first; again with 0-d tensor arguments as numbers (sizes given as
    tensors: ``torch.ones(n)``); then, for ops whose output size depends on the values,
    a bound computed from them.
    """
    for scalars in (False, True):
        predicted = _predict_on_meta(entry, allowlist, target, args, kwargs, scalars)
        if predicted is not None:
            return predicted
    try:
        return _data_dependent_bound(entry.name, target, args, kwargs)
    except Exception:  # noqa: BLE001 - malformed arguments: the op itself will fail
        return None


def _data_dependent_bound(
    name: str, target: Any, args: list[Any], kwargs: dict[str, Any]
) -> int | None:
    """An upper bound on the result's elements for ops the meta device cannot size."""
    values = ([target] if target is not None else []) + list(args)

    def arg(index: int, key: str, default: Any = None) -> Any:
        return values[index] if len(values) > index else kwargs.get(key, default)

    first = arg(0, "input")
    if name == "repeat_interleave":
        repeats = arg(1, "repeats")
        if repeats is None:  # torch.repeat_interleave(repeats): the indices, repeated
            return int(first.sum())
        if isinstance(repeats, torch.Tensor):
            return int(repeats.sum()) * max(1, first.numel() // max(1, repeats.numel()))
    elif name == "bincount":
        largest = int(first.max()) + 1 if first.numel() else 0
        return max(largest, int(arg(2, "minlength", 0)))
    elif name == "masked_select":
        return math.prod(torch.broadcast_shapes(first.shape, arg(1, "mask").shape))
    elif name == "multinomial":
        return int(arg(1, "num_samples")) * (first.shape[0] if first.dim() == 2 else 1)
    elif name == "one_hot":
        classes = int(arg(1, "num_classes", -1))
        if classes < 0:
            classes = int(first.max()) + 1 if first.numel() else 0
        return first.numel() * classes
    elif name == "histogram":
        bins = arg(1, "bins", 100)
        return 2 * (bins.numel() if isinstance(bins, torch.Tensor) else int(bins)) + 1
    return None


def _predict_on_meta(
    entry: AllowedOp,
    allowlist: Allowlist,
    target: Any,
    args: list[Any],
    kwargs: dict[str, Any],
    scalars: bool,
) -> int | None:
    meta_kwargs = {**_to_meta(kwargs, scalars)}
    if (
        entry.receiver is None
        and "device" in meta_kwargs
        or entry.category in ("creation", "random")
    ):
        meta_kwargs["device"] = "meta"
    try:
        if entry.receiver is not None:
            if target is None:
                return None
            bound = allowlist.bind(entry.path, _to_meta(target))
            result = bound if entry.attribute else bound(*_to_meta(args, scalars), **meta_kwargs)
        else:
            result = allowlist.resolve(entry.path)(*_to_meta(args, scalars), **meta_kwargs)
    except Exception:  # noqa: BLE001 - ops the meta device cannot run are checked afterwards
        return None
    return _numel(result) if isinstance(result, (torch.Tensor, list, tuple)) else None


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
