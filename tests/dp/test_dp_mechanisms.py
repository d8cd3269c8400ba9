"""Each DP statistic against OpenDP's own expectations: noise scale, cost, unbiasedness.

The scales are the textbook ones OpenDP's privacy maps give (a count's sensitivity is one
record, a clamped sum's is the largest bound, both times the records one person may
have), so these tests also catch a chain that adds the wrong amount of noise.
"""

from __future__ import annotations

import statistics
from decimal import Decimal

import numpy as np
import opendp.prelude as dp
import pytest

from duet_p2p.owner.dp_mechanisms import Records, release
from duet_p2p.rpc.dp_spec import QuerySpec

RNG = np.random.default_rng(7)
AGES = RNG.uniform(20, 80, 2000)


def scale_of(noise: str) -> float:
    return float(noise.rsplit("scale ", 1)[1].split()[0].rstrip(")"))


@pytest.mark.parametrize(("epsilon", "contributions"), [(1.0, 1), (0.5, 1), (0.5, 3)])
def test_count_noise_scale_is_contributions_over_epsilon(epsilon: float, contributions: int):
    released = release(QuerySpec(statistic="count", epsilon=epsilon), Records(AGES, contributions))
    assert scale_of(released.noise) == pytest.approx(contributions / epsilon, rel=1e-5)
    assert released.epsilon == Decimal(repr(epsilon)) and released.delta == 0


@pytest.mark.parametrize(
    ("bounds", "epsilon", "sensitivity"),
    [((0.0, 100.0), 1.0, 100.0), ((-50.0, 10.0), 0.25, 60.0)],
)
def test_sum_noise_scale_is_sensitivity_over_epsilon(
    bounds: tuple[float, float], epsilon: float, sensitivity: float
):
    """One record moves a clamped sum by at most the larger bound; when the bounds straddle
    zero OpenDP's checked float sum charges their width."""
    spec = QuerySpec(statistic="sum", bounds=bounds, epsilon=epsilon)
    released = release(spec, Records(AGES, 1))
    assert scale_of(released.noise) == pytest.approx(sensitivity / epsilon, rel=1e-4)


def test_scales_match_opendps_own_search():
    """Our calibration finds what OpenDP's binary search over the same chain finds."""
    domain = dp.vector_domain(dp.atom_domain(T=float, nan=True))
    metric = dp.symmetric_distance()
    chain = dp.t.make_count(domain, metric, TO=dp.i64)
    expected = dp.binary_search_param(lambda s: chain >> dp.m.then_laplace(s), d_in=2, d_out=0.7)
    released = release(QuerySpec(statistic="count", epsilon=0.7), Records(AGES, 2))
    assert scale_of(released.noise) == pytest.approx(expected, rel=1e-5)


def test_count_is_unbiased_with_the_spread_of_its_scale():
    draws = [release(QuerySpec(statistic="count", epsilon=1.0), Records(AGES, 1)).value
             for _ in range(1000)]  # fmt: skip
    # Laplace(1): mean 0, standard deviation sqrt(2); 1000 draws: mean within 5 sigma, and
    # the sample deviation (relative error about 0.08 / sqrt(n / 200)) well within 25 %
    assert statistics.fmean(draws) == pytest.approx(len(AGES), abs=5 * 2**0.5 / 1000**0.5)
    assert statistics.stdev(draws) == pytest.approx(2**0.5, rel=0.25)
    assert all(isinstance(v, int) for v in draws)


def test_sum_is_unbiased():
    spec = QuerySpec(statistic="sum", bounds=(0.0, 100.0), epsilon=1.0)
    draws = [release(spec, Records(AGES, 1)).value for _ in range(1000)]
    sigma = 100 * 2**0.5  # Laplace(100); 1000 draws keep a heavy tail's sample deviation near
    assert statistics.fmean(draws) == pytest.approx(AGES.sum(), abs=5 * sigma / 1000**0.5)
    assert statistics.stdev(draws) == pytest.approx(sigma, rel=0.25)


