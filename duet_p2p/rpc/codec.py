"""The wire codec: every value that crosses the wire is encoded and decoded here, nowhere else.

The format is CBOR (RFC 8949) restricted to a closed set of types. Tensors and arrays travel
as RFC 8746 multi-dimensional arrays (tag 40) over typed arrays; the private tags below carry
what CBOR has no tag for. Each type has one encoder and each tag one decoder, both found in a
table, so adding a type means adding one function.

Decoding treats its input as hostile. It is iterative (no recursion to exhaust), checks every
declared length against the bytes that remain before allocating, counts items and depth as it
goes (see :class:`DecodeLimits`), accepts only the tags listed here, and raises nothing but
:class:`~duet_p2p.errors.ProtocolError`. Indefinite lengths, ``undefined``, other simple values
and bignums are refused; map keys are text or integers, never repeated.

Tensor data is not copied when encoding, except by the single join that builds the message
(and by ``contiguous()`` for non-contiguous inputs). Decoding copies it exactly once, into
memory the result owns: decoded tensors are writable and never alias the input buffer.

cbor2 is not used here: cbor2 6 decodes about twenty semantic tags into Python objects on its
own (regular expressions, MIME messages, datetimes, decimals, sets, IP addresses, shared
references), encodes sets, datetimes, UUIDs and tuple subclasses without consulting
``default``, and copies every byte string (and memoryview input) it touches.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from duet_p2p.errors import ProtocolError

__all__ = [
    "DecodeLimits",
    "ObjectRef",
    "decode",
    "encode",
    "encode_parts",
    "TAG_MULTIDIM_ARRAY",
    "TAG_TORCH",
    "TAG_OBJECT_REF",
    "TAG_TUPLE",
    "TAG_DTYPE",
    "TAG_SLICE",
    "TAG_ELLIPSIS",
    "TAG_COMPLEX",
    "TAG_BOOL_ARRAY",
    "TAG_BFLOAT16_ARRAY",
    "TAG_COMPLEX64_ARRAY",
    "TAG_COMPLEX128_ARRAY",
]

TAG_MULTIDIM_ARRAY = 40
"""RFC 8746: ``[shape, typed array]``, row-major. Alone it decodes to a ``numpy.ndarray``."""

# Private tags: unregistered numbers in the first-come-first-served range (32768 and up).
# Both ends of a connection run this module, so they only need to agree with each other.
TAG_TORCH = 41400
"""Wraps a tag-40 array: decode it as a ``torch.Tensor`` rather than a ``numpy.ndarray``."""
TAG_OBJECT_REF = 41401
"""Text: the ID of an object in the owner's store (:class:`ObjectRef`)."""
TAG_TUPLE = 41402
"""Array: decode as ``tuple`` (``torch.Size`` is sent as a tuple)."""
TAG_DTYPE = 41403
"""Text: a ``torch.dtype`` by name, e.g. ``"float32"``."""
TAG_SLICE = 41404
"""Array ``[start, stop, step]``, each an integer or null."""
TAG_ELLIPSIS = 41405
"""Null: ``...``."""
TAG_COMPLEX = 41406
"""Array ``[real, imag]`` of floats."""
# Typed arrays for element types RFC 8746 lacks; byte strings, little-endian, like its own.
TAG_BOOL_ARRAY = 41410
TAG_BFLOAT16_ARRAY = 41411
TAG_COMPLEX64_ARRAY = 41412
TAG_COMPLEX128_ARRAY = 41413

MAX_NDIM = 64
"""Most dimensions a tensor or array may have on the wire."""

