"""``duet.dp`` for the scientist: differentially private statistics of the owner's datasets.

Each call names a hosted dataset (its pointer, tag or ID), a column, optional row filters
and the privacy loss to spend (``epsilon``; ``delta`` with Gaussian noise). The owner
checks the query, reserves that much of your budget (refusing with BudgetExceeded if too
little is left), computes the statistic with OpenDP noise, and releases it when the owner
or the owner's policy accepts. Nothing about the data is returned but the noisy value.

    ages = duet.store["ages"]
    duet.dp.mean(ages, "age", bounds=(0, 100), epsilon=0.5)
    duet.dp.histogram(ages, "age", bins=10, bounds=(0, 100), epsilon=0.5)
    duet.dp.count(ages, where=[("age", ">=", 65)], epsilon=0.1)
    duet.dp.budget
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from duet_p2p.errors import ProtocolError
from duet_p2p.rpc.dp_spec import Predicate, QuerySpec
from duet_p2p.scientist.pointer import Pointer
from duet_p2p.scientist.requests import RequestHandle
from duet_p2p.table import Table, TableView
from duet_p2p.text import printable

if TYPE_CHECKING:
    from duet_p2p.scientist.protocol import SessionCore
    from duet_p2p.scientist.remote_store import RemoteStore

Where = Iterable[tuple[str | int, str, Any]] | Mapping[str | int, Any] | None
MAX_BUDGET_ROWS = 10_000


@dataclass(frozen=True)
class DPHistogram:
    """Noisy counts per bin (numeric ``edges``) or per category; ``outside`` counts the
    records outside the edges, missing, or of an unknown category. Counts may be negative:
    that is the noise, left in so the counts stay unbiased."""

    counts: tuple[int, ...]
    edges: tuple[float, ...] | None = None
    categories: tuple[str, ...] | None = None
    outside: int = 0

    @property
    def pandas(self) -> Any:
        import pandas as pd

        if self.categories is not None:
            return pd.Series(self.counts, index=list(self.categories), name="count")
        assert self.edges is not None
        index = pd.IntervalIndex.from_breaks(list(self.edges), closed="left")
        return pd.Series(self.counts, index=index, name="count")


class DPQueryHandle(RequestHandle):
    """A pending DP query: ``status``, ``wait(timeout)``, ``result()`` (the noisy value)."""

    statistic: str = ""

    async def result_async(self, timeout: float | None = None) -> Any:
        return _checked_value(self.statistic, await super().result_async(timeout))


class RemoteDP:
    """``duet.dp`` on the scientist's side (see the module docstring)."""

    def __init__(self, core: SessionCore, store: RemoteStore) -> None:
        self._core = core
        self._store = store

    def count(self, data: Any, column: str | int | None = None, *, where: Where = None,
              epsilon: float, delta: float = 0.0, noise: str = "laplace",
              **request: Any) -> Any:  # fmt: skip
        """A noisy count of the records (with ``column``: of those where it is present)."""
        return self._ask(data, "count", column=column, where=where, epsilon=epsilon,
                         delta=delta, noise=noise, **request)  # fmt: skip

    def sum(self, data: Any, column: str | int | None = None, *,
            bounds: tuple[float, float] | None = None, epsilon: float, where: Where = None,
            delta: float = 0.0, noise: str = "laplace", **request: Any) -> Any:  # fmt: skip
        """A noisy sum of the column, each value clamped to ``bounds`` first."""
        return self._ask(data, "sum", column=column, where=where, bounds=bounds,
                         epsilon=epsilon, delta=delta, noise=noise, **request)  # fmt: skip

    def mean(self, data: Any, column: str | int | None = None, *,
             bounds: tuple[float, float] | None = None, epsilon: float, where: Where = None,
             **request: Any) -> Any:  # fmt: skip
        """A noisy mean (half the epsilon counts the records, half goes to the mean)."""
        return self._ask(data, "mean", column=column, where=where, bounds=bounds,
                         epsilon=epsilon, **request)  # fmt: skip

    def variance(self, data: Any, column: str | int | None = None, *,
                 bounds: tuple[float, float] | None = None, epsilon: float, where: Where = None,
                 **request: Any) -> Any:  # fmt: skip
        """A noisy sample variance (half the epsilon counts the records)."""
        return self._ask(data, "variance", column=column, where=where, bounds=bounds,
                         epsilon=epsilon, **request)  # fmt: skip

    def histogram(self, data: Any, column: str | int | None = None, *,
                  bins: int | list[float] | None = None,
                  bounds: tuple[float, float] | None = None, epsilon: float,
                  where: Where = None, delta: float = 0.0, noise: str = "laplace",
                  **request: Any) -> Any:  # fmt: skip
        """Noisy counts per bin: ``bins`` equal bins over ``bounds``, or ``bins`` as edges;
        a categorical column is counted per category (no bins). Returns a DPHistogram."""
        return self._ask(data, "histogram", column=column, where=where, bins=bins,
                         bounds=bounds, epsilon=epsilon, delta=delta, noise=noise,
                         **request)  # fmt: skip

    def quantile(self, data: Any, q: float, column: str | int | None = None, *,
                 bounds: tuple[float, float] | None = None, epsilon: float, where: Where = None,
                 candidates: int = 1000, **request: Any) -> Any:  # fmt: skip
        """A noisy ``q``-quantile (0.5: the median), chosen among ``candidates`` evenly
        spaced values over ``bounds`` by the exponential mechanism."""
        return self._ask(data, "quantile", column=column, where=where, bounds=bounds, q=q,
                         epsilon=epsilon, candidates=candidates, **request)  # fmt: skip

    @property
    def budget(self) -> BudgetView:
        """What is left of your privacy budgets on the datasets hosted here."""
        rows = self._core.sync(self._core.dp_budget())
        return BudgetView(_checked_budget(rows))

    # -- internals ---------------------------------------------------------------------

    def _ask(
        self,
        data: Any,
        statistic: str,
        *,
        where: Where,
        reason: str = "",
        request_block: bool = True,
        timeout_secs: float | None = None,
        **fields: Any,
    ) -> Any:
        spec = QuerySpec(statistic=statistic, where=_predicates(where),
                         **{k: v for k, v in fields.items() if v is not None})  # fmt: skip
        dataset_id = self._dataset_id(data)
        handle = self._core.sync(
            self._core.dp_query(dataset_id, spec, reason, _handle_class(statistic))
        )
        if not request_block:
            return handle
        return handle.result(timeout=timeout_secs)

    def _dataset_id(self, data: Any) -> str:
        if isinstance(data, Pointer):
            return data.id
        if isinstance(data, str):
            return self._store[data].id
        raise TypeError("name the dataset by its pointer (duet.store[...]), tag or ID")


