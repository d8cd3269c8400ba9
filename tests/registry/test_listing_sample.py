"""A listing's sample: held to its schema (types, ranges, shapes, sizes), signed with the
listing (tampering breaks the signature), read back exactly, and shown by the scientist's
``listing.sample()`` and the website's preview."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from duet_p2p.identity import Identity
from duet_p2p.registry.listing import MAX_SAMPLE_BYTES, InvalidListing, ListingSpec, SignedListing
from duet_p2p.registry.results import Listing
from duet_p2p.registry.sample import MAX_ROWS, MAX_VALUES, check_sample, sample_rows
from registry_server.site_view import sample_preview

HOST = Identity.generate()
TABLE = [
    {"name": "age", "dtype": "int64"}, {"name": "ward", "dtype": "category"},
    {"name": "weight", "dtype": "float32"}, {"name": "smoker", "dtype": "bool"},
    {"name": "admitted", "dtype": "date"}, {"name": "seen", "dtype": "datetime"},
]  # fmt: skip
ROWS = {
    "age": [34, 51, None], "ward": ["north", "south", "north"], "weight": [71.5, 80, None],
    "smoker": [True, False, None], "admitted": ["2024-01-02", "2024-02-03", None],
    "seen": ["2024-01-02T10:00:00", "2024-02-03T11:30:00+01:00", None],
}  # fmt: skip
IMAGES = [{"name": "pixels", "dtype": "uint8", "shape": [-1, 2, 3]},
          {"name": "label", "dtype": "int64", "shape": [60000]}]  # fmt: skip
PIXELS = [[[0, 1, 2], [3, 4, 5]], [[250, 251, 252], [253, 254, 255]]]


def spec(schema: list[dict[str, Any]], sample: dict[str, Any], **changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Admissions", summary="", description="", license="CC0-1.0",
        signaling_url="http://127.0.0.1:8765/", schema=schema, sample=sample,
        modality="tabular" if all("shape" not in e for e in schema) else "image",
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(HOST, **fields)


def test_a_table_and_tensors_that_fit_their_schema_are_kept_as_given() -> None:
    assert check_sample(ROWS, TABLE) == ROWS
    assert sample_rows(ROWS, TABLE) == 3
    tensors = {"pixels": PIXELS, "label": [7, 2]}
    assert check_sample(tensors, IMAGES) == tensors and sample_rows(tensors, IMAGES) == 2
    scalar = [{"name": "t", "dtype": "float64", "shape": []}]
    assert check_sample({"t": 2.5}, scalar) == {"t": 2.5} and sample_rows({"t": 2.5}, scalar) == 1
    free = [{"name": "x", "dtype": "float32", "shape": [-1, -1]}]
    assert check_sample({"x": [[1.0, 2.0], [3.0, 4.0]]}, free) == {"x": [[1.0, 2.0], [3.0, 4.0]]}
    assert check_sample({}, TABLE) == {} and check_sample({}, []) == {}


BAD_TABLES = [
    ({**ROWS, "extra": [1, 2, 3]}, "not in the schema"),
    ({k: v for k, v in ROWS.items() if k != "age"}, "missing"),
    ({**ROWS, "age": [1, 2]}, "3 values, not 2"),
    ({**ROWS, "age": [True, 2, 3]}, "integers"),
    ({**ROWS, "age": [1.5, 2, 3]}, "integers"),
    ({**ROWS, "age": [1 << 60, 2, 3]}, "integers"),
    ({**ROWS, "weight": [math.nan, 1.0, 2.0]}, "finite"),
    ({**ROWS, "weight": [math.inf, 1.0, 2.0]}, "finite"),
    ({**ROWS, "weight": [1e39, 1.0, 2.0]}, "fit float32"),
    ({**ROWS, "weight": ["1", 1.0, 2.0]}, "finite"),
    ({**ROWS, "smoker": [1, 0, 1]}, "true or false"),
    ({**ROWS, "ward": ["a\nb", "c", "d"]}, "printable"),
    ({**ROWS, "ward": ["a\u202eb", "c", "d"]}, "printable"),
    ({**ROWS, "ward": ["x" * 201, "c", "d"]}, "200 characters"),
    ({**ROWS, "ward": [3, "c", "d"]}, "text"),
    ({**ROWS, "admitted": ["2024-13-01", None, None]}, "ISO 8601 date"),
    ({**ROWS, "seen": ["yesterday", None, None]}, "ISO 8601 datetime"),
    ({**ROWS, "seen": ["2024-01-01" + " " * 40, None, None]}, "ISO 8601 datetime"),
    ({k: [] for k in ROWS}, "1 to 100"),
    ({k: [None] * (MAX_ROWS + 1) for k in ROWS}, "1 to 100"),
    ({**ROWS, "age": (1, 2, 3)}, "a list"),
    ([1, 2], "a map"),
]


@pytest.mark.parametrize(("sample", "why"), BAD_TABLES)
def test_a_table_sample_that_does_not_fit_is_refused(sample: Any, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_sample(sample, TABLE)
    with pytest.raises(InvalidListing, match=why):
        spec(TABLE, sample)


BAD_TENSORS = [
    ({"pixels": [[[0, 1, 2], [3, 4, 5]]], "label": [7, None]}, "integers"),
    ({"pixels": [[[0, 1, 256], [3, 4, 5]]], "label": [7]}, "from 0 to 255"),
    ({"pixels": [[[0, 1, -1], [3, 4, 5]]], "label": [7]}, "from 0 to 255"),
    ({"pixels": [[[0, 1], [3, 4]]], "label": [7]}, "not 3"),
    ({"pixels": [[0, 1], [3, 4]], "label": [7]}, "rank 3"),
    ({"pixels": [[[[0], [1], [2]], [3, 4, 5]]], "label": [7]}, "integers"),
    ({"pixels": [[[0, 1, 2]]], "label": [7]}, "size 1 in dimension 1"),
    ({"pixels": [], "label": [7]}, "1 to 100 records"),
    ({"pixels": [[[0, 1, 2], [3, 4, 5]]] * (MAX_ROWS + 1), "label": [7]}, "1 to 100 records"),
    ({"pixels": [[[0, 1, 2], [3, 4, 5]]], "label": 7}, "rank 1"),
]


@pytest.mark.parametrize(("sample", "why"), BAD_TENSORS)
def test_a_tensor_sample_that_does_not_fit_is_refused(sample: Any, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_sample(sample, IMAGES)


def test_ragged_tensors_and_oversize_samples_are_refused() -> None:
    free = [{"name": "x", "dtype": "float32", "shape": [-1, -1, -1]}]
    with pytest.raises(ValueError, match="rectangular"):
        check_sample({"x": [[[1.0, 2.0], [3.0]], [[4.0, 5.0], [6.0]]]}, free)
    with pytest.raises(ValueError, match="rectangular"):
        check_sample({"x": [[[1.0, 2.0]], [[4.0]]]}, free)
    with pytest.raises(ValueError, match="empty dimension"):
        check_sample({"x": [[[]]]}, free)
    wide = [{"name": f"c{i}", "dtype": "int64"} for i in range(60)]
    with pytest.raises(ValueError, match=f"at most {MAX_VALUES} values"):
        check_sample({f"c{i}": [1] * 100 for i in range(60)}, wide)
    text = [{"name": f"c{i}", "dtype": "string"} for i in range(4)]
    with pytest.raises(InvalidListing, match=f"{MAX_SAMPLE_BYTES} bytes"):
        spec(text, {f"c{i}": ["x" * 200] * 100 for i in range(4)})
    with pytest.raises(ValueError, match="needs a schema"):
        check_sample({"x": [1]}, [])


def test_the_sample_is_signed_with_the_listing_and_read_back_exactly() -> None:
    listing = spec(TABLE, ROWS)
    signed = listing.sign(HOST)
    wire = signed.to_wire()
    back = SignedListing.from_wire(wire)
    assert back.spec.sample == ROWS and back.spec == listing
    tensors = spec(IMAGES, {"pixels": PIXELS, "label": [7, 2]}).sign(HOST)
    assert SignedListing.from_wire(tensors.to_wire()).spec.sample["pixels"] == PIXELS
    # a registry that changes one value of the sample breaks the signature
    document = json.loads(wire)
    document["body"]["sample"]["age"][0] = 35
    altered = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(InvalidListing):
        SignedListing.from_wire(altered)
    # an edit may drop the sample; a sample for another schema is refused
    assert listing.edit(sample={}).sample == {}
    with pytest.raises(InvalidListing, match="missing"):
        listing.edit(schema=[*TABLE, {"name": "new", "dtype": "int64"}])


def test_the_scientist_reads_the_sample_as_a_dataframe_or_tensors() -> None:
    table = Listing(spec(TABLE, ROWS).sign(HOST))
    frame = table.sample()
    assert list(frame.columns) == [e["name"] for e in TABLE] and len(frame) == 3
    assert frame["ward"].tolist() == ["north", "south", "north"]
    assert table.has_sample and "sample: 3 record(s) from the owner" in str(table)
    assert "listing.sample()" in table._repr_html_()
    tensors = Listing(spec(IMAGES, {"pixels": PIXELS, "label": [7, 2]}).sign(HOST))
    got = tensors.sample()
    assert got["pixels"].dtype == torch.uint8 and got["pixels"].tolist() == PIXELS
    assert got["label"].dtype == torch.int64 and got["label"].shape == (2,)
    bare = Listing(spec(TABLE, {}).sign(HOST))
    assert not bare.has_sample and "sample:" not in str(bare)
    with pytest.raises(ValueError, match=r"published no sample; listing\.mock\(\)"):
        bare.sample()


def test_the_website_preview_shows_the_first_rows_and_values() -> None:
    preview = sample_preview(TABLE, ROWS)
    assert preview is not None and preview["records"] == 3
    assert preview["columns"] == [e["name"] for e in TABLE]
    assert preview["rows"][0][:3] == ["34", "north", "71.5"] and preview["rows"][2][0] == ""
    many = {k: [v[0]] * 30 for k, v in ROWS.items()}
    assert sample_preview(TABLE, many)["more_rows"] == 20  # type: ignore[index]
    shown = sample_preview(IMAGES, {"pixels": PIXELS, "label": [7, 2]})
    assert shown is not None
    pixels = shown["tensors"][0]
    assert pixels["shape"] == "[2, 2, 3]" and pixels["first"] == ["0", "1", "2", "3", "4", "5"]
    assert sample_preview(TABLE, {}) is None


OLD_WIRE = (
    '{"body":{"access_modes":["live"],"approx_size":{},"architecture":null,"availabil'
    'ity":[],"citation":null,"created_at":1790000000,"creators":[],"description":"# A'
    'ges","host_id":"65979d1248d5273db74b7552e25458f7","host_key":"XOLBWvMKeeEO8VObxW'
    '9M_B70Y84mwZyZhAbhXRinvYs","keywords":[],"kind":"dataset","license":"CC-BY-4.0",'
    '"listing_id":"ed141c9f0c7e6910808674c6e2ab6ecb","metrics":[],"modality":"tabular'
    '","name":"Ages","policy_summary":"","schema":[{"dtype":"int64","name":"age"}],"s'
    'ignaling_url":"http://127.0.0.1:8765/","summary":"Made-up ages","tag":"ages","up'
    'dated_at":1790000000,"usage_conditions":"","v":1,"version":1},"key":"XOLBWvMKeeE'
    'O8VObxW9M_B70Y84mwZyZhAbhXRinvYs","sig":"zW8f5igZGw4XfcPckvWQ3yllhGBlWUdmXlvHyPq'
    '6Swvf1STbW2XCe8uYhEbgMn8WEz-PtuZ-e_Og_S7N09SwDg","v":1}'
)
"""A listing signed before samples existed (no ``sample`` field)."""


def test_a_listing_without_a_sample_keeps_the_bytes_it_had_before_samples() -> None:
    old = SignedListing.from_wire(OLD_WIRE.encode())
    assert old.spec.sample == {} and old.to_wire() == OLD_WIRE.encode()
    assert "sample" not in json.loads(spec(TABLE, {}).canonical_bytes())
    assert "sample" in json.loads(spec(TABLE, ROWS).canonical_bytes())
    document = json.loads(OLD_WIRE)
    document["body"]["sample"] = {}  # an empty sample is left out, never sent empty
    with pytest.raises(InvalidListing, match="left out"):
        ListingSpec.from_map(document["body"])
