"""Croissant 1.1 JSON-LD for a listing: required keys, types, dtypes, hostile text."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from duet_p2p.registry.croissant import (
    CONFORMS_TO,
    CONTEXT,
    HOST_DATA_FORMAT,
    croissant_jsonld,
    data_type,
    dtype_kind,
    jsonld_dumps,
)

URL = "https://registry.example/listings/abc"


def iri(value: str) -> tuple[str, str]:
    """A vocabulary IRI as (its site's name, its path): names only, nothing is fetched."""
    parts = urlsplit(value)
    assert parts.scheme in ("http", "https") and parts.hostname is not None
    return parts.hostname.rsplit(".", 2)[-2], parts.path


def table_listing(**changes: Any) -> dict[str, Any]:
    listing: dict[str, Any] = {
        "kind": "dataset",
        "listing_id": "0123456789abcdef0123456789abcdef",
        "host_id": "fedcba9876543210fedcba9876543210",
        "name": "Hospital visits",
        "summary": "Visits per patient.",
        "description": "# Visits\n\nOne row per *visit*.",
        "license": "CC-BY-4.0",
        "citation": "@misc{visits, title={Visits}}",
        "creators": [
            {"name": "Ada", "url": "https://ada.example", "affiliation": "Clinic"},
            {"name": "Clinic Inc", "type": "organization"},
        ],
        "keywords": ["health", "visits"],
        "modality": "tabular",
        "schema": {
            "fields": [
                {"name": "age", "dtype": "int64", "description": "Age in years"},
                {"name": "weight", "dtype": "float32"},
                {"name": "smoker", "dtype": "bool"},
                {"name": "ward", "dtype": "str"},
            ]
        },
        "approx_size": {"rows": 1000},
        "usage_conditions": "Research only.",
        "access_modes": ["live", "offline_jobs"],
        "version": "1.0.0",
        "created_at": 1_700_000_000.0,
        "updated_at": 1_700_086_400.5,
        "signaling_url": "wss://signal.example",
    }
    listing.update(changes)
    return listing


def tensor_listing(**changes: Any) -> dict[str, Any]:
    tensors = [
        {"name": "weights", "dtype": "float32", "shape": [3, -1]},
        {"name": "step", "dtype": "torch.int64", "shape": []},
    ]
    return table_listing(kind="model", schema={"tensors": tensors}, **changes)


def test_required_keys_and_types() -> None:
    doc = croissant_jsonld(table_listing(), url=URL)
    assert doc["@context"] == CONTEXT
    assert doc["@type"] == "sc:Dataset"
    assert doc["conformsTo"] == CONFORMS_TO and iri(CONFORMS_TO) == ("mlcommons", "/croissant/1.1")
    assert doc["name"] == "Hospital visits"
    assert doc["description"] == "Visits per patient.\n\n# Visits\n\nOne row per *visit*."
    assert iri(doc["license"]) == ("spdx", "/licenses/CC-BY-4.0.html")
    assert doc["url"] == URL
    assert doc["identifier"] == "0123456789abcdef0123456789abcdef"
    assert doc["citeAs"] == "@misc{visits, title={Visits}}"
    assert doc["keywords"] == ["health", "visits"]
    assert doc["version"] == "1.0.0"
    assert doc["datePublished"] == "2023-11-14T22:13:20Z"
    assert doc["dateModified"] == "2023-11-15T22:13:20Z"
    assert doc["creator"] == [
        {
            "@type": "sc:Person",
            "name": "Ada",
            "url": "https://ada.example",
            "affiliation": {"@type": "sc:Organization", "name": "Clinic"},
        },
        {"@type": "sc:Organization", "name": "Clinic Inc"},
    ]


def test_context_has_the_croissant_terms() -> None:
    for term in ("citeAs", "conformsTo", "recordSet", "field", "dataType", "isArray"):
        assert term in CONTEXT
    assert iri(CONTEXT["cr"]) == ("mlcommons", "/croissant/")
    assert iri(CONTEXT["dct"]) == ("purl", "/dc/terms/")
    assert CONTEXT["@vocab"] == CONTEXT["sc"] and iri(CONTEXT["sc"]) == ("schema", "/")
    assert CONTEXT["dataType"] == {"@id": "cr:dataType", "@type": "@vocab"}


def test_data_is_not_downloadable() -> None:
    doc = croissant_jsonld(table_listing(), url=URL)
    (host_data,) = doc["distribution"]
    assert host_data["@type"] == "cr:FileObject" and host_data["@id"] == "host-data"
    assert host_data["contentUrl"] == (
        "duet://fedcba9876543210fedcba9876543210/0123456789abcdef0123456789abcdef"
    )
    assert host_data["encodingFormat"] == HOST_DATA_FORMAT
    assert "sha256" not in host_data and "md5" not in host_data
    assert doc["isLiveDataset"] is True
    assert doc["isAccessibleForFree"] is False
    access = doc["conditionsOfAccess"]
    assert "a live Duet session or offline jobs" in access
    assert "fedcba9876543210fedcba9876543210" in access
    assert "Research only." in access
    fields = doc["recordSet"][0]["field"]
    assert all(
        field["source"]
        == {"fileObject": {"@id": "host-data"}, "extract": {"column": field["name"]}}
        for field in fields
    )
    assert "http" not in host_data["contentUrl"]


def test_listing_map_form_splits_columns_and_tensors() -> None:
    schema = [
        {"name": "label", "dtype": "string", "description": "class"},
        {"name": "pixels", "dtype": "uint8", "shape": [28, 28], "description": "an image"},
    ]
    doc = croissant_jsonld(table_listing(schema=schema, version=3), url=URL)
    records, tensors = doc["recordSet"]
    assert [f["@id"] for f in records["field"]] == ["records/label"]
    assert [f["@id"] for f in tensors["field"]] == ["tensors/pixels"]
    assert tensors["field"][0]["description"] == "an image (dtype uint8, shape [28, 28])"
    assert doc["version"] == "3"
    assert croissant_jsonld(table_listing(schema=[]), url=URL)["recordSet"] == []
    with pytest.raises(ValueError, match="unique"):
        croissant_jsonld(table_listing(schema=[schema[0], {**schema[1], "name": "label"}]), url=URL)


def test_table_record_set() -> None:
    (record_set,) = croissant_jsonld(table_listing(), url=URL)["recordSet"]
    assert record_set["@type"] == "cr:RecordSet"
    assert record_set["@id"] == "records"
    fields = [{k: v for k, v in f.items() if k != "source"} for f in record_set["field"]]
    assert fields == [
        {
            "@type": "cr:Field",
            "@id": "records/age",
            "name": "age",
            "dataType": "sc:Integer",
            "description": "Age in years",
        },
        {"@type": "cr:Field", "@id": "records/weight", "name": "weight", "dataType": "sc:Float"},
        {"@type": "cr:Field", "@id": "records/smoker", "name": "smoker", "dataType": "sc:Boolean"},
        {"@type": "cr:Field", "@id": "records/ward", "name": "ward", "dataType": "sc:Text"},
    ]


def test_tensor_record_set_notes_shapes() -> None:
    (record_set,) = croissant_jsonld(tensor_listing(), url=URL)["recordSet"]
    weights, step = record_set["field"]
    assert weights["@id"] == "tensors/weights"
    assert weights["dataType"] == "sc:Float"
    assert weights["isArray"] is True
    assert weights["arrayShape"] == "3,-1"
    assert weights["description"] == "dtype float32, shape [3, -1]"
    assert step["dataType"] == "sc:Integer"
    assert "isArray" not in step and "arrayShape" not in step
    assert step["description"] == "dtype int64, shape []"


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("int8", "sc:Integer"),
        ("uint64", "sc:Integer"),
        ("torch.int32", "sc:Integer"),
        ("float16", "sc:Float"),
        ("bfloat16", "sc:Float"),
        ("Float64", "sc:Float"),
        ("bool", "sc:Boolean"),
        ("str", "sc:Text"),
        ("category", "sc:Text"),
        ("datetime64", "sc:DateTime"),
        ("date", "sc:Date"),
    ],
)
def test_dtype_mapping(dtype: str, expected: str) -> None:
    assert data_type(dtype) == expected


