"""The mailbox: store-and-forward of end-to-end encrypted messages for offline recipients.

Anyone may post an envelope for a recipient ID; the server cannot read envelopes and never
tries (they are sealed to the recipient and signed by the sender, who checks nothing here
depends on the server). It checks sizes and quotas only, and holds each message for `ttl`
seconds or until the recipient deletes it. `sender_id` is what the poster claims: the
recipient learns who sent a message from the envelope's signature, never from the server.

Only the recipient reads or deletes its messages: it signs `mailbox_message(recipient_id,
challenge, action)` with the Ed25519 key whose SHA-256 (first 128 bits, hex) is its ID, over
a one-time challenge of a `ChallengeBook` (stateless until spent, as for standing hosts).

Two backends implement `MailboxState`: `InMemoryMailbox` (one process, lost on restart) and
`SqliteMailbox` (one process, one SQLite file: a restart loses nothing). Long-polls wake on
in-process events, so a file serves one server instance at a time. Logs name IDs by an
8-character prefix and never carry envelope bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from signaling_server.config import MAILBOX_MESSAGE_LIMIT, ServerConfig, mailbox_state_path
from signaling_server.hosts import MAX_CHALLENGES, ChallengeBook, verify_key_proof
from signaling_server.state import StateError, StateFull

logger = logging.getLogger(__name__)

MAILBOX_CONTEXT = b"duet_p2p mailbox v1"
"""First part of every message a recipient signs."""
FETCH, DELETE = b"fetch", b"delete"
"""The actions a recipient signs."""
MAX_FETCH = 64
"""Messages in one fetch response, at most."""
FETCH_BUDGET = 768 * 1024
"""Characters of JSON messages in one fetch response, at most (one message always fits:
with MAILBOX_MESSAGE_LIMIT, a response stays under the 1 MiB clients read)."""
MAX_DELETE = 256
"""Message IDs in one delete request, at most."""
SCHEMA_VERSION = 1
_CHALLENGE_CONTEXT = b"duet mailbox challenge"
_ID_RE = re.compile(r"[0-9a-f]{32}")
_T = TypeVar("_T")

__all__ = [
    "DELETE",
    "FETCH",
    "MAILBOX_CONTEXT",
    "InMemoryMailbox",
    "MailboxFull",
    "MailboxLimits",
    "MailboxState",
    "MailboxStoreError",
    "MessageTooLarge",
    "SenderQuotaExceeded",
    "SqliteMailbox",
    "StoredMessage",
    "mailbox_from_config",
    "mailbox_message",
    "verify_mailbox_proof",
]


class MailboxFull(StateError):
    """The recipient's mailbox holds as many messages or bytes as it may."""

    code, status = "mailbox_full", 507


class SenderQuotaExceeded(StateError):
    """One client address has posted as many live messages or bytes as it may."""

    code, status = "too_many_messages", 429


class MessageTooLarge(StateError):
    code, status = "message_too_large", 413


class MailboxClosed(StateError):
    code, status = "shutting_down", 503
    retry_after = 5.0


class MailboxStoreError(RuntimeError):
    """The SQLite file cannot be used (unsafe permissions, not a mailbox, newer schema)."""


def mailbox_message(recipient_id: str, challenge: bytes, action: bytes) -> bytes:
    """What a recipient signs: each part as 4-byte big-endian length + bytes."""
    parts = [MAILBOX_CONTEXT, recipient_id.encode("ascii"), challenge, action]
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def verify_mailbox_proof(
    recipient_id: str, public_key: bytes, challenge: bytes, action: bytes, signature: bytes
) -> bool:
    """Whether `public_key` is the recipient's and signed `action` over `challenge`."""
    if not recipient_id.isascii():
        return False
    message = mailbox_message(recipient_id, challenge, action)
    return verify_key_proof(recipient_id, public_key, message, signature)


