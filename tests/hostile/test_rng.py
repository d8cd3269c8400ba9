"""The random generator: each session draws from its own, seeded from OS entropy.

Public draws used to come from the owner's process generator (so they revealed its state,
and the owner's own experiments could be predicted), and ``torch.rand(v)`` with a private
``v`` advanced it by ``v``. Now the generator lives in the session's worker; a draw sized
by private data makes it private, and every later draw private too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.hostile.common import WAIT, host, pending, session


def test_draws_reveal_nothing_of_the_owner_generator(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        drawn = scientist.torch.rand(8).get(timeout_secs=WAIT)
        assert torch.equal(torch.get_rng_state(), state), "the owner's generator never moves"
        torch.manual_seed(1234)
        assert not torch.equal(drawn, torch.rand(8)), "a seeded owner does not seed the peer"
        for seed in range(3):
            torch.manual_seed(seed)
            assert not torch.equal(drawn, torch.rand(8))
        again = scientist.torch.rand(8).get(timeout_secs=WAIT)
        assert not torch.equal(drawn, again)


def test_a_private_draw_makes_the_generator_private(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        secret = host(owner, scientist, torch.tensor(5), "secret")
        assert isinstance(scientist.torch.rand(3).get(timeout_secs=WAIT), torch.Tensor)
        sized = scientist.torch.rand(secret.item())  # advances the generator by a secret
        assert pending(sized.request(reason="sized"))
        later = scientist.torch.rand(3)  # public arguments, but the generator is not
        assert pending(later.request(reason="later"))
        module = scientist.torch.nn.Linear(2, 2)  # initialised from the generator
        assert pending(module.request(reason="init"))
        assert torch.equal(scientist.torch.ones(2).get(timeout_secs=WAIT), torch.ones(2))


def test_sessions_have_their_own_generators(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path / "a") as (_, first):
        a = first.torch.rand(16).get(timeout_secs=WAIT)
    with session(signaling_url, tmp_path / "b") as (_, second):
        b = second.torch.rand(16).get(timeout_secs=WAIT)
    assert not torch.equal(a, b)
