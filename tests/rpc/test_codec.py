"""The wire codec: round trips for every carried type, and hostile input refused cleanly."""

from __future__ import annotations

import datetime
import decimal
import fractions
import math
import struct
import time
import tracemalloc
import uuid
import warnings
from typing import Any

import cbor2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duet_p2p.errors import ProtocolError
from duet_p2p.rpc import codec
from duet_p2p.rpc.codec import DecodeLimits, ObjectRef, decode, encode

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TORCH_DTYPES = [
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]
NUMPY_DTYPES = [name for name in TORCH_DTYPES if name != "bfloat16"]


def random_array(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random values of a numpy dtype (bfloat16 is drawn as float32)."""
    rng = np.random.default_rng(seed)
    if name == "bool":
        values = rng.integers(0, 2, shape).astype(bool)
    elif name in ("bfloat16", "float16", "float32", "float64"):
        values = rng.standard_normal(shape).astype("float32" if name == "bfloat16" else name)
    elif name.startswith("complex"):
        values = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(name)
    else:
        info = np.iinfo(name)
        values = rng.integers(info.min, info.max, shape, dtype=name, endpoint=True)
    return np.asarray(values)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    tensor = torch.from_numpy(random_array(name, shape, seed))
    return tensor.to(torch.bfloat16) if name == "bfloat16" else tensor


def tensor_bits(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return np.ascontiguousarray(t.numpy()).tobytes()


def same(a: Any, b: Any) -> bool:
    """Equal values of exactly the same types, all the way down (1 is not True here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def tagged(tag: int, value: Any) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(tag, value))


def raw_array(shape: Any, tag: int, payload: Any, *, as_torch: bool = False) -> bytes:
    """A tag-40 array built by hand, for inputs our own encoder would never produce."""
    value = cbor2.CBORTag(40, [shape, cbor2.CBORTag(tag, payload)])
    return cbor2.dumps(cbor2.CBORTag(codec.TAG_TORCH, value) if as_torch else value)


def refused(data: bytes | bytearray | memoryview, match: str | None = None, **limits: int) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(data, limits=DecodeLimits(**limits) if limits else None)


# ------------------------------------------------------------------------- tensors and arrays


@st.composite
def tensor_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor to send, its values as a fresh contiguous tensor)."""
    name = draw(st.sampled_from(TORCH_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    seed = draw(st.integers(0, 2**32 - 1))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
    if layout == "transposed" and len(shape) >= 2:
        tensor = random_tensor(name, shape[::-1], seed).permute(*reversed(range(len(shape))))
    elif layout == "strided" and shape:
        tensor = random_tensor(name, (*shape[:-1], shape[-1] * 2 + 1), seed)[..., 1::2]
    elif layout == "expanded" and shape:
        tensor = random_tensor(name, (*shape[:-1], 1), seed).expand(shape)
    else:
        tensor = random_tensor(name, shape, seed)
    assert tuple(tensor.shape) == shape
    return tensor, tensor.clone(memory_format=torch.contiguous_format)


@FAST
@given(tensor_cases())
def test_tensors_round_trip_bit_for_bit(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    tensor, expected = case
    out = decode(encode(tensor))
    assert type(out) is torch.Tensor
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert out.is_contiguous() and not out.requires_grad
    assert tensor_bits(out) == tensor_bits(expected)


@FAST
@given(
    st.sampled_from(NUMPY_DTYPES),
    st.lists(st.integers(0, 5), max_size=4).map(tuple),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_numpy_arrays_round_trip(name: str, shape: tuple[int, ...], seed: int, flip: bool) -> None:
    array = random_array(name, shape, seed)
    if flip and array.ndim:
        array = array[..., ::-1]  # negative strides
    out = decode(encode(array))
    assert type(out) is np.ndarray
    assert out.dtype == array.dtype and out.shape == array.shape
    assert out.flags.c_contiguous and out.flags.writeable
    assert out.tobytes() == np.ascontiguousarray(array).tobytes()


def test_big_endian_numpy_array_is_sent_little_endian() -> None:
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    out = decode(encode(array))
    assert out.dtype == np.dtype("float32") and out.dtype.isnative
    assert np.array_equal(out, array)


def test_tensor_values_only_no_grad() -> None:
    weight = torch.nn.Parameter(torch.randn(3, 2))
    out = decode(encode(weight))
    assert type(out) is torch.Tensor and not out.requires_grad
    assert torch.equal(out, weight.detach())
    conj = torch.tensor([1 + 2j, 3 - 4j]).conj()
    assert torch.equal(decode(encode(conj)), conj.resolve_conj())
    neg = torch.tensor([1 + 2j]).conj().imag  # a view with the negative bit set
    assert torch.equal(decode(encode(neg)), neg.resolve_neg())


def test_decoded_tensors_are_writable_and_own_their_memory() -> None:
    tensor = torch.arange(1000, dtype=torch.float32)
    data = bytearray(encode({"t": tensor, "a": tensor.numpy()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when wrapping a read-only buffer
        out = decode(memoryview(data))
    data[:] = bytes(len(data))  # the transport reuses its buffer
    assert torch.equal(out["t"], tensor) and np.array_equal(out["a"], tensor.numpy())
    out["t"] += 1
    out["a"] += 1
    assert out["t"][0] == 1 and out["a"][0] == 1


def test_bool_arrays_are_normalised_to_zero_and_one() -> None:
    out = decode(raw_array([3], codec.TAG_BOOL_ARRAY, b"\x00\x02\xff", as_torch=True))
    assert out.tolist() == [False, True, True]
    assert out.view(torch.uint8).tolist() == [0, 1, 1]


def test_big_endian_typed_arrays_are_accepted() -> None:
    payload = struct.pack(">3f", 1.5, -2.0, 3.25)
    out = decode(raw_array([3], 81, payload, as_torch=True))
    assert out.dtype == torch.float32 and out.tolist() == [1.5, -2.0, 3.25]
    out = decode(raw_array([1, 2], 75, struct.pack(">2q", -(2**62), 7)))
    assert out.dtype == np.dtype("int64") and out.tolist() == [[-(2**62), 7]]


def test_arrays_are_rfc_8746_for_other_decoders() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    seen = cbor2.loads(encode(array), tag_hook=lambda tag, immutable: (tag.tag, tag.value))
    assert seen == (40, ((2, 3), (85, array.tobytes())))  # cbor2 hands tag contents immutable
    seen = cbor2.loads(encode(torch.zeros(2, dtype=torch.int64)), tag_hook=lambda t, i: t.tag)
    assert seen == codec.TAG_TORCH


def quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated, still possible
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: torch.eye(3).to_sparse(), "sparse"),
        (quantized, "quantized"),
        (lambda: torch.empty(2, device="meta"), "meta"),
        (lambda: torch.zeros(2, dtype=torch.float8_e4m3fn), "dtype"),
    ],
    ids=["sparse", "quantized", "meta", "float8"],
)
def test_tensors_the_wire_cannot_carry_are_refused(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode(make())


@pytest.mark.parametrize(
    "array", [np.array(["a"]), np.array([object()]), np.zeros(2, "datetime64[s]")]
)
def test_numpy_arrays_of_other_dtypes_are_refused(array: np.ndarray) -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode(array)


def test_masked_arrays_are_refused() -> None:
    with pytest.raises(TypeError, match="masked"):
        encode(np.ma.masked_array([1, 2], mask=[0, 1]))


# -------------------------------------------------------------------------- everything else

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.complex_numbers(allow_nan=False),
    st.builds(ObjectRef, st.from_regex(r"[0-9a-f-]{1,64}", fullmatch=True)),
    st.sampled_from([torch.float32, torch.bfloat16, torch.bool, torch.complex128, torch.uint8]),
    st.builds(slice, *[st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)) for _ in range(3)]),
    st.just(Ellipsis),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-100, 100)), inner, max_size=5),
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(values)
def test_values_round_trip_with_their_types(value: Any) -> None:
    assert same(decode(encode(value)), value)


def test_torch_size_travels_as_a_tuple() -> None:
    assert same(decode(encode(torch.Size([2, 3]))), (2, 3))


def test_numpy_scalars_travel_as_python_scalars() -> None:
    value = [np.float32(1.5), np.int64(-3), np.bool_(True), np.complex128(1j)]
    assert same(decode(encode(value)), [1.5, -3, True, 1j])


def test_plain_data_interoperates_with_cbor2() -> None:
    value = {"a": [1, -2, 2.5, None, True, "x", b"\x00"], 3: {"b": []}}
    assert cbor2.loads(encode(value)) == value
    assert same(decode(cbor2.dumps(value)), value)


@pytest.mark.parametrize(
    "value, error, message",
    [
        ({1, 2}, TypeError, "set"),
        (datetime.datetime(2020, 1, 1), TypeError, "datetime"),
        (decimal.Decimal(1), TypeError, "Decimal"),
        (fractions.Fraction(1, 2), TypeError, "Fraction"),
        (uuid.UUID(int=1), TypeError, "UUID"),
        (object(), TypeError, "object"),
        ([1, {"k": lambda: 0}], TypeError, "function"),
        ({(1, 2): 3}, TypeError, "dict keys"),
        ({True: 3}, TypeError, "dict keys"),
        (slice(1.5), TypeError, "slice"),
        (2**64, ValueError, "range"),
        (-(2**64) - 1, ValueError, "range"),
        (torch.float8_e5m2, ValueError, "dtype"),
    ],
)
def test_values_the_wire_cannot_carry_are_refused(value: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        encode(value)


def test_object_ids_are_validated() -> None:
    for bad in ["", "a" * 65, "../etc", "a b", "ü"]:
        with pytest.raises(ValueError):
            ObjectRef(bad)
        refused(tagged(codec.TAG_OBJECT_REF, bad), "object reference")
    refused(tagged(codec.TAG_OBJECT_REF, 5), "object reference")


def test_nesting_the_peer_would_refuse_is_refused_when_encoding() -> None:
    value: Any = 0
    for _ in range(64):
        value = [value]
    assert decode(encode(value)) == value
    with pytest.raises(ValueError, match="deeper"):
        encode([value])
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="deeper"):
        encode(cycle)


def test_large_payloads_are_copied_once() -> None:
    tensor = torch.ones(2_000_000)  # 8 MB
    tracemalloc.start()
    try:
        data = encode(tensor)
        encode_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = decode(data)
        decode_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert torch.equal(out, tensor)
    assert encode_peak < 1.1 * tensor.nbytes, encode_peak  # the message itself, nothing more
    assert decode_peak < 1.1 * tensor.nbytes, decode_peak  # the tensor itself, nothing more


# -------------------------------------------------------------------------- hostile input


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None)
@given(values, st.data())
def test_corrupted_messages_decode_or_raise_protocol_error(value: Any, data: st.DataObject) -> None:
    message = bytearray(encode([value, torch.arange(4.0), np.arange(3)]))
    for _ in range(data.draw(st.integers(1, 4))):
        message[data.draw(st.integers(0, len(message) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode(message)
    except ProtocolError:
        pass


def test_every_truncation_is_refused() -> None:
    message = encode({"a": [1, 2.5, "text", b"bytes", (3,)], "t": torch.arange(3.0)})
    for cut in range(len(message)):
        refused(message[:cut])
    refused(message + b"\x00", "after the end")


@pytest.mark.parametrize(
    "prefix",
    [b"\x81", b"\xa1\x00", b"\xd9\xa1\xba"],  # arrays, maps, tuple tags
    ids=["arrays", "maps", "tags"],
)
def test_deep_nesting_bomb_is_refused_fast(prefix: bytes) -> None:
    start = time.perf_counter()
    refused(prefix * 1_000_000 + b"\x00", "nesting deeper than 64")
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "head",
    [b"\x5b", b"\x7b", b"\x9b", b"\xbb"],  # bytes, text, array, map of 2**63-ish length
    ids=["bytes", "text", "array", "map"],
)
def test_huge_declared_lengths_are_refused_without_allocating(head: bytes) -> None:
    data = head + struct.pack(">Q", 2**63 + 5) + b"\x00" * 16
    tracemalloc.start()
    try:
        refused(data, "remain")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000


def test_item_and_size_limits() -> None:
    refused(encode(list(range(200))), "more than 100 items", max_items=100)
    refused(encode({"k": [[]] * 60}), "more than 50 items", max_items=50)
    refused(encode(b"x" * 200), "exceeds 100", max_bytes=100)
    assert decode(encode(list(range(99))), limits=DecodeLimits(max_items=100)) == list(range(99))
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            DecodeLimits(max_depth=bad)


@pytest.mark.parametrize(
    "tag, value",
    [
        (0, "2020-01-01T00:00:00Z"),
        (1, 1_600_000_000),
        (2, b"\x01" * 100),
        (3, b"\x01"),
        (4, [-2, 12345]),
        (5, [1, 3]),
        (21, b"x"),
        (24, b"\x01"),
        (25, 0),
        (28, [1]),
        (29, 0),
        (30, [1, 2]),
        (32, "http://x"),
        (35, "(a+)+$"),
        (36, "MIME-Version: 1.0\n\nx"),
        (37, b"\x00" * 16),
        (41, [1, 2]),
        (52, b"\x7f\x00\x00\x01"),
        (258, [1, 2]),
        (260, b"\x7f\x00\x00\x01"),
        (261, {b"\x7f": 8}),
        (1004, "2020-01-01"),
        (1040, [[2], [1, 2]]),
        (55799, [1]),
        (codec.TAG_TORCH - 1, 0),
    ],
)
def test_tags_outside_the_protocol_are_refused(tag: int, value: Any) -> None:
    refused(tagged(tag, value), f"tag {tag} is not accepted")
    refused(cbor2.dumps({"nested": [cbor2.CBORTag(tag, value)]}), f"tag {tag} is not accepted")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xf7", "simple value 23"),  # undefined
        (b"\xe0", "simple value 0"),
        (b"\xf8\x20", "simple value 32"),
        (b"\x9f\x01\xff", "indefinite"),
        (b"\x5f\x41\x00\xff", "indefinite"),
        (b"\xff", "indefinite"),
        (b"\x1c", "reserved"),
        (b"", "empty"),
        (b"\x62\xc3\x28", "UTF-8"),
        (b"\xa2\x61a\x01\x61a\x02", "duplicate map key"),
        (b"\xa1\xf9\x3c\x00\x01", "map keys"),
        (b"\xa1\x41k\x01", "map keys"),
        (b"\xa1\xf5\x01", "map keys"),
        (b"\xa1\x81\x00\x01", "map keys"),
    ],
)
def test_malformed_items_are_refused(data: bytes, message: str) -> None:
    refused(data, message)


def test_non_bytes_input_is_refused() -> None:
    for data in ["text", 5, None, np.zeros((2, 2))[:, 0], memoryview(encode([1, 2, 3]))[::2]]:
        refused(data)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data, message",
    [
        (raw_array([3], 85, b"\x00" * 8), "needs 3 elements"),
        (raw_array([2], 85, b"\x00" * 7), "whole number"),
        (raw_array([-1], 85, b""), "dimension"),
        (raw_array([1.0], 85, b"\x00" * 4), "dimension"),
        (raw_array([True], 85, b"\x00" * 4), "dimension"),
        (raw_array(2, 85, b"\x00" * 8), "shape"),
        (raw_array([1] * 65, 85, b"\x00" * 4), "shape"),
        (raw_array([2], 85, "text"), "byte string"),
        (raw_array([1], codec.TAG_BFLOAT16_ARRAY, b"\x00\x00"), "only accepted as torch"),
        (tagged(40, [[2], [1, 2]]), "tag 40 must hold"),
        (tagged(40, [[2], cbor2.CBORTag(85, b"\x00" * 8), 0]), "typed array is only accepted"),
        (tagged(85, b"\x00" * 4), "typed array is only accepted"),
        (cbor2.dumps([[1], cbor2.CBORTag(85, b"\x00" * 4)]), "typed array is only accepted"),
        (tagged(codec.TAG_TORCH, [1, 2]), "must hold a tag-40 array"),
        (tagged(codec.TAG_DTYPE, "float128"), "unknown dtype"),
        (tagged(codec.TAG_DTYPE, 3), "unknown dtype"),
        (tagged(codec.TAG_SLICE, [1.5, None, None]), "start, stop, step"),
        (tagged(codec.TAG_SLICE, [1, 2]), "start, stop, step"),
        (tagged(codec.TAG_ELLIPSIS, 0), "null"),
        (tagged(codec.TAG_COMPLEX, ["1", 2.0]), "real, imag"),
        (tagged(codec.TAG_TUPLE, {"a": 1}), "array"),
    ],
)
def test_malformed_tagged_values_are_refused(data: bytes, message: str) -> None:
    refused(data, message)


def test_element_count_limit() -> None:
    data = encode(torch.zeros(11))
    refused(data, "exceeds the limit of 10", max_tensor_elements=10)
    assert decode(data, limits=DecodeLimits(max_tensor_elements=11)).shape == (11,)
    refused(raw_array([0, 2**40], 85, b""), "dimension")  # no elements, absurd shape
    refused(encode(np.zeros((4, 4), np.uint8)), "exceeds the limit", max_tensor_elements=15)
