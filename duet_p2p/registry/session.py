"""Session requests and replies: how a scientist and a data owner agree on a time for a Duet.

A scientist sends a :class:`SignedSessionRequest` through a registry to a listing's host:
one to :data:`MAX_PROPOSALS` proposed start times (UTC epoch seconds, whole minutes,
strictly increasing, after the request is made), a length in minutes, the scientist's time
zone (IANA) and a message. The host answers with :class:`SignedSessionReply` documents:
``accept`` (one of the latest proposed times), ``decline`` or ``propose`` (new times); the
scientist may ``accept`` a host's counter-proposal, and either party may call a session
off (the host ``decline``, the scientist ``withdraw``), also once it was accepted.
``declined`` and ``withdrawn`` are final. :func:`check_reply` says whether a reply may
follow the replies so far, :func:`session_state` folds them into a :class:`SessionState`.

Messages are sealed end to end: a request's message to the host, a reply's to the other
party, with ``nacl.public.SealedBox`` to the recipient's X25519 key (converted from its
Ed25519 key), so a registry stores and relays them but never reads them. A request
carries the host's key (it must hash to ``host_id``) so that the scientist's later replies
can be sealed to it too.

Documents are signed like listings (:mod:`duet_p2p.registry.listing`): the canonical JSON
body, the signer's Ed25519 signature over ``[context, sha256(body)]`` (length-prefixed),
on the wire ``{"body", "key", "sig", "v": 1}``. Parsing is strict (unknown or missing
fields, non-canonical JSON and oversize input are refused); every failure is an
:class:`InvalidDocument` (an ``InvalidListing``). The order of replies is the order the
registry received them; a registry may drop replies but cannot forge or alter one.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import time
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey

from duet_p2p.identity import KEY_BYTES, SIGNATURE_BYTES, Identity, id_of
from duet_p2p.registry.canonical_json import (
    b64url_decode,
    b64url_encode,
    canonical_json,
    parse_canonical,
)
from duet_p2p.registry.listing import InvalidListing, SignedListing, signed_message

__all__ = [
    "ACTIONS", "FINAL_STATUSES", "MAX_MESSAGE_CHARS", "MAX_MINUTES", "MAX_PROPOSALS",
    "MIN_MINUTES", "REPLY_CONTEXT", "REQUEST_CONTEXT", "STATUSES", "InvalidDocument",
    "SessionReply", "SessionRequest", "SessionState", "SignedSessionReply",
    "SignedSessionRequest", "check_reply", "reply_session", "request_session",
    "session_state",
]  # fmt: skip

VERSION = 1
REQUEST_CONTEXT = b"duet_p2p session request v1"
REPLY_CONTEXT = b"duet_p2p session reply v1"
MAX_PROPOSALS = 5
MIN_MINUTES = 15
MAX_MINUTES = 24 * 60
MAX_MESSAGE_CHARS = 2000
MAX_AHEAD_SECONDS = 400 * 86400.0
"""Latest proposed time, counted from the document's own time."""
MAX_TIME = float(1 << 40)
MAX_ZONE_CHARS = 64
SEAL_OVERHEAD = 48
MAX_SEALED_BYTES = 4 * MAX_MESSAGE_CHARS + SEAL_OVERHEAD
MAX_DOC_BYTES = 1 << 14
"""Largest body of a session document (a sealed message of 2000 characters fits)."""
MAX_WIRE_EXTRA = 256
ACTIONS = ("accept", "decline", "propose", "withdraw")
STATUSES = ("pending", "proposed", "accepted", "declined", "withdrawn")
FINAL_STATUSES = ("declined", "withdrawn")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,3}")
_ENVELOPE_KEYS = frozenset({"v", "body", "key", "sig"})
_PARSE_ERRORS = (ValueError, TypeError, KeyError, OverflowError, RecursionError)
_REQUEST_FIELDS = (
    "request_id", "listing_id", "host_id", "host_key", "scientist_id", "scientist_key",
    "proposed", "minutes", "time_zone", "sealed_message", "at",
)  # fmt: skip
_REPLY_FIELDS = (
    "reply_id", "request_id", "author_id", "author_key", "action", "start", "proposed",
    "sealed_message", "at",
)  # fmt: skip


