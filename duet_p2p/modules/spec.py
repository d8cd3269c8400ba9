"""Module <-> spec: send a model as data, rebuild it from an untrusted peer's spec.

Both directions walk the tree with an explicit stack, so a hostile spec nested 10,000
deep ends in a ProtocolError, never a RecursionError. The receiver checks the whole spec,
and works out every tensor's size from the constructor arguments, before it builds
anything.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from duet_p2p.errors import ConfigurationError, OperationNotAllowed, ProtocolError
from duet_p2p.modules import checks as c
from duet_p2p.modules.registry import (
    NAME_OF,
    REGISTRY,
    REQUIRED,
    SUPPORTED_MODULE_TYPES,
    Args,
    Layer,
    Slot,
)

logger = logging.getLogger(__name__)

ROOT = "model"
"""How error messages name the top of the model."""

_KEYS = frozenset({"type", "args", "children", "state", "training", "requires_grad"})
_REQUIRED_KEYS = ("type", "args", "state", "training")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CHILD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}")
_RESERVED = frozenset(dir(nn.Sequential) + dir(nn.ModuleList) + dir(nn.ModuleDict))
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")
_SUPPORTED_TEXT = ", ".join(sorted(SUPPORTED_MODULE_TYPES))


@dataclass(frozen=True)
class ModuleLimits:
    """What a received spec may cost the receiver."""

    max_parameters: int = 50_000_000
    """Most elements over every parameter and buffer of the whole model."""
    max_depth: int = 32
    """Deepest nesting of containers (the root is at depth 0)."""
    max_children: int = 10_000
    """Most submodules in the whole tree (the root not counted)."""

    def __post_init__(self) -> None:
        for name in ("max_parameters", "max_depth", "max_children"):
            value = getattr(self, name)
            if not c.is_int(value) or value < 0:
                raise ConfigurationError(f"ModuleLimits.{name} must be a non-negative int")


@dataclass
class _Node:
    """One checked module of a received spec, not built yet."""

    path: str
    type_name: str
    layer: Layer
    args: Args
    slots: dict[str, Slot]
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    training: bool = True
    requires_grad: dict[str, bool] = field(default_factory=dict)
    children: list[list[Any]] = field(default_factory=list)  # [name, index in the node list]


# --- shared checks ---------------------------------------------------------------------


def _check_args(layer: Layer, raw: Any, path: str, type_name: str) -> Args:
    if not isinstance(raw, dict):
        c.fail(path, f"must be a dict of constructor arguments, got {type(raw).__name__}")
    for key in raw:
        if key not in layer.args:
            takes = ", ".join(layer.args) or "no arguments"
            c.fail(path, f"unknown argument {c.show(key)} for {type_name} (it takes: {takes})")
    args: Args = {}
    for name, (check, default) in layer.args.items():
        if name in raw:
            args[name] = check(raw[name], f"{path}.{name}")
        elif default is REQUIRED:
            c.fail(f"{path}.{name}", f"is required by {type_name}")
        else:
            args[name] = default
    return args


def _check_tensors(state: Any, slots: dict[str, Slot], path: str) -> torch.dtype:
    """Check the tensors against the slots the arguments imply; return their float dtype."""
    if not isinstance(state, dict):
        c.fail(path, f"must be a dict of tensors, got {type(state).__name__}")
    for key in state:
        if key not in slots:
            expected = ", ".join(list(slots)[:8]) + (", ..." if len(slots) > 8 else "") or "none"
            c.fail(path, f"unexpected tensor {c.show(key)} (expected: {expected})")
    floats = set()
    for name, (shape, kind) in slots.items():
        where = f"{path}.{name}"
        if name not in state:
            c.fail(where, "is missing")
        tensor = state[name]
        if type(tensor) not in (torch.Tensor, nn.Parameter):
            c.fail(where, f"must be a tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided or tensor.is_nested or tensor.device.type != "cpu":
            c.fail(where, "must be a dense cpu tensor")
        if tuple(tensor.shape) != shape:
            c.fail(where, f"must have shape {list(shape)}, got {list(tensor.shape)}")
        if kind == "count" and tensor.dtype != torch.int64:
            c.fail(where, f"must be an int64 tensor, got {tensor.dtype}")
        if kind != "count":
            if tensor.dtype not in _FLOAT_DTYPES:
                c.fail(where, f"must be a float tensor, got {tensor.dtype}")
            floats.add(tensor.dtype)
    if len(floats) > 1:
        c.fail(path, f"mixes float dtypes ({', '.join(sorted(map(str, floats)))})")
    return floats.pop() if floats else torch.get_default_dtype()


def _check_children(raw: Any, path: str, type_name: str) -> list[str]:
    if not isinstance(raw, dict):
        c.fail(path, f"must be a dict of module specs, got {type(raw).__name__}")
    names = list(raw)
    if type_name == "ModuleList":
        if names != [str(i) for i in range(len(names))]:
            c.fail(path, "ModuleList children must be named '0', '1', ... in order")
        return names
    for name in names:
        if not isinstance(name, str) or not _CHILD_NAME.fullmatch(name) or name in _RESERVED:
            c.fail(path, f"bad child name {c.show(name)} (letters, digits, _ and -)")
    return names


def _count(slots: dict[str, Slot]) -> int:
    return sum(math.prod(shape) for shape, _ in slots.values())


# --- receiving -------------------------------------------------------------------------


def _check_node(raw: Any, path: str) -> _Node:
    if not isinstance(raw, dict):
        c.fail(path, f"must be a module spec (a dict), got {type(raw).__name__}")
    unknown = [key for key in raw if key not in _KEYS]
    if unknown:
        c.fail(path, f"unknown key {c.show(unknown[0])} (allowed: {', '.join(sorted(_KEYS))})")
    for key in _REQUIRED_KEYS:
        if key not in raw:
            c.fail(f"{path}.{key}", "is missing")
    type_name = raw["type"]
    if not isinstance(type_name, str) or type_name not in REGISTRY:
        c.fail(
            f"{path}.type", f"unknown module type {c.show(type_name)}; supported: {_SUPPORTED_TEXT}"
        )
    layer = REGISTRY[type_name]
    args = _check_args(layer, raw["args"], f"{path}.args", type_name)
    layer.rules(args, path)
    if not layer.container and "children" in raw:
        c.fail(f"{path}.children", f"{type_name} takes no children")
    if layer.container and "children" not in raw:
        c.fail(f"{path}.children", "is missing")
    return _Node(path, type_name, layer, args, layer.state(args))


def _check_contents(node: _Node, raw: dict[str, Any]) -> None:
    """Check a node's tensors and flags against what its (checked) arguments imply."""
    path = node.path
    node.dtype = _check_tensors(raw["state"], node.slots, f"{path}.state")
    node.state = raw["state"]
    node.training = c.boolean(raw["training"], f"{path}.training")
    flags = raw.get("requires_grad", {})
    if not isinstance(flags, dict):
        c.fail(f"{path}.requires_grad", "must be a dict of parameter name -> bool")
    for name, flag in flags.items():
        if node.slots.get(name, ((), ""))[1] != "param":
            c.fail(
                f"{path}.requires_grad", f"{c.show(name)} is not a parameter of {node.type_name}"
            )
        node.requires_grad[name] = c.boolean(flag, f"{path}.requires_grad.{name}")


