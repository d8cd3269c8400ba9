"""Running the peer's actions in the owner's process: allowlisted, capped, recorded.

Each action names an op on the allowlist, its receiver and arguments (literals and
references to stored objects). The executor checks everything before running it, runs it,
bounds the result, and stores it (or the error) under the ID the scientist chose, with its
lineage and privacy. Error texts that could describe private data are withheld.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from duet_p2p import lineage
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
_BOUNDED_CATEGORIES = frozenset({"arithmetic", "comparison", "reduction", "conversion"})
_MODULE_RECEIVERS = ("torch.nn.Module", "torch.optim.Optimizer")


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
        try:
            self.store.put(record)
        except KeyError:
            log.warning("refused to overwrite owner object %s", action.result)
        return record

    # -- the steps ---------------------------------------------------------------------

    def _run(self, action: Action) -> StoredObject:
        op = action.op
        if self.store.get(action.result) is not None:
            existing = self.store.get(action.result)
            if existing is not None and existing.origin == "owner":
                raise ActionFailed(_refusal(op, "the result ID is taken by an owner object"))
        if self.store.peer_object_count() >= self.limits.max_peer_objects:
            raise ActionFailed(_refusal(op, "too many objects held for the peer; free some"))
        entry = self._entry(op)
        inputs = _Inputs([])
        target = self._resolve(action.target, inputs, op)
        args = self._resolve(action.args, inputs, op)
        kwargs = self._resolve(action.kwargs, inputs, op)
        self._check_kwargs(op, kwargs)
        if entry is not None:
            self._check_mutation(entry, target, args, kwargs, inputs)
            self._check_size(entry, target, args, kwargs, inputs)
        started = time.perf_counter()
        try:
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
        nbytes = value_nbytes(value) if not isinstance(value, torch.nn.Module) else 0
        self._check_result(op, value, nbytes, inputs)
        record = self._record(action, entry, target, args, kwargs, value, nbytes, inputs)
        self._taint(entry, op, target, record)
        return record

    def _entry(self, op: str) -> AllowedOp | None:
        if op == INDEX_OP:
            return None
        try:
            check_path_syntax(op)
            return self.allowlist.get(op)
        except OperationNotAllowed as exc:
            raise ActionFailed(error_info(exc, op=op[:200])) from None

    def _resolve(self, value: Any, inputs: _Inputs, op: str) -> Any:
        """Swap ObjectRefs for stored values (collecting the records)."""
        if isinstance(value, ObjectRef):
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
            return [self._resolve(v, inputs, op) for v in value]
        if isinstance(value, tuple):
            return tuple(self._resolve(v, inputs, op) for v in value)
        if isinstance(value, dict):
            return {k: self._resolve(v, inputs, op) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(
                *(self._resolve(p, inputs, op) for p in (value.start, value.stop, value.step))
            )
        return value

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
        if entry.path.startswith("torch.optim.") and entry.receiver is None:
            mutated.extend(args[:1])
            mutated.extend(v for k, v in kwargs.items() if k == "params")
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
        if entry.category in _BOUNDED_CATEGORIES:
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
        if isinstance(value, torch.Tensor) and value.numel() > self.limits.max_result_elements:
            raise ActionFailed(_refusal(op, "the result exceeds the owner's element limit"))
        if nbytes > self.limits.max_result_bytes:
            raise ActionFailed(_refusal(op, "the result exceeds the owner's size limit"))
        if self.store.peer_bytes + nbytes > self.limits.max_peer_bytes:
            raise ActionFailed(
                _refusal(op, "the owner's memory budget for this peer is used up; free pointers")
            )

    def _record(
        self, action: Action, entry: AllowedOp | None, target: Any, args: list[Any],
        kwargs: dict[str, Any], value: Any, nbytes: int, inputs: _Inputs,
    ) -> StoredObject:  # fmt: skip
        names = {}
        for ref, record in zip(action_refs(action), inputs.records, strict=False):
            names[ref.id] = record.expression or f"obj_{ref.id[:8]}"
        expression = lineage.render_call(
            action.op, action.target, action.args, action.kwargs, names,
            attribute=bool(entry and entry.attribute),
        )  # fmt: skip
        private = bool(inputs.private)
        aggregation = math.inf
        if private:
            aggregation = min(r.aggregation for r in inputs.private)
            if entry is not None and entry.reduction:
                numel_in = max((_numel(r.value) for r in inputs.private), default=1)
                numel_out = max(1, _numel(value))
                aggregation *= max(1.0, numel_in / numel_out)
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
            nbytes=nbytes,
        )

    def _taint(self, entry: AllowedOp | None, op: str, target: Any, record: StoredObject) -> None:
        """Mutations carry privacy: a target changed by private data becomes private."""
        if entry is None or not record.private:
            return
        mutating = entry.inplace or entry.receiver in _MODULE_RECEIVERS
        if mutating and target is not None:
            for other in self.store.records_holding(target):
                _make_private(other, record)
        if entry.name == "backward":
            for other in self.store.peer_records():
                if isinstance(other.value, torch.nn.Module) or (
                    isinstance(other.value, torch.Tensor) and other.value.requires_grad
                ):
                    _make_private(other, record)


def _make_private(record: StoredObject, source: StoredObject) -> None:
    record.private = True
    record.aggregation = min(record.aggregation, source.aggregation)
    record.lineage_tags = record.lineage_tags | source.lineage_tags


def _refusal(op: str, why: str) -> dict[str, Any]:
    return error_info(OperationNotAllowed(f"{op} was refused: {why}"), op=op)


def action_refs(action: Action) -> list[ObjectRef]:
    found: list[ObjectRef] = []

    def walk(value: Any) -> None:
        if isinstance(value, ObjectRef):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, slice):
            for v in (value.start, value.stop, value.step):
                walk(v)

    walk(action.target)
    walk(action.args)
    walk(action.kwargs)
    return found


def _tensors(target: Any, args: list[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value[:1000]:
                walk(v)

    walk(target)
    walk(args)
    walk(list(kwargs.values()))
    return found


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(_numel(v) for v in value[:10_000])
    return 1


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, list):
        return [_to_meta(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def _predict_elements(
    entry: AllowedOp, allowlist: Allowlist, target: Any, args: list[Any], kwargs: dict[str, Any]
) -> int | None:
    """Elements the op would produce, computed on the meta device (no data, no memory)."""
    meta_kwargs = {**_to_meta(kwargs)}
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
            result = bound if entry.attribute else bound(*_to_meta(args), **meta_kwargs)
        else:
            result = allowlist.resolve(entry.path)(*_to_meta(args), **meta_kwargs)
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