class InvalidDocument(InvalidListing):
    """A session document, review or access document is malformed, oversize, not
    canonical, forged, or not allowed where it is sent."""


# -- checks shared by the registry's documents --------------------------------------------


def check_hex32(value: object, what: str) -> str:
    if type(value) is not str or not _HEX32.fullmatch(value):
        raise InvalidDocument(f"{what} must be 32 lower-case hex digits")
    return value


def check_time(value: object, what: str) -> float:
    if type(value) not in (int, float) or not 0 < value <= MAX_TIME:  # type: ignore[operator]
        raise InvalidDocument(f"{what} must be a positive unix time")
    return float(value)  # type: ignore[arg-type]


def check_key(value: object, what: str) -> bytes:
    if type(value) is not bytes or len(value) != KEY_BYTES:
        raise InvalidDocument(f"{what} is a {KEY_BYTES}-byte Ed25519 public key")
    return value


def check_owner(key: bytes, owner_id: str, what: str) -> None:
    """``key`` must hash to ``owner_id``."""
    if not hmac.compare_digest(id_of(key), owner_id):
        raise InvalidDocument(f"{what} does not belong to {owner_id}")


def check_signature(value: object) -> bytes:
    if type(value) is not bytes or len(value) != SIGNATURE_BYTES:
        raise InvalidDocument(f"a signature is {SIGNATURE_BYTES} bytes")
    return value


def check_text(value: object, what: str, limit: int) -> str:
    """Text of at most ``limit`` characters: printable, newlines and tabs."""
    if type(value) is not str or len(value) > limit:
        raise InvalidDocument(f"{what} is text of at most {limit} characters")
    if not value.replace("\n", "").replace("\t", "").isprintable():
        raise InvalidDocument(
            f"{what} holds a control, format or invisible character (only newlines and tabs "
            "are allowed)"
        )
    return value


def normalize_text(value: object) -> object:
    """CR LF and lone CR as newlines (anything not text is left for the checks)."""
    return value.replace("\r\n", "\n").replace("\r", "\n") if type(value) is str else value


def check_zone(value: object) -> str:
    if type(value) is not str or len(value) > MAX_ZONE_CHARS or not _ZONE.fullmatch(value):
        raise InvalidDocument("time_zone is an IANA time zone name such as Europe/Paris or UTC")
    try:
        zoneinfo.ZoneInfo(value)
    except (ValueError, KeyError, OSError):
        raise InvalidDocument(f"time_zone {value!r} is not a known IANA time zone") from None
    return value


