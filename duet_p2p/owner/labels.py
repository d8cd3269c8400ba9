"""Privacy labels: what the owner's monitor knows of each object, from the action graph alone.

A label says whether a value depends on private data, on which of the owner's tagged
objects (the full set, never truncated), and how many records each of its numbers is
known to summarise. Labels only ever move towards "more private": ``merge`` is the join of
the lattice, so a rule that is unsure merges and never loses a tag or raises an
aggregation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Label:
    private: bool
    tags: frozenset[str] = frozenset()
    """Tags of every owner object the value derives from."""
    aggregation: float = math.inf
    """The fewest records each number of the value is known to summarise (inf: public)."""
    records: int | None = None
    """Set on a private tensor whose dimension 0 still holds the owner's records one per row
    (the hosted tensor, or it mapped elementwise with scalars): its row count."""
    ndim: int | None = None
    """The number of dimensions of such a record-aligned tensor."""
    aggregate: bool = False
    """The value is the result of a counted aggregation (or made from one alone)."""

    def merge(self, other: Label) -> Label:
        """The least label at least as restrictive as both."""
        if not other.private and not other.tags:
            return self
        if not self.private and not self.tags:
            return Label(other.private, other.tags, other.aggregation)
        return Label(
            self.private or other.private,
            self.tags | other.tags,
            min(self.aggregation, other.aggregation),
        )

    def covers(self, other: Label) -> bool:
        """Whether merging ``other`` in would change nothing that matters."""
        return (
            (self.private or not other.private)
            and self.tags >= other.tags
            and self.aggregation <= other.aggregation
        )

    def summary(self) -> str:
        if not self.private:
            return "public"
        agg = "unbounded" if math.isinf(self.aggregation) else f"{self.aggregation:g}"
        return f"private (aggregation {agg}, tags {sorted(self.tags)[:8]})"


PUBLIC = Label(False)


def hosted_label(private: bool, tags: frozenset[str], shape: tuple[int, ...] | None) -> Label:
    """The label of an object the owner hosts: each row of a private tensor is a record."""
    if not private:
        return Label(False, tags)
    if shape is None:
        return Label(True, tags, 1.0)
    rows = shape[0] if shape else 1
    return Label(True, tags, 1.0, records=rows, ndim=len(shape))


def merged(labels: list[Label]) -> Label:
    result = PUBLIC
    for label in labels:
        result = result.merge(label)
    return result
