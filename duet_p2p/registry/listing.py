"""Signed listings: what a standing host publishes about a dataset or model it holds.

A listing describes (never contains) a dataset or a model: name, summary, Markdown
description, SPDX license, citation, creators, keywords, modality, schema, approximate
size, usage conditions, access modes, a summary of the host's approval policy, availability
windows, where to signal the host, for models their architecture and metrics, and, if the
owner gives one, a small sample held to the schema (:mod:`duet_p2p.registry.sample`). It is
owned by one host identity: ``host_key`` (Ed25519) must hash to ``host_id``, and the host
signs ``[b"duet_p2p listing v1", sha256(listing)]`` (each part length-prefixed), so a
registry can store and serve a listing but cannot forge or alter one.

A listing's bytes are the canonical JSON (RFC 8785, :mod:`duet_p2p.registry.canonical_json`)
of its map, binary fields (``host_key``, a heartbeat's ``nonce``, a metric's ``receipt``) as
unpadded base64url text, so a web client can check a listing as well as a registry. On the
wire a signed document is the canonical JSON ``{"body": <the body as a JSON object>, "key":
<base64url>, "sig": <base64url>, "v": 1}``; the signed bytes are the body object encoded
again canonically. Reading trusts nothing: sizes are capped before parsing, duplicate keys
and non-canonical JSON are refused, unknown and missing fields are refused, every field is
checked, and every failure is an :class:`InvalidListing`.

This module and its imports never load torch or numpy (a registry or signaling server reads
listings without them). A metric's ``receipt`` is carried as opaque bytes (size-capped, not
parsed): whoever shows it as evidence checks it with ``duet_p2p.offline.receipt.Receipt``
(``from_wire``) where torch is available.

Text is stored raw, as signed. One-line fields (names, summary, tags) must be printable
(``str.isprintable``: no controls, no bidi or zero-width characters); long-form fields
(description, citation, usage conditions, policy summary) may also hold newlines and tabs,
but no carriage return. Markdown is rendered and sanitized by whoever shows it.

An edit is a new version of the listing, signed by the same key, with ``version`` one more
(:func:`check_successor`). A deletion is a :class:`SignedDeletion` whose ``version`` is the
deleted listing's plus one, so it can stand as the listing's last version
(:func:`check_deletion`). A :class:`SignedHeartbeat` says a host is online now and which
listings it serves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import os
import re
import time
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from duet_p2p.errors import DuetError
from duet_p2p.identity import KEY_BYTES, SIGNATURE_BYTES, Identity, id_of
from duet_p2p.registry.canonical_json import (
    MAX_SAFE_INTEGER,
    b64url_decode,
    b64url_encode,
    canonical_json,
    parse_canonical,
)
from duet_p2p.registry.sample import check_sample

__all__ = [
    "ACCESS_MODES", "CONTEXT", "DAYS", "DELETION_CONTEXT", "DTYPES", "HEARTBEAT_CONTEXT",
    "KINDS", "MODALITIES", "TENSOR_DTYPES", "InvalidListing", "ListingSpec", "SignedDeletion",
    "SignedHeartbeat", "SignedListing", "check_deletion", "check_successor",
]  # fmt: skip

VERSION = 1
CONTEXT = b"duet_p2p listing v1"
DELETION_CONTEXT = b"duet_p2p listing deletion v1"
HEARTBEAT_CONTEXT = b"duet_p2p heartbeat v1"

KINDS = ("dataset", "model")
MODALITIES = ("tabular", "image", "text", "audio", "time-series", "graph", "other")
ACCESS_MODES = ("live", "offline_jobs")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TENSOR_DTYPES = frozenset({
    "bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32",
    "float64",
})  # fmt: skip
DTYPES = TENSOR_DTYPES | {"string", "category", "date", "datetime"}
"""Column dtypes (each has a Croissant dataType and a mock); tensor entries (those with a
shape) take only ``TENSOR_DTYPES``."""

MAX_NAME_CHARS = 200
MAX_SUMMARY_CHARS = 500
MAX_DESCRIPTION_CHARS = 50_000
MAX_LICENSE_CHARS = 64
MAX_LONG_TEXT_CHARS = 4000
MAX_POLICY_CHARS = 2000
MAX_CREATORS = 50
MAX_KEYWORDS = 50
MAX_KEYWORD_CHARS = 64
MAX_SCHEMA_ENTRIES = 500
MAX_FIELD_DESCRIPTION_CHARS = 500
MAX_SHAPE_DIMS = 32
MAX_WINDOWS = 20
MAX_URL_CHARS = 500
MAX_METRICS = 50
MAX_ARCHITECTURE_BYTES = 1 << 18
MAX_ARCHITECTURE_ITEMS = 20_000
MAX_ARCHITECTURE_DEPTH = 32
MAX_HEARTBEAT_LISTINGS = 1000
MAX_SAMPLE_BYTES = 1 << 16
"""Largest sample, encoded."""
MAX_BODY_BYTES = 1 << 20
"""Largest canonical listing (receipts of metrics included)."""
MAX_SMALL_BODY_BYTES = 1 << 16
"""Largest deletion or heartbeat."""
MAX_RECEIPT_BYTES = (1 << 16) + 256
"""Largest receipt in a metric (a receipt's wire form; see ``duet_p2p.offline.receipt``)."""
MAX_WIRE_EXTRA = 256
"""Room for the envelope around a body."""
MAX_DEPTH = MAX_ARCHITECTURE_DEPTH + 8
MAX_COUNT = MAX_SAFE_INTEGER
"""Largest count (versions, sizes, dimensions): exact in every JSON reader."""
MAX_TIME = float(1 << 40)
NONCE_BYTES = 16
HEARTBEAT_SKEW_SECONDS = 300.0

_SPDX = re.compile(r"LicenseRef-[A-Za-z0-9.-]{1,53}|[A-Za-z0-9][A-Za-z0-9.-]{0,62}\+?")
_TIME = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])|24:00")
_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,3}")
_URL = re.compile(r"[!-~]+")  # printable ASCII, no space
_HEX32 = re.compile(r"[0-9a-f]{32}")
_ENVELOPE_KEYS = frozenset({"v", "body", "key", "sig"})
_FIELDS = (
    "kind", "listing_id", "host_id", "host_key", "name", "summary", "description", "license",
    "citation", "creators", "keywords", "modality", "schema", "approx_size",
    "usage_conditions", "access_modes", "policy_summary", "availability", "signaling_url",
    "version", "created_at", "updated_at", "architecture", "metrics", "tag",
)  # fmt: skip
_OPTIONAL_FIELDS = ("sample",)
"""Fields written only when not empty, so a listing without one keeps the bytes it had
before the field existed (and readers that predate it still read it)."""
_DELETION_FIELDS = ("listing_id", "host_id", "version", "at")
_HEARTBEAT_FIELDS = ("host_id", "at", "nonce", "listing_ids")
_PARSE_ERRORS = (ValueError, TypeError, KeyError, OverflowError, RecursionError)


