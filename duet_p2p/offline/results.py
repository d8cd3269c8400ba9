"""What a released job delivers, and how the scientist checks it before using any of it.

An output travels as its own bytes: our codec (:mod:`duet_p2p.rpc.codec`) over the map
``{"module": bool, "value": ...}`` with every map's keys in canonical order (sorted by their
encoded bytes), so the same value always encodes to the same bytes. The value is a tensor, a
numpy array, a Python number, bool, None, string or bytes, or lists, tuples and dicts of
these; a trained ``nn.Module`` travels as its declarative spec
(:func:`duet_p2p.modules.module_to_spec`) with ``module`` true, never as code.

A :class:`ResultBundle` carries a released job's outputs (name -> output bytes) with the
host's receipt (:class:`~duet_p2p.offline.receipt.Receipt`), which lists the SHA-256 of each
output's bytes. :func:`open_result` checks the receipt (the host's key and signature, the
job it is for, the bytes attested) and the output names against the job before it decodes
anything. A :class:`JobUpdate` tells the scientist where its job stands.

Reading trusts nothing: sizes are capped before decoding, keys and types are checked, and
every failure is an :class:`InvalidResult` (or, for the receipt, an ``InvalidReceipt``).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from duet_p2p.errors import DuetError, OperationNotAllowed, ProtocolError
from duet_p2p.modules import ModuleLimits, module_to_spec, spec_to_module
from duet_p2p.offline import receipt as job_receipt
from duet_p2p.offline import spec as job_spec
from duet_p2p.offline.lifecycle import InvalidTransition, JobState, parse_state
from duet_p2p.offline.receipt import Receipt
from duet_p2p.offline.spec import SignedJob
from duet_p2p.rpc import codec

__all__ = [
    "InvalidResult", "JobUpdate", "ResultBundle", "decode_output", "encode_output",
    "open_result",
]  # fmt: skip

VERSION = 1
MAX_DEPTH = 48
"""Deepest nesting of an output's values (a tensor takes a few levels more on the wire)."""
MAX_ITEMS = 1 << 24
"""Most values in one decoded output."""
MAX_REASON_CHARS = 2000
MAX_UPDATE_BYTES = 16 * 1024
MAX_RECEIPT_BYTES = job_receipt.MAX_BODY_BYTES + 256
_OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_OUTPUT_KEYS = frozenset({"module", "value"})
_BUNDLE_KEYS = frozenset({"v", "job_id", "receipt", "outputs"})
_UPDATE_KEYS = frozenset({"v", "job_id", "state", "reason", "at", "progress"})
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_DECODE_ERRORS = (ProtocolError, ValueError, TypeError, KeyError, OverflowError, RecursionError)


class InvalidResult(DuetError, ValueError):
    """A job's output, result bundle or update is malformed, oversize or does not match."""


def _sorted_map(fields: Mapping[Any, Any]) -> dict[Any, Any]:
    """``fields`` with its keys in canonical order (by their encoded bytes)."""
    return dict(sorted(fields.items(), key=lambda item: codec.encode(item[0])))


# -- one output ----------------------------------------------------------------------------


def encode_output(value: object) -> bytes:
    """The bytes of one released output (deterministic); InvalidResult if it cannot go."""
    module = isinstance(value, nn.Module)
    if module:
        try:
            value = module_to_spec(value)  # type: ignore[arg-type]
        except (OperationNotAllowed, ProtocolError, TypeError) as exc:
            raise InvalidResult(f"the model cannot be released: {exc}") from None
    prepared = _prepare(value, 0)
    try:
        return codec.encode(_sorted_map({"module": module, "value": prepared}))
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidResult(f"the output cannot be encoded: {exc}") from None


