"""The job document: canonical bytes, the scientist's signature, and a strict wire form."""

from __future__ import annotations

import copy
import hashlib
import random
import time
from typing import Any

import pytest
import torch

from duet_p2p.identity import Identity
from duet_p2p.offline import spec as spec_module
from duet_p2p.offline.spec import InvalidJob, JobSpec, SignedJob, pack_envelope, signed_message
from duet_p2p.rpc import codec
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.messages import Action, to_wire
from duet_p2p.rpc.plan_spec import DEFINE_OP, MAX_STEPS

SCIENTIST = Identity.generate()
HOST = Identity.generate()
NOW = 1_700_000_000.0


def make_program(steps: int = 2) -> dict[str, Any]:
    """A plan in its wire form: mean of the input, then a slice of it, ``steps`` ops."""
    actions = [
        Action(op="torch.Tensor.mean", result="r0", target=ObjectRef("x"), kwargs={"dim": 0})
    ]
    for i in range(1, steps):
        actions.append(
            Action(
                op="torch.Tensor.__getitem__",
                result=f"r{i}",
                target=ObjectRef(f"r{i - 1}"),
                args=[slice(0, 2, None), (1, 2.5)],
            )  # fmt: skip
        )
    return {"name": "stats", "inputs": ["x"], "outputs": [f"r{steps - 1}"],
            "steps": [to_wire(a) for a in actions]}  # fmt: skip


def make_spec(**changes: Any) -> JobSpec:
    fields: dict[str, Any] = dict(
        job_id="ab" * 16, client_id=SCIENTIST.id, host_id=HOST.id, program=make_program(),
        inputs={"x": "train_images"}, outputs={"summary": "r1"}, reason="for the paper",
        max_seconds=60.0, max_result_elements=100, max_result_bytes=10_000,
        deadline=NOW + 3600, created_at=NOW, nonce=bytes(range(16)),
    )  # fmt: skip
    fields.update(changes)
    return JobSpec(**fields)


def make_signed(**changes: Any) -> SignedJob:
    return make_spec(**changes).sign(SCIENTIST)


def signed_by_scientist(body: bytes) -> bytes:
    """``body`` (any bytes) signed by the scientist as a job, in an envelope."""
    digest = hashlib.sha256(body).digest()
    signature = SCIENTIST.sign_bytes(signed_message(spec_module.CONTEXT, digest))
    return pack_envelope(body, SCIENTIST.public_key, signature)


def encode_sorted(value: Any) -> bytes:
    """Canonical map order, and no other check: what a hostile peer can send."""

    def sort(item: Any) -> Any:
        if isinstance(item, dict):
            pairs = sorted(item.items(), key=lambda kv: codec.encode(kv[0]))
            return {k: sort(v) for k, v in pairs}
        if isinstance(item, list):
            return [sort(v) for v in item]
        return item

    return codec.encode(sort(value))


