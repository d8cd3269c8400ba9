"""A job as a document the scientist signs: a recorded plan, named inputs, declared outputs.

A job asks a standing host to run a recorded plan later: the plan in its wire form (the
``program``), which of the host's datasets (by tag) each plan input is bound to, which
plan outputs the scientist wants released and under which names, a reason, resource
limits and a deadline. It names its scientist (``client_id``) and its host (``host_id``),
and carries a random ``job_id`` and ``nonce``.

The spec has one encoding, its canonical bytes: our CBOR codec over maps whose keys are
sorted by their encoded bytes (the RFC 8949 deterministic order), times and
``max_seconds`` always floats. Equal specs encode to the same bytes and ``hash()`` (SHA-256
of them) names a job. The scientist signs ``[b"duet_p2p job v1", sha256(spec)]`` (each part
length-prefixed) with its Ed25519 identity key; the key must hash to ``client_id``.

On the wire a signed job is the canonical CBOR map ``{"v": 1, "body": <spec bytes>,
"key": <32 bytes>, "sig": <64 bytes>}``. Reading one trusts nothing: sizes are capped
before decoding, unknown and missing fields are refused, every field is checked, a body or
envelope not in canonical form is refused and the signature is checked; every failure is
an :class:`InvalidJob`.

Ops are not interpreted here: the host checks the plan against its allowlist at review. A
program holds no data: its constants are numbers, strings, bytes, dtypes, slices and object
references, never tensors. Text is stored as signed; show it through ``duet_p2p.text``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from duet_p2p.errors import DuetError, ProtocolError
from duet_p2p.identity import KEY_BYTES, SIGNATURE_BYTES, Identity, id_of
from duet_p2p.rpc import codec
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.messages import MAX_ARGS
from duet_p2p.rpc.plan_spec import MAX_NAME_CHARS, MAX_STEPS, parse_plan

__all__ = [
    "CONTEXT", "InvalidJob", "JobSpec", "SignedJob", "canonical", "canonical_bytes",
    "pack_envelope", "signed_message", "unpack_envelope", "verify_signature",
]  # fmt: skip

VERSION = 1
CONTEXT = b"duet_p2p job v1"
NONCE_BYTES = 16
MAX_REASON_CHARS = 4000
MAX_TAG_CHARS = 200
MAX_OUTPUTS = MAX_ARGS
MAX_PROGRAM_ITEMS = 200_000
"""Values in one program (every map key, list item and scalar counts one)."""
MAX_VALUE_DEPTH = 32
MAX_STRING_CHARS = 100_000
MAX_BODY_BYTES = 1 << 20
"""Largest canonical spec."""
MAX_WIRE_BYTES = MAX_BODY_BYTES + 256
MAX_JOB_SECONDS = 7 * 86400.0
MAX_LIFETIME_SECONDS = 366 * 86400.0
"""Longest time from a job's creation to its deadline."""
MAX_TIME = float(1 << 40)
MAX_COUNT = (1 << 63) - 1

_HEX32 = re.compile(r"[0-9a-f]{32}")
_PLAN_ID = re.compile(r"[A-Za-z0-9]{1,64}")
_OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_PROGRAM_KEYS = frozenset({"name", "inputs", "outputs", "steps"})
_ENVELOPE_KEYS = frozenset({"v", "body", "key", "sig"})
_FIELDS = (
    "job_id", "client_id", "host_id", "program", "inputs", "outputs", "reason", "max_seconds",
    "max_result_elements", "max_result_bytes", "deadline", "created_at", "nonce",
)  # fmt: skip
_PARSE_ERRORS = (ProtocolError, ValueError, TypeError, KeyError, OverflowError, RecursionError)


class InvalidJob(DuetError, ValueError):
    """A job document is malformed, oversize, not canonical, or its signature fails."""


# -- canonical encoding (shared with receipts) ------------------------------------------


def canonical(value: object, *, error: type[DuetError] = InvalidJob) -> Any:
    """A checked deep copy of ``value`` whose maps have their keys in canonical order.

    Only the codec's plain types are accepted (None, bool, int, float but NaN, complex,
    str, bytes, list, tuple, dict with text keys, ObjectRef, slice, Ellipsis, torch.dtype),
    at most ``MAX_VALUE_DEPTH`` deep and ``MAX_PROGRAM_ITEMS`` values; else ``error``."""
    budget = [MAX_PROGRAM_ITEMS]
    return _copy(value, 0, budget, error)


