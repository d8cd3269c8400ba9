"""Canonical JSON (RFC 8785): exact bytes, strict parsing, caps."""

from __future__ import annotations

import json
import math
import random
import struct

import pytest

from duet_p2p.registry.canonical_json import (
    MAX_SAFE_INTEGER,
    CanonicalJSONError,
    b64url_decode,
    b64url_encode,
    canonical_json,
    parse_canonical,
)


def parse(data: bytes, max_bytes: int = 1 << 20) -> object:
    return parse_canonical(data, max_bytes=max_bytes)


def test_keys_sorted_by_utf16_code_units() -> None:
    # RFC 8785 §3.2.3 example: U+1F600 (surrogates D83D DE00) sorts before U+FB33
    value = {"\ufb33": 1, "\U0001f600": 2, "\u00e9": 3, "b": 4, "a": 5, "A": 6, "": 7, "\r": 8}
    out = canonical_json(value)
    keys = list(json.loads(out))
    assert keys == ["", "\r", "A", "a", "b", "\u00e9", "\U0001f600", "\ufb33"]
    assert sorted(value) != keys  # code points would order them differently
    assert parse(out) == value


def test_rfc8785_sample() -> None:
    value = {
        "numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001],
        "string": "\u20ac$\u000f\u000aA'\u0042\u0022\u005c\\\"/",
        "literals": [None, True, False],
    }
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical_json(value) == expected.encode()


def test_string_escapes() -> None:
    text = 'q"b\\s/\b\f\n\r\t\x00\x1f\x7f\u2028é😀'
    out = canonical_json(text)
    assert out == '"q\\"b\\\\s/\\b\\f\\n\\r\\t\\u0000\\u001f\x7f\u2028é😀"'.encode()
    assert parse(out) == text
    for other in (
        b'"\\u0041"',
        b'"\\/"',
        b'"\\u001F"',
        b'"\xc3\xa9"'.replace(b"\xc3\xa9", b"\\u00e9"),
    ):
        with pytest.raises(CanonicalJSONError, match="canonical"):
            parse(other)
    with pytest.raises(CanonicalJSONError, match="surrogate"):
        canonical_json("lone\ud800")
    with pytest.raises(CanonicalJSONError, match="surrogate"):
        parse(b'"\\ud800"')
    with pytest.raises(CanonicalJSONError, match="JSON"):
        parse(b'"\xed\xa0\x80"')  # a surrogate in UTF-8: invalid
    with pytest.raises(CanonicalJSONError):
        parse(b'"\xff"')


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (0.0, "0"), (-0.0, "0"), (1.0, "1"), (-1.5, "-1.5"), (0.1, "0.1"), (1e-7, "1e-7"),
        (1e-6, "0.000001"), (123.456, "123.456"), (1e20, "100000000000000000000"),
        (1e21, "1e+21"), (1.5e300, "1.5e+300"), (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"), (1750000000.5, "1750000000.5"),
        (2.0**60, "1152921504606847000"),
    ],
)  # fmt: skip
def test_float_form(number: float, text: str) -> None:
    assert canonical_json(number) == text.encode()
    back = parse(text.encode())
    assert back == number and type(back) in (int, float)


def test_float_round_trip_random() -> None:
    rng = random.Random(8785)
    for _ in range(2000):
        number = struct.unpack("<d", rng.randbytes(8))[0]
        if not math.isfinite(number):
            continue
        out = canonical_json(number)
        assert float(out) == number and parse(out) == number


def test_non_canonical_numbers_refused() -> None:
    for text in (b"1.0", b"1e2", b"1E+21", b"-0", b"01", b"0.10", b"1e-07", b"+1", b"1.5e300"):
        with pytest.raises(CanonicalJSONError):
            parse(text)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(CanonicalJSONError, match="finite"):
            canonical_json(bad)
    for text in (b"NaN", b"Infinity", b"-Infinity", b"[NaN]"):
        with pytest.raises(CanonicalJSONError, match="not JSON"):
            parse(text)


