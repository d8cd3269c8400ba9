"""Signed registry listings, edits, deletions and heartbeats: round trips and attacks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from typing import Any

import pytest

from duet_p2p.identity import Identity
from duet_p2p.registry import listing as listing_module
from duet_p2p.registry.canonical_json import b64url_encode, canonical_json
from duet_p2p.registry.listing import (
    InvalidListing,
    ListingSpec,
    SignedDeletion,
    SignedHeartbeat,
    SignedListing,
    check_deletion,
    check_successor,
)

HOST = Identity.generate()
OTHER = Identity.generate()
NOW = 1_750_000_000.0


def make(identity: Identity = HOST, **changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Hospital admissions 2024", summary="Daily admissions by ward",
        description="# Admissions\n\nOne row per stay.\n\t- anonymised", license="CC-BY-4.0",
        signaling_url="https://127.0.0.1:8765/", modality="tabular",
        citation="Doe J. (2024). Admissions.", creators=[{"name": "J. Doe", "url":
        "https://127.0.0.1/doe", "affiliation": "St. Example"}, {"name": "A. Roe"}],
        keywords=["health", "admissions"],
        schema=[{"name": "ward", "dtype": "category", "description": "the ward"},
                {"name": "age", "dtype": "int32"}],
        approx_size={"rows": 120_000, "bytes": 9_000_000},
        usage_conditions="Research only.\nNo re-identification.",
        access_modes=["offline_jobs", "live"], policy_summary="Means and counts over 20 rows.",
        availability=[{"days": ["tue", "mon"], "start": "09:00", "end": "17:30",
                       "tz": "Europe/Paris"}],
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(identity, now=NOW, **fields)


def make_model(**changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="model", modality="image",
        schema=[{"name": "pixels", "dtype": "float32", "shape": [-1, 3, 224, 224]}],
        architecture={"type": "Sequential", "layers": [{"type": "Linear", "in": 4, "out": 2}]},
        metrics=[{"name": "accuracy", "value": 0.91, "dataset": "ab" * 16}],
    )  # fmt: skip
    fields.update(changes)
    return make(**fields)


def body_of(spec: ListingSpec, **changes: Any) -> bytes:
    """Canonical bytes of ``spec``'s map with ``changes`` (bypassing the checks)."""
    data = spec.to_map()
    data.update({k: b64url_encode(v) if type(v) is bytes else v for k, v in changes.items()})
    return canonical_json(data)


def pack(body: bytes, key: bytes, signature: bytes) -> bytes:
    """A wire document built independently of the module: the body inlined as an object."""
    envelope = {"v": 1, "body": json.loads(body), "key": b64url_encode(key),
                "sig": b64url_encode(signature)}  # fmt: skip
    return canonical_json(envelope)


def sign_body(
    body: bytes, identity: Identity = HOST, context: bytes = listing_module.CONTEXT
) -> bytes:
    message = len(context).to_bytes(4, "big") + context + (32).to_bytes(4, "big")
    message += hashlib.sha256(body).digest()
    return pack(body, identity.public_key, identity.sign_bytes(message))


# -- round trips -------------------------------------------------------------------------


def test_dataset_round_trip() -> None:
    spec = make()
    signed = spec.sign(HOST)
    signed.verify(HOST.id)
    back = SignedListing.from_wire(signed.to_wire())
    assert back.spec == spec and back.hash() == spec.hash()
    assert back.to_wire() == signed.to_wire()
    assert back.spec.access_modes == ["live", "offline_jobs"]  # stored sorted
    assert back.spec.availability[0]["days"] == ["mon", "tue"]
    assert back.spec.host_id == HOST.id and back.version == 1
    assert back.spec.description.startswith("# Admissions\n")