def local_zone() -> str:
    """This machine's IANA time zone name, or "UTC" when it cannot be told."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        try:
            return check_zone(name)
        except InvalidDocument:
            continue
    return "UTC"


def _times(value: object, what: str, after: float) -> tuple[float, ...]:
    """1 to MAX_PROPOSALS start times: whole minutes, strictly increasing, after ``after``
    and at most MAX_AHEAD_SECONDS later."""
    if type(value) not in (list, tuple) or not 0 < len(value) <= MAX_PROPOSALS:  # type: ignore[arg-type]
        raise InvalidDocument(f"{what} is a list of 1 to {MAX_PROPOSALS} times")
    out = tuple(_minute(item, f"a time in {what}") for item in value)  # type: ignore[union-attr]
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise InvalidDocument(f"{what} must be strictly increasing")
    if out[0] <= after or out[-1] > after + MAX_AHEAD_SECONDS:
        raise InvalidDocument(
            f"{what} must lie after the document is made and within "
            f"{int(MAX_AHEAD_SECONDS // 86400)} days of it"
        )
    return out


def _minute(value: object, what: str) -> float:
    number = check_time(value, what)
    if number % 60 != 0:
        raise InvalidDocument(f"{what} must be a whole minute (UTC epoch seconds)")
    return number


def to_epoch(value: object, what: str = "a time") -> float:
    """A time as UTC epoch seconds: a number, a datetime or ISO 8601 text such as
    ``"2030-06-03T14:00"`` (naive means local time)."""
    if type(value) is str and len(value) <= 64:
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidDocument(f"{what} is not an ISO 8601 date and time") from None
    if isinstance(value, datetime):
        return value.timestamp()
    if type(value) in (int, float) and math.isfinite(value):  # type: ignore[arg-type]
        return float(value)  # type: ignore[arg-type]
    raise InvalidDocument(f"{what} is a datetime or UTC epoch seconds")


# -- sealing ----------------------------------------------------------------------------


def seal(message: str, recipient_key: bytes) -> bytes:
    """``message`` sealed to the holder of Ed25519 key ``recipient_key``."""
    text = check_text(normalize_text(message), "a message", MAX_MESSAGE_CHARS)
    try:
        public = PublicKey(crypto_sign_ed25519_pk_to_curve25519(check_key(recipient_key, "a key")))
    except (CryptoError, ValueError):
        raise InvalidDocument("the recipient's key is not a valid Ed25519 key") from None
    return SealedBox(public).encrypt(text.encode("utf-8"))


def unseal(sealed: bytes, identity: Identity) -> str:
    """The message in ``sealed``, opened with ``identity``'s key; checked like the text sent."""
    private: PrivateKey = SigningKey(identity.seed()).to_curve25519_private_key()
    try:
        data = SealedBox(private).decrypt(sealed)
        text = data.decode("utf-8")
    except (CryptoError, ValueError):
        raise InvalidDocument("the message does not open with this identity's key") from None
    return check_text(text, "a message", MAX_MESSAGE_CHARS)


def _sealed(value: object) -> bytes:
    if type(value) is not bytes or not SEAL_OVERHEAD <= len(value) <= MAX_SEALED_BYTES:
        raise InvalidDocument(f"a sealed message is {SEAL_OVERHEAD} to {MAX_SEALED_BYTES} bytes")
    return value


# -- the envelope -----------------------------------------------------------------------


def sign_body(identity: Identity, context: bytes, body: bytes) -> bytes:
    return identity.sign_bytes(signed_message(context, hashlib.sha256(body).digest()))


def verify_body(key: bytes, signature: bytes, context: bytes, body: bytes) -> None:
    message = signed_message(context, hashlib.sha256(body).digest())
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise InvalidDocument("the signature does not hold") from None


def encode_body(fields: dict[str, Any], limit: int = MAX_DOC_BYTES) -> bytes:
    return canonical_json(
        {"v": VERSION, **fields}, max_depth=4, max_bytes=limit, error=InvalidDocument
    )


def pack(body: bytes, key: bytes, signature: bytes) -> bytes:
    """The wire form: the canonical body inlined as an object in the canonical envelope."""
    return b"".join((
        b'{"body":', body, b',"key":"', b64url_encode(key).encode(), b'","sig":"',
        b64url_encode(signature).encode(), b'","v":', str(VERSION).encode(), b"}",
    ))  # fmt: skip


def decode_b64(value: object, what: str, limit: int) -> bytes:
    return b64url_decode(value, max_bytes=limit, what=what, error=InvalidDocument)


