"""Signed access documents: how an identity proves itself to a registry for one request.

To read its inbox (``purpose="inbox"``) or the sessions it requested (``"sessions"``), an
identity signs a short document naming the purpose, the registry (``audience``: the
registry's public URL, so a document made for one registry is refused by another), the
time and 16 random bytes (``nonce``), and sends it in the ``X-Duet-Access`` header as
base64url of its wire form. A registry takes it if it is fresh (within ``skew`` seconds of
its clock) and remembers the nonce until it would be stale, so each document is taken once.
"""

from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass
from typing import Any

from duet_p2p.identity import Identity
from duet_p2p.registry.canonical_json import b64url_encode
from duet_p2p.registry.session import (
    InvalidDocument,
    check_hex32,
    check_key,
    check_owner,
    check_signature,
    check_time,
    decode_b64,
    encode_body,
    pack,
    read_wire,
    sign_body,
    verify_body,
)

__all__ = [
    "ACCESS_HEADER", "CONTEXT", "MAX_HEADER_CHARS", "PURPOSES", "AccessDenied", "SignedAccess",
]  # fmt: skip

CONTEXT = b"duet_p2p registry access v1"
ACCESS_HEADER = "X-Duet-Access"
PURPOSES = ("inbox", "sessions")
NONCE_BYTES = 16
MAX_AUDIENCE_CHARS = 300
MAX_BODY_BYTES = 640
MAX_HEADER_CHARS = 1024
DEFAULT_SKEW = 300.0
_FIELDS = ("identity_id", "purpose", "audience", "at", "nonce")


class AccessDenied(InvalidDocument):
    """An access document is malformed, forged, stale, or for another purpose or registry."""


def _audience(value: object) -> str:
    if (
        type(value) is not str
        or not 0 < len(value) <= MAX_AUDIENCE_CHARS
        or not value.isascii()
        or not value.isprintable()
        or " " in value
    ):
        raise AccessDenied(
            f"audience is a registry URL of 1 to {MAX_AUDIENCE_CHARS} printable ASCII characters"
        )
    return value


def _same_url(a: str, b: str) -> bool:
    return hmac.compare_digest(a.rstrip("/").encode(), b.rstrip("/").encode())


@dataclass(frozen=True)
class SignedAccess:
    """One identity's signed, single-use pass to one registry for one purpose."""

    identity_id: str
    key: bytes
    purpose: str
    audience: str
    at: float
    nonce: bytes
    signature: bytes

    def __post_init__(self) -> None:
        check_hex32(self.identity_id, "identity_id")
        check_owner(check_key(self.key, "a signing key"), self.identity_id, "the signing key")
        if type(self.purpose) is not str or self.purpose not in PURPOSES:
            raise AccessDenied(f"purpose is one of {list(PURPOSES)}")
        _audience(self.audience)
        object.__setattr__(self, "at", check_time(self.at, "at"))
        if type(self.nonce) is not bytes or len(self.nonce) != NONCE_BYTES:
            raise AccessDenied(f"nonce is {NONCE_BYTES} bytes")
        check_signature(self.signature)

    @classmethod
    def issue(
        cls, identity: Identity, purpose: str, audience: str, now: float | None = None
    ) -> SignedAccess:
        """``identity``'s access document for ``purpose`` at the registry ``audience``."""
        fields: dict[str, Any] = dict(
            identity_id=identity.id, key=identity.public_key, purpose=purpose,
            audience=audience, at=time.time() if now is None else now,
            nonce=os.urandom(NONCE_BYTES),
        )  # fmt: skip
        draft = cls(**fields, signature=bytes(64))
        return cls(**fields, signature=sign_body(identity, CONTEXT, draft.body_bytes()))

    def body_bytes(self) -> bytes:
        fields: dict[str, Any] = {name: getattr(self, name) for name in _FIELDS}
        fields["nonce"] = b64url_encode(self.nonce)
        return encode_body(fields, MAX_BODY_BYTES)

    def to_wire(self) -> bytes:
        return pack(self.body_bytes(), self.key, self.signature)

    def header(self) -> str:
        """The ``X-Duet-Access`` header value: base64url of the wire form."""
        return b64url_encode(self.to_wire())

    @classmethod
    def from_header(cls, value: object) -> SignedAccess:
        """Parse a header value (the signature is checked; freshness and purpose are not:
        see :meth:`verify`)."""
        if type(value) is not str or not 0 < len(value) <= MAX_HEADER_CHARS:
            raise AccessDenied(f"an access header is 1 to {MAX_HEADER_CHARS} characters")
        try:
            wire = decode_b64(value, "an access header", MAX_HEADER_CHARS)
        except InvalidDocument as exc:
            raise AccessDenied(str(exc)) from None
        return cls.from_wire(wire)

    @classmethod
    def from_wire(cls, data: bytes | str) -> SignedAccess:
        def parse(fields: dict[str, Any], key: bytes, signature: bytes) -> SignedAccess:
            fields["nonce"] = decode_b64(fields["nonce"], "nonce", NONCE_BYTES)
            signed = cls(**fields, key=key, signature=signature)
            signed._check_signature()
            return signed

        try:
            return read_wire(data, "access document", _FIELDS, parse, MAX_BODY_BYTES)  # type: ignore[no-any-return]
        except AccessDenied:
            raise
        except InvalidDocument as exc:
            raise AccessDenied(str(exc)) from None

    def _check_signature(self) -> None:
        try:
            verify_body(self.key, self.signature, CONTEXT, self.body_bytes())
        except InvalidDocument:
            raise AccessDenied("the access document's signature does not hold") from None

    def verify(self, purpose: str, audience: str, now: float, skew: float = DEFAULT_SKEW) -> None:
        """AccessDenied unless the signature holds, the document is for ``purpose`` at
        ``audience`` (a trailing slash aside) and dated within ``skew`` seconds of ``now``."""
        self._check_signature()
        if self.purpose != purpose:
            raise AccessDenied(f"the access document is for {self.purpose!r}, not {purpose!r}")
        if type(audience) is not str or not _same_url(self.audience, audience):
            raise AccessDenied("the access document is for another registry")
        if type(now) not in (int, float) or not abs(now - self.at) <= skew:
            raise AccessDenied(f"the access document is dated {self.at}, more than {skew}s off")

    def __repr__(self) -> str:
        return f"<SignedAccess {self.purpose} by {self.identity_id}>"
