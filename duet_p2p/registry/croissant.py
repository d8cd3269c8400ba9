"""A listing described in Croissant 1.1, the MLCommons metadata format for ML datasets.

:func:`croissant_jsonld` turns a listing (a mapping of its fields) into a JSON-LD document
a dataset search engine or ``mlcroissant`` can read: the schema.org dataset facts (name,
description, license as an SPDX URL, creators, keywords, version, dates) and one
``cr:RecordSet`` whose ``cr:Field`` s are the table's columns or the tensors (with their
shape as ``arrayShape``).

The data is not open: it stays with its host and is reached through a Duet (live) or
offline jobs. So the one ``FileObject`` (``host-data``) stands for the data where it is,
at its host: its ``contentUrl`` is ``duet://<host_id>/<listing_id>`` (no loader can fetch
it, so none reads a web page as data) and its format is :data:`HOST_DATA_FORMAT`. The
document is an ``isLiveDataset`` (the host's data may change, so no checksum can be
given); each field's ``source`` extracts its column from ``host-data`` (``mlcroissant``
requires a source), ``isAccessibleForFree`` is false and ``conditionsOfAccess`` says how
to reach the data.

``schema`` is either a listing's list of entries (as ``ListingSpec.to_map`` gives it:
entries with a ``shape`` are tensors, the others columns) or a mapping with exactly one
of ``fields`` or ``tensors``; columns make the record set ``records``, tensors ``tensors``.

Every piece of the listing's text lands only in JSON string values, made printable first;
identifiers built from names are percent-encoded. :func:`jsonld_dumps` gives text safe to
put inside an HTML ``<script type="application/ld+json">`` element.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

from duet_p2p.text import printable

__all__ = [
    "CONFORMS_TO", "CONTEXT", "HOST_DATA_FORMAT", "MEDIA_TYPE", "croissant_jsonld", "data_type", "dtype_kind",
    "jsonld_dumps", "shape_of",
]  # fmt: skip

CONFORMS_TO = "http://mlcommons.org/croissant/1.1"
HOST_DATA_FORMAT = "application/x-duet-p2p-host-data"
"""The encoding format of the ``host-data`` file object: data reached through its host."""
HOST_DATA_ID = "host-data"
MEDIA_TYPE = f'application/ld+json; profile="{CONFORMS_TO}"'
CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "sc": "https://schema.org/",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "dct": "http://purl.org/dc/terms/",
    "annotation": "cr:annotation",
    "arrayShape": "cr:arrayShape",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "containedIn": "cr:containedIn",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "description": {"@container": "@language"},
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "excludes": "cr:excludes",
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isArray": "cr:isArray",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "name": {"@container": "@language"},
    "parentField": "cr:parentField",
    "path": "cr:path",
    "readLines": "cr:readLines",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sdVersion": "cr:sdVersion",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
    "unArchive": "cr:unArchive",
    "value": "cr:value",
}
"""The Croissant 1.1 context: the spec's Appendix 1 merged with the one ``mlcroissant``
writes for 1.1 (``https`` schema.org, as its validator and the published examples use;
``name`` and ``description`` as language maps, which plain strings also satisfy)."""

MAX_SHORT_CHARS = 1_000
MAX_TEXT_CHARS = 100_000
MAX_ITEMS = 10_000
"""Most fields, tensors, creators or keywords one document describes."""
MAX_DIMS = 32
MAX_URL_CHARS = 2_000
_SPDX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,99}")

_KINDS: dict[str, str] = {
    **dict.fromkeys(
        ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "int"),
        "integer",
    ),
    **dict.fromkeys(("float16", "bfloat16", "float32", "float64", "float"), "float"),
    "bool": "boolean",
    **dict.fromkeys(("str", "string", "text", "category"), "text"),
    **dict.fromkeys(("datetime", "datetime64"), "datetime"),
    "date": "date",
}
_DATA_TYPES = {
    "integer": "sc:Integer",
    "float": "sc:Float",
    "boolean": "sc:Boolean",
    "text": "sc:Text",
    "datetime": "sc:DateTime",
    "date": "sc:Date",
}


def dtype_kind(dtype: object) -> str:
    """``"integer"``, ``"float"``, ``"boolean"``, ``"text"``, ``"datetime"`` or ``"date"``.

    Accepts numpy and torch names (``"float32"``, ``"torch.int64"``); anything else is a
    :class:`ValueError`.
    """
    if not isinstance(dtype, str) or len(dtype) > 64:
        raise ValueError(f"unknown dtype {printable(dtype, 80)!r}")
    name = dtype.strip().lower().removeprefix("torch.").removeprefix("numpy.")
    kind = _KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown dtype {printable(dtype, 80)!r}")
    return kind


def data_type(dtype: object) -> str:
    """The Croissant ``dataType`` for one of our dtypes (``"int64"`` -> ``"sc:Integer"``)."""
    return _DATA_TYPES[dtype_kind(dtype)]


def croissant_jsonld(listing: Mapping[str, Any], *, url: str) -> dict[str, Any]:
    """The Croissant 1.1 JSON-LD document for ``listing``, whose web page is ``url``.

    ``listing`` holds the listing's fields (``name``, ``summary``, ``description``,
    ``license``, ``creators``, ``schema``, ...). Wrong types, unknown dtypes, bad shapes,
    a non-http(s) ``url`` or too many items raise :class:`ValueError`.
    """
    page = _url(url, "url")
    if listing.get("kind", "dataset") not in ("dataset", "model"):
        raise ValueError("kind must be 'dataset' or 'model'")
    name = _text(listing, "name", MAX_SHORT_CHARS, required=True)
    summary = _text(listing, "summary", MAX_SHORT_CHARS)
    body = _text(listing, "description", MAX_TEXT_CHARS, multiline=True)
    description = "\n\n".join(part for part in (summary, body) if part) or name
    doc: dict[str, Any] = {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CONFORMS_TO,
        "name": name,
        "description": description,
        "license": _license(listing.get("license")),
        "url": page,
        "distribution": [_host_data(listing)],
        "isLiveDataset": True,
        "isAccessibleForFree": False,
        "conditionsOfAccess": _access(listing),
        "recordSet": _with_examples(_record_sets(listing.get("schema")), listing.get("sample")),
    }
    optional = {
        "creator": [_creator(item) for item in _items(listing, "creators")],
        "keywords": [_string(k, "keyword", MAX_SHORT_CHARS) for k in _items(listing, "keywords")],
        "identifier": _text(listing, "listing_id", MAX_SHORT_CHARS),
        "citeAs": _text(listing, "citation", MAX_TEXT_CHARS, multiline=True),
        "version": _version(listing.get("version")),
        "datePublished": _date(listing.get("created_at"), "created_at"),
        "dateModified": _date(listing.get("updated_at"), "updated_at"),
    }
    doc.update({key: value for key, value in optional.items() if value})
    return doc


def jsonld_dumps(doc: Mapping[str, Any], *, indent: int | None = None) -> str:
    """``doc`` as JSON that is also safe inside an HTML ``<script>`` element.

    ``<``, ``>`` and ``&`` (and the JavaScript line breaks U+2028/U+2029) are written as
    ``\\uXXXX`` escapes, so no value can close the element or open a comment; the text is
    still the same JSON.
    """
    text = json.dumps(doc, ensure_ascii=False, indent=indent, allow_nan=False)
    for ch in "<>&\u2028\u2029":
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text


def _access(listing: Mapping[str, Any]) -> str:
    """How the data is reached: through its host, never downloaded."""
    modes = [_string(m, "access mode", 40) for m in _items(listing, "access_modes")]
    ways = {"live": "a live Duet session", "offline_jobs": "offline jobs the host reviews"}
    unknown = [m for m in modes if m not in ways]
    if unknown:
        raise ValueError(f"unknown access mode {unknown[0]!r}")
    how = " or ".join(ways[m] for m in modes) or "its host"
    text = (
        "The data is not downloadable: it stays with its host and is used through "
        f"{how}, with the host's approval."
    )
    host = _text(listing, "host_id", MAX_SHORT_CHARS)
    if host:
        text += f" Host ID: {host}."
    conditions = _text(listing, "usage_conditions", MAX_TEXT_CHARS, multiline=True)
    if conditions:
        text += f"\n\nUsage conditions: {conditions}"
    return text


def _host_data(listing: Mapping[str, Any]) -> dict[str, Any]:
    """The file object standing for the data at its host (never downloadable)."""
    where = "/".join(
        quote(_text(listing, key, MAX_SHORT_CHARS), safe="") or "unknown"
        for key in ("host_id", "listing_id")
    )
    return {
        "@type": "cr:FileObject",
        "@id": HOST_DATA_ID,
        "name": HOST_DATA_ID,
        "description": (
            "The data itself, held by its host: not downloadable. It is used through its "
            "host (see conditionsOfAccess)."
        ),
        "contentUrl": f"duet://{where}",
        "encodingFormat": HOST_DATA_FORMAT,
    }


def _version(value: object) -> str:
    if value is None or value == "":
        return ""
    if type(value) is int and value >= 0:
        return str(value)
    return _string(value, "version", MAX_SHORT_CHARS)


def _record_sets(schema: object) -> list[dict[str, Any]]:
    """The columns as record set ``records``, the tensors as ``tensors`` (each if any)."""
    if isinstance(schema, Mapping):
        keys = set(schema)
        if keys == {"fields"}:
            return [_record_set("records", [_column(i) for i in _list(schema["fields"], "fields")])]
        if keys == {"tensors"}:
            items = _list(schema["tensors"], "tensors")
            return [_record_set("tensors", [_tensor(i) for i in items])]
        raise ValueError("schema must have exactly one of 'fields' or 'tensors'")
    if not isinstance(schema, Sequence) or isinstance(schema, (str, bytes)):
        raise ValueError("schema must be a list of entries or a mapping")
    entries = _list(schema, "schema")
    columns = [_column(e) for e in entries if not (isinstance(e, Mapping) and "shape" in e)]
    tensors = [_tensor(e) for e in entries if isinstance(e, Mapping) and "shape" in e]
    names = [field["name"] for field in columns + tensors]
    if len(set(names)) != len(names):
        raise ValueError("field and tensor names must be unique")
    sets = [_record_set("records", columns)] if columns else []
    return sets + ([_record_set("tensors", tensors)] if tensors else [])


def _record_set(set_id: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    """One record set of ``fields``, each read from the host's data."""
    names = [field["name"] for field in fields]
    if len(set(names)) != len(names):
        raise ValueError("field and tensor names must be unique")
    about = {
        "records": "The records of the table, one field per column.",
        "tensors": "The tensors, one array field each.",
    }[set_id]
    return {
        "@type": "cr:RecordSet",
        "@id": set_id,
        "name": set_id,
        "description": about,
        "field": [
            {
                "@type": "cr:Field",
                "@id": f"{set_id}/{_segment(f['name'])}",
                **f,
                "source": {"fileObject": {"@id": HOST_DATA_ID}, "extract": {"column": f["name"]}},
            }
            for f in fields
        ],
    }