_UINT64_LIMIT = 1 << 64
_REF_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds on one decoded message; breaking any of them raises ``ProtocolError``."""

    max_depth: int = 64
    """Deepest nesting of arrays, maps and tags (a tensor takes three or four levels)."""
    max_items: int = 1_000_000
    """Data items in the whole message: every value, map key and tag counts one."""
    max_bytes: int = 1 << 31
    """Size of the encoded message."""
    max_tensor_elements: int = 1 << 31
    """Elements in any one tensor or array."""
    borrow_buffers: bool = False
    """Let decoded arrays use the input's memory (no copy) where its layout allows. Only
    for a writable buffer that nothing else will reuse, such as a reassembled message."""

    def __post_init__(self) -> None:
        for name in ("max_depth", "max_items", "max_bytes", "max_tensor_elements"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"DecodeLimits.{name} must be a positive integer, not {value!r}")


_DEFAULT_LIMITS = DecodeLimits()


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """A reference to an object held in the owner's store, by its ID."""

    id: str

    def __post_init__(self) -> None:
        if type(self.id) is not str or not _REF_ID.fullmatch(self.id):
            raise ValueError(f"object IDs are 1-64 characters of [0-9A-Za-z_-], not {self.id!r}")


@dataclass(frozen=True, slots=True)
class _DType:
    """An element type the wire carries, and how numpy and torch hold it."""

    name: str
    tag: int
    """Little-endian typed-array tag used when encoding."""
    storage: np.dtype
    """How numpy holds it (bfloat16, unknown to numpy, is held as uint16)."""
    torch_dtype: torch.dtype

    @property
    def numpy_ok(self) -> bool:
        return self.name != "bfloat16"


_DTYPES = tuple(
    _DType(name, tag, np.dtype(storage).newbyteorder("="), getattr(torch, name))
    for name, tag, storage in (
        ("bool", TAG_BOOL_ARRAY, "|b1"),
        ("uint8", 64, "|u1"),
        ("int8", 72, "|i1"),
        ("int16", 77, "<i2"),
        ("int32", 78, "<i4"),
        ("int64", 79, "<i8"),
        ("uint16", 69, "<u2"),
        ("uint32", 70, "<u4"),
        ("uint64", 71, "<u8"),
        ("float16", 84, "<f2"),
        ("float32", 85, "<f4"),
        ("float64", 86, "<f8"),
        ("bfloat16", TAG_BFLOAT16_ARRAY, "<u2"),
        ("complex64", TAG_COMPLEX64_ARRAY, "<c8"),
        ("complex128", TAG_COMPLEX128_ARRAY, "<c16"),
    )
)
_BY_NAME = {d.name: d for d in _DTYPES}
_BY_TORCH = {d.torch_dtype: d for d in _DTYPES}
# Typed-array tag -> (layout of the bytes on the wire, element type). Big-endian and clamped
# RFC 8746 tags are accepted when decoding, never produced.
_TYPED: dict[int, tuple[np.dtype, _DType]] = {
    d.tag: (d.storage.newbyteorder("<"), d) for d in _DTYPES
}
_TYPED.update(
    (tag, (np.dtype(wire), _BY_NAME[name]))
    for tag, wire, name in (
        (65, ">u2", "uint16"),
        (66, ">u4", "uint32"),
        (67, ">u8", "uint64"),
        (68, "|u1", "uint8"),
        (73, ">i2", "int16"),
        (74, ">i4", "int32"),
        (75, ">i8", "int64"),
        (80, ">f2", "float16"),
        (81, ">f4", "float32"),
        (82, ">f8", "float64"),
    )
)


# ---------------------------------------------------------------------------------- encoding


def _head(major: int, n: int) -> bytes:
    """The initial bytes of a data item: major type and argument, in the shortest form."""
    mt = major << 5
    if n < 24:
        return bytes((mt | n,))
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return struct.pack(">BH", mt | 25, n)
    if n < 0x100000000:
        return struct.pack(">BI", mt | 26, n)
    return struct.pack(">BQ", mt | 27, n)


_INLINE_PAYLOAD = 1 << 16  # larger payloads are joined straight from their own memory


