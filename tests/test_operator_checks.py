"""Size checks of Python operator dunders on the owner's executor.

``tensor + other``, ``*``, comparisons: the result holds at most the product of the inputs'
sizes, so when that product is within the owner's element cap the op runs without a size
prediction on the meta device. Beyond it (broadcasting), and for ``tensor[list]`` whose
result grows with the list, the prediction still runs and refuses before allocating.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from duet_p2p.allowlist import DEFAULT_ALLOWLIST
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.execution.executor import Executor
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.messages import Action
from duet_p2p.store import OwnerStore, StoredObject, new_object_id

CAP = 1000


class TensorsMade(TorchFunctionMode):
    """Records the device and size of every tensor a torch call returns on this thread
    (observes only: each call runs unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, int]] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.made.append((value.device.type, value.numel()))
        return out

    def on(self, device: str) -> list[int]:
        return [numel for kind, numel in self.made if kind == device]


@contextmanager
def watching() -> Iterator[TensorsMade]:
    with TensorsMade() as mode:
        yield mode


class Owner:
    """A store and an executor with a small element cap."""

    def __init__(self) -> None:
        self.store = OwnerStore()
        self.executor = Executor(
            self.store, DEFAULT_ALLOWLIST, OwnerLimits(max_result_elements=CAP)
        )

    def host(self, value: torch.Tensor, *, private: bool = True) -> ObjectRef:
        record = StoredObject(
            id=new_object_id(), value=value, origin="owner", private=private, tags=("data",),
            expression="data", lineage_tags=frozenset({"data"}),
            aggregation=1.0 if private else math.inf,
        )  # fmt: skip
        self.store.put(record)
        return ObjectRef(record.id)

    def run(self, op: str, target: ObjectRef, *args: Any) -> StoredObject:
        action = Action(op=op, result=new_object_id(), target=target, args=list(args))
        return self.executor.run(action)

    def ok(self, op: str, target: ObjectRef, *args: Any) -> torch.Tensor:
        record = self.run(op, target, *args)
        assert record.error is None, record.error
        assert isinstance(record.value, torch.Tensor)
        return record.value


def refused_before_running(record: StoredObject) -> str:
    """The refusal message; it names the owner's limit and comes from the check made
    before the op ran (not the one on the finished result)."""
    assert record.error is not None, "the action should have been refused"
    assert record.value is None
    message = record.error["message"]
    assert "would exceed the owner's limit" in message, message
    assert str(CAP) in message, message
    return message


@pytest.fixture
def owner() -> Owner:
    return Owner()


@pytest.fixture
def p(owner: Owner) -> ObjectRef:
    return owner.host(torch.arange(100.0))


# -- operators within the cap: no prediction ---------------------------------------------


def test_add_runs_without_a_meta_prediction(owner: Owner, p: ObjectRef) -> None:
    with watching() as made:
        value = owner.ok("torch.Tensor.__add__", p, 1)
    assert torch.equal(value, torch.arange(100.0) + 1)
    assert made.on("meta") == [], "the operator was sized on the meta device"
    assert 100 in made.on("cpu")


@pytest.mark.parametrize(
    ("op", "arg", "expected"),
    [
        ("torch.Tensor.__mul__", 2.0, torch.arange(100.0) * 2),
        ("torch.Tensor.__rmul__", 3, torch.arange(100.0) * 3),
        ("torch.Tensor.__sub__", 1.5, torch.arange(100.0) - 1.5),
        ("torch.Tensor.__lt__", 50, torch.arange(100.0) < 50),
        ("torch.Tensor.__ge__", 10.0, torch.arange(100.0) >= 10),
        ("torch.Tensor.__eq__", 7, torch.arange(100.0) == 7),
        ("torch.Tensor.__ne__", 7, torch.arange(100.0) != 7),
    ],
)
def test_operators_with_scalars(
    owner: Owner, p: ObjectRef, op: str, arg: Any, expected: torch.Tensor
) -> None:
    with watching() as made:
        value = owner.ok(op, p, arg)
    assert torch.equal(value, expected)
    assert made.on("meta") == []


def test_operators_between_tensors_within_the_cap(owner: Owner) -> None:
    a = owner.host(torch.arange(10.0))
    b = owner.host(torch.arange(10.0) * 2)
    with watching() as made:
        total = owner.ok("torch.Tensor.__add__", a, b)
        product = owner.ok("torch.Tensor.__mul__", a, b)
        less = owner.ok("torch.Tensor.__lt__", a, b)
    assert torch.equal(total, torch.arange(10.0) * 3)
    assert torch.equal(product, torch.arange(10.0) ** 2 * 2)
    assert torch.equal(less, torch.arange(10.0) < torch.arange(10.0) * 2)
    assert made.on("meta") == []  # 10 x 10 = 100 <= the cap: no prediction needed


