"""Owner-side permissions: the request queue, handlers, tables and the audit log."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from duet_p2p.errors import DuetError
from duet_p2p.permissions import (
    AuditLog,
    Handler,
    Request,
    RequestQueue,
    RequestStatus,
    Table,
    format_size,
)

_ids = itertools.count()


def make_request(
    *,
    name: str = "sum",
    reason: str = "To see the result",
    ops: tuple[str, ...] = ("torch.Tensor.sum", "torch.Tensor.item"),
    tags: frozenset[str] = frozenset({"data"}),
    elements: int = 1,
    aggregation: float = 4.0,
    requested_at: float | None = None,
    value: object = 1,
) -> Request:
    number = next(_ids)
    return Request(
        request_id=f"req{number:04d}",
        object_id=f"obj{number:04d}",
        name=name,
        reason=reason,
        lineage="data.sum().item()",
        ops=ops,
        tags=tags,
        size_bytes=8 * elements,
        elements=elements,
        aggregation=aggregation,
        requested_at=time.time() if requested_at is None else requested_at,
        requester="0c653d3d88097cff6638ec5d159e96fc",
        _preview=lambda: value,
    )


class Recorder:
    """on_decision that remembers every call (thread-safe)."""

    def __init__(self) -> None:
        self.calls: list[Request] = []
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> None:
        with self._lock:
            self.calls.append(request)


@pytest.fixture
def decided() -> Recorder:
    return Recorder()


@pytest.fixture
def queue(decided: Recorder) -> RequestQueue:
    return RequestQueue(on_decision=decided)


# --- submit, accept, deny ---------------------------------------------------------------


def test_accept_flow_decides_once(queue: RequestQueue, decided: Recorder) -> None:
    request = queue.submit(make_request())
    assert request.status is RequestStatus.PENDING and decided.calls == []
    assert queue[0].preview() == 1
    queue[0].accept()
    assert request.status is RequestStatus.ACCEPTED
    assert request.decided_by == "owner" and request.decided_at is not None
    assert decided.calls == [request]
    with pytest.raises(DuetError, match="already accepted"):
        request.accept()
    with pytest.raises(DuetError, match="already accepted"):
        queue.deny(request.request_id)
    assert queue.cancel(request.request_id) is None
    assert decided.calls == [request]
    assert len(queue) == 0 and queue.all() == [request]


def test_deny_flow_carries_reason(queue: RequestQueue, decided: Recorder) -> None:
    request = queue.submit(make_request())
    request.deny(reason="too revealing")
    assert request.status is RequestStatus.DENIED
    assert request.decision_reason == "too revealing"
    assert decided.calls == [request]
    with pytest.raises(DuetError, match="already denied"):
        queue.accept(request.request_id)


def test_cancel_and_unknown_ids(queue: RequestQueue, decided: Recorder) -> None:
    request = queue.submit(make_request())
    assert queue.cancel(request.request_id) is request
    assert request.status is RequestStatus.CANCELLED
    assert decided.calls == [request]
    assert queue.cancel("nope") is None
    with pytest.raises(DuetError, match="no request"):
        queue.accept("nope")
    with pytest.raises(DuetError, match="already exists"):
        queue.submit(request)


def test_indexing_len_iteration(queue: RequestQueue) -> None:
    first, second, third = (queue.submit(make_request()) for _ in range(3))
    assert len(queue) == 3 and list(queue) == [first, second, third]
    assert queue[0] is first and queue[-1] is third and queue[1:] == [second, third]
    assert queue[second.request_id] is second
    assert queue[f"<UID:{third.request_id}>"] is third
    queue[0].accept()
    assert queue[0] is second and len(queue) == 2 and queue.pending() == [second, third]
    assert queue[first.request_id] is first  # decided requests stay reachable by ID
    with pytest.raises(IndexError, match="2 pending"):
        queue[5]
    with pytest.raises(KeyError):
        queue["missing"]
    assert queue.all() == [first, second, third]


def test_reason_is_capped() -> None:
    assert len(make_request(reason="x" * 5000).reason) == 1000


def test_wait_returns_request_from_other_thread(queue: RequestQueue) -> None:
    assert queue.wait(timeout=0.05) is None
    request = make_request()
    timer = threading.Timer(0.1, queue.submit, args=(request,))
    timer.start()
    try:
        started = time.monotonic()
        assert queue.wait(timeout=5) is request
        assert time.monotonic() - started < 4
    finally:
        timer.cancel()
        timer.join(timeout=5)


def test_callbacks_get_every_request_and_failures_are_contained(queue: RequestQueue) -> None:
    seen: list[Request] = []

    def broken(request: Request) -> None:
        raise RuntimeError("callback bug")

    queue.add_callback(broken)
    queue.add_callback(seen.append)
    queue.add_handler("deny", op="mean")
    pending = queue.submit(make_request())
    denied = queue.submit(make_request(name="mean"))
    assert seen == [pending, denied]
    assert denied.status is RequestStatus.DENIED


def test_on_decision_failure_does_not_break_the_owner() -> None:
    def broken(request: Request) -> None:
        raise RuntimeError("send failed")

    queue = RequestQueue(on_decision=broken)
    request = queue.submit(make_request())
    request.accept()
    assert request.status is RequestStatus.ACCEPTED


def test_too_many_pending_are_denied(decided: Recorder) -> None:
    queue = RequestQueue(on_decision=decided, max_pending=2)
    kept = [queue.submit(make_request()) for _ in range(2)]
    flood = queue.submit(make_request())
    assert flood.status is RequestStatus.DENIED and decided.calls == [flood]
    assert queue.pending() == kept


def test_history_forgets_oldest_decided(decided: Recorder) -> None:
    queue = RequestQueue(on_decision=decided, max_history=3)
    waiting = queue.submit(make_request())
    for _ in range(5):
        queue.submit(make_request()).accept()
    remembered = queue.all()
    assert len(remembered) == 3 and remembered[0] is waiting


# --- handlers ---------------------------------------------------------------------------


def test_handler_accepts_by_tags(queue: RequestQueue, decided: Recorder) -> None:
    queue.add_handler("accept", tags=["public"])
    assert queue.submit(make_request(tags=frozenset({"data"}))).pending
    accepted = queue.submit(make_request(tags=frozenset({"public", "extra"})))
    assert accepted.status is RequestStatus.ACCEPTED
    assert accepted.decided_by is not None and accepted.decided_by.startswith("handler #0")
    assert decided.calls == [accepted]


def test_handler_by_op_matches_name_or_last_op(queue: RequestQueue) -> None:
    by_name = queue.add_handler("accept", op="sum")
    assert queue.submit(make_request()).status is RequestStatus.ACCEPTED
    queue.remove_handler(by_name)
    queue.add_handler("accept", op="torch.Tensor.item")
    assert queue.submit(make_request(name="item")).status is RequestStatus.ACCEPTED
    # an earlier op in the lineage is not what is released: no match
    queue.clear_handlers()
    queue.add_handler("accept", op="torch.Tensor.sum")
    assert queue.submit(make_request(name="item")).pending


def test_handler_max_elements(queue: RequestQueue) -> None:
    queue.add_handler("accept", max_elements=10)
    assert queue.submit(make_request(elements=10)).status is RequestStatus.ACCEPTED
    assert queue.submit(make_request(elements=11)).pending


def test_handler_quota_exhausts(queue: RequestQueue) -> None:
    handler = queue.add_handler("accept", max_requests=2)
    results = [queue.submit(make_request()) for _ in range(3)]
    assert [r.status for r in results] == [
        RequestStatus.ACCEPTED,
        RequestStatus.ACCEPTED,
        RequestStatus.PENDING,
    ]
    assert handler.matched == 2 and handler.remaining == 0
    assert "0/2" in repr(queue.handlers)


def test_deny_all_handler(queue: RequestQueue, decided: Recorder) -> None:
    queue.add_handler("deny", reason="not today")
    requests = [queue.submit(make_request()) for _ in range(3)]
    assert all(r.status is RequestStatus.DENIED for r in requests)
    assert {r.decision_reason for r in requests} == {"not today"}
    assert decided.calls == requests and len(queue) == 0


def test_first_matching_handler_wins(queue: RequestQueue) -> None:
    queue.add_handler("deny", tags=["secret"], reason="secret data")
    queue.add_handler("accept")
    assert queue.submit(make_request(tags=frozenset({"secret"}))).status is RequestStatus.DENIED
    assert queue.submit(make_request()).status is RequestStatus.ACCEPTED


def test_new_handler_applies_to_pending(queue: RequestQueue, decided: Recorder) -> None:
    request = queue.submit(make_request())
    queue.add_handler("accept", op="sum")
    assert request.status is RequestStatus.ACCEPTED and decided.calls == [request]


def test_timeout_handler_waits_for_the_owner(queue: RequestQueue, decided: Recorder) -> None:
    t0 = time.time()
    queue.add_handler("deny", timeout_secs=30, reason="owner away")
    request = queue.submit(make_request(requested_at=t0))
    assert request.pending
    assert queue.expire_overdue(now=t0 + 29) == [] and request.pending
    assert queue.expire_overdue(now=t0 + 31) == [request]
    assert request.status is RequestStatus.DENIED and request.decision_reason == "owner away"
    assert decided.calls == [request]
    assert queue.expire_overdue(now=t0 + 60) == []


def test_expire_after(decided: Recorder) -> None:
    queue = RequestQueue(on_decision=decided, expire_after=10)
    t0 = time.time()
    request = queue.submit(make_request(requested_at=t0))
    assert queue.expire_overdue(now=t0 + 5) == []
    assert queue.expire_overdue(now=t0 + 10) == [request]
    assert request.status is RequestStatus.EXPIRED and decided.calls == [request]


def test_min_aggregation_blocks_accept_handlers(decided: Recorder) -> None:
    queue = RequestQueue(on_decision=decided, min_aggregation=10)
    queue.add_handler("accept")
    small = queue.submit(make_request(aggregation=4))
    assert small.pending
    assert queue.expire_overdue(now=time.time() + 3600) == []
    public = queue.submit(make_request(aggregation=math.inf))
    assert public.status is RequestStatus.ACCEPTED
    large = queue.submit(make_request(aggregation=10))
    assert large.status is RequestStatus.ACCEPTED
    queue.add_handler("deny", reason="too small")
    assert small.status is RequestStatus.DENIED  # a deny handler still applies
    small_timeout = RequestQueue(on_decision=decided, min_aggregation=10)
    small_timeout.add_handler("accept", timeout_secs=1)
    late = small_timeout.submit(make_request(aggregation=4))
    assert small_timeout.expire_overdue(now=time.time() + 60) == [] and late.pending


def test_handler_validation(queue: RequestQueue) -> None:
    with pytest.raises(ValueError):
        queue.add_handler("maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        queue.add_handler("accept", max_requests=-1)
    assert queue.remove_handler(queue.add_handler("accept", op="x")).op == "x"
    with pytest.raises(ValueError):
        queue.remove_handler(Handler(action="accept"))


# --- tables -----------------------------------------------------------------------------


def test_queue_table_text(queue: RequestQueue) -> None:
    assert str(queue) == "No pending requests."
    request = queue.submit(make_request())
    lines = repr(queue).splitlines()
    assert lines[0].split() == ["Request", "Name", "Reason", "Request", "ID", "Size"] + [
        "Requested",
        "At",
    ]
    assert lines[0].startswith("   Request Name  Reason")
    assert lines[1].startswith("0  sum           To see the result  <UID:")
    assert request.request_id in lines[1] and "8 B" in lines[1]
    assert "data.sum().item()" in repr(request) and "To see the result" in repr(request)


def test_hostile_reason_is_escaped(queue: RequestQueue) -> None:
    reason = "<script>alert('x')</script>\n\x1b[2Jhi"
    request = queue.submit(make_request(reason=reason))
    page = queue._repr_html_() + request._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    text = repr(queue) + repr(request)
    assert "\x1b" not in text and "[2J" not in text  # the whole escape sequence is removed
    assert "</script> hi" in repr(request)  # the line break became a space
    assert len(repr(queue).splitlines()) == 2


def test_queue_pandas_columns(queue: RequestQueue) -> None:
    pytest.importorskip("pandas")
    queue.submit(make_request())
    frame = queue.pandas
    assert list(frame.columns) == ["Request Name", "Reason", "Request ID", "Size", "Requested At"]
    assert frame.iloc[0]["Request Name"] == "sum"


def test_table_generic() -> None:
    table = Table(["ID", "Tags", "Count"], [["a", ["data"], 3], ["bbb", ["x", "y"], 12]], "Store")
    assert str(table).splitlines() == [
        "Store",
        "   ID   Tags    Count",
        "0  a    [data]      3",
        "1  bbb  [x, y]     12",
    ]
    assert "<caption>Store</caption>" in table._repr_html_()
    assert str(Table(["A"], [], empty_text="Nothing.")) == "Nothing."
    with pytest.raises(ValueError):
        Table(["A"], [[1, 2]])


def test_table_pandas_missing_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ModuleNotFoundError, match="pip install"):
        Table(["A"], [[1]]).to_pandas()


def test_format_size() -> None:
    assert format_size(8) == "8 B"
    assert format_size(1_200_000) == "1.2 MB"
    assert format_size(999_999) == "1.0 MB"


# --- audit log --------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_log_records_flow_without_values(tmp_path: Path, decided: Recorder) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    queue = RequestQueue(on_decision=decided, audit=audit)
    secret = 123456.75
    request = queue.submit(make_request(value=secret))
    assert [e["event"] for e in read_lines(path)] == ["request"]  # flushed at once
    request.accept()
    payload = torch.tensor([secret]).numpy().tobytes()
    digest = hashlib.sha256(payload).hexdigest()
    audit.release(request.object_id, request.request_id, len(payload), digest)
    audit.action("torch.Tensor.sum", ["obj0"], "obj1", True)
    audit.event("connect", peer="0c65", value=torch.tensor([secret]))
    entries = read_lines(path)  # still open: every entry already on disk
    assert [e["event"] for e in entries] == ["request", "decision", "release", "action", "connect"]
    assert entries[1]["status"] == "accepted" and entries[1]["decided_by"] == "owner"
    assert entries[2]["sha256"] == digest
    assert entries[4]["value"] == "<Tensor>"
    assert all(str(e["ts"]).endswith("Z") for e in entries)
    assert "123456" not in path.read_text()
    assert audit.entries() == entries
    assert "release" in repr(audit) and "&lt;" not in repr(audit)
    audit.close()
    AuditLog(path).event("disconnect")
    assert len(read_lines(path)) == 6  # an explicit path is appended to


def test_audit_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the data directory, never the working directory; readable by the owner only."""
    monkeypatch.setenv("DUET_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with AuditLog() as audit:
        audit.event("connect")
    (created,) = (tmp_path / "home" / "audit").glob("duet_audit_*.jsonl")
    assert created == audit.path and read_lines(created)[0]["event"] == "connect"
    assert not list(tmp_path.glob("duet_audit_*"))
    assert stat.S_IMODE(os.stat(created).st_mode) == 0o600


def test_audit_write_failure_keeps_request_pending(tmp_path: Path, decided: Recorder) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    queue = RequestQueue(on_decision=decided, audit=audit)
    request = queue.submit(make_request())
    audit.path = tmp_path / "missing-dir" / "audit.jsonl"
    audit.close()
    with pytest.raises(OSError):
        request.accept()
    assert request.pending and decided.calls == [] and len(queue) == 1


# --- threads ----------------------------------------------------------------------------


def test_concurrent_submits_and_decisions(tmp_path: Path, decided: Recorder) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    queue = RequestQueue(on_decision=decided, audit=audit)
    queue.add_handler("accept", max_requests=100)
    errors: list[BaseException] = []

    def submitter() -> None:
        try:
            for _ in range(50):
                queue.submit(make_request())
        except BaseException as exc:
            errors.append(exc)

    def owner() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(decided.calls) < 400:
            request = queue.wait(timeout=0.05)
            if request is None:
                continue
            try:
                request.deny("busy")
            except DuetError:
                pass  # another decider got there first

    threads = [threading.Thread(target=submitter) for _ in range(8)]
    threads.append(threading.Thread(target=owner))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(decided.calls) == 400 and len({id(r) for r in decided.calls}) == 400
    assert len(queue) == 0 and len(queue.all()) == 400
    statuses = [r.status for r in queue.all()]
    assert statuses.count(RequestStatus.ACCEPTED) == 100
    assert statuses.count(RequestStatus.DENIED) == 300
    assert len(audit.entries()) == 800


def test_no_rule_decides_on_a_tag_set_too_large_to_read(decided: Recorder) -> None:
    queue = RequestQueue(on_decision=decided)
    queue.add_handler("accept")
    queue.add_handler("deny", tags=["t0"])
    huge = make_request(tags=frozenset(f"t{i}" for i in range(10_001)))
    queue.submit(huge)
    assert huge.pending, "left to the owner"
    small = make_request(tags=frozenset(f"t{i}" for i in range(100)))
    queue.submit(small)
    assert small.status is RequestStatus.ACCEPTED
