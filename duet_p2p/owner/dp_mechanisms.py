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


def rehearse(
    spec: QuerySpec, contributions: int, categories: tuple[str, ...] | None, max_rows: int
) -> None:
    """Build and run the query's measurement on two made-up records. A query that cannot
    run on them (bounds whose sensitivity overflows, bins that collapse, an epsilon too
    small to calibrate) cannot run on any data: it is refused (ValueError) before it
    reserves budget, and a failure later can only be a fault, never a property of the
    data. Also warms the scale cache for the real run."""
    if categories is not None:
        values = np.zeros(2)
    elif spec.bounds is not None:
        values = np.full(2, spec.bounds[0] / 2 + spec.bounds[1] / 2)
    else:
        values = np.zeros(2)
    # a mean or variance resizes to its noisy count: two made-up records need little room
    rows = min(max_rows, 16) if spec.statistic in ("mean", "variance") else max_rows
    records = Records(values, contributions, categories)
    key = (_cache_key(spec, records, max_rows), spec.q, repr(spec.bins))
    if key in _REHEARSED:
        return
    try:
        release(spec, records, max_rows=rows)
        if len(_REHEARSED) >= MAX_CACHED_SCALES:
            _REHEARSED.clear()
        _REHEARSED.add(key)
    except Exception as exc:  # noqa: BLE001 - any failure here is the query's own
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"this query cannot be computed with these parameters ({reason})"
        ) from None


# -- the statistics ----------------------------------------------------------------------

_METRIC = dp.symmetric_distance()
_FLOATS = dp.vector_domain(dp.atom_domain(T=float, nan=True))


def _count(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, max_rows: int):
    count = dp.t.make_count(_FLOATS, _METRIC, TO=dp.i64)
    measurement = _calibrate(count, spec, records, epsilon, delta, max_rows)
    return int(measurement(records.values)), _describe(spec, measurement)


def _sum(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, max_rows: int):
    lo, hi = _bounds(spec)
    total = _clamped(lo, hi) >> dp.t.make_bounded_float_checked_sum(max_rows, (lo, hi))
    measurement = _calibrate(total, spec, records, epsilon, delta, max_rows)
    return float(measurement(records.values)), _describe(spec, measurement)


def _mean(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, max_rows: int):
    return _sized(spec, records, epsilon, dp.t.then_mean(), 1, max_rows)


def _variance(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, max_rows: int):
    return _sized(spec, records, epsilon, dp.t.then_variance(), 2, max_rows)


def _sized(
    spec: QuerySpec,
    records: Records,
    epsilon: Decimal,
    statistic: Any,
    minimum: int,
    max_rows: int,
):
    """A noisy count (half the budget), then the statistic over the records resized to that
    count (imputing the midpoint, or dropping records at random) with the other half. The
    size is capped at ``max_rows``: a tiny epsilon makes the noisy count huge, and the
    monitor must not allocate for it."""
    lo, hi = _bounds(spec)
    half = epsilon / 2
    d_in = records.contributions
    first, second = float_at_most(half), float_at_most(epsilon - half)
    composition = dp.c.make_adaptive_composition(
        _FLOATS, _METRIC, dp.max_divergence(), d_in=d_in, d_mids=[first, second]
    )
    queryable = composition(records.values)
    count = _laplace(dp.t.make_count(_FLOATS, _METRIC, TO=dp.i64), d_in, first)
    size = min(max(minimum, int(queryable(count.measurement))), max(minimum, max_rows))
    sized = _clamped(lo, hi) >> dp.t.then_resize(size=size, constant=(lo + hi) / 2) >> statistic
    measured = _laplace(sized, d_in, second)
    value = float(queryable(measured.measurement))
    count_scale, scale = count.scale, measured.scale
    if composition.map(d_in) > float_at_most(epsilon):
        raise AssertionError("the composition costs more than the budget debited")
    return value, (
        f"Laplace; a count (scale {count_scale:.6g}), then the {spec.statistic} of {size} "
        f"records (scale {scale:.6g}), by adaptive composition"
    )


def _histogram(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, max_rows: int):
    if records.categories is not None:
        codes = np.where(np.isnan(records.values), -1, records.values).astype(np.int64)
        domain = dp.vector_domain(dp.atom_domain(T=dp.i64))
        counting = dp.t.make_count_by_categories(
            domain, _METRIC, categories=list(range(len(records.categories))),
            null_category=True, MO=_distance(spec), TOA=dp.i64,
        )  # fmt: skip
        measurement = _calibrate(counting, spec, records, epsilon, delta, max_rows)
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
    measurement = _calibrate(counting, spec, records, epsilon, delta, max_rows)
    counts = [int(c) for c in measurement(values)]
    value = {"counts": counts[1:-1], "edges": edges, "outside": counts[0] + counts[-1]}
    return value, _describe(spec, measurement)