def test_model_round_trip_with_receipt_metric() -> None:
    from tests.offline.test_receipt import issue

    receipt = issue()
    spec = make_model(
        metrics=[{"name": "auc", "value": 1, "dataset": "cd" * 16, "receipt": receipt.to_wire()}]
    )
    back = SignedListing.from_wire(spec.sign(HOST).to_wire())
    assert back.spec == spec
    assert back.spec.metrics[0]["value"] == 1.0
    assert back.spec.architecture == spec.architecture


def test_canonical_determinism() -> None:
    a = make(keywords=["x", "y"], creators=[{"affiliation": "U", "name": "N"}])
    b = ListingSpec(**{name: getattr(a, name) for name in listing_module._FIELDS})
    assert a.canonical_bytes() == b.canonical_bytes() and a.hash() == b.hash()
    # the same signature bytes for the same document: Ed25519 is deterministic
    assert a.sign(HOST).to_wire() == b.sign(HOST).to_wire()
    assert make().listing_id != make().listing_id  # fresh random IDs


def test_crlf_normalised_by_new_but_refused_raw() -> None:
    spec = make(description="a\r\nb\rc")
    assert spec.description == "a\nb\nc"
    with pytest.raises(InvalidListing, match="description"):
        ListingSpec(**{**_fields(spec), "description": "a\r\nb"})


def _fields(spec: ListingSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in listing_module._FIELDS}


# -- signatures and keys -----------------------------------------------------------------


def test_forged_signature_refused() -> None:
    signed = make().sign(HOST)
    forged = SignedListing(signed.spec, signed.public_key, bytes(64))
    with pytest.raises(InvalidListing, match="signature"):
        forged.verify()
    with pytest.raises(InvalidListing, match="signature"):
        SignedListing.from_wire(forged.to_wire())


def test_field_altered_after_signing_refused() -> None:
    signed = make().sign(HOST)
    body = body_of(signed.spec, license="MIT")
    wire = pack(body, signed.public_key, signed.signature)
    with pytest.raises(InvalidListing, match="signature"):
        SignedListing.from_wire(wire)
    altered = SignedListing(make(name="Something else"), signed.public_key, signed.signature)
    with pytest.raises(InvalidListing, match="signature"):
        altered.verify()


def test_key_not_hashing_to_host_id_refused() -> None:
    spec = make()
    with pytest.raises(InvalidListing, match="does not belong"):
        ListingSpec(**{**_fields(spec), "host_key": OTHER.public_key})
    body = body_of(spec, host_key=OTHER.public_key)
    with pytest.raises(InvalidListing, match="does not belong"):
        SignedListing.from_wire(sign_body(body, OTHER))
    with pytest.raises(InvalidListing, match="cannot sign"):
        spec.sign(OTHER)
    # another host re-signing this host's listing with its own key
    wire = sign_body(spec.canonical_bytes(), OTHER)
    with pytest.raises(InvalidListing, match="does not belong"):
        SignedListing.from_wire(wire)


def test_expected_host_id() -> None:
    signed = make().sign(HOST)
    with pytest.raises(InvalidListing, match="not"):
        signed.verify(OTHER.id)


def test_wrong_context_refused() -> None:
    spec = make()
    for context in (b"duet_p2p job v1", b"duet_p2p receipt v1", listing_module.DELETION_CONTEXT):
        with pytest.raises(InvalidListing, match="signature"):
            SignedListing.from_wire(sign_body(spec.canonical_bytes(), context=context))
    assert SignedListing.from_wire(sign_body(spec.canonical_bytes())).spec == spec


def test_job_presented_as_listing_refused() -> None:
    from tests.offline.test_spec import make_signed

    with pytest.raises(InvalidListing):
        SignedListing.from_wire(make_signed().to_wire())


# -- strict wire form --------------------------------------------------------------------