@dataclass(frozen=True)
class MailboxLimits:
    """Sizes and quotas of a mailbox (see ServerConfig's mailbox_* fields)."""

    ttl: float = 7 * 86400.0
    max_message_bytes: int = MAILBOX_MESSAGE_LIMIT
    max_messages_per_recipient: int = 256
    max_bytes_per_recipient: int = 64 * 1024 * 1024
    max_messages_per_client: int = 256
    max_bytes_per_client: int = 64 * 1024 * 1024
    max_messages: int = 100_000
    max_bytes: int = 1024 * 1024 * 1024

    @classmethod
    def from_config(cls, config: ServerConfig) -> MailboxLimits:
        return cls(
            ttl=config.mailbox_ttl,
            max_message_bytes=config.mailbox_max_message_bytes,
            max_messages_per_recipient=config.mailbox_max_messages_per_recipient,
            max_bytes_per_recipient=config.mailbox_max_bytes_per_recipient,
            max_messages_per_client=config.mailbox_max_messages_per_client,
            max_bytes_per_client=config.mailbox_max_bytes_per_client,
            max_messages=config.mailbox_max_messages,
            max_bytes=config.mailbox_max_bytes,
        )


@dataclass(frozen=True)
class StoredMessage:
    """A message as held: its server-chosen ID, the claimed sender, the envelope, and when
    it was posted (Unix time)."""

    message_id: str
    sender_id: str
    envelope: bytes
    posted_at: float


@dataclass(frozen=True)
class _Usage:
    messages: int
    bytes: int


class MailboxState(Protocol):
    """Where mailbox messages live. Every method may raise StateError."""

    async def put(
        self, recipient_id: str, sender_id: str, envelope: bytes, owner: str | None = None
    ) -> StoredMessage:
        """Hold an envelope for the recipient, posted by `owner` (a client key; None counts
        against no per-client quota). MessageTooLarge, MailboxFull, SenderQuotaExceeded,
        StateFull (all recipients together)."""

    async def fetch(
        self, recipient_id: str, after: str | None = None, timeout: float = 0.0
    ) -> list[StoredMessage]:
        """The recipient's live messages posted after message `after` (from the oldest if it
        is None or not a live message of the recipient), oldest first, at most MAX_FETCH and
        FETCH_BUDGET; waits up to `timeout` s for one. Deletes nothing."""

    async def delete(self, recipient_id: str, message_ids: Iterable[str]) -> int:
        """Delete those of `message_ids` the recipient holds; how many were."""

    async def new_challenge(self, recipient_id: str) -> bytes:
        """A fresh one-time challenge for the recipient; issuing one stores nothing."""

    async def check_challenge(self, recipient_id: str, challenge: bytes) -> bool:
        """Whether `challenge` was issued for the recipient, is unexpired and unspent."""

    async def take_challenge(self, recipient_id: str, challenge: bytes) -> bool:
        """Spend `challenge` if `check_challenge` holds; call it only once the signature is
        known to be valid (StateFull if too many spent challenges are held)."""

    async def count(self) -> int:
        """Number of messages held (expired ones until swept)."""

    async def sweep(self) -> int:
        """Drop expired messages and spent challenges; return how many messages."""

    async def close(self) -> None:
        """Wake every waiter, refuse further calls, release the storage."""


class _Wakeups:
    """One asyncio.Event per watched recipient, set (and forgotten) when it gets mail."""

    def __init__(self) -> None:
        self._events: dict[str, tuple[asyncio.Event, int]] = {}

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Event]:
        event, watchers = self._events.get(key, (asyncio.Event(), 0))
        self._events[key] = (event, watchers + 1)
        try:
            yield event
        finally:
            current = self._events.get(key)
            if current is not None and current[0] is event:
                if current[1] <= 1:
                    del self._events[key]
                else:
                    self._events[key] = (event, current[1] - 1)

    def wake(self, key: str) -> None:
        entry = self._events.pop(key, None)
        if entry is not None:
            entry[0].set()

    def wake_all(self) -> None:
        for event, _ in self._events.values():
            event.set()
        self._events.clear()


