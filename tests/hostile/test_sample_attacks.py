"""A listing's sample under attack.

A hostile registry or peer (signing with its own key) sends crafted samples to scientists
and to the registry server: wrong types, out-of-range numbers, deep nesting, huge literals,
ragged tensors, markup. Each must be an InvalidListing, cheap to refuse, and whatever is
accepted must read back, convert to tensors and show on the website without a crash.

An owner slips: the sample copies hosted records in a form the copy check does not expect
(float32 columns typed as decimals, a 1-D table, a schema override). The check should
catch the slip or refuse to guess (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd
import pytest
import torch

from duet_p2p.host.publish import PublishError, _sample, describe
from duet_p2p.host.publish_sample import TextTable, sample_values
from duet_p2p.identity import Identity
from duet_p2p.registry.canonical_json import canonical_json
from duet_p2p.registry.listing import (
    CONTEXT,
    InvalidListing,
    ListingSpec,
    SignedListing,
    _pack,
    signed_message,
)
from duet_p2p.registry.results import Listing
from duet_p2p.registry.sample import MAX_VALUES, check_sample
from duet_p2p.schema import from_dataframe, schema_for_tensor
from duet_p2p.store import StoredObject
from registry_server.app import RunningRegistry, start_registry
from registry_server.keys import STORE, RegistrySettings
from registry_server.site_view import listing_model, sample_preview

MALLORY = Identity.generate()
MIXED = [{"name": "t", "dtype": "int64", "shape": [-1]}, {"name": "c", "dtype": "int64"}]


def spec(schema: list[dict[str, Any]], sample: dict[str, Any], **changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Sample attacks", summary="", description="", license="MIT",
        signaling_url="http://127.0.0.1:8765/", schema=schema, sample=sample,
        modality="tabular" if all("shape" not in e for e in schema) else "other",
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(MALLORY, **fields)


def forge(schema: list[dict[str, Any]], sample: object, *, raw: bytes | None = None) -> bytes:
    """A listing signed by MALLORY's own key whose body holds ``sample`` as given (never
    checked on the way out); ``raw`` replaces the placeholder value 424242 in the bytes."""
    body = spec(schema, {}).to_map()
    body["sample"] = sample
    data = canonical_json(body, max_depth=100_000)
    if raw is not None:
        data = data.replace(b"424242", raw)
    signature = MALLORY.sign_bytes(signed_message(CONTEXT, hashlib.sha256(data).digest()))
    return _pack(data, MALLORY.public_key, signature)


# -- a hostile registry or peer ---------------------------------------------------------------

COLUMN = {
    "int64": [{"name": "x", "dtype": "int64"}],
    "uint8": [{"name": "x", "dtype": "uint8"}],
    "float16": [{"name": "x", "dtype": "float16"}],
    "bfloat16": [{"name": "x", "dtype": "bfloat16"}],
    "float64": [{"name": "x", "dtype": "float64"}],
    "bool": [{"name": "x", "dtype": "bool"}],
    "string": [{"name": "x", "dtype": "string"}],
    "date": [{"name": "x", "dtype": "date"}],
}
WIRE_REFUSALS = [
    ("int64", {"x": [True]}, None),  # bool is not an int
    ("int64", {"x": [1.5]}, None),
    ("int64", {"x": [424242]}, b"9007199254740992"),  # 2**53 reads as a float
    ("int64", {"x": [424242]}, b"9" * 500),  # a huge literal
    ("uint8", {"x": [-1]}, None),
    ("uint8", {"x": [256]}, None),
    ("float16", {"x": [70000]}, None),
    ("float16", {"x": [424242]}, b"1e+308"),
    ("bfloat16", {"x": [424242]}, b"1e+308"),
    ("float64", {"x": [424242]}, b"1e+400"),  # infinity
    ("float64", {"x": [424242]}, b"NaN"),
    ("float64", {"x": [False]}, None),
    ("float64", {"x": ["1"]}, None),
    ("bool", {"x": [0]}, None),
    ("string", {"x": ["a\u202eb"]}, None),
    ("string", {"x": ["\x1b[2J"]}, None),
    ("date", {"x": ["2024-02-30"]}, None),
    ("int64", {"x": {"a": 1}}, None),
    ("int64", {"x": []}, None),
    ("int64", {"x": [1], "y": [2]}, None),
    ("int64", {"x": [[1]]}, None),
]


@pytest.mark.parametrize(("dtype", "sample", "raw"), WIRE_REFUSALS)
def test_crafted_sample_values_on_the_wire_are_invalid_listings(
    dtype: str, sample: object, raw: bytes | None
) -> None:
    with pytest.raises(InvalidListing):
        SignedListing.from_wire(forge(COLUMN[dtype], sample, raw=raw))


def test_crafted_tensor_shapes_and_nesting_are_invalid_listings() -> None:
    free = [{"name": "t", "dtype": "float32", "shape": [-1, -1]}]
    deep = [{"name": "t", "dtype": "float32", "shape": [-1] * 32}]
    nested: Any = 1.0
    for _ in range(60):  # deeper than the listing allows
        nested = [nested]
    for schema, sample in (
        (free, {"t": [[1.0, 2.0], [3.0]]}),  # ragged
        (free, {"t": [[1.0, None]]}),
        (free, {"t": [[]]}),
        (free, {"t": [1.0]}),  # wrong rank
        (free, {"t": [[1.0]] * 101}),  # too many records
        (free, {"t": [[1.0] * (MAX_VALUES + 1)]}),  # too many values
        (deep, {"t": nested}),
        ([{"name": "t", "dtype": "float32", "shape": [1, 3]}], {"t": [[1.0, 2.0, 3.0]] * 2}),
    ):
        with pytest.raises(InvalidListing):
            SignedListing.from_wire(forge(schema, sample))
    # a nesting far past any limit (a recursion bomb) is refused too
    bomb = forge(free, {"t": [[424242]]}, raw=b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(InvalidListing):
        SignedListing.from_wire(bomb)


def test_the_largest_accepted_samples_are_cheap_to_check_convert_and_show() -> None:
    """Samples at the limits: validation, listing.sample() and the preview stay fast."""
    rank32 = [{"name": "t", "dtype": "float64", "shape": [-1] + [1] * 31}]
    chain: Any = 1.5
    for _ in range(31):
        chain = [chain]
    wide = [{"name": f"c{i}", "dtype": "datetime"} for i in range(50)]
    cases = [
        (rank32, {"t": [chain] * 100}),
        ([{"name": "t", "dtype": "int64", "shape": [100, 49]}],
         {"t": [[-9] * 49] * 100}),  # 5,000 values less the walk's own
        (wide, {f"c{i}": ["2024-01-02T10:00:00+01:00"] * 40 for i in range(50)}),
    ]  # fmt: skip
    for schema, sample in cases:
        started = time.perf_counter()
        signed = SignedListing.from_wire(forge(schema, sample))
        listing = Listing(signed)
        got = listing.sample()
        preview = sample_preview(signed.spec.schema, signed.spec.sample)
        assert preview is not None and got is not None
        assert time.perf_counter() - started < 2.0


def test_accepted_edge_values_read_back_and_convert_exactly() -> None:
    schema = [
        {"name": "h", "dtype": "float16", "shape": [-1]},
        {"name": "b", "dtype": "bfloat16", "shape": [-1]},
        {"name": "f", "dtype": "float32", "shape": [-1]},
        {"name": "i", "dtype": "int64", "shape": [-1]},
        {"name": "u", "dtype": "uint8", "shape": [-1]},
        {"name": "z", "dtype": "bool", "shape": [-1]},
    ]
    sample = {
        "h": [65503.9, -0.0], "b": [3.3e38, 1e-45], "f": [3.39e38, 1e-50],
        "i": [(1 << 53) - 1, -((1 << 53) - 1)], "u": [0, 255], "z": [True, False],
    }  # fmt: skip
    built = spec(schema, sample)
    back = SignedListing.from_wire(built.sign(MALLORY).to_wire())
    assert back.spec == built and back.spec.canonical_bytes() == built.canonical_bytes()
    tensors = Listing(back).sample()
    for name, tensor in tensors.items():
        assert bool(torch.isfinite(tensor.float()).all()), name
    assert tensors["i"].tolist() == [(1 << 53) - 1, -((1 << 53) - 1)]
    assert tensors["u"].dtype == torch.uint8 and tensors["u"].tolist() == [0, 255]
    assert tensors["z"].dtype == torch.bool


def test_the_preview_of_a_mixed_schema_does_not_crash() -> None:
    signed = SignedListing.from_wire(forge(MIXED, {"t": [1, 2, 3], "c": [7]}))
    preview = sample_preview(signed.spec.schema, signed.spec.sample)
    assert preview is not None and preview["rows"] == [["7"]]
    listing_model(signed.spec, viewer_zone="UTC", now=time.time(), description_html="")


def test_the_preview_shows_every_column_row_after_a_scalar_tensor() -> None:
    schema = [{"name": "t", "dtype": "int64", "shape": []}, {"name": "c", "dtype": "int64"}]
    preview = sample_preview(schema, check_sample({"t": 5, "c": [1, 2, 3]}, schema))
    assert preview is not None and len(preview["rows"]) == 3


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}",
                                requests_per_second=1000.0, burst=1000,
                                writes_per_minute=60_000.0)  # fmt: skip
    async with await start_registry(settings) as running:
        yield running


async def _page(registry: RunningRegistry, wire: bytes) -> tuple[int, str]:
    signed = await registry.app[STORE].publish(wire)
    timeout = aiohttp.ClientTimeout(total=20)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{registry.url}/listings/{signed.listing_id}") as response,
    ):
        return response.status, await response.text()


async def test_the_website_escapes_markup_in_a_hostile_sample(registry: RunningRegistry) -> None:
    xss = '<img src=x onerror="window.__pwned=1">'
    schema = [{"name": xss[:60], "dtype": "category"}, {"name": "when", "dtype": "datetime"}]
    wire = forge(schema, {xss[:60]: [xss, "<script>alert(1)</script>"],
                          "when": ["2024-01-01<10:00", None]})  # fmt: skip
    status, html = await _page(registry, wire)
    assert status == 200
    assert "Sample from the owner" in html and "&lt;script&gt;alert(1)" in html
    assert "<img src=x" not in html and "<script>alert" not in html
    assert "2024-01-01&lt;10:00" in html


async def test_a_mixed_schema_sample_does_not_break_the_listing_page(
    registry: RunningRegistry,
) -> None:
    status, html = await _page(registry, forge(MIXED, {"t": [1, 2, 3], "c": [7]}))
    assert status == 200 and "Sample from the owner" in html


@pytest.mark.parametrize("separator", ["\x00", "\n", "\u202e", "\x1b"])
def test_a_datetime_sample_value_is_printable(separator: str) -> None:
    wire = forge([{"name": "x", "dtype": "datetime"}], {"x": [f"2024-01-01{separator}10:00"]})
    with pytest.raises(InvalidListing):
        SignedListing.from_wire(wire)


def test_the_sample_dataframe_keeps_the_schema_dtypes() -> None:
    schema = [{"name": "w", "dtype": "float32"}, {"name": "k", "dtype": "int8"}]
    built = spec(schema, {"w": [1.0, 2.0], "k": [1, 2]})
    back = SignedListing.from_wire(built.sign(MALLORY).to_wire())
    frame = Listing(back).sample()
    assert str(frame["w"].dtype) == "float32" and str(frame["k"].dtype) == "Int8"  # nullable


def test_a_sample_reads_back_with_equal_canonical_bytes() -> None:
    """1.0, -0.0 and 1e20 change type on the way through canonical JSON, not bytes."""
    schema = [{"name": "x", "dtype": "float64"}]
    built = spec(schema, {"x": [1.0, -0.0, 1e20, 2.5]})
    back = SignedListing.from_wire(built.sign(MALLORY).to_wire())
    assert back.spec.canonical_bytes() == built.canonical_bytes()
    assert back.spec.sample == {"x": [1, 0, 1e20, 2.5]}
    assert ListingSpec.from_bytes(back.spec.canonical_bytes()) == built
    tricky = [5e-324, 2.2250738585072014e-308, 1e-7, 0.1, 1e21, 2.0**53, 2.0**53 + 2,
              1.2345678901234568e20, 1.7976931348623157e308, -1e-6]  # fmt: skip
    built = spec(schema, {"x": tricky})
    back = SignedListing.from_wire(built.sign(MALLORY).to_wire())
    assert back.spec == built and [float(v) for v in back.spec.sample["x"]] == tricky


def test_a_huge_int_in_a_float_column_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="finite"):
        check_sample({"x": [10**400]}, COLUMN["float64"])


@pytest.mark.parametrize(
    ("dtype", "value"), [("float64", 1 << 60), ("datetime", "2024-01-01\ud80010:00")]
)
def test_a_sample_that_cannot_be_encoded_is_an_invalid_listing(dtype: str, value: object) -> None:
    with pytest.raises(InvalidListing):
        spec([{"name": "x", "dtype": dtype}], {"x": [value]})


# -- an owner's slip ----------------------------------------------------------------------------


def hosted_frame(frame: pd.DataFrame) -> StoredObject:
    value, schema = from_dataframe(frame)
    return StoredObject(id="a" * 32, value=value, origin="owner", tags=("t",), schema=schema)


def hosted_tensor(tensor: torch.Tensor, columns: list[str] | None = None) -> StoredObject:
    schema = schema_for_tensor(tensor, columns, None, 1)
    return StoredObject(id="a" * 32, value=tensor, origin="owner", tags=("t",), schema=schema)


def refused_as_copy(
    record: StoredObject,
    sample: object,
    value: object = None,
    entries: list[dict[str, Any]] | None = None,
) -> bool:
    """Whether publishing ``sample`` for ``record`` is refused as a copy (what
    ``listing_fields`` does, without a host)."""
    schema = entries if entries is not None else describe(record, value).schema
    try:
        _sample(sample, schema, record, False)
    except PublishError as exc:
        assert "is a record of the hosted data" in str(exc), exc
        return True
    return False


FRAME = pd.DataFrame({
    "age": [34.0, 51.0, np.nan, 67.0], "ward": pd.Categorical(["north", "south", None, "east"]),
    "smoker": [True, False, True, False], "visits": pd.array([1, None, 3, 4], dtype="Int64"),
    "name": ["ann", "bob", "cy", "di"],
})  # fmt: skip
F32 = pd.DataFrame({"w": np.array([71.3, 80.1, 65.2], dtype=np.float32), "k": [1, 2, 3]})
IMAGES = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3) / 7


def test_copies_the_check_catches() -> None:
    frame = hosted_frame(FRAME)
    for sample in (
        FRAME.head(2),
        FRAME.iloc[[2]],  # NaN and a missing category
        FRAME.iloc[[1]][["smoker", "name", "visits", "ward", "age"]],  # columns reordered
        FRAME.iloc[[3]].to_dict("list"),
        {"age": [67], "ward": ["east"], "smoker": [False], "visits": [4], "name": ["di"]},
    ):
        assert refused_as_copy(frame, sample, FRAME)
    as_hosted = {"age": [51], "ward": ["south"], "smoker": [0.0], "visits": [None], "name": ["bob"]}
    assert refused_as_copy(frame, as_hosted)  # by tag: numbers as the hosted float64
    assert refused_as_copy(hosted_frame(F32), F32.tail(1), F32)  # float32 from the frame itself
    tensor = hosted_tensor(IMAGES)
    assert refused_as_copy(tensor, IMAGES[1:3])
    assert refused_as_copy(tensor, IMAGES[1:2].double().numpy())  # float64 array of float32 data
    assert refused_as_copy(
        tensor, {"t": [[[round(v, 9) for v in row] for row in IMAGES[3].tolist()]]}
    )
    flat = hosted_tensor(torch.tensor([3.5, 4.25, 9.0]))  # records that are scalars
    assert refused_as_copy(flat, torch.tensor([4.25]))
    assert refused_as_copy(flat, {"t": [9]})
    typed = hosted_tensor(torch.tensor([[71.3, 1.0], [80.1, 2.0]]), ["w", "k"])  # float32 table
    assert refused_as_copy(typed, TextTable(["k", "w"], [["1", "71.3"]]))
    booleans = hosted_tensor(torch.tensor([[True, False], [False, False]]))
    assert refused_as_copy(booleans, {"t": [[True, False]]})
    # not copies: a changed value, or something that is not a sample at all
    assert not refused_as_copy(frame, {"age": [67.5], "ward": ["east"], "smoker": [False],
                                       "visits": [4], "name": ["di"]}, FRAME)  # fmt: skip
    with pytest.raises(PublishError, match="DataFrame, a tensor"):
        _sample(FRAME["age"], describe(frame, FRAME).schema, frame, False)  # a Series


@pytest.mark.parametrize("by_object", [True, False], ids=["by_object", "by_tag"])
@pytest.mark.parametrize("form", ["typed", "csv"])
def test_a_float32_column_copied_as_decimals_is_caught(by_object: bool, form: str) -> None:
    sample: object = {"w": [71.3], "k": [1]}
    if form == "csv":
        sample = TextTable(["w", "k"], [["71.3", "1"]])
    assert refused_as_copy(hosted_frame(F32), sample, F32 if by_object else None)


def test_host_publish_refuses_a_float32_row_typed_as_decimals(tmp_path: Path) -> None:
    from duet_p2p.host.jobs import JobSettings
    from tests.host.test_host_publish import quiet_host, registry_get, running_registry

    with (
        running_registry(tmp_path) as registry,
        quiet_host(tmp_path, jobs=JobSettings(enabled=False)) as host,
    ):
        host.send(F32, tags=["weights"])
        try:
            listing = host.publish(F32, registry_url=registry.url, name="Weights",
                                   license="CC0-1.0", sample={"w": [71.3], "k": [1]})  # fmt: skip
        except PublishError as exc:
            assert "is a record of the hosted data" in str(exc)
            return
        leaked = registry_get(registry.url, listing.id).sample()
        assert leaked["w"].tolist() != [71.3], "a hosted row is public on the registry"


def test_a_one_column_table_hosted_as_a_1d_tensor_is_checked() -> None:
    record = hosted_tensor(torch.tensor([3.5, 4.25, 9.0]), ["x"])
    assert describe(record).schema == [{"name": "x", "dtype": "float32"}]
    assert refused_as_copy(record, {"x": [4.25]})


SUBSET = [{"name": "age", "dtype": "float64"}, {"name": "ward", "dtype": "category"}]
OVERRIDES = [
    pytest.param(hosted_frame(FRAME), {"age": [51.0], "ward": ["south"]}, SUBSET,
                 id="subset_of_columns"),  # what PublishError advises past 500 columns
    pytest.param(hosted_tensor(torch.tensor([[1.5, 2.5], [3.5, 4.5]])),
                 {"a": [3.5], "b": [4.5]},
                 [{"name": "a", "dtype": "float32"}, {"name": "b", "dtype": "float32"}],
                 id="tabular_schema_over_a_plain_tensor"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "sample", "entries"), OVERRIDES)
def test_a_schema_override_does_not_switch_the_copy_check_off(
    record: StoredObject, sample: dict[str, Any], entries: list[dict[str, Any]]
) -> None:
    assert refused_as_copy(record, sample, entries=entries)


def test_a_csv_sample_naming_a_column_twice_is_refused() -> None:
    schema = [{"name": "a", "dtype": "int64"}]
    with pytest.raises(ValueError):
        sample_values(TextTable(["a", "a"], [["1", "2"]]), schema)


def test_the_published_sample_is_a_copy_the_caller_cannot_change() -> None:
    rows = {"x": [1, 2]}
    built = spec(COLUMN["int64"], rows)
    rows["x"].append(10**30)  # the caller's list, changed after the listing was built
    assert built.sample == {"x": [1, 2]}
    assert json.loads(built.canonical_bytes())["sample"] == {"x": [1, 2]}