def _with_examples(sets: list[dict[str, Any]], sample: object) -> list[dict[str, Any]]:
    """Each record set with the owner's sample as its ``examples`` (Croissant's "records
    provided as example content"): a record per row, keyed by field ``@id``; for tensors,
    a record per index of their first dimension (as many as the shortest has). The sample
    is expected checked (``duet_p2p.registry.sample``); anything else is a ValueError."""
    if not sample:
        return sets
    if not isinstance(sample, Mapping):
        raise ValueError("a sample is a map from schema entry names to values")
    for record_set in sets:
        fields = record_set["field"]
        values = [sample.get(field["name"]) for field in fields]
        if any(value is None for value in values):
            raise ValueError("a sample has one entry per schema entry")
        ranked = [value for value in values if isinstance(value, list)]
        if record_set["@id"] == "records" and len(ranked) != len(values):
            raise ValueError("a sample column is a list of values")
        count = min((len(value) for value in ranked), default=1)
        record_set["examples"] = [
            {field["@id"]: value[index] if isinstance(value, list) else value
             for field, value in zip(fields, values, strict=True)}
            for index in range(min(count, MAX_ITEMS))
        ]  # fmt: skip
    return sets


def _segment(name: str) -> str:
    """``name`` as one IRI path segment: percent-encoded, dots too (no ``.``/``..``)."""
    return quote(name, safe="").replace(".", "%2E")


