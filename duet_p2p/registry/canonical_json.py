"""Canonical JSON (RFC 8785, JCS): one byte string per value, so any client can check a
signature over it, a browser included.

Encoding: UTF-8, no whitespace, object keys sorted by their UTF-16 code units, strings with
only ``"``, ``\\`` and control characters escaped (``\\b \\f \\n \\r \\t``, else
``\\u00xx``), ``true``/``false``/``null``. Integers are JSON integers within
``±(2**53 - 1)`` (what every JSON reader holds exactly). Floats must be finite; their digits
are Python's ``repr`` (the shortest that round-trips, as ECMAScript's) laid out as
ECMAScript's ``Number.prototype.toString`` does: ``1.0`` is ``1``, ``1e-7`` is ``1e-7``,
``1e21`` is ``1e+21``, ``-0.0`` is ``0``. So a float with an integral value reads back as an
int, and an integer literal beyond ``2**53 - 1`` reads back as a float.

Only ``None``, ``bool``, ``int``, ``float``, ``str``, ``list`` and ``dict`` with text keys
are encoded (exact types); bytes are not JSON: carry them as unpadded base64url text
(:func:`b64url_encode`, :func:`b64url_decode`).

:func:`parse_canonical` trusts nothing: size is capped before parsing, the input must be
strict UTF-8, NaN/Infinity and duplicate keys are refused, and the value is encoded again
and must give back exactly the input, so any non-canonical form (whitespace, key order,
escapes, number spelling) is refused.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

from duet_p2p.errors import DuetError

__all__ = [
    "MAX_DEPTH", "MAX_SAFE_INTEGER", "CanonicalJSONError", "b64url_decode", "b64url_encode",
    "canonical_json", "parse_canonical",
]  # fmt: skip

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects (the top-level value is depth 0)."""
MAX_SAFE_INTEGER = (1 << 53) - 1
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_ENCODE_STRING = json.encoder.encode_basestring  # type: ignore[attr-defined]


class CanonicalJSONError(DuetError, ValueError):
    """A value cannot be encoded, or bytes are not canonical JSON."""


def canonical_json(
    value: object,
    *,
    max_depth: int = MAX_DEPTH,
    max_bytes: int | None = None,
    error: type[Exception] = CanonicalJSONError,
) -> bytes:
    """The canonical JSON bytes of ``value``; ``error`` for anything not encodable, nested
    deeper than ``max_depth`` or longer than ``max_bytes``."""
    parts: list[str] = []
    try:
        _encode(value, 0, max_depth, parts, error)
        data = "".join(parts).encode("utf-8")
    except UnicodeEncodeError:
        raise error("a string is not valid Unicode (lone surrogate)") from None
    except RecursionError:
        raise error("a value nests too deep") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"a document is at most {max_bytes} bytes")
    return data


def _encode(
    value: object, depth: int, max_depth: int, out: list[str], error: type[Exception]
) -> None:
    kind = type(value)
    if value is None:
        out.append("null")
    elif kind is bool:
        out.append("true" if value else "false")
    elif kind is int:
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:  # type: ignore[operator]
            raise error(f"an integer is outside ±{MAX_SAFE_INTEGER}")
        out.append(str(value))
    elif kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise error("a number is finite (no NaN or infinity)")
        out.append(_number(value))  # type: ignore[arg-type]
    elif kind is str:
        out.append(_ENCODE_STRING(value))
    elif kind is list or kind is dict:
        if depth >= max_depth:
            raise error(f"values nest deeper than {max_depth} levels")
        if kind is list:
            out.append("[")
            for index, item in enumerate(value):  # type: ignore[attr-defined]
                if index:
                    out.append(",")
                _encode(item, depth + 1, max_depth, out, error)
            out.append("]")
            return
        if not all(type(key) is str for key in value):  # type: ignore[attr-defined]
            raise error("object keys are text")
        try:
            keys = sorted(value, key=lambda key: key.encode("utf-16-be"))  # type: ignore[call-overload]
        except UnicodeEncodeError:
            raise error("an object key is not valid Unicode (lone surrogate)") from None
        out.append("{")
        for index, key in enumerate(keys):
            if index:
                out.append(",")
            out.append(_ENCODE_STRING(key))
            out.append(":")
            _encode(value[key], depth + 1, max_depth, out, error)  # type: ignore[index]
        out.append("}")
    else:
        raise error(f"canonical JSON cannot hold a {kind.__qualname__}")


def _number(value: float) -> str:
    """ECMAScript ``Number.prototype.toString`` of a finite float."""
    if value == 0:
        return "0"
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + (int(exponent) if exponent else 0)  # value = 0.digits × 10**point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    count = len(digits)
    if count <= point <= 21:
        text = digits + "0" * (point - count)
    elif 0 < point <= 21:
        text = f"{digits[:point]}.{digits[point:]}"
    elif -6 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        power = point - 1
        text = digits[0] + (f".{digits[1:]}" if count > 1 else "") + f"e{power:+d}"
    return "-" + text if value < 0 else text


def _integer(text: str) -> int | float:
    """An integer literal: an int when exact in a double, else the float a JSON reader
    would see (the canonical check then refuses any spelling that is not its own)."""
    if len(text) > 400:
        raise ValueError("an integer literal is too long")
    number = int(text)
    return number if -MAX_SAFE_INTEGER <= number <= MAX_SAFE_INTEGER else float(text)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r:.40}")
        out[key] = item
    return out


def parse_canonical(
    data: object,
    *,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
    error: type[Exception] = CanonicalJSONError,
) -> Any:
    """The value of canonical JSON ``data`` (bytes); ``error`` for anything oversize,
    malformed, too deep, with duplicate keys, or not in canonical form."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error("canonical JSON is bytes")
    if memoryview(data).nbytes > max_bytes:
        raise error(f"a document is at most {max_bytes} bytes")
    data = bytes(data)
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text, parse_int=_integer, parse_constant=_constant, object_pairs_hook=_object
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeError included
        raise error(f"not JSON: {str(exc)[:200]}") from None
    if canonical_json(value, max_depth=max_depth, error=error) != data:
        raise error("the document is not in canonical form")
    return value


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url text of ``data``."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(
    text: object, *, max_bytes: int, what: str = "a value", error: type[Exception] = ValueError
) -> bytes:
    """The bytes of unpadded base64url ``text``, at most ``max_bytes``; only the one
    canonical spelling is accepted (no padding, whitespace or stray bits)."""
    limit = (max_bytes * 4 + 2) // 3
    if type(text) is not str or len(text) > limit or not _B64URL.fullmatch(text):
        raise error(f"{what} is unpadded base64url text of at most {max_bytes} bytes")
    if len(text) % 4 == 1:
        raise error(f"{what} is not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise error(f"{what} is not in canonical base64url form")
    return data