class _Encoder:
    """Builds one message: small pieces in a bytearray, large payloads by reference."""

    __slots__ = ("_buf", "_parts", "_max_depth")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._parts: list[bytes | bytearray | memoryview] = []
        self._max_depth = _DEFAULT_LIMITS.max_depth

    def head(self, major: int, n: int) -> None:
        if n < 24:
            self._buf.append(major << 5 | n)
        else:
            self._buf += _head(major, n)

    def raw(self, data: bytes) -> None:
        self._buf += data

    def payload(self, view: memoryview) -> None:
        """A byte string's contents; kept by reference when large (copied once, by join)."""
        if view.nbytes < _INLINE_PAYLOAD:
            self._buf += view
        else:
            self._parts.append(self._buf)
            self._parts.append(view)
            self._buf = bytearray()

    def getvalue(self) -> bytes:
        if not self._parts:
            return bytes(self._buf)
        return b"".join([*self._parts, self._buf])

    def open(self, depth: int, levels: int = 1) -> None:
        """Refuse nesting the peer would refuse (this also stops reference cycles)."""
        if depth + levels > self._max_depth:
            raise ValueError(f"cannot encode values nested deeper than {self._max_depth} levels")

    def item(self, obj: object, depth: int) -> None:
        fn = _ENCODERS.get(type(obj))
        if fn is None:
            fn = _find_encoder(type(obj))
        fn(self, obj, depth)


_Encode = Callable[[_Encoder, Any, int], None]
_ENCODERS: dict[type, _Encode] = {}


def _encodes(*types: type) -> Callable[[_Encode], _Encode]:
    def register(fn: _Encode) -> _Encode:
        for t in types:
            _ENCODERS[t] = fn
        return fn

    return register


def _find_encoder(cls: type) -> _Encode:
    """Subclasses use their nearest registered base (bool is registered on its own)."""
    for base in cls.__mro__[1:]:
        fn = _ENCODERS.get(base)
        if fn is not None:
            return fn
    raise TypeError(f"cannot encode an object of type {cls.__module__}.{cls.__qualname__}")


def encode(obj: object) -> bytes:
    """Serialize ``obj`` to CBOR.

    Raises ``TypeError`` for a type the wire does not carry and ``ValueError`` for a value it
    cannot (an integer beyond 64 bits, a sparse tensor, nesting deeper than 64 levels).
    """
    enc = _Encoder()
    enc.item(obj, 0)
    return enc.getvalue()


def encode_parts(obj: object) -> list[bytes | bytearray | memoryview]:
    """``encode(obj)`` as buffers whose concatenation is the message, without joining them.

    Large tensor and array payloads are views of the values' own memory: the caller copies
    them (or sends them before they can change). The same errors as ``encode``.
    """
    enc = _Encoder()
    enc.item(obj, 0)
    return [*enc._parts, enc._buf]


@_encodes(type(None))
def _encode_none(enc: _Encoder, obj: None, depth: int) -> None:
    enc.raw(b"\xf6")


@_encodes(bool)
def _encode_bool(enc: _Encoder, obj: bool, depth: int) -> None:
    enc.raw(b"\xf5" if obj else b"\xf4")


@_encodes(int)
def _encode_int(enc: _Encoder, obj: int, depth: int) -> None:
    if 0 <= obj < _UINT64_LIMIT:
        enc.head(0, obj)
    elif -_UINT64_LIMIT <= obj < 0:
        enc.head(1, -1 - obj)
    else:
        raise ValueError(f"integer {obj} is outside the range -2**64 .. 2**64-1 the wire carries")


@_encodes(float)
def _encode_float(enc: _Encoder, obj: float, depth: int) -> None:
    enc.raw(b"\xfb" + struct.pack(">d", obj))


@_encodes(str)
def _encode_str(enc: _Encoder, obj: str, depth: int) -> None:
    data = obj.encode("utf-8")
    enc.head(3, len(data))
    enc.raw(data)


@_encodes(bytes, bytearray, memoryview)
def _encode_bytes(enc: _Encoder, obj: bytes | bytearray | memoryview, depth: int) -> None:
    view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("cannot encode a non-contiguous memoryview")
    view = view.cast("B")
    enc.head(2, view.nbytes)
    enc.payload(view)


@_encodes(list)
def _encode_list(enc: _Encoder, obj: list[Any], depth: int) -> None:
    enc.open(depth)
    enc.head(4, len(obj))
    item = enc.item
    for value in obj:
        item(value, depth + 1)


@_encodes(tuple, torch.Size)
def _encode_tuple(enc: _Encoder, obj: tuple[Any, ...], depth: int) -> None:
    enc.open(depth, 2)
    enc.head(6, TAG_TUPLE)
    enc.head(4, len(obj))
    item = enc.item
    for value in obj:
        item(value, depth + 2)


