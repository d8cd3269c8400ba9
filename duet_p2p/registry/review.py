"""Signed reviews: a scientist's stars and words about a listing, signed by its identity.

A review names the listing, the reviewer (its key must hash to ``reviewer_id``), 1 to 5
``stars``, up to :data:`MAX_TEXT_CHARS` of text (printable, newlines and tabs; stored
raw as signed, escaped by whoever shows it) and when it was written. Signed and parsed
like the registry's other documents (:mod:`duet_p2p.registry.session`); a registry keeps
one review per reviewer and listing, the newest.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

from duet_p2p.identity import KEY_BYTES, Identity
from duet_p2p.registry.canonical_json import b64url_encode
from duet_p2p.registry.session import (
    InvalidDocument,
    check_hex32,
    check_key,
    check_owner,
    check_signature,
    check_text,
    check_time,
    decode_b64,
    encode_body,
    normalize_text,
    pack,
    read_wire,
    sign_body,
    verify_body,
)

__all__ = ["CONTEXT", "MAX_TEXT_CHARS", "Review", "SignedReview", "write_review"]

CONTEXT = b"duet_p2p review v1"
MAX_TEXT_CHARS = 2000
MAX_REVIEW_BYTES = 1 << 14
_FIELDS = ("listing_id", "reviewer_id", "reviewer_key", "stars", "text", "at")


@dataclass(frozen=True)
class Review:
    """One reviewer's view of one listing; checked when built."""

    listing_id: str
    reviewer_id: str
    reviewer_key: bytes
    stars: int
    text: str
    at: float

    def __post_init__(self) -> None:
        check_hex32(self.listing_id, "listing_id")
        check_hex32(self.reviewer_id, "reviewer_id")
        check_owner(check_key(self.reviewer_key, "reviewer_key"), self.reviewer_id, "reviewer_key")
        if type(self.stars) is not int or not 1 <= self.stars <= 5:
            raise InvalidDocument("stars is an int from 1 to 5")
        check_text(self.text, "a review's text", MAX_TEXT_CHARS)
        object.__setattr__(self, "at", check_time(self.at, "at"))

    def body_bytes(self) -> bytes:
        fields: dict[str, Any] = {name: getattr(self, name) for name in _FIELDS}
        fields["reviewer_key"] = b64url_encode(self.reviewer_key)
        return encode_body(fields, MAX_REVIEW_BYTES)


@dataclass(frozen=True)
class SignedReview:
    """A review and its reviewer's signature."""

    review: Review
    key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.review, Review):
            raise InvalidDocument("a signed review holds a Review")
        check_key(self.key, "a signing key")
        check_signature(self.signature)

    @property
    def listing_id(self) -> str:
        return self.review.listing_id

    @property
    def reviewer_id(self) -> str:
        return self.review.reviewer_id

    @property
    def stars(self) -> int:
        return self.review.stars

    @property
    def text(self) -> str:
        return self.review.text

    @property
    def at(self) -> float:
        return self.review.at

    def verify(self) -> None:
        """The signing key is the reviewer's and the signature holds."""
        if not hmac.compare_digest(self.key, self.review.reviewer_key):
            raise InvalidDocument("the review is signed by a key other than its reviewer's")
        verify_body(self.key, self.signature, CONTEXT, self.review.body_bytes())

    def to_wire(self) -> bytes:
        return pack(self.review.body_bytes(), self.key, self.signature)

    @classmethod
    def from_wire(cls, data: bytes | str) -> SignedReview:
        """Parse and verify a signed review."""

        def parse(fields: dict[str, Any], key: bytes, signature: bytes) -> SignedReview:
            fields["reviewer_key"] = decode_b64(fields["reviewer_key"], "reviewer_key", KEY_BYTES)
            signed = cls(Review(**fields), key, signature)
            signed.verify()
            return signed

        return read_wire(data, "review", _FIELDS, parse, MAX_REVIEW_BYTES)  # type: ignore[no-any-return]

    def to_json(self) -> dict[str, Any]:
        """The API's REVIEW object."""
        r = self.review
        return {
            "listing_id": r.listing_id, "reviewer_id": r.reviewer_id, "stars": r.stars,
            "text": r.text, "at": r.at, "signed": self.to_wire().decode(),
        }  # fmt: skip

    def __repr__(self) -> str:
        r = self.review
        return f"<SignedReview {r.stars}* of {r.listing_id} by {r.reviewer_id}>"


def write_review(
    identity: Identity, listing_id: str, stars: int, text: str = "", now: float | None = None
) -> SignedReview:
    """``identity``'s signed review of listing ``listing_id`` (CR LF in text as newlines)."""
    review = Review(
        listing_id=listing_id, reviewer_id=identity.id, reviewer_key=identity.public_key,
        stars=stars, text=normalize_text(text),  # type: ignore[arg-type]
        at=time.time() if now is None else now,
    )  # fmt: skip
    return SignedReview(
        review, identity.public_key, sign_body(identity, CONTEXT, review.body_bytes())
    )
