"""DP queries end to end: a real owner and scientist over WebRTC on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import duet_p2p as sy
from tests.hostile.common import WAIT, session


def test_dp_statistics_over_webrtc_until_the_budget_is_spent(signaling_url: str, tmp_path: Path):
    ledger = tmp_path / "ledger.sqlite"
    ages = torch.linspace(20, 80, 1000)
    with session(signaling_url, tmp_path, dp_ledger=ledger) as (owner, scientist):
        owner.store.send(ages, tags=["ages"], columns=["age"])
        owner.dp.set_budget("ages", epsilon=1.0)
        owner.requests.add_handler("accept", dp=True, max_epsilon=0.5)
        pointer = scientist.store["ages"]
        mean = scientist.dp.mean(pointer, bounds=(0, 100), epsilon=0.5, timeout_secs=WAIT)
        assert abs(mean - 50) < 5
        histogram = scientist.dp.histogram(pointer, bins=[20, 50, 80], epsilon=0.5,
                                           timeout_secs=WAIT)  # fmt: skip
        assert histogram.edges == (20.0, 50.0, 80.0) and abs(sum(histogram.counts) - 1000) < 30
        with pytest.raises(sy.BudgetExceeded):
            scientist.dp.count(pointer, epsilon=0.01, timeout_secs=WAIT)
        assert scientist.dp.budget["ages"].epsilon_left == 0
    assert sy.PrivacyLedger(ledger).left(scientist.client_id, "ages").epsilon == 0