def delivery_cost(envelope_bytes: int) -> int:
    """About the JSON size of a message in a fetch response (base64 envelope and the rest)."""
    return 4 * math.ceil(envelope_bytes / 3) + 160


def _within_budget(messages: Iterable[StoredMessage]) -> list[StoredMessage]:
    """The first messages that fit one response (consumes `messages` lazily)."""
    out: list[StoredMessage] = []
    size = 0
    for message in messages:
        cost = delivery_cost(len(message.envelope))
        if out and size + cost > FETCH_BUDGET:
            break
        out.append(message)
        size += cost
        if len(out) >= MAX_FETCH:
            break
    return out


def _short(some_id: str) -> str:
    return some_id[:8]


class _Mailbox:
    """What both backends share: challenges, wakeups, quota policy and the async surface.

    A backend implements the blocking `_insert`, `_read`, `_remove`, `_usage`, `_expire`,
    `_count` and `_release`; `_call` runs them (directly, or in a thread).
    """

    def __init__(
        self,
        limits: MailboxLimits,
        *,
        max_spent: int,
        clock: Callable[[], float],
        challenge_clock: Callable[[], float],
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._challenges = ChallengeBook(
            _CHALLENGE_CONTEXT,
            max_spent=max_spent,
            full_message="the server holds too many mailbox sessions; try again later",
            clock=challenge_clock,
        )
        self._wakeups = _Wakeups()
        self._closed = False

    # -- backend ------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return fn(*args)

    def _insert(self, recipient_id: str, message: StoredMessage, owner: str | None) -> None:
        raise NotImplementedError

    def _read(self, recipient_id: str, after: str | None, now: float) -> list[StoredMessage]:
        raise NotImplementedError

    def _remove(self, recipient_id: str, message_ids: list[str]) -> int:
        raise NotImplementedError

    def _usage(self, recipient_id: str, owner: str | None) -> tuple[_Usage, _Usage, _Usage]:
        """Held by the recipient, posted by `owner` (zero for None), all together."""
        raise NotImplementedError

    def _expire(self, now: float) -> int:
        raise NotImplementedError

    def _count(self) -> int:
        raise NotImplementedError

    def _release(self) -> None:
        """Free the storage (called once, after every other call ended)."""

    # -- policy -------------------------------------------------------------------------

    def _refusal(
        self, size: int, recipient_id: str, owner: str | None, usage: tuple[_Usage, ...]
    ) -> StateError | None:
        lim = self.limits
        box, posted, total = usage
        if (
            box.messages >= lim.max_messages_per_recipient
            or box.bytes + size > lim.max_bytes_per_recipient
        ):
            return MailboxFull(
                f"the mailbox of {recipient_id} is full ({box.messages} messages, "
                f"{box.bytes} bytes held; limits {lim.max_messages_per_recipient} messages, "
                f"{lim.max_bytes_per_recipient} bytes): the recipient must fetch and delete "
                "its messages first"
            )
        if owner is not None and (
            posted.messages >= lim.max_messages_per_client
            or posted.bytes + size > lim.max_bytes_per_client
        ):
            return SenderQuotaExceeded(
                f"this address has posted {posted.messages} messages ({posted.bytes} bytes) "
                f"that are still held (limits {lim.max_messages_per_client} messages, "
                f"{lim.max_bytes_per_client} bytes); wait until their recipients delete them"
            )
        if total.messages >= lim.max_messages or total.bytes + size > lim.max_bytes:
            return StateFull("the server's mailboxes are full; try again later")
        return None

    def _put_blocking(
        self, recipient_id: str, message: StoredMessage, owner: str | None
    ) -> StoredMessage:
        size = len(message.envelope)
        refusal = self._refusal(size, recipient_id, owner, self._usage(recipient_id, owner))
        if refusal is not None:  # expired messages may be what fills it: drop them, retry
            self._expire(self._clock())
            refusal = self._refusal(size, recipient_id, owner, self._usage(recipient_id, owner))
            if refusal is not None:
                raise refusal
        self._insert(recipient_id, message, owner)
        return message

    def _check_open(self) -> None:
        if self._closed:
            raise MailboxClosed("the server is shutting down; try again shortly")

    # -- MailboxState -------------------------------------------------------------------

    async def put(
        self, recipient_id: str, sender_id: str, envelope: bytes, owner: str | None = None
    ) -> StoredMessage:
        self._check_open()
        if not _ID_RE.fullmatch(recipient_id) or not _ID_RE.fullmatch(sender_id):
            raise ValueError("recipient and sender IDs are 32 lowercase hex characters")
        if not envelope or len(envelope) > self.limits.max_message_bytes:
            raise MessageTooLarge(
                f"an envelope is 1 to {self.limits.max_message_bytes} bytes, not {len(envelope)}"
            )
        message = StoredMessage(secrets.token_hex(16), sender_id, bytes(envelope), self._clock())
        stored = await self._call(self._put_blocking, recipient_id, message, owner)
        self._wakeups.wake(recipient_id)
        logger.info(
            "message %s held for %s from %s (%d bytes)",
            _short(stored.message_id),
            _short(recipient_id),
            _short(sender_id),
            len(envelope),
        )
        return stored

    async def fetch(
        self, recipient_id: str, after: str | None = None, timeout: float = 0.0
    ) -> list[StoredMessage]:
        self._check_open()
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            with self._wakeups.watch(recipient_id) as event:
                if self._closed:
                    return []
                messages = await self._call(self._read, recipient_id, after, self._clock())
                remaining = deadline - time.monotonic()
                if messages or remaining <= 0 or self._closed:
                    return messages
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)

    async def delete(self, recipient_id: str, message_ids: Iterable[str]) -> int:
        self._check_open()
        ids = list(dict.fromkeys(message_ids))
        if len(ids) > MAX_DELETE or not all(_ID_RE.fullmatch(i) for i in ids):
            raise ValueError(f"at most {MAX_DELETE} message IDs of 32 lowercase hex characters")
        if not ids:
            return 0
        deleted = await self._call(self._remove, recipient_id, ids)
        logger.info("%d messages of %s deleted", deleted, _short(recipient_id))
        return deleted

    async def new_challenge(self, recipient_id: str) -> bytes:
        return self._challenges.issue(recipient_id)

    async def check_challenge(self, recipient_id: str, challenge: bytes) -> bool:
        return self._challenges.check(recipient_id, challenge)

    async def take_challenge(self, recipient_id: str, challenge: bytes) -> bool:
        return self._challenges.take(recipient_id, challenge)

    async def count(self) -> int:
        self._check_open()
        return await self._call(self._count)

    async def sweep(self) -> int:
        self._challenges.forget_expired()
        try:
            self._check_open()
            return await self._call(self._expire, self._clock())
        except MailboxClosed:  # closed while the sweep waited for the storage
            return 0

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeups.wake_all()
        await self._call(self._release)


