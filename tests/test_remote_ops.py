"""Remote ops over real WebRTC: each allowlist category gives what local torch gives.

Every case is a lambda run twice: on local tensors with ``torch``, and on pointers to the
same tensors held by the owner with ``duet.torch``. The owner's accept-all handler releases
the result; the released value must equal the local one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import duet_p2p as sy
from duet_p2p.allowlist import DEFAULT_ALLOWLIST
from duet_p2p.errors import OperationNotAllowed, RemoteError
from tests.conftest import close_pair, make_pair

TIMEOUT = 10.0
SECRET = 12345.0


@dataclass
class Env:
    """What a case sees: a torch namespace and tensors (local) or pointers (remote)."""

    torch: Any
    F: Any
    a: Any  # 2x3 float
    b: Any  # 3x2 float
    m: Any  # 3x3 invertible float
    v: Any  # 3 float
    i: Any  # 2x3 int64
    mask: Any  # 2x3 bool
    idx: Any  # int64 index tensor [2, 0]
    labels: Any  # int64 class labels [0, 2]


def _local_tensors() -> dict[str, torch.Tensor]:
    return {
        "a": torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.5]]),
        "b": torch.tensor([[1.0, 2.0], [-1.0, 0.0], [3.0, 1.0]]),
        "m": torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]]),
        "v": torch.tensor([1.0, 2.0, -3.0]),
        "i": torch.tensor([[3, 1, 4], [1, 5, 9]]),
        "mask": torch.tensor([[True, False, True], [False, True, False]]),
        "idx": torch.tensor([2, 0]),
        "labels": torch.tensor([0, 2]),
    }


class _RemoteF:
    """``torch.nn.functional`` on the owner's side, spelled like the local module."""

    def __init__(self, remote_torch: Any) -> None:
        self._ns = remote_torch.nn.functional

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ns, name)


@dataclass
class Session:
    owner: sy.Duet
    scientist: sy.Duet
    local: Env
    remote: Env