def _column(item: object) -> dict[str, Any]:
    spec = _mapping(item, "field", required={"name", "dtype"}, allowed={"description"})
    field: dict[str, Any] = {
        "name": _name(spec["name"], "field name"),
        "dataType": data_type(spec["dtype"]),
    }
    if spec.get("description") is not None:
        field["description"] = _string(spec["description"], "field description", 4_000)
    return field


def _tensor(item: object) -> dict[str, Any]:
    spec = _mapping(item, "tensor", required={"name", "dtype", "shape"}, allowed={"description"})
    dtype = spec["dtype"]
    kind = dtype_kind(dtype)
    if kind not in ("integer", "float", "boolean"):
        raise ValueError(f"a tensor cannot have dtype {printable(dtype, 80)!r}")
    shape = shape_of(spec["shape"])
    about = f"dtype {_dtype_name(dtype)}, shape [{', '.join(map(str, shape))}]"
    if spec.get("description"):
        about = f"{_string(spec['description'], 'tensor description', 4_000)} ({about})"
    field: dict[str, Any] = {
        "name": _name(spec["name"], "tensor name"),
        "description": about,
        "dataType": _DATA_TYPES[kind],
    }
    if shape:
        field["isArray"] = True
        field["arrayShape"] = ",".join(map(str, shape))
    return field