def test_big_integers() -> None:
    assert canonical_json(MAX_SAFE_INTEGER) == b"9007199254740991"
    assert canonical_json(-MAX_SAFE_INTEGER) == b"-9007199254740991"
    assert parse(b"9007199254740991") == MAX_SAFE_INTEGER
    for big in (MAX_SAFE_INTEGER + 1, -MAX_SAFE_INTEGER - 1, 1 << 64):
        with pytest.raises(CanonicalJSONError, match="integer"):
            canonical_json(big)
    # beyond 2**53 a literal is a double: only its own spelling is canonical
    assert type(parse(b"9007199254740992")) is float
    for text in (b"9007199254740993", b"18446744073709551617", b"1" + b"0" * 400, b"9" * 5000):
        with pytest.raises(CanonicalJSONError):
            parse(text)


def test_whitespace_and_order_refused() -> None:
    value = {"b": [1, 2], "a": {"c": None}}
    out = canonical_json(value)
    assert out == b'{"a":{"c":null},"b":[1,2]}'
    for bad in (
        b'{"a": {"c":null},"b":[1,2]}', b'{"a":{"c":null},"b":[1,2]}\n', b' {"a":{"c":null},"b":[1,2]}',
        b'{"b":[1,2],"a":{"c":null}}', b'{"a":{"c":null},"b":[1, 2]}', b"\xef\xbb\xbf" + out,
    ):  # fmt: skip
        with pytest.raises(CanonicalJSONError):
            parse(bad)
    assert parse(out) == value


def test_duplicate_keys_refused() -> None:
    with pytest.raises(CanonicalJSONError, match="duplicate"):
        parse(b'{"a":1,"a":1}')
    with pytest.raises(CanonicalJSONError, match="duplicate"):
        parse(b'{"x":{"a":1,"a":2}}')


def test_unencodable_values_refused() -> None:
    for bad in (b"bytes", (1, 2), {1: "x"}, {("a",): 1}, {1.5}, object(), bytearray(b"x")):
        with pytest.raises(CanonicalJSONError):
            canonical_json(bad)

    class Sub(dict):  # type: ignore[type-arg]
        pass

    with pytest.raises(CanonicalJSONError):
        canonical_json(Sub(a=1))
    with pytest.raises(CanonicalJSONError, match="surrogate"):
        canonical_json({"\udc00": 1})


def test_depth_cap() -> None:
    nested: list[object] = []
    for _ in range(10):
        nested = [nested]
    assert canonical_json(nested, max_depth=11)
    with pytest.raises(CanonicalJSONError, match="deeper"):
        canonical_json(nested, max_depth=10)
    with pytest.raises(CanonicalJSONError, match="deeper"):
        parse_canonical(canonical_json(nested), max_bytes=100, max_depth=10)
    with pytest.raises(CanonicalJSONError):
        parse(b"[" * 200_000 + b"]" * 200_000, max_bytes=1 << 20)


def test_size_cap_before_parsing() -> None:
    with pytest.raises(CanonicalJSONError, match="at most 10"):
        parse_canonical(b'"' + b"x" * 10 + b'"', max_bytes=10)
    with pytest.raises(CanonicalJSONError, match="at most 4"):
        canonical_json("hello", max_bytes=4)
    assert parse_canonical(bytearray(b'"x"'), max_bytes=3) == "x"
    for bad in ("text", None, 5, [b"x"]):
        with pytest.raises(CanonicalJSONError, match="bytes"):
            parse_canonical(bad, max_bytes=100)


def test_base64url() -> None:
    for size in range(0, 40):
        data = bytes(range(size))
        text = b64url_encode(data)
        assert "=" not in text and b64url_decode(text, max_bytes=size) == data
    key = b64url_encode(b"\xfb\xff" * 16)
    assert "-" in key or "_" in key
    for bad in (key + "=", key.replace("-", "+"), key[:-1] + "B", "A", " " + key, key + "\n", 5):
        with pytest.raises(ValueError):
            b64url_decode(bad, max_bytes=64)
    with pytest.raises(ValueError, match="at most 31"):
        b64url_decode(key, max_bytes=31)
