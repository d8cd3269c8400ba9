"""The layer types a spec may name: class, argument schema, and the tensors they imply.

Each entry says, for one torch.nn class, which constructor arguments it takes (with a
check and a default), which parameters and buffers those arguments give it (names and
shapes, known before anything is allocated), and how to read the arguments back from a
live module. Anything not in this table cannot be sent or received.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from duet_p2p.modules import checks as c

REQUIRED = object()
"""Default of an argument the spec must give."""

Slot = tuple[tuple[int, ...], str]
"""(shape, kind) of one tensor of a layer; kind is "param", "buffer" or "count" (int64)."""

Args = dict[str, Any]
MAX_RNN_LAYERS = 64


def _no_state(args: Args) -> dict[str, Slot]:
    return {}


def _no_rules(args: Args, path: str) -> None:
    return None


@dataclass(frozen=True)
class Layer:
    """How one torch.nn class travels as data."""

    cls: type[nn.Module]
    args: Mapping[str, tuple[c.Check, Any]] = field(default_factory=dict)
    """Constructor argument -> (check, default or REQUIRED)."""
    state: Callable[[Args], dict[str, Slot]] = _no_state
    """The parameters and buffers the (checked) arguments give the module."""
    rules: Callable[[Args, str], None] = _no_rules
    """Checks across arguments (groups divides in_channels...)."""
    read: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    """Readers for arguments that are not a plain attribute of the same name."""
    build: Callable[[type[nn.Module], Args, torch.dtype], nn.Module] | None = None
    """Constructor for layers that need more than cls(**args)."""
    container: bool = False


def _has(name: str) -> Callable[[Any], bool]:
    return lambda module: getattr(module, name) is not None


def _shape_of(name: str) -> Callable[[Any], list[int] | None]:
    def read(module: Any) -> list[int] | None:
        tensor = getattr(module, name)
        return None if tensor is None else list(tensor.shape)

    return read


def _affine(shape: tuple[int, ...], weight: bool, bias: bool) -> dict[str, Slot]:
    slots = {"weight": (shape, "param")} if weight else {}
    return slots | ({"bias": (shape, "param")} if bias else {})


def _linear_state(a: Args) -> dict[str, Slot]:
    weight = {"weight": ((a["out_features"], a["in_features"]), "param")}
    return weight | _affine((a["out_features"],), False, a["bias"])


_LINEAR = {
    "args": {
        "in_features": (c.POSITIVE, REQUIRED),
        "out_features": (c.POSITIVE, REQUIRED),
        "bias": (c.boolean, True),
    },
    "state": _linear_state,
    "read": {"bias": _has("bias")},
}


def _conv(n: int) -> dict[str, Any]:
    def state(a: Args) -> dict[str, Slot]:
        shape = (a["out_channels"], a["in_channels"] // a["groups"], *c.spread(a["kernel_size"], n))
        return {"weight": (shape, "param")} | _affine((a["out_channels"],), False, a["bias"])

    def rules(a: Args, path: str) -> None:
        for name in ("in_channels", "out_channels"):
            if a[name] % a["groups"]:
                c.fail(f"{path}.args.groups", f"must divide {name} ({a[name]})")
        if a["padding"] == "same" and any(s != 1 for s in c.spread(a["stride"], n)):
            c.fail(f"{path}.args.padding", "'same' needs stride 1")

    args = {
        "in_channels": (c.POSITIVE, REQUIRED),
        "out_channels": (c.POSITIVE, REQUIRED),
        "kernel_size": (c.size_tuple(n), REQUIRED),
        "stride": (c.size_tuple(n), 1),
        "padding": (c.conv_padding(n), 0),
        "dilation": (c.size_tuple(n), 1),
        "groups": (c.POSITIVE, 1),
        "bias": (c.boolean, True),
        "padding_mode": (c.choice("zeros", "reflect", "replicate", "circular"), "zeros"),
    }
    return {"args": args, "state": state, "rules": rules, "read": {"bias": _has("bias")}}


def _batch_norm_state(a: Args) -> dict[str, Slot]:
    n = (a["num_features"],)
    slots = _affine(n, a["affine"], a["affine"])
    if a["track_running_stats"]:
        slots |= {"running_mean": (n, "buffer"), "running_var": (n, "buffer")}
        slots["num_batches_tracked"] = ((), "count")
    return slots


_BATCH_NORM = {
    "args": {
        "num_features": (c.POSITIVE, REQUIRED),
        "eps": (c.POSITIVE_REAL, 1e-5),
        "momentum": (c.optional(c.UNIT), 0.1),
        "affine": (c.boolean, True),
        "track_running_stats": (c.boolean, True),
    },
    "state": _batch_norm_state,
}

_LAYER_NORM = {
    "args": {
        "normalized_shape": (c.int_list(c.POSITIVE, range(1, 9), scalar_ok=True), REQUIRED),
        "eps": (c.POSITIVE_REAL, 1e-5),
        "elementwise_affine": (c.boolean, True),
        "bias": (c.boolean, True),
    },
    "state": lambda a: _affine(
        tuple(c.spread(a["normalized_shape"], 1)),
        a["elementwise_affine"],
        a["elementwise_affine"] and a["bias"],
    ),
    "read": {"bias": _has("bias")},
}


def _embedding_rules(a: Args, path: str) -> None:
    idx, n = a["padding_idx"], a["num_embeddings"]
    if idx is not None and not -n <= idx < n:
        c.fail(f"{path}.args.padding_idx", f"must be in [-{n}, {n})")


_EMBEDDING = {
    "args": {
        "num_embeddings": (c.POSITIVE, REQUIRED),
        "embedding_dim": (c.POSITIVE, REQUIRED),
        "padding_idx": (c.optional(c.INDEX), None),
        "max_norm": (c.optional(c.POSITIVE_REAL), None),
        "norm_type": (c.POSITIVE_REAL, 2.0),
        "scale_grad_by_freq": (c.boolean, False),
        "sparse": (c.boolean, False),
    },
    "state": lambda a: {"weight": ((a["num_embeddings"], a["embedding_dim"]), "param")},
    "rules": _embedding_rules,
}


def _unflatten_rules(a: Args, path: str) -> None:
    if a["unflattened_size"].count(-1) > 1:
        c.fail(f"{path}.args.unflattened_size", "may hold -1 at most once")


_UNFLATTEN = {
    "args": {
        "dim": (c.DIM, REQUIRED),
        "unflattened_size": (
            c.int_list(c.size_or_minus_one, range(1, 9), scalar_ok=False),
            REQUIRED,
        ),
    },
    "rules": _unflatten_rules,
}


def _pool_rules(a: Args, path: str) -> None:
    pairs = zip(c.spread(a["kernel_size"], 2), c.spread(a["padding"], 2), strict=True)
    if any(pad > kernel // 2 for kernel, pad in pairs):
        c.fail(f"{path}.args.padding", "must be at most half of kernel_size")


_POOL_WINDOW = {
    "kernel_size": (c.size_tuple(2), REQUIRED),
    "stride": (c.optional(c.size_tuple(2)), None),
    "padding": (c.size_tuple(2, 0), 0),
}
_MAX_POOL = {
    "args": _POOL_WINDOW
    | {
        "dilation": (c.size_tuple(2), 1),
        "return_indices": (c.boolean, False),
        "ceil_mode": (c.boolean, False),
    },
    "rules": _pool_rules,
}
_AVG_POOL = {
    "args": _POOL_WINDOW
    | {
        "ceil_mode": (c.boolean, False),
        "count_include_pad": (c.boolean, True),
        "divisor_override": (c.optional(c.POSITIVE), None),
    },
    "rules": _pool_rules,
}
_ADAPTIVE_POOL = {
    "args": {"output_size": (c.int_list(c.size_or_none, range(2, 3), scalar_ok=True), REQUIRED)}
}


def _rnn(gates: int, *, lstm: bool) -> dict[str, Any]:
    def state(a: Args) -> dict[str, Slot]:
        hidden, proj = a["hidden_size"], a.get("proj_size", 0)
        out = proj or hidden
        directions = ("", "_reverse") if a["bidirectional"] else ("",)
        slots: dict[str, Slot] = {}
        for layer in range(a["num_layers"]):
            width = a["input_size"] if layer == 0 else out * len(directions)
            for d in directions:
                slots[f"weight_ih_l{layer}{d}"] = ((gates * hidden, width), "param")
                slots[f"weight_hh_l{layer}{d}"] = ((gates * hidden, out), "param")
                if a["bias"]:
                    slots[f"bias_ih_l{layer}{d}"] = ((gates * hidden,), "param")
                    slots[f"bias_hh_l{layer}{d}"] = ((gates * hidden,), "param")
                if proj:
                    slots[f"weight_hr_l{layer}{d}"] = ((proj, hidden), "param")
        return slots

    def rules(a: Args, path: str) -> None:
        if a.get("proj_size", 0) >= a["hidden_size"]:
            c.fail(f"{path}.args.proj_size", "must be smaller than hidden_size")

    args = {
        "input_size": (c.POSITIVE, REQUIRED),
        "hidden_size": (c.POSITIVE, REQUIRED),
        "num_layers": (c.integer(1, MAX_RNN_LAYERS), 1),
        "bias": (c.boolean, True),
        "batch_first": (c.boolean, False),
        "dropout": (c.UNIT, 0.0),
        "bidirectional": (c.boolean, False),
    }
    if lstm:
        args["proj_size"] = (c.NON_NEGATIVE, 0)
    return {"args": args, "state": state, "rules": rules}


def _loss(*tensors: str, classes: bool = False, **args: tuple[c.Check, Any]) -> dict[str, Any]:
    """A loss; an optional weight tensor travels in "state", its shape in "<name>_shape"."""

    def state(a: Args) -> dict[str, Slot]:
        return {t: (tuple(a[f"{t}_shape"]), "buffer") for t in tensors if a[f"{t}_shape"]}

    def rules(a: Args, path: str) -> None:
        if classes and a["weight_shape"] is not None and len(a["weight_shape"]) != 1:
            c.fail(f"{path}.args.weight_shape", "must hold one size (the number of classes)")

    def build(cls: type[nn.Module], a: Args, dtype: torch.dtype) -> nn.Module:
        kwargs = {k: v for k, v in a.items() if not k.endswith("_shape")}
        for t in tensors:
            shape = a[f"{t}_shape"]
            kwargs[t] = None if shape is None else torch.empty(shape, dtype=dtype)
        return cls(**kwargs)

    shapes = {f"{t}_shape": (c.optional(c.SHAPE), None) for t in tensors}
    read = {f"{t}_shape": _shape_of(t) for t in tensors}
    rest = args | {"reduction": (c.REDUCTION, "mean")}
    return {"args": shapes | rest, "state": state, "rules": rules, "read": read, "build": build}


_INPLACE = {"inplace": (c.boolean, False)}
_SOFTMAX = {"args": {"dim": (c.optional(c.DIM), None)}}
_CLASS_LOSS = {"classes": True, "ignore_index": (c.INDEX, -100)}
_CONTAINER = {"container": True}

_TABLE: dict[str, tuple[type[nn.Module], Mapping[str, Any]]] = {
    "Sequential": (nn.Sequential, _CONTAINER),
    "ModuleList": (nn.ModuleList, _CONTAINER),
    "ModuleDict": (nn.ModuleDict, _CONTAINER),
    "Linear": (nn.Linear, _LINEAR),
    "Conv1d": (nn.Conv1d, _conv(1)),
    "Conv2d": (nn.Conv2d, _conv(2)),
    "BatchNorm1d": (nn.BatchNorm1d, _BATCH_NORM),
    "BatchNorm2d": (nn.BatchNorm2d, _BATCH_NORM),
    "LayerNorm": (nn.LayerNorm, _LAYER_NORM),
    "Dropout": (nn.Dropout, {"args": {"p": (c.UNIT, 0.5)} | _INPLACE}),
    "ReLU": (nn.ReLU, {"args": _INPLACE}),
    "GELU": (nn.GELU, {"args": {"approximate": (c.choice("none", "tanh"), "none")}}),
    "Tanh": (nn.Tanh, {}),
    "Sigmoid": (nn.Sigmoid, {}),
    "Softmax": (nn.Softmax, _SOFTMAX),
    "LogSoftmax": (nn.LogSoftmax, _SOFTMAX),
    "LeakyReLU": (nn.LeakyReLU, {"args": {"negative_slope": (c.real(), 0.01)} | _INPLACE}),
    "ELU": (nn.ELU, {"args": {"alpha": (c.real(), 1.0)} | _INPLACE}),
    "SiLU": (nn.SiLU, {"args": _INPLACE}),
    "Identity": (nn.Identity, {}),
    "Embedding": (nn.Embedding, _EMBEDDING),
    "Flatten": (nn.Flatten, {"args": {"start_dim": (c.DIM, 1), "end_dim": (c.DIM, -1)}}),
    "Unflatten": (nn.Unflatten, _UNFLATTEN),
    "MaxPool2d": (nn.MaxPool2d, _MAX_POOL),
    "AvgPool2d": (nn.AvgPool2d, _AVG_POOL),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, _ADAPTIVE_POOL),
    "LSTM": (nn.LSTM, _rnn(4, lstm=True)),
    "GRU": (nn.GRU, _rnn(3, lstm=False)),
    "CrossEntropyLoss": (
        nn.CrossEntropyLoss,
        _loss("weight", **_CLASS_LOSS, label_smoothing=(c.UNIT, 0.0)),
    ),
    "NLLLoss": (nn.NLLLoss, _loss("weight", **_CLASS_LOSS)),
    "MSELoss": (nn.MSELoss, _loss()),
    "L1Loss": (nn.L1Loss, _loss()),
    "BCELoss": (nn.BCELoss, _loss("weight")),
    "BCEWithLogitsLoss": (nn.BCEWithLogitsLoss, _loss("weight", "pos_weight")),
}

REGISTRY: dict[str, Layer] = {name: Layer(cls, **spec) for name, (cls, spec) in _TABLE.items()}
"""Type name in a spec -> how that layer travels."""

NAME_OF: dict[type[nn.Module], str] = {layer.cls: name for name, layer in REGISTRY.items()}
"""Exact class -> type name (subclasses are deliberately absent)."""

SUPPORTED_MODULE_TYPES: frozenset[str] = frozenset(REGISTRY)
