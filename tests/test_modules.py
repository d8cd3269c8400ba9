"""Modules as data: round trips for every supported layer, refusals on both sides."""

from __future__ import annotations

import copy
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from duet_p2p.errors import OperationNotAllowed, ProtocolError
from duet_p2p.modules import (
    SUPPORTED_MODULE_TYPES,
    ModuleLimits,
    module_to_spec,
    parameter_count_of_spec,
    spec_to_module,
)
from duet_p2p.rpc.codec import decode, encode

# --- helpers ---------------------------------------------------------------------------


def _randn(*shape: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(*shape),)


def _same(a: Any, b: Any) -> bool:
    """Deep equality where tensors compare with torch.equal (and dtype)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _assert_identical(original: nn.Module, rebuilt: nn.Module) -> None:
    kinds = [(n, type(m)) for n, m in original.named_modules(remove_duplicate=False)]
    assert kinds == [(n, type(m)) for n, m in rebuilt.named_modules(remove_duplicate=False)]
    flags = [(n, m.training) for n, m in original.named_modules()]
    assert flags == [(n, m.training) for n, m in rebuilt.named_modules()]
    assert _same(original.state_dict(), rebuilt.state_dict())
    grads = [(n, p.requires_grad) for n, p in original.named_parameters()]
    assert grads == [(n, p.requires_grad) for n, p in rebuilt.named_parameters()]
    assert _same(module_to_spec(original), module_to_spec(rebuilt))


def _assert_round_trip(module: nn.Module, make_inputs: Callable[[], tuple[Any, ...]]) -> None:
    torch.manual_seed(1)
    inputs = make_inputs()
    rebuilt = spec_to_module(module_to_spec(module))
    _assert_identical(module, rebuilt)
    torch.manual_seed(2)
    expected = module(*inputs)
    torch.manual_seed(2)
    assert _same(expected, rebuilt(*inputs))
    _assert_identical(module, rebuilt)  # forward in training mode may update buffers


def _trained_batch_norm(module: nn.Module, *shape: int) -> nn.Module:
    module(torch.randn(*shape))  # moves the running stats off their defaults
    return module.eval()


def _targets() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 5), torch.tensor([0, 2, 4, 1])


def _probabilities() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(4, 3), torch.rand(4, 3).round()


CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], tuple[Any, ...]]]] = [
    ("Linear", lambda: nn.Linear(5, 3), _randn(4, 5)),
    ("Linear", lambda: nn.Linear(5, 3, bias=False), _randn(4, 5)),
    (
        "Conv1d",
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
        _randn(2, 4, 10),
    ),
    (
        "Conv2d",
        lambda: nn.Conv2d(3, 8, (3, 5), padding="same", dilation=(1, 2)),
        _randn(2, 3, 9, 9),
    ),
    ("Conv2d", lambda: nn.Conv2d(2, 4, 3, stride=(2, 1), bias=False), _randn(1, 2, 7, 7)),
    ("BatchNorm1d", lambda: _trained_batch_norm(nn.BatchNorm1d(6), 8, 6), _randn(4, 6)),
    ("BatchNorm1d", lambda: nn.BatchNorm1d(6, track_running_stats=False), _randn(4, 6)),
    (
        "BatchNorm2d",
        lambda: nn.BatchNorm2d(3, affine=False, momentum=None, eps=1e-3),
        _randn(2, 3, 4, 4),
    ),
    ("LayerNorm", lambda: nn.LayerNorm((4, 5), eps=1e-3, bias=False), _randn(2, 4, 5)),
    ("LayerNorm", lambda: nn.LayerNorm(7, elementwise_affine=False), _randn(2, 7)),
    ("Dropout", lambda: nn.Dropout(0.3), _randn(10, 10)),
    ("ReLU", lambda: nn.ReLU(), _randn(3, 4)),
    ("GELU", lambda: nn.GELU(approximate="tanh"), _randn(3, 4)),
    ("Tanh", lambda: nn.Tanh(), _randn(3, 4)),
    ("Sigmoid", lambda: nn.Sigmoid(), _randn(3, 4)),
    ("Softmax", lambda: nn.Softmax(dim=1), _randn(3, 4)),
    ("LogSoftmax", lambda: nn.LogSoftmax(dim=-1), _randn(3, 4)),
    ("LeakyReLU", lambda: nn.LeakyReLU(0.2), _randn(3, 4)),
    ("ELU", lambda: nn.ELU(alpha=0.5), _randn(3, 4)),
    ("SiLU", lambda: nn.SiLU(), _randn(3, 4)),
    ("Identity", lambda: nn.Identity(), _randn(3, 4)),
    (
        "Embedding",
        lambda: nn.Embedding(10, 4, padding_idx=-1, max_norm=2.0),
        lambda: (torch.tensor([[1, 9], [3, 4]]),),
    ),
    ("Flatten", lambda: nn.Flatten(0, 1), _randn(2, 3, 4)),
    ("Unflatten", lambda: nn.Unflatten(1, (2, -1)), _randn(2, 6)),
    ("MaxPool2d", lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), _randn(1, 2, 7, 7)),
    (
        "AvgPool2d",
        lambda: nn.AvgPool2d((2, 3), padding=1, count_include_pad=False, divisor_override=3),
        _randn(1, 2, 6, 7),
    ),
    ("AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d((None, 3)), _randn(1, 2, 6, 7)),
    ("AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d(2), _randn(1, 2, 6, 7)),
    (
        "LSTM",
        lambda: nn.LSTM(
            4, 6, num_layers=2, batch_first=True, bidirectional=True, proj_size=3, dropout=0.1
        ).eval(),
        _randn(2, 5, 4),
    ),
    ("GRU", lambda: nn.GRU(4, 5, bias=False), _randn(5, 2, 4)),
    (
        "CrossEntropyLoss",
        lambda: nn.CrossEntropyLoss(weight=torch.rand(5), ignore_index=2, label_smoothing=0.1),
        _targets,
    ),
    ("NLLLoss", lambda: nn.NLLLoss(reduction="sum"), _targets),
    ("MSELoss", lambda: nn.MSELoss(), lambda: (torch.randn(3), torch.randn(3))),
    ("L1Loss", lambda: nn.L1Loss(reduction="none"), lambda: (torch.randn(3), torch.randn(3))),
    ("BCELoss", lambda: nn.BCELoss(weight=torch.rand(3)), _probabilities),
    (
        "BCEWithLogitsLoss",
        lambda: nn.BCEWithLogitsLoss(weight=torch.rand(4, 3), pos_weight=torch.rand(3)),
        _probabilities,
    ),
    (
        "Sequential",
        lambda: nn.Sequential(OrderedDict(fc=nn.Linear(3, 4), act=nn.ReLU(), out=nn.Linear(4, 2))),
        _randn(5, 3),
    ),
    ("ModuleList", lambda: nn.ModuleList([nn.Linear(3, 3), nn.Tanh()]), tuple),
    ("ModuleDict", lambda: nn.ModuleDict({"enc": nn.Linear(3, 3), "act": nn.GELU()}), tuple),
]


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize(("type_name", "make", "inputs"), CASES, ids=[c[0] for c in CASES])
def test_round_trip_each_type(type_name: str, make: Callable, inputs: Callable) -> None:
    torch.manual_seed(0)
    module = make()
    assert module_to_spec(module)["type"] == type_name
    if type_name in ("ModuleList", "ModuleDict"):  # no forward: compare structure and state
        _assert_identical(module, spec_to_module(module_to_spec(module)))
    else:
        _assert_round_trip(module, inputs)


def test_cases_cover_every_supported_type() -> None:
    assert {c[0] for c in CASES} == SUPPORTED_MODULE_TYPES


def _digits_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))


def _train(model: nn.Module, steps: int) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(torch.randn(32, 64)), torch.randint(0, 10, (32,))).backward()
        optimizer.step()


def test_digits_mlp_there_and_back_over_the_codec() -> None:
    torch.manual_seed(0)
    model = _digits_mlp()
    model[0].weight.requires_grad_(False)
    _train(model, 2)
    model.eval()
    model[2].train()
    at_owner = spec_to_module(decode(encode(module_to_spec(model))))
    _assert_identical(model, at_owner)
    at_owner.train()
    _train(at_owner, 3)  # the owner trains; the frozen weight stays put
    assert torch.equal(at_owner[0].weight, model[0].weight)
    back = spec_to_module(decode(encode(module_to_spec(at_owner))))
    _assert_identical(at_owner, back)
    x = torch.randn(5, 64)
    assert torch.equal(at_owner.eval()(x), back.eval()(x))
    assert parameter_count_of_spec(module_to_spec(model)) == 64 * 128 + 128 + 128 * 10 + 10


def test_every_type_through_the_codec() -> None:
    torch.manual_seed(0)
    zoo = nn.ModuleDict({f"m{i}": make() for i, (_, make, _) in enumerate(CASES)})
    rebuilt = spec_to_module(decode(encode(module_to_spec(zoo))))
    _assert_identical(zoo, rebuilt)


def test_nested_containers_and_float64() -> None:
    torch.manual_seed(0)
    inner = nn.ModuleList([nn.Sequential(nn.Linear(3, 3), nn.Tanh()), nn.Identity()])
    model = nn.ModuleDict({"blocks": inner, "head": nn.Sequential(nn.BatchNorm1d(3))}).double()
    model["blocks"][0].eval()
    rebuilt = spec_to_module(module_to_spec(model))
    _assert_identical(model, rebuilt)
    assert rebuilt["blocks"][0][0].weight.dtype == torch.float64
    assert rebuilt["head"][0].num_batches_tracked.dtype == torch.int64


def test_spec_holds_only_plain_data_and_cpu_copies() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    spec = module_to_spec(model)
    assert spec["children"]["0"]["args"]["kernel_size"] == [3, 3]
    weight = spec["children"]["0"]["state"]["weight"]
    assert type(weight) is torch.Tensor and not weight.requires_grad and weight.is_contiguous()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(weight, model[0].weight)  # a snapshot, not a view
    assert "requires_grad" not in spec["children"]["0"]


# --- refused when sending --------------------------------------------------------------


class MyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 2


class MyLinear(nn.Linear):
    pass


def test_custom_module_refused_with_its_place_named() -> None:
    model = nn.Sequential(OrderedDict(encoder=MyBlock(), head=nn.Linear(3, 1)))
    with pytest.raises(OperationNotAllowed, match=r"model\.encoder \(MyBlock\) is a custom") as e:
        module_to_spec(model)
    assert "Sequential" in str(e.value) and "Linear" in str(e.value)
    with pytest.raises(OperationNotAllowed, match=r"^model \(MyBlock\)"):
        module_to_spec(MyBlock())


def test_subclass_of_supported_layer_refused() -> None:
    with pytest.raises(OperationNotAllowed, match=r"model\.1 \(MyLinear\).*subclass of Linear"):
        module_to_spec(nn.Sequential(nn.ReLU(), MyLinear(2, 2)))


@pytest.mark.parametrize(
    "add_hook",
    [
        lambda m: m.register_forward_hook(lambda mod, inp, out: out * 0),
        lambda m: m.register_forward_pre_hook(lambda mod, inp: None),
        lambda m: m.register_full_backward_hook(lambda mod, gi, go: None),
        lambda m: m.weight.register_hook(lambda grad: grad * 0),
    ],
    ids=["forward", "forward_pre", "backward", "tensor"],
)
def test_hooks_refused(add_hook: Callable[[nn.Module], Any]) -> None:
    layer = nn.Linear(2, 2)
    add_hook(layer)
    with pytest.raises(OperationNotAllowed, match=r"model\.0.*hooks"):
        module_to_spec(nn.Sequential(layer))


def test_replaced_forward_tied_weights_and_odd_state_refused() -> None:
    patched = nn.Linear(2, 2)
    patched.forward = lambda x: x  # type: ignore[method-assign]
    with pytest.raises(OperationNotAllowed, match="forward"):
        module_to_spec(patched)
    shared = nn.Linear(2, 2)
    with pytest.raises(OperationNotAllowed, match=r"model\.1 is the same layer as model\.0"):
        module_to_spec(nn.Sequential(shared, shared))
    tied = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    tied[1].weight = tied[0].weight
    with pytest.raises(OperationNotAllowed, match="tied"):
        module_to_spec(tied)
    act = nn.ReLU()
    assert module_to_spec(nn.Sequential(act, act))["children"]["1"]["type"] == "ReLU"
    reshaped = nn.Linear(2, 2)
    reshaped.weight = nn.Parameter(torch.zeros(5, 5))
    with pytest.raises(OperationNotAllowed, match=r"model \(Linear\) cannot be sent.*shape"):
        module_to_spec(reshaped)
    holder = nn.Linear(2, 2)
    holder.extra = nn.ReLU()
    with pytest.raises(OperationNotAllowed, match="extra submodules"):
        module_to_spec(holder)


# --- refused when receiving ------------------------------------------------------------


def _leaf(type_name: str, **args: Any) -> dict[str, Any]:
    return {"type": type_name, "args": args, "state": {}, "training": True}


def _seq(*children: dict[str, Any]) -> dict[str, Any]:
    kids = {str(i): child for i, child in enumerate(children)}
    return {"type": "Sequential", "args": {}, "children": kids, "state": {}, "training": True}


def _linear_spec() -> dict[str, Any]:
    return module_to_spec(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([1, 2], r"^model: must be a module spec"),
        (_leaf("os.system"), r"model\.type: unknown module type 'os\.system'"),
        (_leaf("Module"), r"model\.type: unknown module type"),
        ({**_leaf("ReLU"), "code": "x"}, r"model: unknown key 'code'"),
        ({"type": "ReLU", "args": {}, "state": {}}, r"model\.training: is missing"),
        (_leaf("ReLU", inplace=1), r"model\.args\.inplace: must be a bool"),
        (_leaf("ReLU", forward="x"), r"model\.args: unknown argument 'forward' for ReLU"),
        (_seq(_leaf("Linear", in_features=3)), r"model\.0\.args\.out_features: is required"),
        (_seq(_leaf("Linear", in_features="3", out_features=2)), r"model\.0\.args\.in_features"),
        (_seq(_leaf("Linear", in_features=True, out_features=2)), r"must be a positive int"),
        (_seq(_leaf("Linear", in_features=3.0, out_features=2)), r"must be a positive int"),
        (_seq(_leaf("Linear", in_features=-3, out_features=2)), r"in_features: must be a posi"),
        (_seq(_leaf("Linear", in_features=0, out_features=2)), r"must be a positive int"),
        (_leaf("Linear", in_features=2**40, out_features=1), r"in_features: must be at most"),
        (_leaf("BatchNorm1d", num_features=3, eps=0.0), r"model\.args\.eps: must be a finite"),
        (_leaf("BatchNorm1d", num_features=3, eps=float("nan")), r"eps: must be a finite"),
        (_leaf("Dropout", p=1.5), r"model\.args\.p: must be a finite float in \[0\.0, 1\.0\]"),
        (_leaf("GELU", approximate="exp"), r"approximate: must be one of 'none', 'tanh'"),
        (_leaf("LSTM", input_size=2, hidden_size=2, num_layers=1000), r"num_layers: must be"),
        (_leaf("LSTM", input_size=2, hidden_size=2, proj_size=2), r"proj_size: must be smaller"),
        (_leaf("GRU", input_size=2, hidden_size=2, proj_size=1), r"unknown argument 'proj_size'"),
        (_leaf("LSTM", input_size=2, hidden_size=2, batch_first="yes"), r"batch_first: must be"),
        (
            _leaf("Conv2d", in_channels=1, out_channels=1, kernel_size=[3, 3, 3]),
            r"kernel_size: must be an int or a list of 2 ints",
        ),
        (_leaf("Conv2d", in_channels=3, out_channels=4, kernel_size=1, groups=2), r"groups: must"),
        (
            _leaf("Conv2d", in_channels=1, out_channels=1, kernel_size=3, padding="same", stride=2),
            r"padding: 'same' needs stride 1",
        ),
        (_leaf("Embedding", num_embeddings=3, embedding_dim=2, padding_idx=3), r"padding_idx"),
        (_leaf("Unflatten", dim=1, unflattened_size=[-1, -1]), r"-1 at most once"),
        (_leaf("MaxPool2d", kernel_size=2, padding=2), r"padding: must be at most half"),
        (_leaf("NLLLoss", weight_shape=[2, 2]), r"weight_shape: must hold one size"),
        ({**_leaf("ReLU"), "training": 1}, r"model\.training: must be a bool"),
        ({**_leaf("ReLU"), "children": {}}, r"model\.children: ReLU takes no children"),
        ({"type": "Sequential", "args": {}, "state": {}, "training": True}, r"children: is miss"),
        ({**_seq(), "type": "ModuleList", "children": {"1": _leaf("ReLU")}}, r"named '0', '1'"),
        ({**_seq(), "type": "ModuleDict", "children": {"forward": _leaf("ReLU")}}, r"'forward'"),
        ({**_seq(), "children": {"a.b": _leaf("ReLU")}}, r"bad child name 'a\.b'"),
    ],
)
def test_hostile_specs_refused(spec: Any, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        spec_to_module(spec)


def test_sequential_accepts_named_children() -> None:
    built = spec_to_module({**_seq(), "children": {"1": _leaf("ReLU"), "act": _leaf("Tanh")}})
    assert list(built._modules) == ["1", "act"]


def test_bad_state_refused() -> None:
    def refused(edit: Callable[[dict[str, Any]], None], message: str) -> None:
        spec = _linear_spec()
        edit(spec)
        with pytest.raises(ProtocolError, match=message):
            spec_to_module(spec)

    lin = lambda s: s["children"]["0"]["state"]  # noqa: E731
    bn = lambda s: s["children"]["1"]["state"]  # noqa: E731
    refused(lambda s: lin(s).update(weight=torch.zeros(3, 2)), r"0\.state\.weight: must have shape")
    refused(lambda s: lin(s).update(weights=lin(s).pop("weight")), r"unexpected tensor 'weights'")
    refused(lambda s: lin(s).pop("bias"), r"model\.0\.state\.bias: is missing")
    refused(lambda s: lin(s).update(extra=torch.zeros(1)), r"unexpected tensor 'extra'")
    refused(lambda s: lin(s).update(bias=[0.0, 0.0]), r"state\.bias: must be a tensor, got list")
    refused(lambda s: lin(s).update(bias=torch.zeros(2, dtype=torch.int32)), r"must be a float")
    refused(lambda s: lin(s).update(bias=torch.zeros(2).to_sparse()), r"dense cpu tensor")
    refused(lambda s: lin(s).update(bias=torch.zeros(2, dtype=torch.float64)), r"mixes float")
    refused(lambda s: bn(s).update(num_batches_tracked=torch.tensor(1.0)), r"must be an int64")
    refused(lambda s: s["children"]["0"].update(state=None), r"0\.state: must be a dict")
    refused(
        lambda s: s["children"]["1"].update(requires_grad={"running_mean": False}),
        r"1\.requires_grad: 'running_mean' is not a parameter",
    )


def test_huge_sizes_refused_before_allocation() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.monotonic()
    hostile = [
        _leaf("Linear", in_features=10**7, out_features=10**7),
        _leaf("Embedding", num_embeddings=2**31 - 1, embedding_dim=2**31 - 1),
        _leaf("LSTM", input_size=10**6, hidden_size=10**6, num_layers=64, bidirectional=True),
        _leaf("Linear", in_features=10_000, out_features=6_000),  # 240 MB as float32
        _seq(*[_leaf("Linear", in_features=1000, out_features=1000)] * 51),
    ]
    for spec in hostile:
        with pytest.raises(
            ProtocolError, match=r"parameter elements, over the limit of 50,000,000"
        ):
            spec_to_module(spec)
    assert time.monotonic() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000
    assert parameter_count_of_spec(hostile[0]) == 10**14 + 10**7


def test_limits_are_configurable() -> None:
    spec = module_to_spec(nn.Linear(10, 10))
    assert parameter_count_of_spec(spec) == 110
    with pytest.raises(ProtocolError, match="110 parameter elements, over the limit of 100"):
        spec_to_module(spec, limits=ModuleLimits(max_parameters=100))
    assert isinstance(spec_to_module(spec, limits=ModuleLimits(max_parameters=110)), nn.Linear)
    two_deep = _seq(_seq(_leaf("ReLU")))
    assert isinstance(spec_to_module(two_deep, limits=ModuleLimits(max_depth=2)), nn.Sequential)
    with pytest.raises(ProtocolError, match=r"^model\.0: nests deeper than 1 levels"):
        spec_to_module(two_deep, limits=ModuleLimits(max_depth=1))
    with pytest.raises(OperationNotAllowed, match="nests deeper than 1"):
        module_to_spec(nn.Sequential(nn.Sequential(nn.ReLU())), limits=ModuleLimits(max_depth=1))


def test_deep_nesting_is_a_protocol_error_not_a_recursion_error() -> None:
    spec = _leaf("ReLU")
    for _ in range(10_000):
        spec = _seq(spec)
    start = time.monotonic()
    with pytest.raises(ProtocolError, match=r"nests deeper than 32 levels"):
        spec_to_module(spec)
    with pytest.raises(ProtocolError, match=r"nests deeper"):
        parameter_count_of_spec(spec)
    assert time.monotonic() - start < 1.0
    cycle = _seq()
    cycle["children"]["0"] = cycle
    with pytest.raises(ProtocolError, match=r"nests deeper"):
        spec_to_module(cycle)


def test_too_many_children_refused() -> None:
    relu = _leaf("ReLU")
    assert len(spec_to_module(_seq(*[relu] * 10_000))) == 10_000
    with pytest.raises(ProtocolError, match="more than 10000 submodules"):
        spec_to_module(_seq(*[relu] * 10_001))
    with pytest.raises(ProtocolError, match="more than 10000 submodules"):
        spec_to_module(_seq(*[_seq(*[relu] * 100)] * 101))


def test_received_spec_is_not_aliased() -> None:
    spec = module_to_spec(nn.Linear(2, 2))
    kept = copy.deepcopy(spec)
    built = spec_to_module(spec)
    with torch.no_grad():
        built.weight.add_(1.0)
    assert _same(spec, kept)