def test_unknown_and_missing_fields_refused() -> None:
    spec = make()
    with pytest.raises(InvalidListing, match="exactly the fields"):
        SignedListing.from_wire(sign_body(body_of(spec, extra=1)))
    data = spec.to_map()
    del data["citation"]
    with pytest.raises(InvalidListing, match="exactly the fields"):
        SignedListing.from_wire(sign_body(canonical_json(data)))
    with pytest.raises(InvalidListing, match="fields"):
        make(creators=[{"name": "x", "email": "x@localhost"}])
    with pytest.raises(InvalidListing):
        make(unknown_field="x")
    with pytest.raises(InvalidListing):
        spec.edit(unknown_field="x")


def test_optional_entry_as_none_is_not_canonical() -> None:
    with pytest.raises(InvalidListing, match="creator's url"):
        make(creators=[{"name": "x", "url": None}])


def test_wire_format() -> None:
    signed = make().sign(HOST)
    wire = signed.to_wire()
    document = json.loads(wire)
    assert list(document) == ["body", "key", "sig", "v"] and document["v"] == 1
    assert document["key"] == b64url_encode(HOST.public_key)
    assert document["sig"] == b64url_encode(signed.signature)
    assert canonical_json(document["body"]) == signed.spec.canonical_bytes()
    assert document["body"]["host_key"] == b64url_encode(HOST.public_key)
    assert canonical_json(document) == wire
    # the signed message, rebuilt from the JSON alone (as a browser would)
    digest = hashlib.sha256(canonical_json(document["body"])).digest()
    message = b"".join(len(p).to_bytes(4, "big") + p for p in (b"duet_p2p listing v1", digest))
    assert HOST.sign_bytes(message) == signed.signature
    assert signed.hash() == hashlib.sha256(signed.spec.canonical_bytes()).hexdigest()
    assert ListingSpec.from_bytes(signed.spec.canonical_bytes()) == signed.spec
    assert ListingSpec.from_map(document["body"]) == signed.spec


def test_non_canonical_body_refused() -> None:
    spec = make()
    data = spec.to_map()
    unsorted = json.dumps(dict(reversed(list(data.items())))).encode()
    with pytest.raises(InvalidListing, match="canonical"):
        ListingSpec.from_bytes(unsorted)
    spaced = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
    with pytest.raises(InvalidListing, match="canonical"):
        ListingSpec.from_bytes(spaced)
    wire = spec.sign(HOST).to_wire()
    for bad in (wire + b"\n", b" " + wire, wire.replace(b'"v":1', b'"v":1.0')):
        with pytest.raises(InvalidListing, match="canonical"):
            SignedListing.from_wire(bad)
    unsorted_modes = body_of(spec, access_modes=["offline_jobs", "live"])
    with pytest.raises(InvalidListing, match="canonical"):
        SignedListing.from_wire(sign_body(unsorted_modes))
    unsorted_days = body_of(spec, availability=[{**spec.availability[0], "days": ["tue", "mon"]}])
    with pytest.raises(InvalidListing, match="canonical"):
        SignedListing.from_wire(sign_body(unsorted_days))
    # a float with an integral value is written as an int: same bytes, same listing
    same = body_of(spec, created_at=int(NOW), updated_at=int(NOW))
    assert same == spec.canonical_bytes()


def test_duplicate_keys_and_bad_base64_refused() -> None:
    signed = make().sign(HOST)
    wire = signed.to_wire()
    key = b64url_encode(HOST.public_key).encode()
    duplicated = wire.replace(b'"key":"' + key + b'"', b'"key":"' + key + b'","key":"' + key + b'"')
    with pytest.raises(InvalidListing, match="duplicate"):
        SignedListing.from_wire(duplicated)
    for bad_key in (key + b"=", key[:-1] + b"+", key[:-2], b"AAAA", key[:-1] + b"B"):
        with pytest.raises(InvalidListing, match="key|base64url"):
            SignedListing.from_wire(wire.replace(b'"key":"' + key, b'"key":"' + bad_key))
    for body_key in (HOST.public_key[:31], HOST.public_key + b"\x00"):
        with pytest.raises(InvalidListing, match="host_key"):
            SignedListing.from_wire(sign_body(body_of(signed.spec, host_key=body_key)))
    with pytest.raises(InvalidListing, match="body"):
        SignedListing.from_wire(wire.replace(b'{"body":{', b'{"body":[{', 1).replace(
            b'},"key"', b'}],"key"', 1))  # fmt: skip


