"""The standing host's persistent state: durable, private, and suspicious of its own file."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from duet_p2p.errors import ConfigurationError, DuetError
from duet_p2p.host import sqlite_file
from duet_p2p.host import state as state_module
from duet_p2p.host.state import STATE_FILE, HostState, StoredRequest
from duet_p2p.permissions.request import Request, RequestStatus

ALICE = "a" * 32
MALLORY = "m" * 32
SECRET = b"SECRET-PAYLOAD-" + os.urandom(16).hex().encode()


def make_request(request_id: str = "r1", client: str = ALICE, **fields: object) -> Request:
    values: dict[str, object] = dict(
        request_id=request_id, object_id="o1", name="sum", reason="for the paper",
        lineage="data.sum()", ops=("torch.Tensor.sum",), tags=frozenset({"ages"}),
        size_bytes=0, elements=0, aggregation=100.0, requested_at=time.time(),
        requester=client,
    )  # fmt: skip
    values.update(fields)
    return Request(**values)  # type: ignore[arg-type]


def hold_value(state: HostState, request_id: str = "r1", payload: bytes = SECRET) -> None:
    state.hold(request_id, payload=payload, module=False, failure=None, size_bytes=len(payload),
               elements=1, error=None, checks=())  # fmt: skip


def decide(state: HostState, request_id: str, status: str, keep_until: float | None = None):
    state.decide(request_id, status=status, decided_by="owner", reason=f"{status} by test",
                 decided_at=time.time(), keep_until=keep_until)  # fmt: skip


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    return tmp_path / "hosts" / "h1"


@pytest.fixture
def state(host_dir: Path):
    with HostState.open(host_dir) as opened:
        yield opened


def raw(host_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(host_dir / STATE_FILE, isolation_level=None)


# -- the file ---------------------------------------------------------------------------


def test_created_private(state: HostState, host_dir: Path) -> None:
    state.record_request(make_request(), dp=False)
    assert state.path == host_dir / STATE_FILE
    assert stat.S_IMODE(os.stat(host_dir).st_mode) == 0o700
    for name in (STATE_FILE, STATE_FILE + "-wal", STATE_FILE + "-shm"):
        assert stat.S_IMODE(os.stat(host_dir / name).st_mode) == 0o600, name


def test_every_write_is_synced_and_freed_pages_overwritten(host_dir: Path) -> None:
    HostState.open(host_dir).close()
    db = sqlite_file.connect(host_dir / STATE_FILE)
    try:
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        assert db.execute("PRAGMA secure_delete").fetchone() == (1,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        db.close()


def test_refuses_a_file_others_may_read(host_dir: Path) -> None:
    HostState.open(host_dir).close()
    os.chmod(host_dir / STATE_FILE, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        HostState.open(host_dir)


def test_refuses_a_directory_others_may_write(host_dir: Path) -> None:
    host_dir.mkdir(parents=True)
    os.chmod(host_dir, 0o777)
    with pytest.raises(ConfigurationError, match="chmod 700"):
        HostState.open(host_dir)
    assert not (host_dir / STATE_FILE).exists()


def test_refuses_another_users_file(host_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    HostState.open(host_dir).close()
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with pytest.raises(ConfigurationError, match="another user"):
        HostState.open(host_dir)


def test_refuses_a_symlink_and_a_foreign_file(host_dir: Path, tmp_path: Path) -> None:
    host_dir.mkdir(mode=0o700, parents=True)
    target = tmp_path / "elsewhere.sqlite"
    HostState(target).close()
    (host_dir / STATE_FILE).symlink_to(target)
    with pytest.raises(ConfigurationError):
        HostState.open(host_dir)
    (host_dir / STATE_FILE).unlink()
    fd = os.open(host_dir / STATE_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a database at all" * 100)
    os.close(fd)
    with pytest.raises(ConfigurationError, match="is not a"):
        HostState.open(host_dir)


def test_refuses_another_database(host_dir: Path) -> None:
    host_dir.mkdir(mode=0o700, parents=True)
    fd = os.open(host_dir / STATE_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    with raw(host_dir) as db:
        db.execute("CREATE TABLE something_else (x)")
    with pytest.raises(ConfigurationError, match="is not a"):
        HostState.open(host_dir)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("UPDATE schema_version SET version = 99", "newer"),
        ("UPDATE schema_version SET version = 0", "unknown schema version"),
        ("DELETE FROM schema_version", "missing or corrupted"),
        ("INSERT INTO schema_version VALUES (1)", "missing or corrupted"),
    ],
)
def test_refuses_another_schema_version(host_dir: Path, sql: str, message: str) -> None:
    HostState.open(host_dir).close()
    with raw(host_dir) as db:
        db.execute(sql)
    with pytest.raises(ConfigurationError, match=message):
        HostState.open(host_dir)
    with raw(host_dir) as db:  # refusing changed nothing
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'requests'").fetchone()


def test_closed_state_refuses_calls(host_dir: Path) -> None:
    opened = HostState.open(host_dir)
    opened.close()
    with pytest.raises(DuetError, match="closed"):
        opened.get("r1")
    with pytest.raises(DuetError, match="closed"):
        opened.set_meta("k", "v")


# -- requests ---------------------------------------------------------------------------


def test_round_trip(state: HostState) -> None:
    state.record_request(make_request(aggregation=math.inf), dp=False)
    state.record_request(make_request(reason="a second submit is ignored"), dp=True)
    stored = state.get("r1")
    assert stored is not None
    assert (stored.client_id, stored.status, stored.reason) == (ALICE, "pending", "for the paper")
    assert stored.aggregation == math.inf and not stored.dp and not stored.has_value
    assert stored.ops == ("torch.Tensor.sum",) and stored.tags == frozenset({"ages"})

    state.hold("r1", payload=SECRET, module=False, failure=None, size_bytes=len(SECRET),
               elements=1, error=None, checks=("tiny: 1 element",))  # fmt: skip
    stored = state.get("r1")
    assert stored is not None and stored.has_value and stored.size_bytes == len(SECRET)
    assert stored.checks == ("tiny: 1 element",)
    assert state.payload("r1") == SECRET
    assert [r.request_id for r in state.pending()] == ["r1"]

    claimed = state.claim(ALICE, "r1")  # pending: the scientist gets no value yet
    assert claimed is not None and claimed[0].status == "pending" and claimed[1] is None

    keep = time.time() + 3600
    decide(state, "r1", "accepted", keep_until=keep)
    claimed = state.claim(ALICE, "r1")
    assert claimed is not None
    stored, payload = claimed
    assert payload == SECRET and stored.status == "accepted" and stored.keep_until == keep
    assert stored.decided_by == "owner" and stored.decision_reason == "accepted by test"
    assert state.pending() == []

    state.delivered("r1")
    stored = state.get("r1")
    assert stored is not None and stored.delivered and not stored.has_value
    assert state.payload("r1") is None
    assert state.claim(ALICE, "r1") == (stored, None)


def test_held_failure_round_trip(state: HostState) -> None:
    state.record_request(make_request(), dp=False)
    failure = {"code": "op_failed", "type": "ValueError", "message": "bad shape"}
    state.hold("r1", payload=None, module=False, failure=failure, size_bytes=0, elements=0,
               error="ValueError: bad shape", checks=())  # fmt: skip
    decide(state, "r1", "accepted")
    claimed = state.claim(ALICE, "r1")
    assert claimed is not None
    assert claimed[0].failure == failure and claimed[0].error == "ValueError: bad shape"
    assert claimed[1] is None and claimed[0].has_value


def test_module_flag(state: HostState) -> None:
    state.record_request(make_request(), dp=False)
    state.hold("r1", payload=b"spec", module=True, failure=None, size_bytes=4, elements=0,
               error=None, checks=())  # fmt: skip
    stored = state.get("r1")
    assert stored is not None and stored.module


@pytest.mark.parametrize("status", ["denied", "expired", "cancelled"])
def test_refusal_frees_the_payload(state: HostState, host_dir: Path, status: str) -> None:
    state.record_request(make_request(), dp=False)
    hold_value(state)
    decide(state, "r1", status, keep_until=time.time() + 3600)
    stored = state.get("r1")
    assert stored is not None and stored.status == status
    assert not stored.has_value and stored.keep_until is None
    assert state.payload("r1") is None
    claimed = state.claim(ALICE, "r1")
    assert claimed is not None and claimed[1] is None
    with raw(host_dir) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert SECRET not in (host_dir / STATE_FILE).read_bytes()  # overwritten, not just unlinked


def test_no_value_kept_after_a_refusal(state: HostState) -> None:
    """The value computed after the scientist cancelled is not stored."""
    state.record_request(make_request(), dp=False)
    decide(state, "r1", "cancelled")
    hold_value(state)
    assert state.payload("r1") is None
    stored = state.get("r1")
    assert stored is not None and not stored.has_value


def test_a_decision_is_taken_once(state: HostState) -> None:
    state.record_request(make_request(), dp=False)
    hold_value(state)
    decide(state, "r1", "accepted", keep_until=time.time() + 60)
    with pytest.raises(DuetError, match="already accepted"):
        decide(state, "r1", "denied")
    assert state.payload("r1") == SECRET
    decide(state, "r1", "accepted", keep_until=123.0)  # the same decision again: details
    stored = state.get("r1")
    assert stored is not None and stored.keep_until == 123.0
    with pytest.raises(ValueError):
        decide(state, "r1", "pending")
    with pytest.raises(KeyError):
        decide(state, "unknown", "denied")
    with pytest.raises(KeyError):
        hold_value(state, "unknown")
    with pytest.raises(KeyError):
        state.delivered("unknown")


def test_a_request_decided_on_arrival(state: HostState) -> None:
    request = make_request(status=RequestStatus.ACCEPTED, decided_by="handler #0 (accept)",
                           decided_at=5.0)  # fmt: skip
    state.record_request(request, dp=False)
    decide(state, "r1", "accepted", keep_until=99.0)
    stored = state.get("r1")
    assert stored is not None and stored.status == "accepted" and stored.keep_until == 99.0
    assert state.pending() == []


def test_only_an_accepted_value_is_delivered(state: HostState) -> None:
    state.record_request(make_request(), dp=False)
    hold_value(state)
    with pytest.raises(DuetError, match="not accepted"):
        state.delivered("r1")
    assert state.payload("r1") == SECRET


def test_claim_by_another_client_is_as_unknown(state: HostState) -> None:
    state.record_request(make_request(), dp=False)
    hold_value(state)
    decide(state, "r1", "accepted", keep_until=time.time() + 3600)
    assert state.claim(MALLORY, "r1") is None
    assert state.claim(MALLORY, "r1") == state.claim(MALLORY, "no-such-request")
    assert state.for_client(MALLORY) == []
    assert state.claim(ALICE, "r1") is not None


def test_keep_until_frees(state: HostState) -> None:
    for request_id in ("old", "fresh", "forever"):
        state.record_request(make_request(request_id), dp=False)
        hold_value(state, request_id)
    now = time.time()
    decide(state, "old", "accepted", keep_until=now - 1)
    decide(state, "fresh", "accepted", keep_until=now + 3600)
    decide(state, "forever", "accepted", keep_until=None)
    claimed = state.claim(ALICE, "old")  # past keep_until: gone even before it is freed
    assert claimed is not None and claimed[1] is None and not claimed[0].has_value
    assert state.free_expired(now) == 1
    assert state.free_expired(now) == 0
    assert state.payload("old") is None
    assert state.payload("fresh") == SECRET and state.payload("forever") == SECRET
    assert state.free_expired(now + 7200) == 1
    assert state.payload("forever") == SECRET


def test_listing_order_and_limits(state: HostState) -> None:
    base = time.time()
    for number in range(5):
        client = ALICE if number % 2 == 0 else MALLORY
        state.record_request(make_request(f"r{number}", client, requested_at=base + number),
                             dp=False)  # fmt: skip
    assert [r.request_id for r in state.all_requests()] == ["r4", "r3", "r2", "r1", "r0"]
    assert [r.request_id for r in state.all_requests(limit=2)] == ["r4", "r3"]
    assert [r.request_id for r in state.for_client(ALICE)] == ["r4", "r2", "r0"]
    assert [r.request_id for r in state.pending()] == ["r0", "r1", "r2", "r3", "r4"]
    for bad in (0, -1, True, 10**9, "5"):
        with pytest.raises(ValueError):
            state.all_requests(limit=bad)  # type: ignore[arg-type]


def test_expire_dp_pending(state: HostState) -> None:
    state.record_request(make_request("dp1"), dp=True)
    state.record_request(make_request("dp2"), dp=True)
    state.record_request(make_request("plain"), dp=False)
    hold_value(state, "dp1")
    decide(state, "dp2", "accepted")
    assert state.expire_dp_pending("the host restarted") == 1
    stored = state.get("dp1")
    assert stored is not None and stored.status == "expired" and stored.dp
    assert stored.decision_reason == "the host restarted" and not stored.has_value
    assert state.payload("dp1") is None
    assert [r.request_id for r in state.pending()] == ["plain"]


def test_restart_keeps_everything(host_dir: Path) -> None:
    with HostState.open(host_dir) as first:
        first.record_request(make_request("r1", dp=None), dp=False)
        first.record_request(make_request("r2", aggregation=math.inf), dp=False)
        hold_value(first, "r1")
        hold_value(first, "r2", b"second")
        decide(first, "r2", "accepted", keep_until=time.time() + 3600)
        first.set_admission(ALICE, "admitted", by="owner", note="lab member")
        first.seen(ALICE, 1000.0)
        first.set_handler_count("small sums", 7)
        first.set_meta("host_id", "h" * 32)
        before = first.all_requests()
    with HostState.open(host_dir) as second:
        assert second.all_requests() == before
        assert [r.request_id for r in second.pending()] == ["r1"]
        assert second.payload("r1") == SECRET
        assert second.claim(ALICE, "r2") is not None
        assert second.claim(ALICE, "r2")[1] == b"second"  # type: ignore[index]
        r2 = second.get("r2")
        assert r2 is not None and r2.aggregation == math.inf
        assert second.admission(ALICE) == "admitted"
        assert second.admissions()[0]["last_seen"] == 1000.0
        assert second.handler_count("small sums") == 7
        assert second.get_meta("host_id") == "h" * 32


def test_concurrent_threads(state: HostState) -> None:
    threads_n, per_thread = 8, 25
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(number: int) -> None:
        try:
            for index in range(per_thread):
                rid = f"t{number}-{index}"
                state.record_request(make_request(rid), dp=False)
                hold_value(state, rid, rid.encode())
                decide(state, rid, "accepted" if index % 2 else "denied", time.time() + 60)
                state.set_handler_count(f"h{number}", index + 1)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                for stored in state.all_requests(limit=50):
                    assert isinstance(stored, StoredRequest)
                state.claim(ALICE, "t0-1")
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads_n)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in workers + readers:
        thread.start()
    for thread in workers:
        thread.join(timeout=60)
    stop.set()
    for thread in readers:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in workers + readers)
    assert errors == []
    everything = state.all_requests(limit=10_000)
    assert len(everything) == threads_n * per_thread
    accepted = [r for r in everything if r.status == "accepted"]
    assert len(accepted) == threads_n * (per_thread // 2)
    assert all(state.payload(r.request_id) == r.request_id.encode() for r in accepted)
    assert all(not r.has_value for r in everything if r.status == "denied")
    assert [state.handler_count(f"h{n}") for n in range(threads_n)] == [per_thread] * threads_n


# -- hostile input, and a file that was tampered with ------------------------------------


def test_payload_cap(host_dir: Path) -> None:
    with HostState.open(host_dir, max_payload_bytes=8) as capped:
        capped.record_request(make_request(), dp=False)
        with pytest.raises(ValueError, match="at most 8"):
            hold_value(capped, "r1", b"123456789")
        hold_value(capped, "r1", b"12345678")
        assert capped.payload("r1") == b"12345678"
    with HostState.open(host_dir) as default:  # the default fits in one SQLite row
        assert 0 < default.max_payload_bytes <= 1 << 30


def test_hold_needs_exactly_one_of_payload_and_failure(state: HostState) -> None:
    state.record_request(make_request(), dp=False)
    for payload, failure in ((None, None), (b"x", {"code": "x"})):
        with pytest.raises(ValueError, match="exactly one"):
            state.hold("r1", payload=payload, module=False, failure=failure, size_bytes=1,
                       elements=1, error=None, checks=())  # fmt: skip
    for failure in ({1: "x"}, {"x": math.nan}, {"x": object()}):
        with pytest.raises((TypeError, ValueError)):
            state.hold("r1", payload=None, module=False, failure=failure, size_bytes=1,
                       elements=1, error=None, checks=())  # type: ignore[arg-type]  # fmt: skip
    stored = state.get("r1")
    assert stored is not None and not stored.has_value


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": "x" * 201},
        {"requester": ""},
        {"requested_at": math.inf},
        {"size_bytes": -1},
        {"lineage": "x" * 200_000},
        {"ops": ("ok", 3)},
    ],
)
def test_malformed_requests_refused(state: HostState, fields: dict[str, object]) -> None:
    request = make_request()
    for name, value in fields.items():
        object.__setattr__(request, name, value)
    with pytest.raises((TypeError, ValueError)):
        state.record_request(request, dp=False)
    assert state.all_requests() == []


def test_nan_aggregation_refused(state: HostState) -> None:
    with pytest.raises(ValueError, match="aggregation"):
        state.record_request(make_request(aggregation=math.nan), dp=False)
    with pytest.raises(TypeError):
        state.record_request(make_request(), dp=1)  # type: ignore[arg-type]


def test_peer_text_stored_as_given(state: HostState) -> None:
    reason = "\x1b[31m'; DROP TABLE requests; --\u202e"
    state.record_request(make_request(reason=reason), dp=False)
    state.record_request(make_request("r2", reason="lone \ud800 surrogate"), dp=False)
    stored = state.get("r1")
    assert stored is not None and stored.reason == reason
    second = state.get("r2")
    assert second is not None and second.reason == "lone \ufffd surrogate"


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("ops", "{not json"),
        ("tags", '{"a": 1}'),
        ("checks", "[1, 2]"),
        ("failure", "[]"),
        ("ops", "[" * 100_000),
        ("status", "approved-by-mallory"),
        ("dp", 7),
        ("requested_at", math.inf),
    ],
)
def test_corrupted_row_skipped(
    state: HostState, host_dir: Path, caplog: pytest.LogCaptureFixture, column: str, value: object
) -> None:
    state.record_request(make_request("bad"), dp=False)
    state.record_request(make_request("good"), dp=False)
    with raw(host_dir) as db:
        db.execute(f"UPDATE requests SET {column} = ? WHERE request_id = 'bad'", (value,))
    with caplog.at_level(logging.WARNING, logger="duet_p2p.host.state"):
        assert [r.request_id for r in state.all_requests()] == ["good"]
    assert "corrupted request row 'bad'" in caplog.text
    assert state.get("bad") is None
    assert state.claim(ALICE, "bad") is None
    assert [r.request_id for r in state.for_client(ALICE)] == ["good"]
    assert [r.request_id for r in state.pending()] == ["good"]


# -- admissions, counters, facts --------------------------------------------------------


def test_admissions(state: HostState) -> None:
    assert state.admission(ALICE) is None
    state.seen(MALLORY, 50.0)
    assert state.admission(MALLORY) is None
    state.set_admission(ALICE, "admitted", by="owner", note="lab member")
    state.seen(ALICE, 100.0)
    state.set_admission(MALLORY, "refused", by="owner")
    assert state.admission(ALICE) == "admitted" and state.admission(MALLORY) == "refused"
    listed = state.admissions()
    assert [a["client_id"] for a in listed] == [ALICE, MALLORY]
    assert listed[0]["note"] == "lab member" and listed[0]["last_seen"] == 100.0
    assert listed[1]["last_seen"] == 50.0 and listed[1]["decided_by"] == "owner"
    with pytest.raises(ValueError):
        state.set_admission(ALICE, "maybe", by="owner")
    with pytest.raises(ValueError):
        state.seen("x" * 500)
    with pytest.raises(ValueError):
        state.seen(ALICE, math.nan)


def test_undecided_admissions_are_bounded(
    state: HostState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "MAX_UNDECIDED_ADMISSIONS", 3)
    state.set_admission(ALICE, "admitted", by="owner")
    state.seen(ALICE, 0.0)
    for number in range(10):
        state.seen(f"stranger-{number}", 100.0 + number)
    clients = {a["client_id"] for a in state.admissions()}
    assert clients == {ALICE, "stranger-7", "stranger-8", "stranger-9"}


def test_handler_counts(state: HostState) -> None:
    assert state.handler_count("small sums") == 0
    state.set_handler_count("small sums", 3)
    state.set_handler_count("small sums", 4)
    assert state.handler_count("small sums") == 4
    for bad in (-1, True, 2**63, 1.5):
        with pytest.raises((TypeError, ValueError)):
            state.set_handler_count("small sums", bad)  # type: ignore[arg-type]
    assert state.handler_count("small sums") == 4


def test_meta(state: HostState) -> None:
    assert state.get_meta("host_id") is None
    state.set_meta("host_id", "abc")
    state.set_meta("host_id", "def")
    assert state.get_meta("host_id") == "def"
    with pytest.raises(TypeError):
        state.set_meta("host_id", 5)  # type: ignore[arg-type]


def test_long_handler_names_and_summaries_fit(state: HostState) -> None:
    summary = "handler #0 (accept tags=[" + ", ".join(f"t{n}" for n in range(200)) + "])"
    state.record_request(make_request(), dp=False)
    state.decide("r1", status="accepted", decided_by=summary, reason="", decided_at=1.0,
                 keep_until=None)  # fmt: skip
    stored = state.get("r1")
    assert stored is not None and stored.decided_by == summary
    state.set_handler_count("n" * 1000, 1)
    assert state.handler_count("n" * 1000) == 1
    with pytest.raises(ValueError):
        state.set_handler_count("n" * 1001, 1)


def test_prune_forgets_the_oldest_decided_requests_only(tmp_path):
    state = HostState.open(tmp_path)
    try:
        for i in range(6):
            request = _prune_request(f"r{i}")
            state.record_request(request, dp=False)
            if i < 5:
                state.decide(f"r{i}", status="denied", decided_by="owner", reason="",
                             decided_at=float(i), keep_until=None)  # fmt: skip
        assert state.prune(keep=2) == 3
        assert sorted(r.request_id for r in state.all_requests()) == ["r3", "r4", "r5"]
        assert [r.request_id for r in state.pending()] == ["r5"]
    finally:
        state.close()


def _prune_request(request_id):
    from duet_p2p.permissions import Request

    return Request(request_id=request_id, object_id="o", name="sum", reason="", lineage="x",
                   ops=("torch.sum",), tags=frozenset({"t"}), size_bytes=0, elements=0,
                   aggregation=1.0, requester="a" * 32)  # fmt: skip
