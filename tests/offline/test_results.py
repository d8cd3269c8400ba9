"""Released results: outputs as deterministic bytes, a bundle with the host's receipt, and
nothing decoded until the receipt, the job and the bytes all check out."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from duet_p2p.identity import Identity
from duet_p2p.modules import ModuleLimits
from duet_p2p.offline import results as results_module
from duet_p2p.offline.receipt import InvalidReceipt, Receipt, content_hash
from duet_p2p.offline.results import (
    InvalidResult,
    JobUpdate,
    ResultBundle,
    decode_output,
    encode_output,
    open_result,
)
from duet_p2p.offline.spec import SignedJob
from duet_p2p.rpc import codec
from duet_p2p.rpc.codec import ObjectRef
from tests.offline.test_spec import NOW, SCIENTIST, make_program, make_spec

MB = 1 << 20
DATA = torch.arange(12, dtype=torch.float32).reshape(3, 4)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return Identity.load("host", directory=tmp_path_factory.mktemp("identities"))


def two_output_job(host: Identity, **changes: Any) -> SignedJob:
    program = make_program(3)
    program["outputs"] = ["r1", "r2"]
    fields: dict[str, Any] = dict(
        host_id=host.id, program=program, outputs={"accuracy": "r1", "model": "r2"}
    )
    fields.update(changes)
    return make_spec(**fields).sign(SCIENTIST)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


def release(host: Identity, job: SignedJob, values: dict[str, Any]) -> ResultBundle:
    """What the host sends: each output's bytes, and its receipt over them."""
    return release_bytes(host, job, {name: encode_output(v) for name, v in values.items()})


def release_bytes(host: Identity, job: SignedJob, outputs: dict[str, bytes]) -> ResultBundle:
    receipt = Receipt.issue(
        host, job, inputs={"x": content_hash(DATA)},
        outputs={name: content_hash(data) for name, data in outputs.items()},
        submitted_at=NOW + 1, started_at=NOW + 2, finished_at=NOW + 3, released_at=NOW + 4,
    )  # fmt: skip
    return ResultBundle(job.job_id, receipt.to_wire(), outputs)


def round_trip(value: Any) -> Any:
    return decode_output(encode_output(value), max_bytes=MB)


# -- one output ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8,
     torch.uint8, torch.bool, torch.complex64],
)  # fmt: skip
def test_tensors_of_several_dtypes(dtype: torch.dtype) -> None:
    tensor = (torch.arange(24) % 5).reshape(2, 3, 4).to(dtype)
    back = round_trip(tensor)
    assert type(back) is torch.Tensor and back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)
    assert torch.equal(round_trip(tensor.transpose(0, 2)), tensor.transpose(0, 2))
    assert torch.equal(round_trip(tensor[0, 0, 0]), tensor[0, 0, 0])  # 0-d


def test_numbers_and_nested_containers() -> None:
    value = {
        "accuracy": 0.93, "steps": 400, "ok": True, "note": "ünïcode", "none": None,
        "z": 1 + 2j, 7: "int key", "curve": [0.5, 0.25, (1, 2.5)],
        "per_class": {"a": torch.ones(3), "b": [torch.zeros(2, dtype=torch.int32)]},
        "array": np.arange(4, dtype=np.int16), "numpy_scalar": np.float64(0.5),
    }  # fmt: skip
    back = round_trip(value)
    assert back["accuracy"] == 0.93 and back["steps"] == 400 and back["ok"] is True
    assert back["note"] == "ünïcode" and back["none"] is None and back["z"] == 1 + 2j
    assert back[7] == "int key" and back["curve"] == [0.5, 0.25, (1, 2.5)]
    assert torch.equal(back["per_class"]["a"], torch.ones(3))
    assert back["per_class"]["b"][0].dtype == torch.int32
    assert np.array_equal(back["array"], np.arange(4, dtype=np.int16))
    assert type(back["numpy_scalar"]) is float
    assert round_trip(3.25) == 3.25 and round_trip(None) is None and round_trip("x") == "x"
    assert math.isnan(round_trip(float("nan"))) and round_trip(-math.inf) == -math.inf