def read_wire(
    data: object,
    what: str,
    fields: tuple[str, ...],
    parse: Callable[[dict[str, Any], bytes, bytes], Any],
    limit: int = MAX_DOC_BYTES,
) -> Any:
    """Parse a signed document: strict canonical envelope, the body's fields exactly
    ``v`` and ``fields``; ``parse(body fields, key, signature)`` builds and verifies it.
    Every failure is an InvalidDocument."""
    if type(data) is str:
        if len(data) > limit + MAX_WIRE_EXTRA:
            raise InvalidDocument(f"a {what} is at most {limit + MAX_WIRE_EXTRA} bytes")
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidDocument(f"a {what} is JSON bytes or text")
    try:
        envelope = parse_canonical(
            bytes(data), max_bytes=limit + MAX_WIRE_EXTRA, max_depth=4, error=InvalidDocument
        )
        if type(envelope) is not dict or set(envelope) != _ENVELOPE_KEYS:
            raise InvalidDocument(
                f"a signed {what} is an object of exactly {sorted(_ENVELOPE_KEYS)}"
            )
        if type(envelope["v"]) is not int or envelope["v"] != VERSION:
            raise InvalidDocument(f"unknown {what} version (this one reads version {VERSION})")
        body = envelope["body"]
        if type(body) is not dict or set(body) != {"v", *fields}:
            raise InvalidDocument(f"a {what} has exactly the fields v, " + ", ".join(fields))
        if type(body["v"]) is not int or body["v"] != VERSION:
            raise InvalidDocument(f"unknown {what} version (this one reads version {VERSION})")
        key = decode_b64(envelope["key"], "a signing key", KEY_BYTES)
        signature = decode_b64(envelope["sig"], "a signature", SIGNATURE_BYTES)
        return parse({name: body[name] for name in fields}, key, signature)
    except InvalidListing:
        raise
    except _PARSE_ERRORS as exc:
        raise InvalidDocument(f"malformed {what}: {str(exc)[:200]}") from None


# -- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRequest:
    """A scientist's request for a session with a listing's host; checked when built."""

    request_id: str
    listing_id: str
    host_id: str
    host_key: bytes
    scientist_id: str
    scientist_key: bytes
    proposed: tuple[float, ...]
    minutes: int
    time_zone: str
    sealed_message: bytes
    at: float

    def __post_init__(self) -> None:
        put = object.__setattr__
        check_hex32(self.request_id, "request_id")
        check_hex32(self.listing_id, "listing_id")
        check_hex32(self.host_id, "host_id")
        check_hex32(self.scientist_id, "scientist_id")
        check_owner(check_key(self.host_key, "host_key"), self.host_id, "host_key")
        check_owner(
            check_key(self.scientist_key, "scientist_key"), self.scientist_id, "scientist_key"
        )
        if self.host_id == self.scientist_id:
            raise InvalidDocument("a host cannot request a session with itself")
        at = check_time(self.at, "at")
        put(self, "at", at)
        put(self, "proposed", _times(self.proposed, "proposed", at))
        if type(self.minutes) is not int or not MIN_MINUTES <= self.minutes <= MAX_MINUTES:
            raise InvalidDocument(f"minutes is an int from {MIN_MINUTES} to {MAX_MINUTES}")
        check_zone(self.time_zone)
        _sealed(self.sealed_message)

    def body_bytes(self) -> bytes:
        fields = {name: getattr(self, name) for name in _REQUEST_FIELDS}
        fields["proposed"] = list(self.proposed)
        for name in ("host_key", "scientist_key", "sealed_message"):
            fields[name] = b64url_encode(fields[name])
        return encode_body(fields)


@dataclass(frozen=True)
class SignedSessionRequest:
    """A session request and its scientist's signature."""

    request: SessionRequest
    key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.request, SessionRequest):
            raise InvalidDocument("a signed session request holds a SessionRequest")
        check_key(self.key, "a signing key")
        check_signature(self.signature)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def listing_id(self) -> str:
        return self.request.listing_id

    @property
    def host_id(self) -> str:
        return self.request.host_id

    @property
    def scientist_id(self) -> str:
        return self.request.scientist_id

    def verify(self) -> None:
        """The signing key is the scientist's and the signature holds."""
        if not hmac.compare_digest(self.key, self.request.scientist_key):
            raise InvalidDocument("the request is signed by a key other than its scientist's")
        verify_body(self.key, self.signature, REQUEST_CONTEXT, self.request.body_bytes())

    def to_wire(self) -> bytes:
        return pack(self.request.body_bytes(), self.key, self.signature)

    @classmethod
    def from_wire(cls, data: bytes | str) -> SignedSessionRequest:
        """Parse and verify a signed session request."""

        def parse(fields: dict[str, Any], key: bytes, signature: bytes) -> SignedSessionRequest:
            for name, size in (("host_key", KEY_BYTES), ("scientist_key", KEY_BYTES)):
                fields[name] = decode_b64(fields[name], name, size)
            fields["sealed_message"] = decode_b64(
                fields["sealed_message"], "sealed_message", MAX_SEALED_BYTES
            )
            signed = cls(SessionRequest(**fields), key, signature)
            signed.verify()
            return signed

        return read_wire(data, "session request", _REQUEST_FIELDS, parse)  # type: ignore[no-any-return]

    def open_message(self, identity: Identity) -> str:
        """The scientist's message, opened by the host."""
        if identity.id != self.request.host_id:
            raise InvalidDocument("only the host opens a session request's message")
        return unseal(self.request.sealed_message, identity)

    def __repr__(self) -> str:
        r = self.request
        return f"<SignedSessionRequest {r.request_id} {r.scientist_id} -> {r.host_id}>"


