"""Aliasing: making a public object hold private memory without any counter changing.

``load_state_dict(..., assign=True)`` and ``state_dict(destination=...)`` used to make
public objects share memory with private ones, and the old per-memory taint tracker never
saw it. The monitor refuses both; plain copies and writes through views make the
receivers private, and nothing reaches the owner's objects.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import duet_p2p as sy
from tests.hostile.common import WAIT, assert_serving, host, pending, released, session


def test_assign_and_destination_are_refused(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        weight = host(owner, scientist, torch.randn(2, 3), "weight")
        bias = host(owner, scientist, torch.randn(2), "bias")
        linear = nn.Linear(3, 2).send(scientist)
        assigned = linear.load_state_dict({"weight": weight, "bias": bias}, assign=True)
        with pytest.raises(sy.OperationNotAllowed, match="assign"):
            assigned.get(timeout_secs=WAIT)
        destination = nn.Linear(3, 2).send(scientist).state_dict()
        leaked = linear.state_dict(destination=destination)
        with pytest.raises(sy.OperationNotAllowed, match="state_dict"):
            leaked.get(timeout_secs=WAIT)
        positional = linear.state_dict(destination)
        with pytest.raises(sy.OperationNotAllowed, match="state_dict"):
            positional.get(timeout_secs=WAIT)
        assert isinstance(linear.get(timeout_secs=WAIT), nn.Linear), "still public: untouched"
        assert released(owner) != [] and all(r["object_id"] != weight.id for r in released(owner))
        assert_serving(owner, scientist)


def test_copying_private_state_in_makes_the_module_private(
    signaling_url: str, tmp_path: Path
) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        weight = host(owner, scientist, torch.randn(2, 3), "weight")
        linear = nn.Linear(3, 2).send(scientist)
        parameters = linear.parameters()  # taken before: an alias of the module's memory
        first = parameters[0]
        linear.load_state_dict({"weight": weight, "bias": scientist.torch.zeros(2)})
        for pointer in (linear, parameters, first, linear.state_dict()):
            assert pending(pointer.request(reason="alias")), pointer
        assert released(owner) == []


def test_writes_through_views_reach_the_base(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        data = host(owner, scientist, torch.arange(6.0), "data")
        mine = scientist.torch.zeros(6)
        chain = mine.view(2, 3).t()[0].unsqueeze(0)  # four views deep
        chain.copy_(data[0:2].unsqueeze(0))
        assert pending(mine.request(reason="base"))
        other = scientist.torch.zeros(6)
        other.view(6)[data.argmax()] = 1.0  # a private index: where the write lands
        assert pending(other.request(reason="indexed"))
        untouched = scientist.torch.zeros(6)
        assert torch.equal(untouched.get(timeout_secs=WAIT), torch.zeros(6))


def test_optimizers_over_the_owners_parameters_cannot_step(
    signaling_url: str, tmp_path: Path
) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        model = nn.Linear(3, 1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        owner.store.send(model, tags=["model"])
        remote = scientist.store.refresh()["model"]
        optimizer = scientist.torch.optim.SGD(remote.parameters(), lr=1.0)
        stepped = optimizer.step()
        with pytest.raises(sy.OperationNotAllowed, match="modify an object the owner hosts"):
            stepped.get(timeout_secs=WAIT)
        zeroed = remote.zero_grad()
        with pytest.raises(sy.OperationNotAllowed, match="modify an object the owner hosts"):
            zeroed.get(timeout_secs=WAIT)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert_serving(owner, scientist)