def reversed_maps(value: Any) -> Any:
    """The same value with every map built in the opposite insertion order."""
    if isinstance(value, dict):
        return {k: reversed_maps(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reversed_maps(v) for v in value]
    return value


# -- canonical bytes -----------------------------------------------------------------------


def test_round_trip_through_the_wire() -> None:
    signed = make_signed()
    back = SignedJob.from_wire(signed.to_wire())
    assert back == signed
    assert back.spec.hash() == signed.spec.hash()
    assert back.to_wire() == signed.to_wire()
    back.verify(SCIENTIST.id, expected_host_id=HOST.id)


def test_insertion_order_and_number_form_do_not_change_the_bytes() -> None:
    reordered = reversed_maps(make_program())
    assert list(reordered) != list(make_program())
    assert list(reordered["steps"][0]) != list(make_program()["steps"][0])
    a = make_spec()
    b = make_spec(
        program=reordered, inputs=reversed_maps({"x": "train_images"}),
        max_seconds=60, deadline=int(NOW + 3600), created_at=int(NOW),
    )  # fmt: skip
    assert a.canonical_bytes() == b.canonical_bytes()
    assert a == b and hash(a) == hash(b) and a.hash() == b.hash()
    assert make_spec().canonical_bytes() == a.canonical_bytes()  # stable across calls


def test_maps_are_in_rfc8949_order_at_every_level() -> None:
    def check(value: Any) -> None:
        if isinstance(value, dict):
            keys = [codec.encode(k) for k in value]
            assert keys == sorted(keys)
            for item in value.values():
                check(item)
        elif isinstance(value, list | tuple):
            for item in value:
                check(item)

    check(codec.decode(make_signed().to_wire()))
    decoded = codec.decode(make_spec().canonical_bytes())
    check(decoded)
    assert isinstance(decoded, dict) and set(decoded) == {"v", *spec_module._FIELDS}


def test_known_encoding_is_stable() -> None:
    """A fixed job has a fixed hash: any change to the encoding breaks old signatures."""
    spec = make_spec(client_id="1" * 32, host_id="2" * 32)
    assert spec.hash() == KNOWN_HASH


KNOWN_HASH = "642568cf981849065aa43eee25b1115582b647db84b96bc917c7199b955e7ad2"


def test_distinct_content_distinct_hash() -> None:
    base = make_spec()
    assert make_spec(nonce=bytes(16)).hash() != base.hash()
    assert make_spec(reason="other").hash() != base.hash()
    assert make_spec(max_result_bytes=10_001).hash() != base.hash()
    other = make_program()
    other["steps"][1]["args"][1] = (1, 2)  # 2.5 -> 2: a different constant
    assert make_spec(program=other).hash() != base.hash()


def test_the_spec_keeps_its_own_copy() -> None:
    program, inputs = make_program(), {"x": "train_images"}
    spec = make_spec(program=program, inputs=inputs)
    before = spec.hash()
    program["steps"].clear()
    inputs["x"] = "other"
    assert spec.hash() == before


def test_new_fills_id_nonce_and_time() -> None:
    spec = JobSpec.new(
        client_id=SCIENTIST.id, host_id=HOST.id, program=make_program(), inputs={"x": "t"},
        outputs=["summary"], reason="", max_seconds=5, max_result_elements=1,
        max_result_bytes=1, deadline=time.time() + 60,
    )  # fmt: skip
    assert spec.outputs == {"summary": "r1"}
    assert len(spec.job_id) == 32 and len(spec.nonce) == 16
    again = JobSpec.new(**{f: getattr(spec, f) for f in ("client_id", "host_id", "program",
        "inputs", "outputs", "reason", "max_seconds", "max_result_elements",
        "max_result_bytes", "deadline")})  # fmt: skip
    assert again.job_id != spec.job_id and again.nonce != spec.nonce
    with pytest.raises(InvalidJob):
        JobSpec.new(**{**_new_args(), "outputs": "summary"})
    with pytest.raises(InvalidJob):
        JobSpec.new(**{**_new_args(), "outputs": ["a", "b"]})


def _new_args() -> dict[str, Any]:
    return dict(client_id=SCIENTIST.id, host_id=HOST.id, program=make_program(),
                inputs={"x": "t"}, outputs=["summary"], reason="", max_seconds=5,
                max_result_elements=1, max_result_bytes=1, deadline=time.time() + 60)  # fmt: skip


# -- signatures ------------------------------------------------------------------------------


def test_only_the_scientist_signs_their_job() -> None:
    with pytest.raises(InvalidJob, match="cannot sign"):
        make_spec().sign(HOST)


@pytest.mark.parametrize(
    "change",
    [
        {"reason": "something else"}, {"host_id": "3" * 32}, {"inputs": {"x": "other"}},
        {"max_seconds": 61.0}, {"max_result_elements": 101}, {"max_result_bytes": 1},
        {"deadline": NOW + 3601}, {"created_at": NOW + 1}, {"nonce": bytes(16)},
        {"job_id": "cd" * 16}, {"outputs": {"other": "r1"}}, {"program": make_program(3)},
    ],
)  # fmt: skip
def test_any_changed_field_breaks_the_signature(change: dict[str, Any]) -> None:
    signed = make_signed()
    if "outputs" not in change and "program" in change:
        change["outputs"] = {"summary": "r2"}
    forged = SignedJob(make_spec(**change), signed.public_key, signed.signature)
    with pytest.raises(InvalidJob, match="signature"):
        forged.verify()
    with pytest.raises(InvalidJob, match="signature"):
        SignedJob.from_wire(forged.to_wire())


def test_a_substituted_key_is_caught() -> None:
    mallory = Identity.generate()
    spec = make_spec()
    forged = SignedJob(spec, mallory.public_key,
                       mallory.sign_bytes(signed_message(spec_module.CONTEXT, spec.digest())))  # fmt: skip
    with pytest.raises(InvalidJob, match="does not belong"):
        forged.verify()
    with pytest.raises(InvalidJob, match="does not belong"):
        SignedJob.from_wire(forged.to_wire())
    # Mallory's own job, claimed for the scientist: the ID check names the mismatch
    own = make_spec(client_id=mallory.id).sign(mallory)
    with pytest.raises(InvalidJob, match="not"):
        own.verify(SCIENTIST.id)


def test_signature_is_over_the_job_context_only() -> None:
    spec = make_spec()
    other_context = SCIENTIST.sign_bytes(signed_message(b"duet_p2p receipt v1", spec.digest()))
    with pytest.raises(InvalidJob, match="signature"):
        SignedJob(spec, SCIENTIST.public_key, other_context).verify()


def test_expected_ids() -> None:
    signed = make_signed()
    signed.verify(SCIENTIST.id, expected_host_id=HOST.id)
    with pytest.raises(InvalidJob):
        signed.verify("f" * 32)
    with pytest.raises(InvalidJob):
        signed.verify(expected_host_id="f" * 32)


# -- what a job may hold ---------------------------------------------------------------------


def _bad_programs() -> list[Any]:
    extra = make_program()
    extra["code"] = "import os"
    nested = make_program()
    nested["steps"][0]["op"] = DEFINE_OP
    tensor = make_program()
    tensor["steps"][0]["args"] = [torch.ones(2)]
    nan = make_program()
    nan["steps"][1]["args"] = [float("nan")]
    unknown_field = make_program()
    unknown_field["steps"][0]["shell"] = True
    long = make_program(MAX_STEPS + 1)
    dup_inputs = make_program()
    dup_inputs["inputs"] = ["x", "x"]
    unicode_id = make_program()
    unicode_id["inputs"] = ["x\u0660"]
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    too_deep = make_program()
    too_deep["steps"][1]["args"] = [deep]
    return [None, [], "plan", {}, extra, nested, tensor, nan, unknown_field, long, dup_inputs,
            unicode_id, too_deep, {**make_program(), "steps": []},
            {**make_program(), "name": "not an identifier"}]  # fmt: skip


@pytest.mark.parametrize("program", _bad_programs())
def test_bad_programs_are_refused(program: Any) -> None:
    with pytest.raises(InvalidJob):
        make_spec(program=program)


@pytest.mark.parametrize(
    "change",
    [
        {"inputs": {}}, {"inputs": {"x": "t", "y": "u"}}, {"inputs": {"y": "t"}},
        {"inputs": {"x": ""}}, {"inputs": {"x": "a\x1b[2J"}}, {"inputs": {"x": "t" * 201}},
        {"outputs": {}}, {"outputs": {"summary": "r0"}}, {"outputs": {"summary": "x"}},
        {"outputs": {"bad name": "r1"}}, {"outputs": {"summary": ["r1"]}},
        {"reason": "r" * 4001}, {"reason": 3}, {"reason": "\ud800"},
        {"max_seconds": 0}, {"max_seconds": -1.0}, {"max_seconds": float("nan")},
        {"max_seconds": float("inf")}, {"max_seconds": 8 * 86400}, {"max_seconds": True},
        {"max_result_elements": 0}, {"max_result_elements": True},
        {"max_result_bytes": 1.5}, {"max_result_bytes": 1 << 63},
        {"deadline": NOW}, {"deadline": NOW - 1}, {"deadline": NOW + 400 * 86400},
        {"created_at": 0}, {"created_at": float("nan")}, {"deadline": float("inf")},
        {"nonce": bytes(15)}, {"nonce": "0" * 16}, {"nonce": bytearray(16)},
        {"job_id": "AB" * 16}, {"job_id": "ab" * 15}, {"job_id": "ab" * 16 + "\n"},
        {"client_id": None}, {"host_id": "g" * 32},
    ],
)  # fmt: skip
def test_bad_fields_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(InvalidJob):
        make_spec(**change)


def test_an_output_may_not_be_a_raw_input() -> None:
    program = make_program()
    program["outputs"] = ["x", "r1"]
    with pytest.raises(InvalidJob, match="raw input"):
        make_spec(program=program, outputs={"data": "x"})


def test_largest_plan_fits_and_parses_quickly() -> None:
    big = make_spec(program=make_program(MAX_STEPS), outputs={"summary": f"r{MAX_STEPS - 1}"})
    wire = big.sign(SCIENTIST).to_wire()
    started = time.perf_counter()
    assert SignedJob.from_wire(wire).spec == big
    assert time.perf_counter() - started < 2.0


# -- hostile wire input ------------------------------------------------------------------------


def test_a_body_not_in_canonical_form_is_refused() -> None:
    signed = make_signed()
    plain = codec.encode(signed.spec.to_map())  # insertion order, not canonical
    assert plain != signed.spec.canonical_bytes()
    with pytest.raises(InvalidJob, match="canonical"):
        SignedJob.from_wire(signed_by_scientist(plain))


def test_an_envelope_not_in_canonical_form_is_refused() -> None:
    signed = make_signed()
    loose = codec.encode({"v": 1, "body": signed.spec.canonical_bytes(),
                          "key": signed.public_key, "sig": signed.signature})  # fmt: skip
    assert loose != signed.to_wire()
    with pytest.raises(InvalidJob, match="canonical"):
        SignedJob.from_wire(loose)


def test_every_flipped_byte_is_refused() -> None:
    wire = make_signed().to_wire()
    for index in range(len(wire)):
        for bit in (0x01, 0x80):
            tampered = bytearray(wire)
            tampered[index] ^= bit
            with pytest.raises(InvalidJob):
                SignedJob.from_wire(bytes(tampered))


def test_truncations_and_extensions_are_refused() -> None:
    wire = make_signed().to_wire()
    for cut in range(len(wire)):
        with pytest.raises(InvalidJob):
            SignedJob.from_wire(wire[:cut])
    with pytest.raises(InvalidJob):
        SignedJob.from_wire(wire + b"\x00")


def test_random_bytes_and_wrong_types_raise_invalid_job_only() -> None:
    rng = random.Random(12)
    for _ in range(3000):
        blob = rng.randbytes(rng.randrange(0, 300))
        with pytest.raises(InvalidJob):
            SignedJob.from_wire(blob)
    for value in (None, 3, "text", [], {}, object()):
        with pytest.raises(InvalidJob):
            SignedJob.from_wire(value)


WRONG_VALUES: list[Any] = [
    None, True, -1, 0, 1 << 63, 1.5, float("inf"), float("nan"), "", "x" * 70, b"", b"\x00" * 64,
    [], [1, 2], {}, {"a": 1}, ObjectRef("x"), (1,), slice(1, 2), torch.float32, 2j, ...,
]  # fmt: skip


def test_every_field_with_every_wrong_type_raises_invalid_job_only() -> None:
    """Each body is properly signed, so what refuses it is the field check."""
    good = codec.decode(make_spec().canonical_bytes())
    accepted = []
    for name in [*spec_module._FIELDS, "v"]:
        for value in WRONG_VALUES:
            body = encode_sorted({**good, name: value})
            try:
                SignedJob.from_wire(signed_by_scientist(body))
            except InvalidJob:
                continue
            accepted.append((name, value))
    assert accepted == [("reason", ""), ("reason", "x" * 70), ("max_seconds", 1.5)]
    for name in spec_module._FIELDS:  # a missing field, an extra one
        body = {k: v for k, v in good.items() if k != name}
        with pytest.raises(InvalidJob, match="exactly the fields"):
            SignedJob.from_wire(signed_by_scientist(spec_module.canonical_bytes(body)))
    with pytest.raises(InvalidJob, match="exactly the fields"):
        extra = spec_module.canonical_bytes({**good, "extra": 1})
        SignedJob.from_wire(signed_by_scientist(extra))


def test_wrong_types_inside_the_program_raise_invalid_job_only() -> None:
    good = codec.decode(make_spec().canonical_bytes())
    rng = random.Random(7)
    refused = 0
    for _ in range(400):
        body = copy.deepcopy(good)
        target = body["program"]
        path = rng.choice([("name",), ("inputs",), ("outputs",), ("steps",), ("steps", 0),
                           ("steps", 0, "op"), ("steps", 1, "args"), ("steps", 1, "kwargs"),
                           ("steps", 0, "result"), ("steps", 1, "target")])  # fmt: skip
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = rng.choice(WRONG_VALUES)
        encoded = encode_sorted(body)
        try:
            back = SignedJob.from_wire(signed_by_scientist(encoded))
        except InvalidJob:
            refused += 1
        else:  # a value the plan format allows: accepted exactly as sent
            assert back.spec.canonical_bytes() == encoded
    assert refused > 250


def test_oversize_input_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidJob, match="at most"):
        SignedJob.from_wire(b"\xa0" * (spec_module.MAX_WIRE_BYTES + 1))
    huge_list = codec.encode({"v": 1, "body": codec.encode([0] * 300_000),
                              "key": bytes(32), "sig": bytes(64)})  # fmt: skip
    with pytest.raises(InvalidJob):
        SignedJob.from_wire(huge_list)
    # a declared length far beyond the bytes present
    with pytest.raises(InvalidJob):
        SignedJob.from_wire(b"\xa4\x61v\x01\x64body\x5b" + (1 << 40).to_bytes(8, "big"))
