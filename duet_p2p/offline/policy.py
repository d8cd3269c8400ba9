"""The owner's standing rules for jobs: which code runs without asking, which outputs go out.

Code: :func:`decide_code` auto-approves a reviewed job when its scientist is in
``approve_clients``, its plan in ``approve_plans``, or every op it uses in ``approve_ops``;
and, when ``max_seconds`` is set, only when the job asks for at most that run time. A
review with problems is never approved: :func:`auto_reject_reason` names its first problem.

Outputs: :func:`decide_output` releases a finished output only when a :class:`ReleaseRule`
matches it and no disclosure check fired; a rule's criteria are those of the live
handlers (``duet_p2p.permissions.policy.Handler``, whose matching it reuses) plus the
output names it covers. A failed output, an unknown size and anything else unsure is left
to the owner.

:func:`job_policy_from_dict` reads the ``[jobs]`` table of a host.toml; every error is a
ConfigurationError naming the field, and unknown keys are refused.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from duet_p2p.allowlist import check_path_syntax
from duet_p2p.errors import ConfigurationError, OperationNotAllowed
from duet_p2p.permissions.policy import Handler
from duet_p2p.rpc.ops import INDEX_OP
from duet_p2p.text import printable

if TYPE_CHECKING:  # review imports torch; reading a host.toml must not
    from duet_p2p.offline.review import CodeReview

__all__ = [
    "JobPolicy", "OutputFacts", "ReleaseRule", "auto_reject_reason", "decide_code",
    "decide_output", "job_policy_from_dict", "output_facts",
]  # fmt: skip

MAX_ITEMS = 10_000
"""Entries in one list of the policy."""
MAX_RULES = 1000
MAX_TAG_CHARS = 200
MAX_CHECKS = 100
_CLIENT_ID = re.compile(r"[0-9a-f]{32}")
_PLAN_HASH = re.compile(r"[0-9a-f]{64}")
_OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_POLICY_KEYS = ("approve_clients", "approve_plans", "approve_ops", "max_seconds", "release")
_RULE_KEYS = ("name", "outputs", "tags", "op", "max_elements", "min_aggregation")


# -- code ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseRule:
    """Auto-release an output when every criterion that is set holds (see Handler)."""

    name: str | None = None
    outputs: frozenset[str] | None = None
    """The released names it covers (None: any)."""
    tags: frozenset[str] | None = None
    """The job's input tags must include all of these."""
    op: str | None = None
    """The output's name (``mean``) or the last op on its lineage (``torch.Tensor.mean``)."""
    max_elements: int | None = None
    min_aggregation: float | None = None
    """In place of the host's minimum aggregation (as a handler's own)."""

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.name is not None:
            put(self, "name", _text(self.name, "name", 100))
        if self.outputs is not None:
            put(self, "outputs", _names(self.outputs, "outputs", _OUTPUT_NAME, "output names"))
        if self.tags is not None:
            put(self, "tags", _tags(self.tags, "tags"))
        if self.op is not None:
            put(self, "op", _text(self.op, "op", 200))
        if self.max_elements is not None:
            value = self.max_elements
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError("max_elements: must be an integer >= 0 or None")
        if self.min_aggregation is not None:
            put(self, "min_aggregation", _number(self.min_aggregation, "min_aggregation", 1))

    def handler(self) -> Handler:
        """The live handler these criteria amount to (exact releases only)."""
        return Handler(
            action="accept", name=self.name, tags=self.tags, op=self.op,
            max_elements=self.max_elements, min_aggregation=self.min_aggregation, dp=False,
        )  # fmt: skip

    def summary(self) -> str:
        """Its name, or its criteria: ``outputs=[accuracy] max_elements=1``."""
        if self.name:
            return self.name
        parts = [f"{key}=[{', '.join(sorted(values))}]"
                 for key, values in (("outputs", self.outputs), ("tags", self.tags))
                 if values is not None]  # fmt: skip
        for key in ("op", "max_elements", "min_aggregation"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
        return " ".join(parts) or "any output"


@dataclass(frozen=True)
class JobPolicy:
    """What the host decides for the owner (empty: the owner decides everything)."""

    approve_clients: frozenset[str] = frozenset()
    """Client IDs whose jobs are auto-approved."""
    approve_plans: frozenset[str] = frozenset()
    """Plan hashes (``CodeReview.plan_hash``) auto-approved whoever sends them."""
    approve_ops: frozenset[str] | None = None
    """Auto-approve a job when every op it uses is in this set (``duet.index`` always is)."""
    max_seconds: float | None = None
    """Auto-approve only jobs asking for at most this run time."""
    release: tuple[ReleaseRule, ...] = field(default=())
    """Output release rules, in order."""

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "approve_clients", _names(self.approve_clients, "approve_clients", _CLIENT_ID,
                                            "Client IDs (32 lower-case hex digits)"))  # fmt: skip
        put(self, "approve_plans", _names(self.approve_plans, "approve_plans", _PLAN_HASH,
                                          "plan hashes (64 lower-case hex digits)"))  # fmt: skip
        if self.approve_ops is not None:
            ops = _collection(self.approve_ops, "approve_ops")
            for op in ops:
                try:
                    check_path_syntax(op)
                except OperationNotAllowed:
                    raise ConfigurationError(f"approve_ops: {_short(op)} is not an op path "
                                             "(torch.<name>...)") from None  # fmt: skip
            put(self, "approve_ops", frozenset(ops))
        if self.max_seconds is not None:
            put(self, "max_seconds", _number(self.max_seconds, "max_seconds", 0, above=True))
        rules = self.release
        if isinstance(rules, ReleaseRule) or not isinstance(rules, Iterable):
            raise ConfigurationError("release: must be a sequence of ReleaseRule")
        rules = tuple(rules)
        if len(rules) > MAX_RULES or not all(isinstance(r, ReleaseRule) for r in rules):
            raise ConfigurationError(f"release: must be at most {MAX_RULES} ReleaseRule")
        put(self, "release", rules)


