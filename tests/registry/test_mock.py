"""Mock data from a listing's schema: deterministic, shaped like it, capped."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from duet_p2p.registry.mock import (
    MAX_CELLS,
    MAX_ROWS,
    UNKNOWN_SIZE,
    mock_table,
    mock_tensors,
    mock_to_pandas,
)

FIELDS = [
    {"name": "age", "dtype": "int64", "description": "Age"},
    {"name": "weight", "dtype": "float32"},
    {"name": "smoker", "dtype": "bool"},
    {"name": "ward", "dtype": "str"},
    {"name": "seen", "dtype": "datetime64"},
    {"name": "born", "dtype": "date"},
]
TENSORS = [
    {"name": "x", "dtype": "float32", "shape": [3, -1]},
    {"name": "labels", "dtype": "torch.int64", "shape": [5]},
    {"name": "mask", "dtype": "bool", "shape": [2, 2]},
    {"name": "scale", "dtype": "float64", "shape": []},
    {"name": "half", "dtype": "bfloat16", "shape": [2]},
    {"name": "pixels", "dtype": "uint8", "shape": [0, 4]},
]


def test_table_matches_the_schema() -> None:
    table = mock_table(FIELDS, rows=7, seed=1)
    assert list(table) == [f["name"] for f in FIELDS]
    assert all(len(column) == 7 for column in table.values())
    assert all(type(v) is int for v in table["age"])
    assert all(type(v) is float for v in table["weight"])
    assert all(type(v) is bool for v in table["smoker"])
    assert all(type(v) is str for v in table["ward"])
    assert all(len(v) == 20 and v.endswith("Z") for v in table["seen"])
    assert all(len(v) == 10 for v in table["born"])
    assert json.loads(json.dumps(table)) == table


def test_table_is_deterministic_per_seed() -> None:
    assert mock_table(FIELDS, rows=20, seed=3) == mock_table(FIELDS, rows=20, seed=3)
    assert mock_table(FIELDS, rows=20, seed=3) != mock_table(FIELDS, rows=20, seed=4)


def test_a_column_does_not_depend_on_the_others() -> None:
    alone = mock_table(FIELDS[:1], rows=10, seed=2)
    together = mock_table(FIELDS, rows=10, seed=2)
    assert alone["age"] == together["age"]


def test_empty_table() -> None:
    assert mock_table(FIELDS, rows=0) == {f["name"]: [] for f in FIELDS}
    assert mock_table([], rows=5) == {}


@pytest.mark.parametrize(
    ("fields", "kwargs"),
    [
        (FIELDS, {"rows": MAX_ROWS + 1}),
        (FIELDS, {"rows": -1}),
        (FIELDS, {"rows": 2.0}),
        (FIELDS, {"rows": True}),
        (FIELDS, {"seed": -1}),
        (FIELDS, {"seed": "0"}),
        (
            [{"name": f"c{i}", "dtype": "int8"} for i in range(MAX_CELLS // MAX_ROWS + 1)],
            {"rows": MAX_ROWS},
        ),
        ([{"name": "a", "dtype": "complex64"}], {}),
        ([{"name": "a", "dtype": "int64"}] * 2, {}),
        ([{"name": "a", "dtype": "int64", "shape": [1]}], {}),
        ([{"name": "a"}], {}),
        ([{"name": "", "dtype": "int64"}], {}),
        ([{"name": 1, "dtype": "int64"}], {}),
        (["a"], {}),
        ("a", {}),
    ],
)
def test_table_refusals(fields: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        mock_table(fields, **kwargs)


def test_tensors_match_the_schema() -> None:
    arrays = mock_tensors(TENSORS, seed=0)
    assert list(arrays) == [t["name"] for t in TENSORS]
    assert arrays["x"].shape == (3, UNKNOWN_SIZE) and arrays["x"].dtype == np.float32
    assert arrays["labels"].shape == (5,) and arrays["labels"].dtype == np.int64
    assert arrays["mask"].shape == (2, 2) and arrays["mask"].dtype == np.bool_
    assert arrays["scale"].shape == () and arrays["scale"].dtype == np.float64
    assert arrays["half"].dtype == np.float32
    assert arrays["pixels"].shape == (0, 4) and arrays["pixels"].dtype == np.uint8


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint64"])
def test_integers_fit_every_integer_dtype(dtype: str) -> None:
    (array,) = mock_tensors([{"name": "t", "dtype": dtype, "shape": [500]}]).values()
    assert array.dtype == np.dtype(dtype)
    assert 0 <= int(array.min()) and int(array.max()) < 100


def test_tensors_are_deterministic_per_seed() -> None:
    first, second = mock_tensors(TENSORS, seed=5), mock_tensors(TENSORS, seed=5)
    other = mock_tensors(TENSORS, seed=6)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert not np.array_equal(first["x"], other["x"])


def test_tensor_cap_is_enforced() -> None:
    assert mock_tensors([{"name": "t", "dtype": "float32", "shape": [100, 100]}])["t"].size == (
        10_000
    )
    with pytest.raises(ValueError, match="10000 elements"):
        mock_tensors([{"name": "t", "dtype": "float32", "shape": [100, 101]}])
    with pytest.raises(ValueError, match="past 10 elements"):
        mock_tensors([{"name": "t", "dtype": "float32", "shape": [-1, -1]}], max_elements=10)


def test_tensor_cap_is_on_the_total() -> None:
    tensors = [{"name": f"t{i}", "dtype": "int8", "shape": [6]} for i in range(2)]
    with pytest.raises(ValueError, match="t1"):
        mock_tensors(tensors, max_elements=10)
    assert sum(a.size for a in mock_tensors(tensors, max_elements=12).values()) == 12


def test_huge_shape_is_refused_before_allocating() -> None:
    with pytest.raises(ValueError):
        mock_tensors([{"name": "t", "dtype": "float64", "shape": [1 << 40, 1 << 40]}])


@pytest.mark.parametrize(
    ("tensors", "kwargs"),
    [
        ([{"name": "t", "dtype": "str", "shape": [2]}], {}),
        ([{"name": "t", "dtype": "date", "shape": [2]}], {}),
        ([{"name": "t", "dtype": "complex64", "shape": [2]}], {}),
        ([{"name": "t", "dtype": "float32", "shape": [-2]}], {}),
        ([{"name": "t", "dtype": "float32", "shape": [2.0]}], {}),
        ([{"name": "t", "dtype": "float32", "shape": "2"}], {}),
        ([{"name": "t", "dtype": "float32", "shape": [1] * 33}], {}),
        ([{"name": "t", "dtype": "float32"}], {}),
        ([{"name": "t", "dtype": "float32", "shape": [2], "x": 1}], {}),
        ([{"name": "t", "dtype": "float32", "shape": [2]}] * 2, {}),
        ([{"name": "t", "dtype": "float32", "shape": [2]}], {"max_elements": -1}),
        ([{"name": "t", "dtype": "float32", "shape": [2]}], {"max_elements": 10**9}),
        ([{"name": "t", "dtype": "float32", "shape": [2]}], {"seed": 1.5}),
    ],
)
def test_tensor_refusals(tensors: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        mock_tensors(tensors, **kwargs)


def test_mock_to_pandas() -> None:
    pd = pytest.importorskip("pandas")
    frame = mock_to_pandas(mock_table(FIELDS, rows=4, seed=0))
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == [f["name"] for f in FIELDS]
    assert len(frame) == 4
    assert frame["age"].dtype.kind == "i" and frame["smoker"].dtype == bool