def _check_spec(spec: object, limits: ModuleLimits, *, build: bool) -> tuple[list[_Node], int]:
    """Check a spec without building anything; nodes come out parents first.

    ``build=False`` (sizing only) skips the parameter cap and the tensors themselves.
    """
    nodes: list[_Node] = []
    raws: list[dict[str, Any]] = []
    total = submodules = 0
    stack: list[tuple[Any, str, int, list[Any] | None]] = [(spec, ROOT, 0, None)]
    while stack:
        raw, path, depth, link = stack.pop()
        node = _check_node(raw, path)
        total += _count(node.slots)
        if build and total > limits.max_parameters:
            c.fail(
                path,
                f"{node.type_name} brings the model to {total:,} parameter elements, "
                f"over the limit of {limits.max_parameters:,}",
            )
        if link is not None:
            link[1] = len(nodes)
        nodes.append(node)
        raws.append(raw)
        if not node.layer.container:
            continue
        raw_children = raw["children"]
        names = _check_children(raw_children, f"{path}.children", node.type_name)
        if names and depth >= limits.max_depth:
            c.fail(path, f"nests deeper than {limits.max_depth} levels")
        submodules += len(names)
        if submodules > limits.max_children:
            c.fail(path, f"the model has more than {limits.max_children} submodules")
        node.children = [[name, -1] for name in names]
        for link in reversed(node.children):  # popped in order
            stack.append((raw_children[link[0]], f"{path}.{link[0]}", depth + 1, link))
    for node, raw in zip(nodes, raws, strict=True) if build else ():
        _check_contents(node, raw)  # once the whole model's size is known to be fine
    return nodes, total


