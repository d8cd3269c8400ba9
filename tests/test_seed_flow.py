"""The seed flow, steps 1-7, between an owner and a scientist over real WebRTC."""

from __future__ import annotations

import threading

import torch

import duet_p2p as sy


def test_seed_flow_in_one_process(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    owner, scientist = duet_pair
    data = torch.tensor([[0, 0], [0, 1]]).tag("data")
    target = torch.tensor([[0], [0]]).tag("target")
    data.send(owner, searchable=True)
    target.send(owner, searchable=True)

    assert len(scientist.store) == 2
    data_ptr = scientist.store[0]
    assert scientist.store["data"].id == data_ptr.id
    sum_ptr = data_ptr.sum().item()

    def owner_accepts() -> None:
        request = owner.requests.wait(timeout=10)
        assert request is not None
        assert owner.requests[0].name == "sum"
        owner.requests[0].accept()

    decider = threading.Thread(target=owner_accepts)
    decider.start()
    value = sum_ptr.get(reason="To see the result", request_block=True, timeout_secs=10)
    decider.join(10)
    assert value == 1