@_encodes(dict)
def _encode_dict(enc: _Encoder, obj: dict[Any, Any], depth: int) -> None:
    enc.open(depth)
    enc.head(5, len(obj))
    item = enc.item
    for key, value in obj.items():
        if type(key) is not str and (not isinstance(key, str | int) or isinstance(key, bool)):
            raise TypeError(f"dict keys must be str or int, not {type(key).__qualname__}")
        item(key, depth + 1)
        item(value, depth + 1)


@_encodes(complex)
def _encode_complex(enc: _Encoder, obj: complex, depth: int) -> None:
    enc.open(depth, 2)
    enc.head(6, TAG_COMPLEX)
    enc.head(4, 2)
    _encode_float(enc, obj.real, depth)
    _encode_float(enc, obj.imag, depth)


@_encodes(slice)
def _encode_slice(enc: _Encoder, obj: slice, depth: int) -> None:
    parts = (obj.start, obj.stop, obj.step)
    for part in parts:
        if (
            part is not None
            and not isinstance(part, ObjectRef)
            and (not isinstance(part, int) or isinstance(part, bool))
        ):
            raise TypeError(
                f"slice bounds must be int, ObjectRef or None, not {type(part).__qualname__}"
            )
    enc.open(depth, 2)
    enc.head(6, TAG_SLICE)
    enc.head(4, 3)
    for part in parts:
        enc.item(part, depth + 2)


@_encodes(type(Ellipsis))
def _encode_ellipsis(enc: _Encoder, obj: object, depth: int) -> None:
    enc.open(depth)
    enc.head(6, TAG_ELLIPSIS)
    enc.raw(b"\xf6")


@_encodes(torch.dtype)
def _encode_dtype(enc: _Encoder, obj: torch.dtype, depth: int) -> None:
    info = _BY_TORCH.get(obj)
    if info is None:
        raise ValueError(f"cannot encode dtype {obj}: not one the wire carries")
    enc.open(depth)
    enc.head(6, TAG_DTYPE)
    _encode_str(enc, info.name, depth + 1)


@_encodes(ObjectRef)
def _encode_ref(enc: _Encoder, obj: ObjectRef, depth: int) -> None:
    enc.open(depth)
    enc.head(6, TAG_OBJECT_REF)
    _encode_str(enc, obj.id, depth + 1)


@_encodes(np.generic)
def _encode_numpy_scalar(enc: _Encoder, obj: np.generic, depth: int) -> None:
    """A numpy scalar (as numpy reductions return) travels as the Python scalar it holds."""
    value = obj.item()
    if isinstance(value, np.generic):
        raise TypeError(f"cannot encode a numpy scalar of dtype {obj.dtype}")
    enc.item(value, depth)


@_encodes(np.ma.MaskedArray)
def _refuse_masked(enc: _Encoder, obj: object, depth: int) -> None:
    raise TypeError("cannot encode a masked array: the mask would be lost")


def _encode_array_body(enc: _Encoder, arr: np.ndarray, info: _DType, depth: int) -> None:
    """Tag 40 over a typed array; ``arr`` must be C-contiguous and little-endian."""
    enc.head(6, TAG_MULTIDIM_ARRAY)
    enc.head(4, 2)
    enc.head(4, arr.ndim)
    for dim in arr.shape:
        enc.head(0, dim)
    enc.head(6, info.tag)
    view = memoryview(arr.reshape(-1).view(np.uint8))
    enc.head(2, view.nbytes)
    enc.payload(view)


def _wire_layout(arr: np.ndarray) -> np.ndarray:
    """The array, C-contiguous and little-endian (a no-op on little-endian hosts)."""
    return arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)


@_encodes(np.ndarray)
def _encode_ndarray(enc: _Encoder, obj: np.ndarray, depth: int) -> None:
    info = _BY_NAME.get(obj.dtype.name)
    if info is None or not info.numpy_ok or obj.dtype.kind not in "biufc":
        raise ValueError(f"cannot encode a numpy array of dtype {obj.dtype}")
    if obj.ndim > MAX_NDIM:
        raise ValueError(f"cannot encode an array with more than {MAX_NDIM} dimensions")
    enc.open(depth, 3)
    _encode_array_body(enc, _wire_layout(obj), info, depth)