def _build_layer(node: _Node) -> nn.Module:
    layer, cls = node.layer, node.layer.cls
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in node.args.items()}
    try:
        if layer.build is not None:
            module = layer.build(cls, kwargs, node.dtype)
        elif node.slots:  # on the meta device: no memory and no init until the copy below
            module = cls(**kwargs, device="meta", dtype=node.dtype).to_empty(device="cpu")
        else:
            module = cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        c.fail(node.path, f"{node.type_name} could not be built: {exc}")
    tensors = {**module._parameters, **module._buffers}
    actual = {n: tuple(t.shape) for n, t in tensors.items() if t is not None}
    if actual != {n: shape for n, (shape, _) in node.slots.items()}:
        c.fail(node.path, f"{node.type_name} was built with unexpected tensors {actual}")
    with torch.no_grad():
        for name, value in node.state.items():
            tensors[name].copy_(value)
    for name, flag in node.requires_grad.items():
        tensors[name].requires_grad_(flag)
    return module


def spec_to_module(spec: object, *, limits: ModuleLimits | None = None) -> nn.Module:
    """Build a module from a peer's spec; ProtocolError (naming the place) if it is refused."""
    nodes, total = _check_spec(spec, limits or ModuleLimits(), build=True)
    built: list[nn.Module | None] = [None] * len(nodes)
    for index in range(len(nodes) - 1, -1, -1):  # children sit after their parent
        node = nodes[index]
        if node.layer.container:
            kids = OrderedDict((name, built[i]) for name, i in node.children)
            if node.type_name == "ModuleList":
                module = nn.ModuleList(kids.values())
            else:
                module = node.layer.cls(kids)
        else:
            module = _build_layer(node)
        module.training = node.training
        built[index] = module
    logger.debug(
        "built a %s from a spec: %d modules, %d elements", nodes[0].type_name, len(nodes), total
    )
    return built[0]


def parameter_count_of_spec(spec: object, *, limits: ModuleLimits | None = None) -> int:
    """Elements over every parameter and buffer the spec would allocate.

    Checks the structure, limits on depth and children, and every constructor argument;
    not the tensors, nor the parameter cap (the caller compares the count with its own).
    """
    return _check_spec(spec, limits or ModuleLimits(), build=False)[1]


# --- sending ---------------------------------------------------------------------------


def _layer_of(module: nn.Module, path: str) -> tuple[str, Layer]:
    cls = type(module)
    name = NAME_OF.get(cls)
    if name is None:
        base = next((NAME_OF[k] for k in cls.__mro__[1:] if k in NAME_OF), None)
        sub = f" (a subclass of {base})" if base else ""
        raise OperationNotAllowed(
            f"{path} ({cls.__name__}) is a custom nn.Module{sub}: its forward() cannot be sent "
            f"as data; build it from torch.nn.Sequential and the supported layers: "
            f"{_SUPPORTED_TEXT}"
        )
    return name, REGISTRY[name]


def _refuse_code(module: nn.Module, where: str) -> None:
    """Hooks and a replaced forward are code: they cannot travel, so refuse them."""
    if any(getattr(module, attr, None) for attr in _HOOKS):
        raise OperationNotAllowed(
            f"{where} has hooks registered; hooks are code, remove them first"
        )
    if "forward" in vars(module):
        raise OperationNotAllowed(f"{where} has its forward() replaced; that is code")
    for name, param in module._parameters.items():
        if param is not None and any(getattr(param, a, None) for a in _TENSOR_HOOKS):
            raise OperationNotAllowed(f"{where}: parameter {name} has hooks; remove them first")


