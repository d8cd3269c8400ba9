"""Croissant documents of listings validate with ``mlcroissant`` (offline: it may fetch
nothing), for a table, tensors, a model, a mixed schema and an empty one."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from duet_p2p.identity import Identity
from duet_p2p.registry.croissant import croissant_jsonld, jsonld_dumps
from duet_p2p.registry.listing import ListingSpec

mlc = pytest.importorskip("mlcroissant")

HOST = Identity.generate()
PAGE = "http://127.0.0.1:8780/listings/"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Any connection or name lookup mlcroissant tries fails the test."""
    tried: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        tried.append(args)
        raise OSError("network access during validation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield tried
    assert tried == [], f"mlcroissant tried the network: {tried[:3]}"


def listing(**changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Hospital admissions", summary="Daily admissions by ward",
        description="# Admissions\n\n<script>x</script> one row per stay", license="CC-BY-4.0",
        signaling_url="http://127.0.0.1:8765/", modality="tabular", keywords=["health"],
        citation="@misc{adm, title={Admissions}}", usage_conditions="Research only.",
        creators=[{"name": "Ada", "url": "http://127.0.0.1/ada", "affiliation": "Clinic"}],
        access_modes=["live", "offline_jobs"], approx_size={"rows": 1000},
        schema=[
            {"name": "ward", "dtype": "category", "description": "ward name"},
            {"name": "day", "dtype": "date"}, {"name": "at", "dtype": "datetime"},
            {"name": "count", "dtype": "int64"}, {"name": "rate.x/y", "dtype": "bfloat16"},
            {"name": "flag", "dtype": "bool"}, {"name": "note", "dtype": "string"},
        ],
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(HOST, **fields)


TENSORS = [
    {"name": "images", "dtype": "uint8", "shape": [-1, 28, 28], "description": "digits"},
    {"name": "labels", "dtype": "int64", "shape": [-1]},
    {"name": "scale", "dtype": "float32", "shape": []},
]
CASES = {
    "table": listing(),
    "tensors": listing(modality="image", schema=TENSORS),
    "model": listing(
        kind="model",
        modality="image",
        schema=TENSORS[:1],
        metrics=[{"name": "accuracy", "value": 0.97}],
        architecture={"type": "Sequential"},
    ),  # fmt: skip
    "mixed": listing(modality="other", schema=[TENSORS[0], {"name": "id", "dtype": "int32"}]),
    "empty": listing(modality="other", schema=[]),
    "table_sample": listing(sample={
        "ward": ["north", None], "day": ["2024-01-02", "2024-01-03"],
        "at": ["2024-01-02T10:00:00Z", None], "count": [3, 4], "rate.x/y": [0.5, 1],
        "flag": [True, False], "note": ["<b>made up</b>", ""],
    }),
    "tensors_sample": listing(modality="image", schema=TENSORS, sample={
        "images": [[[0] * 28] * 28] * 2, "labels": [7, 1, 2], "scale": 0.5,
    }),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_listing_croissant_validates(case: str) -> None:
    spec = CASES[case]
    doc = croissant_jsonld(spec.to_map(), url=PAGE + spec.listing_id)
    text = jsonld_dumps(doc, indent=2)
    dataset = mlc.Dataset(jsonld=json.loads(text))
    issues = dataset.metadata.ctx.issues
    assert not issues.errors, issues.report()
    assert dataset.metadata.name == spec.name
    declared = {f["name"] for rs in doc["recordSet"] for f in rs["field"]}
    assert declared == {entry["name"] for entry in spec.schema}
    (host_data,) = dataset.metadata.distribution
    assert host_data.content_url == f"duet://{spec.host_id}/{spec.listing_id}"
    examples = [rs.examples for rs in dataset.metadata.record_sets]
    if not spec.sample:
        assert examples == [None] * len(examples)
    elif case == "table_sample":
        (rows,) = examples
        assert rows[0]["records/ward"] == "north" and rows[1]["records/at"] is None
        assert rows[0]["records/note"] == "<b>made up</b>" and len(rows) == 2
        assert "<b>" not in text  # escaped for a <script> element
    else:
        (records,) = examples
        assert len(records) == 2 and records[1]["tensors/labels"] == 1
        assert records[0]["tensors/scale"] == 0.5 and len(records[0]["tensors/images"]) == 28


def test_a_broken_document_is_reported() -> None:
    """The validation above can fail: mlcroissant refuses fields with no source."""
    spec = CASES["table"]
    doc = croissant_jsonld(spec.to_map(), url=PAGE + spec.listing_id)
    for field in doc["recordSet"][0]["field"]:
        del field["source"]
    with pytest.raises(mlc.ValidationError):
        mlc.Dataset(jsonld=doc)
