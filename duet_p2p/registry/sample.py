"""A listing's sample: a few records the owner chose to publish, shaped like the schema.

A mock (:mod:`duet_p2p.registry.mock`) is made from the schema alone; a sample is the
owner's own small example (synthetic, or rows the owner knows to be public), published to
everyone with the signed listing. It is held to the schema it sits beside, so a scientist
can dry-run code on it exactly as on the real data:

- ``{name: values}`` with one entry per schema entry, nothing else;
- a column (an entry without a shape) is a list of 1 to :data:`MAX_ROWS` values, every
  column as long as the others; ``None`` is a missing value;
- a tensor (an entry with a shape) is nested lists of its rank: the first dimension 1 up to
  the declared size, the others exactly as declared (any size where ``-1``); no ``None``;
- each value fits its dtype: integers in the dtype's range, finite floats, booleans, text
  of one printable line, ISO dates and times;
- at most :data:`MAX_VALUES` values in all (the listing caps the bytes too).

Anything else is a :class:`ValueError` naming the entry; nothing is truncated or coerced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

from duet_p2p.registry.croissant import dtype_kind

__all__ = [
    "MAX_ROWS", "MAX_TEXT_CHARS", "MAX_VALUES", "check_sample", "nested_sizes", "sample_rows",
    "sample_to_pandas",
]  # fmt: skip

MAX_ROWS = 100
"""Most records in a sample (a table's rows, a tensor's first dimension)."""
MAX_VALUES = 5_000
"""Most values in a sample, over all its entries."""
MAX_TEXT_CHARS = 200
"""Longest text value."""
MAX_DATE_CHARS = 40
_INT_RANGES = {
    "uint8": (0, 255), "int8": (-128, 127), "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1), "int64": (-((1 << 53) - 1), (1 << 53) - 1),
}  # fmt: skip
"""Integer dtypes' ranges (int64 within what every JSON reader holds exactly)."""
_FLOAT_LIMITS = {
    "float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38,
}  # fmt: skip
"""Largest magnitude each narrow float dtype holds (a sample never becomes infinite)."""
_MAX_EXACT = (1 << 53) - 1
"""Largest integer a float column takes as an integer literal (JSON readers hold it)."""


