"""Differential privacy: utility against epsilon, and what a DP query costs over the exact get.

Data: scikit-learn's diabetes table (``load_diabetes(as_frame=True, scaled=False)``, 442
records, bundled with the package; nothing is downloaded).

Utility, in this process through the mechanism layer (``dp_mechanisms.release``, the same
OpenDP measurements the owner runs): for ``age`` (bounds 0-100) and ``bmi`` (10-50), at
epsilon 0.1, 1 and 10, the median over ``DRAWS`` releases of
- the mean's relative error, |dp_mean - mean| / mean, and
- the histogram's relative error, sum |noisy count - count| / records (10 equal bins over
  the bounds; true counts from numpy.histogram on the same edges).
Beside each, what the Laplace scale predicts: the mean spends half its epsilon on a noisy
count, so its noise has scale (hi - lo) / (records * epsilon / 2), median |noise| = scale
ln 2; a count per bin has scale 1 / epsilon (discrete Laplace, E|noise| = 2a / (1 - a^2)
with a = exp(-epsilon)).

Cost, between two peer processes over WebRTC on loopback: the owner hosts the table (a
DataFrame) with a budget of 1000 epsilon and an accept handler for DP queries and one for
exact gets; the scientist times ``duet.dp.mean(ptr, "age", bounds=(0, 100), epsilon=1)``
against the exact ``ptr[:, age].mean().get()`` (the baseline), and a DP histogram,
interleaved, ``ROUNDS`` of each (median). Both peers get a temporary ``DUET_HOME``, and the
owner's ledger is a file there.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._peers import (
    DuetPeer,
    Handlers,
    Peer,
    connect_duet,
    disconnect_duet,
    median,
    signaling_server,
)

EPSILONS = (0.1, 1.0, 10.0)
COLUMNS = (("age", (0.0, 100.0)), ("bmi", (10.0, 50.0)))
BINS = 10
DRAWS = 100
ROUNDS = 30
WARMUP = 3
QUERY_EPSILON = 1.0
BUDGET = 1000.0
TAG = "diabetes"
COST_GOAL_RATIO = 3.0


def load_table() -> Any:
    """The diabetes table as a DataFrame (10 features and the target), unscaled."""
    from sklearn.datasets import load_diabetes

    return load_diabetes(as_frame=True, scaled=False).frame


# -- utility (in process) --------------------------------------------------------------------


def _predicted_mean_error(lo: float, hi: float, records: int, epsilon: float, mean: float) -> float:
    """Median relative error from the mean's own Laplace noise (the count's is left out)."""
    scale = (hi - lo) / (records * epsilon / 2)
    return scale * math.log(2) / abs(mean)


def _predicted_histogram_error(epsilon: float, records: int) -> float:
    """Expected sum over the bins of |discrete Laplace(1 / epsilon)|, per record."""
    a = math.exp(-epsilon)
    return BINS * 2 * a / (1 - a * a) / records


def utility(draws: int = DRAWS) -> list[dict[str, Any]]:
    """Relative errors of a DP mean and a DP histogram per column and epsilon."""
    import numpy as np

    from duet_p2p.owner.dp_mechanisms import Records, release
    from duet_p2p.rpc.dp_spec import QuerySpec

    table = load_table()
    out = []
    for column, (lo, hi) in COLUMNS:
        values = table[column].to_numpy(np.float64)
        records = Records(values, contributions=1)
        true_mean = float(values.mean())
        edges = np.linspace(lo, hi, BINS + 1)
        true_counts, _ = np.histogram(values, bins=edges)  # the last edge is in the last bin
        for epsilon in EPSILONS:
            mean_spec = QuerySpec(statistic="mean", column=column, bounds=(lo, hi),
                                  epsilon=epsilon)  # fmt: skip
            hist_spec = QuerySpec(statistic="histogram", column=column, bounds=(lo, hi),
                                  bins=BINS, epsilon=epsilon)  # fmt: skip
            mean_errors, hist_errors, mean_times, hist_times = [], [], [], []
            for _ in range(draws):
                started = time.perf_counter()
                noisy_mean = release(mean_spec, records).value
                mean_times.append(time.perf_counter() - started)
                mean_errors.append(abs(noisy_mean - true_mean) / abs(true_mean))
                started = time.perf_counter()
                noisy = release(hist_spec, records).value
                hist_times.append(time.perf_counter() - started)
                if not np.allclose(noisy["edges"], edges):
                    raise AssertionError(f"edges {noisy['edges']}, expected {edges.tolist()}")
                diff = np.abs(np.asarray(noisy["counts"]) - true_counts).sum()
                hist_errors.append(float(diff) / len(values))
            out.append({
                "column": column, "bounds": [lo, hi], "epsilon": epsilon, "records": len(values),
                "draws": draws, "true_mean": true_mean,
                "mean_rel_error": median(mean_errors),
                "mean_rel_error_predicted": _predicted_mean_error(lo, hi, len(values), epsilon,
                                                                  true_mean),
                "histogram_rel_error": median(hist_errors),
                "histogram_rel_error_predicted": _predicted_histogram_error(epsilon, len(values)),
                "release_mean_s": median(mean_times),
                "release_histogram_s": median(hist_times),
            })  # fmt: skip
    return out


def utility_markdown(rows: list[dict[str, Any]]) -> str:
    """The utility rows as a markdown table."""
    lines = [
        "| Column (bounds) | Epsilon | Mean: relative error | Laplace predicts | "
        "Histogram: relative error | Laplace predicts |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["bounds"]
        lines.append(
            f"| {r['column']} ({lo:g}-{hi:g}) | {r['epsilon']:g} | "
            f"{r['mean_rel_error']:.3%} | {r['mean_rel_error_predicted']:.3%} | "
            f"{r['histogram_rel_error']:.3%} | {r['histogram_rel_error_predicted']:.3%} |"
        )
    return "\n".join(lines)


# -- cost (two peers) ------------------------------------------------------------------------


class DPPeer(DuetPeer):
    """A Duet peer that launches with a ledger file and runs the DP queries."""

    def __init__(self) -> None:
        super().__init__()

    def handlers(self) -> Handlers:
        return {**super().handlers(), "use_ledger": self.use_ledger,
                "host_table": self.host_table, "queries": self.queries}  # fmt: skip

    def use_ledger(self, path: str) -> None:
        """Owner: the next launch keeps its privacy ledger in ``path``."""
        self.owner_options["dp_ledger"] = path

    def host_table(self, tag: str = TAG, budget: float = BUDGET) -> dict[str, Any]:
        """Owner: host the diabetes DataFrame, set the budget, accept DP and exact queries."""
        frame = load_table()
        self.duet.store.send(frame, tags=[tag])
        self.duet.dp.set_budget(tag, epsilon=budget)
        self.duet.requests.add_handler("accept", dp=True)
        self.duet.requests.add_handler("accept")
        return {"columns": [str(c) for c in frame.columns], "records": len(frame),
                "age_mean": float(frame["age"].mean())}  # fmt: skip

    def queries(self, tag: str, column: str, index: int, rounds: int) -> dict[str, Any]:
        """Scientist: per round a DP mean, the exact mean and a DP histogram; seconds each."""
        pointer = self.objects[tag]
        dp_times, exact_times, hist_times = [], [], []
        dp_value = exact_value = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            dp_value = self.duet.dp.mean(pointer, column, bounds=(0, 100),
                                         epsilon=QUERY_EPSILON, timeout_secs=60)  # fmt: skip
            dp_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            exact = pointer[:, index].mean().get(reason="benchmark", timeout_secs=60)
            exact_times.append(time.perf_counter() - started)
            exact_value = float(exact)
            started = time.perf_counter()
            histogram = self.duet.dp.histogram(pointer, column, bins=BINS, bounds=(0, 100),
                                               epsilon=QUERY_EPSILON, timeout_secs=60)  # fmt: skip
            hist_times.append(time.perf_counter() - started)
            if len(histogram.counts) != BINS:
                raise AssertionError(f"{len(histogram.counts)} bins, expected {BINS}")
        return {"dp_s": dp_times, "exact_s": exact_times, "histogram_s": hist_times,
                "dp_value": dp_value, "exact_value": exact_value,
                "epsilon_left": self.duet.dp.budget[tag].epsilon_left}  # fmt: skip


def peer() -> Handlers:
    return DPPeer().handlers()


@contextlib.contextmanager
def _peers(home: str) -> Iterator[tuple[Peer, Peer]]:
    """Owner and scientist processes whose DUET_HOME is ``home``."""
    env = {"DUET_HOME": home}
    owner = Peer("benchmarks.dp:peer", "owner", env=env)
    try:
        scientist = Peer("benchmarks.dp:peer", "scientist", env=env)
        try:
            yield owner, scientist
        finally:
            scientist.close()
    finally:
        owner.close()


def cost(rounds: int = ROUNDS) -> dict[str, Any]:
    """Median seconds of a DP mean, the exact mean and a DP histogram over WebRTC."""
    with (
        tempfile.TemporaryDirectory(prefix="duet-bench-dp-") as home,
        signaling_server() as url,
        _peers(home) as (owner, scientist),
    ):
        owner.call("use_ledger", path=str(Path(home) / "dp-ledger.sqlite"))
        connect_duet(owner, scientist, url)
        hosted = owner.call("host_table")
        scientist.call("find", tag=TAG)
        index = hosted["columns"].index("age")
        scientist.call("queries", tag=TAG, column="age", index=index, rounds=WARMUP)
        timed = scientist.call("queries", tag=TAG, column="age", index=index, rounds=rounds,
                               timeout=600)  # fmt: skip
        disconnect_duet(owner, scientist)
    if abs(timed["exact_value"] - hosted["age_mean"]) > 1e-9:
        raise AssertionError(f"exact mean {timed['exact_value']}, expected {hosted['age_mean']}")
    spent = 2 * QUERY_EPSILON * (WARMUP + rounds)
    if abs(timed["epsilon_left"] - (BUDGET - spent)) > 1e-6:
        raise AssertionError(f"epsilon left {timed['epsilon_left']}, expected {BUDGET - spent}")
    dp_s, exact_s, hist_s = (
        median(timed["dp_s"]),
        median(timed["exact_s"]),
        median(timed["histogram_s"]),
    )
    return {
        "rounds": rounds,
        "query_epsilon": QUERY_EPSILON,
        "dp_mean_s": dp_s,
        "exact_mean_s": exact_s,
        "ratio": dp_s / exact_s,
        "dp_histogram_s": hist_s,
        "histogram_ratio": hist_s / exact_s,
        "dp_mean_min_s": min(timed["dp_s"]),
        "exact_mean_min_s": min(timed["exact_s"]),
        "last_dp_mean": timed["dp_value"],
        "exact_mean": timed["exact_value"],
        "epsilon_left": timed["epsilon_left"],
        "goal_ratio": COST_GOAL_RATIO,
        "goal_met": dp_s / exact_s <= COST_GOAL_RATIO,
    }


def run_benchmark() -> dict[str, Any]:
    rows = utility()
    result = {"dataset": "sklearn diabetes (unscaled)", "utility": rows, **cost()}
    result["release_mean_s"] = median([r["release_mean_s"] for r in rows])
    result["release_histogram_s"] = median([r["release_histogram_s"] for r in rows])
    return result


if __name__ == "__main__":
    import json

    measured = run_benchmark()
    print(json.dumps(measured, indent=2))
    print()
    print(utility_markdown(measured["utility"]))
    print(
        f"\nDP mean {measured['dp_mean_s'] * 1e3:.1f} ms, exact mean "
        f"{measured['exact_mean_s'] * 1e3:.1f} ms ({measured['ratio']:.1f}x); DP histogram "
        f"{measured['dp_histogram_s'] * 1e3:.1f} ms; OpenDP in process: mean "
        f"{measured['release_mean_s'] * 1e3:.1f} ms, histogram "
        f"{measured['release_histogram_s'] * 1e3:.1f} ms (medians)"
    )
