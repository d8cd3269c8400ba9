"""The sample an owner publishes with a listing, and the check that it is not the data.

:func:`sample_values` turns what the owner passes as ``sample=`` (a pandas DataFrame, a
tensor or array for a one-tensor schema, or ``{name: values}``) into the plain lists a
listing holds; the listing then holds them to its schema
(:mod:`duet_p2p.registry.sample`).

A sample is published to everyone, so a sample that is a slice of the hosted data
(``sample=df.head()``) would publish private records. :func:`copied_record` looks for each
sample record among the hosted records (equal as they are or once rounded to float32,
missing values equal to missing values, categories compared by their codes, a subset of a
table's columns compared on those columns) and publishing refuses a copy unless the owner
says the data is public (``sample_copies_data=True``). A sample that cannot be lined up
with the hosted records is refused the same way: the check fails closed. It catches the
slip, not a determined owner: a record changed in one value is no longer a copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import torch

from duet_p2p.registry.croissant import dtype_kind
from duet_p2p.store import StoredObject

__all__ = [
    "CHUNK_ROWS", "TextTable", "UncheckedSample", "copied_record", "is_dataframe",
    "sample_values",
]  # fmt: skip

CHUNK_ROWS = 65_536
"""Hosted records compared at once (bounds the memory a comparison takes)."""


@dataclass(frozen=True)
class TextTable:
    """A sample as text, as read from a CSV file (``duet-host publish --sample-file``):
    each cell, trimmed of spaces, becomes a value of its column's dtype; an empty cell is
    a missing value."""

    columns: list[str]
    rows: list[list[str]]


def sample_values(sample: Any, schema: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``sample`` as ``{schema entry name: plain values}`` (not yet checked against the
    schema: the listing does that). TypeError or ValueError for what cannot be a sample."""
    if sample is None:
        return {}
    if isinstance(sample, TextTable):
        return _from_text(sample, schema)
    if is_dataframe(sample):
        return {str(column): [_plain(v) for v in sample[column].tolist()]
                for column in sample.columns}  # fmt: skip
    if isinstance(sample, torch.Tensor) or _is_a(sample, "numpy", "ndarray"):
        if len(schema) != 1:
            raise TypeError("a tensor sample needs a schema of one tensor; pass {name: values}")
        return {schema[0]["name"]: _plain(sample.tolist())}
    if isinstance(sample, Mapping):
        out: dict[str, Any] = {}
        for name, values in sample.items():
            if isinstance(values, torch.Tensor) or _is_array(values):
                values = values.tolist()
            out[str(name)] = _plain(values)
        return out
    raise TypeError("a sample is a DataFrame, a tensor or array, or {name: values}")