def check_sample(sample: object, schema: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``sample`` checked against ``schema`` (see the module docstring); a plain copy
    (lists and values only). ``{}`` is no sample."""
    if type(sample) is not dict:
        raise ValueError("a sample is a map from schema entry names to values")
    if not sample:
        return {}
    names = [entry["name"] for entry in schema]
    if not schema:
        raise ValueError("a sample needs a schema to follow")
    if set(sample) != set(names):
        missing = sorted(set(names) - set(sample))[:5]
        extra = sorted(str(key)[:40] for key in set(sample) - set(names))[:5]
        raise ValueError(
            "a sample has one entry per schema entry"
            + (f"; missing {missing}" if missing else "")
            + (f"; not in the schema {extra}" if extra else "")
        )
    budget = [MAX_VALUES]
    out: dict[str, Any] = {}
    rows: int | None = None
    for entry in schema:
        name, dtype = entry["name"], entry["dtype"]
        values = sample[name]
        if "shape" in entry:
            out[name] = _tensor(values, list(entry["shape"]), dtype, name, budget)
            continue
        column = _column(values, dtype, name, budget)
        if rows is not None and len(column) != rows:
            raise ValueError(f"sample column {name!r} has {len(column)} values, not {rows}")
        rows = len(column)
        out[name] = column
    return out


def sample_rows(sample: Mapping[str, Any], schema: Sequence[Mapping[str, Any]]) -> int:
    """How many records ``sample`` (checked) holds: its columns' rows if it has columns,
    else the first dimension of its first tensor (1 for a single value)."""
    for entry in schema:
        if "shape" not in entry:
            return len(sample.get(entry["name"]) or [])
    for entry in schema:
        values = sample.get(entry["name"])
        if isinstance(values, list):
            return len(values)
        if values is not None:
            return 1
    return 0


_PANDAS_DTYPES = {
    "int8": "Int8", "int16": "Int16", "int32": "Int32", "int64": "Int64", "uint8": "UInt8",
    "float16": "float16", "bfloat16": "float32", "float32": "float32", "float64": "float64",
    "bool": "boolean", "category": "category",
}  # fmt: skip
"""The pandas dtype of each column dtype (nullable integers and booleans: a sample may
miss values); dates, times and text stay text, as in a mock."""


def sample_to_pandas(sample: Mapping[str, Any], schema: Sequence[Mapping[str, Any]]) -> Any:
    """A checked sample of columns as a pandas DataFrame, each column of its schema dtype
    (``float32`` stays float32 though ``1.0`` travels as ``1``); needs pandas."""
    import pandas as pd

    columns = {}
    for entry in schema:
        values = sample[entry["name"]]
        dtype = _PANDAS_DTYPES.get(entry["dtype"])
        if dtype is not None and dtype.startswith("float"):
            values = [math.nan if value is None else value for value in values]
        columns[entry["name"]] = pd.Series(values, dtype=dtype or object)
    return pd.DataFrame(columns)


def _column(values: object, dtype: str, name: str, budget: list[int]) -> list[Any]:
    if type(values) is not list or not 1 <= len(values) <= MAX_ROWS:
        raise ValueError(f"sample column {name!r} is a list of 1 to {MAX_ROWS} values")
    _spend(budget, len(values))
    kind = dtype_kind(dtype)
    return [None if value is None else _value(value, kind, dtype, name) for value in values]


def _tensor(values: object, shape: list[int], dtype: str, name: str, budget: list[int]) -> Any:
    kind = dtype_kind(dtype)
    if not shape:
        _spend(budget, 1)
        return _value(values, kind, dtype, name)

    def walk(item: object, depth: int) -> Any:
        declared = shape[depth]
        if type(item) is not list:
            raise ValueError(f"sample tensor {name!r} is nested lists of rank {len(shape)}")
        if depth == 0:
            most = MAX_ROWS if declared == -1 else min(declared, MAX_ROWS)
            if not 1 <= len(item) <= most:
                raise ValueError(f"sample tensor {name!r} holds 1 to {most} records")
        elif declared != -1 and len(item) != declared:
            raise ValueError(
                f"sample tensor {name!r} has size {len(item)} in dimension {depth}, not {declared}"
            )
        elif not item:
            raise ValueError(f"sample tensor {name!r} has an empty dimension {depth}")
        if depth == len(shape) - 1:
            _spend(budget, len(item))
            return [_value(value, kind, dtype, name) for value in item]
        inner = [walk(part, depth + 1) for part in item]
        if len({tuple(nested_sizes(part)) for part in inner}) > 1:
            raise ValueError(f"sample tensor {name!r} is not rectangular")
        return inner

    return walk(values, 0)


def nested_sizes(values: Any) -> list[int]:
    """The sizes of nested lists along their first items (a tensor sample's shape)."""
    sizes = []
    while type(values) is list:
        sizes.append(len(values))
        values = values[0] if values else None
    return sizes


def _spend(budget: list[int], count: int) -> None:
    budget[0] -= count
    if budget[0] < 0:
        raise ValueError(f"a sample holds at most {MAX_VALUES} values")


def _value(value: object, kind: str, dtype: str, name: str) -> Any:
    if kind == "integer":
        low, high = _INT_RANGES.get(dtype, _INT_RANGES["int64"])
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"sample {name!r} holds {dtype} integers from {low} to {high}")
        return value
    if kind == "float":
        limit = _FLOAT_LIMITS.get(dtype, math.inf)
        if type(value) is int:
            fits = abs(value) <= min(limit, _MAX_EXACT)
        else:
            fits = type(value) is float and math.isfinite(value) and abs(value) <= limit
        if not fits:
            raise ValueError(f"sample {name!r} holds finite numbers that fit {dtype}")
        return value
    if kind == "boolean":
        if type(value) is not bool:
            raise ValueError(f"sample {name!r} holds true or false")
        return value
    if type(value) is not str or not value.isprintable():
        raise ValueError(f"sample {name!r} holds text of printable characters")
    if kind == "text":
        if len(value) > MAX_TEXT_CHARS:
            raise ValueError(
                f"sample {name!r} holds one printable line of at most {MAX_TEXT_CHARS} characters"
            )
        return value
    try:
        if len(value) > MAX_DATE_CHARS:
            raise ValueError(value)
        (date if kind == "date" else datetime).fromisoformat(value)
    except ValueError:
        raise ValueError(f"sample {name!r} holds ISO 8601 {kind}s") from None
    return value