def auto_reject_reason(review: CodeReview) -> str | None:
    """Why a job must be rejected (its first problem), or None when it can run."""
    from duet_p2p.offline.review import CodeReview

    if not isinstance(review, CodeReview):
        raise TypeError("auto_reject_reason reads a CodeReview")
    if not review.problems:
        return None
    more = len(review.problems) - 1
    return f"cannot run: {review.problems[0]}" + (f" (and {more} more)" if more else "")


def decide_code(review: CodeReview, policy: JobPolicy) -> tuple[bool, str]:
    """(auto-approve?, why). Never approves a review with problems; unmatched: the owner
    decides."""
    from duet_p2p.offline.review import CodeReview

    if not isinstance(review, CodeReview) or not isinstance(policy, JobPolicy):
        raise TypeError("decide_code reads a CodeReview and a JobPolicy")
    rejected = auto_reject_reason(review)
    if rejected is not None:
        return False, rejected
    if policy.max_seconds is not None and not review.max_seconds <= policy.max_seconds:
        return False, (f"asks for {review.max_seconds:g} s, above the {policy.max_seconds:g} s "
                       "auto-approved jobs may run: the owner decides")  # fmt: skip
    if review.client_id in policy.approve_clients:
        return True, f"client {review.client_id} is approved (approve_clients)"
    if review.plan_hash in policy.approve_plans:
        return True, f"plan {review.plan_hash} is approved (approve_plans)"
    if policy.approve_ops is not None:
        outside = sorted(set(review.ops) - policy.approve_ops - {INDEX_OP})
        if not outside:
            return True, "every op it uses is approved (approve_ops)"
        return False, (f"uses {len(outside)} op(s) outside approve_ops, e.g. {outside[0]}: "
                       "the owner decides")  # fmt: skip
    return False, "no auto-approve rule matches: the owner decides"


