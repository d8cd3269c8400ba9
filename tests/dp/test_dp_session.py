"""DP queries through a real owner session (in-memory transport, real worker process):
handlers, budgets, refusals, the request view, the audit trail, tables and identifiers."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import duet_p2p as sy
from duet_p2p.permissions.ledger import PrivacyLedger
from tests.conftest import wait_for
from tests.memory_duet import memory_duet

WAIT = 15.0
RNG = np.random.default_rng(3)
AGES = RNG.uniform(20, 80, 500)
SEX = RNG.integers(0, 2, 500).astype(float)
TABLE = torch.tensor(np.c_[AGES, SEX])


@pytest.fixture
def ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "ledger.sqlite")


@pytest.fixture
def pair(tmp_path: Path, ledger: PrivacyLedger) -> Iterator[tuple[sy.Duet, sy.Duet]]:
    with memory_duet(tmp_path / "audit.jsonl", ledger=ledger) as (owner, scientist):
        owner.store.send(TABLE, tags=["ages"], columns=["age", "sex"])
        owner.dp.set_budget("ages", epsilon=1.0)
        yield owner, scientist


def test_a_dp_handler_releases_queries_within_budget_then_budget_exceeded(pair):
    owner, scientist = pair
    owner.requests.add_handler("accept", dp=True, max_epsilon=0.5)
    ages = scientist.store["ages"]
    mean = scientist.dp.mean(ages, "age", bounds=(0, 100), epsilon=0.5, timeout_secs=WAIT)
    assert abs(mean - AGES.mean()) < 10
    count = scientist.dp.count("ages", where=[("sex", "==", 1)], epsilon=0.5, timeout_secs=WAIT)
    assert abs(count - SEX.sum()) < 30
    with pytest.raises(sy.BudgetExceeded, match="'ages'") as refused:
        scientist.dp.sum(ages, "age", bounds=(0, 100), epsilon=0.1, timeout_secs=WAIT)
    assert refused.value.dataset == "ages" and refused.value.remaining_epsilon == 0
    budget = scientist.dp.budget
    assert budget["ages"].epsilon_left == 0 and budget["ages"].epsilon_spent == 1.0
    assert "Epsilon Left" in str(budget) and len(budget.pandas) == 1


def test_a_query_above_max_epsilon_waits_for_the_owner(pair):
    owner, scientist = pair
    owner.requests.add_handler("accept", dp=True, max_epsilon=0.2)
    handle = scientist.dp.mean("ages", "age", bounds=(0, 100), epsilon=0.3, request_block=False)
    assert handle.wait(0.5) == "pending"
    assert wait_for(lambda: len(owner.requests) == 1 and owner.requests[0].ready, WAIT)
    request = owner.requests[0]
    text = str(request)
    for shown in ("dp.mean(ages['age'], bounds=(0, 100), epsilon=0.3)", "epsilon 0.3",
                  "Budget ages:", "epsilon 1 -> 0.7", "Laplace"):  # fmt: skip
        assert shown in text
    assert isinstance(request.preview(), float)
    request.accept()
    assert isinstance(handle.result(WAIT), float)
    assert owner.dp.ledger.left(scientist.client_id, "ages").epsilon == Decimal("0.7")


def test_a_denied_query_costs_nothing(pair):
    owner, scientist = pair
    owner.requests.add_handler("deny", dp=True, reason="not today")
    with pytest.raises(sy.PermissionDenied, match="not today"):
        scientist.dp.mean("ages", "age", bounds=(0, 100), epsilon=0.9, timeout_secs=WAIT)
    assert owner.dp.ledger.left(scientist.client_id, "ages").epsilon == 1
    assert owner.dp.ledger.debits() == []


def test_pending_queries_hold_their_budget(pair):
    """Two queries that each fit, but not together: the second is refused at once."""
    owner, scientist = pair
    first = scientist.dp.sum("ages", "age", bounds=(0, 100), epsilon=0.6, request_block=False)
    with pytest.raises(sy.BudgetExceeded):
        scientist.dp.sum("ages", "age", bounds=(0, 100), epsilon=0.6, timeout_secs=WAIT)
    assert wait_for(lambda: len(owner.requests) == 1 and owner.requests[0].ready, WAIT)
    owner.requests[0].deny("no")
    assert first.wait(WAIT) == "denied"
    scientist.dp.sum("ages", "age", bounds=(0, 100), epsilon=0.6, request_block=False)


def test_a_differencing_attack_costs_budget_and_ends_in_budget_exceeded(pair):
    """Exact sums over all records and all-but-one reveal one record; through DP each
    answer is noisy and every question costs, so the attack runs out of budget."""
    owner, scientist = pair
    owner.requests.add_handler("accept", dp=True, max_epsilon=0.1)
    answers = []
    with pytest.raises(sy.BudgetExceeded):
        for _ in range(100):
            everyone = scientist.dp.sum("ages", "age", bounds=(0, 100), epsilon=0.1,
                                        timeout_secs=WAIT)  # fmt: skip
            but_one = scientist.dp.sum("ages", "age", where=[("age", "!=", float(AGES[0]))],
                                       bounds=(0, 100), epsilon=0.1, timeout_secs=WAIT)  # fmt: skip
            answers.append(everyone - but_one)
    assert len(answers) == 5  # ten queries of 0.1 spend the whole budget of 1.0
    assert len(owner.dp.ledger.debits(scientist.client_id)) == 10
    # each difference is the record plus Laplace noise of scale 1000 (two sums at 0.1)
    assert max(abs(a - AGES[0]) for a in answers) > 50


def test_nothing_exact_auto_releases_through_a_dp_handler(pair):
    owner, scientist = pair
    owner.requests.add_handler("accept", dp=True)
    ages = scientist.store["ages"]
    exact = ages[:, 0].sum().request(reason="the exact sum please")
    assert exact.wait(0.5) == "pending"
    assert any(r.dp is None for r in owner.requests)


def test_an_exact_accept_handler_does_not_skip_the_budget(pair):
    owner, scientist = pair
    owner.requests.add_handler("accept")  # accepts anything, DP included
    scientist.dp.count("ages", epsilon=1.0, timeout_secs=WAIT)
    with pytest.raises(sy.BudgetExceeded):
        scientist.dp.count("ages", epsilon=0.01, timeout_secs=WAIT)


def test_invalid_queries_are_refused_before_they_cost(pair):
    owner, scientist = pair
    cases = [
        (dict(statistic="mean", column="agex", bounds=(0, 1)), "no column 'agex'"),
        (dict(statistic="mean", column="age"), "needs bounds"),
        (dict(statistic="sum", column="age", bounds=(5, 1)), "low < high"),
        (dict(statistic="quantile", column="age", bounds=(0, 1)), "needs q="),
        (dict(statistic="histogram", column="age"), "needs bins="),
        (dict(statistic="sum", column="age", bounds=(0, 1), delta=1e-6), "takes no delta"),
        (dict(statistic="mean", column="age", bounds=(0, 1), noise="gaussian", delta=1e-6),
         "Gaussian noise is offered"),
        (dict(statistic="count", where=[("sex", "<", "x")]), "holds numbers"),
    ]  # fmt: skip
    for fields, message in cases:
        statistic = fields.pop("statistic")
        method = getattr(scientist.dp, statistic)
        if statistic == "quantile":
            fields.setdefault("q", None)
        with pytest.raises(sy.InvalidQuery, match=message):
            method("ages", epsilon=0.1, timeout_secs=WAIT, **fields)
    assert owner.dp.ledger.left(scientist.client_id, "ages").epsilon == 1


def test_queries_run_only_on_hosted_private_datasets(pair):
    owner, scientist = pair
    derived = scientist.store["ages"] * 2
    with pytest.raises(sy.InvalidQuery, match="hosted datasets"):
        scientist.dp.count(derived, epsilon=0.1, timeout_secs=WAIT)
    owner.store.send(torch.ones(3), tags=["open"], public=True)
    with pytest.raises(sy.InvalidQuery, match="public"):
        scientist.dp.count(scientist.store.refresh()["open"], epsilon=0.1, timeout_secs=WAIT)


def test_a_dataset_without_public_columns_allows_only_a_count(pair):
    owner, scientist = pair
    owner.store.send(torch.rand(40, 3), tags=["hidden"])
    owner.dp.set_budget("hidden", epsilon=1.0)
    owner.requests.add_handler("accept", dp=True)
    hidden = scientist.store.refresh()["hidden"]
    assert isinstance(scientist.dp.count(hidden, epsilon=0.5, timeout_secs=WAIT), int)
    for column in (0, 2, 7):  # the same refusal whatever the real width
        with pytest.raises(sy.InvalidQuery, match="has not published"):
            scientist.dp.sum(hidden, column, bounds=(0, 1), epsilon=0.1, timeout_secs=WAIT)


def test_a_dataframe_with_categories_and_an_identifier(tmp_path: Path, ledger: PrivacyLedger):
    """Visits: one person has many rows; DP protects the person (first 2 rows each)."""
    visits = pd.DataFrame({
        "patient": [1, 1, 1, 1, 1, 1, 1, 1, 2, 3, 4, 5],
        "ward": ["a", "a", "a", "a", "a", "a", "a", "a", "b", "b", "c", None],
        "cost": [10.0] * 12,
    })  # fmt: skip
    with memory_duet(tmp_path / "audit.jsonl", ledger=ledger) as (owner, scientist):
        owner.store.send(visits, tags=["visits"], identifier="patient", rows_per_identifier=2)
        owner.dp.set_budget("visits", epsilon=100.0)
        owner.requests.add_handler("accept", dp=True)
        info = scientist.store.info("visits")
        assert info["schema"]["columns"] == ["patient", "ward", "cost"]
        assert info["schema"]["categories"]["ward"] == ["a", "b", "c"]
        # patient 1's eight visits count as two; epsilon 100 makes the noise tiny
        assert scientist.dp.count("visits", epsilon=50, timeout_secs=WAIT) in range(4, 9)
        wards = scientist.dp.histogram("visits", "ward", epsilon=40, timeout_secs=WAIT)
        assert isinstance(wards, sy.DPHistogram) and wards.categories == ("a", "b", "c")
        assert abs(wards.counts[0] - 2) <= 2 and abs(wards.outside - 1) <= 2
        assert list(wards.pandas.index) == ["a", "b", "c"]
        n_b = scientist.dp.count("visits", where={"ward": "b"}, epsilon=5, timeout_secs=WAIT)
        assert abs(n_b - 2) <= 5
        request = next(r for r in owner.requests.all() if r.name == "dp.histogram")
        assert "noise" not in request.lineage and request.dp.noise.startswith("Laplace")


def test_budgets_carry_over_to_the_scientists_next_session(tmp_path: Path):
    """One ledger file: the same Client ID (a returning scientist) continues its spend."""
    path = tmp_path / "ledger.sqlite"
    for spent_before in (0.0, 0.6):
        ledger = PrivacyLedger(path)  # a restarted owner opens the file again
        with memory_duet(tmp_path / "audit.jsonl", ledger=ledger) as (owner, scientist):
            owner.store.send(TABLE, tags=["ages"], columns=["age", "sex"])
            owner.dp.set_budget("ages", epsilon=1.0)
            owner.requests.add_handler("accept", dp=True)
            assert scientist.dp.budget["ages"].epsilon_spent == pytest.approx(spent_before)
            if spent_before:
                with pytest.raises(sy.BudgetExceeded):
                    scientist.dp.count("ages", epsilon=0.6, timeout_secs=WAIT)
            else:
                scientist.dp.count("ages", epsilon=0.6, timeout_secs=WAIT)


def test_every_debit_is_audited_before_the_release(pair):
    owner, scientist = pair
    owner.requests.add_handler("accept", dp=True)
    scientist.dp.quantile("ages", 0.5, "age", bounds=(0, 100), epsilon=0.3, timeout_secs=WAIT)
    events = [e["event"] for e in owner.audit.entries()]
    assert events.index("dp_debit") < events.index("release")
    debit = next(e for e in owner.audit.entries() if e["event"] == "dp_debit")
    assert debit["dataset"] == "ages" and debit["epsilon"] == "0.3"
    assert debit["epsilon_left"] == "0.7" and debit["statistic"] == "dp.quantile"
    assert "ages" in str(owner.dp.budget) and "dp.quantile" in str(owner.dp.debits)
