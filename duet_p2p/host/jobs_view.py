"""The owner's side of offline jobs: ``host.jobs``, one job, and its two reviews.

``host.jobs`` lists the open jobs (those not yet in a terminal state), newest first, as a
table (text, HTML, pandas); ``host.jobs[0]`` is the newest, ``host.jobs["<job id>"]`` any
job, ``.all()`` every job, ``.pending_review`` and ``.pending_output`` the jobs waiting for
the owner. An :class:`OwnerJob` shows its code review, its outputs and its trail, and
decides: ``approve()`` / ``reject(reason)`` the code, ``preview(name)`` then ``release()``
/ ``withhold(reason)`` the outputs, ``cancel()``.

The same facts reach ``duet-host`` as plain JSON (:func:`job_row`, :func:`job_details`).
Everything a scientist chose (a reason, a tag, a plan name) and everything the job store
holds is made printable before it is shown.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any, overload

from duet_p2p.errors import DuetError
from duet_p2p.offline.lifecycle import BEFORE_RUN, OPEN, JobState
from duet_p2p.table import Table, TableView, format_clock, format_size
from duet_p2p.text import printable

if TYPE_CHECKING:  # the machinery imports torch; this view does not need it
    from duet_p2p.host.job_store import JobEvent, StoredJob
    from duet_p2p.offline.review import CodeReview
    from duet_p2p.permissions import Request

__all__ = [
    "JobsView", "OwnerJob", "event_rows", "job_details", "job_row", "output_rows",
    "review_dict",
]  # fmt: skip

OWNER = "owner"
MAX_LISTED = 1000
"""Jobs one listing reads (newest first)."""
MAX_REASON_CHARS = 1000
MAX_TEXT_CHARS = 200
MAX_LINEAGE_CHARS = 2000
MAX_ID_CHARS = 64
_S = JobState
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def _text(value: object, limit: int = MAX_TEXT_CHARS) -> str:
    return "" if value is None else printable(value, limit)


def _when(timestamp: float | None) -> str:
    """A date and local time (jobs span days, unlike live requests)."""
    if timestamp is None or not math.isfinite(timestamp):
        return ""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    except (OverflowError, OSError, ValueError):
        return "?"


def _clock(timestamp: float | None) -> str:
    if timestamp is None or not math.isfinite(timestamp):
        return ""
    try:
        return format_clock(timestamp)
    except (OverflowError, OSError, ValueError):
        return "?"


def _finite(value: float) -> float | None:
    """A number JSON can carry (None for inf and NaN)."""
    return float(value) if math.isfinite(value) else None


def aggregation_text(value: float) -> str:
    """How an output's aggregation reads: ``>= 40 records``."""
    if math.isnan(value):
        return "unknown"
    if math.isinf(value):
        return "depends on no private data"
    return f">= {value:g} records"


def job_key(value: object) -> str:
    """A job ID as typed (``<UID:...>``, any case, spaces around) -> 32 lower-case hex
    digits; KeyError for anything else."""
    if isinstance(value, str) and len(value) <= 80:
        text = value.strip()
        if text.startswith("<UID:") and text.endswith(">"):
            text = text[5:-1].strip()
        text = text.lower()
        if _JOB_ID.fullmatch(text):
            return text
    shown = printable(value, 40) if isinstance(value, str) else type(value).__name__
    raise KeyError(f"{shown!r} is not a job ID (32 hexadecimal digits)")


def _plan(stored: StoredJob) -> tuple[str, int | None]:
    """(name, steps) of a stored job's plan; ("?", None) if its stored form is unreadable."""
    try:
        program = stored.job.spec.program
    except (DuetError, ValueError, TypeError):
        return "?", None
    return printable(program["name"], 64), len(program["steps"])


def _plan_text(stored: StoredJob) -> str:
    name, steps = _plan(stored)
    return name if steps is None else f"{name} ({steps} step{'' if steps == 1 else 's'})"


# -- plain JSON, for the control socket -------------------------------------------------


def job_row(stored: StoredJob) -> dict[str, Any]:
    """One job as a listing row of plain JSON values (text made printable)."""
    name, steps = _plan(stored)
    done, total = stored.progress
    return {
        "job_id": _text(stored.job_id, MAX_ID_CHARS),
        "client_id": _text(stored.client_id, MAX_ID_CHARS),
        "state": str(stored.state), "plan": name, "steps": steps,
        "submitted_at": stored.submitted_at, "updated_at": stored.updated_at,
        "deadline": stored.deadline, "started_at": stored.started_at,
        "finished_at": stored.finished_at, "progress": [done, total],
        "last_by": _text(stored.last_by), "reason": _text(stored.last_reason, MAX_REASON_CHARS),
        "receipt": stored.receipt is not None,
    }  # fmt: skip


