"""The owner's side of offline jobs: ``host.jobs`` in a notebook, and the control commands."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from duet_p2p.allowlist import DEFAULT_ALLOWLIST
from duet_p2p.errors import DuetError
from duet_p2p.host.admin import HostAdmin
from duet_p2p.host.control import ControlServer, request
from duet_p2p.host.job_service import JobRefused
from duet_p2p.host.job_store import JobStore, StoredJob
from duet_p2p.host.jobs_view import JobsView, OwnerJob, job_details, job_key
from duet_p2p.offline.lifecycle import InvalidTransition, JobState
from duet_p2p.offline.review import CodeReview, review_code
from duet_p2p.offline.spec import SignedJob
from duet_p2p.permissions import Request
from tests.host.test_job_store import new_job, two_output_job
from tests.offline.test_spec import HOST

S = JobState
HOSTED = ("train_images",)
EVIL = "ok\x1b]0;owned\x07\x1b[2J\x1b[31mred\u202eevil\r\nnext <script>x</script>"
BAD_CHARS = ("\x1b", "\x07", "\u202e", "\r")
WAIT = 10.0
TO_OUTPUT_REVIEW = (S.PENDING_REVIEW, S.APPROVED, S.QUEUED)


def assert_inert(text: str) -> None:
    for bad in BAD_CHARS:
        assert bad not in text, repr(bad)


class FakeJobs:
    """HostJobs' owner API over a real job store, recording every decision."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.calls: list[tuple[Any, ...]] = []
        self.requests: dict[str, dict[str, Request | None]] = {}
        self.refuse: Exception | None = None

    def list(self, states: Any = None, limit: int = 1000) -> list[StoredJob]:
        return list(reversed(self.store.all(states, limit=limit)))

    def get(self, job_id: str) -> StoredJob:
        found = self.store.get(job_id)
        if found is None:
            raise KeyError(f"no job {job_id!r}")
        return found

    def review(self, job_id: str) -> CodeReview:
        return review_code(self.get(job_id).job, DEFAULT_ALLOWLIST, HOSTED)

    def output_requests(self, job_id: str) -> dict[str, Request | None]:
        self.get(job_id)
        return dict(self.requests.get(job_id, {}))

    def events(self, job_id: str) -> list[Any]:
        return self.store.events(job_id)

    def _decide(self, name: str, job_id: str, *args: Any, by: str, to: JobState) -> None:
        self.calls.append((name, job_id, *args, by))
        if self.refuse is not None:
            raise self.refuse
        self.get(job_id)
        self.store.transition(job_id, to, by=by, reason=args[0] if args else name)

    def approve(self, job_id: str, by: str = "owner") -> None:
        self._decide("approve", job_id, by=by, to=S.APPROVED)
        self.store.transition(job_id, S.QUEUED, by=by, reason="queued to run")

    def reject(self, job_id: str, reason: str, by: str = "owner") -> None:
        self._decide("reject", job_id, reason, by=by, to=S.REJECTED)

    def release(self, job_id: str, by: str = "owner") -> None:
        self._decide("release", job_id, by=by, to=S.RELEASED)

    def withhold(self, job_id: str, reason: str, by: str = "owner") -> None:
        self._decide("withhold", job_id, reason, by=by, to=S.WITHHELD)

    def cancel(self, job_id: str, by: str = "owner") -> None:
        self._decide("cancel", job_id, by=by, to=S.CANCELLED)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[FakeJobs]:
    with JobStore.open(tmp_path / "hosts" / "h", host_id=HOST.id) as store:
        yield FakeJobs(store)


def submit(jobs: FakeJobs, job: SignedJob | None = None, *states: JobState, reason: str = "",
           at: float | None = None) -> str:  # fmt: skip
    job = job or new_job()
    jobs.store.submit(job, at=at)
    for state in states:
        if state is S.RUNNING:
            jobs.store.transition(job.job_id, S.RUNNING, by="host", reason="running")
            jobs.store.start_attempt(job.job_id)
            continue
        jobs.store.transition(job.job_id, state, by="policy", reason=reason or f"to {state}")
    return job.job_id


def finished(jobs: FakeJobs, job: SignedJob | None = None, reason: str = "") -> str:
    return submit(jobs, job, *TO_OUTPUT_REVIEW, S.RUNNING, S.FINISHED, S.PENDING_OUTPUT_REVIEW,
                  reason=reason)  # fmt: skip


