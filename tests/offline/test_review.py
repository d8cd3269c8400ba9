"""Reviewing a job's code before it runs: lineage of outputs, problems, plan hash, display."""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Any

import pytest

from duet_p2p.allowlist import DEFAULT_ALLOWLIST, Allowlist
from duet_p2p.identity import Identity
from duet_p2p.offline.review import CodeReview, plan_hash, review_code
from duet_p2p.offline.spec import JobSpec, SignedJob, canonical_bytes
from duet_p2p.rpc.codec import ObjectRef
from duet_p2p.rpc.messages import Action, to_wire
from duet_p2p.rpc.ops import INDEX_OP

SCIENTIST = Identity.generate()
HOST = Identity.generate()
NOW = 1_700_000_000.0
R = ObjectRef
# plan IDs as a recording makes them (uuid hex), bound to tags named after what they hold
MODEL, X, Y = "a1" * 16, "b2" * 16, "c3" * 16
HOSTED = frozenset({"model", "x", "y", "other"})
LINEAGE = "model(x).argmax(1).eq(y).float().mean()"


def accuracy_steps() -> list[Action]:
    return [
        Action(op="torch.nn.Module.__call__", result="r0", target=R(MODEL), args=[R(X)],
               no_grad=True),
        Action(op="torch.Tensor.argmax", result="r1", target=R("r0"), args=[1]),
        Action(op="torch.Tensor.eq", result="r2", target=R("r1"), args=[R(Y)]),
        Action(op="torch.Tensor.float", result="r3", target=R("r2")),
        Action(op="torch.Tensor.mean", result="r4", target=R("r3")),
    ]  # fmt: skip