def review_dict(review: CodeReview) -> dict[str, Any]:
    """A code review as plain JSON (its text is printable already; made so again)."""
    return {
        "job_id": review.job_id, "client_id": review.client_id, "host_id": review.host_id,
        "job_hash": review.job_hash, "plan_hash": review.plan_hash,
        "plan": _text(review.plan_name, 64), "steps": review.steps,
        "reason": _text(review.reason, 4000),
        "inputs": [{"name": _text(i.name), "tag": _text(i.tag), "hosted": bool(i.hosted)}
                   for i in review.inputs.values()],
        "outputs": [{"name": _text(o.name), "source": _text(o.source),
                     "lineage": _text(o.lineage, MAX_LINEAGE_CHARS),
                     "ops": [_text(op) for op in o.ops]} for o in review.outputs.values()],
        "ops": [_text(op) for op in review.ops],
        "max_seconds": _finite(review.max_seconds),
        "max_result_elements": review.max_result_elements,
        "max_result_bytes": review.max_result_bytes,
        "created_at": _finite(review.created_at), "deadline": _finite(review.deadline),
        "problems": [_text(p, 1000) for p in review.problems], "ok": review.ok,
    }  # fmt: skip


def output_rows(
    requests: Mapping[str, Request | None], review: CodeReview | None
) -> list[dict[str, Any]]:
    """Each declared output (the review's order, then any other requested) with its output
    request: what the owner reads in output review."""
    names = list(review.outputs) if review is not None else []
    names += [name for name in requests if name not in names]
    rows = []
    for name in names:
        request = requests.get(name)
        lineage = review.outputs[name].lineage if review and name in review.outputs else ""
        row: dict[str, Any] = {
            "name": _text(name, 64), "request_id": None,
            "status": "not computed" if request is None else request.status.value,
            "lineage": _text(lineage, MAX_LINEAGE_CHARS), "elements": None, "size_bytes": None,
            "aggregation": None, "aggregation_text": "", "checks": [], "error": None,
        }  # fmt: skip
        if request is not None:
            row.update({
                "request_id": _text(request.request_id, MAX_ID_CHARS),
                "lineage": _text(request.lineage or lineage, MAX_LINEAGE_CHARS),
                "elements": request.elements, "size_bytes": request.size_bytes,
                "aggregation": _finite(request.aggregation),
                "aggregation_text": aggregation_text(request.aggregation),
                "checks": [_text(c, 500) for c in request.checks],
                "error": None if request.error is None else _text(request.error, 1000),
            })  # fmt: skip
        rows.append(row)
    return rows


def event_rows(events: list[JobEvent]) -> list[dict[str, Any]]:
    """A job's trail as plain JSON, oldest first."""
    return [
        {"at": event.at, "old": None if event.old is None else str(event.old),
         "new": str(event.new), "by": _text(event.by), "reason": _text(event.reason, 1000)}
        for event in events
    ]  # fmt: skip


def job_details(jobs: Any, job_id: str) -> dict[str, Any]:
    """Everything ``duet-host job`` shows: the job, its code review (None, with
    ``review_error``, when it cannot be made), its outputs and its trail. KeyError for an
    unknown job."""
    stored = jobs.get(job_id)
    review, problem = _review_of(jobs, job_id)
    return {
        "job": job_row(stored),
        "review": None if review is None else review_dict(review),
        "review_error": problem,
        "outputs": output_rows(jobs.output_requests(job_id), review),
        "events": event_rows(jobs.events(job_id)),
    }


def _review_of(jobs: Any, job_id: str) -> tuple[CodeReview | None, str | None]:
    try:
        return jobs.review(job_id), None
    except DuetError as exc:  # e.g. a stored form that no longer parses
        return None, _text(str(exc) or type(exc).__name__, 500)


# -- the notebook ------------------------------------------------------------------------