# -- outputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputFacts:
    """What the host measured of one finished output (never its value)."""

    job_id: str
    client_id: str
    output: str
    """The released name."""
    lineage: str
    ops: tuple[str, ...]
    tags: Collection[str]
    """The tags of the datasets the job's inputs are bound to (names and tags); kept as a
    frozenset."""
    elements: float
    """Elements it holds (``math.inf``: not countable; then the owner decides)."""
    size_bytes: int
    aggregation: float
    """Records each value summarises, as the monitor counted them."""
    checks: tuple[str, ...] = ()
    """Disclosure checks that fired (``duet_p2p.permissions.disclosure``)."""
    error: str | None = None
    """Set when computing it failed."""
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        put = object.__setattr__
        for name in ("job_id", "client_id", "output", "lineage"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string")
        put(self, "ops", tuple(self.ops))
        if not all(isinstance(op, str) for op in self.ops):
            raise TypeError("ops must be strings")
        if isinstance(self.tags, str) or not isinstance(self.tags, Iterable):
            raise TypeError("tags must be a collection of strings")
        put(self, "tags", frozenset(self.tags))
        if not all(isinstance(tag, str) for tag in self.tags):
            raise TypeError("tags must be strings")
        put(self, "checks", tuple(self.checks))
        if not all(isinstance(c, str) for c in self.checks):
            raise TypeError("checks must be strings")
        for name in ("elements", "aggregation", "finished_at"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number")
        size = self.size_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TypeError("size_bytes must be an integer >= 0")
        if self.error is not None and not isinstance(self.error, str):
            raise TypeError("error must be a string or None")


def output_facts(
    review: CodeReview,
    output: str,
    *,
    elements: float,
    size_bytes: int,
    aggregation: float,
    checks: Iterable[str] = (),
    error: str | None = None,
    tags: Collection[str] | None = None,
    finished_at: float | None = None,
) -> OutputFacts:
    """Facts of ``review``'s output ``output`` with what the run measured; ``tags`` default
    to the tags its inputs are bound to (pass the bound datasets' names and tags)."""
    item = review.outputs[output]
    return OutputFacts(
        job_id=review.job_id, client_id=review.client_id, output=item.name,
        lineage=item.lineage, ops=item.ops,
        tags=review.input_tags if tags is None else tags, elements=elements,
        size_bytes=size_bytes, aggregation=aggregation, checks=tuple(checks), error=error,
        finished_at=time.time() if finished_at is None else finished_at,
    )  # fmt: skip


@dataclass
class _RequestView:
    """OutputFacts as the live handlers read a request (``permissions.facts.RequestFacts``)."""

    request_id: str
    object_id: str
    name: str
    reason: str
    lineage: str
    ops: tuple[str, ...]
    tags: frozenset[str]
    size_bytes: int
    elements: int
    aggregation: float
    requested_at: float
    requester: str
    status: Any = None
    decided_by: str | None = None
    decision_reason: str = ""
    dp: Any = None
    checks: tuple[str, ...] = ()
    error: str | None = None


def _as_request(facts: OutputFacts) -> _RequestView:
    from duet_p2p.lineage import name_of

    return _RequestView(
        request_id=f"{facts.job_id}/{facts.output}", object_id=facts.output,
        name=name_of(facts.ops), reason="", lineage=facts.lineage, ops=facts.ops,
        tags=facts.tags, size_bytes=facts.size_bytes, elements=math.ceil(facts.elements),
        aggregation=float(facts.aggregation), requested_at=facts.finished_at,
        requester=facts.client_id, checks=facts.checks, error=facts.error,
    )  # fmt: skip


RULE_MIN_AGGREGATION = 2.0
"""The least records each released value summarises under a release rule that sets no
``min_aggregation`` of its own (when the host's minimum is lower)."""


def decide_output(
    facts: OutputFacts, rules: Iterable[ReleaseRule], *, min_aggregation: float = 1.0
) -> tuple[bool, str]:
    """(auto-release?, why): the first rule that matches releases it, when no disclosure
    check fired and nothing about it is unsure; else the owner decides.
    ``min_aggregation``: the host's minimum, for rules that set none."""
    if not isinstance(facts, OutputFacts):
        raise TypeError("decide_output reads OutputFacts")
    rules = tuple(rules)
    if not all(isinstance(rule, ReleaseRule) for rule in rules):
        raise TypeError("rules must be ReleaseRule")
    floor = _number(min_aggregation, "min_aggregation", 1)
    if facts.error is not None:
        return False, "computing it failed: the owner decides"
    if facts.checks:
        shown = "; ".join(printable(check, 200) for check in facts.checks[:MAX_CHECKS])
        return False, f"disclosure checks fired ({shown}): the owner decides"
    if not math.isfinite(facts.elements) or facts.elements < 0 or facts.size_bytes < 0:
        return False, "its size is not known: the owner decides"
    if math.isnan(facts.aggregation):
        return False, "its aggregation is not known: the owner decides"
    request = _as_request(facts)
    for rule in rules:
        if rule.outputs is not None and facts.output not in rule.outputs:
            continue
        # A rule that names no minimum never releases a value of a single record: raw rows
        # copied out a few at a time, job after job. Saying min_aggregation=1 opts in.
        least = floor if rule.min_aggregation is not None else max(floor, RULE_MIN_AGGREGATION)
        if rule.handler().matches(request, request.requested_at, min_aggregation=least):
            return True, f"release rule {printable(rule.summary(), 200)} matched"
    return False, "no release rule matches: the owner decides"


# -- host.toml --------------------------------------------------------------------------


def job_policy_from_dict(data: object, where: str = "jobs") -> JobPolicy:
    """A ``[jobs]`` table (parsed TOML) as a JobPolicy; ConfigurationError naming the field
    (``where.field``) for an unknown key, a wrong type or a value out of range."""
    table = _Reader(where, data, _POLICY_KEYS)
    clients = table.strings("approve_clients", _CLIENT_ID, "a Client ID (32 hex digits)",
                            fold=True)  # fmt: skip
    plans = table.strings("approve_plans", _PLAN_HASH, "a plan hash (64 hex digits)", fold=True)
    ops = table.strings("approve_ops", None, "")
    if ops is not None:
        for index, op in enumerate(ops):
            try:
                check_path_syntax(op)
            except OperationNotAllowed:
                table.fail(f"approve_ops[{index}]", f"{_short(op)} is not an op path")
    seconds = table.number("max_seconds", low=0, above=True)
    rules = []
    for index, item in enumerate(table.tables("release")):
        rule = _Reader(f"{table.where('release')}[{index}]", item, _RULE_KEYS)
        rules.append(rule.build(
            ReleaseRule,
            name=rule.text("name", 100),
            outputs=rule.strings("outputs", _OUTPUT_NAME, "an output name (an identifier)"),
            tags=rule.strings("tags", None, "", max_chars=MAX_TAG_CHARS),
            op=rule.text("op", 200),
            max_elements=rule.integer("max_elements", low=0),
            min_aggregation=rule.number("min_aggregation", low=1),
        ))  # fmt: skip
    return table.build(
        JobPolicy, approve_clients=frozenset(clients or ()), approve_plans=frozenset(plans or ()),
        approve_ops=None if ops is None else frozenset(ops), max_seconds=seconds,
        release=tuple(rules),
    )  # fmt: skip


class _Reader:
    """One table of the policy, read field by field; errors name ``where.field``."""

    def __init__(self, where: str, data: object, known: tuple[str, ...]) -> None:
        self.path = where
        if not isinstance(data, dict):
            raise ConfigurationError(f"{where}: must be a table")
        self.data: dict[str, Any] = data
        for key in data:
            if key not in known:
                self.fail(str(key)[:64], f"unknown key; expected one of: {', '.join(known)}")

    def where(self, key: str) -> str:
        return f"{self.path}.{key}"

    def fail(self, key: str, message: str) -> Any:
        raise ConfigurationError(f"{self.where(printable(key, 80))}: {message}")

    def build(self, kind: type, **values: Any) -> Any:
        try:
            return kind(**values)
        except ConfigurationError as exc:  # "field: message" from the class's own checks
            raise ConfigurationError(f"{self.path}.{exc}") from None

    def text(self, key: str, max_chars: int) -> str | None:
        value = self.data.get(key)
        if key in self.data and not _printable_text(value, max_chars):
            self.fail(key, f"must be printable text of 1 to {max_chars} characters")
        return value

    def strings(
        self,
        key: str,
        pattern: re.Pattern[str] | None,
        hint: str,
        *,
        max_chars: int = 200,
        fold: bool = False,
    ) -> tuple[str, ...] | None:
        """A list of distinct strings (``fold``: hex, compared and returned lower-case)."""
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, list) or not 0 < len(value) <= MAX_ITEMS:
            self.fail(key, f"must be a list of 1 to {MAX_ITEMS} strings")
        for index, item in enumerate(value):
            if not _printable_text(item, max_chars):
                self.fail(f"{key}[{index}]", f"must be printable text of 1 to {max_chars} "
                          "characters")  # fmt: skip
        items = [item.lower() if fold else item for item in value]
        for index, item in enumerate(items):
            if pattern is not None and not pattern.fullmatch(item):
                self.fail(f"{key}[{index}]", f"{_short(item)} is not {hint}")
        if len(set(items)) != len(items):
            self.fail(key, "has duplicates")
        return tuple(items)

    def integer(self, key: str, *, low: int) -> int | None:
        value = self.data.get(key)
        if key in self.data and (
            isinstance(value, bool) or not isinstance(value, int) or value < low
        ):
            self.fail(key, f"must be an integer >= {low}, not {_short(value)}")
        return value

    def number(self, key: str, *, low: float, above: bool = False) -> float | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"must be a number, not {_short(value)}")
        if not math.isfinite(value) or not (value > low if above else value >= low):
            self.fail(key, f"must be {'>' if above else '>='} {low:g}, not {value}")
        return float(value)

    def tables(self, key: str) -> list[Any]:
        items = self.data.get(key, [])
        if not isinstance(items, list) or len(items) > MAX_RULES:
            self.fail(key, f"must be an array of at most {MAX_RULES} tables ([[{self.path}."
                           f"{key}]])")  # fmt: skip
        return items


