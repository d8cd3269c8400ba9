"""The owner's monitor: labels every object from the action graph, and decides what may run.

It never looks at a worker's memory. For each action it knows only what the scientist
sent (op, references, literals) and what it already knows of the referenced objects, and
from that alone it computes the result's label, which objects the op may have written
into or captured, and whether the op may run at all. Unsure means "may": an op with an
unknown effect may write into or capture every argument; any private input makes the
result private and every argument it may have changed private too.

Objects that may share memory sit in one *alias group* (a view and its base, a module and
its parameters, an optimizer and what it updates). A write into any member taints the
whole group: every member's label is then at least the writer's label, and a tensor's
records are no longer known to be where they were. Owner objects are mapped read-only into
workers, so a write can never change them; an op that would write into a group holding
one is refused before it runs.

Randomness: each session's generator lives in its worker. A random op with a private
argument makes the generator private (it advanced by a private amount), and every later
draw from it is then private.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from duet_p2p import lineage
from duet_p2p.allowlist import AllowedOp, Allowlist, Effect, ReturnKind, check_path_syntax
from duet_p2p.allowlist_effects import SCALAR_ONLY
from duet_p2p.errors import DuetError, OperationNotAllowed
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner import module_facts
from duet_p2p.owner.labels import PUBLIC, Label, hosted_label, merged
from duet_p2p.owner.module_facts import ModuleFacts
from duet_p2p.rpc import plan_spec
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.errors import error_info
from duet_p2p.rpc.messages import Action
from duet_p2p.rpc.ops import INDEX_OP
from duet_p2p.rpc.refs import action_refs, refs_in

FORBIDDEN_KWARGS = frozenset({"out", "pin_memory", "generator", "closure", "layout"})
_CALLS = frozenset({"torch.nn.Module.__call__", "torch.nn.Module.forward"})
_STATE_DICT_KWARGS = frozenset({"keep_vars", "prefix"})
MAX_REFS = 10_000
"""References one action may name (more is refused: labelling must stay cheap)."""
MAX_LOST = 100_000
"""Objects remembered as lost in a worker restart (older ones are then just unknown)."""
MAX_PLAN_PASSES = 8
"""Times a plan's ``map`` is replayed over labels before its effects are taken as settled."""