@_encodes(torch.Tensor)
def _encode_tensor(enc: _Encoder, obj: torch.Tensor, depth: int) -> None:
    """The tensor's values only: no grad, no device, no subclass."""
    if obj.layout != torch.strided:
        raise ValueError(f"cannot encode a {obj.layout} tensor: convert it with .to_dense()")
    if obj.is_quantized:
        raise ValueError("cannot encode a quantized tensor: convert it with .dequantize()")
    if obj.is_meta:
        raise ValueError("cannot encode a meta tensor: it holds no data")
    info = _BY_TORCH.get(obj.dtype)
    if info is None:
        raise ValueError(f"cannot encode a tensor of dtype {obj.dtype}")
    if obj.dim() > MAX_NDIM:
        raise ValueError(f"cannot encode a tensor with more than {MAX_NDIM} dimensions")
    enc.open(depth, 4)
    t = obj.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if info.name == "bfloat16":
        t = t.view(torch.int16)
    enc.head(6, TAG_TORCH)
    _encode_array_body(enc, _wire_layout(t.numpy()), info, depth + 1)


# ---------------------------------------------------------------------------------- decoding


class _Flat:
    """A decoded typed array, waiting for the tag-40 shape around it; never returned."""

    __slots__ = ("array", "dtype")

    def __init__(self, array: np.ndarray, dtype: _DType) -> None:
        self.array = array
        self.dtype = dtype


_Decode = Callable[[Any, "int | None", DecodeLimits], object]
_TAG_DECODERS: dict[int, _Decode] = {}


def _decodes(*tags: int) -> Callable[[_Decode], _Decode]:
    def register(fn: _Decode) -> _Decode:
        for tag in tags:
            _TAG_DECODERS[tag] = fn
        return fn

    return register


def _typed_array_decoder(tag: int) -> _Decode:
    wire, info = _TYPED[tag]

    def decode_typed(value: Any, parent_tag: int | None, limits: DecodeLimits) -> _Flat:
        if type(value) is not memoryview:
            raise ProtocolError(f"typed array tag {tag} must hold a byte string")
        count, rest = divmod(value.nbytes, wire.itemsize)
        if rest:
            raise ProtocolError(
                f"typed array of {info.name}: {value.nbytes} bytes is not a whole number "
                f"of {wire.itemsize}-byte elements"
            )
        if count > limits.max_tensor_elements:
            raise ProtocolError(
                f"array of {count} elements exceeds the limit of {limits.max_tensor_elements}"
            )
        if info.name == "bool":  # any non-zero byte is True; torch expects exactly 0 or 1
            array = np.frombuffer(value, np.uint8) != 0
        elif limits.borrow_buffers and not value.readonly and wire == info.storage:
            array = np.frombuffer(value, wire)  # the caller handed the buffer over
        else:  # the one copy: into memory the result owns, aligned and writable
            array = np.frombuffer(value, wire).astype(info.storage)
        return _Flat(array, info)

    return decode_typed


_TAG_DECODERS.update((tag, _typed_array_decoder(tag)) for tag in _TYPED)


@_decodes(TAG_MULTIDIM_ARRAY)
def _decode_multidim(value: Any, parent_tag: int | None, limits: DecodeLimits) -> object:
    if type(value) is not list or len(value) != 2 or type(value[1]) is not _Flat:
        raise ProtocolError("tag 40 must hold [shape, typed array]")
    shape, flat = value
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise ProtocolError(f"array shape must be a list of at most {MAX_NDIM} integers")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= limits.max_tensor_elements:
            raise ProtocolError(f"bad array dimension {str(dim)[:40]!r}")
    count = math.prod(shape)
    if count != flat.array.size:
        raise ProtocolError(
            f"shape {shape} needs {count} elements but the typed array holds {flat.array.size}"
        )
    array = flat.array.reshape(shape)
    if parent_tag == TAG_TORCH:
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if flat.dtype.name == "bfloat16" else tensor
    if not flat.dtype.numpy_ok:
        raise ProtocolError(f"{flat.dtype.name} arrays are only accepted as torch tensors")
    return array