_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def _from_text(table: TextTable, schema: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    dtypes = {entry["name"]: entry["dtype"] for entry in schema if "shape" not in entry}
    if len(dtypes) != len(schema):
        raise TypeError("a CSV sample fits a table of columns, not tensors")
    if len(set(table.columns)) != len(table.columns):
        raise ValueError("the sample names a column twice")
    out: dict[str, Any] = {}
    for index, column in enumerate(table.columns):
        if column not in dtypes:
            raise ValueError(f"the sample's column {column[:80]!r} is not in the schema")
        kind = dtype_kind(dtypes[column])
        out[column] = [_parse_cell(row[index], kind, column, number)
                       for number, row in enumerate(table.rows, start=1)]  # fmt: skip
    return out


def _parse_cell(cell: str, kind: str, column: str, row: int) -> Any:
    text = cell.strip()
    if not text:
        return None
    try:
        if kind == "integer":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "boolean":
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
    except ValueError:
        raise ValueError(
            f"row {row} of the sample: {column[:80]!r} holds {kind} values, not {text[:40]!r}"
        ) from None
    return text


class UncheckedSample(ValueError):
    """The sample cannot be lined up with the hosted records (its columns are not the
    hosted table's, say), so whether it copies one cannot be told."""


def copied_record(
    sample: Mapping[str, Any], schema: Sequence[Mapping[str, Any]], record: StoredObject
) -> int | None:
    """The index of the first sample record that is a record of the hosted ``record``, or
    None. Values are equal as they are, or once both are rounded to float32 (and to the
    column's float16 or bfloat16, if the schema says so), so decimals typed from a float32
    column still match. A table's sample may hold a subset of its columns (compared on
    those). A module's sample (its inputs) is not compared. :class:`UncheckedSample` when
    the sample cannot be lined up with the hosted records."""
    held = record.value
    if not sample or isinstance(held, torch.nn.Module):
        return None
    if not isinstance(held, torch.Tensor):
        raise UncheckedSample(f"a hosted {type(held).__name__} has no records to compare")
    columns = [entry for entry in schema if "shape" not in entry]
    if columns:
        found = _copied_row(sample, columns, record, held)
        if found is not None:
            return found
    for entry in schema:
        if "shape" in entry:
            found = _copied_slice(sample[entry["name"]], held)
            if found is not None:
                return found
    return None


def _copied_row(
    sample: Mapping[str, Any], columns: list[Mapping[str, Any]], record: StoredObject,
    held: torch.Tensor,
) -> int | None:  # fmt: skip
    table = held.unsqueeze(1) if held.dim() == 1 else held
    names = [entry["name"] for entry in columns]
    if table.dim() != 2:
        raise UncheckedSample(f"the hosted tensor has {held.dim()} dimensions, not a table's 2")
    if record.schema is not None:
        hosted = record.schema.columns
        unknown = [name for name in names if name not in hosted]
        if unknown:
            raise UncheckedSample(f"the hosted table has no column {unknown[0][:80]!r}")
        positions = [hosted.index(name) for name in names]
        categories = record.schema.categories
    elif len(names) == table.shape[1]:  # columns over a plain tensor: in schema order
        positions, categories = list(range(len(names))), {}
    else:
        raise UncheckedSample(
            f"the sample has {len(names)} columns, the hosted tensor {table.shape[1]}"
        )
    narrow = [(j, _NARROW[entry["dtype"]]) for j, entry in enumerate(columns)
              if entry["dtype"] in _NARROW]  # fmt: skip
    targets = []
    for index in range(len(sample[names[0]])):
        row = [_code(sample[name][index], categories.get(name)) for name in names]
        if all(value is not _NO_MATCH for value in row):
            values = [math.nan if v is None else v for v in row]
            targets.append((index, torch.tensor(values, dtype=torch.float64)))
    chosen = None if positions == list(range(table.shape[1])) else positions
    return _first_equal(table, targets, narrow, chosen)


def _copied_slice(values: Any, held: torch.Tensor) -> int | None:
    """A tensor entry's records (along its first dimension) against the hosted tensor's,
    compared by their values in order (a record reshaped is still that record)."""
    if held.dim() == 0 or not isinstance(values, list):
        return 0 if _same(held, values) else None
    size = math.prod(held.shape[1:])
    targets = []
    for index, item in enumerate(values):
        try:
            target = torch.tensor(item, dtype=torch.float64 if held.is_floating_point()
                                  else held.dtype)  # fmt: skip
        except (TypeError, ValueError, RuntimeError, OverflowError):
            continue
        if target.numel() == size:
            targets.append((index, target.reshape(size)))
    return _first_equal(held.reshape(held.shape[0], size), targets, [])


def _same(held: torch.Tensor, value: Any) -> bool:
    try:
        target = torch.tensor(value, dtype=torch.float64 if held.is_floating_point()
                              else held.dtype)  # fmt: skip
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return False
    if target.numel() != 1 or held.numel() != 1:
        return False
    return _first_equal(held.reshape(1, 1), [(0, target.reshape(1))], []) is not None


_NARROW = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _first_equal(
    records: torch.Tensor,
    targets: list[tuple[int, torch.Tensor]],
    narrow: list[tuple[int, torch.dtype]],
    columns: list[int] | None = None,
) -> int | None:
    """The smallest index of the 1-D ``targets`` (index, values) equal to some row of the
    2-D ``records`` (of its ``columns``, if given): missing equal to missing; floats also
    once rounded to float32, and the ``narrow`` columns to their dtype. Each chunk of
    records is read and converted once for all the targets."""
    left = sorted(targets, key=lambda pair: pair[0])
    found: int | None = None
    for start in range(0, records.shape[0], CHUNK_ROWS):
        if not left:
            break
        chunk = records[start : start + CHUNK_ROWS]
        if columns is not None:
            chunk = chunk[:, columns]
        floating = chunk.is_floating_point() or left[0][1].is_floating_point()
        if floating:
            chunk = chunk.to(torch.float64)
            rounded, missing = chunk.float(), chunk.isnan()
            narrowed = [(column, dtype, chunk[:, column].to(dtype)) for column, dtype in narrow]
        for index, target in left:
            if floating:
                wanted = target.to(torch.float64)
                equal = (chunk == wanted) | (missing & wanted.isnan())
                equal |= rounded == wanted.float()
                for column, dtype, values in narrowed:
                    equal[:, column] |= values == wanted[column].to(dtype)
            else:
                equal = chunk == target.to(chunk.dtype)
            if bool(equal.all(dim=1).any()):
                found = index
                left = [pair for pair in left if pair[0] < index]
                break
    return found


class _NoMatch:
    pass


_NO_MATCH = _NoMatch()
"""A category the hosted table does not know: that row cannot be one of its rows."""


def _code(value: Any, categories: tuple[str, ...] | None) -> Any:
    if categories is None:
        if isinstance(value, bool):
            return float(value)
        return value if value is None or isinstance(value, int | float) else _NO_MATCH
    if value is None:
        return None
    try:
        return categories.index(value)
    except ValueError:
        return _NO_MATCH


def _plain(value: Any) -> Any:
    """Numpy scalars, NaN and NaT, timestamps and nested lists as JSON-like values."""
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, str):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and math.isnan(value):
        return None
    if type(value).__name__ in ("NaTType", "NAType"):
        return None
    if isinstance(value, date):  # datetimes too
        return value.isoformat()
    return value


def is_dataframe(value: Any) -> bool:
    """Whether ``value`` is a pandas DataFrame (without importing pandas)."""
    return _is_a(value, "pandas", "DataFrame")


def _is_array(value: Any) -> bool:
    return _is_a(value, "numpy", "ndarray") or _is_a(value, "pandas", "Series")


def _is_a(value: Any, package: str, name: str) -> bool:
    return type(value).__module__.split(".", 1)[0] == package and type(value).__name__ == name
