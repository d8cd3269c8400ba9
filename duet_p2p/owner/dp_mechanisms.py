"""Differentially private statistics, built from OpenDP transformations and measurements.

Every release is an OpenDP measurement over the records a query selected: missing values
imputed, values clamped to the declared bounds, the aggregate, then noise whose scale
OpenDP finds for the privacy loss asked (a binary search over its own privacy map). No
noise is drawn here: OpenDP samples it (discrete, exact, from the OS's randomness), which
is what makes it safe from the floating-point attacks naive noise falls to.

The privacy unit is one record, or ``contributions`` records of one person: the measurement
is built for that input distance. Statistics that need the number of records (mean,
variance) first release a noisy count with half the budget, and compose the two through
OpenDP's adaptive composition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import opendp.prelude as dp

from duet_p2p.permissions.ledger import amount, float_at_most
from duet_p2p.rpc.dp_spec import QuerySpec

dp.enable_features("contrib")

DEFAULT_MAX_ROWS = 2**24
"""Sums assume at most this many records (OpenDP samples this many from a larger set)."""


@dataclass(frozen=True)
class Records:
    """What a query selected from a dataset, ready for a mechanism (private)."""

    values: np.ndarray
    """float64 values of the selected column (NaN: missing), one per kept record; for a
    count without a column, one 0.0 per kept record."""
    contributions: int
    """Records one person may have among them: the input distance of the measurement."""
    categories: tuple[str, ...] | None = None
    """The column's categories when it is categorical (values are their codes)."""


@dataclass(frozen=True)
class Release:
    value: Any
    epsilon: Decimal
    delta: Decimal
    noise: str
    """How the value was protected, for the owner, e.g. ``"Laplace, scale 200"``."""


def cost(spec: QuerySpec) -> tuple[Decimal, Decimal]:
    """What a query debits: exactly the epsilon and delta asked (the mechanism is
    calibrated so that OpenDP's privacy map never exceeds them)."""
    return amount(spec.epsilon), amount(spec.delta, "delta")


def release(spec: QuerySpec, records: Records, *, max_rows: int = DEFAULT_MAX_ROWS) -> Release:
    """Run the query's measurement on ``records``."""
    epsilon, delta = cost(spec)
    build = _BUILDERS[spec.statistic]
    value, noise = build(spec, records, epsilon, delta, max_rows)
    return Release(value, epsilon, delta, noise)


# -- the statistics ----------------------------------------------------------------------

_METRIC = dp.symmetric_distance()
_FLOATS = dp.vector_domain(dp.atom_domain(T=float, nan=True))


def _count(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, _rows: int):
    count = dp.t.make_count(_FLOATS, _METRIC, TO=dp.i64)
    measurement = _calibrate(lambda s: count >> _noise(spec, s), spec, records, epsilon, delta)
    return int(measurement(records.values)), _describe(spec, measurement)


def _sum(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, max_rows: int):
    lo, hi = _bounds(spec)
    total = _clamped(lo, hi) >> dp.t.make_bounded_float_checked_sum(max_rows, (lo, hi))
    measurement = _calibrate(lambda s: total >> _noise(spec, s), spec, records, epsilon, delta)
    return float(measurement(records.values)), _describe(spec, measurement)


def _mean(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, _rows: int):
    return _sized(spec, records, epsilon, dp.t.then_mean(), minimum=1)


def _variance(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, _rows: int):
    return _sized(spec, records, epsilon, dp.t.then_variance(), minimum=2)


def _sized(spec: QuerySpec, records: Records, epsilon: Decimal, statistic: Any, minimum: int):
    """A noisy count (half the budget), then the statistic over the records resized to that
    count (imputing the midpoint, or dropping records at random) with the other half."""
    lo, hi = _bounds(spec)
    half = epsilon / 2
    d_in = records.contributions
    first, second = float_at_most(half), float_at_most(epsilon - half)
    composition = dp.c.make_adaptive_composition(
        _FLOATS, _METRIC, dp.max_divergence(), d_in=d_in, d_mids=[first, second]
    )
    queryable = composition(records.values)
    count_scale = dp.binary_search_param(
        lambda s: dp.t.make_count(_FLOATS, _METRIC, TO=dp.i64) >> dp.m.then_laplace(s),
        d_in=d_in, d_out=first,
    )  # fmt: skip
    count = dp.t.make_count(_FLOATS, _METRIC, TO=dp.i64) >> dp.m.then_laplace(count_scale)
    size = max(minimum, int(queryable(count)))
    sized = _clamped(lo, hi) >> dp.t.then_resize(size=size, constant=(lo + hi) / 2) >> statistic
    scale = dp.binary_search_param(lambda s: sized >> dp.m.then_laplace(s), d_in=d_in,
                                   d_out=second)  # fmt: skip
    value = float(queryable(sized >> dp.m.then_laplace(scale)))
    if composition.map(d_in) > float_at_most(epsilon):
        raise AssertionError("the composition costs more than the budget debited")
    return value, (
        f"Laplace; a count (scale {count_scale:.6g}), then the {spec.statistic} of {size} "
        f"records (scale {scale:.6g}), by adaptive composition"
    )