def canonical_bytes(value: object, *, error: type[DuetError] = InvalidJob) -> bytes:
    """The canonical CBOR encoding of ``value`` (see :func:`canonical`)."""
    try:
        return codec.encode(canonical(value, error=error))
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, error):
            raise
        raise error(f"cannot encode: {exc}") from None


def _copy(value: object, depth: int, budget: list[int], error: type[DuetError]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise error(f"more than {MAX_PROGRAM_ITEMS} values")
    kind = type(value)
    if value is None or value is Ellipsis or kind is bool or kind is ObjectRef:
        return value
    if kind is int:
        if not -(1 << 64) <= value < 1 << 64:  # type: ignore[operator]
            raise error("an integer is out of the 64-bit range")
        return value
    if kind is float:
        if math.isnan(value):  # type: ignore[arg-type]
            raise error("NaN is not accepted")
        return value
    if kind is complex:
        if math.isnan(value.real) or math.isnan(value.imag):  # type: ignore[union-attr]
            raise error("NaN is not accepted")
        return value
    if kind is str:
        return _string(value, error)  # type: ignore[arg-type]
    if kind is bytes:
        if len(value) > MAX_STRING_CHARS:  # type: ignore[arg-type]
            raise error(f"a byte string is longer than {MAX_STRING_CHARS} bytes")
        return value
    if isinstance(value, torch.dtype):
        return value
    if kind is slice:
        parts = (value.start, value.stop, value.step)  # type: ignore[union-attr]
        for part in parts:
            if part is not None and type(part) is not int and type(part) is not ObjectRef:
                raise error("slice bounds are integers, object references or None")
        return slice(*(_copy(part, depth + 1, budget, error) for part in parts))
    if depth >= MAX_VALUE_DEPTH:
        raise error(f"values nested deeper than {MAX_VALUE_DEPTH} levels")
    if kind is list or kind is tuple:
        items = [_copy(item, depth + 1, budget, error) for item in value]  # type: ignore[attr-defined]
        return items if kind is list else tuple(items)
    if kind is dict:
        copied: list[tuple[bytes, str, Any]] = []
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise error("map keys must be text")
            key = _copy(key, depth + 1, budget, error)
            copied.append((codec.encode(key), key, _copy(item, depth + 1, budget, error)))
        copied.sort(key=lambda entry: entry[0])
        return {key: item for _, key, item in copied}
    raise error(f"a job cannot hold a value of type {kind.__qualname__}")


def _string(value: str, error: type[DuetError]) -> str:
    if len(value) > MAX_STRING_CHARS:
        raise error(f"a string is longer than {MAX_STRING_CHARS} characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise error("a string is not valid Unicode (lone surrogate)") from None
    return value


def signed_message(context: bytes, digest: bytes) -> bytes:
    """The exact bytes signed: the context and the digest, each length-prefixed."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in (context, digest))


def verify_signature(
    public_key: bytes, signature: bytes, message: bytes, *, error: type[DuetError]
) -> None:
    """Raise ``error`` unless ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise error("the signature does not hold") from None


def pack_envelope(body: bytes, public_key: bytes, signature: bytes) -> bytes:
    """``{"v": 1, "body", "key", "sig"}`` in canonical form (the body may be larger than
    any byte string inside a document)."""
    fields = {"v": VERSION, "body": body, "key": public_key, "sig": signature}
    return codec.encode(dict(sorted(fields.items(), key=lambda item: codec.encode(item[0]))))


def unpack_envelope(
    data: object, *, max_body_bytes: int, error: type[DuetError]
) -> tuple[bytes, bytes, bytes]:
    """Check a signed envelope's form (not its signature): (body, key, signature)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error("a signed document is bytes")
    if memoryview(data).nbytes > max_body_bytes + 256:
        raise error(f"a signed document is at most {max_body_bytes + 256} bytes")
    data = bytes(data)
    limits = codec.DecodeLimits(
        max_depth=2, max_items=16, max_bytes=max_body_bytes + 256, max_tensor_elements=1
    )
    envelope = decode(data, limits=limits, error=error)
    if type(envelope) is not dict or set(envelope) != _ENVELOPE_KEYS:
        raise error(f"a signed document is a map of exactly {sorted(_ENVELOPE_KEYS)}")
    if type(envelope["v"]) is not int or envelope["v"] != VERSION:
        raise error(f"unknown document version (this one reads version {VERSION})")
    body, key, signature = envelope["body"], envelope["key"], envelope["sig"]
    if type(body) is not bytes or len(body) > max_body_bytes:
        raise error(f"a document's body is at most {max_body_bytes} bytes")
    if type(key) is not bytes or len(key) != KEY_BYTES:
        raise error(f"a signing key is {KEY_BYTES} bytes")
    if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        raise error(f"a signature is {SIGNATURE_BYTES} bytes")
    if pack_envelope(body, key, signature) != data:
        raise error("a signed document is not in canonical form")
    return body, key, signature


def decode(data: bytes, *, limits: codec.DecodeLimits, error: type[DuetError]) -> object:
    """``codec.decode`` raising ``error`` for anything it refuses."""
    try:
        return codec.decode(data, limits=limits)
    except _PARSE_ERRORS as exc:
        raise error(f"undecodable: {str(exc)[:200]}") from None


# -- field checks ------------------------------------------------------------------------


def hex32(value: object, what: str, error: type[DuetError] = InvalidJob) -> str:
    if type(value) is not str or not _HEX32.fullmatch(value):
        raise error(f"{what} must be 32 lower-case hex digits")
    return value


def timestamp(value: object, what: str, error: type[DuetError] = InvalidJob) -> float:
    if type(value) not in (int, float) or not 0 < value <= MAX_TIME:  # type: ignore[operator]
        raise error(f"{what} must be a positive unix time")
    return float(value)  # type: ignore[arg-type]


def _count(value: object, what: str) -> int:
    if type(value) is not int or not 1 <= value <= MAX_COUNT:  # type: ignore[operator]
        raise InvalidJob(f"{what} must be an int from 1 to {MAX_COUNT}")
    return value  # type: ignore[return-value]


def _check_program(program: object) -> dict[str, Any]:
    if type(program) is not dict or set(program) != _PROGRAM_KEYS:
        raise InvalidJob(f"a program is a map of exactly {sorted(_PROGRAM_KEYS)}")
    copied: dict[str, Any] = canonical(program)
    name, inputs, outputs, steps = (copied[k] for k in ("name", "inputs", "outputs", "steps"))
    if type(name) is not str or not name.isascii() or len(name) > MAX_NAME_CHARS:
        raise InvalidJob("a program's name must be an ASCII Python identifier")
    if type(steps) is not list or not 0 < len(steps) <= MAX_STEPS:
        raise InvalidJob(f"a program has 1 to {MAX_STEPS} steps")
    for what, ids in (("inputs", inputs), ("outputs", outputs)):
        if type(ids) is not list or len(ids) > MAX_ARGS:
            raise InvalidJob(f"a program's {what} are a list of at most {MAX_ARGS} IDs")
        if not all(type(i) is str and _PLAN_ID.fullmatch(i) for i in ids):
            raise InvalidJob(f"a program's {what} are IDs of 1 to 64 ASCII letters and digits")
        if len(set(ids)) != len(ids):
            raise InvalidJob(f"a program's {what} must be distinct")
    try:
        parse_plan([name, inputs, outputs, steps])
    except ProtocolError as exc:
        raise InvalidJob(f"the program is not a plan: {exc}") from None
    return copied


def _check_inputs(inputs: object, program: dict[str, Any]) -> dict[str, str]:
    if type(inputs) is not dict:
        raise InvalidJob("inputs must map each program input to a dataset tag")
    if set(inputs) != set(program["inputs"]) or len(inputs) != len(program["inputs"]):
        raise InvalidJob("inputs must name every program input, and nothing else, once")
    for tag in inputs.values():
        if type(tag) is not str or not 0 < len(tag) <= MAX_TAG_CHARS or not tag.isprintable():
            raise InvalidJob(f"a dataset tag is printable text of 1 to {MAX_TAG_CHARS} characters")
    return canonical(inputs)


def _check_outputs(outputs: object, program: dict[str, Any]) -> dict[str, str]:
    if type(outputs) is not dict or not 0 < len(outputs) <= MAX_OUTPUTS:
        raise InvalidJob(f"outputs must map 1 to {MAX_OUTPUTS} names to program outputs")
    declared = set(program["outputs"])
    for name, output in outputs.items():
        if type(name) is not str or not _OUTPUT_NAME.fullmatch(name):
            raise InvalidJob("an output name is an ASCII identifier of at most 64 characters")
        if type(output) is not str or output not in declared:
            raise InvalidJob(f"output {name} is not one of the program's outputs")
        if output in program["inputs"]:
            raise InvalidJob(f"output {name} is a raw input of the program; a job cannot ask it")
    if len(set(outputs.values())) != len(outputs):
        raise InvalidJob("two output names refer to the same program output")
    return canonical(outputs)


# -- the job ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class JobSpec:
    """What a scientist asks a host to run; checked when built (InvalidJob), then read-only.

    ``program``: ``{"name", "inputs": [plan ids], "outputs": [plan ids], "steps": [action
    maps]}``; ``inputs``: program input id -> host dataset tag (every input, once);
    ``outputs``: released name -> program output id. Limits: ``max_seconds`` of run time,
    ``max_result_elements`` and ``max_result_bytes`` over all released outputs together.
    Equality and ``hash()`` are those of the canonical bytes.
    """

    job_id: str
    client_id: str
    host_id: str
    program: dict[str, Any]
    inputs: dict[str, str]
    outputs: dict[str, str]
    reason: str
    max_seconds: float
    max_result_elements: int
    max_result_bytes: int
    deadline: float
    created_at: float
    nonce: bytes

    def __post_init__(self) -> None:
        put = object.__setattr__
        for name in ("job_id", "client_id", "host_id"):
            put(self, name, hex32(getattr(self, name), name))
        program = _check_program(self.program)
        put(self, "program", program)
        put(self, "inputs", _check_inputs(self.inputs, program))
        put(self, "outputs", _check_outputs(self.outputs, program))
        if type(self.reason) is not str or len(self.reason) > MAX_REASON_CHARS:
            raise InvalidJob(f"a reason is text of at most {MAX_REASON_CHARS} characters")
        _string(self.reason, InvalidJob)
        seconds = self.max_seconds
        if type(seconds) not in (int, float) or not 0 < seconds <= MAX_JOB_SECONDS:
            raise InvalidJob(f"max_seconds must be above 0 and at most {MAX_JOB_SECONDS:.0f}")
        put(self, "max_seconds", float(seconds))
        _count(self.max_result_elements, "max_result_elements")
        _count(self.max_result_bytes, "max_result_bytes")
        created = timestamp(self.created_at, "created_at")
        deadline = timestamp(self.deadline, "deadline")
        if not created < deadline <= created + MAX_LIFETIME_SECONDS:
            raise InvalidJob("the deadline must come after created_at, within a year of it")
        put(self, "created_at", created)
        put(self, "deadline", deadline)
        if type(self.nonce) is not bytes or len(self.nonce) != NONCE_BYTES:
            raise InvalidJob(f"the nonce is {NONCE_BYTES} bytes")
        if len(self.canonical_bytes()) > MAX_BODY_BYTES:
            raise InvalidJob(f"a job is at most {MAX_BODY_BYTES} bytes encoded")

    @classmethod
    def new(
        cls,
        *,
        client_id: str,
        host_id: str,
        program: Mapping[str, Any],
        inputs: Mapping[str, str],
        outputs: Mapping[str, str] | Sequence[str],
        reason: str,
        max_seconds: float,
        max_result_elements: int,
        max_result_bytes: int,
        deadline: float,
        created_at: float | None = None,
    ) -> JobSpec:
        """A new job (fresh ``job_id`` and ``nonce``). ``outputs`` may be a list of names,
        one per program output, in order."""
        if not isinstance(outputs, Mapping):
            ok = isinstance(outputs, Sequence) and not isinstance(outputs, str | bytes)
            names = list(outputs) if ok else None
            ids = program.get("outputs") if isinstance(program, Mapping) else None
            if type(names) is not list or type(ids) is not list or len(names) != len(ids):
                raise InvalidJob("give one output name per program output, in order")
            outputs = dict(zip(names, ids, strict=True))
        return cls(
            job_id=os.urandom(16).hex(), client_id=client_id, host_id=host_id,
            program=dict(program), inputs=dict(inputs), outputs=dict(outputs), reason=reason,
            max_seconds=max_seconds, max_result_elements=max_result_elements,
            max_result_bytes=max_result_bytes, deadline=deadline,
            created_at=time.time() if created_at is None else created_at,
            nonce=os.urandom(NONCE_BYTES),
        )  # fmt: skip

    def to_map(self) -> dict[str, Any]:
        """The spec as the map its canonical bytes encode."""
        return {"v": VERSION, **{name: getattr(self, name) for name in _FIELDS}}

    def canonical_bytes(self) -> bytes:
        return canonical_bytes(self.to_map())

    def digest(self) -> bytes:
        """SHA-256 of the canonical bytes."""
        return hashlib.sha256(self.canonical_bytes()).digest()

    def hash(self) -> str:
        """SHA-256 of the canonical bytes, hex: the job's content hash."""
        return self.digest().hex()

    def sign(self, identity: Identity) -> SignedJob:
        """The job signed by its scientist (``identity`` must be ``client_id``'s)."""
        if identity.id != self.client_id:
            raise InvalidJob(f"identity {identity.id} cannot sign a job of {self.client_id}")
        signature = identity.sign_bytes(signed_message(CONTEXT, self.digest()))
        return SignedJob(self, identity.public_key, signature)

    @classmethod
    def from_bytes(cls, body: bytes) -> JobSpec:
        """Parse canonical spec bytes (strict; InvalidJob for anything else)."""
        if type(body) is not bytes or len(body) > MAX_BODY_BYTES:
            raise InvalidJob(f"a job is at most {MAX_BODY_BYTES} bytes")
        limits = codec.DecodeLimits(
            max_depth=MAX_VALUE_DEPTH + 8, max_items=MAX_PROGRAM_ITEMS + 64,
            max_bytes=MAX_BODY_BYTES, max_tensor_elements=1,
        )  # fmt: skip
        data = decode(body, limits=limits, error=InvalidJob)
        if type(data) is not dict or set(data) != {"v", *_FIELDS}:
            raise InvalidJob("a job has exactly the fields " + ", ".join(_FIELDS) + " and v")
        if type(data["v"]) is not int or data["v"] != VERSION:
            raise InvalidJob(f"unknown job version (this one reads version {VERSION})")
        try:
            spec = cls(**{name: data[name] for name in _FIELDS})
        except InvalidJob:
            raise
        except _PARSE_ERRORS as exc:
            raise InvalidJob(f"malformed job: {str(exc)[:200]}") from None
        if spec.canonical_bytes() != body:
            raise InvalidJob("the job is not in canonical form")
        return spec

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JobSpec):
            return NotImplemented
        return self.canonical_bytes() == other.canonical_bytes()

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        return f"<JobSpec {self.job_id} of {self.client_id} for {self.host_id}>"


@dataclass(frozen=True)
class SignedJob:
    """A job and its scientist's signature over it."""

    spec: JobSpec
    public_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.spec, JobSpec):
            raise InvalidJob("a signed job holds a JobSpec")
        if type(self.public_key) is not bytes or len(self.public_key) != KEY_BYTES:
            raise InvalidJob(f"a signing key is {KEY_BYTES} bytes")
        if type(self.signature) is not bytes or len(self.signature) != SIGNATURE_BYTES:
            raise InvalidJob(f"a signature is {SIGNATURE_BYTES} bytes")

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def client_id(self) -> str:
        return self.spec.client_id

    def hash(self) -> str:
        return self.spec.hash()

    def verify(
        self, expected_client_id: str | None = None, *, expected_host_id: str | None = None
    ) -> None:
        """Check that the key hashes to the job's ``client_id`` (and to
        ``expected_client_id``, and the job is for ``expected_host_id``, when given) and
        that its signature holds; InvalidJob naming what failed."""
        spec = self.spec
        if expected_client_id is not None and not hmac.compare_digest(
            str(expected_client_id), spec.client_id
        ):
            raise InvalidJob(f"the job is {spec.client_id}'s, not {expected_client_id}'s")
        if expected_host_id is not None and not hmac.compare_digest(
            str(expected_host_id), spec.host_id
        ):
            raise InvalidJob(f"the job is for host {spec.host_id}, not {expected_host_id}")
        if not hmac.compare_digest(id_of(self.public_key), spec.client_id):
            raise InvalidJob(f"the signing key does not belong to {spec.client_id}")
        message = signed_message(CONTEXT, spec.digest())
        verify_signature(self.public_key, self.signature, message, error=InvalidJob)

    def to_wire(self) -> bytes:
        return pack_envelope(self.spec.canonical_bytes(), self.public_key, self.signature)

    @classmethod
    def from_wire(cls, data: object) -> SignedJob:
        """Parse and verify a signed job (its key is ``client_id``'s and signed it)."""
        try:
            body, key, signature = unpack_envelope(
                data, max_body_bytes=MAX_BODY_BYTES, error=InvalidJob
            )
            signed = cls(JobSpec.from_bytes(body), key, signature)
            signed.verify()
        except InvalidJob:
            raise
        except _PARSE_ERRORS as exc:  # a check missed above must still fail closed
            raise InvalidJob(f"malformed job: {str(exc)[:200]}") from None
        return signed

    def __repr__(self) -> str:
        return f"<SignedJob {self.spec.job_id} of {self.spec.client_id}>"