def request_session(
    identity: Identity,
    listing: SignedListing,
    proposed: Sequence[datetime | float],
    *,
    minutes: int = 60,
    message: str = "",
    time_zone: str | None = None,
    now: float | None = None,
) -> SignedSessionRequest:
    """``identity``'s signed request for a session with ``listing``'s host at one of
    ``proposed`` (datetimes or UTC epoch seconds, whole minutes; naive datetimes are local
    time), ``message`` sealed to the host."""
    if not isinstance(listing, SignedListing):
        raise InvalidDocument("a session is requested for a SignedListing")
    listing.verify()
    if isinstance(proposed, datetime | int | float | str | bytes):
        proposed = [proposed]  # type: ignore[list-item]
    if not isinstance(proposed, Sequence) or len(proposed) > MAX_PROPOSALS:
        raise InvalidDocument(f"proposed is a list of 1 to {MAX_PROPOSALS} times")
    times = sorted({to_epoch(item, "a proposed time") for item in proposed})
    spec = listing.spec
    request = SessionRequest(
        request_id=os.urandom(16).hex(), listing_id=spec.listing_id, host_id=spec.host_id,
        host_key=spec.host_key, scientist_id=identity.id, scientist_key=identity.public_key,
        proposed=tuple(times), minutes=minutes,
        time_zone=local_zone() if time_zone is None else time_zone,
        sealed_message=seal(message, spec.host_key),
        at=time.time() if now is None else now,
    )  # fmt: skip
    signature = sign_body(identity, REQUEST_CONTEXT, request.body_bytes())
    return SignedSessionRequest(request, identity.public_key, signature)


# -- replies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionReply:
    """One answer in a session's exchange; checked when built."""

    reply_id: str
    request_id: str
    author_id: str
    author_key: bytes
    action: str
    start: float | None
    proposed: tuple[float, ...]
    sealed_message: bytes
    at: float

    def __post_init__(self) -> None:
        put = object.__setattr__
        check_hex32(self.reply_id, "reply_id")
        check_hex32(self.request_id, "request_id")
        check_hex32(self.author_id, "author_id")
        check_owner(check_key(self.author_key, "author_key"), self.author_id, "author_key")
        if type(self.action) is not str or self.action not in ACTIONS:
            raise InvalidDocument(f"action is one of {list(ACTIONS)}")
        at = check_time(self.at, "at")
        put(self, "at", at)
        if self.action == "accept":
            put(self, "start", _minute(self.start, "start"))
        elif self.start is not None:
            raise InvalidDocument("only an accept names a start")
        if self.action == "propose":
            put(self, "proposed", _times(self.proposed, "proposed", at))
        elif type(self.proposed) not in (list, tuple) or len(self.proposed) != 0:
            raise InvalidDocument("only a propose names proposed times")
        else:
            put(self, "proposed", ())
        _sealed(self.sealed_message)

    def body_bytes(self) -> bytes:
        fields = {name: getattr(self, name) for name in _REPLY_FIELDS}
        fields["proposed"] = list(self.proposed)
        fields["author_key"] = b64url_encode(self.author_key)
        fields["sealed_message"] = b64url_encode(self.sealed_message)
        return encode_body(fields)


