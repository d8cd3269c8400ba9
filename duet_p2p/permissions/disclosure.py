"""Disclosure checks for exact (non-DP) releases, in the manner of DataSHIELD's filters.

An exact value can identify people even when it is an aggregate: a table cell counting
two patients, or a model with more parameters than the records it was fitted on (it can
memorise them). These checks look at a value the owner is about to release; when one
fires, no accept handler releases it and the owner decides, seeing which check fired.
Values summarising fewer records than the session's ``min_aggregation`` (DataSHIELD's
subset rule) are held back by the handlers already.

The checks do not make exact releases safe against differencing (two approved sums over
overlapping records reveal one record); only a differentially private release with a
budget does. See docs/PRIVACY.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from duet_p2p.allowlist_effects import STEPS

COMBINING_OPS = frozenset(
    """sum nansum mean nanmean cumsum count_nonzero bincount histc histogram histogramdd
    unique unique_consecutive matmul mm mv bmm dot vdot inner outer einsum
    tensordot addmm addmv addbmm baddbmm linear bilinear trace conv1d conv2d conv3d
    """.split()
)
"""Ops that can add records together: after indicators of records, they count them."""
INDICATOR_OPS = STEPS | frozenset(
    """clamp clamp_min clamp_max clip relu relu6 hardtanh abs absolute one_hot heaviside
    where masked_fill isin minimum maximum fmin fmax bincount histc histogram histogramdd
    unique unique_consecutive count_nonzero""".split()
)
"""Ops that make indicators of records (or count them): with a combining op after them,
the value is a count, or a count rescaled (``* 0.5``, ``+ 0.5``, a mean)."""
MEANS = frozenset("mean nanmean".split())
WHOLE_TOLERANCE = 1e-6
MAX_ITEMS = 100_000
"""Items of a released sequence looked at (a longer one is not a table of counts)."""


@dataclass(frozen=True)
class DisclosureRules:
    """Thresholds for exact releases (None turns a check off)."""

    min_cell_count: int | None = 3
    """A table of counts (a histogram, ``bincount``, a sum of 0/1 indicators) with a
    nonzero cell below this is withheld from auto-accept."""
    max_parameter_ratio: float | None = 0.33
    """A model with more parameters than this times the records it was called on (whole
    hosted datasets; a slice or a batch counts as unknown) is withheld from auto-accept
    (DataSHIELD's default for regressions is 0.33)."""

    def __post_init__(self) -> None:
        cell = self.min_cell_count
        if cell is not None and (isinstance(cell, bool) or not isinstance(cell, int) or cell < 1):
            raise ValueError("min_cell_count must be a positive integer or None")
        ratio = self.max_parameter_ratio
        if ratio is not None and not (isinstance(ratio, (int, float)) and ratio > 0):
            raise ValueError("max_parameter_ratio must be a positive number or None")

    def check(
        self, value: Any, ops: tuple[str, ...], records: int | None, aggregation: float = 1.0
    ) -> tuple[str, ...]:
        """The checks ``value`` (about to be released, made by ``ops``) fails; ``records``:
        for a model, the fewest records it was fitted on (None: not known, e.g. batches
        sliced from a dataset or gradients of a loss, so the check fires); ``aggregation``:
        the records each number summarises, as the monitor counted them."""
        fired: list[str] = []
        if self.min_cell_count is not None:
            fired.extend(self._cells(value, ops, aggregation))
        if self.max_parameter_ratio is not None and isinstance(value, torch.nn.Module):
            parameters = sum(p.numel() for p in value.parameters())
            if records is None:
                fired.append(f"model size: {parameters} parameters, fitted on a selection "
                             "of records whose number is not known")  # fmt: skip
            elif parameters > self.max_parameter_ratio * records:
                fired.append(
                    f"model size: {parameters} parameters for {records} records, above the "
                    f"ratio {self.max_parameter_ratio:g}"
                )
        return tuple(fired)

    def _cells(self, value: Any, ops: tuple[str, ...], aggregation: float) -> list[str]:
        assert self.min_cell_count is not None
        if not is_count_like(ops):
            return []
        part = _count_part(value, ops)
        if whole_numbers(part):
            return self._smallest(smallest_cell(part))
        if _bare_proportion(ops) and math.isfinite(aggregation) and aggregation > 1:
            counts = _scaled(part, aggregation)
            if counts is not None:  # a proportion of N records: N * p and N * (1 - p)
                return self._smallest(smallest_cell(counts)) or self._smallest(
                    smallest_cell(_scaled(1 - _as_tensor(part), aggregation))
                )
        return ["cell count: a count rescaled to fractions cannot be checked"]

    def _smallest(self, smallest: float | None) -> list[str]:
        assert self.min_cell_count is not None
        if smallest is not None and math.isnan(smallest):
            return ["cell count: the table could not be checked"]
        if smallest is not None and smallest < self.min_cell_count:
            return [f"cell count: a cell counts {smallest:g} records, below the minimum "
                    f"{self.min_cell_count}"]  # fmt: skip
        return []


CONVERSIONS = frozenset(
    "float double half bfloat16 to item tolist clone detach contiguous cpu squeeze "
    "flatten reshape view".split()
)


def _bare_proportion(ops: tuple[str, ...]) -> bool:
    """The lineage ends with indicators, then only conversions, then a mean, then only
    conversions: a proportion whose counts ``records * p`` can be read back. Any other
    step (``* 3`` before or after the mean, ``+ 0.2``) makes it unreadable."""
    shorts = [op.rpartition(".")[2].strip("_") for op in ops]
    while shorts and shorts[-1] in CONVERSIONS:
        shorts.pop()
    if not shorts or shorts[-1] not in MEANS:
        return False
    shorts.pop()
    while shorts and shorts[-1] in CONVERSIONS:
        shorts.pop()
    return bool(shorts) and shorts[-1] in STEPS


def is_count_like(ops: tuple[str, ...]) -> bool:
    """Indicators of records (a comparison, a clamp, ``one_hot``) combined over records,
    however they were made and whatever came after (``* 1``): a count, or a table of
    counts. A value made so is checked cell by cell when its numbers are whole."""
    shorts = {op.rpartition(".")[2].strip("_") for op in ops}
    return bool(shorts & INDICATOR_OPS) and bool(shorts & COMBINING_OPS)


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return torch.tensor(value, dtype=torch.float64)


def _scaled(value: Any, records: float) -> torch.Tensor | None:
    """``value * records`` when those are whole numbers (a mean of indicators), else None."""
    try:
        counts = _as_tensor(value) * records
    except (TypeError, ValueError, RuntimeError):
        return None
    if counts.numel() == 0 or not bool(torch.all(torch.isfinite(counts))):
        return None
    if not bool(torch.all((counts - counts.round()).abs() <= WHOLE_TOLERANCE * records)):
        return None
    return counts.round()


def whole_numbers(value: Any, depth: int = 0) -> bool:
    """Every number in ``value`` is a whole number (a value too large to look at counts)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        if not (flat.is_floating_point() or flat.is_complex()):
            return True
        flat = flat.to(torch.complex128) if flat.is_complex() else flat.to(torch.float64)
        finite = flat[torch.isfinite(flat)]
        if finite.is_complex():
            return bool(
                torch.all(finite.imag == 0) and torch.all(finite.real == finite.real.round())
            )
        return bool(torch.all(finite == finite.round()))
    if isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return not math.isfinite(value) or value == round(value)
    if isinstance(value, tuple | list):
        if depth >= 8 or len(value) > MAX_ITEMS:
            return True
        return all(whole_numbers(item, depth + 1) for item in value)
    return False


def smallest_cell(value: Any, depth: int = 0) -> float | None:
    """The smallest nonzero count in ``value`` (tensors, numbers, or sequences of them)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        flat = (flat.abs() if flat.is_complex() else flat).to(torch.float64).abs()
        flat = flat[(flat != 0) & torch.isfinite(flat)]
        return float(flat.min()) if flat.numel() else None
    if isinstance(value, (bool, int, float)):
        number = abs(float(value))
        return number if number != 0 and math.isfinite(number) else None
    if isinstance(value, (tuple, list)):
        if depth >= 8 or len(value) > MAX_ITEMS:
            return math.nan  # too large to check: fail closed
        found = [smallest_cell(item, depth + 1) for item in value]
        present = [number for number in found if number is not None]
        return math.nan if any(math.isnan(n) for n in present) else min(present, default=None)
    return math.nan if value is not None and not isinstance(value, str) else None


def _count_part(value: Any, ops: tuple[str, ...]) -> Any:
    """The counts of a result that also carries other values: ``histogram`` gives (counts,
    edges), ``unique(return_counts=True)`` gives (values, counts)."""
    if not isinstance(value, (tuple, list)) or not value:
        return value
    shorts = {op.rpartition(".")[2] for op in ops}
    if shorts & {"histogram", "histogramdd"}:
        return value[0]
    if shorts & {"unique", "unique_consecutive"}:
        return value[-1]
    return value
