"""Mock data for a listing: small synthetic values shaped like its schema.

A scientist dry-runs code on a mock before asking the host to run it on the real data.
A mock is made from the schema alone (names, dtypes, shapes) and a seed: the same schema
and seed give the same values, and no value comes from, or says anything about, the real
data. Sizes are capped: a table has at most :data:`MAX_ROWS` rows and :data:`MAX_CELLS`
values; tensors hold at most ``max_elements`` values together (an unknown size, ``-1``,
becomes :data:`UNKNOWN_SIZE`). Anything larger, or an unknown dtype, is a
:class:`ValueError`, never a truncated mock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from duet_p2p.registry.croissant import MAX_ITEMS, dtype_kind, shape_of

if TYPE_CHECKING:
    import pandas

__all__ = ["MAX_CELLS", "MAX_ROWS", "UNKNOWN_SIZE", "mock_table", "mock_tensors", "mock_to_pandas"]

MAX_ROWS = 1_000
MAX_CELLS = 100_000
UNKNOWN_SIZE = 4
"""The size a ``-1`` (unknown) dimension gets in a mock."""
MAX_ELEMENTS = 10_000_000
"""The largest ``max_elements`` a caller may ask for."""
MAX_SEED = (1 << 63) - 1
_EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
_YEAR_SECONDS = 366 * 86400
_NUMPY_DTYPES = {
    "int": "int64",
    "float": "float64",
    "bfloat16": "float32",  # numpy has no bfloat16: its mock is float32
}


def mock_table(
    schema_fields: Sequence[Mapping[str, Any]], rows: int = 20, seed: int = 0
) -> dict[str, list[Any]]:
    """Synthetic columns for ``schema_fields`` (``[{name, dtype, description?}]``).

    Returns ``{name: [value] * rows}`` in the fields' order, with plain Python values:
    ``int``, ``float``, ``bool`` or ``str`` (dates and times as ISO 8601 text).
    """
    fields = _specs(schema_fields, "field", {"name", "dtype"}, {"description"})
    _check_count(rows, "rows", MAX_ROWS)
    _check_count(seed, "seed", MAX_SEED)
    if rows * len(fields) > MAX_CELLS:
        raise ValueError(f"a mock table holds at most {MAX_CELLS} values")
    table: dict[str, list[Any]] = {}
    for index, spec in enumerate(fields):
        rng = np.random.default_rng([seed, index])
        table[spec["name"]] = _column(dtype_kind(spec["dtype"]), rows, rng)
    return table


def mock_tensors(
    tensors: Sequence[Mapping[str, Any]], seed: int = 0, max_elements: int = 10_000
) -> dict[str, np.ndarray]:
    """Synthetic arrays for ``tensors`` (``[{name, dtype, shape}]``), ``-1`` sizes filled.

    Integers are small (within every integer dtype's range), floats standard normal,
    booleans fair coins. Raises :class:`ValueError` when the tensors together would hold
    more than ``max_elements`` values.
    """
    specs = _specs(tensors, "tensor", {"name", "dtype", "shape"}, set())
    _check_count(seed, "seed", MAX_SEED)
    _check_count(max_elements, "max_elements", MAX_ELEMENTS)
    plans: list[tuple[str, str, tuple[int, ...]]] = []
    total = 0
    for spec in specs:
        kind = dtype_kind(spec["dtype"])
        if kind not in ("integer", "float", "boolean"):
            raise ValueError(f"tensor {spec['name']!r} cannot have dtype {spec['dtype']!r}")
        shape = tuple(UNKNOWN_SIZE if size == -1 else size for size in shape_of(spec["shape"]))
        total += math.prod(shape)
        if total > max_elements:
            raise ValueError(
                f"tensor {spec['name']!r} (shape {list(shape)}) takes the mock past "
                f"{max_elements} elements"
            )
        plans.append((spec["name"], _numpy_dtype(spec["dtype"]), shape))
    return {
        name: _array(dtype, shape, np.random.default_rng([seed, index]))
        for index, (name, dtype, shape) in enumerate(plans)
    }


def mock_to_pandas(table: Mapping[str, Sequence[Any]]) -> pandas.DataFrame:
    """``table`` (from :func:`mock_table`) as a pandas DataFrame; needs pandas."""
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - pandas is optional
        raise ImportError("mock_to_pandas needs pandas: pip install pandas") from exc
    return pd.DataFrame({name: list(values) for name, values in table.items()})


def _column(kind: str, rows: int, rng: np.random.Generator) -> list[Any]:
    if kind == "integer":
        return [int(v) for v in rng.integers(0, 100, size=rows)]
    if kind == "float":
        return [round(float(v), 4) for v in rng.standard_normal(rows)]
    if kind == "boolean":
        return [bool(v) for v in rng.random(rows) < 0.5]
    if kind == "text":
        return [f"value_{int(v)}" for v in rng.integers(0, 1000, size=rows)]
    times = [_EPOCH + timedelta(seconds=int(v)) for v in rng.integers(0, _YEAR_SECONDS, rows)]
    if kind == "date":
        return [t.date().isoformat() for t in times]
    return [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in times]


def _array(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _numpy_dtype(dtype: str) -> str:
    name = dtype.strip().lower().removeprefix("torch.").removeprefix("numpy.")
    return _NUMPY_DTYPES.get(name, name)


def _specs(
    items: object, what: str, required: set[str], allowed: set[str]
) -> list[Mapping[str, Any]]:
    """``items`` checked: a list of mappings with the ``required`` keys and unique names."""
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise ValueError(f"{what}s must be a list")
    if len(items) > MAX_ITEMS:
        raise ValueError(f"at most {MAX_ITEMS} {what}s")
    names: set[str] = set()
    for spec in items:
        if not isinstance(spec, Mapping):
            raise ValueError(f"each {what} must be a mapping")
        keys = set(spec)
        if not required <= keys or keys - required - allowed:
            raise ValueError(f"a {what} has the keys {sorted(required | allowed)}")
        name = spec["name"]
        if not isinstance(name, str) or not name or len(name) > 1_000:
            raise ValueError(f"a {what} name must be a non-empty string")
        if name in names:
            raise ValueError(f"{what} names must be unique")
        names.add(name)
    return list(items)


def _check_count(value: object, what: str, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError(f"{what} must be an integer from 0 to {limit}")