@dataclass(frozen=True)
class SignedSessionReply:
    """A session reply and its author's signature."""

    reply: SessionReply
    key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.reply, SessionReply):
            raise InvalidDocument("a signed session reply holds a SessionReply")
        check_key(self.key, "a signing key")
        check_signature(self.signature)

    @property
    def reply_id(self) -> str:
        return self.reply.reply_id

    @property
    def request_id(self) -> str:
        return self.reply.request_id

    @property
    def author_id(self) -> str:
        return self.reply.author_id

    @property
    def action(self) -> str:
        return self.reply.action

    def verify(self) -> None:
        """The signing key is the author's and the signature holds."""
        if not hmac.compare_digest(self.key, self.reply.author_key):
            raise InvalidDocument("the reply is signed by a key other than its author's")
        verify_body(self.key, self.signature, REPLY_CONTEXT, self.reply.body_bytes())

    def to_wire(self) -> bytes:
        return pack(self.reply.body_bytes(), self.key, self.signature)

    @classmethod
    def from_wire(cls, data: bytes | str) -> SignedSessionReply:
        """Parse and verify a signed session reply."""

        def parse(fields: dict[str, Any], key: bytes, signature: bytes) -> SignedSessionReply:
            fields["author_key"] = decode_b64(fields["author_key"], "author_key", KEY_BYTES)
            fields["sealed_message"] = decode_b64(
                fields["sealed_message"], "sealed_message", MAX_SEALED_BYTES
            )
            signed = cls(SessionReply(**fields), key, signature)
            signed.verify()
            return signed

        return read_wire(data, "session reply", _REPLY_FIELDS, parse)  # type: ignore[no-any-return]

    def open_message(self, identity: Identity) -> str:
        """The reply's message, opened by the party it was sealed to (not its author)."""
        if identity.id == self.reply.author_id:
            raise InvalidDocument("a reply's message is sealed to the other party")
        return unseal(self.reply.sealed_message, identity)

    def __repr__(self) -> str:
        r = self.reply
        return f"<SignedSessionReply {r.action} {r.reply_id} by {r.author_id}>"


def reply_session(
    identity: Identity,
    request: SignedSessionRequest,
    action: str,
    *,
    start: datetime | float | None = None,
    proposed: Sequence[datetime | float] = (),
    message: str = "",
    now: float | None = None,
    replies: Sequence[SignedSessionReply] | None = None,
) -> SignedSessionReply:
    """``identity``'s signed reply to ``request``: the host may accept, decline or propose;
    the scientist may withdraw, or accept the host's counter-proposal. ``message`` is sealed
    to the other party. Given the ``replies`` so far, the reply is checked against them
    (:func:`check_reply`)."""
    if not isinstance(request, SignedSessionRequest):
        raise InvalidDocument("a reply answers a SignedSessionRequest")
    request.verify()
    r = request.request
    if identity.id == r.host_id:
        recipient = r.scientist_key
    elif identity.id == r.scientist_id:
        recipient = r.host_key
    else:
        raise InvalidDocument(f"identity {identity.id} is not a party to this session")
    if isinstance(proposed, datetime | int | float | str | bytes):
        proposed = [proposed]  # type: ignore[list-item]
    if not isinstance(proposed, Sequence) or len(proposed) > MAX_PROPOSALS:
        raise InvalidDocument(f"proposed is a list of at most {MAX_PROPOSALS} times")
    times = tuple(sorted({to_epoch(item, "a proposed time") for item in proposed}))
    at = max(time.time() if now is None else now, r.at)
    reply = SessionReply(
        reply_id=os.urandom(16).hex(), request_id=r.request_id, author_id=identity.id,
        author_key=identity.public_key, action=action,
        start=None if start is None else to_epoch(start, "start"), proposed=times,
        sealed_message=seal(message, recipient), at=at,
    )  # fmt: skip
    signed = SignedSessionReply(
        reply, identity.public_key, sign_body(identity, REPLY_CONTEXT, reply.body_bytes())
    )
    _check_author(r, reply)
    if replies is not None:
        check_reply(request, replies, signed)
    return signed


