"""The newest version of each listing this machine has seen: rollback protection.

A registry cannot forge a listing, but it can serve an older signed version of one (from
before its owner tightened the usage conditions or moved the signaling server) or keep
showing a listing after a deletion this machine saw. A pin records, per listing and host,
the newest version seen, its content hash and when it was last seen. A listing served older
than its pin is a rollback; the pinned version with another hash is equivocation (only the
owner's key could sign both). Anything newer raises the pin. Pins are per machine, shared
by every registry: a listing is the same listing on any of them.

The file is ``<data dir>/registry/pins.sqlite`` (0600 in a 0700 directory), at most
:data:`MAX_PINS` pins (the least recently seen are pruned). Every value read back is checked;
a file that is corrupt or not a pins file is moved aside (``pins.sqlite.corrupt``) with a
warning and started afresh. A file that cannot be used at all (unwritable, locked for
longer than the timeout) leaves the listings unchecked, with a warning: pins guard against
a registry, which cannot cause that; a search never fails on them.

:class:`Pins` is thread-safe (a lock, and a connection per call) and safe between
processes (each check is one ``BEGIN IMMEDIATE`` transaction); its methods block, so async
code runs them in a thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from duet_p2p.paths import data_dir

if TYPE_CHECKING:
    from duet_p2p.registry.listing import SignedDeletion

__all__ = ["MAX_PINS", "PINS_FILE", "Pin", "Pins", "Refusal", "default_pins"]

log = logging.getLogger(__name__)
T = TypeVar("T")

PINS_FILE = Path("registry") / "pins.sqlite"
"""Where the pins live, under the data directory (``$DUET_HOME``)."""
MAX_PINS = 100_000
SCHEMA_VERSION = 1
MAX_VERSION = 2**53
MAX_TIME = float(1 << 40)
BUSY_TIMEOUT = 10.0
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_COLUMNS = [("listing_id", "TEXT"), ("host_id", "TEXT"), ("version", "INTEGER"),
            ("hash", "TEXT"), ("deleted", "INTEGER"), ("seen_at", "REAL")]  # fmt: skip
_SCHEMA = (
    "CREATE TABLE pins (listing_id TEXT NOT NULL, host_id TEXT NOT NULL, "
    "version INTEGER NOT NULL, hash TEXT NOT NULL, deleted INTEGER NOT NULL, "
    "seen_at REAL NOT NULL, PRIMARY KEY (listing_id, host_id))",
    "CREATE INDEX pins_seen_at ON pins (seen_at)",
)
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class Versioned(Protocol):
    """What a pin is taken of: a verified :class:`~duet_p2p.registry.listing.SignedListing`."""

    @property
    def listing_id(self) -> str: ...
    @property
    def host_id(self) -> str: ...
    @property
    def version(self) -> int: ...
    def hash(self) -> str: ...


@dataclass(frozen=True)
class Pin:
    """The newest version of a listing (of one host) this machine has seen; ``deleted``:
    that version is the host's signed deletion."""

    listing_id: str
    host_id: str
    version: int
    hash: str
    deleted: bool
    seen_at: float


@dataclass(frozen=True)
class Refusal:
    """Why a served listing is refused: ``code`` is ``"rolled_back"`` (older than
    ``pinned``, or at or before its deletion) or ``"equivocation"`` (the pinned version with
    another content hash)."""

    code: str
    listing_id: str
    served_version: int
    pinned: Pin

    def message(self, registry_url: str) -> str:
        seen = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.pinned.seen_at))
        where = f"the registry at {registry_url} served version {self.served_version} of "
        where += f"listing {self.listing_id}"
        if self.code == "equivocation":
            return (f"{where}, but this machine saw a different version {self.pinned.version} "
                    f"of it (last on {seen}): refused (its owner's key signed two listings "
                    "as the same version)")  # fmt: skip
        if self.pinned.deleted:
            return (f"{where}, but this machine saw its owner delete it (deletion version "
                    f"{self.pinned.version}, on {seen}): refused (a hidden deletion)")  # fmt: skip
        return (f"{where}, but this machine has seen version {self.pinned.version} (last on "
                f"{seen}): refused (a rollback to an older version)")  # fmt: skip


class _Corrupt(Exception):
    """The file holds something other than valid pins."""


