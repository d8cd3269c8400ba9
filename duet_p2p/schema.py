"""A hosted table's public schema: column names, categories, and who a record belongs to.

The owner declares a schema when hosting (``columns=`` for a tensor, or a pandas
DataFrame, whose columns it takes). The schema is listed to scientists so they can name
columns in queries; row counts and values never are. A DataFrame is hosted as a float64
tensor (one column per column; categories as their codes, missing as NaN), so pointers
work on it as on any tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from duet_p2p.text import printable

MAX_COLUMNS = 10_000
MAX_NAME_CHARS = 100
MAX_CATEGORIES = 10_000


@dataclass(frozen=True)
class TableSchema:
    """Columns of a 2-D hosted tensor (or the one column of a 1-D tensor)."""

    columns: tuple[str, ...]
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Categorical columns: the code ``i`` stands for ``categories[column][i]``."""
    identifier: str | None = None
    """The column that says which person a row belongs to: DP queries then protect a
    person (up to ``rows_per_identifier`` rows), not a row."""
    rows_per_identifier: int = 1
    """Rows of one person a DP query keeps (the first ones); more are left out."""

    def __post_init__(self) -> None:
        columns = tuple(self.columns)
        if not columns or len(columns) > MAX_COLUMNS:
            raise ValueError(f"a schema needs 1 to {MAX_COLUMNS} columns")
        for name in columns:
            if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
                raise ValueError(f"column names must be 1 to {MAX_NAME_CHARS} characters")
            if printable(name, MAX_NAME_CHARS) != name:
                raise ValueError(f"column name {name!r} has characters that do not print")
        if len(set(columns)) != len(columns):
            raise ValueError("column names must be unique")
        for name, values in self.categories.items():
            if name not in columns:
                raise ValueError(f"categories given for unknown column {name!r}")
            if len(values) > MAX_CATEGORIES:
                raise ValueError(f"column {name!r} has more than {MAX_CATEGORIES} categories")
        if self.identifier is not None and self.identifier not in columns:
            raise ValueError(f"identifier {self.identifier!r} is not a column")
        rows = self.rows_per_identifier
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= 10_000:
            raise ValueError("rows_per_identifier must be an integer from 1 to 10000")
        object.__setattr__(self, "columns", columns)

    def index(self, column: str | int) -> int:
        """A column's position, by name or position (public facts only: no data)."""
        if isinstance(column, bool):
            raise ValueError("a column is a name or a position")
        if isinstance(column, int):
            if not 0 <= column < len(self.columns):
                raise ValueError(f"column {column} is out of range ({len(self.columns)} columns)")
            return column
        try:
            return self.columns.index(column)
        except ValueError:
            raise ValueError(f"no column {column!r}; columns: {list(self.columns)}") from None

    def listing(self) -> dict[str, Any]:
        """The schema as the scientist sees it."""
        entry: dict[str, Any] = {"columns": list(self.columns)}
        if self.categories:
            entry["categories"] = {k: list(v) for k, v in self.categories.items()}
        if self.identifier is not None:
            entry["identifier"] = self.identifier
        return entry


def schema_for_tensor(
    tensor: torch.Tensor,
    columns: list[str] | tuple[str, ...] | None,
    identifier: str | None,
    rows_per_identifier: int,
) -> TableSchema | None:
    """The schema the owner declared for a tensor, checked against its shape."""
    if columns is None:
        if identifier is not None:
            raise ValueError("an identifier needs columns=[...] to name it")
        return None
    columns = tuple(columns)
    width = 1 if tensor.dim() == 1 else (tensor.shape[1] if tensor.dim() == 2 else -1)
    if width != len(columns):
        raise ValueError(
            f"columns names {len(columns)} columns, but the tensor has shape {tuple(tensor.shape)}"
            " (a schema fits a 1-D tensor or the second dimension of a 2-D one)"
        )
    return TableSchema(columns, {}, identifier, rows_per_identifier)


def from_dataframe(
    frame: Any, identifier: str | None = None, rows_per_identifier: int = 1
) -> tuple[torch.Tensor, TableSchema]:
    """A pandas DataFrame as a float64 tensor and its schema. Numbers and booleans keep
    their values; categorical, string and object columns become category codes (missing:
    NaN). Datetimes and other kinds are refused."""
    import pandas as pd

    columns: list[np.ndarray] = []
    categories: dict[str, tuple[str, ...]] = {}
    names = [str(name) for name in frame.columns]
    for name, series in zip(names, (frame[c] for c in frame.columns), strict=True):
        dtype = series.dtype
        if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
            columns.append(series.to_numpy(dtype=np.float64, na_value=math.nan))
            continue
        if not (
            isinstance(dtype, pd.CategoricalDtype)
            or pd.api.types.is_string_dtype(dtype)
            or pd.api.types.is_object_dtype(dtype)
        ):
            raise TypeError(f"column {name!r} has type {dtype}, which cannot be hosted")
        as_category = series.astype("category")
        labels = tuple(str(value) for value in as_category.cat.categories)
        codes = as_category.cat.codes.to_numpy().astype(np.float64)
        codes[codes < 0] = math.nan
        columns.append(codes)
        categories[name] = labels
    if not columns:
        raise ValueError("the DataFrame has no columns")
    array = np.stack(columns, axis=1) if len(frame) else np.zeros((0, len(columns)))
    schema = TableSchema(tuple(names), categories, identifier, rows_per_identifier)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)), schema


def schema_from_peer(entry: object) -> dict[str, Any] | None:
    """A schema in the owner's listing as the scientist keeps it (bounded, printable)."""
    if not isinstance(entry, dict):
        return None
    columns = entry.get("columns")
    if not isinstance(columns, list) or not 0 < len(columns) <= MAX_COLUMNS:
        return None
    kept: dict[str, Any] = {"columns": [printable(c, MAX_NAME_CHARS) for c in columns]}
    categories = entry.get("categories")
    if isinstance(categories, dict):
        kept["categories"] = {
            printable(k, MAX_NAME_CHARS): [printable(v, MAX_NAME_CHARS) for v in values[:100]]
            for k, values in list(categories.items())[:100]
            if isinstance(values, list)
        }
    if isinstance(entry.get("identifier"), str):
        kept["identifier"] = printable(entry["identifier"], MAX_NAME_CHARS)
    return kept
