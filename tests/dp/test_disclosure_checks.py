"""Disclosure checks on exact releases: small cells and oversized models wait for the owner,
who sees which check fired."""

from __future__ import annotations

from pathlib import Path

import torch

import duet_p2p as sy
from tests.conftest import wait_for
from tests.memory_duet import memory_duet

WAIT = 15.0
# ward codes of 40 patients: ward 3 has a single patient
WARDS = torch.tensor([0] * 12 + [1] * 15 + [2] * 12 + [3])


def first_ready(owner: sy.Duet) -> sy.Duet:
    assert wait_for(lambda: len(owner.requests) > 0 and owner.requests[0].ready, WAIT)
    return owner.requests[0]


def test_a_table_with_a_small_cell_is_withheld_from_auto_accept(tmp_path: Path):
    with memory_duet(tmp_path / "audit.jsonl") as (owner, scientist):
        owner.store.send(WARDS, tags=["wards"])
        owner.requests.add_handler("accept", tags=["wards"])
        wards = scientist.store["wards"]
        handle = wards.bincount().request()
        assert handle.wait(0.5) == "pending"
        request = first_ready(owner)
        assert request.checks == ("cell count: a cell counts 1 records, below the minimum 3",)
        assert "Disclosure checks: cell count" in str(request)
        request.accept()  # the owner may still release it
        assert handle.result(WAIT).tolist() == [12, 15, 12, 1]
        # without the single patient every cell is large enough: released by the rule
        assert wards[:39].bincount().get(timeout_secs=WAIT).tolist() == [12, 15, 12]


def test_a_count_of_a_small_subset_is_withheld(tmp_path: Path):
    with memory_duet(tmp_path / "audit.jsonl") as (owner, scientist):
        owner.store.send(WARDS.float(), tags=["wards"])
        owner.requests.add_handler("accept")
        wards = scientist.store["wards"]
        assert (wards < 3).sum().get(timeout_secs=WAIT) == 39
        handle = (wards == 3).sum().item().request()
        assert handle.wait(0.5) == "pending"
        assert first_ready(owner).checks[0].startswith("cell count")


def test_a_model_with_more_parameters_than_records_allow_waits(tmp_path: Path):
    with memory_duet(tmp_path / "audit.jsonl") as (owner, scientist):
        owner.store.send(torch.rand(30, 10), tags=["features"])
        owner.requests.add_handler("accept", tags=["features"])
        features = scientist.store["features"]
        model = scientist.send(torch.nn.Linear(10, 2))  # 22 parameters for 30 records
        model(features).sum().backward()
        handle = model.request()
        assert handle.wait(0.5) == "pending"
        request = first_ready(owner)
        assert request.checks == ("model size: 22 parameters for 30 records, above the ratio 0.33",)
        request.accept()
        assert isinstance(handle.result(WAIT), torch.nn.Linear)


def test_the_owner_can_turn_the_checks_off(tmp_path: Path):
    rules = sy.DisclosureRules(min_cell_count=None, max_parameter_ratio=None)
    with memory_duet(tmp_path / "audit.jsonl", disclosure=rules) as (owner, scientist):
        owner.store.send(WARDS, tags=["wards"])
        owner.requests.add_handler("accept")
        assert scientist.store["wards"].bincount().get(timeout_secs=WAIT).tolist()[-1] == 1


def test_a_stricter_minimum_cell_count(tmp_path: Path):
    rules = sy.DisclosureRules(min_cell_count=13)
    with memory_duet(tmp_path / "audit.jsonl", disclosure=rules) as (owner, scientist):
        owner.store.send(WARDS[:39], tags=["wards"])
        owner.requests.add_handler("accept")
        assert scientist.store["wards"].bincount().request().wait(0.5) == "pending"
        assert "minimum 13" in first_ready(owner).checks[0]