@dataclass
class _Held:
    recipient_id: str
    message: StoredMessage
    expires_at: float
    owner: str | None


@dataclass
class _Tally:
    """Messages and bytes per key."""

    counts: dict[str, list[int]] = field(default_factory=dict)

    def usage(self, key: str | None) -> _Usage:
        messages, size = self.counts.get(key, (0, 0)) if key is not None else (0, 0)
        return _Usage(messages, size)

    def add(self, key: str | None, size: int) -> None:
        if key is not None:
            entry = self.counts.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += size

    def remove(self, key: str | None, size: int) -> None:
        entry = self.counts.get(key) if key is not None else None
        if key is None or entry is None:
            return
        entry[0] -= 1
        entry[1] -= size
        if entry[0] <= 0:
            del self.counts[key]


class InMemoryMailbox(_Mailbox):
    """MailboxState in this process's memory; everything is lost when it stops."""

    def __init__(
        self,
        limits: MailboxLimits | None = None,
        *,
        max_spent: int = 10_000 * MAX_CHALLENGES,
        clock: Callable[[], float] = time.time,
        challenge_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            limits or MailboxLimits(),
            max_spent=max_spent,
            clock=clock,
            challenge_clock=challenge_clock,
        )
        self._held: dict[str, _Held] = {}
        self._boxes: dict[str, OrderedDict[str, None]] = {}  # recipient -> IDs, oldest first
        self._by_recipient = _Tally()
        self._by_owner = _Tally()
        self._total_bytes = 0

    def _insert(self, recipient_id: str, message: StoredMessage, owner: str | None) -> None:
        expires_at = message.posted_at + self.limits.ttl
        self._held[message.message_id] = _Held(recipient_id, message, expires_at, owner)
        self._boxes.setdefault(recipient_id, OrderedDict())[message.message_id] = None
        size = len(message.envelope)
        self._by_recipient.add(recipient_id, size)
        self._by_owner.add(owner, size)
        self._total_bytes += size

    def _drop(self, message_id: str) -> None:
        held = self._held.pop(message_id)
        box = self._boxes[held.recipient_id]
        del box[message_id]
        if not box:
            del self._boxes[held.recipient_id]
        size = len(held.message.envelope)
        self._by_recipient.remove(held.recipient_id, size)
        self._by_owner.remove(held.owner, size)
        self._total_bytes -= size

    def _read(self, recipient_id: str, after: str | None, now: float) -> list[StoredMessage]:
        box = self._boxes.get(recipient_id)
        if not box:
            return []
        ids = list(box)
        if after is not None and after in box:
            ids = ids[ids.index(after) + 1 :]
        live = (self._held[i] for i in ids)
        return _within_budget(h.message for h in live if h.expires_at > now)

    def _remove(self, recipient_id: str, message_ids: list[str]) -> int:
        box = self._boxes.get(recipient_id, {})
        mine = [i for i in message_ids if i in box]
        for message_id in mine:
            self._drop(message_id)
        return len(mine)

    def _usage(self, recipient_id: str, owner: str | None) -> tuple[_Usage, _Usage, _Usage]:
        total = _Usage(len(self._held), self._total_bytes)
        return self._by_recipient.usage(recipient_id), self._by_owner.usage(owner), total

    def _expire(self, now: float) -> int:
        expired = [i for i, h in self._held.items() if h.expires_at <= now]
        for message_id in expired:
            self._drop(message_id)
        return len(expired)

    def _count(self) -> int:
        return len(self._held)