def test_counts_within_json_safe_integers() -> None:
    assert make(approx_size={"bytes": (1 << 53) - 1}).approx_size == {"bytes": (1 << 53) - 1}
    with pytest.raises(InvalidListing, match="bytes"):
        make(approx_size={"bytes": 1 << 53})
    with pytest.raises(InvalidListing, match="architecture"):
        make_model(architecture={"n": 1 << 60})


def test_oversize_refused_before_decoding() -> None:
    with pytest.raises(InvalidListing, match="at most"):
        SignedListing.from_wire(b"\x00" * (listing_module.MAX_BODY_BYTES + 1024))
    with pytest.raises(InvalidListing):
        SignedListing.from_wire("not bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidListing):
        SignedListing.from_wire(b"\xff\xff")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "x" * 201, "name"),
        ("name", "", "name"),
        ("summary", "s" * 501, "summary"),
        ("description", "d" * 50_001, "description"),
        ("citation", "c" * 4001, "citation"),
        ("keywords", [f"k{i}" for i in range(51)], "keywords"),
        ("keywords", ["k" * 65], "keyword"),
        ("keywords", ["a", "a"], "distinct"),
        ("creators", [{"name": f"n{i}"} for i in range(51)], "creators"),
        ("policy_summary", "p" * 2001, "policy_summary"),
        ("usage_conditions", "u" * 4001, "usage_conditions"),
        ("approx_size", {"rows": -1}, "rows"),
        ("approx_size", {"rows": True}, "rows"),
        ("access_modes", [], "access_modes"),
        ("access_modes", ["live", "ssh"], "access_modes"),
        ("modality", "video", "modality"),
        ("signaling_url", "ftp://127.0.0.1:8765", "http"),
        ("signaling_url", "https://user:pw@127.0.0.1:8765", "credentials"),
        ("signaling_url", "javascript:alert(1)", "http"),
        ("signaling_url", "https://127.0.0.1:8765/a b", "URL"),
        ("signaling_url", "https://" + "a" * 500, "URL"),
        ("creators", [{"name": "x", "url": "javascript:alert(1)"}], "url"),
        ("metrics", [{"name": "acc", "value": 0.5}], "only a model"),
        ("architecture", {"type": "Linear"}, "only a model"),
    ],
)
def test_field_limits(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidListing, match=message):
        make(**{field: value})


def test_kind_and_version_checks() -> None:
    with pytest.raises(InvalidListing, match="kind"):
        make(kind="service")
    spec = make()
    for version in (0, -1, True, 1.0):
        with pytest.raises(InvalidListing, match="version"):
            ListingSpec(**{**_fields(spec), "version": version})
    with pytest.raises(InvalidListing, match="updated_at"):
        ListingSpec(**{**_fields(spec), "updated_at": NOW - 1})


@pytest.mark.parametrize(
    "license_id", ["MIT", "CC-BY-4.0", "Apache-2.0", "GPL-2.0+", "LicenseRef-Hospital-DUA-1.2"]
)
def test_spdx_accepted(license_id: str) -> None:
    assert make(license=license_id).license == license_id


@pytest.mark.parametrize(
    "license_id",
    ["", "MIT OR Apache-2.0", "<script>", "MIT\n", "-MIT", "L" * 65, "CC BY", "MIT;rm", None],
)
def test_bad_spdx_refused(license_id: object) -> None:
    with pytest.raises(InvalidListing, match="SPDX"):
        make(license=license_id)


