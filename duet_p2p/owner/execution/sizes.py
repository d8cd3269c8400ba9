"""Result sizes, predicted before an op runs: one that would break the owner's caps is
refused without being made.

Most ops are sized on the meta device (no memory, no data); ops whose output size depends
on the values get a bound computed from them; a module constructor is built on the meta
device to count its new parameters and buffers.
"""

from __future__ import annotations

import copy
import inspect
import math
import threading
from typing import Any

import torch

from duet_p2p.allowlist import AllowedOp, Allowlist, ReturnKind
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.execution.actions import ActionFailed, Inputs, op_error, refusal
from duet_p2p.store import OwnerStore

_BOUNDED_CATEGORIES = frozenset(
    {"arithmetic", "comparison", "reduction", "conversion", "loss", "operator"}
)
_GROWING = frozenset({"diag", "diag_embed", "cartesian_prod", "block_diag", "__getitem__"})
"""Ops of those categories whose result can hold more elements than their inputs together
(a tensor index is bounded, and checked by ``_tensor_index``; a list index is not)."""
_MODULE_RECEIVERS = ("torch.nn.Module", "torch.optim.Optimizer")


_warmed = threading.Event()


def warm_up() -> None:
    """Load what the first size prediction on the meta device imports (about a second),
    so the peer's first op does not pay for it. Safe to call more than once.

    Not a daemon thread (said explicitly: a thread started from the daemon I/O thread would
    inherit that), since one killed inside torch at interpreter exit aborts the process.
    """
    if not _warmed.is_set():
        _warmed.set()
        threading.Thread(target=_meta_add, name="duet-warm-up", daemon=False).start()


def _meta_add() -> None:
    torch.ones(1, device="meta") + 1


def check_size(
    entry: AllowedOp,
    allowlist: Allowlist,
    limits: OwnerLimits,
    target: Any,
    args: list[Any],
    kwargs: dict[str, Any],
    inputs: Inputs,
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
        if bound <= limits.max_result_elements:
            return
    predicted = _predict_elements(entry, allowlist, target, args, kwargs)
    if predicted is not None and predicted > limits.max_result_elements:
        detail = "" if inputs.private else f" ({predicted} elements)"
        raise ActionFailed(
            refusal(
                entry.path,
                f"the result would exceed the owner's limit of "
                f"{limits.max_result_elements} elements{detail}",
            )
        )


def check_module_size(
    entry: AllowedOp,
    allowlist: Allowlist,
    limits: OwnerLimits,
    store: OwnerStore,
    args: list[Any],
    kwargs: dict[str, Any],
    inputs: Inputs,
    *,
    budget: str = "public",
) -> int:
    """Build a module constructor on the meta device first (no memory, no init) and
    refuse it if its new parameters and buffers would break the caps; returns their bytes.
    """
    if entry.returns is not ReturnKind.MODULE or entry.receiver is not None:
        return 0
    cls = allowlist.resolve(entry.path)
    reused: set[int] = set()
    try:
        bound = inspect.signature(cls).bind(*args, **kwargs)
        if "device" in bound.arguments:
            bound.arguments["device"] = "meta"
        meta_args = _to_meta(list(bound.args), reused=reused)
        meta_kwargs = _to_meta(dict(bound.kwargs), reused=reused)
        with torch.device("meta"):
            meta = cls(*meta_args, **meta_kwargs)
    except Exception as exc:  # noqa: BLE001 - the real constructor would fail the same way
        raise ActionFailed(op_error(entry.path, exc, inputs)) from None
    new = {id(t): t for t in (*meta.parameters(), *meta.buffers()) if id(t) not in reused}
    elements = sum(t.numel() for t in new.values())
    nbytes = sum(t.numel() * t.element_size() for t in new.values())
    detail = "" if inputs.private else f" ({elements:,} elements)"
    if elements > limits.max_result_elements:
        raise ActionFailed(
            refusal(
                entry.path,
                f"the module's parameters would exceed the owner's limit of "
                f"{limits.max_result_elements:,} elements{detail}",
            )
        )
    if store.bytes_of(budget) + nbytes > limits.max_peer_bytes:
        raise ActionFailed(
            refusal(entry.path, "the owner's memory budget for this peer is used up")
        )
    return nbytes


def _tensor_index(entry: AllowedOp, args: list[Any]) -> bool:
    """``tensor[key]`` with a key of ints, slices, None, Ellipsis and tensors only: its
    result is bounded by the product of the tensors' sizes (a Python list index is not)."""
    if entry.path != "torch.Tensor.__getitem__" or len(args) != 1:
        return False
    key = args[0]
    parts = key if isinstance(key, tuple) else (key,)
    return len(parts) <= 64 and not any(isinstance(part, (list, tuple)) for part in parts)


# The walker below is a module-level function that takes the result list: a nested
# recursive closure is a reference cycle, which left every op's garbage (and the tensors
# it had found) to the cyclic collector, whose full passes then paused the owner ~150 ms.


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


def numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(numel(v) for v in value[:10_000])
    return 1


def _to_meta(value: Any, scalars: bool = False, reused: set[int] | None = None) -> Any:
    """Tensors as meta tensors; with ``scalars``, one-element 0-d tensors as numbers.

    With ``reused`` (constructor arguments), modules too: copies whose parameters and
    buffers are meta tensors, whose ids ``reused`` collects (they stand for existing ones).
    """
    if reused is not None and isinstance(value, torch.nn.Module):
        memo: dict[int, Any] = {}
        for tensor in (*value.parameters(), *value.buffers()):
            meta = torch.empty_like(tensor, device="meta")
            if isinstance(tensor, torch.nn.Parameter):
                meta = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = meta
            reused.add(id(meta))
        return copy.deepcopy(value, memo)
    if isinstance(value, torch.Tensor):
        if scalars and value.dim() == 0 and value.device.type != "meta":
            return value.item()
        return torch.empty_like(value, device="meta")
    if isinstance(value, list):
        return [_to_meta(v, scalars, reused) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_meta(v, scalars, reused) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v, scalars, reused) for k, v in value.items()}
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
    return numel(result) if isinstance(result, (torch.Tensor, list, tuple)) else None
