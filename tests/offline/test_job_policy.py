"""The owner's job policy: auto-approving code, auto-releasing outputs, and its config table."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest

from duet_p2p.errors import ConfigurationError
from duet_p2p.offline.policy import (
    JobPolicy,
    OutputFacts,
    ReleaseRule,
    auto_reject_reason,
    decide_code,
    decide_output,
    job_policy_from_dict,
    output_facts,
)
from duet_p2p.offline.review import CodeReview
from duet_p2p.rpc.messages import Action
from duet_p2p.rpc.ops import INDEX_OP
from tests.offline.test_review import (
    LINEAGE,
    MODEL,
    NOW,
    SCIENTIST,
    R,
    accuracy_steps,
    make_signed,
    program,
    review,
)

OTHER = "0" * 32
OPS = frozenset({
    "torch.nn.Module.__call__", "torch.Tensor.argmax", "torch.Tensor.eq", "torch.Tensor.float",
    "torch.Tensor.mean",
})  # fmt: skip


@pytest.fixture(scope="module")
def good() -> CodeReview:
    return review()


@pytest.fixture(scope="module")
def broken() -> CodeReview:
    """A review with two problems (an unknown tag, an op off the allowlist)."""
    steps = accuracy_steps()
    steps[3] = Action(op="torch.save", result="r3", args=[R("r2"), "f"])
    return review(make_signed(program=program(steps)), tags=frozenset({"model", "x"}))


# -- code --------------------------------------------------------------------------------------


def test_nothing_is_approved_by_default(good: CodeReview) -> None:
    assert decide_code(good, JobPolicy()) == (
        False, "no auto-approve rule matches: the owner decides"
    )  # fmt: skip


def test_each_auto_approve_path(good: CodeReview) -> None:
    ok, why = decide_code(good, JobPolicy(approve_clients=frozenset({SCIENTIST.id})))
    assert ok and "approve_clients" in why and SCIENTIST.id in why
    ok, why = decide_code(good, JobPolicy(approve_plans=frozenset({good.plan_hash})))
    assert ok and "approve_plans" in why
    ok, why = decide_code(good, JobPolicy(approve_ops=OPS))
    assert ok and "approve_ops" in why
    # an approval for someone or something else
    assert not decide_code(good, JobPolicy(approve_clients=frozenset({OTHER})))[0]
    assert not decide_code(good, JobPolicy(approve_plans=frozenset({"0" * 64})))[0]
    ok, why = decide_code(good, JobPolicy(approve_ops=OPS - {"torch.Tensor.eq"}))
    assert not ok and "torch.Tensor.eq" in why and "owner decides" in why


def test_approve_ops_takes_tuple_indexing_as_given() -> None:
    steps = [
        Action(op="torch.Tensor.topk", result="t0", target=R(MODEL), args=[2]),
        Action(op=INDEX_OP, result="t1", target=R("t0"), args=[0]),
    ]
    signed = make_signed(program=program(steps, outputs=["t1"], inputs=[MODEL]),
                         inputs={MODEL: "x"}, outputs={"top": "t1"})  # fmt: skip
    result = review(signed)
    assert result.ok and INDEX_OP in result.ops
    assert decide_code(result, JobPolicy(approve_ops=frozenset({"torch.Tensor.topk"})))[0]


def test_max_seconds_holds_back_every_path(good: CodeReview) -> None:
    everything = JobPolicy(
        approve_clients=frozenset({SCIENTIST.id}), approve_plans=frozenset({good.plan_hash}),
        approve_ops=OPS,
    )  # fmt: skip
    assert decide_code(good, replace(everything, max_seconds=60))[0]
    ok, why = decide_code(good, replace(everything, max_seconds=59.9))
    assert not ok and "59.9 s" in why and "owner decides" in why


def test_a_review_with_problems_is_never_approved(broken: CodeReview) -> None:
    assert len(broken.problems) == 2
    reason = auto_reject_reason(broken)
    assert reason is not None and reason.startswith("cannot run: ")
    assert broken.problems[0] in reason and "(and 1 more)" in reason
    generous = JobPolicy(
        approve_clients=frozenset({SCIENTIST.id}), approve_plans=frozenset({broken.plan_hash}),
        approve_ops=OPS | {"torch.save"},
    )  # fmt: skip
    assert decide_code(broken, generous) == (False, reason)
    assert decide_code(broken, JobPolicy()) == (False, reason)


def test_no_reject_reason_for_a_job_that_can_run(good: CodeReview) -> None:
    assert auto_reject_reason(good) is None
    late = review(now=NOW + 7200)
    assert auto_reject_reason(late) == f"cannot run: {late.problems[0]}"
    with pytest.raises(TypeError):
        auto_reject_reason("review")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decide_code(good, {"approve_clients": [SCIENTIST.id]})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"approve_clients": frozenset({"ABC"})}, "approve_clients"),
        ({"approve_clients": frozenset({"A" * 32})}, "approve_clients"),  # lower-case only
        ({"approve_clients": SCIENTIST.id}, "approve_clients"),  # one string, not a set
        ({"approve_clients": frozenset({7})}, "approve_clients"),
        ({"approve_plans": frozenset({"ab" * 16})}, "approve_plans"),
        ({"approve_ops": frozenset({"os.system"})}, "approve_ops"),
        ({"approve_ops": frozenset({"torch.Tensor.\x1bsum"})}, "approve_ops"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"max_seconds": math.nan}, "max_seconds"),
        ({"max_seconds": math.inf}, "max_seconds"),
        ({"max_seconds": True}, "max_seconds"),
        ({"release": ReleaseRule()}, "release"),
        ({"release": ({"outputs": ["a"]},)}, "release"),
    ],
)
def test_a_policy_is_checked_when_built(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{field}: "):
        JobPolicy(**changes)


def test_a_policy_is_frozen() -> None:
    policy = JobPolicy(approve_clients=[SCIENTIST.id], approve_ops=["torch.Tensor.sum"])  # type: ignore[arg-type]
    assert policy.approve_clients == frozenset({SCIENTIST.id})
    assert isinstance(policy.approve_ops, frozenset)
    with pytest.raises(AttributeError):
        policy.max_seconds = 5  # type: ignore[misc]


# -- outputs ---------------------------------------------------------------------------------


def facts(good: CodeReview, **changes: Any) -> OutputFacts:
    values: dict[str, Any] = dict(elements=1, size_bytes=8, aggregation=2.0, finished_at=NOW)
    values.update(changes)
    return output_facts(good, "accuracy", **values)


def test_output_facts_come_from_the_review(good: CodeReview) -> None:
    made = facts(good, checks=["c"])
    assert made.output == "accuracy" and made.lineage == LINEAGE and made.job_id == good.job_id
    assert made.ops[-1] == "torch.Tensor.mean" and made.client_id == SCIENTIST.id
    assert made.tags == {"model", "x", "y"} and made.checks == ("c",)
    assert facts(good, tags=["mnist"]).tags == {"mnist"}
    with pytest.raises(KeyError):
        output_facts(good, "nope", elements=1, size_bytes=1, aggregation=1)


def test_a_matching_rule_releases(good: CodeReview) -> None:
    rule = ReleaseRule(outputs=frozenset({"accuracy"}), tags=frozenset({"x", "y"}),
                       max_elements=1)  # fmt: skip
    ok, why = decide_output(facts(good), [rule])
    assert (ok, why) == (True, "release rule outputs=[accuracy] tags=[x, y] max_elements=1 matched")
    assert ReleaseRule(op="mean", min_aggregation=2.5).summary() == "op=mean min_aggregation=2.5"
    assert decide_output(facts(good), [ReleaseRule()]) == (True, "release rule any output matched")
    named = ReleaseRule(name="accuracy of any model")
    assert decide_output(facts(good), [named]) == (
        True, "release rule accuracy of any model matched"
    )  # fmt: skip


def test_rules_that_do_not_match(good: CodeReview) -> None:
    unmatched = "no release rule matches: the owner decides"
    assert decide_output(facts(good), []) == (False, unmatched)
    for rule in (
        ReleaseRule(outputs=frozenset({"loss"})),
        ReleaseRule(tags=frozenset({"x", "secret"})),
        ReleaseRule(max_elements=0),
        ReleaseRule(op="sum"),
        ReleaseRule(min_aggregation=3),
    ):
        assert decide_output(facts(good), [rule]) == (False, unmatched), rule
    assert decide_output(facts(good), [ReleaseRule(op="mean")])[0]
    assert decide_output(facts(good), [ReleaseRule(op="torch.Tensor.mean")])[0]
    assert decide_output(facts(good, elements=5), [ReleaseRule(max_elements=5)])[0]
    assert not decide_output(facts(good, elements=5.5), [ReleaseRule(max_elements=5)])[0]


def test_the_hosts_minimum_aggregation(good: CodeReview) -> None:
    assert not decide_output(facts(good), [ReleaseRule()], min_aggregation=10)[0]
    assert decide_output(facts(good, aggregation=10), [ReleaseRule()], min_aggregation=10)[0]
    # a rule's own minimum stands in place of the host's, as a live handler's does
    assert decide_output(facts(good), [ReleaseRule(min_aggregation=1)], min_aggregation=10)[0]
    with pytest.raises(ConfigurationError):
        decide_output(facts(good), [], min_aggregation=0.5)


def test_the_first_matching_rule_decides(good: CodeReview) -> None:
    rules = [ReleaseRule(name="never", outputs=frozenset({"loss"})), ReleaseRule(name="any"),
             ReleaseRule(name="later")]  # fmt: skip
    assert decide_output(facts(good), rules) == (True, "release rule any matched")


def test_a_disclosure_check_leaves_it_to_the_owner(good: CodeReview) -> None:
    check = "count: a cell of 2 < 3\x1b[2J"
    ok, why = decide_output(facts(good, checks=[check]), [ReleaseRule()])
    assert not ok and "count: a cell of 2 < 3" in why and "owner decides" in why
    assert "\x1b" not in why


def test_anything_unsure_is_left_to_the_owner(good: CodeReview) -> None:
    rules = [ReleaseRule()]
    assert decide_output(facts(good), rules)[0]
    for changes in (
        {"error": "ValueError: shapes"},
        {"elements": math.inf},
        {"elements": math.nan},
        {"elements": -1},
        {"aggregation": math.nan},
        {"tags": [f"t{i}" for i in range(10_001)]},  # more tags than a rule decides on
    ):
        ok, why = decide_output(facts(good, **changes), rules)
        assert not ok and "owner decides" in why, changes


def test_output_facts_are_checked(good: CodeReview) -> None:
    for changes in ({"elements": "1"}, {"aggregation": True}, {"size_bytes": -1},
                    {"size_bytes": 1.5}, {"tags": "x"}, {"checks": [1]}, {"error": 3}):  # fmt: skip
        with pytest.raises(TypeError):
            facts(good, **changes)
    with pytest.raises(TypeError):
        decide_output(facts(good), [{"max_elements": 1}])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        decide_output({"output": "accuracy"}, [])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"outputs": frozenset({"not a name"})}, "outputs"),
        ({"outputs": "accuracy"}, "outputs"),
        ({"tags": frozenset({""})}, "tags"),
        ({"tags": frozenset({"a\nb"})}, "tags"),
        ({"op": ""}, "op"),
        ({"max_elements": -1}, "max_elements"),
        ({"max_elements": True}, "max_elements"),
        ({"min_aggregation": 0.5}, "min_aggregation"),
        ({"name": "x" * 101}, "name"),
    ],
)
def test_a_rule_is_checked_when_built(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{field}: "):
        ReleaseRule(**changes)


# -- host.toml ------------------------------------------------------------------------------


def test_a_full_jobs_table() -> None:
    policy = job_policy_from_dict({
        "approve_clients": [SCIENTIST.id.upper()],
        "approve_plans": ["AB" * 32],
        "approve_ops": ["torch.Tensor.mean", "torch.Tensor.sum"],
        "max_seconds": 600,
        "release": [
            {"name": "accuracy", "outputs": ["accuracy"], "tags": ["x"], "op": "mean",
             "max_elements": 1, "min_aggregation": 1},
            {"max_elements": 10},
        ],
    })  # fmt: skip
    assert policy.approve_clients == {SCIENTIST.id} and policy.approve_plans == {"ab" * 32}
    assert policy.approve_ops == {"torch.Tensor.mean", "torch.Tensor.sum"}
    assert policy.max_seconds == 600.0 and isinstance(policy.max_seconds, float)
    assert policy.release == (
        ReleaseRule(name="accuracy", outputs=frozenset({"accuracy"}), tags=frozenset({"x"}),
                    op="mean", max_elements=1, min_aggregation=1.0),
        ReleaseRule(max_elements=10),
    )  # fmt: skip
    assert job_policy_from_dict({}) == JobPolicy()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "jobs: must be a table"),
        ({"approve": []}, "jobs.approve: unknown key"),
        ({"approve_clients": SCIENTIST.id}, "jobs.approve_clients: must be a list"),
        ({"approve_clients": []}, "jobs.approve_clients: must be a list of 1"),
        ({"approve_clients": [SCIENTIST.id, "z" * 32]}, "jobs.approve_clients[1]: "),
        (
            {"approve_clients": [SCIENTIST.id, SCIENTIST.id.upper()]},
            "jobs.approve_clients: has duplicates",
        ),
        ({"approve_clients": [3]}, "jobs.approve_clients[0]: must be printable text"),
        ({"approve_plans": ["ab" * 16]}, "jobs.approve_plans[0]: "),
        ({"approve_ops": ["torch.Tensor.sum", "os.system"]}, "jobs.approve_ops[1]: "),
        ({"approve_ops": ["torch.a\x1b[2J"]}, "jobs.approve_ops[0]: must be printable"),
        ({"max_seconds": 0}, "jobs.max_seconds: must be > 0"),
        ({"max_seconds": "60"}, "jobs.max_seconds: must be a number"),
        ({"max_seconds": True}, "jobs.max_seconds: must be a number"),
        ({"max_seconds": math.inf}, "jobs.max_seconds: must be > 0"),
        ({"release": {"max_elements": 1}}, "jobs.release: must be an array"),
        ({"release": [[]]}, "jobs.release[0]: must be a table"),
        ({"release": [{}, {"max_element": 1}]}, "jobs.release[1].max_element: unknown key"),
        ({"release": [{"max_elements": -1}]}, "jobs.release[0].max_elements: must be an"),
        ({"release": [{"max_elements": 1.0}]}, "jobs.release[0].max_elements: must be an"),
        ({"release": [{"min_aggregation": 0}]}, "jobs.release[0].min_aggregation: must be"),
        ({"release": [{"outputs": ["a b"]}]}, "jobs.release[0].outputs[0]: "),
        ({"release": [{"tags": ["x", "x"]}]}, "jobs.release[0].tags: has duplicates"),
        ({"release": [{"op": 5}]}, "jobs.release[0].op: must be printable text"),
        ({"release": [{"name": ""}]}, "jobs.release[0].name: must be printable text"),
        ({"release": [{}] * 1001}, "jobs.release: must be an array of at most 1000"),
        ({"\x1b[2Jbad": 1}, "jobs.bad: unknown key"),
    ],
)
def test_config_errors_name_the_field(data: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match="^" + re.escape(message)) as raised:
        job_policy_from_dict(data)
    assert "\x1b" not in str(raised.value)


def test_config_errors_carry_the_callers_prefix() -> None:
    with pytest.raises(ConfigurationError, match=r"^host.toml: jobs.max_seconds: "):
        job_policy_from_dict({"max_seconds": -1}, where="host.toml: jobs")


def test_reading_the_policy_does_not_import_torch() -> None:
    code = ("import sys, duet_p2p.offline.policy as p; p.job_policy_from_dict({'max_seconds': 1}); "
            "print('torch' in sys.modules)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    assert result.stdout.strip() == "False"


def test_a_rule_without_a_minimum_never_releases_single_records(good: CodeReview) -> None:
    raw = facts(good, aggregation=1.0)
    assert decide_output(raw, [ReleaseRule(max_elements=3)]) == (
        False,
        "no release rule matches: the owner decides",
    )
    assert decide_output(raw, [ReleaseRule(max_elements=3, min_aggregation=1)])[0]
