"""Session requests and replies, reviews and access documents: signing, parsing, attacks."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from duet_p2p.identity import Identity
from duet_p2p.registry.access import AccessDenied, SignedAccess
from duet_p2p.registry.canonical_json import b64url_decode, b64url_encode, canonical_json
from duet_p2p.registry.listing import InvalidListing, ListingSpec, SignedListing
from duet_p2p.registry.review import SignedReview, write_review
from duet_p2p.registry.session import (
    MAX_MESSAGE_CHARS,
    REPLY_CONTEXT,
    InvalidDocument,
    SignedSessionReply,
    SignedSessionRequest,
    check_reply,
    reply_session,
    request_session,
    session_state,
    sign_body,
)

ROOT = Path(__file__).resolve().parents[2]
HOST = Identity.generate()
SCIENTIST = Identity.generate()
THIRD = Identity.generate()
NOW = 1_750_000_020.0  # not a whole minute on purpose
T1, T2, T3 = 1_750_003_200.0, 1_750_006_800.0, 1_750_010_400.0
URL = "http://127.0.0.1:8780"


def listing(identity: Identity = HOST) -> SignedListing:
    spec = ListingSpec.new(
        identity, kind="dataset", name="Admissions", summary="", description="",
        license="MIT", signaling_url="http://127.0.0.1:8765/", now=NOW - 100,
    )  # fmt: skip
    return spec.sign(identity)


def request(**kw: Any) -> SignedSessionRequest:
    args: dict[str, Any] = dict(minutes=60, message="hello", time_zone="Europe/Paris", now=NOW)
    args.update(kw)
    return request_session(SCIENTIST, listing(), args.pop("proposed", [T1, T2]), **args)


def tamper(wire: bytes, **changes: Any) -> bytes:
    """The wire with body fields changed (canonical, signature kept)."""
    doc = json.loads(wire)
    doc["body"].update(changes)
    return canonical_json(doc)


# -- requests ---------------------------------------------------------------------------


def test_request_round_trip_and_sealed_message() -> None:
    signed = request(message="Can we meet?\nThanks")
    wire = signed.to_wire()
    again = SignedSessionRequest.from_wire(wire)
    assert again == signed and again.to_wire() == wire
    assert SignedSessionRequest.from_wire(wire.decode()) == signed
    assert again.request.proposed == (T1, T2)
    assert b"Can we meet" not in wire  # the registry never sees the text
    assert again.open_message(HOST) == "Can we meet?\nThanks"
    with pytest.raises(InvalidDocument):
        again.open_message(SCIENTIST)
    with pytest.raises(InvalidDocument):
        again.open_message(THIRD)


def test_request_accepts_datetimes_and_sorts() -> None:
    times = [datetime.fromtimestamp(T2, UTC), datetime.fromtimestamp(T1, UTC)]
    assert request(proposed=times).request.proposed == (T1, T2)


@pytest.mark.parametrize(
    "kw",
    [
        {"proposed": []},
        {"proposed": [T1 + 30]},  # not a whole minute
        {"proposed": [NOW - 60 * 60]},  # in the past
        {"proposed": [T1 + 60 * k for k in range(6)]},  # too many
        {"proposed": [T1 + 500 * 86400]},  # too far ahead
        {"proposed": [float("nan")]},
        {"proposed": ["tomorrow"]},
        {"minutes": 5},
        {"minutes": 24 * 60 + 1},
        {"minutes": 60.0},
        {"minutes": True},
        {"time_zone": "Mars/Olympus"},
        {"time_zone": "../../etc/passwd"},
        {"time_zone": 3},
        {"message": "x" * (MAX_MESSAGE_CHARS + 1)},
        {"message": "bidi \u202e trick"},
        {"message": b"bytes"},
    ],
)
def test_request_refuses_bad_fields(kw: dict[str, Any]) -> None:
    with pytest.raises(InvalidListing):
        request(**kw)


def test_request_with_own_listing_is_refused() -> None:
    with pytest.raises(InvalidDocument):
        request_session(HOST, listing(), [T1], now=NOW)


def test_forged_and_altered_requests_are_refused() -> None:
    wire = request().to_wire()
    for changes in (
        {"minutes": 90},
        {"proposed": [T1]},
        {"at": NOW + 1},
        {"request_id": "0" * 32},
    ):
        with pytest.raises(InvalidListing, match="signature"):
            SignedSessionRequest.from_wire(tamper(wire, **changes))
    # claims another scientist: the key no longer hashes to it
    with pytest.raises(InvalidListing):
        SignedSessionRequest.from_wire(tamper(wire, scientist_id=THIRD.id))
    # a third party re-signs a request in the scientist's name with its own key
    doc = json.loads(wire)
    doc["key"] = b64url_encode(THIRD.public_key)
    with pytest.raises(InvalidListing):
        SignedSessionRequest.from_wire(canonical_json(doc))
    # the body moved to a third party's ID and key, the scientist's signature kept
    body = dict(json.loads(wire)["body"])
    body.update(scientist_id=THIRD.id, scientist_key=b64url_encode(THIRD.public_key))
    forged = json.loads(wire)
    forged["body"] = body
    with pytest.raises(InvalidListing, match="key other than|signature"):
        SignedSessionRequest.from_wire(canonical_json(forged))
    # a host key that is not the host's
    with pytest.raises(InvalidListing):
        SignedSessionRequest.from_wire(tamper(wire, host_key=b64url_encode(THIRD.public_key)))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"null",
        b"[]",
        b'{"v":1}',
        "not json",
        12,
        None,
        b"{" * 100,
        b'{"body":{},"key":"","sig":"","v":1}',
        b"x" * 100_000,
    ],
)
def test_request_from_wire_refuses_junk(data: Any) -> None:
    with pytest.raises(InvalidListing):
        SignedSessionRequest.from_wire(data)


def test_request_unknown_field_and_non_canonical_refused() -> None:
    wire = request().to_wire()
    with pytest.raises(InvalidListing):
        SignedSessionRequest.from_wire(tamper(wire, extra=1))
    with pytest.raises(InvalidListing):
        SignedSessionRequest.from_wire(wire.replace(b'{"body":', b'{ "body":'))
    with pytest.raises(InvalidListing):  # wrong types everywhere
        SignedSessionRequest.from_wire(tamper(wire, proposed=str(T1)))
    with pytest.raises(InvalidListing):
        SignedSessionRequest.from_wire(tamper(wire, sealed_message="AAAA"))


# -- replies and state ------------------------------------------------------------------


def test_host_accepts_a_proposed_time() -> None:
    req = request()
    reply = reply_session(HOST, req, "accept", start=T2, message="See you", now=NOW + 60)
    wire = reply.to_wire()
    again = SignedSessionReply.from_wire(wire)
    assert again == reply
    assert b"See you" not in wire
    assert again.open_message(SCIENTIST) == "See you"
    with pytest.raises(InvalidDocument):
        again.open_message(HOST)
    check_reply(req, [], again)
    state = session_state(req, [again])
    assert (state.status, state.start, state.minutes) == ("accepted", T2, 60)


def test_accept_of_a_time_never_proposed_is_refused() -> None:
    req = request()
    reply = reply_session(HOST, req, "accept", start=T3, now=NOW + 60)
    with pytest.raises(InvalidDocument, match="proposed"):
        check_reply(req, [], reply)
    with pytest.raises(InvalidDocument):
        reply_session(HOST, req, "accept", start=T3, now=NOW + 60, replies=[])
    assert session_state(req, [reply]).status == "pending"  # skipped when not strict
    with pytest.raises(InvalidDocument):
        session_state(req, [reply], strict=True)


def test_counter_proposal_then_scientist_accepts_then_cancels() -> None:
    req = request()
    counter = reply_session(HOST, req, "propose", proposed=[T3], message="later?", now=NOW + 60)
    assert counter.open_message(SCIENTIST) == "later?"
    check_reply(req, [], counter)
    assert session_state(req, [counter]).proposed == (T3,)
    # the old times are no longer on the table
    stale = reply_session(SCIENTIST, req, "accept", start=T1, now=NOW + 120)
    with pytest.raises(InvalidDocument):
        check_reply(req, [counter], stale)
    # the host cannot accept its own counter-proposal
    with pytest.raises(InvalidDocument):
        reply_session(HOST, req, "accept", start=T3, now=NOW + 120, replies=[counter])
    ok = reply_session(SCIENTIST, req, "accept", start=T3, message="yes", now=NOW + 120)
    check_reply(req, [counter], ok)
    assert ok.open_message(HOST) == "yes"
    state = session_state(req, [counter, ok])
    assert (state.status, state.start) == ("accepted", T3)
    cancel = reply_session(SCIENTIST, req, "withdraw", now=NOW + 180)
    check_reply(req, [counter, ok], cancel)
    assert session_state(req, [counter, ok, cancel]).status == "withdrawn"
    # nothing after a final state
    late = reply_session(HOST, req, "decline", now=NOW + 240)
    with pytest.raises(InvalidDocument, match="withdrawn"):
        check_reply(req, [counter, ok, cancel], late)


def test_host_may_cancel_an_accepted_session() -> None:
    req = request()
    accept = reply_session(HOST, req, "accept", start=T1, now=NOW + 60)
    decline = reply_session(HOST, req, "decline", message="ill", now=NOW + 120)
    check_reply(req, [accept], decline)
    assert session_state(req, [accept, decline]).status == "declined"
    again = reply_session(HOST, req, "accept", start=T1, now=NOW + 180)
    with pytest.raises(InvalidDocument):
        check_reply(req, [accept, decline], again)
    propose = reply_session(HOST, req, "propose", proposed=[T3], now=NOW + 180)
    with pytest.raises(InvalidDocument):
        check_reply(req, [accept], propose)


def test_who_may_say_what() -> None:
    req = request()
    with pytest.raises(InvalidDocument):  # a third party
        reply_session(THIRD, req, "accept", start=T1, now=NOW + 60)
    with pytest.raises(InvalidDocument):  # the host does not withdraw
        reply_session(HOST, req, "withdraw", now=NOW + 60)
    with pytest.raises(InvalidDocument):  # the scientist does not propose or decline
        reply_session(SCIENTIST, req, "propose", proposed=[T3], now=NOW + 60)
    with pytest.raises(InvalidDocument):
        reply_session(SCIENTIST, req, "decline", now=NOW + 60)
    with pytest.raises(InvalidDocument):  # nor accept its own times
        reply_session(SCIENTIST, req, "accept", start=T1, now=NOW + 60, replies=[])


def test_third_party_reply_signed_by_itself_is_refused() -> None:
    req = request()
    good = reply_session(HOST, req, "accept", start=T1, now=NOW + 60)
    doc = json.loads(good.to_wire())
    body = doc["body"]
    body.update(author_id=THIRD.id, author_key=b64url_encode(THIRD.public_key))
    body_bytes = canonical_json(body)
    doc["key"] = b64url_encode(THIRD.public_key)
    doc["sig"] = b64url_encode(sign_body(THIRD, REPLY_CONTEXT, body_bytes))
    forged = SignedSessionReply.from_wire(canonical_json(doc))  # well signed by THIRD
    with pytest.raises(InvalidDocument, match="not a party"):
        check_reply(req, [], forged)
    assert session_state(req, [forged]).status == "pending"


def test_altered_reply_and_wrong_request_are_refused() -> None:
    req, other = request(), request()
    reply = reply_session(HOST, req, "accept", start=T1, now=NOW + 60)
    with pytest.raises(InvalidListing, match="signature"):
        SignedSessionReply.from_wire(tamper(reply.to_wire(), start=T2))
    with pytest.raises(InvalidListing, match="signature"):
        SignedSessionReply.from_wire(tamper(reply.to_wire(), action="decline", start=None))
    with pytest.raises(InvalidDocument, match="another request"):
        check_reply(other, [], reply)
    early = reply_session(HOST, req, "decline", now=NOW - 3600)  # clamped to the request
    assert early.reply.at == req.request.at
    replayed = [reply, reply]
    with pytest.raises(InvalidDocument):
        session_state(req, replayed, strict=True)
    assert session_state(req, replayed).status == "accepted"


@pytest.mark.parametrize(
    "changes",
    [
        {"action": "maybe"},
        {"action": "accept", "start": None},
        {"action": "decline", "start": T1},
        {"action": "decline", "proposed": [T3]},
        {"action": "propose", "proposed": []},
        {"start": "T1"},
        {"at": -1},
        {"at": True},
        {"reply_id": "ABC"},
        {"proposed": None},
    ],
)
def test_reply_fields_are_checked(changes: dict[str, Any]) -> None:
    req = request()
    wire = reply_session(HOST, req, "accept", start=T1, now=NOW + 60).to_wire()
    with pytest.raises(InvalidListing):
        SignedSessionReply.from_wire(tamper(wire, **changes))


def test_reply_time_checked_against_request() -> None:
    req = request()
    reply = reply_session(HOST, req, "decline", now=NOW + 60)
    fields = dataclasses.replace(reply.reply, at=NOW - 100)
    resigned = SignedSessionReply(
        fields, HOST.public_key, sign_body(HOST, REPLY_CONTEXT, fields.body_bytes())
    )
    with pytest.raises(InvalidDocument, match="before its request"):
        check_reply(req, [], resigned)


# -- reviews ----------------------------------------------------------------------------


def test_review_round_trip_keeps_text_raw() -> None:
    text = "<script>alert(1)</script>\nGreat data"
    review = write_review(SCIENTIST, listing().listing_id, 4, text, now=NOW)
    again = SignedReview.from_wire(review.to_wire())
    assert again == review and again.text == text and again.stars == 4
    data = again.to_json()
    assert data["text"] == text and data["signed"] == review.to_wire().decode()


@pytest.mark.parametrize("stars", [0, 6, 3.0, True, "5", None])
def test_review_stars_checked(stars: Any) -> None:
    with pytest.raises(InvalidListing):
        write_review(SCIENTIST, "a" * 32, stars, now=NOW)


def test_review_forgery_refused() -> None:
    wire = write_review(SCIENTIST, "a" * 32, 2, "meh", now=NOW).to_wire()
    with pytest.raises(InvalidListing, match="signature"):
        SignedReview.from_wire(tamper(wire, stars=5))
    with pytest.raises(InvalidListing):
        SignedReview.from_wire(tamper(wire, reviewer_id=THIRD.id))
    with pytest.raises(InvalidListing):
        write_review(SCIENTIST, "a" * 32, 5, "x" * 2001, now=NOW)
    with pytest.raises(InvalidListing):
        write_review(SCIENTIST, "A" * 32, 5, now=NOW)


# -- access documents -------------------------------------------------------------------


def test_access_round_trip_and_checks() -> None:
    doc = SignedAccess.issue(SCIENTIST, "sessions", URL, now=NOW)
    header = doc.header()
    assert len(header) <= 1024
    again = SignedAccess.from_header(header)
    assert again == doc
    again.verify("sessions", URL, NOW + 10)
    again.verify("sessions", URL + "/", NOW - 10)
    with pytest.raises(AccessDenied, match="not 'inbox'"):
        again.verify("inbox", URL, NOW)
    with pytest.raises(AccessDenied, match="another registry"):
        again.verify("sessions", "http://127.0.0.1:9999", NOW)
    with pytest.raises(AccessDenied, match="off"):
        again.verify("sessions", URL, NOW + 301)
    with pytest.raises(AccessDenied, match="off"):
        again.verify("sessions", URL, NOW - 301)


def test_access_forgeries_refused() -> None:
    doc = SignedAccess.issue(SCIENTIST, "sessions", URL, now=NOW)
    wire = doc.to_wire()
    for changes in ({"purpose": "inbox"}, {"audience": "http://127.0.0.1:1"}, {"at": NOW + 60}):
        with pytest.raises(AccessDenied):
            SignedAccess.from_header(b64url_encode(tamper(wire, **changes)))
    with pytest.raises(AccessDenied):  # claims to be the host
        SignedAccess.from_header(b64url_encode(tamper(wire, identity_id=HOST.id)))
    for bad in ("", "!!!", "A" * 2000, None, 5, b64url_encode(b"{}")):
        with pytest.raises(AccessDenied):
            SignedAccess.from_header(bad)
    assert b64url_decode(doc.header(), max_bytes=1024) == wire
    with pytest.raises(InvalidListing):
        SignedAccess.issue(SCIENTIST, "admin", URL, now=NOW)
    with pytest.raises(InvalidListing):
        SignedAccess.issue(SCIENTIST, "inbox", "x" * 400, now=NOW)


def test_documents_do_not_load_torch() -> None:
    code = (
        "import sys, duet_p2p.registry.session, duet_p2p.registry.review, "
        "duet_p2p.registry.access; assert 'torch' not in sys.modules; "
        "assert 'numpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