def test_mean_and_variance_converge_to_the_truth():
    mean = QuerySpec(statistic="mean", bounds=(0.0, 100.0), epsilon=1.0)
    variance = QuerySpec(statistic="variance", bounds=(0.0, 100.0), epsilon=1.0)
    means = [release(mean, Records(AGES, 1)).value for _ in range(100)]
    variances = [release(variance, Records(AGES, 1)).value for _ in range(100)]
    assert statistics.fmean(means) == pytest.approx(AGES.mean(), abs=0.5)
    assert statistics.fmean(variances) == pytest.approx(AGES.var(ddof=1), rel=0.05)


def test_clamping_bounds_each_record():
    """A record far outside the bounds moves the sum by the bound, not by itself."""
    outlier = np.r_[AGES, 1e12]
    spec = QuerySpec(statistic="sum", bounds=(0.0, 100.0), epsilon=10.0)
    draws = [release(spec, Records(outlier, 1)).value for _ in range(50)]
    assert statistics.fmean(draws) == pytest.approx(AGES.sum() + 100, abs=20)


def test_histogram_counts_each_bin_without_bias():
    spec = QuerySpec(statistic="histogram", bins=4, bounds=(0.0, 100.0), epsilon=1.0)
    truth, _ = np.histogram(AGES, bins=4, range=(0, 100))
    draws = np.array([release(spec, Records(AGES, 1)).value["counts"] for _ in range(200)])
    assert np.allclose(draws.mean(axis=0), truth, atol=5 * 2**0.5 / 200**0.5)


def test_histogram_of_categories_counts_missing_apart():
    codes = np.array([0, 0, 1, 2, 2, 2, np.nan])
    spec = QuerySpec(statistic="histogram", epsilon=5.0)
    value = release(spec, Records(codes, 1, ("a", "b", "c"))).value
    assert value["categories"] == ["a", "b", "c"] and len(value["counts"]) == 3
    assert isinstance(value["outside"], int)


def test_median_lands_near_the_median():
    spec = QuerySpec(statistic="quantile", q=0.5, bounds=(0.0, 100.0), epsilon=1.0)
    draws = [release(spec, Records(AGES, 1)).value for _ in range(20)]
    assert statistics.median(draws) == pytest.approx(float(np.median(AGES)), abs=2.0)


def test_gaussian_costs_its_epsilon_and_delta():
    spec = QuerySpec(statistic="sum", bounds=(0.0, 100.0), epsilon=1.0, delta=1e-6,
                     noise="gaussian")  # fmt: skip
    released = release(spec, Records(AGES, 1))
    assert released.delta == Decimal("0.000001") and "Gaussian" in released.noise
    assert isinstance(released.value, float)


def test_missing_values_are_imputed_not_fatal():
    values = np.r_[AGES[:100], [np.nan] * 10]
    for statistic in ("sum", "mean", "variance"):
        spec = QuerySpec(statistic=statistic, bounds=(0.0, 100.0), epsilon=1.0)
        assert np.isfinite(release(spec, Records(values, 1)).value)


def test_empty_selection_still_releases_a_noisy_value():
    """No records (a filter kept none) is not an error: an error would tell it apart."""
    empty = Records(np.zeros(0), 1)
    for spec in (
        QuerySpec(statistic="count", epsilon=1.0),
        QuerySpec(statistic="mean", bounds=(0.0, 1.0), epsilon=1.0),
        QuerySpec(statistic="variance", bounds=(0.0, 1.0), epsilon=1.0),
        QuerySpec(statistic="quantile", q=0.9, bounds=(0.0, 1.0), epsilon=1.0),
        QuerySpec(statistic="histogram", bins=3, bounds=(0.0, 1.0), epsilon=1.0),
    ):
        assert release(spec, empty).value is not None


def test_a_tiny_epsilon_cannot_make_the_monitor_allocate_a_huge_resize():
    """A mean at epsilon 1e-6 gets a noisy count in the millions: the resize is capped."""
    spec = QuerySpec(statistic="mean", bounds=(0.0, 100.0), epsilon=1e-6)
    released = release(spec, Records(AGES, 1), max_rows=10_000)
    assert np.isfinite(released.value)
    records = int(released.noise.split(" of ")[1].split()[0])
    assert 1 <= records <= 10_000