@_decodes(TAG_TORCH)
def _decode_torch(value: Any, parent_tag: int | None, limits: DecodeLimits) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ProtocolError(f"tag {TAG_TORCH} must hold a tag-40 array")
    return value


@_decodes(TAG_OBJECT_REF)
def _decode_ref(value: Any, parent_tag: int | None, limits: DecodeLimits) -> ObjectRef:
    if type(value) is not str or not _REF_ID.fullmatch(value):
        raise ProtocolError("bad object reference")
    return ObjectRef(value)


@_decodes(TAG_TUPLE)
def _decode_tuple(value: Any, parent_tag: int | None, limits: DecodeLimits) -> tuple[Any, ...]:
    if type(value) is not list:
        raise ProtocolError(f"tag {TAG_TUPLE} must hold an array")
    return tuple(value)


@_decodes(TAG_DTYPE)
def _decode_dtype(value: Any, parent_tag: int | None, limits: DecodeLimits) -> torch.dtype:
    info = _BY_NAME.get(value) if type(value) is str else None
    if info is None:
        raise ProtocolError(f"unknown dtype {str(value)[:40]!r}")
    return info.torch_dtype


@_decodes(TAG_SLICE)
def _decode_slice(value: Any, parent_tag: int | None, limits: DecodeLimits) -> slice:
    if (
        type(value) is not list
        or len(value) != 3
        or not all(part is None or type(part) is int or type(part) is ObjectRef for part in value)
    ):
        raise ProtocolError(
            f"tag {TAG_SLICE} must hold [start, stop, step] of integers, references or null"
        )
    return slice(*value)


@_decodes(TAG_ELLIPSIS)
def _decode_ellipsis(value: Any, parent_tag: int | None, limits: DecodeLimits) -> object:
    if value is not None:
        raise ProtocolError(f"tag {TAG_ELLIPSIS} must hold null")
    return Ellipsis


@_decodes(TAG_COMPLEX)
def _decode_complex(value: Any, parent_tag: int | None, limits: DecodeLimits) -> complex:
    if (
        type(value) is not list
        or len(value) != 2
        or not all(type(part) is float or type(part) is int for part in value)
    ):
        raise ProtocolError(f"tag {TAG_COMPLEX} must hold [real, imag]")
    return complex(value[0], value[1])


_ARRAY, _MAP, _TAG = 0, 1, 2
_NO_KEY = object()
_ARGUMENTS = {i: struct.Struct(f).unpack_from for i, f in ((25, ">H"), (26, ">I"), (27, ">Q"))}
_FLOATS = {i: struct.Struct(f).unpack_from for i, f in ((25, ">e"), (26, ">f"), (27, ">d"))}
_SIMPLE_VALUES = {20: False, 21: True, 22: None}


def decode(data: bytes | bytearray | memoryview, *, limits: DecodeLimits | None = None) -> object:
    """Deserialize one message from untrusted CBOR; raise ``ProtocolError`` if it is not one."""
    limits = limits or _DEFAULT_LIMITS
    try:
        view = memoryview(data)
        if not view.c_contiguous:
            raise ValueError("the buffer is not contiguous")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot decode {type(data).__name__}: {exc}") from None
    if view.nbytes > limits.max_bytes:
        raise ProtocolError(f"message of {view.nbytes} bytes exceeds {limits.max_bytes}")
    if not view.nbytes:
        raise ProtocolError("empty message")
    try:
        # Headers read fastest from bytes; payloads are sliced from the view without copying.
        buf = data if type(data) is bytes or type(data) is bytearray else view
        value, end = _decode(buf, view, limits)
    except ProtocolError:
        raise
    except Exception as exc:  # a malformed value that slipped past a check: still the peer's
        raise ProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from exc
    if end != view.nbytes:
        raise ProtocolError(f"{view.nbytes - end} bytes after the end of the message")
    return value


