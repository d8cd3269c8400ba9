"""A host's signed receipt for a job's released results.

A receipt binds what ran to what came back: the signed job's hash, the content hash of
every dataset bound to an input, the SHA-256 of every released output's encoded bytes, and
when the job was submitted, started, finished and released. The host signs
``[b"duet_p2p receipt v1", sha256(receipt)]`` (each part length-prefixed) with its identity
key; the scientist checks that the key hashes to the host's ID, that the signature holds,
that the receipt is for the job it signed, and that the bytes it received are the ones the
host released (:meth:`Receipt.verify`).

The receipt has the same canonical encoding and wire envelope as a job
(``duet_p2p.offline.spec``); reading one trusts nothing and fails with :class:`InvalidReceipt`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from duet_p2p.errors import DuetError
from duet_p2p.identity import KEY_BYTES, SIGNATURE_BYTES, Identity, id_of
from duet_p2p.offline import spec as job_spec
from duet_p2p.offline.spec import JobSpec, SignedJob
from duet_p2p.rpc import codec

__all__ = ["CONTEXT", "InvalidReceipt", "Receipt", "content_hash"]

VERSION = 1
CONTEXT = b"duet_p2p receipt v1"
MAX_BODY_BYTES = 1 << 16
MAX_ENTRIES = job_spec.MAX_OUTPUTS
_TENSOR_CONTEXT = b"duet_p2p tensor v1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INPUT_NAME = re.compile(r"[A-Za-z0-9]{1,64}")
_OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TIMES = ("submitted_at", "started_at", "finished_at", "released_at")
_FIELDS = ("job_hash", "job_id", "host_id", "client_id", "inputs", "outputs", *_TIMES)
_HASHABLE_KINDS = "biufc"


class InvalidReceipt(DuetError, ValueError):
    """A receipt is malformed, its signature fails, or it does not match the job or bytes."""


def content_hash(value: object) -> str:
    """SHA-256 hex of a value: of the bytes themselves for bytes; for a tensor or numpy
    array, of its dtype, shape and raw little-endian bytes (equal tensors and arrays hash
    alike, whatever their memory layout)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise TypeError("only dense tensors have a content hash")
        tensor = tensor.cpu().resolve_conj().resolve_neg().contiguous()
        name = str(tensor.dtype).removeprefix("torch.")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        return _array_hash(name, tensor.numpy())
    if isinstance(value, np.ndarray) and not isinstance(value, np.ma.MaskedArray):
        if value.dtype.kind not in _HASHABLE_KINDS:
            raise TypeError(f"arrays of dtype {value.dtype} have no content hash")
        return _array_hash(value.dtype.name, value)
    raise TypeError(f"no content hash for a {type(value).__qualname__}")


