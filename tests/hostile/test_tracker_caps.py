"""Tracker caps that failed open: past a cap, the old trackers answered "public".

Taint scanning stopped after 10,000 list items and lineage kept 64 tags, so hiding one
private value behind 10,000 public ones, or a denied tag behind 64 others, escaped the
owner's rules. Labels now come from the whole action graph, and tag sets are never cut.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import duet_p2p as sy
from tests.hostile.common import WAIT, host, pending, ready_requests, released, session


def test_a_private_item_after_ten_thousand_public_ones(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        secret = host(owner, scientist, torch.tensor(7.0), "secret")
        public = scientist.torch.zeros(())
        stacked = scientist.torch.stack([public] * 9_999 + [secret])  # the old scan stopped
        assert pending(stacked.request(reason="stack"))
        assert released(owner) == []
        assert torch.equal(scientist.torch.stack([public] * 9_999).get(timeout_secs=WAIT),
                           torch.zeros(9_999))  # fmt: skip
        too_many = scientist.torch.stack([public] * 12_000 + [secret])
        with pytest.raises(sy.OperationNotAllowed, match="more than 10,000"):
            too_many.get(timeout_secs=WAIT)  # refused before any labelling work


def test_a_denied_tag_behind_a_hundred_others(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        owner.requests.add_handler("deny", tags=["patients"], reason="never")
        owner.requests.add_handler("accept")
        pointers = [host(owner, scientist, torch.tensor([float(i)]), f"t{i:03d}")
                    for i in range(100)]  # fmt: skip
        patients = host(owner, scientist, torch.tensor([1.0]), "patients")
        total = pointers[0]
        for pointer in [*pointers[1:], patients]:
            total = total + pointer
        handle = total.request(reason="everything")
        assert handle.wait(WAIT) == "denied"
        [request] = [r for r in ready_requests(owner, 1) if r.request_id == handle.request_id]
        assert len(request.tags) == 101 and "patients" in request.tags
        assert released(owner) == []