def output_request(job_id: str, name: str = "summary", **changes: Any) -> Request:
    fields: dict[str, Any] = dict(
        request_id=job_id[:16] + "0" * 16, object_id="1" * 32, name="mean",
        reason="", lineage="train_images.mean(dim=0)[0:2, (1, 2.5)]",
        ops=("torch.Tensor.mean", "torch.Tensor.__getitem__"), tags=frozenset(HOSTED),
        size_bytes=1200, elements=2, aggregation=40.0, requester="a" * 32,
        _preview=lambda: f"value of {name}",
    )  # fmt: skip
    fields.update(changes)
    return Request(**fields)


# -- the listing ---------------------------------------------------------------------------


def test_open_jobs_newest_first_and_filtered_views(jobs: FakeJobs) -> None:
    now = time.time()
    old = submit(jobs, None, S.PENDING_REVIEW, at=now - 120)
    done = submit(jobs, None, S.PENDING_REVIEW, S.REJECTED, reason="no thanks", at=now - 60)
    out = finished(jobs)
    view = JobsView(jobs)
    assert len(view) == 2  # the rejected job is finished: not open
    assert [job.job_id for job in view] == [out, old]
    assert view[0].job_id == out and view[-1].job_id == old
    assert [job.job_id for job in view[0:1]] == [out]
    assert [j.job_id for j in view.all()] == [out, done, old]
    assert [j.job_id for j in view.pending_review] == [old]
    assert [j.job_id for j in view.pending_output] == [out]
    text = str(view)
    for word in ("Job ID", "Client ID", "State", "Plan", "Submitted", "Reason", old, out,
                 "pending_output_review", "stats (2 steps)"):  # fmt: skip
        assert word in text
    assert done not in text and done in str(view.all()) and "no thanks" in str(view.all())
    assert "<table>" in view._repr_html_() and old in view._repr_html_()
    with pytest.raises(IndexError, match="no job at index 5"):
        view[5]


def test_empty_views_say_so(jobs: FakeJobs) -> None:
    view = JobsView(jobs)
    assert len(view) == 0 and list(view) == []
    assert str(view) == "No open jobs."
    assert "No job waits for code review." in str(view.pending_review)
    assert "No job waits for output review." in str(view.pending_output)
    assert "No jobs yet." in str(view.all())


def test_pandas_view(jobs: FakeJobs) -> None:
    pytest.importorskip("pandas")
    job_id = submit(jobs, None, S.PENDING_REVIEW)
    frame = JobsView(jobs).pandas
    assert list(frame.columns) == ["Job ID", "Client ID", "State", "Plan", "Submitted", "Reason"]
    assert frame.iloc[0]["Job ID"] == job_id and frame.iloc[0]["State"] == "pending_review"


def test_jobs_by_id(jobs: FakeJobs) -> None:
    job_id = submit(jobs, None, S.PENDING_REVIEW, S.REJECTED)
    view = JobsView(jobs)
    for typed in (job_id, job_id.upper(), f" <UID:{job_id}> ", f"<UID:{job_id.upper()}>"):
        assert view[typed].job_id == job_id  # any job, finished ones included
    assert job_key(f"<UID:{job_id}>") == job_id


@pytest.mark.parametrize(
    "key",
    [
        "0" * 32,
        "abc",
        "g" * 32,
        "../" + "a" * 29,
        "a" * 32 + "\n",
        "\x1b[2J" + "a" * 28,
        "a" * 1000,
        "",
    ],  # fmt: skip
)
def test_unknown_or_malformed_ids_are_key_errors(jobs: FakeJobs, key: str) -> None:
    submit(jobs, None, S.PENDING_REVIEW)
    with pytest.raises(KeyError) as caught:
        JobsView(jobs)[key]
    assert_inert(str(caught.value))
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("key", [1.0, True, None, b"a" * 32])
def test_other_keys_are_type_errors(jobs: FakeJobs, key: Any) -> None:
    submit(jobs, None, S.PENDING_REVIEW)
    with pytest.raises(TypeError):
        JobsView(jobs)[key]


# -- one job -------------------------------------------------------------------------------


