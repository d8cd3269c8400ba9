"""Persistent identities: an Ed25519 key per person, and the ID it stands for.

A standing host's ID, and a returning scientist's Client ID, is the first 128 bits of
SHA-256 of the identity's public key, in hex (32 characters, the look of every Duet ID).
During signaling each side signs its connection's DTLS fingerprints, a fresh nonce and the
other side's ID with this key; the other side checks that the key hashes to the ID it was
given and that the signature holds, so a signaling server that substitutes an offer, an
answer or a key is caught.

Keys live in ``<data dir>/identities/<name>.key`` (``$DUET_HOME`` or the per-user data
directory): 32 raw bytes, created on first use, readable by their owner only. A key file
that others may read, or that is not a key, is refused rather than used.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from duet_p2p.errors import ConfigurationError, PeerVerificationError
from duet_p2p.ids import normalise_id, sdp_fingerprints
from duet_p2p.paths import data_dir

KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 32
ID_HEX_CHARS = 32
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONTEXT = b"duet_p2p session binding v1"
ROLES = ("host", "scientist")


def id_of(public_key: bytes) -> str:
    """The ID a public key stands for: SHA-256, first 128 bits, hex."""
    if len(public_key) != KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {KEY_BYTES} bytes")
    return hashlib.sha256(public_key).hexdigest()[:ID_HEX_CHARS]


@dataclass(frozen=True)
class SessionBinding:
    """What one side signs: its role, the ID of the side it talks to, a fresh nonce, and
    the DTLS fingerprints of its own end of this connection."""

    role: str
    peer_id: str
    nonce: bytes
    fingerprints: tuple[str, ...]

    @classmethod
    def for_sdp(cls, role: str, peer_id: str, nonce: bytes, sdp: str) -> SessionBinding:
        """The binding of this side's SDP (its ``a=fingerprint`` lines) to ``peer_id``."""
        pairs = sdp_fingerprints(sdp)
        return cls(role, peer_id, nonce, tuple(f"{alg} {value}" for alg, value in pairs))

    def message(self) -> bytes:
        """The exact bytes signed: fixed-order fields, each length-prefixed."""
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if len(self.nonce) != NONCE_BYTES:
            raise ValueError(f"the nonce must be {NONCE_BYTES} bytes")
        if not self.fingerprints:
            raise ValueError("a binding needs the connection's DTLS fingerprints")
        parts = [_CONTEXT, self.role.encode(), self.peer_id.encode(), self.nonce]
        parts.extend(f.strip().lower().encode() for f in sorted(self.fingerprints))
        return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


class Identity:
    """One person's signing key and the ID it stands for."""

    def __init__(self, key: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._key = key
        self.path = path
        self.public_key = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.id = id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A new identity kept in memory only (tests, one-off use)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, name: str = "default", directory: Path | None = None) -> Identity:
        """The identity ``name``, created (0600, in a 0700 directory) on first use."""
        if not _NAME.fullmatch(name):
            raise ConfigurationError("an identity name is 1 to 64 letters, digits, - or _")
        folder = directory if directory is not None else data_dir() / "identities"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_folder(folder)
        path = folder / f"{name}.key"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return cls(_read_key(path), path)
        key = Ed25519PrivateKey.generate()
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(key, path)

    def sign(self, binding: SessionBinding) -> bytes:
        return self._key.sign(binding.message())

    def seed(self) -> bytes:
        """The private key's 32-byte seed (to derive the X25519 key that opens sealed
        mailbox messages); never leaves the process."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign_bytes(self, message: bytes) -> bytes:
        """Sign a message of another protocol step (e.g. a host's wait proof); every such
        message starts with its own length-prefixed context, so none reads as another."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"<Identity {self.id}>"


def verify(claimed_id: str, public_key: bytes, signature: bytes, binding: SessionBinding) -> None:
    """Check that ``public_key`` is the one ``claimed_id`` stands for and that it signed
    ``binding``; raise PeerVerificationError naming what failed, else return."""
    if not isinstance(public_key, bytes) or len(public_key) != KEY_BYTES:
        raise PeerVerificationError("the peer's identity key is malformed")
    claimed_id = normalise_id(claimed_id, what="identity ID")
    if not hmac.compare_digest(id_of(public_key), claimed_id):
        raise PeerVerificationError(
            f"the peer's identity key does not belong to {claimed_id}: the "
            "signaling server, or someone between, substituted it"
        )
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise PeerVerificationError("the peer's signature is malformed")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, binding.message())
    except InvalidSignature:
        raise PeerVerificationError(
            "the peer's signature does not cover this connection (its fingerprints, nonce "
            "or our ID differ): the signaling server, or someone between, changed them"
        ) from None


def fresh_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _check_folder(folder: Path) -> None:
    """Keys live in a directory of this user's that nobody else may write to (else another
    user could swap a key in)."""
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigurationError(f"{folder} is not a directory of this user's; refusing it")
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise ConfigurationError(
            f"{folder} may be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"chmod 700 {folder}"
        )


def _read_key(path: Path) -> Ed25519PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigurationError(f"{path} cannot be read as an identity key ({exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"{path} is not a regular file; refusing it")
        raw = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigurationError(
            f"{path} may be read by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"an identity key must be private: chmod 600 {path}"
        )
    if info.st_uid != os.getuid():
        raise ConfigurationError(f"{path} belongs to another user; refusing to use it")
    if len(raw) != KEY_BYTES:
        raise ConfigurationError(f"{path} is not an identity key ({len(raw)} bytes)")
    return Ed25519PrivateKey.from_private_bytes(raw)
