"""Loading host.toml datasets: each format, the Owner.host arguments, and hostile files."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import duet_p2p as sy
from duet_p2p.errors import ConfigurationError
from duet_p2p.host.config import DatasetSpec, load_config
from duet_p2p.host.datasets import host_kwargs, load_dataset
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner.owner import Owner
from duet_p2p.permissions import AuditLog

ROOT = Path(__file__).resolve().parents[2]
WHERE = "host.toml: datasets[3]"


def spec(path: Path, fmt: str, **fields: Any) -> DatasetSpec:
    return DatasetSpec(name="d", path=path, format=fmt, where=WHERE, **fields)


def refused(spec_: DatasetSpec, field: str = "path", **kwargs: Any) -> str:
    with pytest.raises(ConfigurationError) as caught:
        load_dataset(spec_, **kwargs)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}.{field}: "), message
    return message


def _unpickled(path: str) -> None:
    Path(path).write_text("unpickled")


class Payload:
    """Runs code when unpickled: the attack a pickle-bearing .npy carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickled, (self.marker,))


# -- npy -----------------------------------------------------------------------------------


def test_npy_loads_as_a_tensor_with_its_columns(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "x.npy", array)
    s = spec(tmp_path / "x.npy", "npy", columns=("a", "b", "id"), identifier="id")
    value = load_dataset(s)
    assert isinstance(value, torch.Tensor) and value.dtype == torch.float64
    assert torch.equal(value, torch.from_numpy(array))
    assert host_kwargs(s) == {
        "tags": ("d",), "description": "", "searchable": True, "public": False,
        "show_metadata": False, "columns": ("a", "b", "id"), "identifier": "id",
        "rows_per_identifier": 1,
    }  # fmt: skip


@pytest.mark.parametrize("dtype", ["<i4", ">f8", "|b1", "<u1", "<f2", ">i8"])
def test_npy_numeric_dtypes_load_in_native_order(tmp_path: Path, dtype: str) -> None:
    array = np.array([[0, 1], [1, 0]], dtype=dtype)
    np.save(tmp_path / "x.npy", array)
    value = load_dataset(spec(tmp_path / "x.npy", "npy"))
    assert value.tolist() == array.tolist()


def test_npy_fortran_order_and_scalars_load(tmp_path: Path) -> None:
    array = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    np.save(tmp_path / "f.npy", array)
    assert load_dataset(spec(tmp_path / "f.npy", "npy")).tolist() == array.tolist()
    np.save(tmp_path / "s.npy", np.float32(2.5))
    assert load_dataset(spec(tmp_path / "s.npy", "npy")).item() == 2.5


def test_npy_with_pickled_objects_is_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    np.save(tmp_path / "x.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    message = refused(spec(tmp_path / "x.npy", "npy"))
    assert "object: only numbers and booleans are hosted" in message
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # noqa: S301 - the payload is live
    assert marker.exists()


def test_plain_pickle_named_npy_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    (tmp_path / "x.npy").write_bytes(pickle.dumps(Payload(marker)))
    assert "is not an .npy array" in refused(spec(tmp_path / "x.npy", "npy"))
    assert not marker.exists()


def test_npz_named_npy_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    (tmp_path / "x.npz").rename(tmp_path / "x.npy")
    assert "is not an .npy array" in refused(spec(tmp_path / "x.npy", "npy"))


@pytest.mark.parametrize(
    "dtype", [np.complex128, "U3", "S3", "datetime64[s]", [("a", "<f8"), ("b", "<i4")]]
)
def test_npy_non_numeric_dtypes_are_refused(tmp_path: Path, dtype: Any) -> None:
    np.save(tmp_path / "x.npy", np.zeros(3, dtype=dtype))
    assert "only numbers and booleans" in refused(spec(tmp_path / "x.npy", "npy"))


def _npy_header(shape: tuple[int, ...]) -> bytes:
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("shape", "payload"),
    [((2**40, 2**20), b"\0" * 64), ((4,), b"\0" * 24), ((4,), b"\0" * 40), ((2**62, 8), b"")],
)
def test_npy_header_must_account_for_the_size(tmp_path: Path, shape: Any, payload: bytes) -> None:
    (tmp_path / "x.npy").write_bytes(_npy_header(shape) + payload)
    assert "header does not match its size" in refused(spec(tmp_path / "x.npy", "npy"))


