"""The wire form of a differentially private query: which statistic, over what, at what cost.

Shared by both sides: the scientist builds it, the owner validates it again (pydantic, then
against the dataset's public schema) before anything touches data.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

STATISTICS = ("count", "sum", "mean", "variance", "histogram", "quantile")
Statistic = Literal["count", "sum", "mean", "variance", "histogram", "quantile"]
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")
Comparison = Literal["==", "!=", "<", "<=", ">", ">=", "in", "not in"]
MAX_PREDICATES = 16
MAX_BINS = 10_000
MAX_CANDIDATES = 10_000
MAX_EPSILON_PER_QUERY = 100.0
MIN_EPSILON_PER_QUERY = 1e-6
"""Smaller losses give noise so large that OpenDP's calibration can fail."""
MAX_DELTA = 1e-3


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("a number, not a bool")
    return value


NoBool = BeforeValidator(_not_bool)
Number = Annotated[float, NoBool, Field(allow_inf_nan=False)]
ColumnName = Annotated[str, Field(min_length=1, max_length=100)]
ColumnRef = ColumnName | Annotated[int, NoBool, Field(ge=0, le=1_000_000)]
Literal_ = Number | Annotated[str, Field(max_length=100)]


class Predicate(BaseModel):
    """Keep the rows where ``column op value`` (a public condition, never data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    column: ColumnRef
    op: Comparison
    value: Literal_ | Annotated[list[Literal_], Field(max_length=1000)]

    def text(self) -> str:
        return f"{self.column} {self.op} {self.value!r}"


class QuerySpec(BaseModel):
    """What to release about one hosted dataset, and the privacy loss to pay for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    statistic: Statistic
    column: ColumnRef | None = None
    where: list[Predicate] = Field(default_factory=list, max_length=MAX_PREDICATES)
    bounds: tuple[Number, Number] | None = None
    epsilon: Annotated[
        float,
        NoBool,
        Field(ge=MIN_EPSILON_PER_QUERY, le=MAX_EPSILON_PER_QUERY, allow_inf_nan=False),
    ]
    delta: Annotated[float, NoBool, Field(ge=0, le=MAX_DELTA, allow_inf_nan=False)] = 0.0
    noise: Literal["laplace", "gaussian"] = "laplace"
    bins: (
        Annotated[int, NoBool, Field(ge=1, le=MAX_BINS)]
        | Annotated[list[Number], Field(min_length=2, max_length=MAX_BINS + 1)]
        | None
    ) = None
    q: Annotated[float, NoBool, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    candidates: Annotated[int, NoBool, Field(ge=2, le=MAX_CANDIDATES)] = 1000

    def text(self, dataset: str) -> str:
        """The query as the owner reads it, e.g. ``dp.mean(ages["age"] where sex == 1,
        bounds=(0, 100), epsilon=0.5)``."""
        target = dataset if self.column is None else f"{dataset}[{self.column!r}]"
        if self.where:
            target += " where " + " and ".join(p.text() for p in self.where)
        parts = [target]
        if self.statistic == "quantile":
            parts.append(f"q={self.q:g}")
        if self.bins is not None:
            shown = self.bins if isinstance(self.bins, int) else f"{len(self.bins) - 1} edges"
            parts.append(f"bins={shown}")
        if self.bounds is not None:
            parts.append(f"bounds=({self.bounds[0]:g}, {self.bounds[1]:g})")
        parts.append(f"epsilon={self.epsilon:g}")
        if self.delta:
            parts.append(f"delta={self.delta:g}")
        if self.noise != "laplace":
            parts.append(f"noise={self.noise}")
        return f"dp.{self.statistic}({', '.join(parts)})"
