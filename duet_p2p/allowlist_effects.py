"""What each allowlisted op does besides computing its result, as data the monitor reads.

The owner's monitor labels every object from the action graph alone, so it must know, per
op, what the op may write into, whether its result may share memory with its inputs, and
whether it aggregates records. Every answer errs towards "it may": an op not described
here is ``UNKNOWN`` (may write into or capture any argument, and its result may alias any
of them), which is always safe and only costs precision.

- ``PURE``: reads its inputs, writes nothing, returns new memory (``add``, ``sum``).
- ``VIEW``: writes nothing, but the result may share memory with its inputs, or be one of
  them (``view``, ``float()`` on a float tensor, ``parameters()``).
- ``MUTATES``: writes into its receiver (``add_``, ``__setitem__``, ``train()``, an
  optimizer's ``step``); the result, if any, is the receiver.
- ``MUTATES_FIRST``: writes into its first argument (``nn.init.*_``); returns it.
- ``GRADIENTS``: ``backward``, which writes into the gradients of whatever its graph
  reaches.
- ``UNKNOWN``: anything else (module calls, constructors that capture their arguments).
"""

from __future__ import annotations

import enum


class Effect(enum.StrEnum):
    PURE = "pure"
    VIEW = "view"
    MUTATES = "mutates"
    MUTATES_FIRST = "mutates_first"
    GRADIENTS = "gradients"
    UNKNOWN = "unknown"


_PURE_CATEGORIES = frozenset(
    {
        "arithmetic", "comparison", "creation", "fft", "indexing", "linalg", "loss",
        "metadata", "reduction", "statistics", "scan", "sorting", "random", "nn.functional",
        "operator",
    }
)  # fmt: skip

_VIEW_NAMES = frozenset(
    """
    diagonal positive __pos__ __getitem__ detach data grad real imag T mT H mH
    dropout dropout1d dropout2d alpha_dropout
    bfloat16 bool byte char cpu double float half int long short to type_as
    parameters state_dict einsum cartesian_prod
    """.split()
)
"""Ops of otherwise pure categories that may return their input or a view of it
(``einsum("i->i", x)`` is a view of ``x``; ``cartesian_prod(x)`` is ``x`` itself)."""

_COPYING_SHAPE_NAMES = frozenset(
    """
    clone repeat tile flip fliplr flipud roll rot90 repeat_interleave cat concat
    concatenate stack hstack vstack dstack column_stack block_diag
    """.split()
)
"""Shape ops that always return new memory."""

AFFINE = frozenset(
    """
    add sub neg negative positive mul multiply div divide true_divide bfloat16 double
    float half __add__ __radd__ __sub__ __rsub__ __neg__ __pos__ __mul__ __rmul__
    __truediv__
    """.split()
)
"""Elementwise maps that are affine in each record (with finite, non-zero scalars): a sum
of their results is a weighted sum of every record, never a selection of one."""

STEPS = frozenset(
    """
    eq ne lt le gt ge greater greater_equal less less_equal not_equal isnan isinf
    isfinite isneginf isposinf signbit sign sgn floor ceil round trunc floor_divide
    logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor
    bitwise_not bool byte char int long short __lt__ __le__ __gt__ __ge__ __eq__ __ne__
    __and__ __rand__ __or__ __ror__ __xor__ __rxor__ __invert__ __floordiv__
    """.split()
)
"""Elementwise maps that are piecewise constant (comparisons, rounding, logic): sums of
their results are counts of records in regions."""

ELEMENTWISE = AFFINE | STEPS
"""What keeps a tensor's records where they were, with scalar operands (``x * 2``,
``x > 5``). Not clamps, ``abs``, ``exp``, powers, logarithms or reciprocals, which can
zero every record but one or let one dominate: ``(x - 8.5).clamp(min=0).sum()`` and
``(x * 1e6).exp().sum().log()`` are the largest record."""

SCALAR_ONLY = frozenset(
    "mul multiply div divide true_divide floor_divide __mul__ __rmul__ __truediv__ "
    "__floordiv__".split()
)
"""Of those, the ones that keep records apart only with a scalar operand (``x * x`` is a
square, ``x * (x > 5)`` a selection)."""

COUNTING_REDUCTIONS = frozenset("sum mean count_nonzero".split())
"""Reductions whose result summarises every record it runs over (unlike ``max`` or a
quantile, which pick one record out): the only ops ``min_aggregation`` counts. Not the
NaN-skipping ones: ``x / 0`` makes NaN masks."""

_DRAWING_PATHS = frozenset({"torch.nn.Module.__call__", "torch.nn.Module.forward"})
"""Ops that may draw from the session's random generator without being flagged random
(a module call may run dropout)."""


def effect_of(path: str, category: str, returns: str, inplace: bool) -> Effect:
    """The effect of one default-allowlist op, from its family and name."""
    name = path.rpartition(".")[2]
    receiver = path.rpartition(".")[0]
    if name == "backward":
        return Effect.GRADIENTS
    if inplace:
        if receiver in ("torch.Tensor", "torch.nn.Module", "torch.optim.Optimizer"):
            return Effect.MUTATES
        return Effect.MUTATES_FIRST
    if name in _VIEW_NAMES:
        return Effect.VIEW
    if category == "shape":
        return Effect.PURE if name in _COPYING_SHAPE_NAMES else Effect.VIEW
    if category in ("conversion", "autograd"):
        return Effect.PURE if name in ("item", "tolist") else Effect.VIEW
    if returns in ("module", "optimizer"):
        return Effect.UNKNOWN  # constructors capture what they are given
    if category in _PURE_CATEGORIES:
        return Effect.PURE
    return Effect.UNKNOWN


def draws_randomness(path: str, random: bool) -> bool:
    """Whether the op may draw from (and so advance) the session's random generator."""
    return random or path in _DRAWING_PATHS
