"""Checking a DP query against a dataset's public facts, then selecting its records.

``plan_query`` looks only at what the scientist may know (the query, the listed schema, a
shape the owner chose to show), so whether a query is refused never depends on data.
``select`` then runs in the monitor on the hosted values: the row filters (public
predicates, applied to each row on its own), the identifier's truncation to
``rows_per_identifier`` rows per person, and the column. Each of these changes at most
``rows_per_identifier`` records when one person's data changes, which is the input
distance the mechanism is built for.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from duet_p2p.owner.dp_mechanisms import Records
from duet_p2p.rpc.dp_spec import Predicate, QuerySpec
from duet_p2p.schema import TableSchema

NEEDS_BOUNDS = frozenset({"sum", "mean", "variance", "quantile"})
GAUSSIAN_STATISTICS = frozenset({"count", "sum", "histogram"})


@dataclass(frozen=True)
class Condition:
    column: int
    op: str
    values: tuple[float, ...]
    """Numbers to compare with (category names already turned into their codes)."""


@dataclass(frozen=True)
class QueryPlan:
    """A query checked against a dataset's public facts."""

    column: int | None
    conditions: tuple[Condition, ...]
    identifier: int | None
    contributions: int
    categories: tuple[str, ...] | None


def plan_query(
    spec: QuerySpec, schema: TableSchema | None, shape: tuple[int, ...] | None
) -> QueryPlan:
    """Check ``spec`` against the dataset's schema, or its shape when the owner shows it
    (None: neither is public). Raises ValueError naming what is wrong."""
    _check_parameters(spec)
    if schema is None and shape is not None and len(shape) == 1:
        schema = TableSchema(("value",))
    if schema is None and shape is not None and len(shape) == 2 and 0 < shape[1] <= 10_000:
        schema = TableSchema(tuple(str(i) for i in range(shape[1])))
    if schema is None:
        if spec.statistic != "count" or spec.column is not None or spec.where:
            raise ValueError(
                "the owner has not published this dataset's columns (or shape): only "
                "count() of all its records can be asked; ask the owner to send it with "
                "columns=[...] or show_metadata=True"
            )
        return QueryPlan(None, (), None, 1, None)
    column = _column(spec, schema)
    categories = schema.categories.get(schema.columns[column]) if column is not None else None
    if spec.statistic == "histogram":
        if categories is None and spec.bins is None:
            raise ValueError("a histogram of a numeric column needs bins= (a count or edges)")
        if categories is not None and spec.bins is not None:
            raise ValueError("a histogram of a categorical column takes its categories: no bins=")
        if isinstance(spec.bins, int) and spec.bounds is None:
            raise ValueError("bins= as a number of bins needs bounds=(low, high)")
    elif categories is not None and spec.statistic != "count":
        raise ValueError(f"column {schema.columns[column]!r} is categorical: ask a histogram")
    conditions = tuple(_condition(p, schema) for p in spec.where)
    identifier = schema.index(schema.identifier) if schema.identifier is not None else None
    contributions = schema.rows_per_identifier if identifier is not None else 1
    return QueryPlan(column, conditions, identifier, contributions, categories)


def _check_parameters(spec: QuerySpec) -> None:
    if spec.statistic in NEEDS_BOUNDS and spec.bounds is None:
        raise ValueError(f"{spec.statistic} needs bounds=(low, high) for the values")
    if spec.bounds is not None and not spec.bounds[0] < spec.bounds[1]:
        raise ValueError("bounds=(low, high) needs low < high")
    if spec.statistic == "quantile" and spec.q is None:
        raise ValueError("quantile needs q= (0.5 for the median)")
    if spec.statistic != "quantile" and spec.q is not None:
        raise ValueError("q= belongs to quantile")
    if spec.statistic != "histogram" and spec.bins is not None:
        raise ValueError("bins= belongs to histogram")
    if isinstance(spec.bins, list) and any(b <= a for a, b in itertools.pairwise(spec.bins)):
        raise ValueError("histogram edges must increase strictly")
    if spec.noise == "gaussian":
        if spec.statistic not in GAUSSIAN_STATISTICS:
            raise ValueError(f"Gaussian noise is offered for {sorted(GAUSSIAN_STATISTICS)}")
        if spec.delta <= 0:
            raise ValueError("Gaussian noise needs delta > 0")
    elif spec.delta:
        raise ValueError("Laplace noise (the default) takes no delta; use noise='gaussian'")


