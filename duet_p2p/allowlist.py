"""What a remote scientist may run in the owner's process: dotted torch paths and what they return.

Anything not named is refused, and so are dunders (other than the Python operators on
`torch.Tensor` and `torch.nn.Module.__call__`) and attribute walks. Paths are resolved by
getattr from the `torch` module over checked segments only. The owner may narrow or extend
the list at launch; a hard-forbidden list (storage access, serialization, global state,
process and device control) is refused even then, to protect the owner from mistakes.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from duet_p2p import allowlist_data
from duet_p2p.allowlist_effects import (
    COUNTING_REDUCTIONS,
    ELEMENTWISE,
    Effect,
    draws_randomness,
    effect_of,
)
from duet_p2p.errors import ConfigurationError, OperationNotAllowed

logger = logging.getLogger(__name__)

MAX_PATH_LENGTH = 200
"""Longest operation path accepted from a peer."""

_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

OPERATOR_DUNDERS: frozenset[str] = frozenset(
    """
    __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__
    __truediv__ __rtruediv__ __itruediv__ __floordiv__ __rfloordiv__ __ifloordiv__
    __mod__ __rmod__ __imod__ __pow__ __rpow__ __ipow__ __matmul__ __rmatmul__
    __and__ __rand__ __iand__ __or__ __ror__ __ior__ __xor__ __rxor__ __ixor__
    __lshift__ __rlshift__ __ilshift__ __rshift__ __rrshift__ __irshift__
    __neg__ __pos__ __abs__ __invert__ __lt__ __le__ __gt__ __ge__ __eq__ __ne__
    __getitem__ __setitem__ __len__
    """.split()
)
"""Python operator methods a pointer forwards; each runs as ``torch.Tensor.<name>``."""

RECEIVER_CLASSES: tuple[str, ...] = ("torch.Tensor", "torch.nn.Module", "torch.optim.Optimizer")
"""Classes whose entries are methods (or attributes) run on a receiver object."""

_ALLOWED_DUNDER_PATHS = frozenset(
    {f"torch.Tensor.{name}" for name in OPERATOR_DUNDERS} | {"torch.nn.Module.__call__"}
)

# Segments refused anywhere in a path: process, interpreter and device control, serialization,
# code loading and compilation, global state.
_FORBIDDEN_SEGMENTS = frozenset(
    """
    os sys builtins subprocess ctypes importlib pickle marshal shutil socket io pathlib inspect
    gc threading signal _C ops hub utils jit compile cuda mps xpu distributed multiprocessing
    backends library classes fx onnx package profiler serialization export testing random
    data_ptr numpy load save from_file frombuffer from_numpy from_dlpack to_dlpack
    share_memory share_memory_ pin_memory manual_seed seed initial_seed get_rng_state fork_rng
    Generator default_generator use_deterministic_algorithms
    empty empty_like empty_strided new_empty new_empty_strided resize_ resize_as_
    as_strided as_strided_ apply apply_ map_ map2_
    """.split()
)
# Prefixes refused anywhere: global setters (set_, set_default_*, set_grad_enabled, ...) and
# hook registration (register_hook, register_forward_hook, register_buffer, ...).
_FORBIDDEN_PREFIXES = ("set_", "register_")
# Substrings refused anywhere (case-insensitive): raw storage in every spelling.
_FORBIDDEN_SUBSTRINGS = ("storage",)


class ReturnKind(enum.StrEnum):
    """What an allowlisted operation gives back, so the executor knows how to store it."""

    TENSOR = "tensor"
    NUMBER = "number"
    BOOL = "bool"
    TUPLE = "tuple"
    """A tuple or list of tensors (sort, topk, split, qr, ...)."""
    LIST = "list"
    """Nested lists of Python numbers (tolist)."""
    MODULE = "module"
    OPTIMIZER = "optimizer"
    SIZE = "size"
    NONE = "none"
    PARAMETERS = "parameters"
    """Module.parameters(): the executor materializes the iterator as a list of tensors."""
    STATE_DICT = "state_dict"
    """A mapping of names to tensors."""
    DTYPE = "dtype"
    AUTO = "auto"
    """A tensor or a tuple of tensors depending on the arguments; decided by the result."""


@dataclass(frozen=True)
class AllowedOp:
    """One allowlisted operation."""

    path: str
    """Dotted path from the torch module, e.g. ``torch.Tensor.sum``."""
    returns: ReturnKind
    """What the operation returns."""
    category: str = "other"
    """Family for humans and policies: arithmetic, reduction, shape, linalg, loss, ..."""
    inplace: bool = False
    """Mutates an object that already exists (self, gradients, parameters)."""
    random: bool = False
    """Draws from the owner's random number generator."""
    reduction: bool = False
    """Summarises many elements into few (with the op's default arguments)."""
    attribute: bool = False
    """An attribute read on a receiver (``tensor.shape``), not a call."""
    notes: str = ""
    """Anything the executor or the owner must know about the arguments or result."""
    effect: Effect = Effect.UNKNOWN
    """What it may write into or alias (see ``allowlist_effects``); entries the owner adds
    default to ``UNKNOWN``, the safe answer."""
    elementwise: bool = False
    """Each output element depends only on the same position of each input."""
    counts: bool = False
    """A reduction that summarises every record it runs over (sum, mean, count, ...)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "returns", ReturnKind(self.returns))
        object.__setattr__(self, "effect", Effect(self.effect))
        if self.attribute and self.receiver is None:
            raise ConfigurationError(
                f"{self.path!r}: attributes must be read on one of {', '.join(RECEIVER_CLASSES)}"
            )

    @property
    def name(self) -> str:
        """The last path segment: the function, method or attribute name."""
        return self.path.rpartition(".")[2]

    @property
    def draws(self) -> bool:
        """Whether it may draw from (and advance) the session's random generator."""
        return draws_randomness(self.path, self.random)

    @property
    def receiver(self) -> str | None:
        """The receiver class path for methods and attributes, None for functions."""
        owner = self.path.rpartition(".")[0]
        return owner if owner in RECEIVER_CLASSES else None


