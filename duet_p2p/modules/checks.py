"""Argument checks for module specs: each takes (value, path), returns it normalized.

A failing check raises ProtocolError naming the path inside the spec, for example
``model.0.args.in_features: must be a positive int, got -3``. Tuples come out as lists,
the form the wire codec gives back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NoReturn

from duet_p2p.errors import ProtocolError

Check = Callable[[Any, str], Any]
MAX_SIZE = 2**31 - 1


def fail(path: str, message: str) -> NoReturn:
    """Refuse a spec, naming where in it the problem is."""
    raise ProtocolError(f"{path}: {message}")


def show(value: object) -> str:
    """A short repr of an untrusted value, safe to put in an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: object) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(lo: int, hi: int = MAX_SIZE) -> Check:
    what = {0: "a non-negative int", 1: "a positive int"}.get(lo, f"an int in [{lo}, {hi}]")

    def check(value: Any, path: str) -> int:
        if not is_int(value) or value < lo:
            fail(path, f"must be {what}, got {show(value)}")
        if value > hi:
            fail(path, f"must be at most {hi}, got {value}")
        return value

    return check


def real(lo: float = -math.inf, hi: float = math.inf, *, open_lo: bool = False) -> Check:
    """A finite float (an int is accepted and converted) in [lo, hi], or (lo, hi]."""
    low = "-inf" if lo == -math.inf else str(lo)
    what = f"a finite float in {'(' if open_lo else '['}{low}, {hi}]"

    def check(value: Any, path: str) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not (
            ok and math.isfinite(value) and lo <= value <= hi and not (open_lo and value == lo)
        ):
            fail(path, f"must be {what}, got {show(value)}")
        return float(value)

    return check


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        fail(path, f"must be a bool, got {show(value)}")
    return value


def choice(*options: str) -> Check:
    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in options:
            fail(path, f"must be one of {', '.join(map(repr, options))}, got {show(value)}")
        return value

    return check


def optional(inner: Check) -> Check:
    return lambda value, path: None if value is None else inner(value, path)


def int_list(item: Check, lengths: range, *, scalar_ok: bool) -> Check:
    """A list (or tuple) of items each passing ``item``; also a bare int if ``scalar_ok``."""
    sizes = str(lengths.start) if len(lengths) == 1 else f"{lengths.start} to {lengths[-1]}"
    what = f"{'an int or ' if scalar_ok else ''}a list of {sizes} ints"

    def check(value: Any, path: str) -> Any:
        if scalar_ok and is_int(value):
            return item(value, path)
        if not isinstance(value, list | tuple) or len(value) not in lengths:
            fail(path, f"must be {what}, got {show(value)}")
        return [item(v, f"{path}.{i}") for i, v in enumerate(value)]

    return check


def size_tuple(n: int, lo: int = 1) -> Check:
    """An int >= lo, or a list of n of them (kernel_size, stride, padding...)."""
    return int_list(integer(lo), range(n, n + 1), scalar_ok=True)


def conv_padding(n: int) -> Check:
    sizes, modes = size_tuple(n, 0), choice("same", "valid")
    return lambda value, path: modes(value, path) if isinstance(value, str) else sizes(value, path)


def size_or_none(value: Any, path: str) -> int | None:
    return None if value is None else POSITIVE(value, path)


def size_or_minus_one(value: Any, path: str) -> int:
    return -1 if is_int(value) and value == -1 else POSITIVE(value, path)


def spread(value: int | list[int], n: int) -> list[int]:
    """An int-or-list argument as a list of n ints."""
    return [value] * n if isinstance(value, int) else list(value)


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
DIM = integer(-64, 64)
INDEX = integer(-MAX_SIZE, MAX_SIZE)
UNIT = real(0.0, 1.0)
POSITIVE_REAL = real(0.0, open_lo=True)
REDUCTION = choice("none", "mean", "sum")
SHAPE = int_list(POSITIVE, range(1, 9), scalar_ok=False)