def test_a_job_waiting_for_code_review(jobs: FakeJobs) -> None:
    job = new_job()
    job_id = submit(jobs, job, S.PENDING_REVIEW, reason="no auto-approve rule matches")
    owned = JobsView(jobs)[0]
    assert isinstance(owned, OwnerJob)
    assert (owned.job_id, owned.client_id) == (job_id, job.client_id)
    assert owned.state is S.PENDING_REVIEW and owned.reason == "no auto-approve rule matches"
    assert owned.submitted_at == pytest.approx(time.time(), abs=60)
    review = owned.review
    assert isinstance(review, CodeReview) and review.job_id == job_id and review.ok
    assert "summary" in review.outputs
    text = repr(owned)
    assert f"Job {job_id}" in text and "pending_review" in text
    assert f"Job {job_id} from {job.client_id} (can run)" in text
    assert ".approve() or .reject(reason)" in text
    assert "Outputs" not in text  # nothing computed yet
    html = owned._repr_html_()
    assert job_id in html and "approve()" in html
    trail = owned.events
    assert [row[2] for row in trail.rows] == ["submitted", "pending_review"]


def test_decisions_delegate_as_the_owner(jobs: FakeJobs) -> None:
    first = submit(jobs, None, S.PENDING_REVIEW)
    second = submit(jobs, None, S.PENDING_REVIEW)
    third = submit(jobs, None, S.PENDING_REVIEW)
    view = JobsView(jobs)
    view[first].approve()
    assert view[first].state is S.QUEUED
    view[second].reject("uses raw labels")
    assert view[second].state is S.REJECTED and view[second].reason == "uses raw labels"
    view[third].cancel()
    out = finished(jobs)
    view[out].release()
    kept = finished(jobs)
    view[kept].withhold("too fine-grained")
    assert view[kept].state is S.WITHHELD
    assert jobs.calls == [
        ("approve", first, "owner"), ("reject", second, "uses raw labels", "owner"),
        ("cancel", third, "owner"), ("release", out, "owner"),
        ("withhold", kept, "too fine-grained", "owner"),
    ]  # fmt: skip
    with pytest.raises(InvalidTransition):
        view[first].approve()  # already decided: the machinery's error reaches the owner


def test_outputs_for_output_review_and_preview(jobs: FakeJobs) -> None:
    job_id = finished(jobs, two_output_job())
    owned = JobsView(jobs)[job_id]
    assert "no value to preview" not in repr(owned)
    jobs.requests[job_id] = {
        "mean": output_request(job_id, "mean", aggregation=math.inf, size_bytes=8, elements=1),
        "summary": output_request(job_id, checks=("small group: 3 records " + EVIL,)),
    }
    table = owned.outputs
    assert [row[0] for row in table.rows] == ["mean", "summary"]
    text = str(table)
    assert "depends on no private data" in text and ">= 40 records" in text
    assert "1.2 KB" in text and "pending" in text and "small group: 3 records" in text
    assert_inert(text)
    assert owned.preview("summary") == "value of summary"
    with pytest.raises(DuetError, match="name one"):
        owned.preview()
    with pytest.raises(KeyError, match="no output 'nope'"):
        owned.preview("nope")
    with pytest.raises(KeyError) as caught:
        owned.preview(EVIL)
    assert_inert(str(caught.value))
    full = repr(owned)
    assert "Outputs" in full and ".release() or .withhold(reason)" in full
    assert_inert(full)
    jobs.requests[job_id] = {"mean": None, "summary": output_request(job_id)}
    assert owned.preview("summary") == "value of summary"
    with pytest.raises(DuetError, match="no value to preview"):
        owned.preview("mean")
    assert [row[1] for row in owned.outputs.rows] == ["not computed", "pending"]
    jobs.requests[job_id] = {"summary": output_request(job_id)}
    assert owned.preview() == "value of summary"  # the only one may go unnamed


def test_a_failed_output_is_marked(jobs: FakeJobs) -> None:
    job_id = finished(jobs)
    jobs.requests[job_id] = {"summary": output_request(job_id, error="ran out of time")}
    assert "pending (failed)" in str(JobsView(jobs)[job_id].outputs)
    details = job_details(jobs, job_id)
    assert details["outputs"][0]["error"] == "ran out of time"