def _handle_class(statistic: str) -> type[DPQueryHandle]:
    return type(f"DP{statistic.title()}Handle", (DPQueryHandle,), {"statistic": statistic})


def _predicates(where: Where) -> list[Predicate]:
    if where is None:
        return []
    if isinstance(where, Mapping):
        items: list[tuple[Any, str, Any]] = [
            (column, "==", value) for column, value in where.items()
        ]
    else:
        items = [tuple(condition) for condition in where]  # type: ignore[misc]
    predicates = []
    for item in items:
        if len(item) != 3:
            raise ValueError("each condition is (column, op, value), e.g. ('age', '>=', 65)")
        column, op, value = item
        if isinstance(value, (tuple, set, frozenset)):
            value = list(value)
        predicates.append(Predicate(column=column, op=op, value=value))
    return predicates


def _checked_value(statistic: str, value: Any) -> Any:
    """The owner's answer, checked for the shape this statistic has."""
    if statistic == "count":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif statistic != "histogram":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, dict):
        return _histogram(value)
    raise ProtocolError(f"the owner sent a malformed {statistic} result")


def _histogram(value: dict[str, Any]) -> DPHistogram:
    counts = value.get("counts")
    outside = value.get("outside")
    if not isinstance(counts, list) or not all(_is_int(c) for c in counts) or not _is_int(outside):
        raise ProtocolError("the owner sent a malformed histogram")
    edges, categories = value.get("edges"), value.get("categories")
    if isinstance(edges, list) and len(edges) == len(counts) + 1:
        if not all(isinstance(e, (int, float)) and math.isfinite(e) for e in edges):
            raise ProtocolError("the owner sent a malformed histogram")
        return DPHistogram(tuple(counts), edges=tuple(float(e) for e in edges), outside=outside)
    if isinstance(categories, list) and len(categories) == len(counts):
        names = tuple(printable(c, 100) for c in categories)
        return DPHistogram(tuple(counts), categories=names, outside=outside)
    raise ProtocolError("the owner sent a malformed histogram")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BudgetLeft:
    dataset: str
    epsilon_left: float
    epsilon_spent: float
    epsilon_budget: float
    delta_left: float
    delta_spent: float
    delta_budget: float


class BudgetView(TableView, list[BudgetLeft]):
    """Your privacy budgets, one row per dataset."""

    def table(self) -> Table:
        rows = [[b.dataset, f"{b.epsilon_left:g}", f"{b.epsilon_spent:g}", f"{b.epsilon_budget:g}",
                 f"{b.delta_left:g}", f"{b.delta_spent:g}", f"{b.delta_budget:g}"]
                for b in self]  # fmt: skip
        columns = ["Dataset", "Epsilon Left", "Epsilon Spent", "Epsilon Budget", "Delta Left",
                   "Delta Spent", "Delta Budget"]  # fmt: skip
        return Table(
            columns,
            rows,
            "Your privacy budgets",
            empty_text="The owner set no privacy budget for you here.",
        )

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            for row in self:
                if row.dataset == key:
                    return row
            raise KeyError(f"no privacy budget for {key!r}")
        return list.__getitem__(self, key)


def _checked_budget(rows: Any) -> list[BudgetLeft]:
    if not isinstance(rows, list) or len(rows) > MAX_BUDGET_ROWS:
        raise ProtocolError("the owner sent a malformed budget")
    kept = []
    numbers = ("epsilon_left", "epsilon_spent", "epsilon_budget", "delta_left", "delta_spent",
               "delta_budget")  # fmt: skip
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("dataset"), str):
            raise ProtocolError("the owner sent a malformed budget")
        values = [row.get(name) for name in numbers]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in values):  # fmt: skip
            raise ProtocolError("the owner sent a malformed budget")
        kept.append(BudgetLeft(printable(row["dataset"], 100), *(float(v) for v in values)))
    return kept


__all__ = ["BudgetView", "DPHistogram", "DPQueryHandle", "RemoteDP"]
