"""Envelopes: one message sealed to its recipient and signed by its sender.

A mailbox server holds messages for recipients who are offline; it sees only envelopes.

Keys. Every identity's Ed25519 key converts to an X25519 key (libsodium's
``crypto_sign_ed25519_*_to_curve25519``). The recipient's key is pinned (see
:mod:`duet_p2p.mailbox.known_keys`) and must hash to the recipient's ID, else sealing is
refused; it is never taken from a server.

Layout. ``MAGIC (4) || header length (4, big-endian) || header || body || signature (64)``.
The header is a CBOR map (:mod:`duet_p2p.rpc.codec`): version, kind, sender_id,
sender_key (the sender's Ed25519 public key), recipient_id, nonce (24 random bytes),
created_at (whole seconds) and, for the parts of a stream, stream (id, index, count; see
:mod:`duet_p2p.mailbox.stream`). The body of a single message is the payload encrypted with
``nacl.public.Box(sender X25519 private, recipient X25519 public)`` under the nonce, which
authenticates both ends. The signature is the sender's Ed25519 signature over the
length-prefixed parts ``b"duet_p2p mailbox envelope v1"``, header and body, so the sender is
proved by its ID even were the X25519 keys misused, and nothing in the header can change.

Opening. The caller names the sender it expects (e.g. the ``sender_id`` the mailbox reported,
or the ID of the job's host). The sender's key travels in the header and must hash to that
ID; as the ID is the hash of the key, this pins it as well as a stored key would (pass
``sender_key`` to require one exactly). Then: the recipient must be us, the signature must
hold, the kind must be one expected, the envelope must be fresh (at most ``max_age`` old,
default 8 days, and at most 5 minutes from the future), and the Box must open. Anything else
raises :class:`EnvelopeRefused`, whose message never carries plaintext. Every check that
needs no secret runs before anything is decrypted.

Replay. :class:`SeenMessages` remembers the (sender, nonce) of every message opened until it
would be refused as stale anyway, and refuses it a second time.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from duet_p2p.errors import ConfigurationError, DuetError, ProtocolError
from duet_p2p.identity import KEY_BYTES, SIGNATURE_BYTES, Identity
from duet_p2p.mailbox.known_keys import (
    KeyNotPinned,
    check_id,
    check_key,
    key_matches,
    private_directory,
)
from duet_p2p.paths import data_dir
from duet_p2p.rpc import codec

MAGIC = b"DMB\x01"
VERSION = 1
MAX_ENVELOPE_BYTES = 512 * 1024
"""Largest envelope, as a mailbox server accepts it."""
MAX_HEADER_BYTES = 1024
MAX_PAYLOAD_BYTES = MAX_ENVELOPE_BYTES - 2048
"""Largest payload of one envelope; larger ones go as a stream."""
NONCE_BYTES = 24
STREAM_ID_BYTES = 16
MAX_STREAM_CHUNKS = 1 << 16
DEFAULT_MAX_AGE = 8 * 86400.0
"""Seconds an envelope stays acceptable after it was sealed."""
MAX_CLOCK_SKEW = 300.0
"""Seconds an envelope may seem to come from the future (clocks differ)."""
_SIGN_CONTEXT = b"duet_p2p mailbox envelope v1"
_KIND = re.compile(r"[a-z][a-z0-9-]{0,31}")
_PREFIX = len(MAGIC) + 4
_HEADER_KEYS = {"version", "kind", "sender_id", "sender_key", "recipient_id", "nonce", "created_at"}
_HEADER_LIMITS = codec.DecodeLimits(
    max_depth=3, max_items=32, max_bytes=MAX_HEADER_BYTES, max_tensor_elements=1
)


class EnvelopeRefused(DuetError):
    """A mailbox message was malformed, forged, changed, misaddressed, stale or replayed."""


@dataclass(frozen=True)
class StreamInfo:
    """Where an envelope sits in a stream: index 0 opens it, 1..count carry its chunks."""

    stream_id: bytes
    index: int
    count: int


@dataclass(frozen=True)
class Header:
    """What an envelope says about itself (signed with its body)."""

    kind: str
    sender_id: str
    sender_key: bytes
    recipient_id: str
    nonce: bytes
    created_at: int
    stream: StreamInfo | None = None

    def encode(self) -> bytes:
        fields: dict[str, object] = {
            "version": VERSION,
            "kind": self.kind,
            "sender_id": self.sender_id,
            "sender_key": self.sender_key,
            "recipient_id": self.recipient_id,
            "nonce": self.nonce,
            "created_at": self.created_at,
        }
        if self.stream is not None:
            s = self.stream
            fields["stream"] = {"id": s.stream_id, "index": s.index, "count": s.count}
        return codec.encode(fields)


@dataclass(frozen=True)
class Opened:
    """An opened message: its verified header and its payload."""

    header: Header
    payload: bytes = field(repr=False)

    @property
    def kind(self) -> str:
        return self.header.kind

    @property
    def sender_id(self) -> str:
        return self.header.sender_id

    @property
    def nonce(self) -> bytes:
        return self.header.nonce

    @property
    def created_at(self) -> int:
        return self.header.created_at


# -- keys ------------------------------------------------------------------------------


def identity_seed(identity: Identity) -> bytes:
    """The 32-byte Ed25519 seed of ``identity`` (secret)."""
    return identity.seed()


def x25519_private(identity: Identity) -> PrivateKey:
    """The X25519 private key of ``identity``."""
    return SigningKey(identity_seed(identity)).to_curve25519_private_key()


def x25519_public(public_key: bytes) -> PublicKey:
    """The X25519 public key of an Ed25519 public key."""
    return VerifyKey(check_key(public_key)).to_curve25519_public_key()


def pinned_recipient(recipient_id: str, recipient_key: bytes) -> bytes:
    """``recipient_key`` if it is the key ``recipient_id`` stands for; KeyNotPinned if not."""
    check_id(recipient_id, "recipient ID")
    check_key(recipient_key)
    if not key_matches(recipient_id, recipient_key):
        raise KeyNotPinned(
            f"the key given for {recipient_id} does not hash to it: use the key pinned by a "
            "verified session (KnownKeys), never one a server handed out"
        )
    return recipient_key


# -- sealing ---------------------------------------------------------------------------


def check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError("a kind is 1 to 32 of a-z, 0-9 and -, starting with a letter")
    return kind


def new_header(
    sender: Identity,
    recipient_id: str,
    kind: str,
    *,
    stream: StreamInfo | None = None,
    now: float | None = None,
) -> Header:
    """A header for a new envelope from ``sender`` (fresh random nonce)."""
    created = math.floor(time.time() if now is None else now)
    return Header(
        check_kind(kind), sender.id, sender.public_key, check_id(recipient_id, "recipient ID"),
        os.urandom(NONCE_BYTES), created, stream,
    )  # fmt: skip


def box_seal(sender: Identity, recipient_key: bytes, nonce: bytes, plaintext: bytes) -> bytes:
    """``plaintext`` encrypted from ``sender`` to ``recipient_key`` (ciphertext only)."""
    box = Box(x25519_private(sender), x25519_public(recipient_key))
    return box.encrypt(plaintext, nonce).ciphertext


def sign_envelope(sender: Identity, header: Header, body: bytes) -> bytes:
    """The envelope of ``header`` and ``body``, signed by ``sender``."""
    encoded = header.encode()
    if len(encoded) > MAX_HEADER_BYTES:
        raise ValueError("the envelope header is too large")
    signature = sender.sign_bytes(_signed_message(encoded, body))
    envelope = b"".join((MAGIC, len(encoded).to_bytes(4, "big"), encoded, body, signature))
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise ValueError(f"an envelope is at most {MAX_ENVELOPE_BYTES} bytes")
    return envelope


def seal_envelope(
    sender: Identity,
    recipient_id: str,
    recipient_key: bytes,
    kind: str,
    payload: bytes,
    *,
    now: float | None = None,
) -> bytes:
    """``payload`` sealed to ``recipient_id`` (whose pinned key is ``recipient_key``) and
    signed by ``sender``. Payloads over MAX_PAYLOAD_BYTES go with ``seal_stream``."""
    pinned_recipient(recipient_id, recipient_key)
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError("a payload is bytes")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"a payload of one envelope is at most {MAX_PAYLOAD_BYTES} bytes: use seal_stream"
        )
    header = new_header(sender, recipient_id, kind, now=now)
    return sign_envelope(sender, header, box_seal(sender, recipient_key, header.nonce, payload))


# -- opening ---------------------------------------------------------------------------


def verify_envelope(
    recipient: Identity,
    envelope: bytes,
    *,
    sender_id: str,
    sender_key: bytes | None = None,
    kinds: Collection[str] | None = None,
    max_age: float = DEFAULT_MAX_AGE,
    now: float | None = None,
) -> tuple[Header, bytes]:
    """Check everything but the encryption of ``envelope``: (its header, its body still
    encrypted). EnvelopeRefused if it is malformed, not from ``sender_id`` (and its key
    ``sender_key`` if given), not to ``recipient``, not signed, of another kind, or stale."""
    check_id(sender_id, "sender ID")
    encoded, body = _split(envelope)
    header = _parse_header(encoded)
    if header.sender_id != sender_id:
        raise EnvelopeRefused(
            f"refused a mailbox message: it says it is from {header.sender_id}, not {sender_id}"
        )
    if not key_matches(sender_id, header.sender_key) or (
        sender_key is not None and sender_key != header.sender_key
    ):
        raise EnvelopeRefused(
            f"refused a mailbox message: its sender key is not the one {sender_id} stands for"
        )
    if header.recipient_id != recipient.id:
        raise EnvelopeRefused(
            f"refused a mailbox message: it is addressed to {header.recipient_id}, not to us"
        )
    try:
        VerifyKey(header.sender_key).verify(
            _signed_message(encoded, body), envelope[-SIGNATURE_BYTES:]
        )
    except (BadSignatureError, CryptoError, ValueError):
        raise EnvelopeRefused(
            f"refused a mailbox message: its signature does not hold (changed in transit, or "
            f"not from {sender_id})"
        ) from None
    if kinds is not None and header.kind not in kinds:
        raise EnvelopeRefused(f"refused a mailbox message of unexpected kind {header.kind!r}")
    check_fresh(header, max_age=max_age, now=now)
    return header, body


def check_fresh(
    header: Header, *, max_age: float = DEFAULT_MAX_AGE, now: float | None = None
) -> None:
    """EnvelopeRefused if ``header`` is older than ``max_age`` s or from the future."""
    age = (time.time() if now is None else now) - header.created_at
    if age > max_age:
        raise EnvelopeRefused(
            f"refused a mailbox message sealed {age / 86400:.1f} days ago (at most "
            f"{max_age / 86400:g} days are accepted)"
        )
    if age < -MAX_CLOCK_SKEW:
        raise EnvelopeRefused(
            f"refused a mailbox message dated {-age:.0f} s in the future (check the clocks)"
        )


def box_open(recipient: Identity, header: Header, body: bytes) -> bytes:
    """The plaintext of a Box ``body`` sent to ``recipient``; EnvelopeRefused if it fails."""
    try:
        box = Box(x25519_private(recipient), x25519_public(header.sender_key))
        return box.decrypt(body, header.nonce)
    except (CryptoError, ValueError, TypeError):
        raise EnvelopeRefused(
            "refused a mailbox message: it does not decrypt (sealed to another key, or changed)"
        ) from None


def open_envelope(
    recipient: Identity,
    envelope: bytes,
    *,
    sender_id: str,
    sender_key: bytes | None = None,
    kinds: Collection[str] | None = None,
    seen: SeenMessages | None = None,
    max_age: float = DEFAULT_MAX_AGE,
    now: float | None = None,
) -> Opened:
    """The verified, decrypted message in ``envelope`` (see ``verify_envelope``); with
    ``seen``, also refused if it was opened before. Parts of a stream are refused: they go
    to a ``StreamAssembler``."""
    header, body = verify_envelope(
        recipient, envelope, sender_id=sender_id, sender_key=sender_key, kinds=kinds,
        max_age=max_age, now=now,
    )  # fmt: skip
    if header.stream is not None:
        raise EnvelopeRefused("refused a mailbox message: it is part of a stream")
    payload = box_open(recipient, header, body)
    if seen is not None:
        seen.add(header.sender_id, header.nonce, header.created_at + max_age + 1)
    return Opened(header, payload)


def peek_header(envelope: bytes) -> Header:
    """The header of ``envelope`` UNVERIFIED (to route it, e.g. to its stream's assembler);
    EnvelopeRefused if malformed. Nothing it says is trusted until it is opened."""
    return _parse_header(_split(envelope)[0])


def _split(envelope: bytes) -> tuple[bytes, bytes]:
    """(header, body) of ``envelope``; EnvelopeRefused if its framing is malformed."""
    if not isinstance(envelope, bytes) or len(envelope) > MAX_ENVELOPE_BYTES:
        raise EnvelopeRefused(f"refused a mailbox message: not bytes, or over {MAX_ENVELOPE_BYTES}")
    if len(envelope) < _PREFIX + SIGNATURE_BYTES or not envelope.startswith(MAGIC):
        raise EnvelopeRefused("refused a mailbox message: not an envelope")
    size = int.from_bytes(envelope[len(MAGIC) : _PREFIX], "big")
    if size > MAX_HEADER_BYTES or _PREFIX + size + SIGNATURE_BYTES > len(envelope):
        raise EnvelopeRefused("refused a mailbox message: its header length is malformed")
    return envelope[_PREFIX : _PREFIX + size], envelope[_PREFIX + size : -SIGNATURE_BYTES]


def _signed_message(header: bytes, body: bytes) -> bytes:
    return b"".join(len(part).to_bytes(4, "big") + part for part in (_SIGN_CONTEXT, header, body))


def _parse_header(encoded: bytes) -> Header:
    malformed = EnvelopeRefused("refused a mailbox message: its header is malformed")
    try:
        fields = codec.decode(encoded, limits=_HEADER_LIMITS)
    except ProtocolError:
        raise malformed from None
    if not isinstance(fields, dict) or set(fields) - {"stream"} != _HEADER_KEYS:
        raise malformed
    if fields["version"] != VERSION or type(fields["version"]) is not int:
        raise EnvelopeRefused("refused a mailbox message of an unknown version")
    kind, sender_key, nonce = fields["kind"], fields["sender_key"], fields["nonce"]
    created = fields["created_at"]
    if (
        not isinstance(kind, str)
        or not _KIND.fullmatch(kind)
        or not _is_id(fields["sender_id"])
        or not _is_id(fields["recipient_id"])
        or not isinstance(sender_key, bytes)
        or len(sender_key) != KEY_BYTES
        or not isinstance(nonce, bytes)
        or len(nonce) != NONCE_BYTES
        or type(created) is not int
        or not 0 <= created < 1 << 40
    ):
        raise malformed
    stream = _parse_stream(fields["stream"]) if "stream" in fields else None
    return Header(kind, fields["sender_id"], sender_key, fields["recipient_id"], nonce, created,
                  stream)  # fmt: skip


def _parse_stream(value: object) -> StreamInfo:
    malformed = EnvelopeRefused("refused a mailbox message: its stream fields are malformed")
    if not isinstance(value, dict) or set(value) != {"id", "index", "count"}:
        raise malformed
    stream_id, index, count = value["id"], value["index"], value["count"]
    if (
        not isinstance(stream_id, bytes)
        or len(stream_id) != STREAM_ID_BYTES
        or type(count) is not int
        or not 1 <= count <= MAX_STREAM_CHUNKS
        or type(index) is not int
        or not 0 <= index <= count
    ):
        raise malformed
    return StreamInfo(stream_id, index, count)


def _is_id(value: object) -> bool:
    try:
        check_id(value)
    except ValueError:
        return False
    return True


# -- replay ----------------------------------------------------------------------------


class SeenMessages:
    """The (sender, nonce) of every message opened, each kept until it expires (by then the
    message would be refused as stale); a second open of one is refused. One SQLite file,
    0600 in a 0700 directory; thread-safe."""

    SCHEMA_VERSION = 1

    def __init__(self, path: Path, *, max_entries: int = 1_000_000) -> None:
        if type(max_entries) is not int or max_entries < 1:
            raise ValueError("max_entries must be a positive int")
        self.path = Path(path)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        private_directory(self.path.parent)
        _private_file(self.path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._init()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ConfigurationError(f"{self.path} is not a mailbox database: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open(cls, directory: Path | None = None, **options: int) -> SeenMessages:
        """The store in ``directory`` (default ``<data dir>/mailbox``), ``seen.sqlite``."""
        folder = Path(directory) if directory is not None else data_dir() / "mailbox"
        return cls(folder / "seen.sqlite", **options)

    def add(
        self, sender_id: str, nonce: bytes, expires_at: float, *, now: float | None = None
    ) -> None:
        """Remember a message until ``expires_at``; EnvelopeRefused if it was seen before."""
        check_id(sender_id, "sender ID")
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM seen WHERE expires_at < ?", (now,))
                try:
                    self._db.execute(
                        "INSERT INTO seen VALUES (?, ?, ?)", (sender_id, nonce, float(expires_at))
                    )
                except sqlite3.IntegrityError:
                    raise EnvelopeRefused(
                        f"refused a mailbox message from {sender_id}: it was delivered before "
                        "(a replay)"
                    ) from None
                (count,) = self._db.execute("SELECT count(*) FROM seen").fetchone()
                if count > self.max_entries:
                    raise EnvelopeRefused(
                        f"refused a mailbox message: {self.max_entries} recent messages are "
                        "remembered already"
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM seen").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SeenMessages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _init(self) -> None:
        db = self._db
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA trusted_schema=OFF")
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            raise ConfigurationError(f"{self.path}: SQLite refused WAL mode")
        db.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT")
                db.execute("INSERT INTO schema_version VALUES (?)", (self.SCHEMA_VERSION,))
                db.execute(
                    "CREATE TABLE seen (sender_id TEXT NOT NULL, nonce BLOB NOT NULL, "
                    "expires_at REAL NOT NULL, PRIMARY KEY (sender_id, nonce)) STRICT, "
                    "WITHOUT ROWID"
                )
                db.execute("CREATE INDEX seen_by_expiry ON seen (expires_at)")
            elif tables != {"schema_version", "seen"} or db.execute(
                "SELECT version FROM schema_version"
            ).fetchall() != [(self.SCHEMA_VERSION,)]:
                raise ConfigurationError(f"{self.path} is not a mailbox database of this version")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _private_file(path: Path) -> None:
    """Create ``path`` 0600 if missing; refuse it unless it is a private regular file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigurationError(f"{path} is not a regular file of this user's; refusing it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigurationError(f"{path} may be read by other users; chmod 600 {path}")