# -- values ------------------------------------------------------------------------------


def _printable_text(value: object, max_chars: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= max_chars and value.isprintable()


def _collection(value: object, what: str) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigurationError(f"{what}: must be a collection of strings, not one string")
    items = list(value)
    if len(items) > MAX_ITEMS or not all(isinstance(item, str) for item in items):
        raise ConfigurationError(f"{what}: must be at most {MAX_ITEMS} strings")
    return items


def _names(value: object, what: str, pattern: re.Pattern[str], hint: str) -> frozenset[str]:
    items = _collection(value, what)
    for item in items:
        if not pattern.fullmatch(item):
            raise ConfigurationError(f"{what}: {_short(item)} is not one of the {hint}")
    return frozenset(items)


def _tags(value: object, what: str) -> frozenset[str]:
    items = _collection(value, what)
    if not all(_printable_text(item, MAX_TAG_CHARS) for item in items):
        raise ConfigurationError(f"{what}: tags are printable text of 1 to {MAX_TAG_CHARS} "
                                 "characters")  # fmt: skip
    return frozenset(items)


def _text(value: object, what: str, max_chars: int) -> str:
    if not _printable_text(value, max_chars):
        raise ConfigurationError(f"{what}: must be printable text of 1 to {max_chars} characters")
    return value  # type: ignore[return-value]


def _number(value: object, what: str, low: float, *, above: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not ok or not math.isfinite(value) or not (value > low if above else value >= low):  # type: ignore[arg-type]
        raise ConfigurationError(f"{what}: must be a number {'>' if above else '>='} {low:g}")
    return float(value)  # type: ignore[arg-type]


def _short(value: object) -> str:
    return printable(repr(value), 60)
