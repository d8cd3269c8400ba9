"""The minimum aggregation rule, which failed open.

With ``min_aggregation=5`` and an accept handler, single records were auto-released by
``max()``, ``quantile(0)``, one-hot masks, duplicated indices and ``sum() - x[1:].sum()``.
Now only sums, means and counts straight over the owner's records count; everything else
private counts as one record and waits for the owner. (Differencing across separate
releases is beyond any per-release rule: see docs/SECURITY.md.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.hostile.common import WAIT, host, pending, released, session

VALUES = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0])


@pytest.fixture
def owner_and_records(signaling_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    with session(signaling_url, tmp_path, min_aggregation=5) as (owner, scientist):
        owner.requests.add_handler("accept")
        x = host(owner, scientist, VALUES.clone(), "x")
        table = host(owner, scientist, torch.arange(20.0).reshape(10, 2), "table")
        yield owner, scientist, x, table


def test_single_records_are_not_auto_released(owner_and_records) -> None:  # type: ignore[no-untyped-def]
    owner, scientist, x, table = owner_and_records
    onehot = torch.zeros(10)
    onehot[5] = 1.0
    attempts = {
        "max": x.max(),
        "min": x.min(),
        "quantile": x.quantile(0.0),
        "median": x.median(),
        "sorted": x.sort()[0][0],
        "one-hot": (x * onehot.send(scientist)).sum(),
        "one-hot literal": (x * scientist.torch.tensor(onehot.tolist())).sum(),
        "duplicated": x[[5, 5, 5, 5, 5, 5]].sum(),
        "difference": x.sum() - x[1:].sum(),
        "masked": x[x > 8].sum(),
        "where": scientist.torch.where(x > 8, x, 0.0).sum(),
        "within rows": table.sum(dim=1),
        "top": x.topk(1)[0].sum(),
        "cumsum": x.cumsum(0)[0],
        "slice": x[5:6].mean(),
        "mean of broadcast": (x[5] * scientist.torch.ones(100)).mean(),
        "log-sum-exp": (x * 1e3).exp().sum().log(),  # the maximum, one record
        "square": (x * x).sum(),
        "reciprocal": (1.0 / (x - 9.0)).sum(),  # a spike at the record equal to 9
        "std": x.std(),  # squares: one outlying record dominates
    }
    handles = {name: pointer.request(reason=name) for name, pointer in attempts.items()}
    for name, handle in handles.items():
        assert pending(handle, 0.3), name
    assert released(owner) == []


def test_real_aggregates_are_released(owner_and_records) -> None:  # type: ignore[no-untyped-def]
    owner, scientist, x, table = owner_and_records
    assert x.sum().item().get(timeout_secs=WAIT) == pytest.approx(VALUES.sum().item())
    assert x.mean().get(timeout_secs=WAIT).item() == pytest.approx(VALUES.mean().item())
    assert (x > 3).sum().get(timeout_secs=WAIT).item() == int((VALUES > 3).sum())
    assert (x * 2 + 1).float().mean().get(timeout_secs=WAIT).item() == pytest.approx(
        (VALUES * 2 + 1).mean().item()
    )
    columns = table.sum(dim=0).get(timeout_secs=WAIT)
    assert torch.equal(columns, torch.arange(20.0).reshape(10, 2).sum(dim=0))
    count = x.count_nonzero().get(timeout_secs=WAIT)
    assert count.item() == int(VALUES.count_nonzero())
    [request] = [r for r in owner.requests.all() if r.name == "count_nonzero"]
    assert request.aggregation == 10