class Pins:
    """The pins file (default ``<data dir>/registry/pins.sqlite``, resolved on first use)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 max_pins: int = MAX_PINS) -> None:  # fmt: skip
        if type(max_pins) is not int or not 1 <= max_pins <= 10 * MAX_PINS:
            raise ValueError(f"max_pins is an int from 1 to {10 * MAX_PINS}")
        self._path = None if path is None else Path(path)
        self.max_pins = max_pins
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = data_dir() / PINS_FILE
        return self._path

    def __repr__(self) -> str:
        return f"<Pins {self._path or '(data dir)'}>"

    # -- the checks --------------------------------------------------------------------

    def check(self, listings: Sequence[Versioned]) -> list[Refusal | None]:
        """Check verified listings against their pins and raise the pins to the newer ones,
        in one transaction; per listing None (accepted) or the :class:`Refusal`. A listing
        older than another in the same batch is refused too."""
        entries = [(s.listing_id, s.host_id, s.version, s.hash()) for s in listings]
        for listing_id, host_id, version, digest in entries:
            _check_values(listing_id, host_id, version, digest)
        if not entries:
            return []
        verdicts = self._run(lambda db: _check(db, entries, self.max_pins))
        return verdicts if verdicts is not None else [None] * len(entries)

    def record_deletion(self, deletion: SignedDeletion) -> None:
        """Pin a signed deletion this machine sent or saw: the listing at or before it is
        refused from then on."""
        digest = hashlib.sha256(deletion.to_wire()).hexdigest()
        entry = (deletion.listing_id, deletion.host_id, deletion.version, digest)
        _check_values(*entry)
        self._run(lambda db: _pin_deletion(db, entry, self.max_pins))

    def get(self, listing_id: str, host_id: str) -> Pin | None:
        """The pin of a listing of ``host_id``, or None."""
        return self._run(lambda db: _read(db, listing_id, host_id))

    def __len__(self) -> int:
        return self._run(lambda db: db.execute("SELECT COUNT(*) FROM pins").fetchone()[0]) or 0

    # -- the file ----------------------------------------------------------------------

    def _run(self, action: Callable[[sqlite3.Connection], T]) -> T | None:
        """``action(db)`` in one write transaction; a corrupt file is moved aside and the
        action tried once more on a fresh one; None (with a warning) when the file cannot
        be used."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    with self._transaction() as db:
                        return action(db)
                except _Corrupt as exc:
                    if attempt == 2 or not self._move_aside(str(exc)):
                        break
                except sqlite3.DatabaseError as exc:
                    if getattr(exc, "sqlite_errorcode", None) not in _CORRUPT_CODES and (
                        isinstance(exc, sqlite3.OperationalError)
                    ):
                        self._warn("unusable", f"cannot use {self.path} ({exc})")
                        return None
                    if attempt == 2 or not self._move_aside(str(exc)):
                        break
                except OSError as exc:
                    self._warn("unusable", f"cannot use {self.path} ({exc.strerror or exc})")
                    return None
            self._warn("corrupt", f"cannot start {self.path} afresh")
            return None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        path = self.path
        _prepare(path)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            db.execute("PRAGMA trusted_schema=OFF")
            db.execute("BEGIN IMMEDIATE")
            try:
                _schema(db)
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            db.close()

    def _move_aside(self, why: str) -> bool:
        path = self.path
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
            for suffix in ("-journal", "-wal", "-shm"):
                side = path.with_name(path.name + suffix)
                if side.exists() or side.is_symlink():
                    os.replace(side, aside.with_name(aside.name + suffix))
        except OSError as exc:
            self._warn("unusable", f"{path} is corrupt ({why}) and cannot be moved aside "
                       f"({exc.strerror or exc})")  # fmt: skip
            return False
        log.warning("%s was corrupt (%s): moved aside to %s; listings are pinned afresh from "
                    "now on", path, why[:200], aside)  # fmt: skip
        return True

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s: listings are not checked for rollback", message[:400])


_defaults: dict[Path, Pins] = {}
_defaults_lock = threading.Lock()


def default_pins() -> Pins:
    """The machine's pins (``<data dir>/registry/pins.sqlite``), one object per path."""
    try:
        path = data_dir() / PINS_FILE
    except OSError:
        return Pins()  # tries again on use, and warns there
    with _defaults_lock:
        pins = _defaults.get(path)
        if pins is None:
            pins = _defaults[path] = Pins(path)
        return pins


# -- the file, below ---------------------------------------------------------------------


def _prepare(path: Path) -> None:
    """Create the directory (0700) and file (0600) of this user's; tighten looser modes;
    refuse a symlink, another user's file, or anything but a regular file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = os.lstat(path.parent)
    if not stat.S_ISDIR(folder.st_mode) or folder.st_uid != os.getuid():
        raise OSError(f"{path.parent} is not a directory of this user's")
    if stat.S_IMODE(folder.st_mode) & 0o077:
        os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise OSError(f"{path} is not a regular file of this user's")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _schema(db: sqlite3.Connection) -> None:
    """Create the table in an empty file; _Corrupt for any other file."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            raise _Corrupt("not a pins file")
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return
    if version != SCHEMA_VERSION:
        raise _Corrupt(f"unknown schema version {version!r}")
    columns = [(row[1], row[2]) for row in db.execute("PRAGMA table_info(pins)")]
    if columns != _COLUMNS:
        raise _Corrupt("not a pins table")