def _quantile(spec: QuerySpec, records: Records, epsilon: Decimal, delta: Decimal, max_rows: int):
    lo, hi = _bounds(spec)
    candidates = [float(c) for c in np.linspace(lo, hi, spec.candidates)]
    assert spec.q is not None

    def chain(scale: float) -> Any:
        return _clamped(lo, hi) >> dp.m.then_private_quantile(
            dp.max_divergence(), candidates=candidates, alpha=spec.q, scale=scale
        )

    measurement = _searched(chain, _cache_key(spec, records, max_rows), records.contributions,
                            float_at_most(epsilon))  # fmt: skip
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
    transformation: Any,
    spec: QuerySpec,
    records: Records,
    epsilon: Decimal,
    delta: Decimal,
    max_rows: int,
) -> _Calibrated:
    """``transformation`` followed by the least noise whose privacy map, at the records'
    input distance, stays within (epsilon, delta)."""
    d_in = records.contributions
    target = float_at_most(epsilon)
    if spec.noise != "gaussian":
        return _laplace(transformation, d_in, target)
    fixed_delta = float_at_most(delta)

    def approximate(scale: float) -> Any:
        noisy = transformation >> dp.m.then_gaussian(scale)
        return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(noisy), fixed_delta)

    key = _cache_key(spec, records, max_rows)
    return _searched(approximate, key, d_in, (target, fixed_delta))


def _laplace(transformation: Any, d_in: int, target: float) -> _Calibrated:
    """Laplace noise of scale sensitivity / epsilon, from the transformation's own
    stability map; nudged up until OpenDP's privacy map confirms it is within ``target``."""
    sensitivity = float(transformation.map(d_in))
    scale = sensitivity / target
    for _ in range(64):
        measurement = transformation >> dp.m.then_laplace(scale)
        if measurement.map(d_in) <= target:
            return _Calibrated(measurement, scale)
        scale = math.nextafter(scale * (1 + 1e-12), math.inf)
    return _searched(lambda s: transformation >> dp.m.then_laplace(s), None, d_in, target)


_SCALES: dict[tuple[Any, ...], float] = {}
_REHEARSED: set[tuple[Any, ...]] = set()
"""Query shapes already rehearsed (their measurement is built from these alone)."""
MAX_CACHED_SCALES = 4096


def _searched(chain: Any, key: tuple[Any, ...] | None, d_in: int, target: Any) -> _Calibrated:
    """The least scale whose privacy map fits ``target``, by bisection (remembered per
    query shape: it costs tens of milliseconds), checked against the privacy map each
    time."""
    scale = _SCALES.get(key) if key is not None else None
    if scale is None:
        scale = _bisect(chain, d_in, target)
        if key is not None:
            if len(_SCALES) >= MAX_CACHED_SCALES:
                _SCALES.clear()
            _SCALES[key] = scale
    measurement = chain(scale)
    if not _within(measurement.map(d_in), target):
        raise AssertionError("the measurement costs more than the budget debited")
    return _Calibrated(measurement, scale)


def _bisect(chain: Any, d_in: int, target: Any) -> float:
    """Bisection over the noise scale (more noise, less loss). A scale whose chain OpenDP
    cannot build or account for (its conversions overflow for too little noise) counts as
    not fitting, so the search never ends on an exception."""

    def fits(scale: float) -> bool:
        try:
            return _within(chain(scale).map(d_in), target)
        except Exception:  # noqa: BLE001 - OpenDP refuses this scale: too small
            return False

    high = 1.0
    for _ in range(1100):
        if fits(high):
            break
        high *= 2
    else:
        raise ValueError("no noise scale fits this privacy loss")
    low = high / 2
    for _ in range(1100):
        if low == 0 or not fits(low):
            break
        high, low = low, low / 2
    for _ in range(100):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if fits(middle):
            high = middle
        else:
            low = middle
    return high


def _within(spent: Any, target: Any) -> bool:
    if isinstance(target, tuple):
        return bool(spent[0] <= target[0] and spent[1] <= target[1])
    return bool(spent <= target)


def _cache_key(spec: QuerySpec, records: Records, max_rows: int) -> tuple[Any, ...]:
    """What determines a scale: the query without its column and filters, the input
    distance, the number of categories, and the records a sum assumes at most."""
    shape = spec.model_dump_json(exclude={"column", "where"})
    categories = len(records.categories) if records.categories is not None else None
    return (shape, records.contributions, categories, max_rows)


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