class JobsView(TableView):
    """``host.jobs``: jobs newest first, by index (``[0]``) or ID (``["<job id>"]``).

    Lists the open jobs; ``.all()`` every job, ``.pending_review`` those waiting for code
    review, ``.pending_output`` those waiting for output review. Read afresh each time.
    """

    def __init__(
        self,
        jobs: Any,
        states: Collection[JobState] | None = OPEN,
        *,
        title: str | None = None,
        empty_text: str = "No open jobs.",
    ) -> None:
        self._jobs = jobs
        self._states = None if states is None else frozenset(JobState(s) for s in states)
        self._title = title
        self._empty = empty_text

    def _stored(self) -> list[StoredJob]:
        return list(self._jobs.list(self._states, MAX_LISTED))

    def all(self) -> JobsView:
        """Every job the host keeps, finished ones included."""
        return JobsView(self._jobs, None, title="All jobs", empty_text="No jobs yet.")

    @property
    def pending_review(self) -> JobsView:
        """Jobs waiting for you to approve or reject their code."""
        return JobsView(self._jobs, {_S.PENDING_REVIEW}, title="Waiting for code review",
                        empty_text="No job waits for code review.")  # fmt: skip

    @property
    def pending_output(self) -> JobsView:
        """Finished jobs waiting for you to release or withhold their outputs."""
        return JobsView(self._jobs, {_S.PENDING_OUTPUT_REVIEW},
                        title="Waiting for output review",
                        empty_text="No job waits for output review.")  # fmt: skip

    def __len__(self) -> int:
        return len(self._stored())

    def __iter__(self) -> Iterator[OwnerJob]:
        return iter([OwnerJob(self._jobs, stored) for stored in self._stored()])

    @overload
    def __getitem__(self, key: int | str) -> OwnerJob: ...
    @overload
    def __getitem__(self, key: slice) -> list[OwnerJob]: ...
    def __getitem__(self, key: int | str | slice) -> OwnerJob | list[OwnerJob]:
        if isinstance(key, str):
            job_id = job_key(key)
            return OwnerJob(self._jobs, self._jobs.get(job_id))
        if isinstance(key, bool) or not isinstance(key, int | slice):
            raise TypeError("jobs are indexed by position or by job ID")
        listed = self._stored()
        if isinstance(key, slice):
            return [OwnerJob(self._jobs, stored) for stored in listed[key]]
        try:
            return OwnerJob(self._jobs, listed[key])
        except IndexError:
            raise IndexError(f"no job at index {key} ({len(listed)} listed)") from None

    def table(self) -> Table:
        rows = [[_text(s.job_id, MAX_ID_CHARS), _text(s.client_id, MAX_ID_CHARS), str(s.state),
                 _plan_text(s), _clock(s.submitted_at), _text(s.last_reason, MAX_REASON_CHARS)]
                for s in self._stored()]  # fmt: skip
        return Table(["Job ID", "Client ID", "State", "Plan", "Submitted", "Reason"], rows,
                     self._title, empty_text=self._empty)  # fmt: skip