def _decode(
    buf: bytes | bytearray | memoryview, view: memoryview, limits: DecodeLimits
) -> tuple[object, int]:
    """Parse one data item from ``buf`` (the same bytes as ``view``); return it and its end."""
    end = view.nbytes
    pos = 0
    items = 0
    max_items = limits.max_items
    max_depth = limits.max_depth
    # Open containers and tags: [kind, items still expected, container, tag or pending key].
    stack: list[list[Any]] = []
    while True:
        if pos >= end:
            raise ProtocolError("truncated message")
        initial = buf[pos]
        pos += 1
        major = initial >> 5
        info = initial & 0x1F
        if info < 24:
            arg = info
        elif info == 24:
            if pos >= end:
                raise ProtocolError("truncated message")
            arg = buf[pos]
            pos += 1
        elif info < 28:
            size = 1 << (info - 24)
            if pos + size > end:
                raise ProtocolError("truncated message")
            arg = _ARGUMENTS[info](buf, pos)[0]
            pos += size
        elif info == 31:
            raise ProtocolError("indefinite-length items are not accepted")
        else:
            raise ProtocolError(f"reserved additional information {info}")
        items += 1
        if items > max_items:
            raise ProtocolError(f"message holds more than {max_items} items")

        if major == 0:
            value: Any = arg
        elif major == 1:
            value = -1 - arg
        elif major == 2 or major == 3:
            if arg > end - pos:
                raise ProtocolError(f"string of {arg} bytes but only {end - pos} remain")
            start = pos
            pos += arg
            if major == 3:
                try:
                    value = str(buf[start:pos], "utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError("text string is not valid UTF-8") from None
            elif stack and stack[-1][0] == _TAG and stack[-1][3] in _TYPED:
                value = view[start:pos]  # a typed array copies it once, into its own memory
            else:
                value = bytes(view[start:pos])
        elif major == 4 or major == 5:
            if arg == 0:
                value = [] if major == 4 else {}
            else:
                expected = arg if major == 4 else 2 * arg
                if expected > end - pos:
                    raise ProtocolError(
                        f"container of {arg} items but only {end - pos} bytes remain"
                    )
                if len(stack) >= max_depth:
                    raise ProtocolError(f"nesting deeper than {max_depth} levels")
                if major == 4:
                    stack.append([_ARRAY, expected, [], None])
                else:
                    stack.append([_MAP, expected, {}, _NO_KEY])
                continue
        elif major == 6:
            if arg not in _TAG_DECODERS:
                raise ProtocolError(f"CBOR tag {arg} is not accepted")
            if len(stack) >= max_depth:
                raise ProtocolError(f"nesting deeper than {max_depth} levels")
            if arg in _TYPED and not (
                len(stack) >= 2
                and stack[-1][0] == _ARRAY
                and stack[-1][1] == 1
                and len(stack[-1][2]) == 1
                and stack[-2][0] == _TAG
                and stack[-2][3] == TAG_MULTIDIM_ARRAY
            ):
                raise ProtocolError("a typed array is only accepted inside tag 40, after the shape")
            stack.append([_TAG, 1, None, arg])
            continue
        elif info in _FLOATS:
            value = _FLOATS[info](buf, pos - (1 << (info - 24)))[0]
        elif info in _SIMPLE_VALUES:
            value = _SIMPLE_VALUES[info]
        else:
            raise ProtocolError(f"simple value {arg} is not accepted")

        # Hand the finished value to the open containers, closing those it completes.
        while stack:
            top = stack[-1]
            kind = top[0]
            if kind == _ARRAY:
                top[2].append(value)
            elif kind == _MAP:
                if top[3] is _NO_KEY:
                    if type(value) is not str and type(value) is not int:
                        raise ProtocolError("map keys must be text or integers")
                    if value in top[2]:
                        raise ProtocolError(f"duplicate map key {str(value)[:40]!r}")
                    top[3] = value
                else:
                    top[2][top[3]] = value
                    top[3] = _NO_KEY
            else:
                stack.pop()
                parent = stack[-1] if stack else None
                parent_tag = parent[3] if parent is not None and parent[0] == _TAG else None
                value = _TAG_DECODERS[top[3]](value, parent_tag, limits)
                continue
            top[1] -= 1
            if top[1]:
                break
            stack.pop()
            value = top[2]
        else:
            return value, pos
