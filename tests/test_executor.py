"""The executor on an OwnerStore, without a network: caps and refusals. (Privacy labels
are the monitor's: tests/owner/test_monitor.py.)"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch

from duet_p2p.allowlist import DEFAULT_ALLOWLIST
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.execution.executor import Executor
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.messages import Action
from duet_p2p.rpc.ops import INDEX_OP
from duet_p2p.store import OwnerStore, StoredObject, new_object_id


class Owner:
    """A store, an executor and helpers to host values and run actions on them."""

    def __init__(self, **limits: Any) -> None:
        self.store = OwnerStore()
        self.executor = Executor(self.store, DEFAULT_ALLOWLIST, OwnerLimits(**limits))

    def host(
        self, value: Any, *, private: bool = True, tag: str = "data", support: float = math.inf
    ) -> ObjectRef:
        record = StoredObject(
            id=new_object_id(), value=value, origin="owner", private=private, tags=(tag,),
            expression=tag, lineage_tags=frozenset({tag}),
            aggregation=1.0 if private else math.inf, support=support,
        )  # fmt: skip
        self.store.put(record)
        return ObjectRef(record.id)

    def run(self, op: str, target: Any = None, *args: Any, **kwargs: Any) -> StoredObject:
        action = Action(op=op, result=new_object_id(), target=target, args=list(args),
                        kwargs=kwargs)  # fmt: skip
        return self.executor.run(action)

    def ok(self, op: str, target: Any = None, *args: Any, **kwargs: Any) -> ObjectRef:
        record = self.run(op, target, *args, **kwargs)
        assert record.error is None, record.error
        return ObjectRef(record.id)

    def value(self, ref: ObjectRef) -> Any:
        record = self.store.get(ref.id)
        assert record is not None
        return record.value

    def record(self, ref: ObjectRef) -> StoredObject:
        record = self.store.get(ref.id)
        assert record is not None
        return record


def refused(record: StoredObject, *words: str) -> str:
    """The error message of a failed record, checked to contain ``words``."""
    assert record.error is not None, "the action should have failed"
    assert record.value is None
    message = record.error["message"]
    for word in words:
        assert word in message, message
    return message


# -- caps on result size: predicted before running -------------------------------------


def test_torch_ones_beyond_the_cap_is_refused_before_allocating() -> None:
    owner = Owner(max_result_elements=10**6)
    started = time.perf_counter()
    record = owner.run("torch.ones", None, 10**12)
    assert time.perf_counter() - started < 1.0
    refused(record, "would exceed", "1000000 elements")
    assert record.error["code"] == "not_allowed"
    assert owner.store.peer_bytes == 0
    assert torch.equal(owner.value(owner.ok("torch.ones", None, 10)), torch.ones(10))


def test_sizes_given_as_tensors_are_predicted_too() -> None:
    owner = Owner(max_result_elements=1000)
    size = owner.ok("torch.tensor", None, 10**7)  # a 0-d tensor, e.g. a pointer's sum
    for op, args in [
        ("torch.ones", [size]),
        ("torch.zeros", [[size, 2]]),
        ("torch.arange", [size]),
        ("torch.full", [(size,), 1.0]),
        ("torch.randint", [0, 5, (size,)]),
        ("torch.eye", [size]),
    ]:
        started = time.perf_counter()
        refused(owner.run(op, None, *args), "would exceed")
        assert time.perf_counter() - started < 2.0, op


def test_repeat_and_tile() -> None:
    owner = Owner(max_result_elements=1000)
    x = owner.host(torch.arange(10.0))
    refused(owner.run("torch.Tensor.repeat", x, 1000), "would exceed")
    refused(owner.run("torch.Tensor.repeat", x, 11, 10), "would exceed")
    refused(owner.run("torch.Tensor.tile", x, (1000,)), "would exceed")
    refused(owner.run("torch.Tensor.repeat_interleave", x, 1000), "would exceed")
    assert owner.value(owner.ok("torch.Tensor.repeat", x, 100)).numel() == 1000


def test_expand_then_contiguous() -> None:
    owner = Owner(max_result_elements=1000)
    one = owner.host(torch.ones(1, 1))
    view = owner.run("torch.Tensor.expand", one, 10**6, 10**6)
    refused(view, "would exceed")
    # what is built on a refused view fails too, with the original error
    dense = owner.run("torch.Tensor.contiguous", ObjectRef(view.id))
    assert dense.error == view.error
    small = owner.ok("torch.Tensor.expand", one, 20, 50)
    assert owner.value(owner.ok("torch.Tensor.contiguous", small)).shape == (20, 50)
    refused(owner.run("torch.Tensor.broadcast_to", one, (2000, 1)), "would exceed")


def test_broadcast_outer_sums() -> None:
    owner = Owner(max_result_elements=10**4)
    column = owner.host(torch.ones(10**5, 1))
    row = owner.host(torch.ones(1, 10**5))
    started = time.perf_counter()
    refused(owner.run("torch.Tensor.__add__", column, row), "would exceed")
    refused(owner.run("torch.add", None, column, row), "would exceed")
    refused(owner.run("torch.Tensor.__mul__", row, column), "would exceed")
    mask = owner.host(torch.ones(10**5, 1, dtype=torch.bool))
    refused(owner.run("torch.where", None, mask, row, 0.0), "would exceed")
    assert time.perf_counter() - started < 5.0
    narrow = owner.host(torch.ones(1, 3))
    small = owner.host(torch.ones(100, 1))
    assert owner.value(owner.ok("torch.Tensor.__add__", small, narrow)).shape == (100, 3)


def test_ops_that_grow_beyond_their_inputs() -> None:
    """Arithmetic usually makes no more elements than its inputs hold; these do."""
    owner = Owner(max_result_elements=1000)
    v = owner.host(torch.ones(100))
    refused(owner.run("torch.Tensor.diag_embed", v), "would exceed")
    refused(owner.run("torch.Tensor.diag", v), "would exceed")
    refused(
        owner.run("torch.diag", None, owner.host(torch.ones(1)), diagonal=10**5), "would exceed"
    )
    refused(owner.run("torch.cartesian_prod", None, v, v), "would exceed")
    refused(owner.run("torch.outer", None, v, v), "would exceed")
    assert owner.value(owner.ok("torch.Tensor.diag", owner.host(torch.ones(30)))).numel() == 900


def test_sizes_that_depend_on_the_data() -> None:
    owner = Owner(max_result_elements=1000)
    big = owner.host(torch.tensor([10**9]), private=False)
    labels = owner.host(torch.tensor([0, 10**9]), private=False)
    row = owner.host(torch.ones(1, 2000), private=False)
    mask = owner.host(torch.ones(2000, 1, dtype=torch.bool), private=False)
    probabilities = owner.host(torch.ones(4), private=False)
    for op, target, args, kwargs in [
        ("torch.repeat_interleave", None, [big], {}),
        ("torch.Tensor.repeat_interleave", owner.host(torch.ones(1)), [big], {}),
        ("torch.bincount", None, [labels], {}),
        ("torch.Tensor.bincount", owner.host(torch.tensor([0, 1])), [], {"minlength": 10**9}),
        ("torch.masked_select", None, [row, mask], {}),
        ("torch.nn.functional.one_hot", None, [labels], {}),
        ("torch.multinomial", None, [probabilities, 10**6], {"replacement": True}),
        ("torch.histogram", None, [owner.host(torch.ones(3))], {"bins": 10**6}),
    ]:
        started = time.perf_counter()
        refused(owner.run(op, target, *args, **kwargs), "would exceed")
        assert time.perf_counter() - started < 2.0, op
    counts = owner.ok("torch.bincount", None, owner.host(torch.tensor([0, 2, 2])))
    assert owner.value(counts).tolist() == [1, 0, 2]


def test_public_refusals_say_how_big_private_ones_do_not() -> None:
    owner = Owner(max_result_elements=100)
    public = owner.host(torch.ones(7, 1), private=False)
    private = owner.host(torch.ones(7, 1))
    shown = refused(owner.run("torch.Tensor.repeat", public, 11, 13))
    assert "1001 elements" in shown
    hidden = refused(owner.run("torch.Tensor.repeat", private, 11, 13))
    assert "1001" not in hidden and "7" not in hidden.replace("100 elements", "")


def test_max_peer_bytes() -> None:
    owner = Owner(max_peer_bytes=1000)
    first = owner.ok("torch.ones", None, 200)  # 800 bytes
    assert owner.store.peer_bytes == 800
    refused(owner.run("torch.ones", None, 200), "memory budget")
    assert owner.store.peer_bytes == 800
    owner.store.remove_peer_objects([first.id])
    assert owner.store.peer_bytes == 0
    owner.ok("torch.ones", None, 200)


def test_max_peer_objects() -> None:
    owner = Owner(max_peer_objects=3)
    made = [owner.ok("torch.ones", None, 1) for _ in range(3)]
    refused(owner.run("torch.ones", None, 1), "too many objects")
    refused(owner.run("torch.Tensor.reshape", made[0], 7, 7))
    assert owner.store.peer_object_count() == 3  # at the cap, not even errors are kept
    owner.store.remove_peer_objects([r.id for r in made])
    owner.ok("torch.ones", None, 1)


def test_time_budget() -> None:
    owner = Owner(max_op_seconds=0.0)
    refused(owner.run("torch.ones", None, 3), "time budget")


# -- what may never run ----------------------------------------------------------------


def test_inplace_on_owner_objects_and_their_views_is_refused() -> None:
    owner = Owner()
    original = torch.tensor([1.0, 2.0, 3.0, 4.0])
    data = owner.host(original)
    view = owner.ok("torch.Tensor.__getitem__", data, slice(0, 2))
    also_view = owner.ok("torch.Tensor.view", data, 2, 2)
    source = owner.ok("torch.ones", None, 4)
    for op, target, args in [
        ("torch.Tensor.add_", data, [1.0]),
        ("torch.Tensor.zero_", data, []),
        ("torch.Tensor.__iadd__", data, [1.0]),
        ("torch.Tensor.__setitem__", data, [0, 99.0]),
        ("torch.Tensor.copy_", data, [source]),
        ("torch.Tensor.add_", view, [1.0]),
        ("torch.Tensor.__setitem__", view, [0, 99.0]),
        ("torch.Tensor.fill_", also_view, [0.0]),
        ("torch.Tensor.uniform_", data, []),
        ("torch.Tensor.requires_grad_", data, []),
        ("torch.nn.init.zeros_", None, [data]),
        ("torch.nn.init.normal_", None, [view]),
    ]:
        refused(owner.run(op, target, *args), "modify an object the owner hosts")
    refused(owner.run("torch.nn.init.ones_", None, tensor=data), "modify an object")
    batch = owner.ok("torch.ones", None, 2, 4)
    refused(
        owner.run("torch.nn.functional.batch_norm", None, batch, data, data, training=True),
        "modify an object the owner hosts",
    )
    # evaluation mode only reads the statistics
    owner.ok("torch.nn.functional.batch_norm", None, batch, data, data, training=False)
    assert torch.equal(original, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # the peer's own copy may change
    copy = owner.ok("torch.Tensor.clone", data)
    owner.ok("torch.Tensor.add_", copy, 1.0)
    assert torch.equal(owner.value(copy), original + 1)


def test_forbidden_kwargs_and_devices() -> None:
    owner = Owner()
    data = owner.host(torch.ones(3))
    out = owner.ok("torch.zeros", None, 3)
    refused(owner.run("torch.add", None, data, data, out=out), "'out'")
    refused(owner.run("torch.ones", None, 3, device="cuda"), "device='cpu'")
    refused(owner.run("torch.ones", None, 3, pin_memory=True), "'pin_memory'")
    refused(owner.run("torch.Tensor.to", data, device="meta"), "device='cpu'")
    assert torch.equal(owner.value(out), torch.zeros(3))


@pytest.mark.parametrize(
    "op",
    [
        "torch.Tensor.numpy", "torch.Tensor.storage", "torch.Tensor.data_ptr", "torch.load",
        "torch.save", "torch.empty", "torch.Tensor.__class__", "torch.Tensor.add.__globals__",
        "os.system", "builtins.eval", "torch.Tensor.__reduce_ex__", "torch.nonexistent_op",
        "", "torch." + "a" * 300,
    ],
)  # fmt: skip
def test_not_allowlisted_ops_are_refused(op: str) -> None:
    owner = Owner()
    data = owner.host(torch.ones(3))
    action = Action.model_construct(op=op, result=new_object_id(), target=data, args=[],
                                    kwargs={}, no_grad=False)  # fmt: skip
    record = owner.executor.run(action)
    assert record.error is not None and record.error["code"] == "not_allowed"


def test_result_id_of_an_owner_object_is_never_overwritten() -> None:
    owner = Owner()
    original = torch.ones(3)
    data = owner.host(original)
    action = Action(op="torch.zeros", result=data.id, args=[3])
    record = owner.executor.run(action)
    assert record.error is not None
    assert owner.value(data) is original


def test_missing_and_failed_inputs() -> None:
    owner = Owner()
    record = owner.run("torch.Tensor.sum", ObjectRef("f" * 32))
    assert record.error is not None and record.error["code"] == "not_found"
    failed = owner.run("torch.Tensor.reshape", owner.host(torch.ones(4)), 7, 7)
    derived = owner.run("torch.Tensor.sum", ObjectRef(failed.id))
    assert derived.error == failed.error
    assert derived.error["op"] == "torch.Tensor.reshape"


def test_error_text_withheld_for_private_inputs() -> None:
    owner = Owner()
    private = owner.host(torch.tensor([12345.0, 2.0, 3.0, 4.0]))
    public = owner.host(torch.tensor([12345.0, 2.0, 3.0, 4.0]), private=False)
    hidden = refused(owner.run("torch.Tensor.reshape", private, 7, 7), "withheld")
    assert "4" not in hidden and "12345" not in hidden
    shown = refused(owner.run("torch.Tensor.reshape", public, 7, 7))
    assert "4" in shown


def test_index_op_on_tuple_results() -> None:
    owner = Owner()
    data = owner.host(torch.tensor([[1.0, 5.0], [7.0, 2.0]]))
    pair = owner.ok("torch.Tensor.max", data, dim=1)
    values = owner.ok(INDEX_OP, pair, 0)
    indices = owner.ok(INDEX_OP, pair, 1)
    assert owner.value(values).tolist() == [5.0, 7.0]
    assert owner.value(indices).tolist() == [1, 0]
    refused(owner.run(INDEX_OP, pair, "x"), "cannot index")


# -- privacy propagation ----------------------------------------------------------------


def test_training_mode_call_of_an_owner_module_is_refused() -> None:
    owner = Owner()
    model = owner.host(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)))
    stats_before = owner.value(model)[1].running_mean.clone()
    x = owner.host(torch.randn(8, 3), tag="x")
    record = owner.run("torch.nn.Module.__call__", model, x)
    assert "modify an object the owner hosts" in refused(record)
    assert torch.equal(owner.value(model)[1].running_mean, stats_before)


def test_backward_into_owner_parameters_is_refused() -> None:
    owner = Owner()
    weights = owner.host(torch.ones(3, requires_grad=True), tag="weights")
    total = owner.ok("torch.Tensor.sum", owner.ok("torch.Tensor.__mul__", weights, 2.0))
    record = owner.run("torch.Tensor.backward", total)
    assert "modify an object the owner hosts" in refused(record)
    assert owner.value(weights).grad is None