# -- hostile text ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["evil\x1b[2Jname", "a\nb", "tab\there", "rtl\u202eoverride", "zero\u200bwidth",
     "bell\x07", "lone\ud800surrogate", "nul\x00"],
)  # fmt: skip
def test_one_line_fields_refuse_control_characters(text: str) -> None:
    for field in ("name", "summary"):
        with pytest.raises(InvalidListing, match=field):
            make(**{field: text})
    with pytest.raises(InvalidListing, match="keyword"):
        make(keywords=[text])
    with pytest.raises(InvalidListing, match="creator"):
        make(creators=[{"name": text}])
    with pytest.raises(InvalidListing, match="schema"):
        make(schema=[{"name": text, "dtype": "int32"}])


def test_long_form_fields_keep_newlines_and_tabs_raw() -> None:
    markdown = "# T\n\n<script>alert(1)</script>\n\t`code`\n[x](javascript:alert(1))"
    spec = make(description=markdown, citation="l1\nl2", usage_conditions="a\tb")
    back = SignedListing.from_wire(spec.sign(HOST).to_wire()).spec
    assert back.description == markdown  # stored raw: sanitising is the renderer's job
    for bad in ("esc\x1b[31m", "rtl\u202e", "cr\rx", "nul\x00", "\ud800"):
        for field in ("description", "citation", "usage_conditions", "policy_summary"):
            with pytest.raises(InvalidListing, match=field):
                ListingSpec(**{**_fields(spec), field: bad})


# -- schema, availability, architecture, metrics -----------------------------------------


def test_huge_schema_refused() -> None:
    schema = [{"name": f"c{i}", "dtype": "float64"} for i in range(501)]
    with pytest.raises(InvalidListing, match="schema"):
        make(schema=schema)
    assert len(make(schema=schema[:500]).schema) == 500


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ([{"name": "a", "dtype": "object"}], "dtype"),
        ([{"name": "a", "dtype": "int32"}, {"name": "a", "dtype": "int64"}], "distinct"),
        ([{"name": "a", "dtype": "int32", "shape": [2]}], "tabular"),
        ([{"name": "a", "dtype": "int32", "unit": "kg"}], "fields"),
        ("not a list", "schema"),
    ],
)
def test_bad_tabular_schema(schema: object, message: str) -> None:
    with pytest.raises(InvalidListing, match=message):
        make(schema=schema)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "t", "dtype": "string", "shape": [2]}, "dtype"),
        ({"name": "t", "dtype": "float32", "shape": [-2]}, "shape"),
        ({"name": "t", "dtype": "float32", "shape": [1.5]}, "shape"),
        ({"name": "t", "dtype": "float32", "shape": [1] * 33}, "shape"),
    ],
)
def test_bad_tensor_schema(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidListing, match=message):
        make_model(schema=[entry])


@pytest.mark.parametrize(
    "tz", ["Mars/Olympus", "../../etc/passwd", "/etc/localtime", "", "UTC\x00", 5]
)
def test_bad_time_zone_refused(tz: object) -> None:
    window = {"days": ["mon"], "start": "09:00", "end": "10:00", "tz": tz}
    with pytest.raises(InvalidListing, match="tz"):
        make(availability=[window])


@pytest.mark.parametrize(
    ("start", "end"),
    [("25:00", "26:00"), ("09:60", "10:00"), ("9:00", "10:00"), ("10:00", "09:00"),
     ("10:00", "10:00"), ("24:00", "24:00"), ("09:00 ", "10:00"), (900, 1000)],
)  # fmt: skip
def test_bad_availability_times_refused(start: object, end: object) -> None:
    window = {"days": ["mon"], "start": start, "end": end, "tz": "UTC"}
    with pytest.raises(InvalidListing, match="window"):
        make(availability=[window])