def _dtype_name(dtype: str) -> str:
    """The plain name of a known dtype (``"torch.float32"`` -> ``"float32"``)."""
    dtype_kind(dtype)
    return dtype.strip().lower().removeprefix("torch.").removeprefix("numpy.")


def shape_of(shape: object) -> tuple[int, ...]:
    """A validated shape: at most :data:`MAX_DIMS` sizes, each ``-1`` (unknown) or >= 0."""
    if not isinstance(shape, Sequence) or isinstance(shape, (str, bytes)):
        raise ValueError("a shape must be a list of integers")
    if len(shape) > MAX_DIMS:
        raise ValueError(f"a shape has at most {MAX_DIMS} dimensions")
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, int) or size < -1:
            raise ValueError("shape sizes must be integers >= 0, or -1 for unknown")
        if size > (1 << 62):
            raise ValueError("shape size too large")
    return tuple(shape)


def _creator(item: object) -> dict[str, Any]:
    spec = _mapping(item, "creator", required={"name"}, allowed={"url", "affiliation", "type"})
    kind = spec.get("type", "person")
    if kind not in ("person", "organization"):
        raise ValueError("a creator's type must be 'person' or 'organization'")
    creator: dict[str, Any] = {
        "@type": "sc:Organization" if kind == "organization" else "sc:Person",
        "name": _string(spec["name"], "creator name", MAX_SHORT_CHARS),
    }
    if spec.get("url"):
        creator["url"] = _url(spec["url"], "creator url")
    if spec.get("affiliation"):
        creator["affiliation"] = {
            "@type": "sc:Organization",
            "name": _string(spec["affiliation"], "affiliation", MAX_SHORT_CHARS),
        }
    return creator


def _license(value: object) -> str:
    if not isinstance(value, str) or not _SPDX_ID.fullmatch(value):
        raise ValueError("license must be an SPDX license identifier")
    return f"https://spdx.org/licenses/{quote(value, safe='.+-')}.html"


def _date(value: object, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of seconds")
    if not math.isfinite(value) or not 0 <= value < 253402300800:  # before year 10000
        raise ValueError(f"{what} is out of range")
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _url(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_URL_CHARS:
        raise ValueError(f"{what} must be an http(s) URL")
    if not value.isprintable() or any(ch.isspace() for ch in value):
        raise ValueError(f"{what} must be an http(s) URL")
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValueError(f"{what} must be an http(s) URL") from exc
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must be an http(s) URL")
    return value


def _text(
    listing: Mapping[str, Any],
    key: str,
    limit: int,
    *,
    required: bool = False,
    multiline: bool = False,
) -> str:
    value = listing.get(key)
    if value is None or value == "":
        if required:
            raise ValueError(f"{key} is required")
        return ""
    return _string(value, key, limit, multiline=multiline)


def _name(value: object, what: str) -> str:
    name = _string(value, what, MAX_SHORT_CHARS)
    if not name:
        raise ValueError(f"{what} must not be empty")
    return name


def _string(value: object, what: str, limit: int, *, multiline: bool = False) -> str:
    """``value`` if a string within ``limit``, made printable."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    return printable(value, limit, multiline=multiline)


def _items(listing: Mapping[str, Any], key: str) -> list[Any]:
    value = listing.get(key)
    return [] if value is None else _list(value, key)


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ValueError(f"{what} must be a list")
    if len(value) > MAX_ITEMS:
        raise ValueError(f"{what} has more than {MAX_ITEMS} items")
    return list(value)


def _mapping(
    value: object,
    what: str,
    *,
    required: set[str],
    allowed: frozenset[str] | set[str] = frozenset(),
) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"each {what} must be a mapping")
    unknown = set(value) - required - set(allowed)
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(map(str, unknown))}")
    missing = required - set(value)
    if missing:
        raise ValueError(f"{what} is missing {sorted(missing)}")
    return value