def _shown(path: object) -> str:
    text = repr(path)
    return text if len(text) <= 80 else text[:77] + "..."


def _not_allowed(path: object, why: str) -> OperationNotAllowed:
    return OperationNotAllowed(f"operation {_shown(path)} is not on the owner's allowlist ({why})")


def check_path_syntax(path: str) -> None:
    """Refuse a malformed operation path from a peer before any lookup.

    A path is ASCII, at most `MAX_PATH_LENGTH` characters, starts with ``torch.`` and is made
    of dot-separated identifiers.
    """
    if not isinstance(path, str):
        raise _not_allowed(path, "the name is not a string")
    if not path:
        raise _not_allowed(path, "empty name")
    if len(path) > MAX_PATH_LENGTH:
        raise _not_allowed(path, f"name longer than {MAX_PATH_LENGTH} characters")
    if not path.isascii():
        raise _not_allowed(path, "non-ASCII name")
    segments = path.split(".")
    if len(segments) < 2 or segments[0] != "torch":
        raise _not_allowed(path, "names start with 'torch.'")
    for segment in segments:
        if _SEGMENT.fullmatch(segment) is None:
            raise _not_allowed(path, "malformed name")


def _check_allowable(path: str) -> None:
    """Refuse a path that may never be allowlisted, whoever asks."""
    check_path_syntax(path)
    for segment in path.split("."):
        if segment.startswith("_") and path not in _ALLOWED_DUNDER_PATHS:
            raise OperationNotAllowed(
                f"{_shown(path)} cannot be allowlisted: private names and dunders other than "
                "the Python operators on torch.Tensor are refused"
            )
        lowered = segment.lower()
        if (
            segment in _FORBIDDEN_SEGMENTS
            or segment.startswith(_FORBIDDEN_PREFIXES)
            or any(part in lowered for part in _FORBIDDEN_SUBSTRINGS)
        ):
            raise OperationNotAllowed(
                f"{_shown(path)} cannot be allowlisted: {segment!r} is on the hard-forbidden list"
            )


def _is_torch_namespace(obj: object) -> bool:
    if isinstance(obj, types.ModuleType):
        name = obj.__name__
    elif isinstance(obj, type):
        name = obj.__module__
    else:
        return False
    return name == "torch" or name.startswith("torch.")


def _walk(path: str) -> Any:
    """getattr from the torch module over a checked path; every step but the last must be a
    torch module or a torch class."""
    import torch

    _check_allowable(path)
    obj: Any = torch
    for segment in path.split(".")[1:]:
        if not _is_torch_namespace(obj):
            raise OperationNotAllowed(f"{_shown(path)} leaves the torch namespace")
        obj = getattr(obj, segment)
    return obj


def _entries_from_data() -> list[AllowedOp]:
    entries = []
    for group in allowlist_data.GROUPS:
        under = str(group["under"])
        category, returns = str(group["category"]), str(group["returns"])
        inplace = bool(group.get("inplace", False))
        on_tensors = under in ("torch", "torch.Tensor", "torch.nn.functional")
        for name in str(group["names"]).split():
            path = f"{under}.{name}"
            effect = effect_of(path, category, returns, inplace)
            entries.append(
                AllowedOp(
                    path=path,
                    returns=ReturnKind(returns),
                    category=category,
                    inplace=inplace,
                    random=bool(group.get("random", False)),
                    reduction=bool(group.get("reduction", False)),
                    attribute=bool(group.get("attribute", False)),
                    notes=allowlist_data.NOTES.get(path, ""),
                    effect=effect,
                    elementwise=on_tensors and name in ELEMENTWISE and not inplace,
                    counts=on_tensors and name in COUNTING_REDUCTIONS,
                )
            )
    return entries