def test_availability_windows() -> None:
    ok = {"days": ["sun"], "start": "18:00", "end": "24:00", "tz": "America/Argentina/Buenos_Aires"}
    assert make(availability=[ok]).availability == [ok]
    for days in ([], ["mon", "mon"], ["monday"], "mon"):
        with pytest.raises(InvalidListing, match="days"):
            make(availability=[{**ok, "days": days}])
    with pytest.raises(InvalidListing, match="availability"):
        make(availability=[ok] * 21)
    with pytest.raises(InvalidListing, match="fields"):
        make(availability=[{**ok, "note": "x"}])


def test_architecture_caps() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(InvalidListing, match="deeper"):
        make_model(architecture=deep)
    with pytest.raises(InvalidListing, match="more than"):
        make_model(architecture={"layers": list(range(20_001))})
    with pytest.raises(InvalidListing, match="bytes"):
        make_model(architecture={"blob": "x" * 60_000, "b": "y" * 60_000, "c": "z" * 90_000,
                                 "d": "w" * 90_000})  # fmt: skip
    for bad in (float("inf"), b"bytes", (1, 2), {1: 2}):
        with pytest.raises(InvalidListing, match="architecture"):
            make_model(architecture={"v": bad})


def test_bad_metrics_refused() -> None:
    for metric, message in (
        ({"name": "acc", "value": float("nan")}, "finite"),
        ({"name": "acc", "value": "0.9"}, "finite"),
        ({"name": "acc", "value": 0.9, "dataset": "nope"}, "listing_id"),
        ({"name": "acc", "value": 0.9, "receipt": b""}, "receipt"),
        (
            {"name": "acc", "value": 0.9, "receipt": b"r" * (listing_module.MAX_RECEIPT_BYTES + 1)},
            "receipt",
        ),
        ({"name": "acc", "value": 0.9, "receipt": "text"}, "receipt"),
        ({"name": "acc", "value": 0.9, "by": "me"}, "fields"),
    ):
        with pytest.raises(InvalidListing, match=message):
            make_model(metrics=[metric])
    with pytest.raises(InvalidListing, match="metrics"):
        make_model(metrics=[{"name": f"m{i}", "value": 1.0} for i in range(51)])


def test_receipt_is_opaque_here_and_checked_by_the_receipt_module() -> None:
    from duet_p2p.offline.receipt import InvalidReceipt, Receipt
    from tests.offline.test_receipt import issue

    wire = bytearray(issue().to_wire())
    wire[-1] ^= 1  # inside the signature
    spec = make_model(metrics=[{"name": "auc", "value": 0.5, "receipt": bytes(wire)}])
    back = SignedListing.from_wire(spec.sign(HOST).to_wire()).spec
    assert back.metrics[0]["receipt"] == bytes(wire)  # carried as signed, not vouched for
    with pytest.raises(InvalidReceipt):
        Receipt.from_wire(back.metrics[0]["receipt"])
    receipt = b64url_encode(bytes(wire))
    assert json.loads(spec.canonical_bytes())["metrics"][0]["receipt"] == receipt
    body = body_of(spec, metrics=[{"name": "auc", "value": 0.5, "receipt": receipt + "="}])
    with pytest.raises(InvalidListing, match="receipt"):
        SignedListing.from_wire(sign_body(body))


# -- edits -------------------------------------------------------------------------------


def test_edit_is_successor() -> None:
    v1 = make().sign(HOST)
    v2 = v1.spec.edit(summary="Updated", now=NOW + 10).sign(HOST)
    check_successor(v1, v2)
    assert v2.version == 2 and v2.listing_id == v1.listing_id and v2.spec.updated_at == NOW + 10
    with pytest.raises(InvalidListing, match="cannot change"):
        v1.spec.edit(version=7)


def test_replayed_or_skipped_version_refused() -> None:
    v1 = make().sign(HOST)
    v2 = v1.spec.edit(summary="b", now=NOW + 1).sign(HOST)
    v3 = v2.spec.edit(summary="c", now=NOW + 2).sign(HOST)
    for old, new in ((v2, v1), (v2, v2), (v1, v3), (v3, v2)):
        with pytest.raises(InvalidListing, match="version"):
            check_successor(old, new)


