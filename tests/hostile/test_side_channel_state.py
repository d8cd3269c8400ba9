"""Module state as a side channel: a public module that a private call changes.

A public ``nn.Embedding(max_norm=...)`` renormalises the rows that the (private) indices
select, so reading the public module afterwards told which rows were used. The monitor
knows from the module's description which calls write into it (``max_norm``, running
statistics while training, in-place layers) and makes what they wrote private.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tests.hostile.common import WAIT, host, pending, released, session


def test_max_norm_embedding_becomes_private(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        indices = host(owner, scientist, torch.tensor([3, 7]), "indices")
        uploaded = nn.Embedding(10, 4, max_norm=0.1).send(scientist)
        built = scientist.torch.nn.Embedding(10, 4, max_norm=0.1)
        for embedding in (uploaded, built):
            weight = embedding.parameters()[0]
            embedding(indices)
            assert pending(embedding.request(reason="module")), "max_norm rewrote its rows"
            assert pending(weight.request(reason="weight")), "and every alias of them"
        plain = nn.Embedding(10, 4).send(scientist)
        plain(indices)
        assert isinstance(plain.get(timeout_secs=WAIT), nn.Embedding), "nothing was written"
        assert all(r["object_id"] not in (uploaded.id, built.id) for r in released(owner))


def test_running_statistics_and_inplace_layers(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        x = host(owner, scientist, torch.randn(16, 4), "x")
        norm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).send(scientist)
        norm(x)
        assert pending(norm.request(reason="stats"))
        frozen = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).send(scientist)
        frozen.eval()
        frozen(x)
        assert isinstance(frozen.get(timeout_secs=WAIT), nn.Sequential), "eval: no update"
        switched = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).send(scientist)
        switched.eval()
        switched.train()
        switched(x)
        assert pending(switched.request(reason="train again"))
        # a private module whose first layer works in place writes into its input
        model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4)).send(scientist)
        model(x).sum().backward()  # trained on x: private now
        mine = scientist.torch.randn(2, 4)
        model(mine)
        assert pending(mine.request(reason="written in place"))
        public_input = scientist.torch.randn(2, 4)
        nn.Sequential(nn.ReLU(inplace=True)).send(scientist)(public_input)
        assert isinstance(public_input.get(timeout_secs=WAIT), torch.Tensor), "public in, out"