def program(steps: list[Action] | None = None, outputs: list[str] | None = None,
            inputs: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """A recorded plan in its wire form (what ``JobSpec.program`` holds)."""
    return {
        "name": "accuracy",
        "inputs": [MODEL, X, Y] if inputs is None else inputs,
        "outputs": ["r4"] if outputs is None else outputs,
        "steps": [to_wire(a) for a in (accuracy_steps() if steps is None else steps)],
    }


def make_signed(**changes: Any) -> SignedJob:
    fields: dict[str, Any] = dict(
        job_id="ab" * 16, client_id=SCIENTIST.id, host_id=HOST.id, program=program(),
        inputs={MODEL: "model", X: "x", Y: "y"}, outputs={"accuracy": "r4"},
        reason="test accuracy of my model", max_seconds=60.0, max_result_elements=10,
        max_result_bytes=1000, deadline=NOW + 3600, created_at=NOW, nonce=bytes(range(16)),
    )  # fmt: skip
    fields.update(changes)
    return JobSpec(**fields).sign(SCIENTIST)


def review(signed: SignedJob | None = None, *, allowlist: Allowlist = DEFAULT_ALLOWLIST,
           tags: frozenset[str] = HOSTED, **caps: Any) -> CodeReview:  # fmt: skip
    caps.setdefault("now", NOW)
    return review_code(signed or make_signed(), allowlist, tags, **caps)


# -- a job that can run -----------------------------------------------------------------------


def test_a_runnable_job_is_reviewed_whole() -> None:
    signed = make_signed()
    result = review(signed)
    assert result.ok and result.problems == ()
    assert result.job_id == "ab" * 16 and result.client_id == SCIENTIST.id
    assert result.host_id == HOST.id and result.job_hash == signed.hash()
    assert result.plan_name == "accuracy" and result.steps == 5
    assert result.reason == "test accuracy of my model"
    assert {k: (v.tag, v.hosted) for k, v in result.inputs.items()} == {
        MODEL: ("model", True),
        X: ("x", True),
        Y: ("y", True),
    }
    assert list(result.inputs) == [MODEL, X, Y]  # program order
    assert result.input_tags == {"model", "x", "y"}
    assert result.ops == (
        "torch.Tensor.argmax", "torch.Tensor.eq", "torch.Tensor.float", "torch.Tensor.mean",
        "torch.nn.Module.__call__",
    )  # fmt: skip
    assert (result.max_seconds, result.max_result_elements, result.max_result_bytes) == (
        60.0, 10, 1000
    )  # fmt: skip
    assert (result.deadline, result.created_at) == (NOW + 3600, NOW)


def test_outputs_show_their_lineage_like_live_requests() -> None:
    output = review().outputs["accuracy"]
    assert output.source == "r4"
    assert output.lineage == LINEAGE
    assert output.ops == (
        "torch.nn.Module.__call__", "torch.Tensor.argmax", "torch.Tensor.eq",
        "torch.Tensor.float", "torch.Tensor.mean",
    )  # fmt: skip


def test_lineage_renders_operators_attributes_indexing_and_odd_tags() -> None:
    steps = [
        Action(op="torch.Tensor.__add__", result="s0", target=R(X), args=[R(Y)]),
        Action(op="torch.Tensor.shape", result="s1", target=R("s0")),
        Action(op="torch.Tensor.topk", result="s2", target=R("s0"), args=[3]),
        Action(op=INDEX_OP, result="s3", target=R("s2"), args=[0]),
        Action(op="torch.Tensor.__getitem__", result="s4", target=R("s3"),
               args=[(slice(0, 2, None), Ellipsis)]),
    ]  # fmt: skip
    signed = make_signed(
        program=program(steps, outputs=["s1", "s4"], inputs=[X, Y]),
        inputs={X: "x", Y: "test labels"}, outputs={"shape": "s1", "top": "s4"},
    )  # fmt: skip
    result = review(signed, tags=HOSTED | {"test labels"})
    assert result.ok, result.problems
    assert result.outputs["shape"].lineage == "(x + data['test labels']).shape"
    assert result.outputs["top"].lineage == "(x + data['test labels']).topk(3).index(0)[0:2, ...]"
    assert INDEX_OP in result.ops


def test_review_resolves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a review must not look up or run any op")

    monkeypatch.setattr(Allowlist, "resolve", refuse)
    monkeypatch.setattr(Allowlist, "bind", refuse)
    assert review().ok


# -- problems ------------------------------------------------------------------------------


def test_an_op_off_the_allowlist_is_named() -> None:
    steps = accuracy_steps()
    steps[3] = Action(op="torch.save", result="r3", target=None, args=[R("r2"), "/tmp/x"])
    result = review(make_signed(program=program(steps)))
    assert not result.ok
    assert any("torch.save" in p and "allowlist" in p for p in result.problems)
    assert "torch.save" in result.ops
    # an op on the default list but not on this host's narrower one
    narrow = DEFAULT_ALLOWLIST.narrow(lambda entry: entry.path != "torch.Tensor.mean")
    problems = review(allowlist=narrow).problems
    assert len(problems) == 1 and "step 4 (torch.Tensor.mean)" in problems[0]


def test_an_unknown_tag_is_named() -> None:
    result = review(tags=frozenset({"model", "x"}))
    assert result.inputs[Y].hosted is False and result.inputs[X].hosted is True
    assert result.problems == (f"input {Y} is bound to 'y', which this host does not hold",)
    assert "y (NOT HOSTED)" in str(result)
    assert not review(tags=frozenset()).ok
    assert len(review(tags=frozenset()).problems) == 3


def test_outputs_and_references_no_step_makes() -> None:
    steps = accuracy_steps()
    steps[2] = Action(op="torch.Tensor.eq", result="r2", target=R("r1"), args=[R("ghost")])
    signed = make_signed(
        program=program(steps, outputs=["r4", "zz", "yy"]),
        outputs={"accuracy": "r4", "missing": "zz"},
    )  # fmt: skip
    problems = review(signed).problems
    assert any("ghost is neither a program input nor made by an earlier step" in p
               for p in problems)  # fmt: skip
    assert "output missing (zz) is made by no step" in problems
    assert "program output yy is made by no step" in problems
    assert review(signed).outputs["missing"].lineage == ""


def test_a_step_cannot_use_its_own_or_a_later_result() -> None:
    steps = accuracy_steps()
    steps[1] = Action(op="torch.Tensor.argmax", result="r1", target=R("r3"), args=[1])
    problems = review(make_signed(program=program(steps))).problems
    assert any("step 1" in p and "r3 is neither" in p for p in problems)


def test_forbidden_arguments_are_problems() -> None:
    steps = accuracy_steps()
    steps[4] = Action(op="torch.Tensor.mean", result="r4", target=R("r3"),
                      kwargs={"out": R("r2")})  # fmt: skip
    steps[3] = Action(op="torch.Tensor.float", result="r3", target=R("r2"),
                      kwargs={"device": "cuda"})  # fmt: skip
    problems = review(make_signed(program=program(steps))).problems
    assert any("'out' is not allowed" in p for p in problems)
    assert any("device='cpu'" in p for p in problems)


def test_limits_above_the_hosts_caps() -> None:
    assert review(max_seconds=60, max_result_elements=10, max_result_bytes=1000).ok
    problems = review(max_seconds=59.5, max_result_elements=9, max_result_bytes=999).problems
    assert problems == (
        "asks for 60 s of run time; this host allows at most 59.5 s",
        "asks for 10 result elements; this host allows at most 9",
        "asks for 1000 result bytes; this host allows at most 999",
    )
    with pytest.raises(TypeError):
        review(max_seconds=float("nan"))
    with pytest.raises(TypeError):
        review(max_result_bytes=True)
    with pytest.raises(TypeError):
        review(max_result_elements="10")


def test_a_passed_deadline() -> None:
    assert review(now=NOW + 3599).ok
    for now in (NOW + 3600, NOW + 10**6):
        (problem,) = review(now=now).problems
        assert problem.startswith("its deadline passed (2023-11-14 ")
    assert not review_code(make_signed(), DEFAULT_ALLOWLIST, HOSTED).ok  # the real clock


def test_a_signature_that_does_not_hold() -> None:
    signed = make_signed()
    forged = SignedJob(signed.spec, signed.public_key, bytes(64))
    assert any("signature does not hold" in p for p in review(forged).problems)
    other = Identity.generate()
    foreign = SignedJob(signed.spec, other.public_key, signed.signature)
    assert any("signature does not hold" in p for p in review(foreign).problems)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError):
        review_code(make_signed().spec, DEFAULT_ALLOWLIST, HOSTED)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        review_code(make_signed(), DEFAULT_ALLOWLIST.paths(), HOSTED)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        review_code(make_signed(), DEFAULT_ALLOWLIST, "x")