@pytest.fixture(scope="module")
def session(signaling_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """One pair for the module: tensors hosted privately, every get accepted."""
    owner, scientist = make_pair(signaling_url, tmp_path_factory.mktemp("ops") / "audit.jsonl")
    tensors = _local_tensors()
    for name, tensor in tensors.items():
        owner.store.send(tensor.clone(), tags=[name])
    owner.requests.add_handler(action="accept")
    local = Env(torch=torch, F=F, **tensors)
    remote = Env(
        torch=scientist.torch,
        F=_RemoteF(scientist.torch),
        **{name: scientist.store[name] for name in tensors},
    )
    yield Session(owner, scientist, local, remote)
    close_pair(scientist, owner)


def assert_same(remote: Any, local: Any) -> None:
    """Equal values: tensors by dtype, shape and content; containers item by item."""
    if isinstance(local, torch.Tensor):
        assert isinstance(remote, torch.Tensor), f"expected a tensor, got {type(remote)}"
        assert remote.dtype == local.dtype
        assert remote.shape == local.shape
        if local.is_floating_point():
            assert torch.allclose(remote, local, equal_nan=True, atol=1e-5)
        else:
            assert torch.equal(remote, local)
    elif isinstance(local, (tuple, list)):  # torch.Size, named tuples (sort, qr) included
        assert isinstance(remote, (tuple, list)), f"expected a sequence, got {type(remote)}"
        assert len(remote) == len(local)
        for r, lo in zip(remote, local, strict=True):
            assert_same(r, lo)
    elif isinstance(local, float):
        assert math.isclose(remote, local, rel_tol=1e-6, abs_tol=1e-6)
    else:
        assert remote == local
        assert type(remote) is type(local)


Case = Callable[[Env], Any]
CASES: list[tuple[str, Case]] = [
    # arithmetic (methods and functions)
    ("add", lambda e: e.a.add(e.a)),
    ("mul scalar", lambda e: e.a.mul(2.5)),
    ("div", lambda e: e.a.div(e.a.abs() + 1)),
    ("exp", lambda e: e.a.exp()),
    ("clamp", lambda e: e.a.clamp(min=-1.0, max=1.0)),
    ("torch.sqrt", lambda e: e.torch.sqrt(e.a.abs())),
    ("torch.where", lambda e: e.torch.where(e.mask, e.a, e.a * 0)),
    ("softmax", lambda e: e.a.softmax(dim=1)),
    ("cumsum", lambda e: e.a.cumsum(dim=1)),
    # reduction
    ("sum", lambda e: e.a.sum()),
    ("mean dim", lambda e: e.a.mean(dim=0)),
    ("std", lambda e: e.a.std()),
    ("max", lambda e: e.a.max()),
    ("max dim (tuple)", lambda e: e.a.max(dim=1)),
    ("argmax", lambda e: e.a.argmax(dim=1)),
    ("torch.sum keepdim", lambda e: e.torch.sum(e.a, dim=1, keepdim=True)),
    ("norm", lambda e: e.torch.linalg.vector_norm(e.v)),
    # comparison
    ("gt", lambda e: e.a.gt(0)),
    ("eq tensor", lambda e: e.torch.eq(e.a, e.a)),
    ("allclose (bool)", lambda e: e.a.allclose(e.a)),
    ("maximum", lambda e: e.torch.maximum(e.a, e.a * -1)),
    # shape
    ("reshape", lambda e: e.a.reshape(3, 2)),
    ("view -1", lambda e: e.a.view(-1)),
    ("transpose", lambda e: e.a.transpose(0, 1)),
    ("T", lambda e: e.a.T),
    ("permute", lambda e: e.a.permute(1, 0)),
    ("unsqueeze", lambda e: e.a.unsqueeze(0)),
    ("torch.cat", lambda e: e.torch.cat([e.a, e.a], dim=0)),
    ("torch.stack", lambda e: e.torch.stack([e.v, e.v])),
    ("split (tuple)", lambda e: e.a.split(1, dim=0)),
    ("shape (size)", lambda e: e.a.shape),
    ("size()", lambda e: e.a.size()),
    ("numel", lambda e: e.a.numel()),
    # indexing and slicing
    ("index int", lambda e: e.a[1]),
    ("index tuple", lambda e: e.a[1, 2]),
    ("slice literals", lambda e: e.a[:, 1:3]),
    ("slice with step", lambda e: e.v[::2]),
    ("ellipsis", lambda e: e.a[..., 0]),
    ("none index", lambda e: e.v[None, :]),
    ("index by pointer tensor", lambda e: e.v[e.idx]),
    ("bool mask", lambda e: e.a[e.mask]),
    ("slice with pointer bounds", lambda e: e.v[e.idx[1] : e.idx[0]]),
    ("slice with number pointer", lambda e: e.v[: e.idx[0].item()]),
    ("index_select", lambda e: e.a.index_select(1, e.idx)),
    ("gather", lambda e: e.a.gather(1, e.idx.unsqueeze(1))),
    ("masked_fill", lambda e: e.a.masked_fill(e.mask, 0.0)),
    # linalg
    ("matmul", lambda e: e.torch.matmul(e.a, e.b)),
    ("mm method", lambda e: e.a.mm(e.b)),
    ("inverse", lambda e: e.m.inverse()),
    ("linalg.inv", lambda e: e.torch.linalg.inv(e.m)),
    ("det", lambda e: e.torch.det(e.m)),
    ("linalg.solve", lambda e: e.torch.linalg.solve(e.m, e.v)),
    ("linalg.qr (tuple)", lambda e: e.torch.linalg.qr(e.m)),
    ("linalg.eigvalsh", lambda e: e.torch.linalg.eigvalsh(e.m)),
    # nn.functional
    ("F.relu", lambda e: e.F.relu(e.a)),
    ("F.softmax", lambda e: e.F.softmax(e.a, dim=-1)),
    ("F.linear", lambda e: e.F.linear(e.a, e.m)),
    ("F.mse_loss", lambda e: e.F.mse_loss(e.a, e.a * 0.5)),
    ("F.cross_entropy", lambda e: e.F.cross_entropy(e.a, e.labels)),
    ("F.one_hot", lambda e: e.F.one_hot(e.labels, num_classes=4)),
    ("F.normalize", lambda e: e.F.normalize(e.a, dim=1)),
    # creation
    ("torch.ones", lambda e: e.torch.ones(3)),
    ("torch.zeros dtype", lambda e: e.torch.zeros(2, 2, dtype=torch.int32)),
    ("torch.arange", lambda e: e.torch.arange(0, 10, 3)),
    ("torch.eye", lambda e: e.torch.eye(3)),
    ("torch.full", lambda e: e.torch.full((2, 2), 7.0)),
    ("torch.tensor literal", lambda e: e.torch.tensor([1, 2, 3])),
    ("torch.ones_like", lambda e: e.torch.ones_like(e.a)),
    ("new_zeros", lambda e: e.a.new_zeros(2)),
    # conversion
    ("float", lambda e: e.i.float()),
    ("long", lambda e: e.a.long()),
    ("to dtype", lambda e: e.a.to(torch.float64)),
    ("bool", lambda e: e.i.bool()),
    ("tolist", lambda e: e.i.tolist()),
    ("item", lambda e: e.a.sum().item()),
    ("int item", lambda e: e.i.max().item()),
    ("clone", lambda e: e.a.clone()),
    # Python operators, reflected included
    ("+", lambda e: e.a + e.a),
    ("- scalar", lambda e: e.a - 1),
    ("*", lambda e: e.a * e.a),
    ("/", lambda e: e.a / 2),
    ("//", lambda e: e.i // 2),
    ("%", lambda e: e.i % 2),
    ("1 + p", lambda e: 1 + e.a),
    ("2 - p", lambda e: 2 - e.a),
    ("3 * p", lambda e: 3 * e.a),
    ("1 / p", lambda e: 1 / (e.a.abs() + 1)),
    ("2 ** p", lambda e: 2**e.a),
    ("p ** 2", lambda e: e.a**2),
    ("@", lambda e: e.a @ e.b),
    ("& |", lambda e: (e.mask & e.mask) | e.mask),
    ("^", lambda e: e.mask ^ e.mask),
    ("<", lambda e: e.a < 0),
    ("<=", lambda e: e.a <= 0.5),
    (">", lambda e: e.a > e.a * 0),
    (">=", lambda e: e.i >= 3),
    ("==", lambda e: e.i == 1),
    ("!=", lambda e: e.i != 1),
    ("chained", lambda e: ((e.a * 2 + 1) @ e.b).relu().sum(dim=0)),
    # unary
    ("neg", lambda e: -e.a),
    ("pos", lambda e: +e.a),
    ("abs()", lambda e: abs(e.a)),
    ("invert", lambda e: ~e.mask),
    ("invert int", lambda e: ~e.i),
]


@pytest.mark.parametrize(("description", "case"), CASES, ids=[c[0] for c in CASES])
def test_remote_equals_local(session: Session, description: str, case: Case) -> None:
    local = case(session.local)
    pointer = case(session.remote)
    remote = pointer.get(reason=description, timeout_secs=TIMEOUT)
    assert_same(remote, local)


RANDOM_CASES: list[tuple[str, Case]] = [
    ("torch.rand", lambda e: e.torch.rand(2, 3)),
    ("torch.randn dtype", lambda e: e.torch.randn(4, dtype=torch.float64)),
    ("torch.randint", lambda e: e.torch.randint(0, 10, (5,))),
    ("torch.randperm", lambda e: e.torch.randperm(6)),
    ("torch.rand_like", lambda e: e.torch.rand_like(e.a)),
    ("bernoulli", lambda e: e.torch.bernoulli(e.a.sigmoid())),
    ("F.dropout", lambda e: e.F.dropout(e.a, p=0.5)),
]


@pytest.mark.parametrize(("description", "case"), RANDOM_CASES, ids=[c[0] for c in RANDOM_CASES])
def test_random_ops_match_shape_and_dtype(session: Session, description: str, case: Case) -> None:
    """The owner's RNG draws: only shape and dtype can match local torch."""
    local = case(session.local)
    remote = case(session.remote).get(reason=description, timeout_secs=TIMEOUT)
    assert isinstance(remote, torch.Tensor)
    assert remote.shape == local.shape
    assert remote.dtype == local.dtype


def test_randperm_is_a_permutation(session: Session) -> None:
    values = session.remote.torch.randperm(20).get(timeout_secs=TIMEOUT)
    assert sorted(values.tolist()) == list(range(20))


def test_number_pointer_feeds_another_op(session: Session) -> None:
    """An ``.item()`` result stays remote and can be an argument of the next op."""
    total = session.remote.a.sum().item()
    scaled = session.remote.v * total
    expected = session.local.v * session.local.a.sum().item()
    assert_same(scaled.get(timeout_secs=TIMEOUT), expected)


def test_in_place_on_a_peer_result_is_allowed(session: Session) -> None:
    """The scientist may mutate its own results (not the owner's objects)."""
    mine = session.remote.a.clone()
    mine.add_(1.0)
    mine[0, 0] = 100.0
    expected = session.local.a.clone() + 1.0
    expected[0, 0] = 100.0
    assert_same(mine.get(timeout_secs=TIMEOUT), expected)


def test_uploaded_tensor_combines_with_owner_data(session: Session) -> None:
    weights = torch.tensor([0.5, -1.0, 2.0])
    pointer = session.scientist.send(weights)
    result = (session.remote.a * pointer).sum(dim=1)
    assert_same(result.get(timeout_secs=TIMEOUT), (session.local.a * weights).sum(dim=1))


# -- errors in remote ops ---------------------------------------------------------------


@pytest.fixture
def secret_pair(signaling_url: str, tmp_path: Path) -> Iterator[tuple[sy.Duet, sy.Duet]]:
    owner, scientist = make_pair(signaling_url, tmp_path / "audit.jsonl")
    owner.store.send(torch.tensor([SECRET, 777.0, 4242.0, 31337.0]), tags=["secret"])
    owner.requests.add_handler(action="accept")
    yield owner, scientist
    close_pair(scientist, owner)


def _assert_reveals_nothing(text: str) -> None:
    for leak in ("12345", "777", "4242", "31337", "[4]", "(4,)", "size 4", "of size", "7, 7"):
        assert leak not in text, f"{leak!r} leaked in {text!r}"


def test_failed_op_error_on_result_and_derived(secret_pair: tuple[sy.Duet, sy.Duet]) -> None:
    _, scientist = secret_pair
    data = scientist.store["secret"]
    bad = data.reshape(7, 7)
    derived = (bad + 1).sum()
    for pointer in (bad, derived):
        with pytest.raises(RemoteError) as caught:
            pointer.get(reason="see", timeout_secs=TIMEOUT)
        assert caught.value.op == "torch.Tensor.reshape"
        assert "torch.Tensor.reshape" in str(caught.value)
        assert caught.value.error_type == "RuntimeError"
        _assert_reveals_nothing(str(caught.value))
    # the session keeps working after the failure
    assert data.sum().get(timeout_secs=TIMEOUT).item() == pytest.approx(SECRET + 777 + 4242 + 31337)


def test_failed_op_on_private_data_withholds_details(secret_pair: tuple[sy.Duet, sy.Duet]) -> None:
    _, scientist = secret_pair
    data = scientist.store["secret"]
    failures = [
        data @ scientist.torch.ones(3),  # shape mismatch would name the shapes
        data[10],  # index error would name the size
        data.view(3, 5),
        scientist.torch.cat([data, scientist.torch.ones(2, 2)]),
    ]
    for pointer in failures:
        with pytest.raises(RemoteError) as caught:
            pointer.get(timeout_secs=TIMEOUT)
        _assert_reveals_nothing(str(caught.value))
        assert "withheld" in str(caught.value)


def test_failed_op_on_public_data_explains(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    """Public inputs hide nothing, so the scientist gets torch's own message."""
    owner, scientist = duet_pair
    owner.store.send(torch.arange(4.0), tags=["pub"], public=True)
    with pytest.raises(RemoteError) as caught:
        scientist.store["pub"].reshape(7, 7).get(timeout_secs=TIMEOUT)
    assert "49" in str(caught.value) or "7, 7" in str(caught.value)


# -- allowlist enforcement --------------------------------------------------------------


@pytest.mark.parametrize(
    "attempt",
    [
        lambda p, t: p.numpy(),
        lambda p, t: p.storage(),
        lambda p, t: p.untyped_storage(),
        lambda p, t: p.data_ptr(),
        lambda p, t: p.register_hook(print),
        lambda p, t: p.share_memory_(),
        lambda p, t: t.load("/etc/passwd"),
        lambda p, t: t.save(p, "/tmp/x"),
        lambda p, t: t.from_file("/etc/passwd"),
        lambda p, t: t.empty(3),
        lambda p, t: t.manual_seed(0),
        lambda p, t: t.os.system("true"),
    ],
    ids=[
        "numpy", "storage", "untyped_storage", "data_ptr", "register_hook", "share_memory_",
        "torch.load", "torch.save", "torch.from_file", "torch.empty", "manual_seed", "os.system",
    ],
)  # fmt: skip
def test_pointer_side_refuses_early(session: Session, attempt: Callable[..., Any]) -> None:
    with pytest.raises(OperationNotAllowed):
        attempt(session.remote.a, session.scientist.torch)


def test_private_dunders_are_not_forwarded(session: Session) -> None:
    pointer = session.remote.a
    with pytest.raises(AttributeError):
        pointer._secret_attribute  # noqa: B018
    with pytest.raises(AttributeError):
        session.scientist.torch._C  # noqa: B018


def test_owner_narrowed_allowlist(signaling_url: str, tmp_path: Path) -> None:
    narrow = DEFAULT_ALLOWLIST.narrow(["torch.Tensor.sum", "torch.Tensor.item"])
    owner, scientist = make_pair(signaling_url, tmp_path / "audit.jsonl", allowlist=narrow)
    try:
        owner.store.send(torch.tensor([1.0, 2.0, 3.0]), tags=["x"], public=True)
        pointer = scientist.store["x"]
        assert pointer.sum().item().get(timeout_secs=TIMEOUT) == 6.0
        with pytest.raises(OperationNotAllowed):
            pointer.mean()
        with pytest.raises(OperationNotAllowed):
            pointer + 1
        with pytest.raises(OperationNotAllowed):
            scientist.torch.ones(3)
        # a raw action past the pointer's check is refused by the owner itself
        core = scientist._core
        core._allowlist["torch.Tensor.mean"] = "tensor"
        refused = pointer.mean()
        with pytest.raises(OperationNotAllowed):
            refused.get(timeout_secs=TIMEOUT)
    finally:
        close_pair(scientist, owner)


def test_unsendable_argument_fails_at_the_call(session: Session) -> None:
    """An argument the wire cannot carry is refused at once; queued ops are unaffected."""
    before = session.remote.a + 1
    with pytest.raises(TypeError, match="cannot be sent"):
        session.remote.a + object()
    with pytest.raises(TypeError, match="cannot be sent"):
        session.remote.a.add(2**70)
    after = session.remote.a * 2
    assert_same(before.get(timeout_secs=TIMEOUT), session.local.a + 1)
    assert_same(after.get(timeout_secs=TIMEOUT), session.local.a * 2)