def _read_node(module: nn.Module, path: str, type_name: str, layer: Layer) -> dict[str, Any]:
    where = f"{path} ({type_name})"
    try:
        raw = {n: r(module) if (r := layer.read.get(n)) else getattr(module, n) for n in layer.args}
        args = _check_args(layer, raw, f"{path}.args", type_name)
        layer.rules(args, path)
        slots = layer.state(args)
        live = {**module._parameters, **module._buffers}
        live = {n: t for n, t in live.items() if t is not None}
        if any(t.is_meta for t in live.values()):
            raise OperationNotAllowed(f"{where} has meta tensors (no data) and cannot be sent")
        params = {n for n, t in module._parameters.items() if t is not None}
        if params != {n for n, (_, kind) in slots.items() if kind == "param"}:
            c.fail(f"{path}.state", "its parameters do not match its constructor arguments")
        state = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in live.items()}
        _check_tensors(state, slots, f"{path}.state")
    except ProtocolError as exc:
        raise OperationNotAllowed(f"{where} cannot be sent: {exc}") from None
    spec: dict[str, Any] = {"type": type_name, "args": args, "state": state}
    spec["training"] = bool(module.training)
    frozen = {n: False for n in sorted(params) if not module._parameters[n].requires_grad}
    if frozen:
        spec["requires_grad"] = frozen
    return spec


def module_to_spec(module: nn.Module, *, limits: ModuleLimits | None = None) -> dict[str, Any]:
    """Describe a module as plain data and tensors (cpu copies); refuse custom code."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module_to_spec needs a torch.nn.Module, got {type(module).__name__}")
    limits = limits or ModuleLimits()
    root: dict[str, Any] = {}
    first_seen: dict[int, str] = {}  # id of a module or tensor with state -> its path
    submodules = 0
    stack: list[tuple[nn.Module, str, int, dict[str, Any]]] = [(module, ROOT, 0, root)]
    while stack:
        mod, path, depth, out = stack.pop()
        type_name, layer = _layer_of(mod, path)
        where = f"{path} ({type_name})"
        _refuse_code(mod, where)
        out.update(_read_node(mod, path, type_name, layer))
        if out["state"]:
            _refuse_sharing(mod, path, first_seen)
        if not layer.container:
            if mod._modules:
                extra = ", ".join(mod._modules)
                raise OperationNotAllowed(
                    f"{where} holds extra submodules ({extra}); move them out"
                )
            continue
        children: dict[str, Any] = {}
        out["children"] = children
        try:
            _check_children(dict(mod._modules), f"{path}.children", type_name)
        except ProtocolError as exc:
            raise OperationNotAllowed(f"{where} cannot be sent: {exc}") from None
        if mod._modules and depth >= limits.max_depth:
            raise OperationNotAllowed(f"{where} nests deeper than {limits.max_depth} levels")
        submodules += len(mod._modules)
        if submodules > limits.max_children:
            raise OperationNotAllowed(f"the model has more than {limits.max_children} submodules")
        for name, child in mod._modules.items():
            if child is None:
                raise OperationNotAllowed(f"{path}.{name} is None; remove the empty slot")
            children[name] = {}
        for name, child in reversed(mod._modules.items()):  # popped in order
            stack.append((child, f"{path}.{name}", depth + 1, children[name]))
    return root


def _refuse_sharing(module: nn.Module, path: str, first_seen: dict[int, str]) -> None:
    """Tied layers or weights would arrive as separate copies: refuse rather than untie."""
    if id(module) in first_seen:
        raise OperationNotAllowed(
            f"{path} is the same layer as {first_seen[id(module)]}; shared layers cannot be sent"
        )
    first_seen[id(module)] = path
    for name, tensor in {**module._parameters, **module._buffers}.items():
        if tensor is None:
            continue
        if id(tensor) in first_seen:
            raise OperationNotAllowed(
                f"{path}.{name} is the same tensor as {first_seen[id(tensor)]}; "
                "tied weights cannot be sent"
            )
        first_seen[id(tensor)] = f"{path}.{name}"
