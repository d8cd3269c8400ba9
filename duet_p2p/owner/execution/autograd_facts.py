"""Autograd and normalisation facts the worker's in-place checks need.

(Privacy itself is the monitor's: ``duet_p2p.owner.monitor`` labels objects from the
action graph.)
"""

from __future__ import annotations

from typing import Any

import torch

from duet_p2p.allowlist import AllowedOp


def updates_running_stats(entry: AllowedOp, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether a functional norm writes into the running statistics it is given."""
    if entry.path == "torch.nn.functional.batch_norm":
        return bool(args[5] if len(args) > 5 else kwargs.get("training", False))
    if entry.path == "torch.nn.functional.instance_norm":
        return bool(args[5] if len(args) > 5 else kwargs.get("use_input_stats", True))
    return False


def graph_leaves(tensor: torch.Tensor, limit: int = 100_000) -> list[torch.Tensor]:
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