class InvalidListing(DuetError, ValueError):
    """A listing, deletion or heartbeat is malformed, oversize, not canonical, stale, or
    its signature fails."""


# -- field checks ------------------------------------------------------------------------


def _line(value: object, what: str, limit: int, *, empty: bool = True) -> str:
    """One line of printable text of at most ``limit`` characters."""
    if type(value) is not str or len(value) > limit or (not empty and not value):
        least = 0 if empty else 1
        raise InvalidListing(f"{what} is text of {least} to {limit} characters")
    if not value.isprintable():
        raise InvalidListing(f"{what} holds a control, format or invisible character")
    return value


def _text(value: object, what: str, limit: int) -> str:
    """Long-form text: printable characters, newlines and tabs."""
    if type(value) is not str or len(value) > limit:
        raise InvalidListing(f"{what} is text of at most {limit} characters")
    if not value.replace("\n", "").replace("\t", "").isprintable():
        raise InvalidListing(
            f"{what} holds a control, format or invisible character (only newlines and tabs "
            "are allowed)"
        )
    return value


def _hex32(value: object, what: str) -> str:
    if type(value) is not str or not _HEX32.fullmatch(value):
        raise InvalidListing(f"{what} must be 32 lower-case hex digits")
    return value


def _time(value: object, what: str) -> float:
    if type(value) not in (int, float) or not 0 < value <= MAX_TIME:  # type: ignore[operator]
        raise InvalidListing(f"{what} must be a positive unix time")
    return float(value)  # type: ignore[arg-type]


def _count(value: object, what: str, least: int = 0) -> int:
    if type(value) is not int or not least <= value <= MAX_COUNT:
        raise InvalidListing(f"{what} is an int from {least} to {MAX_COUNT}")
    return value