def test_a_model_goes_as_its_spec_and_comes_back_equal() -> None:
    sent = model()
    sent.eval()
    data = encode_output(sent)
    assert b"torch.nn" not in data and b"__reduce__" not in data  # data, never code or pickle
    back = decode_output(data, max_bytes=MB)
    assert type(back) is nn.Sequential and [type(m) for m in back] == [nn.Linear, nn.ReLU,
                                                                       nn.Linear]  # fmt: skip
    assert back.training is False
    for (name, a), (other, b) in zip(
        sent.state_dict().items(), back.state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(a, b)
    x = torch.randn(5, 8)
    assert torch.equal(back(x), sent(x))


def test_encoding_is_deterministic() -> None:
    value = {"b": torch.arange(6.0).reshape(2, 3), "a": [1, {"y": 2, "x": 3}]}
    reordered = {"a": [1, {"x": 3, "y": 2}], "b": torch.arange(6.0).reshape(2, 3)}
    assert encode_output(value) == encode_output(value) == encode_output(reordered)
    assert encode_output(model()) == encode_output(model())
    fields = codec.decode(encode_output(value))
    assert list(fields) == ["value", "module"]  # canonical: shorter encoded key first
    assert list(fields["value"]) == ["a", "b"] and list(fields["value"]["a"][1]) == ["x", "y"]
    assert encode_output(torch.ones(2)) != encode_output(torch.ones(2, dtype=torch.float64))


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize(
    "value",
    [Custom(), nn.Sequential(Custom()), {"m": nn.Linear(2, 2)}, {1.5: 2}, {None: 1}, {1, 2},
     object(), ObjectRef("abc"), slice(1, 2), ..., torch.float32, np.array(["text"]),
     torch.ones(2).to_sparse(), "\ud800"],
)  # fmt: skip
def test_what_cannot_be_released_is_refused(value: Any) -> None:
    with pytest.raises(InvalidResult):
        encode_output(value)


def _raw_output(module: Any, value: Any) -> bytes:
    return codec.encode({"value": value, "module": module})


@pytest.mark.parametrize(
    "data",
    [
        b"", b"\xff", b"\x9f\x01\xff", bytes(64), codec.encode([1, 2]), codec.encode(5),
        codec.encode({"value": 1}), codec.encode({"value": 1, "module": False, "x": 2}),
        _raw_output(1, 2), _raw_output(None, 2), _raw_output(False, ObjectRef("abc")),
        _raw_output(False, [slice(1, 2)]), _raw_output(False, {"d": torch.float32}),
        _raw_output(False, {"e": ...}), _raw_output(True, [1, 2]), _raw_output(True, "Linear"),
    ],
)  # fmt: skip
def test_garbage_and_foreign_values_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidResult):
        decode_output(data, max_bytes=MB)


def test_a_module_spec_with_an_unknown_or_forged_layer_is_refused() -> None:
    spec = codec.decode(encode_output(model()))["value"]
    unknown = {**spec, "children": {**spec["children"], "1": {**spec["children"]["1"],
                                                               "type": "Evil"}}}  # fmt: skip
    with pytest.raises(InvalidResult, match="unknown module type"):
        decode_output(_raw_output(True, unknown), max_bytes=MB)
    custom = {"type": "__main__.Custom", "args": {}, "state": {}, "training": True}
    with pytest.raises(InvalidResult, match="unknown module type"):
        decode_output(_raw_output(True, custom), max_bytes=MB)
    layer = spec["children"]["0"]
    forged = {**layer, "state": {**layer["state"], "weight": torch.ones(9, 9)}}
    with pytest.raises(InvalidResult, match="shape"):
        decode_output(_raw_output(True, forged), max_bytes=MB)
    code = {**layer, "args": {**layer["args"], "forward": "import os"}}
    with pytest.raises(InvalidResult, match="unknown argument"):
        decode_output(_raw_output(True, code), max_bytes=MB)
    huge = {"type": "Linear", "args": {"in_features": 10_000, "out_features": 10_000},
            "state": {}, "training": True}  # fmt: skip
    with pytest.raises(InvalidResult, match="limit"):
        decode_output(_raw_output(True, huge), max_bytes=MB)
    small = ModuleLimits(max_parameters=10)
    with pytest.raises(InvalidResult, match="limit"):
        decode_output(encode_output(model()), max_bytes=MB, module_limits=small)