# -- the exchange -----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionState:
    """Where a session stands: ``status`` (one of STATUSES), the agreed ``start`` (UTC
    epoch seconds) once accepted, the latest ``proposed`` times and the length."""

    status: str
    start: float | None
    proposed: tuple[float, ...]
    minutes: int


def _check_author(request: SessionRequest, reply: SessionReply) -> None:
    """What each party may say at all (whatever the state)."""
    if reply.author_id == request.host_id:
        if reply.action == "withdraw":
            raise InvalidDocument("the host calls a session off with decline, not withdraw")
    elif reply.author_id == request.scientist_id:
        if reply.action not in ("withdraw", "accept"):
            raise InvalidDocument(
                "the scientist may withdraw, or accept the host's counter-proposal"
            )
    else:
        raise InvalidDocument(f"{reply.author_id} is not a party to this session")


def _step(request: SessionRequest, state: SessionState, reply: SessionReply) -> SessionState:
    """The state after ``reply``; InvalidDocument if it may not follow ``state``."""
    if reply.request_id != request.request_id:
        raise InvalidDocument("the reply answers another request")
    if reply.at < request.at:
        raise InvalidDocument("a reply cannot be dated before its request")
    _check_author(request, reply)
    status, host = state.status, reply.author_id == request.host_id
    if status in FINAL_STATUSES:
        raise InvalidDocument(f"the session is {status}: nothing may follow")
    action = reply.action
    if action == "accept":
        expected = "pending" if host else "proposed"
        if status != expected:
            who = "host" if host else "scientist"
            raise InvalidDocument(f"the {who} may accept only a {expected} session, not {status}")
        if reply.start not in state.proposed:
            raise InvalidDocument("an accept must name one of the latest proposed times")
        return SessionState("accepted", reply.start, state.proposed, state.minutes)
    if action == "propose":
        if status not in ("pending", "proposed"):
            raise InvalidDocument(f"times may be proposed for a pending session, not {status}")
        return SessionState("proposed", None, reply.proposed, state.minutes)
    if action == "decline":
        return SessionState("declined", None, state.proposed, state.minutes)
    return SessionState("withdrawn", None, state.proposed, state.minutes)


def _initial(request: SessionRequest) -> SessionState:
    return SessionState("pending", None, request.proposed, request.minutes)


def check_reply(
    request: SignedSessionRequest,
    replies_so_far: Sequence[SignedSessionReply],
    reply: SignedSessionReply,
) -> None:
    """InvalidDocument unless ``reply`` (verified) may follow ``replies_so_far``: it answers
    this request, is not dated before it, its author is a party allowed that action now,
    nothing follows a final state, and an accept names one of the latest proposed times."""
    if not isinstance(reply, SignedSessionReply) or not isinstance(request, SignedSessionRequest):
        raise InvalidDocument("a reply is checked against a SignedSessionRequest")
    reply.verify()
    state = session_state(request, replies_so_far, strict=True)
    _step(request.request, state, reply.reply)


def session_state(
    request: SignedSessionRequest,
    replies: Sequence[SignedSessionReply],
    *,
    strict: bool = False,
) -> SessionState:
    """The state after ``replies`` in order. A reply that fails to verify or may not follow
    is skipped (``strict``: InvalidDocument instead), so a relay can hide replies but not
    invent any."""
    state = _initial(request.request)
    seen: set[str] = set()
    for item in replies:
        try:
            if not isinstance(item, SignedSessionReply):
                raise InvalidDocument("replies are SignedSessionReply documents")
            if item.reply_id in seen:
                raise InvalidDocument("the same reply appears twice")
            item.verify()
            state = _step(request.request, state, item.reply)
            seen.add(item.reply_id)
        except InvalidDocument:
            if strict:
                raise
    return state