def _histogram(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, _rows: int):
    if records.categories is not None:
        codes = np.where(np.isnan(records.values), -1, records.values).astype(np.int64)
        domain = dp.vector_domain(dp.atom_domain(T=dp.i64))
        counting = dp.t.make_count_by_categories(
            domain, _METRIC, categories=list(range(len(records.categories))),
            null_category=True, MO=_distance(spec), TOA=dp.i64,
        )  # fmt: skip
        measurement = _calibrate(lambda s: counting >> _noise(spec, s), spec, records,
                                 epsilon, delta, data=codes)  # fmt: skip
        counts = [int(c) for c in measurement(codes)]
        value = {"counts": counts[:-1], "categories": list(records.categories),
                 "outside": counts[-1]}  # fmt: skip
        return value, _describe(spec, measurement)
    edges = histogram_edges(spec)
    values = np.where(np.isnan(records.values), -math.inf, records.values)
    # the last edge closes the last bin, as in numpy
    values = np.where(values == edges[-1], math.nextafter(edges[-1], -math.inf), values)
    finder = dp.t.make_find_bin(
        dp.vector_domain(dp.atom_domain(T=float, nan=False)), _METRIC, edges=edges
    )
    counting = finder >> dp.t.then_count_by_categories(
        categories=list(range(len(edges) + 1)), null_category=False, MO=_distance(spec),
        TOA=dp.i64,
    )  # fmt: skip
    measurement = _calibrate(lambda s: counting >> _noise(spec, s), spec, records, epsilon,
                             delta, data=values)  # fmt: skip
    counts = [int(c) for c in measurement(values)]
    value = {"counts": counts[1:-1], "edges": edges, "outside": counts[0] + counts[-1]}
    return value, _describe(spec, measurement)


def _quantile(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, _rows: int):
    lo, hi = _bounds(spec)
    candidates = [float(c) for c in np.linspace(lo, hi, spec.candidates)]
    assert spec.q is not None

    def chain(scale: float) -> Any:
        return _clamped(lo, hi) >> dp.m.then_private_quantile(
            dp.max_divergence(), candidates=candidates, alpha=spec.q, scale=scale
        )

    measurement = _calibrate(chain, spec, records, epsilon, delta)
    return float(measurement(records.values)), _describe(spec, measurement)


_BUILDERS = {
    "count": _count,
    "sum": _sum,
    "mean": _mean,
    "variance": _variance,
    "histogram": _histogram,
    "quantile": _quantile,
}


# -- shared pieces -----------------------------------------------------------------------


def histogram_edges(spec: QuerySpec) -> list[float]:
    """The bin edges of a numeric histogram: given, or ``bins`` equal bins over bounds."""
    if isinstance(spec.bins, list):
        return [float(edge) for edge in spec.bins]
    lo, hi = _bounds(spec)
    assert isinstance(spec.bins, int)
    return [float(edge) for edge in np.linspace(lo, hi, spec.bins + 1)]


def _bounds(spec: QuerySpec) -> tuple[float, float]:
    assert spec.bounds is not None
    return float(spec.bounds[0]), float(spec.bounds[1])


def _clamped(lo: float, hi: float) -> Any:
    """Missing values become the midpoint, then every value is clamped to the bounds."""
    return dp.t.make_impute_constant(_FLOATS, _METRIC, (lo + hi) / 2) >> dp.t.then_clamp((lo, hi))


def _distance(spec: QuerySpec) -> str:
    """The sensitivity metric of a vector of counts: L2 for Gaussian noise, else L1."""
    return "L2Distance<i64>" if spec.noise == "gaussian" else "L1Distance<i64>"


def _noise(spec: QuerySpec, scale: float) -> Any:
    if spec.noise == "gaussian":
        return dp.m.then_gaussian(scale)
    return dp.m.then_laplace(scale)


def _calibrate(
    chain: Any,
    spec: QuerySpec,
    records: Records,
    epsilon: Decimal,
    delta: Decimal,
    data: Any = None,
) -> Any:
    """The chain with the smallest noise whose privacy map, at the records' input
    distance, stays within (epsilon, delta)."""
    d_in = records.contributions
    target = float_at_most(epsilon)
    if spec.noise == "gaussian":
        fixed_delta = float_at_most(delta)

        def approximate(scale: float) -> Any:
            return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(chain(scale)), fixed_delta)

        scale = dp.binary_search_param(approximate, d_in=d_in, d_out=(target, fixed_delta))
        measurement = approximate(scale)
        spent = measurement.map(d_in)
        if spent[0] > target or spent[1] > fixed_delta:
            raise AssertionError("the measurement costs more than the budget debited")
    else:
        scale = dp.binary_search_param(chain, d_in=d_in, d_out=target)
        measurement = chain(scale)
        if measurement.map(d_in) > target:
            raise AssertionError("the measurement costs more than the budget debited")
    return _Calibrated(measurement, scale)


@dataclass(frozen=True)
class _Calibrated:
    measurement: Any
    scale: float

    def __call__(self, data: Any) -> Any:
        return self.measurement(data)


def _describe(spec: QuerySpec, calibrated: _Calibrated) -> str:
    name = "Gaussian" if spec.noise == "gaussian" else "Laplace"
    if spec.statistic == "quantile":
        name = "exponential mechanism"
    return f"{name}, scale {calibrated.scale:.6g}"