def _map(value: object, what: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    """A map holding all of ``required``, some of ``optional``, and nothing else."""
    if type(value) is not dict or not all(type(key) is str for key in value):
        raise InvalidListing(f"{what} is a map with text keys")
    keys = set(value)
    if not required <= keys or not keys <= required | optional:
        names = sorted(required) + [f"{name}?" for name in sorted(optional)]
        raise InvalidListing(f"{what} has the fields {', '.join(names)} and no others")
    return value


def _list(value: object, what: str, limit: int) -> list[Any]:
    if type(value) is not list or len(value) > limit:
        raise InvalidListing(f"{what} is a list of at most {limit} items")
    return value


def _url(value: object, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_URL_CHARS or not _URL.fullmatch(value):
        raise InvalidListing(f"{what} is a URL of 1 to {MAX_URL_CHARS} printable ASCII characters")
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        raise InvalidListing(f"{what} is not a URL") from None
    if parts.scheme not in ("http", "https") or not host or "@" in parts.netloc:
        raise InvalidListing(f"{what} is an http(s) URL with a host and no credentials")
    return value


def _license(value: object) -> str:
    if type(value) is not str or len(value) > MAX_LICENSE_CHARS or not _SPDX.fullmatch(value):
        raise InvalidListing(
            'license is an SPDX identifier ("MIT", "CC-BY-4.0", "LicenseRef-...") of at most '
            f"{MAX_LICENSE_CHARS} characters"
        )
    return value


def _creators(value: object) -> list[dict[str, str]]:
    out = []
    for item in _list(value, "creators", MAX_CREATORS):
        creator = _map(item, "a creator", {"name"}, {"url", "affiliation"})
        checked = {"name": _line(creator["name"], "a creator's name", MAX_NAME_CHARS, empty=False)}
        if "url" in creator:
            checked["url"] = _url(creator["url"], "a creator's url")
        if "affiliation" in creator:
            checked["affiliation"] = _line(creator["affiliation"], "an affiliation", MAX_NAME_CHARS)
        out.append(checked)
    return out


def _keywords(value: object) -> list[str]:
    words = [
        _line(word, "a keyword", MAX_KEYWORD_CHARS, empty=False)
        for word in _list(value, "keywords", MAX_KEYWORDS)
    ]
    if len(set(words)) != len(words):
        raise InvalidListing("keywords must be distinct")
    return words


def _schema(value: object, modality: str) -> list[dict[str, Any]]:
    out = []
    for item in _list(value, "schema", MAX_SCHEMA_ENTRIES):
        entry = _map(item, "a schema entry", {"name", "dtype"}, {"description", "shape"})
        checked: dict[str, Any] = {
            "name": _line(entry["name"], "a schema entry's name", MAX_NAME_CHARS, empty=False)
        }
        dtype = entry["dtype"]
        if "shape" in entry:
            if modality == "tabular":
                raise InvalidListing("a tabular schema lists columns, without shapes")
            shape = _list(entry["shape"], "a shape", MAX_SHAPE_DIMS)
            if not all(type(dim) is int and -1 <= dim <= MAX_COUNT for dim in shape):
                raise InvalidListing("a shape's dimensions are ints >= 0, or -1 for unknown")
            checked["shape"] = list(shape)
            allowed = TENSOR_DTYPES
        else:
            allowed = DTYPES
        if type(dtype) is not str or dtype not in allowed:
            raise InvalidListing(f"dtype {dtype!r:.40} is not one of {sorted(allowed)}")
        checked["dtype"] = dtype
        if "description" in entry:
            checked["description"] = _line(
                entry["description"], "a schema entry's description", MAX_FIELD_DESCRIPTION_CHARS
            )
        out.append(checked)
    names = [entry["name"] for entry in out]
    if len(set(names)) != len(names):
        raise InvalidListing("schema entry names must be distinct")
    return out


def _approx_size(value: object) -> dict[str, int]:
    size = _map(value, "approx_size", set(), {"rows", "bytes"})
    return {
        key: _count(size[key], f"approx_size.{key}") for key in ("rows", "bytes") if key in size
    }


def _access_modes(value: object) -> list[str]:
    modes = _list(value, "access_modes", len(ACCESS_MODES))
    if not modes or not all(type(m) is str and m in ACCESS_MODES for m in modes):
        raise InvalidListing(f"access_modes is a non-empty subset of {list(ACCESS_MODES)}")
    if len(set(modes)) != len(modes):
        raise InvalidListing("access_modes must be distinct")
    return sorted(modes)


def _clock(value: object, what: str) -> int:
    match = _TIME.fullmatch(value) if type(value) is str else None
    if match is None:
        raise InvalidListing(f"{what} is a time HH:MM from 00:00 to 23:59 (or 24:00 to end)")
    return 24 * 60 if value == "24:00" else int(match[1]) * 60 + int(match[2])


def _zone(value: object) -> str:
    if type(value) is not str or len(value) > 64 or not _ZONE.fullmatch(value):
        raise InvalidListing("tz is an IANA time zone name such as Europe/Paris")
    try:
        zoneinfo.ZoneInfo(value)
    except (ValueError, KeyError, OSError):
        raise InvalidListing(f"tz {value!r} is not a known IANA time zone") from None
    return value


def _availability(value: object) -> list[dict[str, Any]]:
    out = []
    for item in _list(value, "availability", MAX_WINDOWS):
        window = _map(item, "an availability window", {"days", "start", "end", "tz"}, set())
        days = _list(window["days"], "a window's days", len(DAYS))
        if not days or not all(type(day) is str and day in DAYS for day in days):
            raise InvalidListing(f"a window's days are a non-empty subset of {list(DAYS)}")
        if len(set(days)) != len(days):
            raise InvalidListing("a window's days must be distinct")
        start = _clock(window["start"], "a window's start")
        end = _clock(window["end"], "a window's end")
        if start == 24 * 60 or not start < end:
            raise InvalidListing(
                "a window starts before it ends, within a day (split one that spans midnight)"
            )
        out.append({
            "days": sorted(days, key=DAYS.index), "start": window["start"],
            "end": window["end"], "tz": _zone(window["tz"]),
        })  # fmt: skip
    return out


def _plain(value: object, depth: int, budget: list[int]) -> None:
    """Refuse anything in an architecture but JSON-like values, too deep or too many."""
    budget[0] -= 1
    if budget[0] < 0:
        raise InvalidListing(f"an architecture holds more than {MAX_ARCHITECTURE_ITEMS} values")
    if depth > MAX_ARCHITECTURE_DEPTH:
        raise InvalidListing(f"an architecture nests deeper than {MAX_ARCHITECTURE_DEPTH}")
    kind = type(value)
    if value is None or kind in (bool, str):
        return
    if kind is int:
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:  # type: ignore[operator]
            raise InvalidListing(f"an architecture's integers are within ±{MAX_SAFE_INTEGER}")
        return
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise InvalidListing("an architecture's numbers are finite")
        return
    if kind is list:
        for item in value:  # type: ignore[attr-defined]
            _plain(item, depth + 1, budget)
        return
    if kind is dict:
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise InvalidListing("an architecture's map keys are text")
            _plain(item, depth + 1, budget)
        return
    raise InvalidListing(f"an architecture cannot hold a {kind.__qualname__}")


def _architecture(value: object, kind: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if kind != "model" or type(value) is not dict:
        raise InvalidListing("only a model listing has an architecture (a module spec map)")
    _plain(value, 0, [MAX_ARCHITECTURE_ITEMS])
    encoded = canonical_json(value, max_depth=MAX_ARCHITECTURE_DEPTH + 1, error=InvalidListing)
    if len(encoded) > MAX_ARCHITECTURE_BYTES:
        raise InvalidListing(f"an architecture is at most {MAX_ARCHITECTURE_BYTES} bytes encoded")
    # a copy as a reader sees it (a float with an integral value reads as an int)
    copied: dict[str, Any] = parse_canonical(
        encoded, max_bytes=MAX_ARCHITECTURE_BYTES, max_depth=MAX_ARCHITECTURE_DEPTH + 1,
        error=InvalidListing,
    )  # fmt: skip
    return copied


def _metrics(value: object, kind: str) -> list[dict[str, Any]]:
    items = _list(value, "metrics", MAX_METRICS)
    if items and kind != "model":
        raise InvalidListing("only a model listing has metrics")
    out = []
    for item in items:
        metric = _map(item, "a metric", {"name", "value"}, {"dataset", "receipt"})
        number = metric["value"]
        if type(number) not in (int, float) or not math.isfinite(number):
            raise InvalidListing("a metric's value is a finite number")
        checked: dict[str, Any] = {
            "name": _line(metric["name"], "a metric's name", MAX_NAME_CHARS, empty=False),
            "value": float(number),
        }
        if "dataset" in metric:
            checked["dataset"] = _hex32(metric["dataset"], "a metric's dataset listing_id")
        if "receipt" in metric:
            receipt = metric["receipt"]
            if type(receipt) is not bytes or not 0 < len(receipt) <= MAX_RECEIPT_BYTES:
                raise InvalidListing(
                    f"a metric's receipt is a job receipt's wire bytes (1 to {MAX_RECEIPT_BYTES})"
                )
            checked["receipt"] = receipt  # opaque here: see the module docstring
        out.append(checked)
    return out


def _sample(value: object, schema: list[dict[str, Any]]) -> dict[str, Any]:
    try:
        checked = check_sample(value, schema)
    except ValueError as exc:
        raise InvalidListing(str(exc)) from None
    if not checked:
        return checked
    encoded = canonical_json(checked, max_depth=MAX_DEPTH, error=InvalidListing)
    if len(encoded) > MAX_SAMPLE_BYTES:
        raise InvalidListing(f"a sample is at most {MAX_SAMPLE_BYTES} bytes encoded")
    return _parse(encoded, MAX_SAMPLE_BYTES)  # as every reader will see it (1.0 is 1)


# -- the listing -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ListingSpec:
    """A dataset or model listing; checked when built (InvalidListing), then read-only.

    Equality and ``hash()`` are those of the canonical bytes. Optional map entries
    (a creator's ``url``/``affiliation``, a schema entry's ``description``/``shape``, a
    metric's ``dataset``/``receipt``, ``approx_size``'s ``rows``/``bytes``) are left out
    when unknown, never ``None``.
    """

    kind: str
    listing_id: str
    host_id: str
    host_key: bytes
    name: str
    summary: str
    description: str
    license: str
    signaling_url: str
    version: int
    created_at: float
    updated_at: float
    modality: str = "other"
    citation: str | None = None
    creators: list[dict[str, str]] = dataclasses.field(default_factory=list)
    keywords: list[str] = dataclasses.field(default_factory=list)
    schema: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    approx_size: dict[str, int] = dataclasses.field(default_factory=dict)
    usage_conditions: str = ""
    access_modes: list[str] = dataclasses.field(default_factory=lambda: ["live"])
    policy_summary: str = ""
    availability: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    architecture: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tag: str = ""
    """The name the host knows it by: ``duet.store[tag]`` live, ``inputs={...: tag}`` in a
    job ("" when the owner did not say)."""
    sample: dict[str, Any] = dataclasses.field(default_factory=dict)
    """A few records the owner chose to publish, held to the schema
    (:mod:`duet_p2p.registry.sample`); ``{}`` when none."""

    def __post_init__(self) -> None:
        put = object.__setattr__
        if type(self.kind) is not str or self.kind not in KINDS:
            raise InvalidListing(f"kind is one of {list(KINDS)}")
        _hex32(self.listing_id, "listing_id")
        _hex32(self.host_id, "host_id")
        if type(self.host_key) is not bytes or len(self.host_key) != KEY_BYTES:
            raise InvalidListing(f"host_key is a {KEY_BYTES}-byte Ed25519 public key")
        if not hmac.compare_digest(id_of(self.host_key), self.host_id):
            raise InvalidListing(f"host_key does not belong to host {self.host_id}")
        _line(self.name, "name", MAX_NAME_CHARS, empty=False)
        _line(self.summary, "summary", MAX_SUMMARY_CHARS)
        _text(self.description, "description", MAX_DESCRIPTION_CHARS)
        _license(self.license)
        if self.citation is not None:
            _text(self.citation, "citation", MAX_LONG_TEXT_CHARS)
        if type(self.modality) is not str or self.modality not in MODALITIES:
            raise InvalidListing(f"modality is one of {list(MODALITIES)}")
        put(self, "creators", _creators(self.creators))
        put(self, "keywords", _keywords(self.keywords))
        put(self, "schema", _schema(self.schema, self.modality))
        put(self, "approx_size", _approx_size(self.approx_size))
        _text(self.usage_conditions, "usage_conditions", MAX_LONG_TEXT_CHARS)
        put(self, "access_modes", _access_modes(self.access_modes))
        _text(self.policy_summary, "policy_summary", MAX_POLICY_CHARS)
        put(self, "availability", _availability(self.availability))
        _url(self.signaling_url, "signaling_url")
        _count(self.version, "version", 1)
        created = _time(self.created_at, "created_at")
        updated = _time(self.updated_at, "updated_at")
        if updated < created:
            raise InvalidListing("updated_at cannot come before created_at")
        put(self, "created_at", created)
        put(self, "updated_at", updated)
        put(self, "architecture", _architecture(self.architecture, self.kind))
        put(self, "metrics", _metrics(self.metrics, self.kind))
        _line(self.tag, "tag", MAX_KEYWORD_CHARS)
        put(self, "sample", _sample(self.sample, self.schema))
        if len(self.canonical_bytes()) > MAX_BODY_BYTES:
            raise InvalidListing(f"a listing is at most {MAX_BODY_BYTES} bytes encoded")

    @classmethod
    def new(
        cls, identity: Identity, *, kind: str, now: float | None = None, **fields: Any
    ) -> ListingSpec:
        """A first version (fresh ``listing_id``, version 1) owned by ``identity``. CR LF
        and lone CR in long-form text become newlines."""
        at = time.time() if now is None else now
        try:
            return cls(
                kind=kind, listing_id=os.urandom(16).hex(), host_id=identity.id,
                host_key=identity.public_key, version=1, created_at=at, updated_at=at,
                **_newlines(fields),
            )  # fmt: skip
        except TypeError as exc:  # an unknown or missing field
            raise InvalidListing(str(exc)) from None

    def edit(self, *, now: float | None = None, **changes: Any) -> ListingSpec:
        """The next version: ``changes`` applied, ``version`` + 1, ``updated_at`` now."""
        fixed = {"kind", "listing_id", "host_id", "host_key", "version", "created_at"}
        if fixed & set(changes):
            raise InvalidListing(f"an edit cannot change {sorted(fixed & set(changes))}")
        at = max(time.time() if now is None else now, self.updated_at)
        try:
            return dataclasses.replace(
                self, version=self.version + 1, updated_at=at, **_newlines(changes)
            )
        except TypeError as exc:  # an unknown field
            raise InvalidListing(str(exc)) from None

    def to_map(self) -> dict[str, Any]:
        """The listing as the JSON object its canonical bytes encode (bytes as base64url)."""
        data = {"v": VERSION, **{name: getattr(self, name) for name in _FIELDS}}
        data.update({name: getattr(self, name) for name in _OPTIONAL_FIELDS if getattr(self, name)})
        data["host_key"] = b64url_encode(self.host_key)
        data["metrics"] = [
            {**m, "receipt": b64url_encode(m["receipt"])} if "receipt" in m else dict(m)
            for m in self.metrics
        ]
        return data

    def canonical_bytes(self) -> bytes:
        """The canonical JSON of :meth:`to_map`: the bytes hashed and signed."""
        return canonical_json(self.to_map(), max_depth=MAX_DEPTH, error=InvalidListing)

    def digest(self) -> bytes:
        return hashlib.sha256(self.canonical_bytes()).digest()

    def hash(self) -> str:
        """SHA-256 of the canonical bytes, hex: this version's content hash."""
        return self.digest().hex()

    def sign(self, identity: Identity) -> SignedListing:
        """This listing signed by its host (``identity``'s key must be ``host_key``)."""
        if not hmac.compare_digest(identity.public_key, self.host_key):
            raise InvalidListing(f"identity {identity.id} cannot sign a listing of {self.host_id}")
        signature = identity.sign_bytes(signed_message(CONTEXT, self.digest()))
        return SignedListing(self, identity.public_key, signature)

    @classmethod
    def from_bytes(cls, body: bytes) -> ListingSpec:
        """Parse canonical listing bytes (strict; InvalidListing for anything else)."""
        spec = cls.from_map(_parse(body, MAX_BODY_BYTES))
        if spec.canonical_bytes() != body:
            raise InvalidListing("the listing is not in canonical form")
        return spec

    @classmethod
    def from_map(cls, data: object) -> ListingSpec:
        """A listing from its JSON object (as :meth:`to_map` gives, e.g. parsed from a web
        API); checked, but not for canonical form: compare :meth:`canonical_bytes` to the
        bytes that were signed."""
        fields = _fields_of(data, "listing", _FIELDS, _OPTIONAL_FIELDS)
        if any(not fields[name] for name in _OPTIONAL_FIELDS if name in fields):
            raise InvalidListing("an empty optional field is left out, not sent empty")
        try:
            fields["host_key"] = _b64(fields["host_key"], "host_key", KEY_BYTES)
            fields["metrics"] = _receipts(fields["metrics"])
            return cls(**fields)
        except InvalidListing:
            raise
        except _PARSE_ERRORS as exc:
            raise InvalidListing(f"malformed listing: {str(exc)[:200]}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ListingSpec):
            return NotImplemented
        return self.canonical_bytes() == other.canonical_bytes()

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        return f"<ListingSpec {self.kind} {self.listing_id} v{self.version} of {self.host_id}>"


def _newlines(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    for name in ("description", "citation", "usage_conditions", "policy_summary"):
        if type(out.get(name)) is str:
            out[name] = out[name].replace("\r\n", "\n").replace("\r", "\n")
    return out


def _b64(value: object, what: str, size: int, *, exact: bool = True) -> bytes:
    data = b64url_decode(value, max_bytes=size, what=what, error=InvalidListing)
    if exact and len(data) != size:
        raise InvalidListing(f"{what} is {size} bytes")
    return data


def _receipts(metrics: object) -> object:
    """``metrics`` with each receipt's base64url text as bytes (the rest checked later)."""
    if type(metrics) is not list or len(metrics) > MAX_METRICS:
        return metrics
    out: list[object] = []
    for metric in metrics:
        if type(metric) is dict and "receipt" in metric:
            receipt = _b64(metric["receipt"], "a metric's receipt", MAX_RECEIPT_BYTES, exact=False)
            metric = {**metric, "receipt": receipt}
        out.append(metric)
    return out


def _parse(data: object, limit: int) -> Any:
    return parse_canonical(data, max_bytes=limit, max_depth=MAX_DEPTH, error=InvalidListing)


def _fields_of(
    data: object, what: str, fields: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The fields of a document's JSON object, checked to be ``v``, every one of
    ``fields`` and some of ``optional``, and nothing else."""
    if type(data) is not dict or not {"v", *fields} <= set(data) <= {"v", *fields, *optional}:
        extra = f" (and optionally {', '.join(optional)})" if optional else ""
        raise InvalidListing(f"a {what} has exactly the fields v, " + ", ".join(fields) + extra)
    if type(data["v"]) is not int or data["v"] != VERSION:
        raise InvalidListing(f"unknown {what} version (this one reads version {VERSION})")
    return {name: data[name] for name in (*fields, *optional) if name in data}


def signed_message(context: bytes, digest: bytes) -> bytes:
    """The exact bytes signed: the context and the digest, each length-prefixed (as jobs
    and receipts, ``duet_p2p.offline.spec.signed_message``)."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in (context, digest))


def _verify_signature(public_key: bytes, signature: bytes, message: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise InvalidListing("the signature does not hold") from None


def _pack(body: bytes, public_key: bytes, signature: bytes) -> bytes:
    """The wire form: the body (canonical JSON) inlined as an object in the envelope."""
    return b"".join((
        b'{"body":', body, b',"key":"', b64url_encode(public_key).encode(), b'","sig":"',
        b64url_encode(signature).encode(), b'","v":', str(VERSION).encode(), b"}",
    ))  # fmt: skip


def _check_key(public_key: bytes, host_id: str, expected: str | None, what: str) -> None:
    if expected is not None and not (
        type(expected) is str and hmac.compare_digest(expected, host_id)
    ):
        raise InvalidListing(f"the {what} is host {host_id}'s, not {expected!r:.40}'s")
    if not hmac.compare_digest(id_of(public_key), host_id):
        raise InvalidListing(f"the {what}'s signing key does not belong to host {host_id}")


def _key_and_signature(public_key: object, signature: object) -> None:
    if type(public_key) is not bytes or len(public_key) != KEY_BYTES:
        raise InvalidListing(f"a signing key is {KEY_BYTES} bytes")
    if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        raise InvalidListing(f"a signature is {SIGNATURE_BYTES} bytes")


def _read(data: object, limit: int, parse: Any) -> Any:
    """Run ``parse`` on a signed document's (body object, body bytes, key, signature);
    every failure is an InvalidListing (a check missed elsewhere must still fail closed)."""
    try:
        envelope = _parse(data, limit + MAX_WIRE_EXTRA)
        if type(envelope) is not dict or set(envelope) != _ENVELOPE_KEYS:
            raise InvalidListing(
                f"a signed document is an object of exactly {sorted(_ENVELOPE_KEYS)}"
            )
        if type(envelope["v"]) is not int or envelope["v"] != VERSION:
            raise InvalidListing(f"unknown document version (this one reads version {VERSION})")
        body = envelope["body"]
        if type(body) is not dict:
            raise InvalidListing("a signed document's body is a JSON object")
        body_bytes = canonical_json(body, max_depth=MAX_DEPTH, error=InvalidListing)
        if len(body_bytes) > limit:
            raise InvalidListing(f"a document's body is at most {limit} bytes")
        key = _b64(envelope["key"], "a signing key", KEY_BYTES)
        signature = _b64(envelope["sig"], "a signature", SIGNATURE_BYTES)
        return parse(body, body_bytes, key, signature)
    except InvalidListing:
        raise
    except _PARSE_ERRORS as exc:
        raise InvalidListing(f"malformed document: {str(exc)[:200]}") from None


@dataclass(frozen=True)
class SignedListing:
    """A listing and its host's signature over it."""

    spec: ListingSpec
    public_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.spec, ListingSpec):
            raise InvalidListing("a signed listing holds a ListingSpec")
        _key_and_signature(self.public_key, self.signature)

    @property
    def listing_id(self) -> str:
        return self.spec.listing_id

    @property
    def host_id(self) -> str:
        return self.spec.host_id

    @property
    def version(self) -> int:
        return self.spec.version

    def hash(self) -> str:
        return self.spec.hash()

    def verify(self, expected_host_id: str | None = None) -> None:
        """Check the signing key is the listing's ``host_key``, hashes to its ``host_id``
        (and to ``expected_host_id`` when given) and that the signature holds."""
        spec = self.spec
        _check_key(self.public_key, spec.host_id, expected_host_id, "listing")
        if not hmac.compare_digest(self.public_key, spec.host_key):
            raise InvalidListing("the listing is signed by a key other than its host_key")
        message = signed_message(CONTEXT, spec.digest())
        _verify_signature(self.public_key, self.signature, message)

    def to_wire(self) -> bytes:
        """Canonical JSON ``{"body": <listing object>, "key", "sig", "v": 1}``."""
        return _pack(self.spec.canonical_bytes(), self.public_key, self.signature)

    @classmethod
    def from_wire(cls, data: object) -> SignedListing:
        """Parse and verify a signed listing (signed by the host it names)."""

        def parse(body: object, body_bytes: bytes, key: bytes, signature: bytes) -> SignedListing:
            spec = ListingSpec.from_map(body)
            if spec.canonical_bytes() != body_bytes:
                raise InvalidListing("the listing is not in canonical form")
            signed = cls(spec, key, signature)
            signed.verify()
            return signed

        return _read(data, MAX_BODY_BYTES, parse)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<SignedListing {self.spec.listing_id} v{self.spec.version}>"


def check_successor(old: SignedListing, new: SignedListing) -> None:
    """InvalidListing unless ``new`` is a valid edit of ``old``: both verify, same listing,
    kind, host and key, ``version`` exactly one more, ``created_at`` kept and ``updated_at``
    not earlier."""
    if not isinstance(old, SignedListing) or not isinstance(new, SignedListing):
        raise InvalidListing("an edit is checked between two SignedListings")
    old.verify()
    new.verify()
    a, b = old.spec, new.spec
    if a.listing_id != b.listing_id:
        raise InvalidListing("the edit is of another listing")
    if a.host_id != b.host_id or not hmac.compare_digest(a.host_key, b.host_key):
        raise InvalidListing(f"only host {a.host_id} may edit its listing {a.listing_id}")
    if a.kind != b.kind:
        raise InvalidListing("an edit cannot change a listing's kind")
    if b.version != a.version + 1:
        raise InvalidListing(
            f"an edit of version {a.version} must be version {a.version + 1}, not {b.version} "
            "(an old or replayed edit?)"
        )
    if b.created_at != a.created_at or b.updated_at < a.updated_at:
        raise InvalidListing("an edit keeps created_at and cannot move updated_at back")


# -- deletions and heartbeats -------------------------------------------------------------


@dataclass(frozen=True)
class SignedDeletion:
    """A host's signed removal of its listing: ``version`` is the deleted version + 1."""

    listing_id: str
    host_id: str
    version: int
    at: float
    public_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _hex32(self.listing_id, "listing_id")
        _hex32(self.host_id, "host_id")
        _count(self.version, "version", 2)
        object.__setattr__(self, "at", _time(self.at, "at"))
        _key_and_signature(self.public_key, self.signature)

    @classmethod
    def issue(
        cls, identity: Identity, listing: SignedListing | ListingSpec, *, at: float | None = None
    ) -> SignedDeletion:
        """``identity``'s deletion of ``listing`` (its host's identity)."""
        spec = listing.spec if isinstance(listing, SignedListing) else listing
        if not hmac.compare_digest(identity.public_key, spec.host_key):
            raise InvalidListing(
                f"identity {identity.id} cannot delete a listing of {spec.host_id}"
            )
        fields = dict(
            listing_id=spec.listing_id, host_id=spec.host_id, version=spec.version + 1,
            at=max(time.time() if at is None else at, spec.updated_at),
        )  # fmt: skip
        draft = cls(**fields, public_key=identity.public_key, signature=bytes(SIGNATURE_BYTES))
        signature = identity.sign_bytes(draft._message())
        return cls(**fields, public_key=identity.public_key, signature=signature)

    def body_bytes(self) -> bytes:
        body = {"v": VERSION, **{name: getattr(self, name) for name in _DELETION_FIELDS}}
        return canonical_json(body, error=InvalidListing)

    def _message(self) -> bytes:
        digest = hashlib.sha256(self.body_bytes()).digest()
        return signed_message(DELETION_CONTEXT, digest)

    def verify(self, expected_host_id: str | None = None) -> None:
        """Check the key hashes to ``host_id`` (and ``expected_host_id``), the signature holds."""
        _check_key(self.public_key, self.host_id, expected_host_id, "deletion")
        _verify_signature(self.public_key, self.signature, self._message())

    def to_wire(self) -> bytes:
        return _pack(self.body_bytes(), self.public_key, self.signature)

    @classmethod
    def from_wire(cls, data: object) -> SignedDeletion:
        """Parse and verify a deletion (signed by the host it names)."""

        def parse(body: object, body_bytes: bytes, key: bytes, signature: bytes) -> SignedDeletion:
            fields = _fields_of(body, "deletion", _DELETION_FIELDS)
            deletion = cls(**fields, public_key=key, signature=signature)
            if deletion.body_bytes() != body_bytes:
                raise InvalidListing("the deletion is not in canonical form")
            deletion.verify()
            return deletion

        return _read(data, MAX_SMALL_BODY_BYTES, parse)  # type: ignore[no-any-return]


def check_deletion(listing: SignedListing, deletion: SignedDeletion) -> None:
    """InvalidListing unless ``deletion`` validly removes ``listing``: both verify, same
    listing and host key, deletion ``version`` = listing version + 1, not dated before it."""
    if not isinstance(listing, SignedListing) or not isinstance(deletion, SignedDeletion):
        raise InvalidListing("a deletion is checked against a SignedListing")
    listing.verify()
    deletion.verify()
    spec = listing.spec
    if deletion.listing_id != spec.listing_id:
        raise InvalidListing("the deletion is of another listing")
    if deletion.host_id != spec.host_id or not hmac.compare_digest(
        deletion.public_key, spec.host_key
    ):
        raise InvalidListing(f"only host {spec.host_id} may delete its listing")
    if deletion.version != spec.version + 1:
        raise InvalidListing(
            f"the deletion is of version {deletion.version - 1}, the listing is at {spec.version}"
        )
    if deletion.at < spec.updated_at:
        raise InvalidListing("the deletion is dated before the listing's last edit")


@dataclass(frozen=True)
class SignedHeartbeat:
    """A host's signed "online now, serving these listings"; ``nonce`` lets a registry
    refuse the same heartbeat twice."""

    host_id: str
    at: float
    nonce: bytes
    listing_ids: list[str]
    public_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _hex32(self.host_id, "host_id")
        object.__setattr__(self, "at", _time(self.at, "at"))
        if type(self.nonce) is not bytes or len(self.nonce) != NONCE_BYTES:
            raise InvalidListing(f"a heartbeat's nonce is {NONCE_BYTES} bytes")
        ids = self.listing_ids
        if not isinstance(ids, list | tuple) or len(ids) > MAX_HEARTBEAT_LISTINGS:
            raise InvalidListing(f"listing_ids is a list of at most {MAX_HEARTBEAT_LISTINGS}")
        checked = sorted(_hex32(i, "a listing_id") for i in ids)
        if len(set(checked)) != len(checked):
            raise InvalidListing("listing_ids must be distinct")
        object.__setattr__(self, "listing_ids", checked)
        _key_and_signature(self.public_key, self.signature)

    @classmethod
    def issue(
        cls, identity: Identity, listing_ids: Iterable[str], *, at: float | None = None
    ) -> SignedHeartbeat:
        fields = dict(
            host_id=identity.id, at=time.time() if at is None else at,
            nonce=os.urandom(NONCE_BYTES), listing_ids=list(listing_ids),
        )  # fmt: skip
        draft = cls(**fields, public_key=identity.public_key, signature=bytes(SIGNATURE_BYTES))
        signature = identity.sign_bytes(draft._message())
        return cls(**fields, public_key=identity.public_key, signature=signature)

    def body_bytes(self) -> bytes:
        body = {"v": VERSION, **{name: getattr(self, name) for name in _HEARTBEAT_FIELDS}}
        body["nonce"] = b64url_encode(self.nonce)
        return canonical_json(body, error=InvalidListing)

    def _message(self) -> bytes:
        digest = hashlib.sha256(self.body_bytes()).digest()
        return signed_message(HEARTBEAT_CONTEXT, digest)

    def verify(
        self,
        now: float,
        max_skew: float = HEARTBEAT_SKEW_SECONDS,
        *,
        expected_host_id: str | None = None,
    ) -> None:
        """Check the key and signature, and that ``at`` is within ``max_skew`` seconds of
        ``now`` (neither stale nor from the future)."""
        _check_key(self.public_key, self.host_id, expected_host_id, "heartbeat")
        _verify_signature(self.public_key, self.signature, self._message())
        if type(now) not in (int, float) or not abs(now - self.at) <= max_skew:
            raise InvalidListing(f"the heartbeat is dated {self.at}, more than {max_skew}s off")

    def to_wire(self) -> bytes:
        return _pack(self.body_bytes(), self.public_key, self.signature)

    @classmethod
    def from_wire(
        cls, data: object, now: float, max_skew: float = HEARTBEAT_SKEW_SECONDS
    ) -> SignedHeartbeat:
        """Parse and verify a heartbeat, fresh at ``now``."""

        def parse(body: object, body_bytes: bytes, key: bytes, signature: bytes) -> SignedHeartbeat:
            fields = _fields_of(body, "heartbeat", _HEARTBEAT_FIELDS)
            fields["nonce"] = _b64(fields["nonce"], "a heartbeat's nonce", NONCE_BYTES)
            beat = cls(**fields, public_key=key, signature=signature)
            if beat.body_bytes() != body_bytes:
                raise InvalidListing("the heartbeat is not in canonical form")
            beat.verify(now, max_skew)
            return beat

        return _read(data, MAX_SMALL_BODY_BYTES, parse)  # type: ignore[no-any-return]