def _array_hash(dtype_name: str, array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    digest = hashlib.sha256()
    for part in (_TENSOR_CONTEXT, dtype_name.encode()):
        digest.update(len(part).to_bytes(4, "big") + part)
    digest.update(array.ndim.to_bytes(4, "big"))
    for dim in array.shape:
        digest.update(int(dim).to_bytes(8, "big"))
    digest.update(array.nbytes.to_bytes(8, "big"))
    digest.update(memoryview(array.reshape(-1).view(np.uint8)))
    return digest.hexdigest()


def _hashes(value: object, what: str, name: re.Pattern[str], least: int) -> dict[str, str]:
    if type(value) is not dict or not least <= len(value) <= MAX_ENTRIES:
        raise InvalidReceipt(f"{what} map {least} to {MAX_ENTRIES} names to SHA-256 hashes")
    for key, digest in value.items():
        if type(key) is not str or not name.fullmatch(key):
            raise InvalidReceipt(f"a name in {what} is malformed")
        if type(digest) is not str or not _SHA256.fullmatch(digest):
            raise InvalidReceipt(f"a hash in {what} is not 64 lower-case hex digits")
    return job_spec.canonical(value, error=InvalidReceipt)


@dataclass(frozen=True)
class Receipt:
    """What the host attests for a released result, and its signature."""

    job_hash: str
    job_id: str
    host_id: str
    client_id: str
    inputs: dict[str, str]
    """Program input -> content hash of the dataset bound to it."""
    outputs: dict[str, str]
    """Released output name -> SHA-256 of its encoded bytes."""
    submitted_at: float
    started_at: float
    finished_at: float
    released_at: float
    public_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        put = object.__setattr__
        if type(self.job_hash) is not str or not _SHA256.fullmatch(self.job_hash):
            raise InvalidReceipt("job_hash is 64 lower-case hex digits")
        for name in ("job_id", "host_id", "client_id"):
            job_spec.hex32(getattr(self, name), name, InvalidReceipt)
        put(self, "inputs", _hashes(self.inputs, "inputs", _INPUT_NAME, 0))
        put(self, "outputs", _hashes(self.outputs, "outputs", _OUTPUT_NAME, 1))
        times = [job_spec.timestamp(getattr(self, n), n, InvalidReceipt) for n in _TIMES]
        if times != sorted(times):
            raise InvalidReceipt("a job is submitted, started, finished and released in order")
        for name, value in zip(_TIMES, times, strict=True):
            put(self, name, value)
        if type(self.public_key) is not bytes or len(self.public_key) != KEY_BYTES:
            raise InvalidReceipt(f"a signing key is {KEY_BYTES} bytes")
        if type(self.signature) is not bytes or len(self.signature) != SIGNATURE_BYTES:
            raise InvalidReceipt(f"a signature is {SIGNATURE_BYTES} bytes")

    @classmethod
    def issue(
        cls,
        identity: Identity,
        job: SignedJob | JobSpec,
        *,
        inputs: Mapping[str, str],
        outputs: Mapping[str, str],
        submitted_at: float,
        started_at: float,
        finished_at: float,
        released_at: float,
    ) -> Receipt:
        """The host's receipt for ``job``: ``inputs`` are the datasets' content hashes,
        ``outputs`` the SHA-256 of each released output's bytes (see :func:`content_hash`)."""
        spec = job.spec if isinstance(job, SignedJob) else job
        if identity.id != spec.host_id:
            raise InvalidReceipt(f"identity {identity.id} is not the job's host {spec.host_id}")
        fields: dict[str, Any] = dict(
            job_hash=spec.hash(), job_id=spec.job_id, host_id=spec.host_id,
            client_id=spec.client_id, inputs=dict(inputs), outputs=dict(outputs),
            submitted_at=submitted_at, started_at=started_at, finished_at=finished_at,
            released_at=released_at,
        )  # fmt: skip
        draft = cls(**fields, public_key=identity.public_key, signature=bytes(SIGNATURE_BYTES))
        draft.check_job(spec)
        signature = identity.sign_bytes(draft._message())
        return cls(**fields, public_key=identity.public_key, signature=signature)

    def body_bytes(self) -> bytes:
        """The canonical bytes the signature covers."""
        body = {"v": VERSION, **{name: getattr(self, name) for name in _FIELDS}}
        return job_spec.canonical_bytes(body, error=InvalidReceipt)

    def hash(self) -> str:
        return hashlib.sha256(self.body_bytes()).hexdigest()

    def _message(self) -> bytes:
        return job_spec.signed_message(CONTEXT, hashlib.sha256(self.body_bytes()).digest())

    def verify(
        self,
        host_id: str,
        job: SignedJob | JobSpec | None = None,
        outputs: Mapping[str, bytes] | None = None,
    ) -> None:
        """Check the receipt is ``host_id``'s (its key hashes to it, its signature holds);
        with ``job``, that it is for that job; with ``outputs`` (name -> bytes received),
        that exactly those outputs were released, byte for byte. InvalidReceipt if not."""
        if type(host_id) is not str or not hmac.compare_digest(host_id, self.host_id):
            raise InvalidReceipt(f"the receipt is from host {self.host_id}, not {host_id!r:.40}")
        if not hmac.compare_digest(id_of(self.public_key), self.host_id):
            raise InvalidReceipt(f"the receipt's key does not belong to host {self.host_id}")
        job_spec.verify_signature(
            self.public_key, self.signature, self._message(), error=InvalidReceipt
        )
        if job is not None:
            self.check_job(job.spec if isinstance(job, SignedJob) else job)
        if outputs is not None:
            if not isinstance(outputs, Mapping) or set(outputs) != set(self.outputs):
                raise InvalidReceipt("the outputs received are not the ones the receipt lists")
            for name, data in outputs.items():
                if not isinstance(data, bytes | bytearray | memoryview):
                    raise InvalidReceipt(f"output {name} must be checked as the bytes received")
                if not hmac.compare_digest(content_hash(data), self.outputs[name]):
                    raise InvalidReceipt(f"output {name} is not the one the host released")

    def check_job(self, spec: JobSpec) -> None:
        """InvalidReceipt unless the receipt is for the job ``spec``."""
        if not isinstance(spec, JobSpec):
            raise InvalidReceipt("a receipt is checked against a JobSpec or SignedJob")
        if not hmac.compare_digest(spec.hash(), self.job_hash):
            raise InvalidReceipt("the receipt is for another job (its hash differs)")
        same = (spec.job_id, spec.host_id, spec.client_id) == (
            self.job_id, self.host_id, self.client_id)  # fmt: skip
        if not same:
            raise InvalidReceipt("the receipt names another job, host or scientist")
        if set(self.inputs) != set(spec.inputs):
            raise InvalidReceipt("the receipt's inputs are not the job's")
        if not set(self.outputs) <= set(spec.outputs):
            raise InvalidReceipt("the receipt lists an output the job did not declare")

    def to_wire(self) -> bytes:
        return job_spec.pack_envelope(self.body_bytes(), self.public_key, self.signature)

    @classmethod
    def from_wire(cls, data: object) -> Receipt:
        """Parse a receipt and check its signature is by the host it names (then call
        :meth:`verify` with the host ID you expect)."""
        try:
            body, key, signature = job_spec.unpack_envelope(
                data, max_body_bytes=MAX_BODY_BYTES, error=InvalidReceipt
            )
            limits = codec.DecodeLimits(
                max_depth=4, max_items=4 * MAX_ENTRIES + 64, max_bytes=MAX_BODY_BYTES,
                max_tensor_elements=1,
            )  # fmt: skip
            fields = job_spec.decode(body, limits=limits, error=InvalidReceipt)
            if type(fields) is not dict or set(fields) != {"v", *_FIELDS}:
                raise InvalidReceipt("a receipt has exactly the fields " + ", ".join(_FIELDS))
            if type(fields["v"]) is not int or fields["v"] != VERSION:
                raise InvalidReceipt(f"unknown receipt version (this one reads {VERSION})")
            receipt = cls(
                **{name: fields[name] for name in _FIELDS}, public_key=key, signature=signature
            )
            if receipt.body_bytes() != body:
                raise InvalidReceipt("the receipt is not in canonical form")
            receipt.verify(receipt.host_id)
        except InvalidReceipt:
            raise
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
            raise InvalidReceipt(f"malformed receipt: {str(exc)[:200]}") from None
        return receipt

    def __repr__(self) -> str:
        return f"<Receipt of job {self.job_id} by host {self.host_id}>"
