"""A job's states and the only ways it may move between them.

    SUBMITTED -> PENDING_REVIEW -> APPROVED | AUTO_APPROVED | REJECTED
    APPROVED | AUTO_APPROVED -> QUEUED -> RUNNING
    RUNNING -> FINISHED | FAILED | TIMED_OUT | CANCELLED
    FINISHED -> PENDING_OUTPUT_REVIEW -> RELEASED | WITHHELD
    RELEASED -> DELIVERED

CANCELLED is also reached from every state before the run (SUBMITTED, PENDING_REVIEW,
APPROVED, AUTO_APPROVED, QUEUED), and EXPIRED from every open (non-terminal) state when
the deadline passes. A RUNNING job is expired by whoever runs it (it must stop the run
first); the store's sweep leaves RUNNING jobs alone.

Never silently run twice: a job carries an ``attempts`` counter, counted when a run begins
(``start_attempt``) and never reset. A job found RUNNING after a restart becomes FAILED
("host restarted"), unless the host's policy re-queues it (:func:`check_requeue`): then it
runs once more, recorded in its trail as attempt 2, never more than ``MAX_ATTEMPTS``. A
FINISHED job never runs again. Terminal states never change again.
"""

from __future__ import annotations

from enum import StrEnum

from duet_p2p.errors import DuetError

__all__ = [
    "OPEN", "TERMINAL", "TRANSITIONS", "InvalidTransition", "JobState", "check_requeue",
    "check_transition", "is_terminal", "parse_state",
]  # fmt: skip


class InvalidTransition(DuetError):
    """A job cannot move from its state to the one asked for."""


class JobState(StrEnum):
    SUBMITTED = "submitted"
    PENDING_REVIEW = "pending_review"
    APPROVED = "approved"
    AUTO_APPROVED = "auto_approved"
    REJECTED = "rejected"
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    PENDING_OUTPUT_REVIEW = "pending_output_review"
    RELEASED = "released"
    WITHHELD = "withheld"
    DELIVERED = "delivered"
    EXPIRED = "expired"


_S = JobState
TERMINAL = frozenset({
    _S.REJECTED, _S.FAILED, _S.TIMED_OUT, _S.CANCELLED, _S.WITHHELD, _S.DELIVERED, _S.EXPIRED,
})  # fmt: skip
OPEN = frozenset(_S) - TERMINAL
BEFORE_RUN = frozenset({_S.SUBMITTED, _S.PENDING_REVIEW, _S.APPROVED, _S.AUTO_APPROVED, _S.QUEUED})

_FLOW: dict[JobState, frozenset[JobState]] = {
    _S.SUBMITTED: frozenset({_S.PENDING_REVIEW}),
    _S.PENDING_REVIEW: frozenset({_S.APPROVED, _S.AUTO_APPROVED, _S.REJECTED}),
    _S.APPROVED: frozenset({_S.QUEUED}),
    _S.AUTO_APPROVED: frozenset({_S.QUEUED}),
    _S.QUEUED: frozenset({_S.RUNNING}),
    _S.RUNNING: frozenset({_S.FINISHED, _S.FAILED, _S.TIMED_OUT, _S.CANCELLED}),
    _S.FINISHED: frozenset({_S.PENDING_OUTPUT_REVIEW}),
    _S.PENDING_OUTPUT_REVIEW: frozenset({_S.RELEASED, _S.WITHHELD}),
    _S.RELEASED: frozenset({_S.DELIVERED}),
}
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    state: _FLOW.get(state, frozenset())
    | (frozenset({_S.CANCELLED}) if state in BEFORE_RUN else frozenset())
    | (frozenset({_S.EXPIRED}) if state in OPEN else frozenset())
    for state in _S
}
"""Every state -> the states it may move to (terminal states -> none)."""


def parse_state(value: object) -> JobState:
    """``value`` as a JobState; InvalidTransition if it is none."""
    try:
        return JobState(value)
    except (ValueError, TypeError):
        raise InvalidTransition(f"unknown job state {str(value)[:40]!r}") from None


def is_terminal(state: JobState | str) -> bool:
    return parse_state(state) in TERMINAL


def check_transition(old: JobState | str, new: JobState | str) -> None:
    """Raise InvalidTransition unless a job may move from ``old`` to ``new``."""
    old, new = parse_state(old), parse_state(new)
    if new not in TRANSITIONS[old]:
        if old in TERMINAL:
            raise InvalidTransition(f"the job is {old}; it can no longer change")
        raise InvalidTransition(f"a job cannot go from {old} to {new}")


MAX_ATTEMPTS = 2
"""Runs a job may have: a second only when the owner's policy re-queues a job its host's
restart interrupted."""


def check_requeue(state: JobState | str, attempts: int) -> None:
    """Raise InvalidTransition unless a RUNNING job may go back to QUEUED after a restart:
    only while it has had fewer than ``MAX_ATTEMPTS`` runs (the re-run is recorded)."""
    if parse_state(state) is not _S.RUNNING:
        raise InvalidTransition("only a job found running can be re-queued")
    if type(attempts) is not int or not 0 <= attempts < MAX_ATTEMPTS:
        raise InvalidTransition(f"the job has had {attempts} run(s); it is never run again")
