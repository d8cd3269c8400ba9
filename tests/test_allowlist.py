"""The allowlist: every entry is real torch, everything else (and anything dangerous) is refused."""

from __future__ import annotations

import pytest
import torch

from duet_p2p.allowlist import (
    DEFAULT_ALLOWLIST,
    OPERATOR_DUNDERS,
    AllowedOp,
    Allowlist,
    ReturnKind,
    check_path_syntax,
)
from duet_p2p.errors import ConfigurationError, OperationNotAllowed

FORBIDDEN = [
    "torch.Tensor.__class__",
    "torch.Tensor.__reduce__",
    "torch.Tensor.__reduce_ex__",
    "torch.Tensor.__dict__",
    "torch.Tensor.__getattribute__",
    "torch.Tensor.__setattr__",
    "torch.Tensor.__init_subclass__",
    "torch.Tensor.__subclasses__",
    "torch.Tensor.__globals__",
    "torch.Tensor.add.__globals__",
    "torch.Tensor.__add__.__call__",
    "torch.Tensor.storage",
    "torch.Tensor.untyped_storage",
    "torch.Tensor._storage",
    "torch.Tensor.data_ptr",
    "torch.Tensor.register_hook",
    "torch.nn.Module.register_forward_hook",
    "torch.nn.Module.register_buffer",
    "torch.Tensor.numpy",
    "torch.Tensor.share_memory_",
    "torch.Tensor.pin_memory",
    "torch.Tensor.set_",
    "torch.Tensor.resize_",
    "torch.Tensor.as_strided",
    "torch.Tensor.new_empty",
    "torch.Tensor.apply_",
    "torch.load",
    "torch.save",
    "torch.from_file",
    "torch.UntypedStorage.from_file",
    "torch.frombuffer",
    "torch.empty",
    "torch.empty_like",
    "torch.manual_seed",
    "torch.seed",
    "torch.random.manual_seed",
    "torch.set_default_dtype",
    "torch.set_grad_enabled",
    "torch.set_num_threads",
    "torch.Generator",
    "torch.os.system",
    "torch.sys.modules",
    "torch._C._something",
    "torch.utils.data.something",
    "torch.utils.data.DataLoader",
    "torch.hub.load",
    "torch.jit.script",
    "torch.compile",
    "torch.cuda.is_available",
    "torch.ops.aten.add",
    "torch.distributed.init_process_group",
    "torch.multiprocessing.spawn",
    "torch.backends.cudnn",
    "torch.library.Library",
    "torch.fx.symbolic_trace",
    "torch.onnx.export",
    "torch.package.PackageImporter",
    "torch.profiler.profile",
    "torch.nn.Module.__dict__",
    "torch.nn.Module.apply",
    "torch.nn.Module.__init__",
    "torch.nn.Linear.__init__",
    "builtins.eval",
    "os.system",
]

SYNTAX_BOMBS = [
    "",
    ".",
    "torch",
    "torch.",
    ".torch.add",
    "torch..add",
    "torch.add ",
    " torch.add",
    "torch.add\n",
    "torch.add()",
    "torch.1add",
    "torch.add-1",
    "torch/add",
    "torch." + "a" * 10_000,
    "torch." + ".".join(["add"] * 60),
    "torch.ädd",
    "torch.\u0430dd",
    "torch.add\x00",
]


def test_default_is_large_and_sorted() -> None:
    assert len(DEFAULT_ALLOWLIST) >= 300
    assert list(DEFAULT_ALLOWLIST.paths()) == sorted(DEFAULT_ALLOWLIST.paths())
    assert [entry.path for entry in DEFAULT_ALLOWLIST] == list(DEFAULT_ALLOWLIST.paths())


def test_every_entry_resolves_to_real_torch() -> None:
    for entry in DEFAULT_ALLOWLIST:
        obj = DEFAULT_ALLOWLIST.resolve(entry.path)
        assert obj is not None, entry.path
        if entry.receiver is None:
            assert callable(obj), entry.path
        elif entry.attribute:
            assert hasattr(obj, "__get__"), entry.path
        else:
            assert callable(obj), entry.path
        assert DEFAULT_ALLOWLIST.resolve(entry.path) is obj  # cached


def test_receiver_entries_are_class_attributes() -> None:
    classes = {
        "torch.Tensor": torch.Tensor,
        "torch.nn.Module": torch.nn.Module,
        "torch.optim.Optimizer": torch.optim.Optimizer,
    }
    for entry in DEFAULT_ALLOWLIST:
        if entry.receiver is not None:
            cls = classes[entry.receiver]
            assert entry.name in dir(cls), entry.path
            assert DEFAULT_ALLOWLIST.resolve(entry.path) is getattr(cls, entry.name)


