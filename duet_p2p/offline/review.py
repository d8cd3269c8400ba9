"""What the owner reads before a job runs: its code, its data, its outputs, and why it cannot run.

:func:`review_code` reads a signed job against the host's allowlist and hosted datasets and
never executes anything. Each declared output is shown as the expression that makes it,
rendered like a live request's lineage (``model(x).argmax(1).eq(y).float().mean()``), with
each program input named after the dataset it is bound to. ``problems`` lists every reason
the job cannot run (an op off the allowlist, a tag the host does not hold, an output no
step makes, limits above the host's caps, a passed deadline); a review with problems is
never auto-approved (``duet_p2p.offline.policy``).

``plan_hash`` is the SHA-256 of the canonical program alone (no inputs, limits or IDs), so
an owner can approve a plan once and let later jobs running the same code through.
All text a scientist chose is made printable here.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from duet_p2p import lineage
from duet_p2p.allowlist import Allowlist
from duet_p2p.errors import DuetError
from duet_p2p.offline.spec import InvalidJob, SignedJob, canonical_bytes
from duet_p2p.owner.monitor import FORBIDDEN_KWARGS
from duet_p2p.rpc.messages import Action
from duet_p2p.rpc.ops import INDEX_OP
from duet_p2p.rpc.plan_spec import parse_plan
from duet_p2p.rpc.refs import action_refs
from duet_p2p.table import Table, TableView
from duet_p2p.text import printable

__all__ = ["CodeReview", "ReviewInput", "ReviewOutput", "plan_hash", "review_code"]

MAX_REASON_CHARS = 4000
MAX_OP_CHARS = 200
MAX_TAG_CHARS = 200
MAX_NAME_CHARS = 64
MAX_NAMED_REFS = 64
"""A step naming more objects than this shows them by short names (rendering stays cheap)."""
MAX_PROBLEMS = 100
"""Problems listed in full; any more are counted in one last line."""


class ReviewInput(NamedTuple):
    """A program input: the dataset tag it is bound to, and whether this host holds it."""

    name: str
    tag: str
    hosted: bool


class ReviewOutput(NamedTuple):
    """A released output: the program output it names and how that value is made."""

    name: str
    source: str
    """The program output ID."""
    lineage: str
    """The expression that makes it, e.g. ``model(x).argmax(1).eq(y).float().mean()``."""
    ops: tuple[str, ...]
    """The ops on its lineage, oldest first (at most ``lineage.MAX_OPS``), as in live requests."""


@dataclass(frozen=True, eq=False, repr=False)
class CodeReview(TableView):
    """A job as its owner reviews it (all text printable). ``ok``: no problems."""

    job_id: str
    client_id: str
    host_id: str
    job_hash: str
    plan_hash: str
    plan_name: str
    steps: int
    reason: str
    inputs: Mapping[str, ReviewInput]
    """Program input ID -> its binding, in program order."""
    outputs: Mapping[str, ReviewOutput]
    """Released name -> the output."""
    ops: tuple[str, ...]
    """Every distinct op path the program uses, sorted."""
    max_seconds: float
    max_result_elements: int
    max_result_bytes: int
    deadline: float
    created_at: float
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def input_tags(self) -> frozenset[str]:
        """The dataset tags the job's inputs are bound to."""
        return frozenset(item.tag for item in self.inputs.values())

    def table(self) -> Table:
        rows: list[tuple[str, str]] = [
            ("Job ID", self.job_id),
            ("Client ID", self.client_id),
            ("Job hash", self.job_hash),
            ("Plan hash", self.plan_hash),
            ("Plan", f"{self.plan_name} ({self.steps} steps)"),
            ("Reason", self.reason),
        ]
        for problem in self.problems:
            rows.append(("Problem", problem))
        for item in self.inputs.values():
            where = "hosted" if item.hosted else "NOT HOSTED"
            rows.append((f"Input {item.name}", f"{item.tag} ({where})"))
        for output in self.outputs.values():
            rows.append((f"Output {output.name}", output.lineage or "(made by no step)"))
        rows += [
            ("Ops", ", ".join(self.ops)),
            (
                "Limits",
                f"{self.max_seconds:g} s, {self.max_result_elements} elements, "
                f"{self.max_result_bytes} bytes",
            ),  # fmt: skip
            ("Created", _when(self.created_at)),
            ("Deadline", _when(self.deadline)),
        ]
        status = "cannot run" if self.problems else "can run"
        title = f"Job {self.job_id} from {self.client_id} ({status})"
        return Table(["Field", "Value"], rows, title, index=False,
                     max_cell_chars=lineage.MAX_EXPRESSION_CHARS)  # fmt: skip