@pytest.mark.parametrize("dtype", ["complex64", "object", "", "int64; drop", None, 3, "x" * 65])
def test_unknown_dtype_is_refused(dtype: object) -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_kind(dtype)
    schema = {"fields": [{"name": "a", "dtype": dtype}]}
    with pytest.raises(ValueError):
        croissant_jsonld(table_listing(schema=schema), url=URL)


def test_text_dtype_is_refused_for_a_tensor() -> None:
    schema = {"tensors": [{"name": "t", "dtype": "str", "shape": [2]}]}
    with pytest.raises(ValueError, match="tensor cannot have dtype"):
        croissant_jsonld(table_listing(schema=schema), url=URL)


HOSTILE = 'a "quoted" </script><script>alert(1)</script> \\ \x00\x07\x1b[31m\u202e end'


def test_hostile_text_stays_inside_json_strings() -> None:
    listing = table_listing(
        name=HOSTILE,
        summary=HOSTILE,
        description=HOSTILE + "\n<!-- comment -->",
        citation=HOSTILE,
        keywords=[HOSTILE],
        creators=[{"name": HOSTILE, "affiliation": HOSTILE}],
        usage_conditions=HOSTILE,
        schema={"fields": [{"name": HOSTILE, "dtype": "int64", "description": HOSTILE}]},
    )
    doc = croissant_jsonld(listing, url=URL)
    text = json.dumps(doc)
    assert json.loads(text) == doc
    # Control characters, escape sequences and bidi overrides are removed, not smuggled.
    for ch in ("\x00", "\x07", "\x1b", "\u202e"):
        assert ch not in text and ch not in json.loads(text)["name"]
    assert doc["name"] == 'a "quoted" </script><script>alert(1)</script> \\  end'
    # The field's @id is one percent-encoded path segment.
    field = doc["recordSet"][0]["field"][0]
    assert re.fullmatch(r"records/[A-Za-z0-9%_~-]+", field["@id"])
    # Embedded in HTML, no value can close the script element or open a comment.
    html = jsonld_dumps(doc)
    assert "<" not in html and ">" not in html and "&" not in html
    assert "</script" not in html.lower()
    assert json.loads(html) == doc
    # Every key is one of ours: user text never becomes a key.
    assert HOSTILE not in _all_keys(doc)