def test_edit_by_another_host_refused() -> None:
    v1 = make().sign(HOST)
    theirs = ListingSpec(**{
        **_fields(v1.spec), "host_id": OTHER.id, "host_key": OTHER.public_key, "version": 2,
    }).sign(OTHER)  # fmt: skip
    with pytest.raises(InvalidListing, match="only host"):
        check_successor(v1, theirs)


def test_edit_changing_kind_or_listing_or_created_refused() -> None:
    v1 = make().sign(HOST)
    fields = {**_fields(v1.spec), "version": 2}
    other_listing = ListingSpec(**{**fields, "listing_id": "ef" * 16}).sign(HOST)
    with pytest.raises(InvalidListing, match="another listing"):
        check_successor(v1, other_listing)
    model = ListingSpec(**{**fields, "kind": "model"}).sign(HOST)
    with pytest.raises(InvalidListing, match="kind"):
        check_successor(v1, model)
    moved = ListingSpec(**{**fields, "created_at": NOW - 5}).sign(HOST)
    with pytest.raises(InvalidListing, match="created_at"):
        check_successor(v1, moved)


def test_forged_edit_refused() -> None:
    v1 = make().sign(HOST)
    v2 = v1.spec.edit(summary="b", now=NOW + 1)
    forged = SignedListing(v2, HOST.public_key, v1.signature)
    with pytest.raises(InvalidListing, match="signature"):
        check_successor(v1, forged)


# -- deletions ---------------------------------------------------------------------------


def test_deletion_round_trip() -> None:
    signed = make().sign(HOST)
    deletion = SignedDeletion.issue(HOST, signed, at=NOW + 5)
    back = SignedDeletion.from_wire(deletion.to_wire())
    assert back == deletion and back.version == 2
    check_deletion(signed, back)


def test_deletion_by_another_host_refused() -> None:
    signed = make().sign(HOST)
    with pytest.raises(InvalidListing, match="cannot delete"):
        SignedDeletion.issue(OTHER, signed)
    theirs = SignedDeletion.issue(OTHER, make(OTHER), at=NOW + 5)
    forged = SignedDeletion(signed.listing_id, HOST.id, 2, NOW + 5, OTHER.public_key,
                            theirs.signature)  # fmt: skip
    with pytest.raises(InvalidListing, match="does not belong"):
        check_deletion(signed, forged)
    other_host = SignedDeletion(
        signed.listing_id, OTHER.id, 2, NOW + 5, OTHER.public_key, bytes(64)
    )
    other_host = SignedDeletion(
        signed.listing_id, OTHER.id, 2, NOW + 5, OTHER.public_key,
        OTHER.sign_bytes(other_host._message()),
    )  # fmt: skip
    other_host.verify()
    with pytest.raises(InvalidListing, match="only host"):
        check_deletion(signed, other_host)


def test_stale_or_foreign_deletion_refused() -> None:
    v1 = make().sign(HOST)
    old_deletion = SignedDeletion.issue(HOST, v1, at=NOW + 1)
    v2 = v1.spec.edit(summary="b", now=NOW + 2).sign(HOST)
    with pytest.raises(InvalidListing, match="version"):
        check_deletion(v2, old_deletion)
    with pytest.raises(InvalidListing, match="another listing"):
        check_deletion(make().sign(HOST), old_deletion)


def test_deletion_wrong_context_and_tampering_refused() -> None:
    deletion = SignedDeletion.issue(HOST, make(), at=NOW + 5)
    body = deletion.body_bytes()
    with pytest.raises(InvalidListing, match="signature"):
        SignedDeletion.from_wire(sign_body(body))  # signed as a listing
    moved = canonical_json({"v": 1, "listing_id": deletion.listing_id,
        "host_id": HOST.id, "version": 3, "at": NOW + 5})  # fmt: skip
    with pytest.raises(InvalidListing, match="signature"):
        SignedDeletion.from_wire(pack(moved, HOST.public_key, deletion.signature))
    with pytest.raises(InvalidListing, match="fields"):
        SignedDeletion.from_wire(make().sign(HOST).to_wire())


