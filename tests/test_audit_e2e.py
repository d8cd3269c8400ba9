"""The owner's audit log over a real session: one JSON line per event, written at once,
with a SHA-256 that the scientist can recompute from the value it received."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import duet_p2p as sy
from duet_p2p.rpc import codec
from tests.conftest import accept_next, close_pair, make_pair

WAIT = 10.0
SECRET = torch.tensor([[123457.25, 2.0], [3.0, 4.0]])


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The file as it is on disk now; every line must be one JSON object."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "each entry is a complete line"
    entries = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(e, dict) and e.get("ts") and e.get("event") for e in entries)
    return entries


def of(entries: list[dict[str, Any]], event: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e for e in entries if e["event"] == event and all(e.get(k) == v for k, v in match.items())
    ]


def sha256_of(value: Any) -> str:
    return hashlib.sha256(codec.encode(value)).hexdigest()


@pytest.fixture
def session(signaling_url: str, tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    owner, scientist = make_pair(signaling_url, path)
    yield owner, scientist, path
    close_pair(scientist, owner)


def test_each_event_is_one_line_with_a_matching_hash(session) -> None:
    owner, scientist, path = session
    owner.store.send(SECRET.clone(), tags=["data"])
    data = scientist.store.refresh()["data"]

    doubled = data * 2
    decider = accept_next(owner, WAIT)
    received = doubled.get(reason="to check the audit", timeout_secs=WAIT)
    decider.join(WAIT)
    assert torch.equal(received, SECRET * 2)

    entries = read_lines(path)  # the session is still open: nothing was buffered
    [request] = of(entries, "request", object_id=doubled.id)
    request_id = request["request_id"]
    assert request["name"] == "mul" and request["reason"] == "to check the audit"
    assert request["ops"] == ["torch.Tensor.__mul__"] and request["tags"] == ["data"]
    [decision] = of(entries, "decision", request_id=request_id)
    assert decision["status"] == "accepted" and decision["decided_by"] == "owner"
    [release] = of(entries, "release", request_id=request_id)
    assert release["object_id"] == doubled.id
    assert release["sha256"] == sha256_of(received)
    assert release["nbytes"] == len(codec.encode(received))
    [action] = of(entries, "action", result=doubled.id)
    assert action["op"] == "torch.Tensor.__mul__" and action["inputs"] == [data.id]
    assert action["ok"] is True
    order = [e["event"] for e in entries]
    assert order.index("action") < order.index("request") < order.index("decision")
    assert order.index("decision") < order.index("release")

    total = data.sum().item()
    owner.requests.add_handler("accept", op="sum")
    value = total.get(timeout_secs=WAIT)
    assert value == pytest.approx(123466.25)
    [release] = of(read_lines(path), "release", object_id=total.id)
    assert release["sha256"] == sha256_of(value), "a released number hashes the same way"

    assert "123457" not in path.read_text(), "the log never holds values"


def test_denials_and_failures_are_logged_without_a_release(session) -> None:
    owner, scientist, path = session
    owner.requests.add_handler("deny", tags=["data"], reason="closed")
    owner.store.send(SECRET.clone(), tags=["data"])
    data = scientist.store.refresh()["data"]

    with pytest.raises(sy.PermissionDenied):
        data.max().get(timeout_secs=WAIT)
    broken = data.view(3)
    with pytest.raises(sy.PermissionDenied):  # a failure on private data is private too
        broken.get(timeout_secs=WAIT)

    entries = read_lines(path)
    requests = of(entries, "request")
    assert len(requests) == 2
    for request in requests:
        [decision] = of(entries, "decision", request_id=request["request_id"])
        assert decision["status"] == "denied" and decision["reason"] == "closed"
        assert decision["decided_by"].startswith("handler #0")
    assert of(entries, "release") == []
    [failed] = of(entries, "action_failed", result=broken.id)
    assert failed["error_type"] == "RuntimeError"


def test_public_releases_are_audited_too(session) -> None:
    owner, scientist, path = session
    owner.store.send(torch.arange(5.0), tags=["weights"], public=True)
    weights = scientist.store.refresh()["weights"]

    value = (weights + 1).get(timeout_secs=WAIT)
    entries = read_lines(path)
    [request] = of(entries, "request")
    assert request["tags"] == ["weights"] and request["aggregation"] == "inf"
    [decision] = of(entries, "decision", request_id=request["request_id"])
    assert decision["status"] == "accepted"
    assert decision["decided_by"] == "public: depends on no private data"
    [release] = of(entries, "release", request_id=request["request_id"])
    assert release["sha256"] == sha256_of(value)
    assert owner.requests.all() == [], "public gets still skip the owner's queue"


def test_the_owner_reads_the_same_log(session) -> None:
    owner, scientist, path = session
    owner.store.send(torch.ones(3), tags=["w"], public=True)
    scientist.store.refresh()["w"].get(timeout_secs=WAIT)
    assert owner.audit.path == path
    assert owner.audit.entries() == read_lines(path)
    table = str(owner.audit.table())
    assert "release" in table and "public: depends on no private data" in table