def test_jsonld_dumps_escapes_script_breaking_characters() -> None:
    doc = {"a": "</script>&\u2028\u2029<!--"}
    text = jsonld_dumps(doc, indent=2)
    assert "\u2028" not in text and "\u2029" not in text and "<" not in text
    assert json.loads(text) == doc


@pytest.mark.parametrize("name", [".", "..", "a/b", "a b", "x:y", "#frag"])
def test_field_ids_are_single_segments(name: str) -> None:
    schema = {"fields": [{"name": name, "dtype": "int64"}]}
    field = croissant_jsonld(table_listing(schema=schema), url=URL)["recordSet"][0]["field"][0]
    assert field["name"] == name
    segment = field["@id"].removeprefix("records/")
    assert "/" not in segment and "." not in segment and ":" not in segment
    assert "#" not in segment and " " not in segment


@pytest.mark.parametrize(
    "url",
    ["javascript:alert(1)", "ftp://x.example/a", "https://", "", "https://a.example/\n", 5],
)
def test_page_url_must_be_http(url: object) -> None:
    with pytest.raises(ValueError, match="http"):
        croissant_jsonld(table_listing(), url=url)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"license": "MIT License"},
        {"license": "<script>"},
        {"license": None},
        {"name": ""},
        {"name": 5},
        {"name": "x" * 1001},
        {"keywords": "health"},
        {"keywords": [1]},
        {"keywords": ["k"] * 10_001},
        {"creators": [{"name": "A", "email": "a@example"}]},
        {"creators": [{"name": "A", "type": "robot"}]},
        {"creators": [{"name": "A", "url": "javascript:alert(1)"}]},
        {"creators": ["A"]},
        {"access_modes": ["download"]},
        {"created_at": float("nan")},
        {"created_at": -1.0},
        {"created_at": 1e300},
        {"updated_at": "yesterday"},
        {"created_at": True},
        {"kind": "other"},
        {"schema": None},
        {"schema": {"fields": [], "tensors": []}},
        {"schema": {"rows": []}},
        {"schema": {"fields": [{"name": "a", "dtype": "int64", "extra": 1}]}},
        {"schema": {"fields": [{"name": "a"}]}},
        {"schema": {"fields": [{"name": "", "dtype": "int64"}]}},
        {"schema": {"fields": [{"name": "a", "dtype": "int64"}] * 2}},
        {"schema": {"tensors": [{"name": "t", "dtype": "float32", "shape": [-2]}]}},
        {"schema": {"tensors": [{"name": "t", "dtype": "float32", "shape": [1.5]}]}},
        {"schema": {"tensors": [{"name": "t", "dtype": "float32", "shape": [True]}]}},
        {"schema": {"tensors": [{"name": "t", "dtype": "float32", "shape": "3,4"}]}},
        {"schema": {"tensors": [{"name": "t", "dtype": "float32", "shape": [1] * 33}]}},
        {"schema": {"tensors": [{"name": "t", "dtype": "float32"}]}},
    ],
)
def test_bad_listing_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        croissant_jsonld(table_listing(**changes), url=URL)


def test_optional_fields_may_be_absent() -> None:
    listing = {
        "name": "Minimal",
        "license": "MIT",
        "schema": {"tensors": [{"name": "x", "dtype": "uint8", "shape": [28, 28]}]},
    }
    doc = croissant_jsonld(listing, url=URL)
    assert doc["description"] == "Minimal"
    assert iri(doc["license"]) == ("spdx", "/licenses/MIT.html")
    for key in ("creator", "keywords", "citeAs", "version", "datePublished", "identifier"):
        assert key not in doc
    assert "through its host" in doc["conditionsOfAccess"]
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


def _all_keys(value: object) -> set[str]:
    if isinstance(value, dict):
        keys = set(value)
        for item in value.values():
            keys |= _all_keys(item)
        return keys
    if isinstance(value, list):
        return set().union(*(_all_keys(item) for item in value)) if value else set()
    return set()


def test_every_dtype_a_listing_may_name_has_a_croissant_type() -> None:
    from duet_p2p.registry.listing import DTYPES

    for dtype in DTYPES:
        assert data_type(dtype).startswith("sc:")
