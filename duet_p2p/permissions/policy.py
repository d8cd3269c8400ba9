"""Handlers: the owner's rules that decide requests without the owner at the keyboard.

Handlers are evaluated in order and the first that matches decides. Everything a handler
looks at was computed by the owner's own process: ``request.name``, ``ops`` and ``tags``
come from the lineage the owner recorded while running the peer's actions, never from
text the scientist sent, so a scientist cannot forge a name to slip past a rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from duet_p2p.permissions.facts import RequestFacts
from duet_p2p.table import Table, TableView

Action = Literal["accept", "deny"]
ACTIONS: tuple[str, ...] = ("accept", "deny")
MAX_DECIDABLE_TAGS = 10_000
"""A request deriving from more tagged objects than this is left to the owner: tag sets are
never cut short, so no rule decides on a set it would have to read only in part."""


@dataclass(eq=False)
class Handler:
    """One auto-decision rule; every criterion that is set must hold for it to match."""

    action: Action
    """What to do with a matching request."""
    tags: frozenset[str] | None = None
    """Matches when the request derives from objects carrying ALL of these tags.
    A result that also derives from other objects still matches: to keep a tag's data
    in, prefer a ``deny`` handler on that tag ahead of broader accept handlers."""
    op: str | None = None
    """Matches ``request.name`` (e.g. ``"sum"``) or the request's last op path (e.g.
    ``"torch.Tensor.item"``): the op that produced the released value, never an earlier one."""
    max_elements: int | None = None
    """Matches when the released value has at most this many elements."""
    max_requests: int | None = None
    """Quota: after this many matches the handler stops matching."""
    timeout_secs: float | None = None
    """Applies only once a request has been pending this long (the owner gets first say)."""
    print_local: bool = False
    """On accept, the session prints the released value owner-side."""
    log_local: bool = False
    """On accept, the session logs the released value owner-side."""
    name: str | None = None
    reason: str = ""
    """Sent to the scientist when this handler denies."""
    min_aggregation: float | None = None
    """This accept handler's own minimum aggregation, in place of the session's. The session
    counts only aggregations it is certain of (a sum or mean over the owner's records); a
    model's accuracy on a test set counts as one record, so an owner who releases such a
    value by its op and tags says so here, e.g. ``min_aggregation=1``."""
    dp: bool | None = None
    """True: matches only differentially private releases (the budget ledger has already
    reserved their cost); False: only exact releases; None: either."""
    max_epsilon: float | None = None
    """Matches a DP release of at most this epsilon (implies ``dp=True``)."""
    max_delta: float | None = None
    """Matches a DP release of at most this delta (implies ``dp=True``)."""
    ignore_disclosure_checks: bool = False
    """Accept an exact release even when a disclosure check fired (a rescaled count, a
    small cell, a model whose records are not known): the owner's explicit choice for
    values such as a model's test accuracy, which is a proportion of a few records."""
    matched: int = 0
    """How many requests this handler has decided."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be 'accept' or 'deny', not {self.action!r}")
        self.tags = as_tags(self.tags)
        for field_name in ("max_elements", "max_requests"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{field_name} must be a non-negative integer or None")
        if self.timeout_secs is not None and not (self.timeout_secs >= 0):
            raise ValueError("timeout_secs must be a non-negative number or None")
        for field_name in ("max_epsilon", "max_delta"):
            value = getattr(self, field_name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{field_name} must be a non-negative number or None")
            if self.dp is False:
                raise ValueError(f"{field_name} applies to DP releases: it cannot go with dp=False")
            self.dp = True
        if self.dp not in (None, True, False):
            raise ValueError("dp must be True, False or None")

    @property
    def remaining(self) -> int | None:
        """Matches left under the quota (None: no quota)."""
        if self.max_requests is None:
            return None
        return max(0, self.max_requests - self.matched)

    def matches(self, request: RequestFacts, now: float, *, min_aggregation: float = 1) -> bool:
        """Whether this handler decides ``request`` at time ``now``.

        An accept handler never matches a request whose value summarises fewer than
        ``min_aggregation`` private elements (the owner's minimum aggregation size).
        """
        if self.remaining == 0 or len(request.tags) > MAX_DECIDABLE_TAGS:
            return False
        if self.timeout_secs is not None and now - request.requested_at < self.timeout_secs:
            return False
        release = request.dp
        if self.dp is not None and self.dp != (release is not None):
            return False
        if release is not None:
            if request.error is not None:
                return False  # a failed DP computation is the owner's to look at
            if self.max_epsilon is not None and not release.epsilon <= self.max_epsilon:
                return False
            if self.max_delta is not None and not release.delta <= self.max_delta:
                return False
        elif self.action == "accept":
            floor = min_aggregation if self.min_aggregation is None else self.min_aggregation
            if not (request.aggregation >= floor):
                return False
            if request.checks and not self.ignore_disclosure_checks:
                return False
        if self.tags is not None and not self.tags <= request.tags:
            return False
        if self.op is not None and not _op_matches(self.op, request):
            return False
        if self.max_elements is not None and request.elements > self.max_elements:
            return False
        return True

    def summary(self) -> str:
        """A one-line description, e.g. ``"accept op=sum max_elements=10"``."""
        if self.name:
            return self.name
        parts: list[str] = [self.action]
        if self.tags is not None:
            parts.append("tags=[" + ", ".join(sorted(self.tags)) + "]")
        if self.op is not None:
            parts.append(f"op={self.op}")
        if self.max_elements is not None:
            parts.append(f"max_elements={self.max_elements}")
        if self.max_requests is not None:
            parts.append(f"max_requests={self.max_requests}")
        if self.dp is not None:
            parts.append("dp" if self.dp else "exact only")
        if self.max_epsilon is not None:
            parts.append(f"max_epsilon={self.max_epsilon:g}")
        if self.max_delta is not None:
            parts.append(f"max_delta={self.max_delta:g}")
        if self.timeout_secs is not None:
            parts.append(f"after {self.timeout_secs:g}s")
        if len(parts) == 1:
            parts.append("all")
        return " ".join(parts)


def as_tags(tags: Iterable[str] | None) -> frozenset[str] | None:
    """Tags as a frozenset; a single string is one tag, not its characters."""
    if tags is None:
        return None
    return frozenset([tags] if isinstance(tags, str) else tags)


def _dp_text(handler: Handler) -> str:
    if handler.dp is None:
        return "any"
    if not handler.dp:
        return "exact only"
    limits = [f"eps<={handler.max_epsilon:g}"] if handler.max_epsilon is not None else []
    if handler.max_delta is not None:
        limits.append(f"delta<={handler.max_delta:g}")
    return " ".join(["dp", *limits])


def _op_matches(op: str, request: RequestFacts) -> bool:
    return op == request.name or (bool(request.ops) and op == request.ops[-1])


class HandlerList(TableView, list[Handler]):
    """A snapshot of the handlers, in evaluation order, shown as a table."""

    def __init__(self, handlers: Iterable[Handler] = ()) -> None:
        super().__init__(handlers)

    def table(self) -> Table:
        rows = [
            [
                h.action,
                h.tags,
                h.op,
                h.max_elements,
                "" if h.max_requests is None else f"{h.remaining}/{h.max_requests}",
                h.timeout_secs,
                _dp_text(h),
                h.name,
                h.matched,
            ]
            for h in self
        ]
        columns = ["Action", "Tags", "Op", "Max Elements", "Quota Left", "After (s)", "DP",
                   "Name"]  # fmt: skip
        return Table([*columns, "Matched"], rows, empty_text="No handlers.")