def test_oversize_output_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_output(torch.ones(1000))

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(codec, "decode", never)
    with pytest.raises(InvalidResult, match="over"):
        decode_output(data, max_bytes=len(data) - 1)
    with pytest.raises(InvalidResult):
        decode_output("text", max_bytes=MB)  # type: ignore[arg-type]


def test_every_flipped_byte_or_cut_of_an_output_fails_closed() -> None:
    data = encode_output({"acc": 0.5, "w": torch.arange(4.0), "n": [1, "two"]})
    for index in range(len(data)):
        tampered = bytearray(data)
        tampered[index] ^= 0x21
        try:
            decode_output(bytes(tampered), max_bytes=MB)
        except InvalidResult:
            pass  # refused, or (for a flipped value byte) another valid value: never another error
    for cut in range(len(data)):
        with pytest.raises(InvalidResult):
            decode_output(data[:cut], max_bytes=MB)


# -- the bundle ----------------------------------------------------------------------------


def test_bundle_round_trip_and_canonical_form(host: Identity) -> None:
    job = two_output_job(host)
    bundle = release(host, job, {"model": model(), "accuracy": 0.91})
    data = bundle.to_bytes()
    assert b"".join(bundle.to_parts()) == data
    back = ResultBundle.from_bytes(data, max_bytes=MB)
    assert back == bundle and back.to_bytes() == data
    assert list(codec.decode(data)) == ["v", "job_id", "outputs", "receipt"]
    assert list(back.outputs) == ["model", "accuracy"]  # sorted as encoded: shorter first
    assert ResultBundle.from_bytes(memoryview(data), max_bytes=MB) == bundle


