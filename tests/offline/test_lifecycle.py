"""The job lifecycle: exactly the issue's flow, and nothing else."""

from __future__ import annotations

import pytest

from duet_p2p.offline.lifecycle import (
    OPEN,
    TERMINAL,
    TRANSITIONS,
    InvalidTransition,
    JobState,
    check_requeue,
    check_transition,
    is_terminal,
    parse_state,
)

S = JobState
BEFORE_RUN = (S.SUBMITTED, S.PENDING_REVIEW, S.APPROVED, S.AUTO_APPROVED, S.QUEUED)
# Written out from the issue, independently of the module's table.
EXPECTED = {
    (S.SUBMITTED, S.PENDING_REVIEW),
    (S.PENDING_REVIEW, S.APPROVED), (S.PENDING_REVIEW, S.AUTO_APPROVED),
    (S.PENDING_REVIEW, S.REJECTED),
    (S.APPROVED, S.QUEUED), (S.AUTO_APPROVED, S.QUEUED),
    (S.QUEUED, S.RUNNING),
    (S.RUNNING, S.FINISHED), (S.RUNNING, S.FAILED), (S.RUNNING, S.TIMED_OUT),
    (S.RUNNING, S.CANCELLED),
    (S.FINISHED, S.PENDING_OUTPUT_REVIEW),
    (S.PENDING_OUTPUT_REVIEW, S.RELEASED), (S.PENDING_OUTPUT_REVIEW, S.WITHHELD),
    (S.RELEASED, S.DELIVERED),
    *((state, S.CANCELLED) for state in BEFORE_RUN),
    *((state, S.EXPIRED) for state in (
        S.SUBMITTED, S.PENDING_REVIEW, S.APPROVED, S.AUTO_APPROVED, S.QUEUED, S.RUNNING,
        S.FINISHED, S.PENDING_OUTPUT_REVIEW, S.RELEASED)),
}  # fmt: skip
ALL_PAIRS = [(old, new) for old in S for new in S]


def test_sixteen_states() -> None:
    assert len(S) == 16
    assert TERMINAL == {S.REJECTED, S.FAILED, S.TIMED_OUT, S.CANCELLED, S.WITHHELD,
                        S.DELIVERED, S.EXPIRED}  # fmt: skip
    assert OPEN == set(S) - TERMINAL


def test_the_table_is_the_issue_flow() -> None:
    table = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert table == EXPECTED


@pytest.mark.parametrize(("old", "new"), sorted(EXPECTED))
def test_allowed(old: JobState, new: JobState) -> None:
    check_transition(old, new)
    check_transition(str(old), str(new))  # as stored


@pytest.mark.parametrize(("old", "new"), [p for p in ALL_PAIRS if p not in EXPECTED])
def test_forbidden(old: JobState, new: JobState) -> None:
    with pytest.raises(InvalidTransition):
        check_transition(old, new)


def test_some_forbidden_moves_by_name() -> None:
    for old, new in [
        (S.SUBMITTED, S.RUNNING),  # skipping review
        (S.PENDING_REVIEW, S.QUEUED),  # skipping approval
        (S.FINISHED, S.RELEASED),  # skipping output review
        (S.RUNNING, S.QUEUED),  # a second run: only recovery, see check_requeue
        (S.FINISHED, S.RUNNING),  # a finished job never runs again
        (S.REJECTED, S.APPROVED), (S.DELIVERED, S.RELEASED), (S.EXPIRED, S.QUEUED),
        (S.WITHHELD, S.RELEASED), (S.RELEASED, S.CANCELLED), (S.FINISHED, S.CANCELLED),
    ]:  # fmt: skip
        with pytest.raises(InvalidTransition):
            check_transition(old, new)


def test_terminal_states_never_change() -> None:
    for state in TERMINAL:
        assert is_terminal(state) and not TRANSITIONS[state]
        with pytest.raises(InvalidTransition, match="no longer change"):
            check_transition(state, S.EXPIRED)


def test_every_state_is_reachable_and_every_open_state_can_end() -> None:
    reached, frontier = {S.SUBMITTED}, [S.SUBMITTED]
    while frontier:
        for new in TRANSITIONS[frontier.pop()]:
            if new not in reached:
                reached.add(new)
                frontier.append(new)
    assert reached == set(S)
    for state in OPEN:
        assert S.EXPIRED in TRANSITIONS[state]


def test_requeue_only_while_attempts_are_left() -> None:
    check_requeue(S.RUNNING, 0)
    check_requeue(S.RUNNING, 1)
    for attempts in (2, 3, -1, True, None):
        with pytest.raises(InvalidTransition, match="never run again"):
            check_requeue(S.RUNNING, attempts)  # type: ignore[arg-type]
    for state in set(S) - {S.RUNNING}:
        with pytest.raises(InvalidTransition):
            check_requeue(state, 0)


@pytest.mark.parametrize("value", ["RUNNING", "", "done", None, 3, ["running"], {}])
def test_unknown_states_are_refused(value: object) -> None:
    with pytest.raises(InvalidTransition, match="unknown"):
        parse_state(value)
    with pytest.raises(InvalidTransition):
        check_transition(S.SUBMITTED, value)  # type: ignore[arg-type]
    assert parse_state("running") is S.RUNNING