class Allowlist:
    """An immutable set of `AllowedOp` keyed by path; `narrow` and `extend` return new lists."""

    def __init__(self, entries: Iterable[AllowedOp]) -> None:
        ops: dict[str, AllowedOp] = {}
        for entry in entries:
            if not isinstance(entry, AllowedOp):
                raise ConfigurationError(f"allowlist entries are AllowedOp, got {type(entry)!r}")
            _check_allowable(entry.path)
            if entry.path in ops:
                raise ConfigurationError(f"{entry.path!r} is listed twice")
            ops[entry.path] = entry
        self._ops = ops
        self._resolved: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> AllowedOp:
        """The entry for `path`; raises `OperationNotAllowed` for anything not named."""
        check_path_syntax(path)
        entry = self._ops.get(path)
        if entry is None:
            raise _not_allowed(path, "not named")
        return entry

    def resolve(self, path: str) -> Any:
        """The real torch object for `path`: a function, a class, or (for methods and
        attributes) the unbound attribute of the receiver class. Cached."""
        entry = self.get(path)
        with self._lock:
            if path in self._resolved:
                return self._resolved[path]
        obj = _walk(entry.path)
        with self._lock:
            self._resolved[path] = obj
        return obj

    def bind(self, path: str, receiver: object) -> Any:
        """For a method entry, the method bound to `receiver`; for an attribute entry, its value.

        The receiver must be an instance of the entry's receiver class; the lookup goes through
        the receiver's own type, so subclass overrides (``Linear.forward``, ``SGD.step``) run.
        """
        entry = self.get(path)
        if entry.receiver is None:
            raise OperationNotAllowed(f"{path!r} is a function, not a method or attribute")
        cls = self._receiver_class(entry.receiver)
        if not isinstance(receiver, cls):
            raise OperationNotAllowed(
                f"{path!r} needs a {entry.receiver} receiver, got {type(receiver).__name__}"
            )
        return getattr(receiver, entry.name)

    def _receiver_class(self, class_path: str) -> type:
        with self._lock:
            cls = self._resolved.get(class_path)
        if cls is None:
            cls = _walk(class_path)
            with self._lock:
                self._resolved[class_path] = cls
        return cls

    def narrow(self, keep: Iterable[str] | Callable[[AllowedOp], bool]) -> Allowlist:
        """A new allowlist holding only the given paths, or the entries `keep` accepts."""
        if callable(keep):
            return Allowlist(entry for entry in self._ops.values() if keep(entry))
        wanted = {keep} if isinstance(keep, str) else set(keep)
        unknown = sorted(wanted - self._ops.keys())
        if unknown:
            raise ConfigurationError(f"cannot narrow to paths not on the allowlist: {unknown}")
        return Allowlist(entry for path, entry in self._ops.items() if path in wanted)

    def extend(self, entries: Iterable[AllowedOp]) -> Allowlist:
        """A new allowlist with `entries` added (replacing same-path entries).

        Each new path must resolve in the installed torch, and hard-forbidden paths are
        refused with `OperationNotAllowed` even though the owner asks.
        """
        added = list(entries)
        for entry in added:
            if not isinstance(entry, AllowedOp):
                raise ConfigurationError(f"allowlist entries are AllowedOp, got {type(entry)!r}")
            try:
                _walk(entry.path)  # checks the path before any getattr
            except AttributeError as exc:
                raise ConfigurationError(f"{entry.path!r} does not exist in torch") from exc
        merged = dict(self._ops)
        merged.update((entry.path, entry) for entry in added)
        logger.info("allowlist extended with %d entries", len(added))
        return Allowlist(merged.values())

    def paths(self) -> tuple[str, ...]:
        """Every allowlisted path, sorted."""
        return tuple(sorted(self._ops))

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and path in self._ops

    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[AllowedOp]:
        return iter([self._ops[path] for path in sorted(self._ops)])

    def __repr__(self) -> str:
        return f"Allowlist({len(self._ops)} operations)"


DEFAULT_ALLOWLIST: Allowlist = Allowlist(_entries_from_data())
"""The operations common data science needs; see `duet_p2p.allowlist_data`."""

__all__ = [
    "DEFAULT_ALLOWLIST",
    "MAX_PATH_LENGTH",
    "OPERATOR_DUNDERS",
    "RECEIVER_CLASSES",
    "AllowedOp",
    "Allowlist",
    "Effect",
    "ReturnKind",
    "check_path_syntax",
]
