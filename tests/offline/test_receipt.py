"""Receipts: the host attests what ran and what it released; the scientist checks it all."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import pytest
import torch

from duet_p2p.identity import Identity
from duet_p2p.offline import receipt as receipt_module
from duet_p2p.offline.receipt import InvalidReceipt, Receipt, content_hash
from duet_p2p.offline.spec import pack_envelope, signed_message
from duet_p2p.rpc import codec
from tests.offline.test_spec import HOST, NOW, SCIENTIST, encode_sorted, make_signed, make_spec

OUTPUT = b"released bytes of the summary"
DATA = torch.arange(12, dtype=torch.float32).reshape(3, 4)


def issue(**changes: Any) -> Receipt:
    fields: dict[str, Any] = dict(
        inputs={"x": content_hash(DATA)}, outputs={"summary": content_hash(OUTPUT)},
        submitted_at=NOW + 1, started_at=NOW + 2, finished_at=NOW + 3, released_at=NOW + 4,
    )  # fmt: skip
    fields.update(changes)
    return Receipt.issue(HOST, make_signed(), **fields)


def signed_by_host(body: bytes) -> bytes:
    digest = hashlib.sha256(body).digest()
    signature = HOST.sign_bytes(signed_message(receipt_module.CONTEXT, digest))
    return pack_envelope(body, HOST.public_key, signature)


def test_issue_send_verify() -> None:
    receipt = issue()
    back = Receipt.from_wire(receipt.to_wire())
    assert back == receipt
    back.verify(HOST.id, make_signed(), {"summary": OUTPUT})
    back.verify(HOST.id, make_spec())  # a JobSpec will do too
    assert back.job_hash == make_spec().hash()
    assert (back.job_id, back.client_id, back.host_id) == (
        make_spec().job_id, SCIENTIST.id, HOST.id)  # fmt: skip


def test_only_the_jobs_host_issues_it() -> None:
    with pytest.raises(InvalidReceipt, match="not the job's host"):
        Receipt.issue(SCIENTIST, make_signed(), inputs={"x": content_hash(DATA)},
                      outputs={"summary": content_hash(OUTPUT)}, submitted_at=NOW,
                      started_at=NOW, finished_at=NOW, released_at=NOW)  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [
        {"inputs": {}}, {"inputs": {"x": content_hash(DATA), "y": content_hash(DATA)}},
        {"outputs": {"other": content_hash(OUTPUT)}}, {"outputs": {}},
        {"started_at": NOW}, {"released_at": NOW + 2.5},
        {"outputs": {"summary": "AB" * 32}}, {"inputs": {"x": "short"}},
    ],
)  # fmt: skip
def test_a_receipt_that_does_not_fit_the_job_is_not_issued(changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidReceipt):
        issue(**changes)


def test_wrong_host_or_substituted_key() -> None:
    receipt = issue()
    with pytest.raises(InvalidReceipt, match="not"):
        receipt.verify(SCIENTIST.id)
    mallory = Identity.generate()
    forged = Receipt(**{**_fields(receipt), "public_key": mallory.public_key,
                        "signature": mallory.sign_bytes(receipt._message())})  # fmt: skip
    with pytest.raises(InvalidReceipt, match="does not belong"):
        forged.verify(HOST.id)
    with pytest.raises(InvalidReceipt, match="does not belong"):
        Receipt.from_wire(forged.to_wire())


def _fields(receipt: Receipt) -> dict[str, Any]:
    return {name: getattr(receipt, name) for name in receipt.__dataclass_fields__}


@pytest.mark.parametrize(
    "change",
    [
        {"outputs": {"summary": content_hash(b"other bytes")}},
        {"inputs": {"x": content_hash(DATA + 1)}}, {"finished_at": NOW + 3.5},
        {"job_hash": "0" * 64}, {"client_id": "1" * 32},
    ],
)  # fmt: skip
def test_any_changed_field_breaks_the_signature(change: dict[str, Any]) -> None:
    forged = Receipt(**{**_fields(issue()), **change})
    with pytest.raises(InvalidReceipt, match="signature"):
        forged.verify(HOST.id)
    with pytest.raises(InvalidReceipt, match="signature"):
        Receipt.from_wire(forged.to_wire())


def test_signature_is_over_the_receipt_context_only() -> None:
    receipt = issue()
    digest = hashlib.sha256(receipt.body_bytes()).digest()
    as_job = HOST.sign_bytes(signed_message(b"duet_p2p job v1", digest))
    with pytest.raises(InvalidReceipt, match="signature"):
        Receipt(**{**_fields(receipt), "signature": as_job}).verify(HOST.id)


def test_a_receipt_for_another_job_is_caught() -> None:
    receipt = issue()
    with pytest.raises(InvalidReceipt, match="another job"):
        receipt.verify(HOST.id, make_signed(reason="a different job"))
    with pytest.raises(InvalidReceipt, match="another job"):
        receipt.verify(HOST.id, make_spec(nonce=bytes(16)))


def test_received_bytes_must_be_the_released_ones() -> None:
    receipt = issue()
    with pytest.raises(InvalidReceipt, match="not the one"):
        receipt.verify(HOST.id, outputs={"summary": OUTPUT + b"!"})
    with pytest.raises(InvalidReceipt, match="not the ones"):
        receipt.verify(HOST.id, outputs={})
    with pytest.raises(InvalidReceipt, match="not the ones"):
        receipt.verify(HOST.id, outputs={"summary": OUTPUT, "extra": b""})
    with pytest.raises(InvalidReceipt, match="bytes"):
        receipt.verify(HOST.id, outputs={"summary": DATA})  # type: ignore[dict-item]
    receipt.verify(HOST.id, outputs={"summary": bytearray(OUTPUT)})


def test_hostile_wire_raises_invalid_receipt_only() -> None:
    wire = issue().to_wire()
    for index in range(len(wire)):
        tampered = bytearray(wire)
        tampered[index] ^= 0x04
        with pytest.raises(InvalidReceipt):
            Receipt.from_wire(bytes(tampered))
    for cut in range(0, len(wire), 7):
        with pytest.raises(InvalidReceipt):
            Receipt.from_wire(wire[:cut])
    rng = random.Random(3)
    for _ in range(2000):
        with pytest.raises(InvalidReceipt):
            Receipt.from_wire(rng.randbytes(rng.randrange(300)))
    for value in (None, "text", 5, [wire]):
        with pytest.raises(InvalidReceipt):
            Receipt.from_wire(value)
    with pytest.raises(InvalidReceipt, match="at most"):
        Receipt.from_wire(bytes(receipt_module.MAX_BODY_BYTES + 1000))


def test_wrong_field_types_raise_invalid_receipt_only() -> None:
    """Each body is properly signed by the host: what refuses it is the field check."""
    good = codec.decode(issue().body_bytes())
    accepted = []
    for name in list(good):
        for value in (None, True, -1, 1.5, "", "g" * 64, b"x", [], {}, {"x": 1}, float("nan"),
                      float("inf"), {"x": "0" * 64, "y" * 65: "0" * 64}):  # fmt: skip
            body = encode_sorted({**good, name: value})
            try:
                Receipt.from_wire(signed_by_host(body))
            except InvalidReceipt:
                continue
            accepted.append((name, value))
        missing = encode_sorted({k: v for k, v in good.items() if k != name})
        with pytest.raises(InvalidReceipt):
            Receipt.from_wire(signed_by_host(missing))
    assert accepted == [("inputs", {}), ("submitted_at", 1.5)]  # the only valid ones
    with pytest.raises(InvalidReceipt, match="exactly the fields"):
        Receipt.from_wire(signed_by_host(encode_sorted({**good, "note": "x"})))
    assert Receipt.from_wire(signed_by_host(encode_sorted(good))) == issue()


def test_non_canonical_body_is_refused() -> None:
    receipt = issue()
    fields = codec.decode(receipt.body_bytes())
    reordered = codec.encode(dict(reversed(list(fields.items()))))
    with pytest.raises(InvalidReceipt, match="canonical"):
        Receipt.from_wire(signed_by_host(reordered))


# -- content hashes ------------------------------------------------------------------------


def test_content_hash_of_bytes_is_plain_sha256() -> None:
    assert content_hash(OUTPUT) == hashlib.sha256(OUTPUT).hexdigest()
    assert content_hash(memoryview(OUTPUT)) == content_hash(bytearray(OUTPUT))


def test_content_hash_of_tensors() -> None:
    base = content_hash(DATA)
    assert content_hash(DATA.clone()) == base
    assert content_hash(DATA.t().contiguous().t()) == base  # another memory layout
    assert content_hash(DATA.numpy()) == base  # a numpy array of the same values
    assert content_hash(DATA.to(torch.float64)) != base  # dtype counts
    assert content_hash(DATA.reshape(4, 3)) != base  # shape counts
    assert content_hash(DATA.reshape(12)) != base
    changed = DATA.clone()
    changed[2, 3] = 0.5
    assert content_hash(changed) != base
    assert content_hash(DATA.requires_grad_(False)) == base
    assert content_hash(torch.ones(2, dtype=torch.bfloat16)) != content_hash(
        torch.ones(2, dtype=torch.float16))  # fmt: skip
    assert content_hash(torch.zeros(0, 3)) != content_hash(torch.zeros(3, 0))
    assert content_hash(np.arange(3, dtype=">i4")) == content_hash(np.arange(3, dtype="<i4"))
    conj = torch.tensor([1 + 2j]).conj()
    assert content_hash(conj) == content_hash(torch.tensor([1 - 2j]))


@pytest.mark.parametrize(
    "value",
    ["text", 3, None, np.array(["a"]), np.array([object()]), torch.ones(2).to_sparse()],
)
def test_content_hash_refuses_what_it_cannot_hash(value: Any) -> None:
    with pytest.raises(TypeError):
        content_hash(value)