def test_operator_dunders_all_listed() -> None:
    listed = {e.name for e in DEFAULT_ALLOWLIST if e.name.startswith("__")}
    assert listed == OPERATOR_DUNDERS | {"__call__"}
    for name in OPERATOR_DUNDERS:
        assert f"torch.Tensor.{name}" in DEFAULT_ALLOWLIST
    assert DEFAULT_ALLOWLIST.get("torch.Tensor.__setitem__").inplace
    assert DEFAULT_ALLOWLIST.get("torch.Tensor.__iadd__").inplace
    assert not DEFAULT_ALLOWLIST.get("torch.Tensor.__add__").inplace


@pytest.mark.parametrize("path", FORBIDDEN)
def test_forbidden_is_refused(path: str) -> None:
    with pytest.raises(OperationNotAllowed):
        DEFAULT_ALLOWLIST.get(path)
    with pytest.raises(OperationNotAllowed):
        DEFAULT_ALLOWLIST.resolve(path)
    assert path not in DEFAULT_ALLOWLIST


@pytest.mark.parametrize("path", [p for p in FORBIDDEN if p.startswith("torch.")])
def test_forbidden_cannot_be_added(path: str) -> None:
    entry = AllowedOp(path, ReturnKind.TENSOR)
    with pytest.raises(OperationNotAllowed):
        DEFAULT_ALLOWLIST.extend([entry])
    with pytest.raises(OperationNotAllowed):
        Allowlist([entry])


@pytest.mark.parametrize("path", SYNTAX_BOMBS)
def test_syntax_bombs_are_refused(path: str) -> None:
    with pytest.raises(OperationNotAllowed) as info:
        check_path_syntax(path)
    assert len(str(info.value)) < 300
    with pytest.raises(OperationNotAllowed):
        DEFAULT_ALLOWLIST.get(path)
    assert path not in DEFAULT_ALLOWLIST


@pytest.mark.parametrize("value", [None, 3, b"torch.add", ["torch.add"]])
def test_non_string_paths_are_refused(value: object) -> None:
    with pytest.raises(OperationNotAllowed):
        check_path_syntax(value)  # type: ignore[arg-type]
    assert value not in DEFAULT_ALLOWLIST


def test_refusal_message_names_the_path() -> None:
    with pytest.raises(OperationNotAllowed, match=r"'torch\.foo' is not on the owner's allowlist"):
        DEFAULT_ALLOWLIST.get("torch.foo")


def test_flags_and_kinds() -> None:
    get = DEFAULT_ALLOWLIST.get
    assert get("torch.Tensor.sum").reduction
    assert get("torch.Tensor.sum").category == "reduction"
    assert get("torch.mean").reduction
    assert not get("torch.Tensor.cumsum").reduction
    assert not get("torch.Tensor.item").reduction
    assert get("torch.Tensor.item").returns is ReturnKind.NUMBER
    assert get("torch.Tensor.add_").inplace
    assert not get("torch.Tensor.add").inplace
    assert get("torch.rand").random
    assert get("torch.nn.functional.dropout").random
    assert not get("torch.add").random
    assert get("torch.Tensor.shape").attribute
    assert get("torch.Tensor.shape").returns is ReturnKind.SIZE
    assert get("torch.Tensor.dtype").returns is ReturnKind.DTYPE
    assert get("torch.Tensor.size").returns is ReturnKind.SIZE
    assert get("torch.Tensor.tolist").returns is ReturnKind.LIST
    assert get("torch.allclose").returns is ReturnKind.BOOL
    assert get("torch.sort").returns is ReturnKind.TUPLE
    assert get("torch.linalg.qr").returns is ReturnKind.TUPLE
    assert get("torch.max").returns is ReturnKind.AUTO
    assert get("torch.nn.Linear").returns is ReturnKind.MODULE
    assert get("torch.optim.Adam").returns is ReturnKind.OPTIMIZER
    assert get("torch.nn.Module.parameters").returns is ReturnKind.PARAMETERS
    assert get("torch.nn.Module.state_dict").returns is ReturnKind.STATE_DICT
    assert get("torch.optim.Optimizer.step").returns is ReturnKind.NONE
    assert get("torch.optim.Optimizer.step").inplace
    assert get("torch.Tensor.backward").returns is ReturnKind.NONE
    assert get("torch.Tensor.to").notes
    auto = [e.path for e in DEFAULT_ALLOWLIST if e.returns is ReturnKind.AUTO]
    assert len(auto) <= 16
    assert "torch.empty" not in DEFAULT_ALLOWLIST