def plan_hash(program: Mapping[str, Any]) -> str:
    """SHA-256 hex of a program's canonical bytes (what ``approve_plans`` lists)."""
    return hashlib.sha256(canonical_bytes(dict(program))).hexdigest()


def review_code(
    signed_job: SignedJob,
    allowlist: Allowlist,
    dataset_tags: Collection[str],
    *,
    max_seconds: float | None = None,
    max_result_elements: int | None = None,
    max_result_bytes: int | None = None,
    now: float | None = None,
) -> CodeReview:
    """Review ``signed_job`` for this host: ``dataset_tags`` are the tags it may bind
    inputs to; the ``max_*`` arguments are the host's caps (None: no cap); ``now``
    defaults to the clock. Reads only; never runs anything."""
    if not isinstance(signed_job, SignedJob):
        raise TypeError("review_code reviews a SignedJob")
    if not isinstance(allowlist, Allowlist):
        raise TypeError("review_code needs the host's Allowlist")
    if isinstance(dataset_tags, str | bytes):
        raise TypeError("dataset_tags is a collection of tags, not one string")
    hosted = frozenset(tag for tag in dataset_tags if isinstance(tag, str))
    caps = (_cap(max_seconds, "max_seconds"), _cap(max_result_elements, "max_result_elements"),
            _cap(max_result_bytes, "max_result_bytes"))  # fmt: skip
    now = time.time() if now is None else _cap(now, "now")
    spec = signed_job.spec
    problems: list[str] = []
    try:
        signed_job.verify()
    except InvalidJob as exc:
        problems.append(f"the job's signature does not hold ({printable(str(exc), 200)})")
    program = spec.program
    inputs: dict[str, ReviewInput] = {}
    for input_id in program["inputs"]:
        tag = spec.inputs[input_id]
        inputs[input_id] = ReviewInput(input_id, printable(tag, MAX_TAG_CHARS), tag in hosted)
    for item in inputs.values():
        if not item.hosted:
            problems.append(f"input {item.name} is bound to {item.tag!r}, "
                            "which this host does not hold")  # fmt: skip
    try:
        steps = parse_plan([program["name"], program["inputs"], program["outputs"],
                            program["steps"]]).steps  # fmt: skip
    except DuetError as exc:  # the spec checked it already: only a bug gets here
        problems.append(f"the program is not a plan: {printable(str(exc), 200)}")
        steps = ()
    made = _Lineage(inputs)
    ops: set[str] = set()
    for number, step in enumerate(steps):
        ops.add(printable(step.op, MAX_OP_CHARS))
        problems += _step_problems(number, step, allowlist, made)
        made.add(step, allowlist)
    outputs: dict[str, ReviewOutput] = {}
    for name, source in spec.outputs.items():
        if not made.by_step(source):
            problems.append(f"output {name} ({source}) is made by no step")
        outputs[name] = ReviewOutput(name, source, *made.get(source))
    released = set(spec.outputs.values())
    for source in program["outputs"]:
        if source not in inputs and source not in released and not made.by_step(source):
            problems.append(f"program output {source} is made by no step")
    problems += _limit_problems(spec, *caps)
    if not spec.deadline > now:
        problems.append(f"its deadline passed ({_when(spec.deadline)})")
    if len(problems) > MAX_PROBLEMS:
        problems[MAX_PROBLEMS:] = [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
    return CodeReview(
        job_id=spec.job_id, client_id=spec.client_id, host_id=spec.host_id,
        job_hash=signed_job.hash(), plan_hash=plan_hash(program),
        plan_name=printable(program["name"], MAX_NAME_CHARS), steps=len(program["steps"]),
        reason=printable(spec.reason, MAX_REASON_CHARS), inputs=MappingProxyType(inputs),
        outputs=MappingProxyType(outputs), ops=tuple(sorted(ops)),
        max_seconds=spec.max_seconds, max_result_elements=spec.max_result_elements,
        max_result_bytes=spec.max_result_bytes, deadline=spec.deadline,
        created_at=spec.created_at, problems=tuple(problems),
    )  # fmt: skip


# -- lineage -----------------------------------------------------------------------------


class _Lineage:
    """The expression and ops of every value the program has made so far."""

    def __init__(self, inputs: Mapping[str, ReviewInput]) -> None:
        self.short: dict[str, str] = {i: _input_name(item.tag, i) for i, item in inputs.items()}
        self.expressions: dict[str, str] = dict(self.short)
        self.ops: dict[str, tuple[str, ...]] = {i: () for i in inputs}
        self.inputs = frozenset(inputs)

    def known(self, object_id: str) -> bool:
        return object_id in self.expressions

    def by_step(self, object_id: str) -> bool:
        return object_id not in self.inputs and object_id in self.expressions

    def get(self, object_id: str) -> tuple[str, tuple[str, ...]]:
        """(expression, ops) of a value a step made; ("", ()) for anything else."""
        if not self.by_step(object_id):
            return "", ()
        return self.expressions[object_id], self.ops[object_id]

    def add(self, step: Action, allowlist: Allowlist) -> None:
        refs = action_refs(step)
        table = self.expressions if len(refs) <= MAX_NAMED_REFS else self.short
        names = {ref.id: table.get(ref.id) or _unknown(ref.id) for ref in refs}
        attribute = step.op in allowlist and allowlist.get(step.op).attribute
        text = lineage.render_call(step.op, step.target, step.args, step.kwargs, names,
                                   attribute=attribute)  # fmt: skip
        text = printable(text, lineage.MAX_EXPRESSION_CHARS)
        self.expressions[step.result] = text
        self.short[step.result] = _unknown(step.result)
        self.ops[step.result] = lineage.merge_ops(
            *(self.ops.get(ref.id, ()) for ref in refs), (printable(step.op, MAX_OP_CHARS),)
        )


def _input_name(tag: str, input_id: str) -> str:
    """How an input shows in expressions: its dataset tag when that is an identifier."""
    if tag.isidentifier() and tag.isascii():
        return tag
    return f"data[{printable(repr(tag), 60)}]" if tag else _unknown(input_id)


def _unknown(object_id: str) -> str:
    return f"obj_{printable(object_id[:8], 8)}"


# -- problems ------------------------------------------------------------------------------


def _step_problems(number: int, step: Action, allowlist: Allowlist, made: _Lineage) -> list[str]:
    op = printable(step.op, MAX_OP_CHARS)
    where = f"step {number} ({op})"
    found: list[str] = []
    if step.op != INDEX_OP and step.op not in allowlist:
        found.append(f"{where}: op {op} is not on this host's allowlist")
    for name, value in step.kwargs.items():
        shown = printable(name, 64)
        if name in FORBIDDEN_KWARGS:
            found.append(f"{where}: the argument {shown!r} is not allowed")
        elif name == "device" and value not in (None, "cpu"):
            found.append(f"{where}: only device='cpu' is allowed")
    missing = sorted({ref.id for ref in action_refs(step) if not made.known(ref.id)})
    for object_id in missing[:4]:
        found.append(f"{where}: {printable(object_id, 64)} is neither a program input "
                     "nor made by an earlier step")  # fmt: skip
    if len(missing) > 4:
        found.append(f"{where}: and {len(missing) - 4} more unknown objects")
    return found


def _limit_problems(
    spec: Any, seconds: float | None, elements: int | None, nbytes: int | None
) -> list[str]:
    found = []
    if seconds is not None and not spec.max_seconds <= seconds:
        found.append(f"asks for {spec.max_seconds:g} s of run time; this host allows at most "
                     f"{seconds:g} s")  # fmt: skip
    if elements is not None and not spec.max_result_elements <= elements:
        found.append(f"asks for {spec.max_result_elements} result elements; this host allows "
                     f"at most {elements}")  # fmt: skip
    if nbytes is not None and not spec.max_result_bytes <= nbytes:
        found.append(f"asks for {spec.max_result_bytes} result bytes; this host allows at most "
                     f"{nbytes}")  # fmt: skip
    return found


def _cap(value: Any, what: str) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"{what} must be a number or None")
    return value


def _when(timestamp: float) -> str:
    if not math.isfinite(timestamp):
        return "?"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
    except (OverflowError, OSError, ValueError):
        return f"{timestamp:.0f}"