def test_a_bundle_signed_by_a_real_host_opens(host: Identity) -> None:
    job = two_output_job(host)
    sent = model()
    data = release(host, job, {"accuracy": 0.91, "model": sent}).to_bytes()
    receipt, values = open_result(
        ResultBundle.from_bytes(data, max_bytes=MB), job, host_id=host.id, max_bytes=MB
    )
    assert receipt.host_id == host.id and receipt.job_hash == job.hash()
    assert set(values) == {"accuracy", "model"} and values["accuracy"] == 0.91
    for a, b in zip(sent.parameters(), values["model"].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    real = results_module.decode_output

    def spy(data: bytes, **kwargs: Any) -> Any:
        calls.append(data)
        return real(data, **kwargs)

    monkeypatch.setattr(results_module, "decode_output", spy)
    return calls


def _refused(bundle: ResultBundle, job: SignedJob, host_id: str, match: str,
             decoded: list[bytes], error: type[Exception] = InvalidResult) -> None:  # fmt: skip
    with pytest.raises(error, match=match):
        open_result(bundle, job, host_id=host_id, max_bytes=MB)
    assert decoded == []


def test_a_flipped_byte_in_an_output_is_refused(host: Identity, no_decoding: list) -> None:
    job = two_output_job(host)
    bundle = release(host, job, {"accuracy": 0.91, "model": model()})
    for name in bundle.outputs:
        for index in (0, len(bundle.outputs[name]) // 2, len(bundle.outputs[name]) - 1):
            tampered = bytearray(bundle.outputs[name])
            tampered[index] ^= 0x01
            forged = ResultBundle(job.job_id, bundle.receipt,
                                  {**bundle.outputs, name: bytes(tampered)})  # fmt: skip
            _refused(forged, job, host.id, "not the one the host released", no_decoding,
                     InvalidReceipt)  # fmt: skip


def test_an_output_swapped_for_another_jobs_is_refused(host: Identity, no_decoding) -> None:
    job, other = two_output_job(host), two_output_job(host, job_id="cd" * 16)
    bundle = release(host, job, {"accuracy": 0.91, "model": model()})
    theirs = release(host, other, {"accuracy": 0.42, "model": nn.Sequential(nn.Linear(8, 2))})
    swapped = ResultBundle(job.job_id, bundle.receipt,
                           {**bundle.outputs, "model": theirs.outputs["model"]})  # fmt: skip
    _refused(swapped, job, host.id, "not the one", no_decoding, InvalidReceipt)
    their_receipt = ResultBundle(job.job_id, theirs.receipt, theirs.outputs)
    _refused(their_receipt, job, host.id, "another job", no_decoding, InvalidReceipt)
    _refused(theirs, job, host.id, "for job cdcd", no_decoding)


def test_a_receipt_from_another_key_is_refused(host: Identity, no_decoding: list) -> None:
    mallory = Identity.generate()
    job = two_output_job(host)
    values = {"accuracy": 1.0, "model": model()}
    genuine = release(host, job, values)
    # Mallory's key, claiming the host's ID: the key does not hash to it.
    receipt = Receipt.from_wire(genuine.receipt)
    fields = {name: getattr(receipt, name) for name in receipt.__dataclass_fields__}
    fields.update(public_key=mallory.public_key, signature=mallory.sign_bytes(receipt._message()))
    forged = ResultBundle(job.job_id, Receipt(**fields).to_wire(), genuine.outputs)
    _refused(forged, job, host.id, "does not belong", no_decoding, InvalidReceipt)
    # A receipt Mallory may sign (a job for Mallory as host) is not the host's.
    theirs = two_output_job(mallory, job_id=job.job_id)
    bundle = release(mallory, theirs, values)
    _refused(bundle, job, host.id, "not", no_decoding, InvalidReceipt)
    _refused(bundle, theirs, host.id, "not", no_decoding, InvalidReceipt)
    # The genuine result, but the scientist expects another host.
    _refused(genuine, job, mallory.id, "not", no_decoding, InvalidReceipt)


def test_missing_or_extra_outputs_are_refused(host: Identity, no_decoding: list) -> None:
    job = two_output_job(host)
    full = release(host, job, {"accuracy": 0.91, "model": model()})
    missing = ResultBundle(job.job_id, full.receipt, {"accuracy": full.outputs["accuracy"]})
    _refused(missing, job, host.id, "missing: \\['model'\\]", no_decoding)
    extra = ResultBundle(job.job_id, full.receipt, {**full.outputs, "secret": b"x"})
    _refused(extra, job, host.id, "extra: \\['secret'\\]", no_decoding)
    # A receipt that itself leaves an output out (the host released one only).
    partial = release(host, job, {"accuracy": 0.91})
    _refused(partial, job, host.id, "missing", no_decoding)
    only = ResultBundle(job.job_id, partial.receipt, {**partial.outputs, "model": b"\xa0"})
    _refused(only, job, host.id, "not the ones", no_decoding, InvalidReceipt)


def test_an_oversize_output_is_refused_before_any_decoding(host: Identity, no_decoding) -> None:
    job = two_output_job(host, max_result_bytes=1 << 20)
    bundle = release(host, job, {"accuracy": 0.5, "model": torch.ones(10_000)})
    with pytest.raises(InvalidResult, match="over"):
        open_result(bundle, job, host_id=host.id, max_bytes=1000)
    assert no_decoding == []


def test_a_tampered_bundle_never_opens(host: Identity) -> None:
    job = two_output_job(host)
    data = release(host, job, {"accuracy": 0.91, "model": nn.Linear(2, 1)}).to_bytes()
    rng = random.Random(5)
    for index in rng.sample(range(len(data)), 300):
        tampered = bytearray(data)
        tampered[index] ^= 1 << rng.randrange(8)
        try:
            bundle = ResultBundle.from_bytes(bytes(tampered), max_bytes=MB)
            open_result(bundle, job, host_id=host.id, max_bytes=MB)
        except (InvalidResult, InvalidReceipt):
            continue
        raise AssertionError(f"a flip at {index} was accepted")


def _bundle_map(**changes: Any) -> bytes:
    fields: dict[str, Any] = {"v": 1, "job_id": "ab" * 16, "receipt": b"r", "outputs": {"a": b""}}
    fields.update(changes)
    return codec.encode({k: v for k, v in fields.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize(
    "data",
    [
        b"", b"\x00", b"\xa4", b"garbage!", codec.encode([]), _bundle_map(v=2), _bundle_map(v=True),
        _bundle_map(job_id="AB" * 16), _bundle_map(job_id=None), _bundle_map(receipt="r"),
        _bundle_map(receipt=b""), _bundle_map(outputs={}), _bundle_map(outputs=[b""]),
        _bundle_map(outputs={"a": "text"}), _bundle_map(outputs={"1a": b""}),
        _bundle_map(outputs={"a" * 65: b""}), _bundle_map(outputs={"a-b": b""}),
        _bundle_map(outputs={f"o{i}": b"" for i in range(65)}), _bundle_map(extra=1),
        _bundle_map(receipt=_DROP), _bundle_map(outputs={"a": torch.ones(2)}),
    ],
)  # fmt: skip
def test_malformed_bundles_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidResult):
        ResultBundle.from_bytes(data, max_bytes=MB)


def test_oversize_bundle_is_refused_before_decoding(host: Identity) -> None:
    data = release(host, two_output_job(host), {"accuracy": 0.5, "model": model()}).to_bytes()
    with pytest.raises(InvalidResult, match="over"):
        ResultBundle.from_bytes(data, max_bytes=len(data) - 1)
    assert ResultBundle.from_bytes(data, max_bytes=len(data)).job_id == "ab" * 16
    with pytest.raises(InvalidResult):
        ResultBundle.from_bytes("text", max_bytes=MB)  # type: ignore[arg-type]


def test_a_100_mb_tensor_output_stays_within_three_times_its_size(
    host: Identity, tmp_path: Path
) -> None:
    """The host writes a 100 MB tensor's bundle without copying the output again; the
    scientist's process, holding the bundle's bytes, verifies and decodes it with at most
    about twice their size more resident memory at its peak (the outputs, then the tensor)."""
    job = make_spec(host_id=host.id, max_result_bytes=1 << 30).sign(SCIENTIST)
    out = encode_output(torch.arange(25_000_000, dtype=torch.float32))
    bundle = release_bytes(host, job, {"summary": out})
    parts = bundle.to_parts()
    assert any(isinstance(p, memoryview) and p.obj is out for p in parts)  # by reference
    with open(tmp_path / "bundle", "wb") as file:
        file.writelines(parts)
    (tmp_path / "job").write_bytes(job.to_wire())
    del out, bundle, parts
    script = textwrap.dedent(
        """
        import os, sys
        import torch
        from duet_p2p.offline.results import ResultBundle, open_result
        from duet_p2p.offline.spec import SignedJob

        folder, host_id = sys.argv[1], sys.argv[2]
        job = SignedJob.from_wire(open(os.path.join(folder, "job"), "rb").read())
        data = open(os.path.join(folder, "bundle"), "rb").read()
        def kib(field):  # of this process's memory since exec (ru_maxrss survives a fork)
            lines = open("/proc/self/status").read().splitlines()
            return int(next(x for x in lines if x.startswith(field + ":")).split()[1])

        base = kib("VmRSS")  # resident now, the bundle's bytes included
        bundle = ResultBundle.from_bytes(data, max_bytes=1 << 30)
        del data
        _, values = open_result(bundle, job, host_id=host_id, max_bytes=1 << 30)
        expected = torch.tensor([24999997.0, 24999998.0, 24999999.0])
        assert torch.equal(values["summary"][-3:], expected)
        print((kib("VmHWM") - base) * 1024 / 100e6)
        """
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), host.id],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    extra = float(done.stdout.strip())
    assert extra < 2.3, f"decoding took {extra:.2f}x the payload on top of it"


# -- updates -------------------------------------------------------------------------------


def test_update_round_trip() -> None:
    update = JobUpdate("ab" * 16, "running", "step 3 of 10", NOW, (3, 10))
    data = update.to_bytes()
    back = JobUpdate.from_bytes(data)
    assert back == update and back.state == "running" and back.progress == (3, 10)
    assert JobUpdate("ab" * 16, "withheld", "too precise", 1_700_000_000).at == NOW
    assert JobUpdate.from_bytes(JobUpdate("ab" * 16, "queued", "", NOW).to_bytes()).progress == (
        0, 0)  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"job_id": "xyz"}, {"state": "pending"}, {"state": 3}, {"reason": "x" * 2001},
        {"reason": b"bytes"}, {"reason": None}, {"reason": "\ud800"}, {"at": -1.0},
        {"at": float("nan")}, {"at": "now"}, {"progress": (5, 3)}, {"progress": (1,)},
        {"progress": (-1, 3)}, {"progress": (1.0, 3)}, {"progress": "1/3"},
    ],
)  # fmt: skip
def test_bad_updates_are_not_built(change: dict[str, Any]) -> None:
    fields: dict[str, Any] = dict(job_id="ab" * 16, state="running", reason="", at=NOW)
    fields.update(change)
    with pytest.raises(InvalidResult):
        JobUpdate(**fields)