def _column(spec: QuerySpec, schema: TableSchema) -> int | None:
    if spec.column is None:
        if spec.statistic == "count":
            return None
        if len(schema.columns) == 1:
            return 0
        raise ValueError(f"name the column: column= one of {list(schema.columns)}")
    return schema.index(spec.column)


def _condition(predicate: Predicate, schema: TableSchema) -> Condition:
    column = schema.index(predicate.column)
    values = predicate.value if isinstance(predicate.value, list) else [predicate.value]
    if predicate.op in ("in", "not in"):
        if not isinstance(predicate.value, list):
            raise ValueError(f"{predicate.op!r} compares with a list of values")
    elif len(values) != 1:
        raise ValueError(f"{predicate.op!r} compares with one value")
    categories = schema.categories.get(schema.columns[column])
    numbers: list[float] = []
    for value in values:
        if isinstance(value, str):
            if categories is None:
                raise ValueError(f"column {schema.columns[column]!r} holds numbers, not text")
            if predicate.op not in ("==", "!=", "in", "not in"):
                raise ValueError("categories compare with ==, !=, in and not in only")
            numbers.append(float(categories.index(value)) if value in categories else math.nan)
        else:
            numbers.append(float(value))
    return Condition(column, predicate.op, tuple(numbers))


def select(data: torch.Tensor, plan: QueryPlan) -> Records:
    """The records the query keeps, from the hosted tensor (in the monitor)."""
    rows = data.shape[0] if data.dim() else 1
    if plan.column is None and not plan.conditions and plan.identifier is None:
        return Records(np.zeros(rows), 1, None)
    if data.dim() > 2:
        raise AssertionError("plan_query allows columns of 1-D and 2-D datasets only")
    table = data.reshape(rows, 1) if data.dim() < 2 else data
    keep = np.ones(rows, dtype=bool)
    for condition in plan.conditions:
        keep &= _matches(_as_floats(table[:, condition.column]), condition)
    if plan.identifier is not None:
        keep &= _first_rows_per_person(_as_floats(table[:, plan.identifier]), keep,
                                       plan.contributions)  # fmt: skip
    if plan.column is None:
        return Records(np.zeros(int(keep.sum())), plan.contributions, None)
    values = _as_floats(table[:, plan.column])[keep]
    return Records(np.ascontiguousarray(values), plan.contributions, plan.categories)


def _as_floats(column: torch.Tensor) -> np.ndarray:
    if column.dtype.is_complex:
        column = column.real
    return column.detach().to(torch.float64).numpy()


def _matches(values: np.ndarray, condition: Condition) -> np.ndarray:
    op, targets = condition.op, condition.values
    with np.errstate(invalid="ignore"):
        if op in ("in", "not in"):
            found = np.isin(values, np.array(targets, dtype=np.float64))
            return found if op == "in" else ~found & ~np.isnan(values)
        target = targets[0]
        result = {
            "==": values == target,
            "!=": values != target,
            "<": values < target,
            "<=": values <= target,
            ">": values > target,
            ">=": values >= target,
        }[op]
    return result & ~np.isnan(values)


def _first_rows_per_person(identifiers: np.ndarray, keep: np.ndarray, limit: int) -> np.ndarray:
    """True for each kept row among the first ``limit`` kept rows of its person (missing
    identifiers all count as one person)."""
    filled = np.where(np.isnan(identifiers), -math.inf, identifiers)
    kept_rows = np.flatnonzero(keep)
    _, person = np.unique(filled[kept_rows], return_inverse=True)
    order = np.argsort(person, kind="stable")
    sorted_person = person[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_person)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    allowed = np.zeros_like(keep)
    allowed[kept_rows[order[rank < limit]]] = True
    return allowed