_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT",
    """CREATE TABLE messages (
        seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL UNIQUE,
        recipient_id TEXT NOT NULL, sender_id TEXT NOT NULL, envelope BLOB NOT NULL,
        size INTEGER NOT NULL, posted_at REAL NOT NULL, expires_at REAL NOT NULL,
        owner TEXT) STRICT""",
    "CREATE INDEX messages_by_recipient ON messages (recipient_id, seq)",
    "CREATE INDEX messages_by_owner ON messages (owner) WHERE owner IS NOT NULL",
    "CREATE INDEX messages_by_expiry ON messages (expires_at)",
)
_TABLES = {"schema_version", "meta", "messages"}


class SqliteMailbox(_Mailbox):
    """MailboxState in one SQLite file (WAL, synced writes): a restart loses nothing.

    The file is created 0600 in a 0700 directory; one that others may read or write, or
    another user owns, is refused. One connection serves every call, in a worker thread,
    one at a time. Client addresses are stored only as keyed hashes (the key lives in
    the file), for the per-client quota. Rows are checked when read back; a corrupted one
    is skipped with a warning.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        limits: MailboxLimits | None = None,
        *,
        max_spent: int = 10_000 * MAX_CHALLENGES,
        clock: Callable[[], float] = time.time,
        challenge_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            limits or MailboxLimits(),
            max_spent=max_spent,
            clock=clock,
            challenge_clock=challenge_clock,
        )
        self.path = Path(path)
        self._lock = threading.Lock()
        _prepare_file(self.path)
        self._db = _connect(self.path)
        try:
            _init_schema(self._db, self.path)
            self._owner_key = self._meta_secret()
            row = self._db.execute("SELECT COUNT(*), TOTAL(size) FROM messages").fetchone()
        except BaseException:
            self._db.close()
            raise
        self._total = _Usage(int(row[0]), int(row[1]))

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., _T], *args: Any) -> _T:
        with self._lock:
            if fn != self._release:
                self._check_open()  # closed while this call waited for the lock
            return fn(*args)

    def _meta_secret(self) -> bytes:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'owner_key'").fetchone()
        if row is not None and isinstance(row[0], bytes) and len(row[0]) == 32:
            return row[0]
        key = os.urandom(32)
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('owner_key', ?)", (key,))
        return key

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _owner_tag(self, owner: str | None) -> str | None:
        if owner is None:
            return None
        return hmac.new(self._owner_key, owner.encode(), hashlib.sha256).hexdigest()[:32]

    def _insert(self, recipient_id: str, message: StoredMessage, owner: str | None) -> None:
        size = len(message.envelope)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO messages (message_id, recipient_id, sender_id, envelope, size, "
                "posted_at, expires_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.message_id,
                    recipient_id,
                    message.sender_id,
                    message.envelope,
                    size,
                    message.posted_at,
                    message.posted_at + self.limits.ttl,
                    self._owner_tag(owner),
                ),
            )
        self._total = _Usage(self._total.messages + 1, self._total.bytes + size)

    def _read(self, recipient_id: str, after: str | None, now: float) -> list[StoredMessage]:
        start = 0
        if after is not None:
            row = self._db.execute(
                "SELECT seq FROM messages WHERE message_id = ? AND recipient_id = ?",
                (after, recipient_id),
            ).fetchone()
            start = row[0] if row is not None else 0
        cursor = self._db.execute(
            "SELECT message_id, sender_id, envelope, posted_at FROM messages "
            "WHERE recipient_id = ? AND seq > ? AND expires_at > ? ORDER BY seq",
            (recipient_id, start, now),
        )
        try:
            return _within_budget(self._valid_rows(cursor))
        finally:
            cursor.close()

    def _valid_rows(self, rows: Iterable[tuple[Any, ...]]) -> Iterator[StoredMessage]:
        for message_id, sender_id, envelope, posted_at in rows:
            if (
                isinstance(message_id, str)
                and _ID_RE.fullmatch(message_id)
                and isinstance(sender_id, str)
                and _ID_RE.fullmatch(sender_id)
                and isinstance(envelope, bytes)
                and 0 < len(envelope) <= MAILBOX_MESSAGE_LIMIT
                and isinstance(posted_at, float)
                and math.isfinite(posted_at)
            ):
                yield StoredMessage(message_id, sender_id, envelope, posted_at)
            else:
                logger.warning("skipping a corrupted mailbox row in %s", self.path)

    def _remove(self, recipient_id: str, message_ids: list[str]) -> int:
        marks = ", ".join("?" * len(message_ids))
        with self._transaction() as db:
            sizes = db.execute(
                f"DELETE FROM messages WHERE recipient_id = ? AND message_id IN ({marks}) "
                "RETURNING size",
                (recipient_id, *message_ids),
            ).fetchall()
        self._forget(sizes)
        return len(sizes)

    def _forget(self, sizes: list[tuple[Any, ...]]) -> None:
        freed = sum(int(row[0]) for row in sizes)
        self._total = _Usage(self._total.messages - len(sizes), self._total.bytes - freed)

    def _usage(self, recipient_id: str, owner: str | None) -> tuple[_Usage, _Usage, _Usage]:
        query = "SELECT COUNT(*), TOTAL(size) FROM messages WHERE "
        box = self._db.execute(query + "recipient_id = ?", (recipient_id,)).fetchone()
        posted = (0, 0)
        if owner is not None:
            posted = self._db.execute(query + "owner = ?", (self._owner_tag(owner),)).fetchone()
        return (
            _Usage(int(box[0]), int(box[1])),
            _Usage(int(posted[0]), int(posted[1])),
            self._total,
        )

    def _expire(self, now: float) -> int:
        with self._transaction() as db:
            sizes = db.execute(
                "DELETE FROM messages WHERE expires_at <= ? RETURNING size", (now,)
            ).fetchall()
        self._forget(sizes)
        return len(sizes)

    def _count(self) -> int:
        return self._total.messages

    def _release(self) -> None:
        self._db.close()


def mailbox_from_config(config: ServerConfig) -> MailboxState:
    """The mailbox `config.mailbox_state` names, with its limits and spent-challenge cap."""
    limits = MailboxLimits.from_config(config)
    max_spent = config.max_entries * MAX_CHALLENGES
    path = mailbox_state_path(config.mailbox_state)
    if path is None:
        return InMemoryMailbox(limits, max_spent=max_spent)
    return SqliteMailbox(path, limits, max_spent=max_spent)


# -- the SQLite file ---------------------------------------------------------------------


def _prepare_file(path: Path) -> None:
    """Create the directory (0700) and the file (0600); refuse what others may read or
    write, what another user owns, and anything but a regular file."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = os.stat(path.parent)
    except OSError as exc:
        raise MailboxStoreError(f"cannot create {path.parent}: {exc.strerror}") from None
    if folder.st_uid != os.getuid() or stat.S_IMODE(folder.st_mode) & 0o022:
        raise MailboxStoreError(
            f"{path.parent} belongs to another user or others may write to it; the "
            f"mailbox's directory must be private: chmod 700 {path.parent}"
        )
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise MailboxStoreError(f"cannot open {path}: {exc.strerror}") from None
    try:
        _check_private(path, os.fstat(fd))
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        try:
            info = os.lstat(side)
        except FileNotFoundError:
            continue
        _check_private(side, info)