def _prepare(value: object, depth: int) -> Any:
    """A copy of ``value``'s containers with every dict's keys in canonical order; tensors
    and arrays are kept by reference. InvalidResult for a type an output cannot hold."""
    if depth > MAX_DEPTH:
        raise InvalidResult(f"an output nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, torch.Tensor | np.ndarray) or type(value) in _SCALARS:
        return value
    if isinstance(value, np.generic):
        return _prepare(value.item(), depth)
    if type(value) is list or type(value) is tuple:
        items = [_prepare(item, depth + 1) for item in value]  # type: ignore[attr-defined]
        return items if type(value) is list else tuple(items)
    if type(value) is dict:
        for key in value:  # type: ignore[attr-defined]
            if type(key) is not str and type(key) is not int:
                raise InvalidResult("the keys of an output's dicts are str or int")
        return _sorted_map({k: _prepare(v, depth + 1) for k, v in value.items()})  # type: ignore[attr-defined]
    if isinstance(value, nn.Module):
        raise InvalidResult("a model is released as an output of its own, not inside another")
    raise InvalidResult(f"an output cannot hold a {type(value).__qualname__}")


def decode_output(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int,
    module_limits: ModuleLimits | None = None,
) -> Any:
    """The value in one output's bytes (a model rebuilt from its spec, within
    ``module_limits``); InvalidResult for anything but what ``encode_output`` makes."""
    size = _size(data, max_bytes, "an output")
    limits = codec.DecodeLimits(
        max_depth=MAX_DEPTH + 8, max_items=max(16, min(size, MAX_ITEMS)), max_bytes=max_bytes,
        max_tensor_elements=max(1, size),
    )  # fmt: skip
    fields = job_spec.decode(data, limits=limits, error=InvalidResult)  # type: ignore[arg-type]
    if type(fields) is not dict or set(fields) != _OUTPUT_KEYS:
        raise InvalidResult(f"an output is a map of exactly {sorted(_OUTPUT_KEYS)}")
    module, value = fields["module"], fields["value"]
    if type(module) is not bool:
        raise InvalidResult("an output's module flag is a bool")
    _check_value(value)
    if not module:
        return value
    if type(value) is not dict:
        raise InvalidResult("a released model is a module spec (a map)")
    try:
        return spec_to_module(value, limits=module_limits)
    except (*_DECODE_ERRORS, RuntimeError, OperationNotAllowed) as exc:
        raise InvalidResult(f"the released model is refused: {str(exc)[:300]}") from None


def _check_value(value: object) -> None:
    """InvalidResult unless ``value`` holds only what an output may (no references,
    slices, dtypes or ellipses, which only make sense in a plan)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) in _SCALARS or type(item) is torch.Tensor or type(item) is np.ndarray:
            continue
        if type(item) is list or type(item) is tuple:
            stack.extend(item)  # type: ignore[arg-type]
        elif type(item) is dict:
            stack.extend(item.values())  # type: ignore[attr-defined]
        else:
            raise InvalidResult(f"an output cannot hold a {type(item).__qualname__}")


def _size(data: object, max_bytes: int, what: str) -> int:
    if type(max_bytes) is not int or max_bytes < 1:
        raise ValueError("max_bytes must be a positive int")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidResult(f"{what} is bytes")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise InvalidResult(f"{what} of {size} bytes is over the {max_bytes} accepted")
    return size


# -- the bundle ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultBundle:
    """A released job's outputs (name -> ``encode_output`` bytes) and the host's receipt
    (its wire form). Checked when built; open it with :func:`open_result`."""

    job_id: str
    receipt: bytes
    outputs: dict[str, bytes]

    def __post_init__(self) -> None:
        job_spec.hex32(self.job_id, "job_id", InvalidResult)
        if type(self.receipt) is not bytes or not 0 < len(self.receipt) <= MAX_RECEIPT_BYTES:
            raise InvalidResult(f"a receipt is 1 to {MAX_RECEIPT_BYTES} bytes")
        outputs = self.outputs
        if type(outputs) is not dict or not 0 < len(outputs) <= job_spec.MAX_OUTPUTS:
            raise InvalidResult(f"a result has 1 to {job_spec.MAX_OUTPUTS} outputs")
        for name, data in outputs.items():
            if type(name) is not str or not _OUTPUT_NAME.fullmatch(name):
                raise InvalidResult("an output name is an ASCII identifier of at most 64 chars")
            if type(data) is not bytes:
                raise InvalidResult(f"output {name} is bytes")
        object.__setattr__(self, "outputs", _sorted_map(outputs))

    def to_parts(self) -> list[bytes | bytearray | memoryview]:
        """``to_bytes()`` as buffers whose concatenation it is (large outputs by reference,
        not copied): feed them to ``duet_p2p.offline.mail.iter_mail``."""
        return codec.encode_parts(self._fields())

    def to_bytes(self) -> bytes:
        """Canonical CBOR ``{"v": 1, "job_id", "receipt", "outputs"}``."""
        return codec.encode(self._fields())

    def _fields(self) -> dict[str, Any]:
        fields = {"v": VERSION, "job_id": self.job_id, "receipt": self.receipt}
        return _sorted_map({**fields, "outputs": self.outputs})

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, max_bytes: int) -> ResultBundle:
        """Parse a bundle (strict; InvalidResult). Nothing in it is verified yet."""
        _size(data, max_bytes, "a result")
        limits = codec.DecodeLimits(
            max_depth=3, max_items=16 + 2 * job_spec.MAX_OUTPUTS, max_bytes=max_bytes,
            max_tensor_elements=1,
        )  # fmt: skip
        fields = job_spec.decode(data, limits=limits, error=InvalidResult)  # type: ignore[arg-type]
        if type(fields) is not dict or set(fields) != _BUNDLE_KEYS:
            raise InvalidResult(f"a result is a map of exactly {sorted(_BUNDLE_KEYS)}")
        if type(fields["v"]) is not int or fields["v"] != VERSION:
            raise InvalidResult(f"unknown result version (this one reads version {VERSION})")
        return cls(fields["job_id"], fields["receipt"], fields["outputs"])

    def __repr__(self) -> str:
        return f"<ResultBundle of job {self.job_id}: {', '.join(self.outputs)}>"


def open_result(
    bundle: ResultBundle,
    signed_job: SignedJob,
    *,
    host_id: str,
    max_bytes: int,
    module_limits: ModuleLimits | None = None,
) -> tuple[Receipt, dict[str, Any]]:
    """The verified receipt and the decoded outputs of ``bundle``, a result of
    ``signed_job`` from host ``host_id``. Before anything is decoded: the bundle is for this
    job, carries exactly the outputs it declared, and the receipt is the host's (its key
    hashes to ``host_id``, its signature holds), for this job, and attests these very bytes.
    InvalidResult or InvalidReceipt otherwise; each output is at most ``max_bytes``."""
    if not isinstance(bundle, ResultBundle) or not isinstance(signed_job, SignedJob):
        raise TypeError("open_result takes a ResultBundle and the SignedJob it answers")
    spec = signed_job.spec
    if not hmac.compare_digest(bundle.job_id, spec.job_id):
        raise InvalidResult(f"the result is for job {bundle.job_id}, not {spec.job_id}")
    if set(bundle.outputs) != set(spec.outputs):
        missing = sorted(set(spec.outputs) - set(bundle.outputs))
        extra = sorted(set(bundle.outputs) - set(spec.outputs))
        raise InvalidResult(
            f"the result's outputs are not the job's (missing: {missing}, extra: {extra})"
        )
    total = sum(len(data) for data in bundle.outputs.values())
    if total > spec.max_result_bytes:
        raise InvalidResult(f"the results are {total} bytes; the job allowed "
                            f"{spec.max_result_bytes}")  # fmt: skip
    receipt = Receipt.from_wire(bundle.receipt)
    receipt.verify(host_id, signed_job, bundle.outputs)
    for name, data in bundle.outputs.items():
        _size(data, max_bytes, f"output {name}")
    values: dict[str, Any] = {}
    for name, data in bundle.outputs.items():
        try:
            values[name] = decode_output(data, max_bytes=max_bytes, module_limits=module_limits)
        except InvalidResult as exc:
            raise InvalidResult(f"output {name}: {exc}") from None
    return receipt, values


# -- progress and state --------------------------------------------------------------------


@dataclass(frozen=True)
class JobUpdate:
    """Where a job stands, as its host tells its scientist: the state, why, when, and the
    steps done of the total (0 when unknown). ``reason`` is the host's text: show it through
    ``duet_p2p.text``."""

    job_id: str
    state: str
    reason: str
    at: float
    progress: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        put = object.__setattr__
        job_spec.hex32(self.job_id, "job_id", InvalidResult)
        try:
            put(self, "state", parse_state(self.state))
        except InvalidTransition as exc:
            raise InvalidResult(str(exc)) from None
        if type(self.reason) is not str or len(self.reason) > MAX_REASON_CHARS:
            raise InvalidResult(f"a reason is text of at most {MAX_REASON_CHARS} characters")
        try:
            self.reason.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidResult("a reason is not valid Unicode") from None
        put(self, "at", job_spec.timestamp(self.at, "at", InvalidResult))
        progress = self.progress
        if (
            type(progress) not in (tuple, list)
            or len(progress) != 2
            or not all(type(n) is int and 0 <= n <= job_spec.MAX_COUNT for n in progress)
            or (progress[1] and progress[0] > progress[1])
        ):
            raise InvalidResult("progress is (steps done, total steps or 0), ints >= 0")
        put(self, "progress", tuple(progress))

    def to_bytes(self) -> bytes:
        """Canonical CBOR ``{"v": 1, "job_id", "state", "reason", "at", "progress"}``."""
        fields = {
            "v": VERSION, "job_id": self.job_id, "state": str(self.state.value),  # type: ignore[attr-defined]
            "reason": self.reason, "at": self.at, "progress": list(self.progress),
        }  # fmt: skip
        return job_spec.canonical_bytes(fields, error=InvalidResult)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> JobUpdate:
        """Parse an update (strict, canonical form only; InvalidResult)."""
        _size(data, MAX_UPDATE_BYTES, "a job update")
        limits = codec.DecodeLimits(
            max_depth=3, max_items=32, max_bytes=MAX_UPDATE_BYTES, max_tensor_elements=1
        )
        fields = job_spec.decode(bytes(data), limits=limits, error=InvalidResult)
        if type(fields) is not dict or set(fields) != _UPDATE_KEYS:
            raise InvalidResult(f"a job update is a map of exactly {sorted(_UPDATE_KEYS)}")
        if type(fields["v"]) is not int or fields["v"] != VERSION:
            raise InvalidResult(f"unknown update version (this one reads version {VERSION})")
        state, at, progress = fields["state"], fields["at"], fields["progress"]
        if type(state) is not str or type(at) is not float or type(progress) is not list:
            raise InvalidResult("a job update's state is text, at a float, progress a list")
        update = cls(fields["job_id"], state, fields["reason"], at, tuple(progress))
        if update.to_bytes() != bytes(data):
            raise InvalidResult("a job update is not in canonical form")
        return update

    @property
    def job_state(self) -> JobState:
        return self.state  # type: ignore[return-value]