class OwnerJob(TableView):
    """One job as its owner sees it; reads the host's job store afresh on each use."""

    def __init__(self, jobs: Any, stored: StoredJob) -> None:
        self._jobs = jobs
        self._job_id = stored.job_id
        self._client_id = stored.client_id
        self._submitted_at = stored.submitted_at

    # -- facts ------------------------------------------------------------------------

    @property
    def job_id(self) -> str:
        return self._job_id

    @property
    def client_id(self) -> str:
        """The scientist who signed it."""
        return self._client_id

    @property
    def submitted_at(self) -> float:
        return self._submitted_at

    def _now(self) -> StoredJob:
        return self._jobs.get(self._job_id)

    @property
    def state(self) -> JobState:
        return self._now().state

    @property
    def reason(self) -> str:
        """Why it is in its state (the last transition's reason, as the scientist sees it)."""
        return _text(self._now().last_reason, MAX_REASON_CHARS)

    @property
    def progress(self) -> tuple[int, int]:
        """(steps done, steps in all) of its run."""
        return self._now().progress

    @property
    def review(self) -> CodeReview:
        """The code review: the plan as lineage, the ops, inputs, outputs, limits, problems."""
        return self._jobs.review(self._job_id)

    @property
    def outputs(self) -> Table:
        """Its outputs for output review: lineage, elements, size, aggregation, status."""
        return _outputs_table(self._output_rows())

    @property
    def events(self) -> Table:
        """Its trail: every transition, who made it and why, oldest first."""
        rows = [[_when(e["at"]), e["old"] or "", e["new"], e["by"], e["reason"]]
                for e in event_rows(self._jobs.events(self._job_id))]  # fmt: skip
        return Table(["At", "From", "To", "By", "Reason"], rows, f"Trail of job {self._job_id}",
                     index=False, empty_text="No events.", max_cell_chars=100)  # fmt: skip

    def _output_rows(self) -> list[dict[str, Any]]:
        review, _ = _review_of(self._jobs, self._job_id)
        return output_rows(self._jobs.output_requests(self._job_id), review)

    def preview(self, name: str | None = None) -> Any:
        """The value of output ``name`` (which may be left out when there is one), shown
        here only: nothing is sent to the scientist."""
        requests = self._jobs.output_requests(self._job_id)
        names = ", ".join(printable(n, 64) for n in requests) or "none yet"
        if name is None:
            if len(requests) != 1:
                raise DuetError(f"job {self._job_id} has outputs {names}: name one, "
                                "e.g. .preview('accuracy')")  # fmt: skip
            name = next(iter(requests))
        if name not in requests:
            raise KeyError(f"job {self._job_id} has no output {printable(name, 64)!r} "
                           f"(its outputs: {names})")  # fmt: skip
        request = requests[name]
        if request is None:
            raise DuetError(f"output {printable(name, 64)} of job {self._job_id} has no value "
                            f"to preview (the job is {self.state})")  # fmt: skip
        return request.preview()

    # -- decisions ----------------------------------------------------------------------

    def approve(self) -> None:
        """Approve its code: it is queued to run."""
        self._jobs.approve(self._job_id, by=OWNER)

    def reject(self, reason: str) -> None:
        """Reject its code; the scientist is told ``reason``."""
        self._jobs.reject(self._job_id, reason, by=OWNER)

    def release(self) -> None:
        """Release every output waiting for your decision to the scientist."""
        self._jobs.release(self._job_id, by=OWNER)

    def withhold(self, reason: str) -> None:
        """Withhold its outputs; the scientist is told ``reason``."""
        self._jobs.withhold(self._job_id, reason, by=OWNER)

    def cancel(self) -> None:
        """Cancel it before or while it runs."""
        self._jobs.cancel(self._job_id, by=OWNER)

    # -- display ------------------------------------------------------------------------

    def table(self) -> Table:
        stored = self._now()
        rows = [
            ("State", str(stored.state)),
            ("Reason", _text(stored.last_reason, MAX_REASON_CHARS)),
            ("By", _text(stored.last_by)),
            ("Plan", _plan_text(stored)),
            ("Submitted", _when(stored.submitted_at)),
            ("Deadline", _when(stored.deadline)),
        ]
        done, total = stored.progress
        if total or stored.started_at is not None:
            rows.append(("Progress", f"{done} of {total} steps"))
        if stored.receipt is not None:
            rows.append(("Receipt", "signed by this host"))
        title = f"Job {self._job_id} from {_text(stored.client_id, MAX_ID_CHARS)}"
        return Table(["Field", "Value"], rows, title, index=False, max_cell_chars=200)

    def _parts(self) -> tuple[list[Any], str]:
        """(tables, hint) of the full display; a part that cannot be read says why."""
        try:
            state = self._now().state
        except KeyError:
            return [], f"job {self._job_id} is no longer kept by this host"
        parts: list[Any] = [self.table()]
        review, problem = _review_of(self._jobs, self._job_id)
        parts.append(review if review is not None else f"No code review: {problem}")
        try:
            outputs = output_rows(self._jobs.output_requests(self._job_id), review)
        except (DuetError, KeyError) as exc:
            parts.append(f"No outputs: {_text(str(exc), 500)}")
        else:
            if any(row["request_id"] for row in outputs):
                parts.append(_outputs_table(outputs))
        return parts, _hint(state)

    def __repr__(self) -> str:
        parts, hint = self._parts()
        return "\n\n".join([str(part) for part in parts] + [hint])

    __str__ = __repr__

    def _repr_html_(self) -> str:
        parts, hint = self._parts()
        html = [
            part._repr_html_()
            if hasattr(part, "_repr_html_")
            else Table(["Note"], [[part]], index=False)._repr_html_()
            for part in parts
        ]
        html.append(Table(["Next"], [[hint]], index=False)._repr_html_())  # fmt: skip
        return "".join(html)


def _outputs_table(rows: list[dict[str, Any]]) -> Table:
    cells = []
    for row in rows:
        status = row["status"] if row["error"] is None else f"{row['status']} (failed)"
        size = "" if row["size_bytes"] is None else format_size(row["size_bytes"])
        cells.append([row["name"], status, row["lineage"], row["elements"], size,
                      row["aggregation_text"], "; ".join(row["checks"])])  # fmt: skip
    return Table(["Output", "Status", "Lineage", "Elements", "Size", "Aggregation", "Checks"],
                 cells, "Outputs", index=False, empty_text="No outputs declared.",
                 max_cell_chars=100)  # fmt: skip


def _hint(state: JobState) -> str:
    if state is _S.PENDING_REVIEW:
        return "Waiting for you: .approve() or .reject(reason). .events shows its trail."
    if state is _S.PENDING_OUTPUT_REVIEW:
        return ("Waiting for you: .preview(name) shows an output here, then .release() or "
                ".withhold(reason). .events shows its trail.")  # fmt: skip
    if state in BEFORE_RUN or state is _S.RUNNING:
        return f"It is {state}: .cancel() stops it. .events shows its trail."
    return f"It is {state}. .events shows its trail."
