"""The privacy budget ledger: refuses overspending, survives restarts, holds across
processes, and counts exactly."""

from __future__ import annotations

import os
import stat
from decimal import Decimal
from pathlib import Path

import pytest

from duet_p2p.errors import BudgetExceeded
from duet_p2p.permissions.ledger import PrivacyLedger, float_at_most, open_ledger

ALICE, BOB = "a" * 32, "b" * 32


def spend(ledger: PrivacyLedger, who: str, epsilon: float, datasets=("ages",)) -> None:
    ledger.reserve(who, datasets, Decimal(repr(epsilon)), Decimal(0), "dp.sum").commit("r")


def test_refuses_the_query_that_would_exceed(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.set_budget("ages", epsilon=1.0)
    spend(ledger, ALICE, 0.6)
    with pytest.raises(BudgetExceeded) as refused:
        ledger.reserve(ALICE, ["ages"], Decimal("0.5"), Decimal(0), "dp.sum")
    assert refused.value.dataset == "ages"
    assert refused.value.remaining_epsilon == pytest.approx(0.4)
    spend(ledger, ALICE, 0.4)  # exactly what is left still fits
    assert ledger.left(ALICE, "ages").epsilon == 0


def test_ten_tenths_fit_one_exactly(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.set_budget("ages", epsilon=1.0)
    for _ in range(10):
        spend(ledger, ALICE, 0.1)
    with pytest.raises(BudgetExceeded):
        spend(ledger, ALICE, 1e-9)


def test_calibration_target_never_exceeds_the_debit():
    for text in ("0.1", "0.3", "1e-7", "2.675", "0.5"):
        assert Decimal(float_at_most(Decimal(text))) <= Decimal(text)


def test_no_budget_means_no_query(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    with pytest.raises(BudgetExceeded, match="no privacy budget"):
        ledger.reserve(ALICE, ["ages"], Decimal("0.1"), Decimal(0), "dp.count")


def test_survives_a_restart(tmp_path: Path):
    path = tmp_path / "l.sqlite"
    first = PrivacyLedger(path)
    first.set_budget("ages", epsilon=1.0)
    spend(first, ALICE, 0.75)
    del first
    again = PrivacyLedger(path)
    assert again.left(ALICE, "ages").epsilon == Decimal("0.25")
    assert [d.epsilon for d in again.debits(ALICE)] == [Decimal("0.75")]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_reservations_count_before_the_debit_and_return_when_cancelled(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.set_budget("ages", epsilon=1.0)
    held = ledger.reserve(ALICE, ["ages"], Decimal("0.7"), Decimal(0), "dp.mean")
    with pytest.raises(BudgetExceeded):
        ledger.reserve(ALICE, ["ages"], Decimal("0.7"), Decimal(0), "dp.mean")
    held.cancel()
    ledger.reserve(ALICE, ["ages"], Decimal("0.7"), Decimal(0), "dp.mean").commit("r")


def test_two_processes_cannot_both_spend_the_last_of_a_budget(tmp_path: Path):
    """Two ledgers on one file (two owner processes) each reserve what looks free; the
    debit re-checks the file, so the second is refused."""
    path = tmp_path / "l.sqlite"
    one, two = PrivacyLedger(path), PrivacyLedger(path)
    one.set_budget("ages", epsilon=1.0)
    first = one.reserve(ALICE, ["ages"], Decimal("0.6"), Decimal(0), "dp.sum")
    second = two.reserve(ALICE, ["ages"], Decimal("0.6"), Decimal(0), "dp.sum")
    first.commit("r1")
    with pytest.raises(BudgetExceeded):
        second.commit("r2")
    assert sum(d.epsilon for d in one.debits()) == Decimal("0.6")


def test_scientists_have_their_own_budgets_and_share_the_total(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.set_budget("ages", epsilon=1.0)
    ledger.set_budget("ages", epsilon=0.2, client_id=BOB)
    ledger.set_total_budget("ages", epsilon=1.5)
    with pytest.raises(BudgetExceeded):
        spend(ledger, BOB, 0.3)  # Bob's own budget is tighter than the default
    spend(ledger, BOB, 0.2)
    spend(ledger, ALICE, 1.0)
    carol = "c" * 32
    spend(ledger, carol, 0.3)
    with pytest.raises(BudgetExceeded):
        spend(ledger, carol, 0.1)  # the total is used up: 0.2 + 1.0 + 0.3
    assert ledger.left(carol, "ages").epsilon == 0


def test_every_budgeted_tag_is_debited(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.set_budget("ages", epsilon=1.0)
    ledger.set_budget("hospital_a", epsilon=0.5)
    spend(ledger, ALICE, 0.4, datasets=("ages", "hospital_a", "unbudgeted"))
    assert ledger.left(ALICE, "ages").epsilon == Decimal("0.6")
    assert ledger.left(ALICE, "hospital_a").epsilon == Decimal("0.1")
    with pytest.raises(BudgetExceeded) as refused:
        spend(ledger, ALICE, 0.2, datasets=("ages", "hospital_a"))
    assert refused.value.dataset == "hospital_a"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, True, 1e9])
def test_budgets_must_be_sane_numbers(tmp_path: Path, bad: object):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    with pytest.raises((ValueError, TypeError)):
        ledger.set_budget("ages", epsilon=bad)  # type: ignore[arg-type]


def test_one_ledger_per_file_per_process(tmp_path: Path):
    assert open_ledger(tmp_path / "x.sqlite") is open_ledger(tmp_path / "x.sqlite")


def test_default_file_lives_in_duet_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DUET_HOME", str(tmp_path / "home"))
    ledger = PrivacyLedger()
    assert ledger.path == tmp_path / "home" / "privacy_ledger.sqlite"
    assert stat.S_IMODE(os.stat(tmp_path / "home").st_mode) == 0o700