def test_broadcasting_within_the_cap_runs(owner: Owner) -> None:
    a = owner.run("torch.Tensor.unsqueeze", owner.host(torch.arange(20.0)), 1)
    b = owner.run("torch.Tensor.unsqueeze", owner.host(torch.arange(50.0)), 0)
    value = owner.ok("torch.Tensor.__add__", ObjectRef(a.id), ObjectRef(b.id))
    assert value.shape == (20, 50)  # exactly the cap
    assert torch.equal(value, torch.arange(20.0)[:, None] + torch.arange(50.0)[None, :])


# -- beyond the product bound: predicted, then run or refused ------------------------------


def test_same_shape_operands_beyond_the_product_still_run(owner: Owner) -> None:
    # 100 x 100 inputs exceed the cap as a product, but the result has 100 elements:
    # the prediction decides, and lets it run
    a = owner.host(torch.arange(100.0))
    b = owner.host(torch.ones(100))
    with watching() as made:
        value = owner.ok("torch.Tensor.__add__", a, b)
    assert torch.equal(value, torch.arange(100.0) + 1)
    assert made.on("meta"), "beyond the product bound the size is predicted"


def test_broadcast_beyond_the_cap_is_refused(owner: Owner) -> None:
    a = owner.run("torch.Tensor.unsqueeze", owner.host(torch.arange(100.0)), 1)
    b = owner.run("torch.Tensor.unsqueeze", owner.host(torch.arange(100.0)), 0)
    assert a.error is None and b.error is None
    for op in ("torch.Tensor.__add__", "torch.Tensor.__mul__", "torch.Tensor.__lt__"):
        with watching() as made:
            record = owner.run(op, ObjectRef(a.id), ObjectRef(b.id))
        refused_before_running(record)
        assert all(n < 100 * 100 for n in made.on("cpu")), f"{op} allocated its result"
        assert owner.store.get(record.id) is not None  # the refusal is what the peer sees


def test_broadcast_refusal_withholds_sizes_of_private_inputs(owner: Owner) -> None:
    a = owner.host(torch.ones(100, 1))
    b = owner.host(torch.ones(1, 100))
    message = refused_before_running(owner.run("torch.Tensor.__add__", a, b))
    assert "10000" not in message
    public_a = owner.host(torch.ones(100, 1), private=False)
    public_b = owner.host(torch.ones(1, 100), private=False)
    message = refused_before_running(owner.run("torch.Tensor.__add__", public_a, public_b))
    assert "10000" in message


# -- indexing ------------------------------------------------------------------------------


def test_getitem_with_a_long_list_is_refused_before_allocating(owner: Owner, p: ObjectRef) -> None:
    with watching() as made:
        record = owner.run("torch.Tensor.__getitem__", p, [0] * 5000)
    refused_before_running(record)
    assert 5000 in made.on("meta"), "the list index was sized on the meta device"
    assert all(n < 5000 for n in made.on("cpu")), "the result was allocated"
    assert owner.store.peer_bytes == 0


def test_getitem_with_a_short_list_runs(owner: Owner, p: ObjectRef) -> None:
    value = owner.ok("torch.Tensor.__getitem__", p, [3, 1, 4, 1, 5])
    assert torch.equal(value, torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0]))
    assert owner.ok("torch.Tensor.__getitem__", p, [0] * CAP).numel() == CAP
    refused_before_running(owner.run("torch.Tensor.__getitem__", p, [0] * (CAP + 1)))


def test_getitem_with_a_list_inside_a_tuple_is_checked(owner: Owner) -> None:
    m = owner.host(torch.ones(10, 10))
    refused_before_running(owner.run("torch.Tensor.__getitem__", m, ([0] * 200, slice(None))))
    assert owner.ok("torch.Tensor.__getitem__", m, ([0] * 100, slice(None))).shape == (100, 10)


def test_getitem_with_ints_and_slices_runs_without_a_prediction(owner: Owner, p: ObjectRef) -> None:
    with watching() as made:
        first = owner.ok("torch.Tensor.__getitem__", p, 0)
        part = owner.ok("torch.Tensor.__getitem__", p, slice(10, 20))
    assert first.item() == 0.0
    assert torch.equal(part, torch.arange(10.0, 20.0))
    assert made.on("meta") == []


def test_getitem_with_a_large_tensor_index_is_refused(owner: Owner, p: ObjectRef) -> None:
    index = owner.host(torch.zeros(5000, dtype=torch.long), private=False)
    with watching() as made:
        record = owner.run("torch.Tensor.__getitem__", p, index)
    refused_before_running(record)
    assert all(n < 5000 for n in made.on("cpu"))