def _check_private(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise MailboxStoreError(f"{path} is not a regular file; refusing to use it")
    if info.st_uid != os.getuid():
        raise MailboxStoreError(f"{path} belongs to another user; refusing to use it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise MailboxStoreError(
            f"{path} may be read by other users (mode {stat.S_IMODE(info.st_mode):o}); the "
            f"mailbox must be private: chmod 600 {path}"
        )


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA synchronous=FULL")  # a 201 means the message is on disk
        db.execute("PRAGMA secure_delete=ON")
        db.execute("PRAGMA trusted_schema=OFF")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise MailboxStoreError(f"{path} is not a mailbox database: {exc}") from None
    return db


def _init_schema(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables in a new file; refuse a file of another kind or schema version."""
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise MailboxStoreError(f"{path}: SQLite refused WAL mode ({mode})")
        db.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif tables != _TABLES:
                raise MailboxStoreError(f"{path} is not a mailbox database")
            else:
                _check_version(db, path)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise MailboxStoreError(f"{path} is not a mailbox database: {exc}") from None


def _check_version(db: sqlite3.Connection, path: Path) -> None:
    rows = db.execute("SELECT version FROM schema_version").fetchall()
    if len(rows) != 1 or not isinstance(rows[0][0], int):
        raise MailboxStoreError(f"{path}: its schema version is missing or corrupted")
    if rows[0][0] != SCHEMA_VERSION:
        raise MailboxStoreError(
            f"{path} has mailbox schema version {rows[0][0]}; this server reads version "
            f"{SCHEMA_VERSION}"
        )