def test_npy_header_matching_the_size_loads(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_bytes(_npy_header((4,)) + np.ones(4).tobytes())
    assert load_dataset(spec(tmp_path / "x.npy", "npy")).tolist() == [1.0] * 4


def test_columns_must_fit_the_tensor(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    message = refused(spec(tmp_path / "x.npy", "npy", columns=("a",)), "columns")
    assert "columns names 1 columns" in message


# -- the file itself -----------------------------------------------------------------------


def test_oversize_file_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros(100))
    size = (tmp_path / "x.npy").stat().st_size
    message = refused(spec(tmp_path / "x.npy", "npy"), max_bytes=size - 1)
    assert f"is {size} bytes, over the cap of {size - 1}" in message
    assert load_dataset(spec(tmp_path / "x.npy", "npy"), max_bytes=size).shape == (100,)
    (tmp_path / "x.csv").write_text("a\n" + "1\n" * 100)
    refused(spec(tmp_path / "x.csv", "csv"), max_bytes=10)


def test_file_gone_or_replaced_after_parsing_is_refused(tmp_path: Path) -> None:
    assert "cannot open" in refused(spec(tmp_path / "gone.npy", "npy"))
    (tmp_path / "dir.npy").mkdir()
    assert "not a regular file" in refused(spec(tmp_path / "dir.npy", "npy"))


def test_symlink_is_followed_to_a_regular_file(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones(2))
    (tmp_path / "link.npy").symlink_to(tmp_path / "x.npy")
    assert load_dataset(spec(tmp_path / "link.npy", "npy")).tolist() == [1.0, 1.0]


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.pkl").write_bytes(b"")
    refused(spec(tmp_path / "x.pkl", "pickle"), "format")


# -- safetensors ---------------------------------------------------------------------------


def test_safetensors_single_tensor_needs_no_name(tmp_path: Path) -> None:
    save_file({"x": torch.arange(6, dtype=torch.int32).reshape(2, 3)}, tmp_path / "one.st")
    s = spec(tmp_path / "one.st", "safetensors", columns=("a", "b", "c"))
    value = load_dataset(s)
    assert value.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert host_kwargs(s)["columns"] == ("a", "b", "c")


def test_safetensors_several_tensors_need_a_name(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2), "y": torch.ones(3)}, tmp_path / "two.safetensors")
    path = tmp_path / "two.safetensors"
    message = refused(spec(path, "safetensors"), "tensor")
    assert "holds 2 tensors (x, y): set tensor" in message
    assert load_dataset(spec(path, "safetensors", tensor="y")).tolist() == [1.0] * 3
    assert "holds no tensor 'z'" in refused(spec(path, "safetensors", tensor="z"), "tensor")


def test_safetensors_corrupt_or_complex_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    assert "cannot read" in refused(spec(tmp_path / "bad.safetensors", "safetensors"))
    save_file({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    assert "only numbers" in refused(spec(tmp_path / "c.safetensors", "safetensors"))


# -- csv and parquet -----------------------------------------------------------------------


FRAME = pd.DataFrame({"patient_id": [1, 2, 3], "age": [30.5, 41.0, 52.0], "smoker": ["y", "n", "y"]})  # fmt: skip


def test_csv_loads_as_a_dataframe(tmp_path: Path) -> None:
    FRAME.to_csv(tmp_path / "x.csv", index=False)
    s = spec(tmp_path / "x.csv", "csv", identifier="patient_id", tags=("t",), public=True)
    value = load_dataset(s)
    pd.testing.assert_frame_equal(value, FRAME)
    kwargs = host_kwargs(s)
    assert "columns" not in kwargs  # a DataFrame brings its own
    assert kwargs["tags"] == ("d", "t") and kwargs["public"] is True


def test_csv_identifier_must_be_a_column(tmp_path: Path) -> None:
    FRAME.to_csv(tmp_path / "x.csv", index=False)
    message = refused(spec(tmp_path / "x.csv", "csv", identifier="pid"), "identifier")
    assert "'pid' is not a column" in message


def test_empty_csv_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("")
    assert "cannot read" in refused(spec(tmp_path / "x.csv", "csv"))


def test_parquet_loads_as_a_dataframe(tmp_path: Path) -> None:
    FRAME.to_parquet(tmp_path / "x.parquet", engine="pyarrow")
    value = load_dataset(spec(tmp_path / "x.parquet", "parquet", identifier="patient_id"))
    pd.testing.assert_frame_equal(value, FRAME)


def test_garbage_parquet_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really PAR1")
    assert "cannot read" in refused(spec(tmp_path / "x.parquet", "parquet"))


# -- into an Owner -------------------------------------------------------------------------


def test_example_datasets_host_on_an_owner(tmp_path: Path) -> None:
    config = load_config(ROOT / "examples" / "host" / "host.toml")
    np.save(tmp_path / "x.npy", np.zeros((5, 2)))
    extra = spec(tmp_path / "x.npy", "npy", columns=("a", "id"), identifier="id")
    owner = Owner(allowlist=sy.DEFAULT_ALLOWLIST, limits=OwnerLimits(),
                  audit=AuditLog(tmp_path / "audit.jsonl"))  # fmt: skip
    try:
        for s in (*config.datasets, extra):
            record = owner.host(load_dataset(s), **host_kwargs(s))
            assert record.tags[0] == s.name and record.private == (not s.public)
            assert record.schema is not None and record.schema.identifier == s.identifier
        hosted = owner.store.owner_records()
        assert [r.tags for r in hosted] == [("ages", "demographics"), ("d",)]
    finally:
        owner.close()
