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


def test_the_parameter_ratio_when_the_records_are_known():
    rules = sy.DisclosureRules()
    linear = torch.nn.Linear(10, 2)  # 22 parameters
    assert rules.check(linear, (), 30) == (
        "model size: 22 parameters for 30 records, above the ratio 0.33",
    )
    assert rules.check(linear, (), 100) == ()
    assert rules.check(linear, (), None)[0].endswith("whose number is not known")


def test_a_model_holding_statistics_of_private_records_waits(tmp_path: Path):
    """Batch norm keeps means and variances of what it was called on: two such modules
    can be differenced, so the records it summarises count as unknown."""
    with memory_duet(tmp_path / "audit.jsonl") as (owner, scientist):
        owner.store.send(torch.rand(30, 10), tags=["features"])
        owner.requests.add_handler("accept", tags=["features"])
        features = scientist.store["features"]
        model = scientist.send(torch.nn.BatchNorm1d(10))  # 20 parameters
        model(features)  # training mode: running statistics of the 30 records
        handle = model.request()
        assert handle.wait(0.5) == "pending"
        request = first_ready(owner)
        assert request.checks == (
            "model size: 20 parameters, fitted on a selection of records whose number is not known",
        )
        request.accept()
        assert isinstance(handle.result(WAIT), torch.nn.BatchNorm1d)


def test_a_trained_model_waits_when_its_records_are_not_known(tmp_path: Path):
    """Gradients of a loss reach a model from records the monitor cannot count (a batch,
    a slice, whatever the loss was made of): the size check fires."""
    with memory_duet(tmp_path / "audit.jsonl") as (owner, scientist):
        owner.store.send(torch.rand(300, 10), tags=["features"])
        owner.requests.add_handler("accept", tags=["features"])
        features = scientist.store["features"]
        model = scientist.send(torch.nn.Linear(10, 2))  # 22 parameters, 300 records
        model(features).sum().backward()
        handle = model.request()
        assert handle.wait(0.5) == "pending"
        assert first_ready(owner).checks == (
            "model size: 22 parameters, fitted on a selection of records whose number is not known",
        )
        owner.requests.add_handler("accept", tags=["features"], ignore_disclosure_checks=True)
        assert isinstance(handle.result(WAIT), torch.nn.Linear)


def test_a_rescaled_count_cannot_be_checked_so_it_waits(tmp_path: Path):
    with memory_duet(tmp_path / "audit.jsonl") as (owner, scientist):
        owner.store.send(WARDS.float(), tags=["wards"])
        owner.requests.add_handler("accept")
        wards = scientist.store["wards"]
        assert ((wards == 3).sum() * 0.5).request().wait(0.5) == "pending"
        assert first_ready(owner).checks == (
            "cell count: a count rescaled to fractions cannot be checked",
        )
        # a proportion over counted records is read back as counts: 39 of 40 and 1 of 40
        assert (wards < 3).float().mean().request().wait(0.5) == "pending"
        # with every cell large enough it is released
        assert (wards < 1).float().mean().get(timeout_secs=WAIT) == 0.3


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