def _check_values(listing_id: object, host_id: object, version: object, digest: object) -> None:
    if not (
        type(listing_id) is str and _HEX32.fullmatch(listing_id)
        and type(host_id) is str and _HEX32.fullmatch(host_id)
        and type(version) is int and 1 <= version <= MAX_VERSION
        and type(digest) is str and _HEX64.fullmatch(digest)
    ):  # fmt: skip
        raise ValueError("a pin is of a listing ID, a host ID, a version and a SHA-256 hash")


def _pin_of(row: tuple[object, ...]) -> Pin:
    """A row read back, checked (_Corrupt otherwise)."""
    if len(row) != 6:
        raise _Corrupt("a pin of the wrong shape")
    listing_id, host_id, version, digest, deleted, seen_at = row
    try:
        _check_values(listing_id, host_id, version, digest)
    except ValueError:
        raise _Corrupt("a pin with invalid values") from None
    if deleted not in (0, 1) or type(deleted) is not int:
        raise _Corrupt("a pin with an invalid deletion mark")
    if type(seen_at) is not float or not 0 <= seen_at <= MAX_TIME:
        raise _Corrupt("a pin with an invalid time")
    return Pin(listing_id, host_id, version, digest, bool(deleted),  # type: ignore[arg-type]
               seen_at)  # fmt: skip


_SELECT = "SELECT listing_id, host_id, version, hash, deleted, seen_at FROM pins"


def _read(db: sqlite3.Connection, listing_id: str, host_id: str) -> Pin | None:
    row = db.execute(f"{_SELECT} WHERE listing_id = ? AND host_id = ?",
                     (listing_id, host_id)).fetchone()  # fmt: skip
    return None if row is None else _pin_of(row)


Entry = tuple[str, str, int, str]


def _check(db: sqlite3.Connection, entries: list[Entry], cap: int) -> list[Refusal | None]:
    now = time.time()
    state: dict[tuple[str, str], Pin | None] = {}
    for listing_id, host_id, *_ in entries:
        if (listing_id, host_id) not in state:
            state[listing_id, host_id] = _read(db, listing_id, host_id)
    changed: set[tuple[str, str]] = set()
    verdicts: list[Refusal | None] = []
    for listing_id, host_id, version, digest in entries:
        key = (listing_id, host_id)
        pin = state[key]
        if pin is None or version > pin.version:
            state[key] = Pin(listing_id, host_id, version, digest, False, now)
        elif version != pin.version or digest != pin.hash or pin.deleted:
            code = "equivocation" if version == pin.version and not pin.deleted else "rolled_back"
            verdicts.append(Refusal(code, listing_id, version, pin))
            continue
        verdicts.append(None)
        changed.add(key)  # seen now: pinned afresh, or its pin confirmed
    for i, (listing_id, host_id, version, _) in enumerate(entries):
        final = state[listing_id, host_id]
        if verdicts[i] is None and final is not None and final.version > version:
            verdicts[i] = Refusal("rolled_back", listing_id, version, final)
    for key in changed:
        pin = state[key]
        assert pin is not None
        _write(db, pin, now)
    _prune(db, cap)
    return verdicts


def _pin_deletion(db: sqlite3.Connection, entry: Entry, cap: int) -> None:
    listing_id, host_id, version, digest = entry
    pin = _read(db, listing_id, host_id)
    if pin is None or version > pin.version or (version == pin.version and not pin.deleted):
        _write(db, Pin(listing_id, host_id, version, digest, True, time.time()), time.time())
        _prune(db, cap)


def _write(db: sqlite3.Connection, pin: Pin, now: float) -> None:
    db.execute(
        "INSERT INTO pins (listing_id, host_id, version, hash, deleted, seen_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (listing_id, host_id) DO UPDATE SET "
        "version = excluded.version, hash = excluded.hash, deleted = excluded.deleted, "
        "seen_at = excluded.seen_at",
        (pin.listing_id, pin.host_id, pin.version, pin.hash, int(pin.deleted), now),
    )


def _prune(db: sqlite3.Connection, cap: int) -> None:
    count = db.execute("SELECT COUNT(*) FROM pins").fetchone()[0]
    if type(count) is int and count > cap:
        db.execute("DELETE FROM pins WHERE rowid IN (SELECT rowid FROM pins "
                   "ORDER BY seen_at, rowid LIMIT ?)", (count - cap,))  # fmt: skip