def test_return_kinds_match_real_results() -> None:
    x = torch.arange(12.0).reshape(3, 4)
    cases = [
        ("torch.Tensor.sum", x, (), torch.Tensor, ReturnKind.TENSOR),
        ("torch.Tensor.item", x.sum(), (), float, ReturnKind.NUMBER),
        ("torch.Tensor.size", x, (), torch.Size, ReturnKind.SIZE),
        ("torch.Tensor.tolist", x, (), list, ReturnKind.LIST),
        ("torch.Tensor.allclose", x, (x,), bool, ReturnKind.BOOL),
        ("torch.Tensor.sort", x, (), tuple, ReturnKind.TUPLE),
        ("torch.Tensor.split", x, (2,), tuple, ReturnKind.TUPLE),
        ("torch.Tensor.__add__", x, (1,), torch.Tensor, ReturnKind.TENSOR),
        ("torch.Tensor.__lt__", x, (1,), torch.Tensor, ReturnKind.TENSOR),
        ("torch.Tensor.__len__", x, (), int, ReturnKind.NUMBER),
    ]
    for path, receiver, args, result_type, kind in cases:
        result = DEFAULT_ALLOWLIST.bind(path, receiver)(*args)
        assert isinstance(result, result_type), path
        assert DEFAULT_ALLOWLIST.get(path).returns is kind, path
    values, _ = DEFAULT_ALLOWLIST.resolve("torch.max")(x, dim=0)
    assert isinstance(DEFAULT_ALLOWLIST.resolve("torch.max")(x), torch.Tensor)
    assert isinstance(values, torch.Tensor)


def test_bind_uses_subclass_methods_and_checks_receiver() -> None:
    torch.manual_seed(0)
    model = DEFAULT_ALLOWLIST.resolve("torch.nn.Linear")(4, 2)
    x = torch.ones(3, 4)
    assert DEFAULT_ALLOWLIST.bind("torch.nn.Module.forward", model)(x).shape == (3, 2)
    assert DEFAULT_ALLOWLIST.bind("torch.nn.Module.__call__", model)(x).shape == (3, 2)
    params = list(DEFAULT_ALLOWLIST.bind("torch.nn.Module.parameters", model)())
    opt = DEFAULT_ALLOWLIST.resolve("torch.optim.SGD")(params, lr=0.1)
    loss = model(x).sum()
    DEFAULT_ALLOWLIST.bind("torch.Tensor.backward", loss)()
    before = model.weight.detach().clone()
    DEFAULT_ALLOWLIST.bind("torch.optim.Optimizer.step", opt)()
    assert not torch.equal(before, model.weight)
    assert DEFAULT_ALLOWLIST.bind("torch.Tensor.shape", x) == torch.Size([3, 4])
    assert DEFAULT_ALLOWLIST.bind("torch.Tensor.grad", model.weight) is model.weight.grad
    with pytest.raises(OperationNotAllowed):
        DEFAULT_ALLOWLIST.bind("torch.Tensor.sum", model)
    with pytest.raises(OperationNotAllowed):
        DEFAULT_ALLOWLIST.bind("torch.add", x)


def test_narrow() -> None:
    small = DEFAULT_ALLOWLIST.narrow(["torch.add", "torch.Tensor.sum"])
    assert len(small) == 2
    assert "torch.add" in small and "torch.mul" not in small
    with pytest.raises(OperationNotAllowed):
        small.get("torch.mul")
    assert small.resolve("torch.add") is torch.add
    single = DEFAULT_ALLOWLIST.narrow("torch.add")
    assert single.paths() == ("torch.add",)
    no_random = DEFAULT_ALLOWLIST.narrow(lambda e: not e.random)
    assert "torch.rand" not in no_random and "torch.add" in no_random
    assert len(no_random) < len(DEFAULT_ALLOWLIST)
    with pytest.raises(ConfigurationError):
        DEFAULT_ALLOWLIST.narrow(["torch.add", "torch.nonexistent"])


def test_extend() -> None:
    extra = AllowedOp("torch.special.i0", ReturnKind.TENSOR, category="arithmetic")
    assert "torch.special.i0" not in DEFAULT_ALLOWLIST
    bigger = DEFAULT_ALLOWLIST.extend([extra])
    assert len(bigger) == len(DEFAULT_ALLOWLIST) + 1
    assert bigger.get("torch.special.i0") == extra
    assert bigger.resolve("torch.special.i0") is torch.special.i0
    assert "torch.special.i0" not in DEFAULT_ALLOWLIST
    replaced = DEFAULT_ALLOWLIST.extend([AllowedOp("torch.add", ReturnKind.TENSOR, notes="x")])
    assert len(replaced) == len(DEFAULT_ALLOWLIST)
    assert replaced.get("torch.add").notes == "x"
    with pytest.raises(ConfigurationError):
        DEFAULT_ALLOWLIST.extend([AllowedOp("torch.no_such_function", ReturnKind.TENSOR)])
    with pytest.raises(ConfigurationError):
        Allowlist([extra, extra])
    with pytest.raises(ConfigurationError):
        AllowedOp("torch.add", ReturnKind.TENSOR, attribute=True)


def test_walk_stays_inside_torch() -> None:
    # torch.os is the os module: even a path that escaped the forbidden names is refused by
    # the namespace check before getattr reaches into it.
    from duet_p2p.allowlist import _walk

    with pytest.raises(OperationNotAllowed):
        _walk("torch.os.getcwd")
