"""Pinned public keys: the Ed25519 key of each identity we learned from a verified session.

A mailbox message is sealed to its recipient's key, so the sender must hold the right one.
Keys are never taken from a signaling server: ``remember`` is called only after a live
session proved the key (the peer signed the session with it and it hashes to the peer's ID).
An ID is SHA-256 of the key (first 128 bits, hex), so the ID itself pins the key: ``get``
re-checks the hash of what it reads and refuses a file that does not match its name.

Keys live in ``<data dir>/known_keys/<id>.pub``: 32 raw bytes, 0600, in a 0700 directory of
this user's. A file that another user owns or may write, or that is not a regular file, is
refused rather than used.
"""

from __future__ import annotations

import hmac
import os
import re
import stat
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey

from duet_p2p.errors import ConfigurationError, DuetError
from duet_p2p.identity import KEY_BYTES, id_of
from duet_p2p.paths import data_dir

_ID = re.compile(r"[0-9a-f]{32}")
_SUFFIX = ".pub"


class KeyNotPinned(DuetError):
    """No verified key is pinned for this ID, or a key does not hash to the ID it is for."""


def check_id(value: object, what: str = "ID") -> str:
    """``value`` if it is an ID (32 lowercase hex digits); ValueError otherwise."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"a {what} is 32 lowercase hex digits")
    return value


def check_key(public_key: object) -> bytes:
    """``public_key`` if it is a usable Ed25519 public key (32 bytes, converts to X25519)."""
    if not isinstance(public_key, bytes) or len(public_key) != KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {KEY_BYTES} bytes")
    try:
        VerifyKey(public_key).to_curve25519_public_key()
    except (CryptoError, ValueError, TypeError):
        raise ValueError("not a usable Ed25519 public key") from None
    return public_key


def key_matches(identity_id: str, public_key: bytes) -> bool:
    """Whether ``public_key`` is the key ``identity_id`` stands for."""
    return len(public_key) == KEY_BYTES and hmac.compare_digest(id_of(public_key), identity_id)


def private_directory(path: Path) -> Path:
    """``path`` created 0700 if missing; ConfigurationError unless it is a directory of this
    user's that nobody else may write to (else another user could swap a file in)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigurationError(f"{path} is not a directory of this user's; refusing it")
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise ConfigurationError(
            f"{path} may be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"chmod 700 {path}"
        )
    return path


class KnownKeys:
    """The public keys pinned in one directory, by ID."""

    def __init__(self, directory: Path | None = None) -> None:
        folder = Path(directory) if directory is not None else data_dir() / "known_keys"
        self.directory = private_directory(folder)

    def remember(self, public_key: bytes) -> str:
        """Pin ``public_key`` (proved by a verified live session); return its ID."""
        identity_id = id_of(check_key(public_key))
        path = self._path(identity_id)
        temp = path.with_name(f".{identity_id}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.write(fd, public_key)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return identity_id

    def get(self, identity_id: str) -> bytes:
        """The key pinned for ``identity_id``; KeyNotPinned if none is, or if its file does
        not hold a key that hashes to the ID."""
        path = self._path(check_id(identity_id))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise KeyNotPinned(
                f"no verified key is pinned for {identity_id}: connect to it live once first"
            ) from None
        except OSError as exc:
            raise KeyNotPinned(f"{path} cannot be read ({exc.strerror}); refusing it") from None
        try:
            info = os.fstat(fd)
            raw = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.getuid()
            or stat.S_IMODE(info.st_mode) & 0o022
        ):
            raise KeyNotPinned(f"{path} is not a private file of this user's; refusing it")
        if not key_matches(identity_id, raw):
            raise KeyNotPinned(
                f"the key pinned in {path} does not hash to {identity_id}: the file was "
                "changed; refusing it"
            )
        return raw

    def forget(self, identity_id: str) -> bool:
        """Unpin ``identity_id``; whether a key was pinned."""
        try:
            self._path(check_id(identity_id)).unlink()
        except FileNotFoundError:
            return False
        return True

    def ids(self) -> list[str]:
        """The IDs with a key file (sorted; ``get`` still checks each)."""
        return sorted(
            entry.name[: -len(_SUFFIX)]
            for entry in os.scandir(self.directory)
            if entry.name.endswith(_SUFFIX) and _ID.fullmatch(entry.name[: -len(_SUFFIX)])
        )

    def __contains__(self, identity_id: object) -> bool:
        try:
            self.get(identity_id)  # type: ignore[arg-type]
        except (KeyNotPinned, ValueError):
            return False
        return True

    def _path(self, identity_id: str) -> Path:
        return self.directory / f"{identity_id}{_SUFFIX}"
