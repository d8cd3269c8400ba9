"""The monitor's labelling rules, unit by unit (no processes, no connection)."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest
import torch
from torch import nn

from duet_p2p.allowlist import DEFAULT_ALLOWLIST
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.monitor import Monitor
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.messages import Action


class Graph:
    """A monitor and the actions a scientist would send it."""

    def __init__(self) -> None:
        self.monitor = Monitor(DEFAULT_ALLOWLIST, OwnerLimits())

    def host(self, value: Any, tag: str, public: bool = False) -> ObjectRef:
        object_id = uuid.uuid4().hex
        self.monitor.host(object_id, value, private=not public, tags=(tag,), expression=tag)
        return ObjectRef(object_id)

    def op(self, op: str, *args: Any, target: Any = None, **kwargs: Any) -> ObjectRef:
        result = uuid.uuid4().hex
        verdict = self.monitor.admit(
            Action(op=op, result=result, target=target, args=list(args), kwargs=kwargs)
        )
        if verdict.refused:
            raise PermissionError(verdict.node.error["message"])
        return ObjectRef(result)

    def method(self, name: str, target: ObjectRef, *args: Any, **kwargs: Any) -> ObjectRef:
        return self.op(f"torch.Tensor.{name}", *args, target=target, **kwargs)

    def label(self, ref: ObjectRef) -> Any:
        return self.monitor.label(self.monitor.nodes[ref.id])


@pytest.fixture
def g() -> Graph:
    return Graph()


def test_private_inputs_make_private_results(g: Graph) -> None:
    x = g.host(torch.ones(4), "x")
    w = g.host(torch.ones(4), "w", public=True)
    assert g.label(g.method("__add__", x, w)).private
    assert not g.label(g.method("__add__", w, 1)).private
    assert g.label(g.method("__add__", w, x)).tags == {"w", "x"}


def test_writes_through_views_and_containers_reach_every_alias(g: Graph) -> None:
    x = g.host(torch.ones(4), "x")
    mine = g.op("torch.zeros", 4)
    view = g.method("t", g.method("view", mine, 2, 2))
    g.method("copy_", view, g.method("view", x, 2, 2))
    assert g.label(mine).private
    other = g.op("torch.zeros", 4)
    stacked = g.op("torch.broadcast_tensors", other, g.op("torch.zeros", 4))
    g.method("add_", g.op("duet.index", 0, target=stacked), g.method("sum", x))
    assert g.label(other).private, "broadcast_tensors views all its arguments"


def test_owner_objects_are_never_written(g: Graph) -> None:
    x = g.host(torch.ones(4), "x")
    for attempt in (
        lambda: g.method("add_", x, 1),
        lambda: g.method("zero_", g.method("view", x, 2, 2)),
        lambda: g.op("torch.nn.init.zeros_", g.method("detach", x)),
        lambda: g.op("torch.nn.functional.relu", x, inplace=True),
        lambda: g.op("torch.add", x, 1, out=x),
    ):
        with pytest.raises(PermissionError):
            attempt()


def test_aggregation_counts_only_certain_sums(g: Graph) -> None:
    x = g.host(torch.ones(10, 3), "x")
    assert g.label(g.method("sum", x)).aggregation == 10
    assert g.label(g.method("mean", x, 0)).aggregation == 10
    assert g.label(g.method("sum", x, dim=-2, keepdim=True)).aggregation == 10
    within = g.method("sum", x, 1)
    assert g.label(within).aggregation == 1 and g.label(within).records == 10
    assert g.label(g.method("sum", within)).aggregation == 10, "rows still records"
    shifted = g.method("__gt__", g.method("__mul__", x, 2.0), 1)
    assert g.label(g.method("sum", shifted, 0)).aggregation == 10
    mask = g.op("torch.ones", 10, 3)
    assert g.label(g.method("sum", g.method("__mul__", x, mask))).aggregation == 1
    total = g.method("sum", x)
    rest = g.method("sum", g.method("__getitem__", x, slice(1, None)))
    assert g.label(g.method("__sub__", total, rest)).aggregation == 1
    assert g.label(g.method("item", total)).aggregation == 10
    assert g.label(g.method("amax", x)).aggregation == 1
    assert g.label(g.method("sum", x, 0, True)).aggregation == 1, "unsure: one record"
    assert g.label(g.method("std", x)).aggregation == 1, "squares are not counted"
    exp = g.method("exp", g.method("__mul__", x, 1e3))
    assert g.label(g.method("sum", exp)).aggregation == 1, "log-sum-exp is a maximum"
    assert g.label(g.method("sum", g.method("__mul__", x, x))).aggregation == 1
    column = g.method("__getitem__", x, (slice(None), None))  # (10, 1, 3): another rank
    assert g.label(g.method("__eq__", column, x)).aggregation == 1


def test_random_draws_sized_by_private_data(g: Graph) -> None:
    x = g.host(torch.tensor(3), "x")
    assert not g.label(g.op("torch.rand", 3)).private
    assert g.label(g.op("torch.rand", g.method("item", x))).private
    assert g.label(g.op("torch.rand", 3)).private, "the generator is private from now on"
    assert g.label(g.op("torch.nn.Linear", 2, 2)).private, "initialised from it"


def test_module_calls_write_what_their_facts_say(g: Graph) -> None:
    x = g.host(torch.ones(4, 2), "x")
    plain = g.op("torch.nn.Linear", 2, 2)
    g.op("torch.nn.Module.__call__", x, target=plain)
    assert not g.label(plain).private
    norm = g.op("torch.nn.BatchNorm1d", 2)
    g.op("torch.nn.Module.__call__", x, target=norm)
    assert g.label(norm).private, "running statistics in training mode"
    frozen = g.op("torch.nn.BatchNorm1d", 2)
    g.op("torch.nn.Module.eval", target=frozen)
    g.op("torch.nn.Module.__call__", x, target=frozen)
    assert not g.label(frozen).private
    embedding = g.op("torch.nn.Embedding", 4, 2, max_norm=1.0)
    g.op("torch.nn.Module.__call__", g.method("long", x), target=embedding)
    assert g.label(embedding).private


def test_aliasing_arguments_are_refused(g: Graph) -> None:
    linear = g.op("torch.nn.Linear", 2, 2)
    with pytest.raises(PermissionError, match="assign"):
        g.op("torch.nn.Module.load_state_dict", {}, target=linear, assign=True)
    with pytest.raises(PermissionError, match="state_dict"):
        g.op("torch.nn.Module.state_dict", target=linear, destination={})


def test_plans_are_labelled_step_by_step(g: Graph) -> None:
    x = g.host(torch.ones(8, 2), "x")
    model = g.op("torch.nn.Linear", 2, 2)
    plan = g.op("duet.plan.define", "step", ["i"], ["loss"], [
        {"op": "torch.Tensor.__getitem__", "result": "b", "target": x, "args": [ObjectRef("i")]},
        {"op": "torch.nn.Module.__call__", "result": "h", "target": model,
         "args": [ObjectRef("b")]},
        {"op": "torch.Tensor.sum", "result": "loss", "target": ObjectRef("h")},
        {"op": "torch.Tensor.backward", "result": "none", "target": ObjectRef("loss")},
    ])  # fmt: skip
    batches = g.method("split", g.op("torch.arange", 8), 2)
    losses = g.op("duet.plan.map", batches, target=plan)
    assert g.label(losses).private
    assert g.label(model).private, "backward wrote its gradients"
    assert not math.isinf(g.label(losses).aggregation)
    assert g.label(losses).tags == {"x"}


def test_unknown_ops_and_objects_are_refused(g: Graph) -> None:
    with pytest.raises(PermissionError, match="allowlist"):
        g.op("torch.Tensor.numpy", target=g.op("torch.ones", 2))
    with pytest.raises(PermissionError, match="no object"):
        g.method("sum", ObjectRef("f" * 32))


def test_hosted_modules_that_change_themselves_cannot_be_called(g: Graph) -> None:
    owned = g.host(nn.Embedding(4, 2, max_norm=1.0), "embedding")
    with pytest.raises(PermissionError, match="changes itself"):
        g.op("torch.nn.Module.__call__", g.op("torch.tensor", [1]), target=owned)
    trained = g.host(nn.Sequential(nn.Linear(2, 2)).eval(), "model")
    assert g.label(g.op("torch.nn.Module.__call__", g.op("torch.ones", 1, 2), target=trained))
