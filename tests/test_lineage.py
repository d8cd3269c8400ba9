"""Lineage: the owner sees what a requested value is, as an expression, and a short name."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import duet_p2p as sy
from duet_p2p import lineage
from duet_p2p.permissions import Request
from duet_p2p.rpc.codec import ObjectRef
from tests.conftest import close_pair, make_pair, wait_for

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def pair(signaling_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    owner, scientist = make_pair(signaling_url, tmp_path_factory.mktemp("lin") / "audit.jsonl")
    owner.store.send(torch.tensor([[0, 0], [0, 1]]), tags=["data"])
    owner.store.send(torch.eye(2), tags=["a"])
    owner.store.send(torch.ones(2, 3), tags=["b", "second"])
    owner.store.send(torch.ones(2), tags=["my data"])
    yield owner, scientist
    close_pair(scientist, owner)


def _request_for(owner: sy.Duet, pointer: Any, reason: str = "") -> Request:
    """Ask without waiting and return the owner's record of the request, once the value
    behind it is known (its size is filled in then)."""
    handle = pointer.request(reason)
    request = owner.requests[handle.request_id]
    assert wait_for(lambda: request.ready, TIMEOUT)
    return request


Build = Callable[[Any, Any], Any]
CASES: list[tuple[str, Build, str, str]] = [
    ("item of sum", lambda s, t: s["data"].sum().item(), "data.sum().item()", "sum"),
    ("plus literal", lambda s, t: s["data"] + 1, "(data + 1)", "add"),
    ("reflected", lambda s, t: 1 + s["data"], "(1 + data)", "radd"),
    ("slice", lambda s, t: s["data"][0:2], "data[0:2]", "getitem"),
    ("tuple index", lambda s, t: s["data"][0, 1:], "data[0, 1:]", "getitem"),
    ("matmul function", lambda s, t: t.matmul(s["a"], s["b"]), "torch.matmul(a, b)", "matmul"),
    ("@ operator", lambda s, t: s["a"] @ s["b"], "(a @ b)", "matmul"),
    ("kwargs", lambda s, t: s["b"].sum(dim=0), "b.sum(dim=0)", "sum"),
    ("negation", lambda s, t: -s["a"], "-a", "neg"),
    ("abs", lambda s, t: abs(s["a"]), "abs(a)", "abs"),
    ("attribute", lambda s, t: s["b"].T, "b.T", "T"),
    ("conversion is not the name", lambda s, t: s["data"].float().mean(), "data.float().mean()",
     "mean"),
    ("only conversions", lambda s, t: s["data"].float(), "data.float()", "float"),
    ("first tag names it", lambda s, t: s["second"].max(), "b.max()", "max"),
    ("creation", lambda s, t: t.ones(3) * s["data"].sum(), "(torch.ones(3) * data.sum())", "mul"),
    ("literal tensor", lambda s, t: s["a"] + torch.tensor([1.0, 2.0]),
     "(a + tensor(shape=[2], dtype=float32))", "add"),
    ("nested function", lambda s, t: t.nn.functional.relu(s["a"] - 1).sum(),
     "torch.nn.functional.relu((a - 1)).sum()", "sum"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("description", "build", "expression", "name"), CASES, ids=[c[0] for c in CASES]
)
def test_request_lineage_and_name(
    pair: Any, description: str, build: Build, expression: str, name: str
) -> None:
    owner, scientist = pair
    pointer = build(scientist.store, scientist.torch)
    request = _request_for(owner, pointer, reason=description)
    assert request.lineage == expression
    assert request.name == name
    assert request.reason == description
    assert expression in repr(request)
    # the scientist's pointer describes itself the same way
    assert expression in repr(pointer)


def test_request_ops_tags_and_aggregation(pair: Any) -> None:
    owner, scientist = pair
    request = _request_for(owner, scientist.store["data"].sum().item())
    assert request.ops == ("torch.Tensor.sum", "torch.Tensor.item")
    assert request.tags == frozenset({"data"})
    assert request.elements == 1
    assert request.aggregation == 2.0  # one value summarising both records (rows) of data
    both = _request_for(owner, scientist.store["a"] @ scientist.store["b"])
    assert both.tags == frozenset({"a", "b", "second"})
    assert both.ops == ("torch.Tensor.__matmul__",)


def test_owner_request_table_shows_the_name(pair: Any) -> None:
    owner, scientist = pair
    request = _request_for(owner, scientist.store["data"].sum().item(), "To see the result")
    rows = [line for line in repr(owner.requests).splitlines() if request.request_id in line]
    assert len(rows) == 1
    assert rows[0].split()[1:5] == ["sum", "To", "see", "the"]


def test_unidentifier_tag_uses_the_object_id(pair: Any) -> None:
    owner, scientist = pair
    pointer = scientist.store["my data"]
    request = _request_for(owner, pointer.sum())
    assert request.lineage == f"obj_{pointer.id[:8]}.sum()"


def test_uploaded_values_are_named_as_such(pair: Any) -> None:
    owner, scientist = pair
    mine = scientist.send(torch.ones(2, 2))
    request = _request_for(owner, scientist.store["a"] * mine)
    assert request.lineage == "(a * uploaded_tensor)"
    assert not math.isinf(request.aggregation)  # still private: it mixes in the owner's data
    public_only = mine + 1  # depends on no private data: released without a request
    assert "(uploaded_tensor + 1)" in repr(public_only)
    assert torch.equal(public_only.get(timeout_secs=TIMEOUT), torch.full((2, 2), 2.0))


def test_pointer_argument_and_number_pointer(pair: Any) -> None:
    owner, scientist = pair
    total = scientist.store["data"].sum().item()
    scaled = scientist.store["a"] * total
    request = _request_for(owner, scaled)
    assert request.lineage == "(a * data.sum().item())"
    assert request.name == "mul"


def test_failed_op_lineage_names_the_op(pair: Any) -> None:
    owner, scientist = pair
    owner.requests.add_handler("accept")  # a failure on private data is released like a value
    with pytest.raises(sy.RemoteError) as caught:
        scientist.store["data"].reshape(7, 7).get(timeout_secs=TIMEOUT)
    assert caught.value.op == "torch.Tensor.reshape"


# -- the rendering functions themselves ------------------------------------------------


def test_render_call_forms() -> None:
    names = {"x" * 32: "data", "y" * 32: "w"}
    x, y = ObjectRef("x" * 32), ObjectRef("y" * 32)

    def render(op: str, target: Any, *args: Any, **kwargs: Any) -> str:
        return lineage.render_call(op, target, list(args), kwargs, names)

    assert render("torch.Tensor.__add__", x, y) == "(data + w)"
    assert render("torch.Tensor.__rsub__", x, 2) == "(2 - data)"
    assert render("torch.Tensor.__getitem__", x, (Ellipsis, None)) == "data[..., None]"
    assert render("torch.Tensor.__getitem__", x, slice(None, None, 2)) == "data[::2]"
    assert render("torch.Tensor.__getitem__", x, slice(y, None)) == "data[w:]"
    assert render("torch.cat", None, [x, y], dim=0) == "torch.cat([data, w], dim=0)"
    assert render("torch.Tensor.to", x, torch.float64) == "data.to(torch.float64)"
    assert render("torch.nn.Module.__call__", x, y) == "data(w)"
    assert render("torch.Tensor.sum", ObjectRef("z" * 32)) == "obj_zzzzzzzz.sum()"
    shape = lineage.render_call("torch.Tensor.shape", x, [], {}, names, attribute=True)
    assert shape == "data.shape"


def test_render_value_bounds() -> None:
    assert lineage.render_value(float("nan"), {}) == "float('nan')"
    long_text = lineage.render_value("A" * 1000, {})
    assert len(long_text) <= lineage.MAX_LITERAL_CHARS
    many = lineage.render_value(list(range(1000)), {})
    assert many.endswith(", …]") and many.count(",") == 16
    huge = lineage.render_call("torch.cat", None, [[ObjectRef("x" * 32)] * 16] * 16, {}, {})
    assert len(huge) <= lineage.MAX_EXPRESSION_CHARS
    shown = lineage.render_value(torch.zeros(3, 4, dtype=torch.int8), {})
    assert shown == "tensor(shape=[3, 4], dtype=int8)"


def test_name_of() -> None:
    assert lineage.name_of(("torch.Tensor.sum", "torch.Tensor.item")) == "sum"
    assert lineage.name_of(("torch.Tensor.__add__",)) == "add"
    assert lineage.name_of(("torch.Tensor.float", "torch.Tensor.item")) == "item"
    assert lineage.name_of(()) == "object"
    assert lineage.merge_ops(("a",) * 150, ("b",) * 150, ("c",))[-1] == "c"
    assert len(lineage.merge_ops(("a",) * 150, ("b",) * 150, ("c",))) == lineage.MAX_OPS