# -- heartbeats --------------------------------------------------------------------------


def test_heartbeat_round_trip() -> None:
    ids = ["ff" * 16, "0a" * 16]
    beat = SignedHeartbeat.issue(HOST, ids, at=NOW)
    back = SignedHeartbeat.from_wire(beat.to_wire(), NOW + 10)
    assert back == beat and back.listing_ids == sorted(ids) and len(back.nonce) == 16
    back.verify(NOW - 299, expected_host_id=HOST.id)
    assert SignedHeartbeat.issue(HOST, [], at=NOW).nonce != beat.nonce


def test_stale_or_future_heartbeat_refused() -> None:
    beat = SignedHeartbeat.issue(HOST, [], at=NOW)
    for now in (NOW + 301, NOW - 301, float("nan")):
        with pytest.raises(InvalidListing, match="off"):
            beat.verify(now)
    with pytest.raises(InvalidListing, match="off"):
        SignedHeartbeat.from_wire(beat.to_wire(), NOW + 1000)
    with pytest.raises(InvalidListing, match="off"):
        beat.verify(NOW + 20, max_skew=10)


def test_heartbeat_attacks_refused() -> None:
    beat = SignedHeartbeat.issue(HOST, ["ab" * 16], at=NOW)
    with pytest.raises(InvalidListing, match="not"):
        beat.verify(NOW, expected_host_id=OTHER.id)
    forged = SignedHeartbeat(HOST.id, NOW, beat.nonce, ["cd" * 16], HOST.public_key,
                             beat.signature)  # fmt: skip
    with pytest.raises(InvalidListing, match="signature"):
        forged.verify(NOW)
    stolen = SignedHeartbeat(HOST.id, NOW, beat.nonce, ["ab" * 16], OTHER.public_key,
                             beat.signature)  # fmt: skip
    with pytest.raises(InvalidListing, match="does not belong"):
        stolen.verify(NOW)
    with pytest.raises(InvalidListing, match="signature"):
        SignedHeartbeat.from_wire(sign_body(beat.body_bytes()), NOW)  # listing context
    for ids, message in (
        (["ab" * 16] * 2, "distinct"), (["AB" * 16], "listing_id"),
        ([f"{i:032x}" for i in range(1001)], "at most"),
    ):  # fmt: skip
        with pytest.raises(InvalidListing, match=message):
            SignedHeartbeat.issue(HOST, ids, at=NOW)
    with pytest.raises(InvalidListing, match="nonce"):
        SignedHeartbeat(HOST.id, NOW, b"short", [], HOST.public_key, bytes(64))


def test_heartbeat_nonce_on_the_wire() -> None:
    beat = SignedHeartbeat.issue(HOST, [], at=NOW)
    document = json.loads(beat.to_wire())
    assert document["body"]["nonce"] == b64url_encode(beat.nonce)
    short = {**document["body"], "nonce": b64url_encode(b"short")}
    wire = canonical_json({**document, "body": short})
    with pytest.raises(InvalidListing, match="nonce"):
        SignedHeartbeat.from_wire(wire, NOW)


# -- no torch ----------------------------------------------------------------------------


def test_registry_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import duet_p2p.registry.listing, duet_p2p.registry.croissant, duet_p2p.registry.mock\n"
        "print(sorted(m for m in ('torch', 'duet_p2p.offline', 'duet_p2p.rpc') if m in sys.modules))"
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
    listing_only = "import sys, duet_p2p.registry.listing; print('numpy' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", listing_only], capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "False"
