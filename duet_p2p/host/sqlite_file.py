"""One private SQLite file of a standing host, shared by threads.

Each thread uses its own connection; writes are serialised by a lock, each one synced
transaction, and a write inside another joins it under a savepoint (several steps cost one
sync, and each fails alone). :meth:`close` waits for calls in flight, then closes them all.
The file is 0600 in a 0700 directory of this user's; anything else is refused.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from duet_p2p.errors import ConfigurationError, DuetError

ROW_SLACK = 4096
"""Room left in SQLite's largest row for a blob's key and other columns."""


class SqliteFile:
    """The connections and transactions of one private SQLite file."""

    what = "the host's state"
    """How errors name the file's contents."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._write_lock = threading.Lock()
        self._tx = threading.local()
        self._state = threading.Condition()
        self._busy = 0
        self._closed = False
        self._dbs: dict[threading.Thread, sqlite3.Connection] = {}
        prepare_file(self.path)

    def _set_up(self, init_schema: Callable[[sqlite3.Connection, Path], None]) -> int:
        """Create or check the schema (closing the file if that fails); returns the largest
        blob a row of this file can hold."""
        try:
            with self._connection() as db:
                init_schema(db, self.path)
                return db.getlimit(sqlite3.SQLITE_LIMIT_LENGTH) - ROW_SLACK
        except BaseException:
            self.close()
            raise

    def close(self, timeout: float = 30.0) -> None:
        """Wait (up to ``timeout`` s) for calls in flight, then close every connection."""
        with self._state:
            self._closed = True
            self._state.wait_for(lambda: self._busy == 0, timeout=timeout)
            dbs, self._dbs = list(self._dbs.values()), {}
        for db in dbs:
            db.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, counted as in use until the block ends."""
        with self._state:
            if self._closed:
                raise DuetError(f"{self.what} is closed")
            self._busy += 1
            thread = threading.current_thread()
            db = self._dbs.get(thread)
            if db is None:
                for old in [t for t in self._dbs if not t.is_alive()]:
                    self._dbs.pop(old).close()
        try:
            if db is None:
                db = connect(self.path)
                with self._state:
                    self._dbs[thread] = db
            yield db
        finally:
            with self._state:
                self._busy -= 1
                self._state.notify_all()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (and synced) when the block ends. A write inside
        another (same thread) joins it under a savepoint: if it fails, its own changes are
        undone and the outer transaction goes on, so several steps cost one sync and each
        fails alone."""
        outer = getattr(self._tx, "db", None)
        if outer is not None:
            name = f"step{id(outer) & 0xFFFF}_{getattr(self._tx, 'depth', 0)}"
            self._tx.depth = getattr(self._tx, "depth", 0) + 1
            outer.execute(f"SAVEPOINT {name}")
            try:
                yield outer
            except BaseException:
                outer.execute(f"ROLLBACK TO {name}")
                outer.execute(f"RELEASE {name}")
                raise
            else:
                outer.execute(f"RELEASE {name}")
            finally:
                self._tx.depth -= 1
            return
        with self._write_lock, self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            self._tx.db = db
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                self._tx.db = None

    def transaction(self) -> Any:
        """A write transaction the calls inside it join (one sync for them all)."""
        return self._write()


def prepare_file(path: Path) -> None:
    """Create the directory (0700) and the file (0600); refuse what others may read or
    write, what another user owns, and anything but a regular file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = os.stat(path.parent)
    if folder.st_uid != os.getuid() or stat.S_IMODE(folder.st_mode) & 0o022:
        raise ConfigurationError(
            f"{path.parent} belongs to another user or others may write to it; "
            f"a host's directory must be private: chmod 700 {path.parent}"
        )
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot open {path}: {exc.strerror}") from None
    try:
        check_private(path, os.fstat(fd))
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        try:
            info = os.lstat(side)
        except FileNotFoundError:
            continue
        check_private(side, info)


def check_private(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(f"{path} is not a regular file; refusing to use it")
    if info.st_uid != os.getuid():
        raise ConfigurationError(f"{path} belongs to another user; refusing to use it")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigurationError(
            f"{path} may be read by other users (mode {mode:o}); a host's files must be "
            f"private: chmod 600 {path}"
        )


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA synchronous=FULL")  # a decision is on disk before it is acted on
        db.execute("PRAGMA secure_delete=ON")  # freed payloads are overwritten
        db.execute("PRAGMA trusted_schema=OFF")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise ConfigurationError(f"{path} is not a database: {exc}") from None
    return db


def init_schema(
    db: sqlite3.Connection,
    path: Path,
    *,
    statements: tuple[str, ...],
    version: int,
    tables: frozenset[str],
    what: str,
) -> None:
    """Create the tables (``statements``, then the version row) in a new file; refuse a
    file with other tables, or of another schema version, naming it as ``what``."""
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise ConfigurationError(f"{path}: SQLite refused WAL mode ({mode})")
        db.execute("BEGIN IMMEDIATE")
        try:
            found = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )}  # fmt: skip
            if "schema_version" not in found:
                if found:
                    raise ConfigurationError(f"{path} is not a {what} database")
                for statement in statements:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?)", (version,))
            else:
                _check_version(db, path, version)
                if not tables <= found:
                    raise ConfigurationError(f"{path} is not a {what} database")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise ConfigurationError(f"{path} is not a {what} database: {exc}") from None


def _check_version(db: sqlite3.Connection, path: Path, expected: int) -> None:
    rows = db.execute("SELECT version FROM schema_version").fetchall()
    if len(rows) != 1 or not isinstance(rows[0][0], int):
        raise ConfigurationError(f"{path}: its schema version is missing or corrupted")
    version = rows[0][0]
    if version > expected:
        raise ConfigurationError(
            f"{path} was written by a newer duet_p2p (schema version {version}; this one "
            f"reads version {expected}): upgrade duet_p2p to use it"
        )
    if version != expected:
        raise ConfigurationError(f"{path} has an unknown schema version {version}")