class Refused(DuetError):
    """The monitor will not run an action; ``info`` is what the scientist is told."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info.get("message", "refused"))
        self.info = info


def _refusal(op: str, why: str) -> Refused:
    return Refused(error_info(OperationNotAllowed(f"{op} was refused: {why}"), op=op))


class Group:
    """Objects that may share memory (union-find, with the group's taint at the root)."""

    __slots__ = ("parent", "taint", "owner", "grads", "mode", "fitted", "__weakref__")

    def __init__(self, *, owner: bool = False, grads: bool = False) -> None:
        self.parent: Group | None = None
        self.mode: tuple[object, bool] | None = None
        """(module node, training) of the last mode switch (train or eval) on a member."""
        self.taint: Label | None = None
        """Set once anything wrote into the group: the join of every writer's label."""
        self.owner = owner
        """Holds an object the owner hosts."""
        self.grads = grads
        """Holds tensors ``backward`` may accumulate gradients into."""
        self.fitted: int | None = None
        """For a module: the fewest records of the private data that reached it, by a call
        or by a write (rows of a hosted tensor, or its elementwise maps); UNKNOWN_RECORDS
        once anything else did (a slice, a batch, a loss's gradients, a copied record)."""

    def root(self) -> Group:
        group = self
        while group.parent is not None:
            if group.parent.parent is not None:
                group.parent = group.parent.parent
            group = group.parent
        return group


def _union(groups: Iterable[Group]) -> Group:
    distinct: dict[int, Group] = {}
    for group in groups:
        root = group.root()
        distinct.setdefault(id(root), root)
    roots = list(distinct.values())
    if not roots:
        return Group()
    first = roots[0]
    for other in roots[1:]:
        other.parent = first
        first.owner |= other.owner
        first.grads |= other.grads
        if other.mode is not None:
            first.mode = other.mode if first.mode is None else (None, True)  # unsure: training
        if other.taint is not None:
            first.taint = other.taint if first.taint is None else first.taint.merge(other.taint)
        first.fitted = _fewer_records(first.fitted, other.fitted)
    return first


UNKNOWN_RECORDS = -1


def _fewer_records(a: int | None, b: int | None) -> int | None:
    if a is None or b is None:
        return b if a is None else a
    if UNKNOWN_RECORDS in (a, b):
        return UNKNOWN_RECORDS
    return min(a, b)


@dataclass(slots=True)
class Node:
    """What the monitor knows of one object: never its value."""

    id: str
    own: Label
    """The label it was made with (its group's taint may add to it)."""
    group: Group
    origin: str
    """"owner" (hosted) or "peer" (made by the scientist's actions or uploads)."""
    expression: str = ""
    ops: tuple[str, ...] = ()
    kind: str = "value"
    """tensor, module, optimizer, plan or value."""
    error: dict[str, Any] | None = None
    """Set when the monitor refused the action that should have made it (public)."""
    plan: plan_spec.PlanSpec | None = None
    writes_in_forward: bool = False
    """An owner module whose forward pass writes into itself (refused)."""
    facts: ModuleFacts | None = None
    """For a module: what calling it may write."""
    graph: bool = False
    """May carry an autograd graph (made with gradients from something that needs them):
    a ``backward`` through it consumes state other objects share."""


@dataclass
class Admission:
    """The monitor's verdict on one action."""

    node: Node
    """The result's node (with ``error`` set when refused)."""
    private: bool
    budget: float
    """Seconds the worker may spend on it."""
    refused: bool = False
    inputs: list[str] = field(default_factory=list)
    """The IDs the action names, in order (for the audit log)."""


@dataclass
class _Context:
    """One action as the labelling rules see it."""

    action: Action
    entry: AllowedOp | None
    refs: list[ObjectRef]
    nodes: list[Node]
    labels: list[Label] = field(default_factory=list)


class Monitor:
    """Labels and admission for one scientist's session."""

    def __init__(self, allowlist: Allowlist, limits: OwnerLimits) -> None:
        self.allowlist = allowlist
        self.limits = limits
        self.read_only = not limits.allow_inplace_on_owner_objects
        self.nodes: dict[str, Node] = {}
        self.rng = PUBLIC
        """The label of the session's random generator."""
        self._grad_groups: weakref.WeakSet[Group] = weakref.WeakSet()
        """Groups holding tensors ``backward`` may accumulate into (weak: freed groups go)."""
        self._graph_groups: weakref.WeakSet[Group] = weakref.WeakSet()
        self._entries: dict[str, AllowedOp] = {}
        self.version = 0
        """Counts changes of taints, the generator's label and module modes (a map's replay
        stops when a pass changes nothing)."""
        self.lost: dict[str, str] = {}
        """Objects lost with a worker, and why (bounded: the oldest are forgotten)."""

    # -- objects that do not come from actions ---------------------------------------------

    def host(
        self, object_id: str, value: Any, *, private: bool, tags: tuple[str, ...], expression: str
    ) -> Node:
        """An object the owner hosts; each row of a private tensor is a record."""
        is_module = isinstance(value, torch.nn.Module)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        node = Node(
            id=object_id,
            own=hosted_label(private, frozenset(tags), shape),
            group=Group(owner=True, grads=is_module),
            origin="owner",
            expression=expression,
            kind="module" if is_module else "tensor",
            writes_in_forward=is_module and module_writes_in_forward(value),
            facts=module_facts.from_module(value) if is_module else None,
        )
        if is_module:
            self._grad_groups.add(node.group)
        self.nodes[object_id] = node
        return node

    def unhost(self, object_id: str) -> None:
        node = self.nodes.get(object_id)
        if node is not None and node.origin == "owner":
            del self.nodes[object_id]

    def upload(self, object_id: str, *, spec: Any = None, requires_grad: bool = False) -> Node:
        """A value the scientist placed here (a tensor, or a module ``spec``): public."""
        module = spec is not None
        kind = "module" if module else "tensor"
        node = Node(
            id=object_id, own=PUBLIC, group=self._new_group(grads=module or requires_grad),
            origin="peer", expression=f"uploaded_{kind}", kind=kind,
            facts=module_facts.from_spec(spec) if module else None,
        )  # fmt: skip
        self._add(node)
        return node

    def free(self, ids: Iterable[str]) -> list[str]:
        """Forget objects the scientist made; the owner's are never freed by the peer."""
        freed = []
        for object_id in ids:
            node = self.nodes.get(object_id)
            if node is not None and node.origin == "peer":
                del self.nodes[object_id]
                freed.append(object_id)
        return freed

    def forget_peer_objects(self, cause: str) -> list[str]:
        """Drop every object the scientist made (its worker was lost), remembering why."""
        lost = [i for i, n in self.nodes.items() if n.origin == "peer"]
        for object_id in lost:
            del self.nodes[object_id]
            self.lost[object_id] = cause
        while len(self.lost) > MAX_LOST:
            del self.lost[next(iter(self.lost))]
        self._grad_groups = weakref.WeakSet(g for g in self._grad_groups if g.root().owner)
        self.rng = PUBLIC  # the next worker seeds a fresh generator
        return lost

    def missing(self, object_id: str, op: str | None = None) -> dict[str, Any]:
        """What the scientist is told of an object the monitor does not hold."""
        cause = self.lost.get(object_id)
        if cause is not None:
            message = (f"object {object_id} was lost when the owner's worker was stopped "
                       f"({cause}); compute it again")  # fmt: skip
        else:
            message = f"no object {object_id} on the owner's side (freed or never made)"
        info = {"code": "not_found", "type": "KeyError", "message": message}
        return {**info, "op": op} if op else info

    def label(self, node: Node) -> Label:
        """A node's label now: what it was made with, joined with any write into it."""
        taint = node.group.root().taint
        if taint is None or (node.origin == "owner" and self.read_only):
            return node.own  # read-only memory: no write can have reached it
        own = node.own
        return Label(own.private or taint.private, own.tags | taint.tags,
                     min(own.aggregation, taint.aggregation))  # fmt: skip

    def peer_count(self) -> int:
        return sum(1 for n in self.nodes.values() if n.origin == "peer")

    # -- actions ---------------------------------------------------------------------------

    def admit(self, action: Action) -> Admission:
        """Label an action's result and apply its effects; or refuse it (a public error)."""
        budget = self.limits.max_op_seconds
        refs = action_refs(action)
        inputs = [ref.id for ref in refs]
        try:
            if action.op in plan_spec.PLAN_OPS:
                node = self._plan(action)
                budget = self.limits.max_plan_seconds
            else:
                node = self._apply(action, None, refs)
        except Refused as refused:
            node = Node(
                id=action.result, own=PUBLIC, group=Group(), origin="peer",
                expression=action.op[:200], ops=(action.op[:200],), error=refused.info,
            )  # fmt: skip
            if action.result not in self.nodes or self.nodes[action.result].origin == "peer":
                self._add(node)
            return Admission(node, private=False, budget=0.0, refused=True, inputs=inputs)
        return Admission(node, private=self.label(node).private, budget=budget, inputs=inputs)

    def _apply(
        self, action: Action, env: dict[str, Node] | None, refs: list[ObjectRef] | None = None
    ) -> Node:
        """Label one action (inside a plan's replay, ``env`` holds its own values; ``refs``:
        its references, when the caller has them already)."""
        op = action.op
        if env is None:
            existing = self.nodes.get(action.result)
            if existing is not None and existing.origin == "owner":
                raise _refusal(op, "the result ID is taken by an owner object")
            if len(self.nodes) >= self.limits.max_peer_objects:
                raise _refusal(op, "too many objects held for the peer; free some")
        entry = self._entry(op)
        refs = action_refs(action) if refs is None else refs
        if len(refs) > MAX_REFS:
            raise _refusal(op, f"it names more than {MAX_REFS:,} objects")
        nodes = [self._resolve(ref, op, env) for ref in refs]
        ctx = _Context(action, entry, refs, nodes, [self.label(n) for n in nodes])
        inplace_functional = self._check_arguments(ctx)
        effect = Effect.VIEW if entry is None else entry.effect
        if inplace_functional:
            effect = Effect.MUTATES_FIRST
        is_call = entry is not None and entry.path in _CALLS
        written = self._written(ctx, effect, is_call)
        if self.read_only and any(g.root().owner for g in self._guarded(ctx, effect)):
            raise _refusal(op, "it would modify an object the owner hosts")
        if is_call and self._calls_writing_owner_module(ctx):
            raise _refusal(op, "that module of the owner's changes itself when called")
        if is_call:
            self._note_fit(ctx, written)
        inputs = merged(ctx.labels)
        draws = self._call_draws(ctx) if is_call else (entry is not None and entry.draws)
        if draws:
            if inputs.private and not self.rng.covers(inputs):
                self.rng = self.rng.merge(inputs)
                self.version += 1
            inputs = inputs.merge(self.rng)
        label = result_label(ctx, inputs) if not draws else _plain(inputs)
        for group in written:  # a call's own inputs were counted by _note_fit
            self._taint(group, inputs, fit=not is_call)
        if effect is Effect.GRADIENTS:
            # gradients land in every leaf the graph reaches, and the graph is freed for
            # every tensor it runs through: whether that happened is the backward's secret
            for group in [*self._live_grad_groups(), *self._graph_groups]:
                self._taint(group, inputs)
        node = Node(
            id=action.result,
            own=label,
            group=self._result_group(ctx, effect, is_call),
            origin="peer",
            ops=lineage.merge_ops(*(n.ops for n in nodes), (op,)),
            kind=_kind_of(entry),
        )
        if _makes_grad_leaves(ctx, effect):
            node.group.root().grads = True
            self._grad_groups.add(node.group)
        if not action.no_grad and any(n.graph or n.group.root().grads for n in nodes):
            node.graph = True
            self._graph_groups.add(node.group)
        if node.kind == "module" or (entry is not None and entry.receiver == "torch.nn.Module"):
            node.facts = self._facts_of_result(ctx)
        if env is None:
            node.expression = self._render(ctx)
            self._add(node)
        else:
            env[action.result] = node
        return node

    def _facts_of_result(self, ctx: _Context) -> ModuleFacts | None:
        """A module made by a constructor, or returned by a module's own method."""
        entry, action = ctx.entry, ctx.action
        target = _node_of(action.target, ctx)
        if entry is None or entry.receiver == "torch.nn.Module":
            if target is not None and entry is not None and entry.name in ("train", "eval"):
                training = entry.name == "train" and (action.args or [True])[0] is not False
                target.group.root().mode = (target, training)
                self.version += 1
            if entry is not None and entry.returns is ReturnKind.MODULE and target is not None:
                return target.facts
            return None
        if entry.returns is not ReturnKind.MODULE:
            return None
        parts = [n.facts for n in ctx.nodes]
        return module_facts.from_constructor(entry.name, list(action.args),
                                             dict(action.kwargs), parts)  # fmt: skip

    def _entry(self, op: str) -> AllowedOp | None:
        if op == INDEX_OP:
            return None
        entry = self._entries.get(op)
        if entry is None:
            try:
                check_path_syntax(op)
                entry = self.allowlist.get(op)
            except OperationNotAllowed as exc:
                raise Refused(error_info(exc, op=op[:200])) from None
            self._entries[op] = entry
        return entry

    def _resolve(self, ref: ObjectRef, op: str, env: dict[str, Node] | None) -> Node:
        node = env.get(ref.id) if env is not None else None
        if node is None:
            node = self.nodes.get(ref.id)
        if node is None:
            raise Refused(self.missing(ref.id, op))
        if node.error is not None:
            raise Refused(node.error)
        return node

    def _check_arguments(self, ctx: _Context) -> bool:
        """Arguments that would alias, capture or write past the labels are refused.
        Returns whether a functional op was asked to work in place (``inplace=True``)."""
        action, entry = ctx.action, ctx.entry
        for name, value in action.kwargs.items():
            if name in FORBIDDEN_KWARGS:
                raise _refusal(action.op, f"the argument {name!r} is not allowed")
            if name == "device" and value not in (None, "cpu") and value != torch.device("cpu"):
                raise _refusal(action.op, "only device='cpu' is allowed")
        if entry is None:
            return False
        if entry.path == "torch.nn.Module.state_dict" and (
            action.args or set(action.kwargs) - _STATE_DICT_KWARGS
        ):
            raise _refusal(action.op, "state_dict takes only keep_vars= and prefix=")
        if entry.path == "torch.nn.Module.load_state_dict" and (
            action.kwargs.get("assign", False) is not False or len(action.args) > 2
        ):
            raise _refusal(action.op, "load_state_dict(assign=True) would alias its argument")
        return entry.category == "nn.functional" and _inplace_requested(
            self.allowlist, entry, action
        )

    def _written(self, ctx: _Context, effect: Effect, is_call: bool) -> list[Group]:
        """The groups the op may write into, or capture its arguments into: they take the
        op's label. (Owner objects in them keep theirs: their memory is read-only.)"""
        if effect in (Effect.PURE, Effect.VIEW):
            return self._guarded(ctx, effect)  # pure but for a few functional writes
        if effect in (Effect.MUTATES, Effect.MUTATES_FIRST, Effect.GRADIENTS):
            return self._guarded(ctx, effect)
        if is_call:
            return self._call_writes(ctx)
        return [n.group for n in ctx.nodes]  # a constructor may capture its arguments

    def _call_writes(self, ctx: _Context) -> list[Group]:
        """A module call writes into the module (running statistics while training,
        ``max_norm``) and, through in-place layers, into its inputs, as its facts say."""
        target = _node_of(ctx.action.target, ctx)
        facts = (target.facts if target is not None else None) or module_facts.UNKNOWN
        written: list[Group] = []
        if target is not None and (
            not facts.known or facts.max_norm or (facts.stats and self._training(target, facts))
        ):
            written.append(target.group)
        if not facts.known or facts.inplace:
            written.extend(n.group for n in ctx.nodes if n is not target)
        return written

    def _note_fit(self, ctx: _Context, written: list[Group]) -> None:
        """Remember how many records a module was called on (for the model-size check). A
        call that writes into the module (running statistics, ``max_norm``) keeps
        aggregates of its input there, which two such modules can difference: its records
        count as unknown."""
        target = _node_of(ctx.action.target, ctx)
        if target is None:
            return
        root = target.group.root()
        writes_itself = any(group.root() is root for group in written)
        for node, label in zip(ctx.nodes, ctx.labels, strict=True):
            if node is target or not label.private:
                continue
            known = label.records is not None and not writes_itself
            records = label.records if known else UNKNOWN_RECORDS
            root.fitted = _fewer_records(root.fitted, records)

    def records_fitted(self, node: Node) -> int | None:
        """The fewest records a module was called on, when known (None: not known, or
        never called on private data)."""
        fitted = node.group.root().fitted
        return None if fitted is None or fitted == UNKNOWN_RECORDS else fitted

    def _call_draws(self, ctx: _Context) -> bool:
        """Whether a module call may draw from the generator (dropout while training)."""
        target = _node_of(ctx.action.target, ctx)
        facts = (target.facts if target is not None else None) or module_facts.UNKNOWN
        if not facts.known:
            return True
        return facts.random and target is not None and self._training(target, facts)

    @staticmethod
    def _training(node: Node, facts: ModuleFacts) -> bool:
        mode = node.group.root().mode
        if mode is None:
            return facts.training
        return not (mode[0] is node and mode[1] is False)

    def _guarded(self, ctx: _Context, effect: Effect) -> list[Group]:
        """The groups the op certainly writes into: refused when they hold owner objects."""
        action = ctx.action
        functional = [_node_of(ref, ctx) for ref in _functional_writes(self.allowlist, ctx)]
        if functional:
            return [n.group for n in functional if n is not None]
        if effect in (Effect.MUTATES, Effect.GRADIENTS):
            target = _node_of(action.target, ctx)
            return [target.group] if target is not None else []
        if effect is Effect.MUTATES_FIRST:
            first = (
                action.args[0]
                if action.args
                else action.kwargs.get("tensor", action.kwargs.get("input"))
            )
            written = [_node_of(ref, ctx) for ref in refs_in(first)]
            return [n.group for n in written if n is not None]
        return []

    def _calls_writing_owner_module(self, ctx: _Context) -> bool:
        target = _node_of(ctx.action.target, ctx)
        if target is None or not target.group.root().owner:
            return False
        return target.origin != "owner" or target.writes_in_forward

    def _result_group(self, ctx: _Context, effect: Effect, is_call: bool) -> Group:
        """The result may share memory with its inputs unless the op makes new memory."""
        if effect is Effect.PURE:
            return self._new_group()
        if is_call:  # a module may return its input (Identity) but not its parameters
            args = [n.group for n, r in zip(ctx.nodes, ctx.refs, strict=True)
                    if r not in refs_in(ctx.action.target)]  # fmt: skip
            return _union(args) if args else self._new_group()
        if effect is Effect.VIEW:
            aliased = _aliased(ctx)
            return _union([n.group for n in aliased]) if aliased else self._new_group()
        return _union([n.group for n in ctx.nodes]) if ctx.nodes else self._new_group()

    def _taint(self, group: Group, label: Label, *, fit: bool = True) -> None:
        """Something with ``label`` wrote into ``group``: every member is at least that now."""
        root = group.root()
        if fit and label.private:  # private data reached it other than by a call
            records = UNKNOWN_RECORDS if label.records is None else label.records
            root.fitted = _fewer_records(root.fitted, records)
        if root.taint is None or not root.taint.covers(label):
            root.taint = label if root.taint is None else root.taint.merge(label)
            self.version += 1
        elif root.taint is None:
            root.taint = label

    def _new_group(self, *, grads: bool = False) -> Group:
        group = Group(grads=grads)
        if grads:
            self._grad_groups.add(group)
        return group

    def _live_grad_groups(self) -> list[Group]:
        roots: dict[int, Group] = {}
        for group in list(self._grad_groups):
            root = group.root()
            roots.setdefault(id(root), root)
        self._grad_groups = weakref.WeakSet(roots.values())
        return list(roots.values())

    def _add(self, node: Node) -> None:
        self.nodes[node.id] = node

    def _render(self, ctx: _Context) -> str:
        names = {
            r.id: n.expression or f"obj_{r.id[:8]}"
            for r, n in zip(ctx.refs, ctx.nodes, strict=True)
        }
        action = ctx.action
        return lineage.render_call(
            action.op, action.target, action.args, action.kwargs, names,
            attribute=bool(ctx.entry and ctx.entry.attribute),
        )  # fmt: skip

    # -- plans ---------------------------------------------------------------------------

    def _plan(self, action: Action) -> Node:
        if action.op == plan_spec.DEFINE_OP:
            try:
                spec = plan_spec.parse_plan(list(action.args))
            except DuetError as exc:
                raise Refused(error_info(exc, op=action.op)) from None
            for step in spec.steps:
                self._entry(step.op)
            node = Node(
                id=action.result, own=PUBLIC, group=Group(), origin="peer",
                expression=spec.name, ops=(action.op,), kind="plan", plan=spec,
            )  # fmt: skip
            self._add(node)
            return node
        target = _only_ref(action.target)
        plan_node = self._resolve(target, action.op, None) if target else None
        if plan_node is None or plan_node.plan is None:
            raise _refusal(action.op, "its target is not a plan")
        spec = plan_node.plan
        if len(action.args) != len(spec.inputs) or action.kwargs:
            raise _refusal(action.op, f"plan {spec.name} takes {len(spec.inputs)} inputs")
        bound = [self._bind(pid, arg, action.op) for pid, arg in zip(spec.inputs, action.args,
                                                                      strict=True)]  # fmt: skip
        if action.op == plan_spec.RUN_OP:
            outputs, steps = self._replay(spec, bound)
            expression = f"{spec.name}({_names(bound)})"
        else:
            sequence = bound[0]
            item = Node(
                id=spec.inputs[0], own=_plain(self.label(sequence)), group=sequence.group,
                origin="peer", expression=f"{sequence.expression}[i]", ops=sequence.ops,
            )  # fmt: skip
            outputs, steps = self._replay_until_settled(spec, [item, *bound[1:]])
            expression = f"{spec.name}.map({_names(bound)})"
        label = _plain(merged([self.label(n) for n in outputs]).merge(steps))
        node = Node(
            id=action.result, own=label, group=_union([n.group for n in outputs]),
            origin="peer", expression=_clip(expression),
            ops=lineage.merge_ops(*(n.ops for n in outputs)), kind="value",
        )  # fmt: skip
        self._add(node)
        return node

    def _bind(self, plan_id: str, argument: Any, op: str) -> Node:
        """A plan input: the node a reference names, or one standing for a literal or a
        container of references (sharing their groups)."""
        if isinstance(argument, ObjectRef):
            return self._resolve(argument, op, None)
        nodes = [self._resolve(ref, op, None) for ref in refs_in(argument)]
        return Node(
            id=plan_id, own=_plain(merged([self.label(n) for n in nodes])),
            group=_union([n.group for n in nodes]), origin="peer",
            expression=lineage.render_value(argument, {}),
            ops=lineage.merge_ops(*(n.ops for n in nodes)),
        )  # fmt: skip

    def _replay(self, spec: plan_spec.PlanSpec, bound: list[Node]) -> tuple[list[Node], Label]:
        """Label a plan's steps in order; returns its outputs, and the join of every step's
        label (a plan fails as a whole when any step fails: its result answers for all)."""
        env: dict[str, Node] = dict(zip(spec.inputs, bound, strict=True))
        for step in spec.steps:
            self._apply(step, env)
        outputs = []
        for output in spec.outputs:
            node = env.get(output) or self.nodes.get(output)
            if node is None:
                raise _refusal(plan_spec.RUN_OP, f"plan {spec.name} lost an output")
            outputs.append(node)
        return outputs, merged([self.label(n) for n in env.values()])

    def _replay_until_settled(
        self, spec: plan_spec.PlanSpec, bound: list[Node]
    ) -> tuple[list[Node], Label]:
        """Replay a mapped plan over labels until a pass changes nothing (each item may read
        what an earlier item wrote, or run in a mode an earlier item set)."""
        for _ in range(MAX_PLAN_PASSES):
            before = self.version
            outputs, steps = self._replay(spec, bound)
            if self.version == before:
                return outputs, steps
        everything = merged([self.label(n) for n in self.nodes.values()])
        for group in self._live_grad_groups():
            self._taint(group, everything)
        self.rng = self.rng.merge(everything)
        return outputs, _plain(everything)


# -- labelling rules -------------------------------------------------------------------------


def result_label(ctx: _Context, inputs: Label) -> Label:
    """The label of an action's result, given the join of its inputs' labels.

    ``aggregation`` counts records only where the op and its arguments make the count
    certain: a counting reduction (sum, mean, count, ...) over dimension 0 of a tensor
    whose rows are still the owner's records, reached from the hosted tensor by
    elementwise maps with scalars only; and ops on one such aggregate alone. Everything
    else private (max, quantiles, indexing, masks, a difference of two aggregates) counts
    as one record.
    """
    if not inputs.private:
        return inputs
    entry = ctx.entry
    private = _distinct_private(ctx)
    if entry is not None and entry.elementwise:
        aligned = _aligned_elementwise(ctx)
        if aligned is not None:
            return aligned
    if entry is not None and entry.counts and len(private) == 1 and len(ctx.nodes) == 1:
        counted = _counted(ctx, private[0][1])
        if counted is not None:
            return Label(True, inputs.tags, counted[0], counted[1], counted[2],
                         aggregate=counted[1] is None)  # fmt: skip
    if len(private) == 1 and private[0][1].aggregate:
        return Label(True, inputs.tags, private[0][1].aggregation, aggregate=True)
    return Label(True, inputs.tags, 1.0)


def _distinct_private(ctx: _Context) -> list[tuple[Node, Label]]:
    found: dict[int, tuple[Node, Label]] = {}
    for node, label in zip(ctx.nodes, ctx.labels, strict=True):
        if label.private:
            found.setdefault(id(node), (node, label))
    return list(found.values())


def _aligned_elementwise(ctx: _Context) -> Label | None:
    """Elementwise over record-aligned tensors of one row count and rank, with scalar
    literals only: the rows stay the owner's records."""
    labels = ctx.labels
    if not labels or any(not lb.private for lb in labels) or labels[0].records is None:
        return None  # a public tensor operand (a mask, a one-hot) breaks the alignment
    if any(lb.records != labels[0].records or lb.ndim != labels[0].ndim for lb in labels):
        return None
    scaling = ctx.entry is not None and ctx.entry.name in SCALAR_ONLY
    if not _scalar_literals(ctx.action, nonzero=scaling):
        return None
    if scaling and len(labels) > 1:
        return None  # x * x is a square, x * (x > 5) a selection
    tags = frozenset().union(*(lb.tags for lb in labels))
    aggregation = min(lb.aggregation for lb in labels)
    return Label(True, tags, aggregation, labels[0].records, labels[0].ndim)


def _scalar_literals(action: Action, *, nonzero: bool = False) -> bool:
    """Whether every literal operand is a finite scalar (and, for scaling, not zero: ``x /
    0`` makes the infinities and NaN masks that select records)."""
    for value in (*action.args, *action.kwargs.values()):
        if isinstance(value, ObjectRef) or value is None or isinstance(value, (torch.dtype, str)):
            continue
        if isinstance(value, (bool, int, float)):
            if not math.isfinite(value) or (nonzero and value == 0):
                return False
            continue
        return False
    return True


def _counted(ctx: _Context, label: Label) -> tuple[float, int | None, int | None] | None:
    """(aggregation, records, ndim) of a counting reduction over a record-aligned input, or
    None when its arguments make the count unsure."""
    if label.records is None or label.ndim is None:
        return None
    action = ctx.action
    positional = list(action.args)
    if action.target is None:
        positional = positional[1:]  # torch.sum(x, ...): the input comes first
    dim: Any = action.kwargs.get("dim", action.kwargs.get("axis"))
    if positional and not isinstance(positional[0], bool):
        if dim is not None:
            return None
        dim = positional[0]
    keepdim = action.kwargs.get("keepdim", False)
    if len(positional) > 1 or not isinstance(keepdim, bool):
        return None  # unbiased/keepdim by position: unsure what the result's rank is
    if dim is None:
        return label.aggregation * max(1, label.records), None, None
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    ndim = max(1, label.ndim)
    if any(not -ndim <= d < ndim for d in dims):
        return None
    normal = {d % ndim for d in dims}
    if 0 in normal:
        return label.aggregation * max(1, label.records), None, None
    remaining = label.ndim if keepdim else label.ndim - len(normal)
    return label.aggregation, label.records, remaining  # reduced within each row


def _plain(label: Label) -> Label:
    """The label without what it knows of records (after an op that mixes them)."""
    if not label.private:
        return label
    return Label(True, label.tags, min(label.aggregation, 1.0))


def _node_of(value: Any, ctx: _Context) -> Node | None:
    ref = _only_ref(value)
    if ref is None:
        return None
    for r, node in zip(ctx.refs, ctx.nodes, strict=True):
        if r.id == ref.id:
            return node
    return None


def _aliased(ctx: _Context) -> list[Node]:
    """What a view may share memory with: a method's receiver, or every argument of a
    function (``einsum``, ``split(tensor=...)``, ``broadcast_tensors`` ...)."""
    if ctx.action.target is None:
        return list(ctx.nodes)
    refs = refs_in(ctx.action.target)
    return [n for r, n in zip(ctx.refs, ctx.nodes, strict=True) if any(r.id == x.id for x in refs)]


def _only_ref(value: Any) -> ObjectRef | None:
    return value if isinstance(value, ObjectRef) else None


def _kind_of(entry: AllowedOp | None) -> str:
    if entry is None:
        return "value"
    if entry.returns is ReturnKind.MODULE:
        return "module"
    if entry.returns is ReturnKind.OPTIMIZER:
        return "optimizer"
    if entry.returns is ReturnKind.TENSOR:
        return "tensor"
    return "value"


def _makes_grad_leaves(ctx: _Context, effect: Effect) -> bool:
    entry = ctx.entry
    if entry is None:
        return False
    if entry.returns in (ReturnKind.MODULE, ReturnKind.OPTIMIZER):
        return True
    if entry.name == "requires_grad_":
        return True
    return ctx.action.kwargs.get("requires_grad") is True


def _inplace_requested(allowlist: Allowlist, entry: AllowedOp, action: Action) -> bool:
    """Whether a functional op may write into its input: ``inplace`` is anything but a
    literal false value (a private tensor as the flag counts as "may")."""
    if "inplace" in action.kwargs:
        return _truthy(action.kwargs["inplace"])
    if len(action.args) < 2:
        return False
    try:
        parameters = inspect.signature(allowlist.resolve(entry.path)).parameters
    except (TypeError, ValueError):
        return False  # a builtin (linear, conv2d, ...): it has no inplace argument
    if "inplace" not in parameters:
        return False
    arguments = _bind(allowlist, entry, action)
    return True if arguments is None else _truthy(arguments.get("inplace", False))


def _bind(allowlist: Allowlist, entry: AllowedOp, action: Action) -> dict[str, Any] | None:
    """A function call's arguments by name, or None when they cannot be told apart."""
    try:
        signature = inspect.signature(allowlist.resolve(entry.path))
        return dict(signature.bind(*action.args, **action.kwargs).arguments)
    except (TypeError, ValueError):
        return None


def _truthy(value: Any) -> bool:
    """Whether a flag may be set: only literal False, None and zero are certainly not."""
    if value is None or value is False:
        return False
    return not (isinstance(value, (int, float)) and value == 0)


_FUNCTIONAL_WRITES: dict[str, tuple[tuple[str, ...], str, Any]] = {
    "torch.nn.functional.batch_norm": (("running_mean", "running_var"), "training", False),
    "torch.nn.functional.instance_norm": (("running_mean", "running_var"), "use_input_stats", True),
    "torch.nn.functional.embedding": (("weight",), "max_norm", None),
}
"""Functions that write into some arguments when a flag is set: (written, flag, default)."""


def _functional_writes(allowlist: Allowlist, ctx: _Context) -> list[ObjectRef]:
    """What a normalisation or embedding function writes (running statistics, the rows
    ``max_norm`` renormalises), by its arguments; unsure means all of them."""
    entry = ctx.entry
    if entry is None or entry.path not in _FUNCTIONAL_WRITES:
        return []
    written, flag, default = _FUNCTIONAL_WRITES[entry.path]
    arguments = _bind(allowlist, entry, ctx.action)
    if arguments is None:
        return list(ctx.refs)
    if not _truthy(arguments.get(flag, default)):
        return []
    return refs_in(*(arguments.get(name) for name in written))


def module_writes_in_forward(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` changes it: running statistics in training mode, or an
    embedding that renormalises the rows it reads (``max_norm``)."""
    for sub in module.modules():
        if sub.training and getattr(sub, "track_running_stats", False):
            return True
        if getattr(sub, "max_norm", None) is not None:
            return True
    return False


def _names(nodes: list[Node]) -> str:
    return ", ".join(n.expression or f"obj_{n.id[:8]}" for n in nodes[:16])


def _clip(text: str) -> str:
    return text if len(text) <= lineage.MAX_EXPRESSION_CHARS else text[:1999] + "…"


def elements_of(value: Any) -> float:
    """Elements a decoded value holds; a value it cannot count is counted as unbounded."""
    if isinstance(value, torch.Tensor):
        return float(value.numel())
    if isinstance(value, (bool, int, float, complex)) or value is None:
        return 1.0
    if isinstance(value, (list, tuple)):
        return float(sum(elements_of(v) for v in value))
    if isinstance(value, dict):
        return float(sum(elements_of(v) for v in value.values()))
    return math.inf
