"""How privacy flows: from an action's inputs to its result, and into what it wrote.

A result made from private inputs is private, with an aggregation and support computed
from theirs (``result_aggregation``). An op on private data that writes into memory (in
place, into running statistics, or ``backward`` into gradients) makes every record holding
that memory private too (``TaintTracker``).
"""

from __future__ import annotations

from typing import Any

import torch

from duet_p2p.allowlist import AllowedOp
from duet_p2p.sizes import numel
from duet_p2p.store import OwnerStore, StoredObject

_MAX_CLEAN = 1_000_000


class TaintTracker:
    """Spreads privacy through memory that an op on private data wrote into."""

    def __init__(self, store: OwnerStore) -> None:
        self.store = store
        self._clean: dict[int, tuple[float, frozenset[str]]] = {}
        """Storage address -> (aggregation, tags) that every record holding that memory is
        known to be at least as restrictive as (all private); see ``taint``."""

    def taint(
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
        keys = {storage_of(t) for t in mutated}
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

    def unclean(self, value: Any) -> None:
        """Forget what is known clean of the memory ``value`` holds: a new holder of it, not
        yet checked."""
        if self._clean:
            for tensor in held_tensors(value):
                self._clean.pop(storage_of(tensor), None)


def updates_running_stats(entry: AllowedOp, args: list[Any], kwargs: dict[str, Any]) -> bool:
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


def result_aggregation(
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
    numel_out = max(1, numel(value))
    if entry is not None and entry.reduction:
        numel_in = max(numel(r.value) for r in private)
        summarised = aggregation * max(1.0, numel_in / numel_out)
        return min(summarised, max(1.0, support / numel_out)), support
    return aggregation, min(support, numel_out)


def _restricts(known: tuple[float, frozenset[str]] | None, source: StoredObject) -> bool:
    """Whether a clean memory's holders are known to be at least as restrictive as
    ``source`` (a private record)."""
    return known is not None and known[0] <= source.aggregation and known[1] >= source.lineage_tags


def _holds(record: StoredObject, keys: set[int]) -> bool:
    return any(storage_of(t) in keys for t in held_tensors(record.value))


def _covered(record: StoredObject, source: StoredObject) -> bool:
    """Whether making ``record`` private from ``source`` would change nothing."""
    return (
        record.private
        and record.aggregation <= source.aggregation
        and record.lineage_tags >= source.lineage_tags
    )


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
    if not updates_running_stats(entry, args, kwargs):
        return []
    found = [a for a in args[1:3] if isinstance(a, torch.Tensor)]
    found += [kwargs[k] for k in ("running_mean", "running_var") if k in kwargs]
    return [t for t in found if isinstance(t, torch.Tensor)]


def held_tensors(value: Any, limit: int = 100_000) -> list[torch.Tensor]:
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


def forward_of(entry: AllowedOp | None, target: Any) -> Any:
    """The module a forward pass runs: it writes into nothing of its own but its buffers
    (see ``_updates_buffers``), so its tensors need no watching."""
    if (
        entry is not None
        and entry.receiver == "torch.nn.Module"
        and entry.name in ("__call__", "forward")
    ):
        return target
    return None


def watch(records: list[StoredObject], skip: Any = None) -> list[tuple[torch.Tensor, int]]:
    """The version counter of every tensor the input records hold (but ``skip``'s), to spot
    in-place writes."""
    seen: set[int] = set()
    watched = []
    for record in records:
        if id(record) not in seen and (skip is None or record.value is not skip):
            seen.add(id(record))
            watched.extend((t, t._version) for t in held_tensors(record.value))
    return watched


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


def storage_of(tensor: torch.Tensor) -> int:
    """The address of the memory ``tensor`` lives in (shared by its views and aliases)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return id(tensor)
