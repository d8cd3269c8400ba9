"""In-place writes into the objects the owner hosts: refused, unless the owner allows them.

An op that would write into memory an owner object holds (an in-place method, ``nn.init``,
an optimizer over its parameters, running statistics, ``inplace=True``) is refused before
it runs; a module with an in-place layer gets a copy of such an input instead.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from duet_p2p.allowlist import AllowedOp, Allowlist
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.execution.actions import ActionFailed, Inputs, refusal
from duet_p2p.owner.execution.autograd_facts import graph_leaves, updates_running_stats
from duet_p2p.store import OwnerStore


def check_mutation(
    entry: AllowedOp,
    allowlist: Allowlist,
    limits: OwnerLimits,
    store: OwnerStore,
    target: Any,
    args: list[Any],
    kwargs: dict[str, Any],
    inputs: Inputs,
) -> None:
    """Refuse an op that would write into an object the owner hosts (or its memory)."""
    if limits.allow_inplace_on_owner_objects:
        return
    mutated: list[Any] = []
    if entry.inplace and target is not None:
        mutated.append(target)
    if entry.receiver is None and (entry.inplace or entry.path.startswith("torch.optim.")):
        mutated.extend(args[:1])  # nn.init.*_(tensor), optimizers' params
        mutated.extend(v for k, v in kwargs.items() if k in ("params", "tensor"))
    if updates_running_stats(entry, args, kwargs):
        mutated.extend(args[1:3])
        mutated.extend(v for k, v in kwargs.items() if k in ("running_mean", "running_var"))
    if entry.category == "nn.functional" and _inplace_requested(entry, allowlist, args, kwargs):
        mutated.extend(args[:1])  # F.relu(x, inplace=True) and the like
        mutated.extend(v for k, v in kwargs.items() if k == "input")
    if entry.name == "backward" and isinstance(target, torch.Tensor):
        mutated.extend(graph_leaves(target))  # gradients accumulate into the leaves
    if _updates_module_statistics(entry, target):
        mutated.append(target)
    for value in mutated:
        candidates = value if isinstance(value, (list, tuple)) else [value]
        for candidate in list(candidates)[:100_000]:
            if isinstance(candidate, dict):
                candidate = candidate.get("params", [])
            if store.shares_owner_memory(candidate):
                raise ActionFailed(refusal(entry.path, "it would modify an object the owner hosts"))
    for record in inputs.records:
        if record.origin == "owner" and entry.inplace and record.value is target:
            raise ActionFailed(refusal(entry.path, "it would modify an object the owner hosts"))


def _updates_module_statistics(entry: AllowedOp, target: Any) -> bool:
    """Whether calling ``target`` updates running statistics (BatchNorm in training mode)."""
    return (
        entry.receiver == "torch.nn.Module"
        and entry.name in ("__call__", "forward")
        and isinstance(target, torch.nn.Module)
        and any(m.training and getattr(m, "track_running_stats", False) for m in target.modules())
    )


def _inplace_requested(
    entry: AllowedOp, allowlist: Allowlist, args: list[Any], kwargs: dict[str, Any]
) -> bool:
    """Whether a functional op was asked to write into its input (``inplace=True``)."""
    if "inplace" in kwargs:
        return bool(kwargs["inplace"]) if isinstance(kwargs["inplace"], (bool, int)) else True
    if len(args) < 2:
        return False
    try:
        signature = inspect.signature(allowlist.resolve(entry.path))
    except (TypeError, ValueError):
        return False  # a builtin (linear, conv2d, ...): it has no inplace argument
    if "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return True  # cannot tell: assume it writes
    flag = bound.arguments.get("inplace", False)
    return bool(flag) if isinstance(flag, (bool, int, float)) else True


def shield_owner_inputs(
    entry: AllowedOp | None,
    limits: OwnerLimits,
    store: OwnerStore,
    target: Any,
    args: list[Any],
    kwargs: dict[str, Any],
) -> tuple[list[Any], dict[str, Any]]:
    """A module with an in-place layer (``ReLU(inplace=True)``) may write into its input:
    give it a copy of any input, positional or keyword, that is (or views) an object the
    owner hosts."""
    if (
        entry is None
        or limits.allow_inplace_on_owner_objects
        or entry.receiver != "torch.nn.Module"
        or entry.name not in ("__call__", "forward")
        or not isinstance(target, torch.nn.Module)
        or not any(getattr(m, "inplace", False) for m in target.modules())  # any truthy flag
    ):
        return args, kwargs

    def shielded(value: Any) -> Any:
        exposed = isinstance(value, torch.Tensor) and store.shares_owner_memory(value)
        return value.clone() if exposed else value

    return [shielded(a) for a in args], {k: shielded(v) for k, v in kwargs.items()}