def test_scientist_and_store_text_is_shown_inert(jobs: FakeJobs) -> None:
    job = new_job(reason="for the paper " + EVIL)
    job_id = submit(jobs, job, S.PENDING_REVIEW, reason=EVIL)
    jobs.store.transition(job_id, S.REJECTED, by="owner " + EVIL, reason="because " + EVIL)
    view = JobsView(jobs).all()
    owned = view[job_id]
    for text in (str(view), repr(owned), str(owned.events), owned.reason, str(owned.table())):
        assert_inert(text)
    assert "owned" not in owned.reason  # the OSC sequence is removed whole
    assert "redevil" in owned.reason  # the words stay
    html = view._repr_html_() + owned._repr_html_()
    assert_inert(html)
    assert "<script>" not in html and "&lt;script&gt;" in html
    details = job_details(jobs, job_id)
    dumped = json.dumps(details, ensure_ascii=False, allow_nan=False)
    assert_inert(dumped.replace("\\r", ""))  # JSON escapes; printable() removed them first
    assert "\x1b" not in details["job"]["reason"] and "\x1b" not in details["review"]["reason"]
    assert all("\x1b" not in event["reason"] for event in details["events"])


def test_a_job_whose_stored_form_is_unreadable_still_shows(jobs: FakeJobs) -> None:
    job_id = submit(jobs, None, S.PENDING_REVIEW)

    def broken(_: str) -> CodeReview:
        raise DuetError("the stored form of job does not match \x1b[2J")

    jobs.review = broken  # type: ignore[method-assign]
    text = repr(JobsView(jobs)[job_id])
    assert "No code review: the stored form of job does not match" in text
    assert_inert(text)
    details = job_details(jobs, job_id)
    assert details["review"] is None and "does not match" in details["review_error"]


def test_a_job_forgotten_meanwhile(jobs: FakeJobs) -> None:
    job_id = submit(jobs, None, S.PENDING_REVIEW)
    owned = JobsView(jobs)[job_id]
    jobs.get = lambda _: (_ for _ in ()).throw(KeyError("gone"))  # type: ignore[method-assign]
    assert "no longer kept" in repr(owned)
    with pytest.raises(KeyError):
        owned.state  # noqa: B018


# -- plain JSON for duet-host --------------------------------------------------------------


def test_job_details_are_plain_json(jobs: FakeJobs) -> None:
    job_id = finished(jobs, new_job())
    jobs.requests[job_id] = {"summary": output_request(job_id, aggregation=math.inf)}
    details = job_details(jobs, job_id)
    json.dumps(details, allow_nan=False)  # inf and NaN never reach the wire
    job = details["job"]
    assert job["job_id"] == job_id and job["state"] == "pending_output_review"
    assert (job["plan"], job["steps"], job["progress"]) == ("stats", 2, [0, 0])
    review = details["review"]
    assert review["ok"] and review["inputs"] == [
        {"name": "x", "tag": "train_images", "hosted": True}
    ]
    assert review["outputs"][0]["name"] == "summary" and review["outputs"][0]["lineage"]
    output = details["outputs"][0]
    assert output["aggregation"] is None
    assert output["aggregation_text"] == "depends on no private data"
    assert [e["new"] for e in details["events"]][-1] == "pending_output_review"


# -- the control commands ------------------------------------------------------------------


def admin_of(jobs: FakeJobs | None) -> HostAdmin:
    return HostAdmin(types.SimpleNamespace(_jobs=jobs))  # type: ignore[arg-type]


def test_admin_lists_and_decides(jobs: FakeJobs) -> None:
    open_id = submit(jobs, None, S.PENDING_REVIEW)
    done_id = submit(jobs, None, S.PENDING_REVIEW, S.REJECTED)
    admin = admin_of(jobs)
    assert [row["job_id"] for row in admin.control_jobs(False)] == [open_id]
    assert [row["job_id"] for row in admin.control_jobs(True)] == [done_id, open_id]
    assert admin.control_job(open_id)["job"]["state"] == "pending_review"
    assert admin.control_approve(open_id) == {
        "job_id": open_id, "decision": "approved", "state": "queued",
    }  # fmt: skip
    out = finished(jobs)
    assert admin.control_withhold(out, "too fine") == {
        "job_id": out, "decision": "withheld", "state": "withheld",
    }  # fmt: skip
    assert jobs.calls == [("approve", open_id, "owner"), ("withhold", out, "too fine", "owner")]