def test_hostile_update_bytes_are_refused() -> None:
    good = codec.decode(JobUpdate("ab" * 16, "failed", "host restarted", NOW, (1, 2)).to_bytes())
    for name in good:
        for value in (None, True, -1, 1.5, "", b"x", [], {}, "x" * 2001, [1, 2, 3], NOW):
            data = codec.encode(dict(sorted({**good, name: value}.items(),
                                            key=lambda kv: codec.encode(kv[0]))))  # fmt: skip
            try:
                back = JobUpdate.from_bytes(data)
            except InvalidResult:
                continue
            assert back.to_bytes() == data  # only valid, canonical ones pass
    with pytest.raises(InvalidResult, match="canonical"):
        JobUpdate.from_bytes(codec.encode(dict(reversed(list(good.items())))))
    with pytest.raises(InvalidResult):
        JobUpdate.from_bytes(codec.encode({**good, "at": int(NOW)}))
    with pytest.raises(InvalidResult, match="exactly"):
        JobUpdate.from_bytes(codec.encode({**good, "extra": 1}))
    with pytest.raises(InvalidResult):
        JobUpdate.from_bytes(bytes(20_000))
    rng = random.Random(9)
    for _ in range(500):
        with pytest.raises(InvalidResult):
            JobUpdate.from_bytes(rng.randbytes(rng.randrange(1, 80)))


def test_results_over_the_jobs_own_cap_are_refused(host: Identity, no_decoding) -> None:
    job = two_output_job(host, max_result_bytes=10_000)
    bundle = release(host, job, {"accuracy": 0.5, "model": torch.ones(10_000)})
    with pytest.raises(InvalidResult, match="the job allowed 10000"):
        open_result(bundle, job, host_id=host.id, max_bytes=1 << 20)
    assert no_decoding == []
