"""What calling a module may write, read from its declarative spec or its constructor call.

The monitor never sees a module, only how it was described (an uploaded spec) or built (a
constructor op with literal arguments). From that it knows whether a call can change the
module (running statistics while training, an embedding's ``max_norm``) or its inputs
(in-place layers). Anything it cannot read is ``UNKNOWN``: a call may write everything.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

_STATS_TYPES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d",
                          "InstanceNorm2d", "InstanceNorm3d"})  # fmt: skip
_DRAWING_TYPES = frozenset(
    "RReLU MultiheadAttention TransformerEncoderLayer TransformerEncoder GRU LSTM RNN".split()
)
"""Besides the dropouts: layers that may draw from the random generator when training."""
_CONTAINERS = frozenset({"Sequential", "ModuleList", "ModuleDict", "TransformerEncoder"})
_MAX_NODES = 100_000


@dataclass(frozen=True)
class ModuleFacts:
    stats: bool = False
    """Has layers that update running statistics when called in training mode."""
    training: bool = True
    """Those layers were in training mode when described."""
    max_norm: bool = False
    """Has an embedding that renormalises the rows a call reads (always writes)."""
    inplace: bool = False
    """Has layers that write into their input."""
    random: bool = False
    """Has layers that draw from the random generator while training (dropout)."""
    known: bool = True
    """False: nothing could be read, so a call may write into the module and its inputs."""

    def join(self, other: ModuleFacts) -> ModuleFacts:
        return ModuleFacts(
            self.stats or other.stats,
            self.training or other.training,
            self.max_norm or other.max_norm,
            self.inplace or other.inplace,
            self.random or other.random,
            self.known and other.known,
        )


UNKNOWN = ModuleFacts(True, True, True, True, True, known=False)
PLAIN = ModuleFacts(training=False)


def from_spec(spec: Any) -> ModuleFacts:
    """Facts of an uploaded module spec (untrusted: anything odd is UNKNOWN)."""
    facts = PLAIN
    stack = [spec]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if (
            seen > _MAX_NODES
            or not isinstance(node, dict)
            or not isinstance(node.get("args"), dict)
        ):
            return UNKNOWN
        facts = facts.join(
            _layer(node.get("type"), node["args"], node.get("training") is not False)
        )
        children = node.get("children", {})
        if not isinstance(children, dict):
            return UNKNOWN
        stack.extend(children.values())
    return facts


def from_module(module: Any) -> ModuleFacts:
    """Facts of a module the owner hosts (a real, trusted object)."""
    facts = PLAIN
    for sub in module.modules():
        stats = bool(getattr(sub, "track_running_stats", False))
        random = _draws(type(sub).__name__)
        facts = facts.join(ModuleFacts(
            stats=stats, training=(stats or random) and sub.training,
            max_norm=getattr(sub, "max_norm", None) is not None,
            inplace=_on(getattr(sub, "inplace", False)), random=random,
        ))  # fmt: skip
    return facts


def from_constructor(type_name: str, args: list[Any], kwargs: dict[str, Any],
                     parts: Iterable[ModuleFacts | None]) -> ModuleFacts:  # fmt: skip
    """Facts of ``torch.nn.<type_name>(*args, **kwargs)``; ``parts``: the facts of module
    arguments (None where an argument is a module whose facts are unknown)."""
    parts = list(parts)
    if type_name in _CONTAINERS:
        facts = ModuleFacts(training=True)
        for part in parts:
            facts = facts.join(part if part is not None else UNKNOWN)
        return facts
    try:
        signature = inspect.signature(getattr(nn, type_name).__init__)
        named = signature.bind(None, *args, **kwargs).arguments  # None stands for self
    except (AttributeError, TypeError, ValueError):
        return UNKNOWN
    return _layer(type_name, dict(named), True)


def _draws(type_name: Any) -> bool:
    return isinstance(type_name, str) and ("Dropout" in type_name or type_name in _DRAWING_TYPES)


def _layer(type_name: Any, args: dict[str, Any], training: bool) -> ModuleFacts:
    """Facts of one layer from its arguments by name; a flag that is not literally off
    counts as on."""
    stats = type_name in _STATS_TYPES and _on(args.get("track_running_stats", True))
    random = _draws(type_name)
    return ModuleFacts(
        stats=stats,
        random=random,
        training=training and (stats or random),
        max_norm=args.get("max_norm") is not None,
        inplace=_on(args.get("inplace", False)),
    )


def _on(value: Any) -> bool:
    if value is None or value is False:
        return False
    return not (isinstance(value, (int, float)) and value == 0)