def test_admin_refuses_unknown_jobs_and_disabled_jobs(jobs: FakeJobs) -> None:
    admin = admin_of(jobs)
    unknown = "0" * 32
    for call in (lambda: admin.control_job(unknown), lambda: admin.control_approve(unknown),
                 lambda: admin.control_reject(unknown, "x"),
                 lambda: admin.control_release(unknown)):  # fmt: skip
        with pytest.raises(DuetError, match=f"this host has no job {unknown}"):
            call()
    assert jobs.calls == []
    off = admin_of(None)
    for call in (lambda: off.control_jobs(False), lambda: off.control_job(unknown),
                 lambda: off.control_withhold(unknown, "x")):  # fmt: skip
        with pytest.raises(DuetError, match="this host does not take jobs"):
            call()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="dj", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def served(jobs: FakeJobs, short_dir: Path) -> AsyncIterator[Path]:
    server = ControlServer(short_dir / "host" / "control.sock", admin_of(jobs))
    await asyncio.wait_for(server.start(), WAIT)
    yield server.path
    await asyncio.wait_for(server.close(), WAIT)


async def ask(path: Path, command: str, **args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(request, path, command, args, 5.0), WAIT)


async def test_jobs_through_the_control_socket(jobs: FakeJobs, served: Path) -> None:
    job_id = submit(jobs, None, S.PENDING_REVIEW, reason=EVIL)
    rows = await ask(served, "jobs")
    assert [row["job_id"] for row in rows] == [job_id] and "\x1b" not in rows[0]["reason"]
    assert len(await ask(served, "jobs", all=True)) == 1
    details = await ask(served, "job", job_id=f"<UID:{job_id.upper()}>")
    assert details["job"]["job_id"] == job_id and details["review"]["ok"]
    assert await ask(served, "reject", job_id=job_id, reason="no") == {
        "job_id": job_id, "decision": "rejected", "state": "rejected",
    }  # fmt: skip
    with pytest.raises(DuetError, match=f"this host has no job {'1' * 32}"):
        await ask(served, "approve", job_id="1" * 32)
    out = finished(jobs)
    assert (await ask(served, "release", job_id=out))["state"] == "released"
    assert jobs.calls == [("reject", job_id, "no", "owner"), ("release", out, "owner")]


async def test_refusals_of_the_machinery_reach_the_owner(jobs: FakeJobs, served: Path) -> None:
    job_id = submit(jobs, None, S.PENDING_REVIEW)
    jobs.refuse = JobRefused("cannot be approved: input x is not hosted \x1b[2J")
    with pytest.raises(DuetError, match="cannot be approved: input x is not hosted") as caught:
        await ask(served, "approve", job_id=job_id)
    assert "\x1b" not in str(caught.value)
    jobs.refuse = InvalidTransition(f"job {job_id} is not waiting for review")
    with pytest.raises(DuetError, match="is not waiting for review"):
        await ask(served, "withhold", job_id=job_id, reason="no")


BAD_ARGS = [
    ("job", {}),
    ("job", {"job_id": "abc"}),
    ("job", {"job_id": "g" * 32}),
    ("job", {"job_id": 12345}),
    ("job", {"job_id": "../" + "a" * 32}),
    ("approve", {"job_id": "a" * 32 + "\n"}),
    ("approve", {"job_id": "a" * 32, "reason": "x"}),
    ("release", {"job_id": ["a" * 32]}),
    ("reject", {"job_id": "a" * 32}),
    ("reject", {"job_id": "a" * 32, "reason": ""}),
    ("reject", {"job_id": "a" * 32, "reason": "   "}),
    ("reject", {"job_id": "a" * 32, "reason": "x" * 1001}),
    ("withhold", {"job_id": "a" * 32, "reason": "a\x1b[2Jb"}),
    ("withhold", {"job_id": "a" * 32, "reason": 1}),
    ("jobs", {"all": "yes"}),
    ("jobs", {"state": "running"}),
    ("cancel_all", {}),
    ("Jobs", {}),
]


@pytest.mark.parametrize(("command", "args"), BAD_ARGS, ids=[f"{c} {a}" for c, a in BAD_ARGS])
async def test_bad_job_commands_never_reach_the_host(
    jobs: FakeJobs, served: Path, command: str, args: dict[str, Any]
) -> None:
    job_id = submit(jobs, None, S.PENDING_REVIEW)
    with pytest.raises(DuetError) as caught:
        await ask(served, command, **args)
    assert_inert(str(caught.value))
    assert jobs.calls == []
    assert jobs.get(job_id).state is S.PENDING_REVIEW
    assert (await ask(served, "jobs"))[0]["job_id"] == job_id  # still serving
