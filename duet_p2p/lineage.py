"""Lineage: how a derived object came to be, rendered as an expression the owner can read."""

from __future__ import annotations

import math
from typing import Any

import torch

from duet_p2p.rpc.codec import ObjectRef

MAX_EXPRESSION_CHARS = 2000
MAX_OPS = 200
MAX_LITERAL_CHARS = 40
_BINARY = {
    "__add__": "+", "__sub__": "-", "__mul__": "*", "__truediv__": "/", "__floordiv__": "//",
    "__mod__": "%", "__pow__": "**", "__matmul__": "@", "__and__": "&", "__or__": "|",
    "__xor__": "^", "__lt__": "<", "__le__": "<=", "__gt__": ">", "__ge__": ">=",
    "__eq__": "==", "__ne__": "!=",
}  # fmt: skip
_REFLECTED = {f"__r{name[2:]}": symbol for name, symbol in _BINARY.items()}
_UNARY = {"__neg__": "-", "__pos__": "+", "__invert__": "~", "__abs__": "abs"}
_PLAIN_CONVERSIONS = frozenset(
    "item tolist float double half int long bool clone detach contiguous to cpu".split()
    + ["index"]  # duet.index: an item of a tuple is named after the op that made the tuple
)


def name_of(ops: tuple[str, ...]) -> str:
    """A short request name: the last op that is more than a plain conversion (``sum``)."""
    for op in reversed(ops):
        short = op.rpartition(".")[2]
        if short not in _PLAIN_CONVERSIONS:
            return short.strip("_") or short
    return ops[-1].rpartition(".")[2] if ops else "object"


def _clip(text: str, limit: int = MAX_EXPRESSION_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_value(value: Any, names: dict[str, str]) -> str:
    """An argument as it would be written in the expression."""
    if isinstance(value, ObjectRef):
        return names.get(value.id, f"obj_{value.id[:8]}")
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={list(value.shape)}, dtype={str(value.dtype).removeprefix('torch.')})"
    if isinstance(value, slice):
        parts = [render_value(p, names) if p is not None else "" for p in (value.start, value.stop)]
        step = f":{render_value(value.step, names)}" if value.step is not None else ""
        return f"{parts[0]}:{parts[1]}{step}"
    if value is Ellipsis:
        return "..."
    if isinstance(value, tuple):
        inner = ", ".join(render_value(v, names) for v in value[:16])
        return f"({inner}{',' if len(value) == 1 else ''}{', …' if len(value) > 16 else ''})"
    if isinstance(value, list):
        inner = ", ".join(render_value(v, names) for v in value[:16])
        return f"[{inner}{', …' if len(value) > 16 else ''}]"
    if isinstance(value, dict):
        inner = ", ".join(f"{k!r}: {render_value(v, names)}" for k, v in list(value.items())[:16])
        return "{" + inner + "}"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f"float('{value}')"
    return _clip(repr(value), MAX_LITERAL_CHARS)


def render_call(
    op: str, target: Any, args: list[Any], kwargs: dict[str, Any], names: dict[str, str],
    *, attribute: bool = False,
) -> str:  # fmt: skip
    """``op`` applied to its arguments, as an expression."""
    short = op.rpartition(".")[2]
    rendered = [render_value(a, names) for a in args[:16]]
    rendered += [f"{k}={render_value(v, names)}" for k, v in list(kwargs.items())[:16]]
    arguments = ", ".join(rendered)
    if target is None:
        return _clip(f"{op}({arguments})")
    receiver = render_value(target, names)
    if attribute:
        return _clip(f"{receiver}.{short}")
    if short in _BINARY and len(args) == 1:
        return _clip(f"({receiver} {_BINARY[short]} {rendered[0]})")
    if short in _REFLECTED and len(args) == 1:
        return _clip(f"({rendered[0]} {_REFLECTED[short]} {receiver})")
    if short in _UNARY and not args:
        symbol = _UNARY[short]
        return _clip(f"abs({receiver})" if symbol == "abs" else f"{symbol}{receiver}")
    if short == "__getitem__" and len(args) == 1:
        index = args[0]
        inner = (
            ", ".join(render_value(v, names) for v in index[:16])
            if isinstance(index, tuple)
            else rendered[0]
        )
        return _clip(f"{receiver}[{inner}]")
    if short == "__call__":
        return _clip(f"{receiver}({arguments})")
    return _clip(f"{receiver}.{short}({arguments})")


def merge_ops(*sequences: tuple[str, ...]) -> tuple[str, ...]:
    """Ops of several inputs, then the new op, keeping the most recent MAX_OPS."""
    merged: list[str] = []
    for sequence in sequences:
        merged.extend(sequence)
    return tuple(merged[-MAX_OPS:])