# -- the plan hash ---------------------------------------------------------------------------


def reversed_maps(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: reversed_maps(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reversed_maps(v) for v in value]
    return value


def test_plan_hash_is_the_program_alone() -> None:
    def new(prog: dict[str, Any], client: Identity = SCIENTIST, tag: str = "x") -> SignedJob:
        return JobSpec.new(
            client_id=client.id, host_id=HOST.id, program=prog,
            inputs={MODEL: "model", X: tag, Y: "y"}, outputs=["acc"], reason="again",
            max_seconds=30, max_result_elements=5, max_result_bytes=50, deadline=NOW + 99,
            created_at=NOW,
        ).sign(client)  # fmt: skip

    first, second = new(program()), new(reversed_maps(program()))
    other_client = Identity.generate()
    third = new(program(), other_client, tag="other")
    assert first.job_id != second.job_id and first.spec.nonce != second.spec.nonce
    assert len({first.hash(), second.hash(), third.hash(), make_signed().hash()}) == 4
    hashes = {review(s).plan_hash for s in (first, second, third, make_signed())}
    assert hashes == {plan_hash(program())}
    assert plan_hash(program()) == hashlib.sha256(canonical_bytes(program())).hexdigest()
    changed = program()
    changed["steps"][1]["args"] = [0]  # argmax(0) instead of argmax(1)
    assert review(make_signed(program=changed)).plan_hash != plan_hash(program())


# -- display --------------------------------------------------------------------------------


def test_scientist_text_is_made_printable() -> None:
    steps = accuracy_steps()
    steps[4] = Action(op="torch.Tensor.mean", result="r4", target=R("r3"),
                      kwargs={"dim\x1b]8;;http://evil\x07": 0})  # fmt: skip
    steps.append(Action(op="torch.\x1b[2Jevil\u202e", result="r5", target=R("r4")))
    signed = make_signed(
        program=program(steps, outputs=["r4", "r5"]),
        reason="please\x1b[31m approve\r\nme <script>alert(1)</script>",
        outputs={"accuracy": "r4", "other": "r5"},
    )  # fmt: skip
    result = review(signed)
    assert result.reason == "please approve me <script>alert(1)</script>"
    for text in (str(result), repr(result), *result.problems, *result.ops,
                 *(o.lineage for o in result.outputs.values())):  # fmt: skip
        assert text.isprintable() or "\n" in text
        assert "\x1b" not in text and "\u202e" not in text and "\r" not in text
    assert "torch.evil" in result.ops
    assert any("torch.evil is not on this host's allowlist" in p for p in result.problems)
    html = result._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_the_table() -> None:
    result = review()
    text = repr(result)
    assert text == str(result.table())
    assert f"Job {result.job_id} from {SCIENTIST.id} (can run)" in text
    assert LINEAGE in text and result.plan_hash in text and "x (hosted)" in text
    assert "Problem" not in text
    assert "(cannot run)" in str(review(tags=frozenset()))
    assert "Problem" in str(review(tags=frozenset()))


# -- hostile programs stay cheap -----------------------------------------------------------


def test_long_and_wide_programs_are_rendered_cheaply() -> None:
    chain = [Action(op="torch.Tensor.float", result="q0", target=R(X))]
    chain += [Action(op="torch.Tensor.float", result=f"q{i}", target=R(f"q{i - 1}"))
              for i in range(1, 999)]  # fmt: skip
    nested: Any = [R("q998")] * 16  # 16384 names of a 2000-character expression
    for _ in range(5):
        nested = [nested] * 4
    chain.append(Action(op="torch.stack", result="w", args=[nested]))
    signed = make_signed(
        program=program(chain, outputs=["q998", "w"], inputs=[X]), inputs={X: "x"},
        outputs={"deep": "q998", "wide": "w"},
    )  # fmt: skip
    started = time.monotonic()
    result = review(signed)
    assert time.monotonic() - started < 5
    assert result.ok, result.problems[:3]
    assert len(result.outputs["deep"].lineage) <= 2000
    assert result.outputs["deep"].lineage.startswith("x.float().float()")
    assert result.outputs["wide"].lineage.startswith("torch.stack([[[[[[obj_q998, obj_q998")
    assert len(result.outputs["deep"].ops) == 200  # as live: the most recent ops


def test_the_review_does_not_change_the_job() -> None:
    signed = make_signed()
    before = copy.deepcopy(signed.spec.program)
    review(signed)
    assert signed.spec.program == before
    signed.verify()


def test_problems_are_capped() -> None:
    steps = [Action(op="torch.Tensor.float", result="p0", target=R(X))]
    steps += [Action(op=f"torch.bad{i}", result=f"p{i}", target=R(f"p{i - 1}"))
              for i in range(1, 150)]  # fmt: skip
    signed = make_signed(program=program(steps, outputs=["p149"], inputs=[X]),
                         inputs={X: "x"}, outputs={"out": "p149"})  # fmt: skip
    problems = review(signed).problems
    assert len(problems) == 101 and problems[-1] == "... and 49 more problems"
    assert "torch.bad1 is not on this host's allowlist" in problems[0]
