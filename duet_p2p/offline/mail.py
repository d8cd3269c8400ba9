"""Job traffic through the end-to-end encrypted mailbox of a signaling server.

Four kinds of mail: the scientist sends a host a job (:data:`JOB`, a ``SignedJob``'s wire
bytes) or a cancellation (:data:`CANCEL`, canonical CBOR ``{"job_id"}``); the host sends the
scientist updates (:data:`UPDATE`, ``JobUpdate`` bytes) and results (:data:`RESULT`,
``ResultBundle`` bytes). A payload that fits one envelope goes as one
(:func:`~duet_p2p.mailbox.envelope.seal_envelope`), a larger one as a stream
(:func:`~duet_p2p.mailbox.stream.seal_stream`), sealed one envelope at a time.

:class:`MailOpener` takes messages as ``MailboxClient.fetch`` delivers them, in any order
and over several fetches, and returns each complete mail once: verified (signed by the
sender the server names, whose key hashes to its ID or is the key pinned for it), addressed
to us, fresh, not a replay, of an expected kind, and decrypted. Senders it does not accept
are refused before anything is decrypted. Refused messages are listed with the reason (which
never carries plaintext) for the caller to delete; so are the messages of a mail once it is
returned. The payload is still the peer's: parse it strictly.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from duet_p2p.errors import DuetError
from duet_p2p.identity import Identity
from duet_p2p.mailbox import envelope as mailbox_envelope
from duet_p2p.mailbox.client import Delivered, MailboxClient
from duet_p2p.mailbox.envelope import (
    DEFAULT_MAX_AGE,
    MAX_PAYLOAD_BYTES,
    EnvelopeRefused,
    SeenMessages,
    check_kind,
    peek_header,
    pinned_recipient,
    seal_envelope,
)
from duet_p2p.mailbox.known_keys import check_id
from duet_p2p.mailbox.stream import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_BUFFERED,
    StreamAssembler,
    seal_stream,
)
from duet_p2p.offline import spec as job_spec
from duet_p2p.rpc import codec

__all__ = [
    "CANCEL", "JOB", "RESULT", "UPDATE", "Mail", "MailOpener", "cancel_payload", "iter_mail",
    "parse_cancel", "post_mail", "seal_mail",
]  # fmt: skip

JOB = "job"
"""Scientist -> host: a SignedJob's wire bytes."""
CANCEL = "job-cancel"
"""Scientist -> host: canonical CBOR ``{"job_id"}`` (the host checks the job is the sender's)."""
UPDATE = "job-update"
"""Host -> scientist: a JobUpdate's bytes."""
RESULT = "job-result"
"""Host -> scientist: a ResultBundle's bytes."""
HOST_KINDS = frozenset({JOB, CANCEL})
SCIENTIST_KINDS = frozenset({UPDATE, RESULT})
DEFAULT_IDLE_SECONDS = 900.0
"""Seconds a stream may wait for its next part before it is dropped as incomplete."""
MAX_CLOSED_STREAMS = 10_000
MAX_REMEMBERED_NONCES = 100_000
_MAX_REASON = 300
_BOX_OVERHEAD = 16
"""Bytes a Box adds to its plaintext (the MAC)."""

Buffer = bytes | bytearray | memoryview
Payload = Buffer | Sequence[Buffer]


# -- cancellation --------------------------------------------------------------------------


def cancel_payload(job_id: str) -> bytes:
    """The payload of a CANCEL mail for ``job_id``."""
    return job_spec.canonical_bytes({"job_id": job_spec.hex32(job_id, "job_id")})


def parse_cancel(payload: bytes) -> str:
    """The job ID in a CANCEL payload (strict, canonical only); InvalidJob if malformed."""
    if type(payload) is not bytes or len(payload) > 64:
        raise job_spec.InvalidJob("a cancellation is at most 64 bytes")
    limits = codec.DecodeLimits(max_depth=2, max_items=4, max_bytes=64, max_tensor_elements=1)
    fields = job_spec.decode(payload, limits=limits, error=job_spec.InvalidJob)
    if type(fields) is not dict or set(fields) != {"job_id"}:
        raise job_spec.InvalidJob('a cancellation is a map of exactly ["job_id"]')
    job_id = job_spec.hex32(fields["job_id"], "job_id")
    if cancel_payload(job_id) != payload:
        raise job_spec.InvalidJob("a cancellation is not in canonical form")
    return job_id


# -- sending -------------------------------------------------------------------------------


def iter_mail(
    sender: Identity,
    recipient_id: str,
    recipient_key: bytes,
    kind: str,
    payload: Payload,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    now: float | None = None,
) -> Iterator[bytes]:
    """The envelopes carrying ``payload`` (bytes, or buffers whose concatenation it is, e.g.
    ``ResultBundle.to_parts()``) from ``sender`` to ``recipient_id``, sealed one at a time.
    ``recipient_key`` must be the key pinned for ``recipient_id`` (else KeyNotPinned, at
    once). The buffers must not change until the iterator is exhausted."""
    pinned_recipient(recipient_id, recipient_key)
    check_kind(kind)
    parts = _views(payload)
    size = sum(part.nbytes for part in parts)
    if size <= MAX_PAYLOAD_BYTES:
        data = b"".join(parts)
        return iter([seal_envelope(sender, recipient_id, recipient_key, kind, data, now=now)])
    if len(parts) == 1:
        return seal_stream(
            sender, recipient_id, recipient_key, kind, parts[0], chunk_bytes=chunk_bytes, now=now
        )
    return seal_stream(
        sender, recipient_id, recipient_key, kind, _pieces(parts, chunk_bytes), size=size,
        chunk_bytes=chunk_bytes, now=now,
    )  # fmt: skip


def seal_mail(
    sender: Identity, recipient_id: str, recipient_key: bytes, kind: str, payload: Payload
) -> list[bytes]:
    """Every envelope of ``iter_mail`` at once (one unless the payload needs a stream)."""
    return list(iter_mail(sender, recipient_id, recipient_key, kind, payload))


async def post_mail(
    client: MailboxClient, recipient_id: str, envelopes: Iterable[bytes]
) -> list[str]:
    """Post ``envelopes`` (one at a time, in order) to ``recipient_id``; their message IDs."""
    return [await client.post(recipient_id, envelope) for envelope in envelopes]


def _views(payload: Payload) -> list[memoryview]:
    parts = [payload] if isinstance(payload, bytes | bytearray | memoryview) else payload
    if not isinstance(parts, Sequence) or isinstance(parts, str):
        raise TypeError("a payload is bytes, or a sequence of bytes-like buffers")
    views = []
    for part in parts:
        if not isinstance(part, bytes | bytearray | memoryview):
            raise TypeError("a payload is bytes, or a sequence of bytes-like buffers")
        views.append(memoryview(part).cast("B"))
    return views


def _pieces(parts: list[memoryview], chunk_bytes: int) -> Iterator[memoryview]:
    """The buffers in slices of at most ``chunk_bytes`` (views, nothing copied)."""
    for part in parts:
        for start in range(0, part.nbytes, chunk_bytes):
            yield part[start : start + chunk_bytes]


# -- receiving -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mail:
    """One complete, verified, decrypted mail; ``message_ids`` are the mailbox messages it
    came in (delete them once it is handled)."""

    kind: str
    sender_id: str
    sender_key: bytes
    payload: bytes = field(repr=False)
    message_ids: tuple[str, ...]


@dataclass
class _Stream:
    assembler: StreamAssembler
    message_ids: list[str]
    last_part_at: float


class MailOpener:
    """Opens the mail of ``identity`` as it is fetched (thread-safe).

    ``kinds``: the kinds accepted. ``seen``: the persistent replay store (recommended; this
    object also remembers what it opened while it lives). ``max_bytes``: the largest
    payload; ``max_streams`` streams are assembled at once, of at most ``max_total_bytes``
    together (default ``max_streams * max_bytes``), each dropped as incomplete after
    ``idle_seconds`` without a new part. ``senders(sender_id)``: whether a sender is accepted
    at all (checked before anything else). ``sender_keys(sender_id)``: the key pinned for it,
    or None to require only that the key hashes to the ID. Stream parts go into ``seen`` as
    they arrive, so keep one opener while a stream is assembled (a new one would refuse the
    parts seen before as replays), or give a new one only streams whose parts are all here.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        kinds: Collection[str],
        seen: SeenMessages | None = None,
        max_bytes: int,
        max_streams: int = 8,
        senders: Callable[[str], bool] | None = None,
        sender_keys: Callable[[str], bytes | None] | None = None,
        max_total_bytes: int | None = None,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        max_age: float = DEFAULT_MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(kinds, str) or not kinds:
            raise ValueError("kinds is a non-empty collection of mail kinds")
        for name, value in (("max_bytes", max_bytes), ("max_streams", max_streams)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int")
        if max_total_bytes is not None and (
            type(max_total_bytes) is not int or max_total_bytes < 1
        ):
            raise ValueError("max_total_bytes must be a positive int or None")
        if not idle_seconds > 0:
            raise ValueError("idle_seconds must be above 0")
        self.identity = identity
        self.kinds = frozenset(check_kind(kind) for kind in kinds)
        self.max_bytes, self.max_streams = max_bytes, max_streams
        self.max_total_bytes = max_total_bytes or max_streams * max_bytes
        self.idle_seconds, self.max_buffered, self.max_age = idle_seconds, max_buffered, max_age
        self._seen, self._clock = seen, clock
        self._senders, self._sender_keys = senders, sender_keys
        self._lock = threading.RLock()
        self._streams: dict[tuple[str, bytes], _Stream] = {}
        self._closed: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._nonces: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._state: dict[str, str] = {}  # message ID -> "pending" | "done" | "refused"
        self._done: dict[str, None] = {}
        self._refused: dict[str, str] = {}

    # -- the caller's view ---------------------------------------------------------------

    def add(self, delivered: Delivered | Iterable[Delivered]) -> list[Mail]:
        """Take delivered messages (one, or a fetch's list); the mails they complete. A
        message already taken and not yet forgotten is ignored (fetched again before it was
        deleted). Refusals go to ``refused``; they never raise."""
        items = [delivered] if isinstance(delivered, Delivered) else list(delivered)
        if not all(isinstance(item, Delivered) for item in items):
            raise TypeError("add takes Delivered messages, as MailboxClient.fetch returns them")
        with self._lock:
            self.expire()
            mails = []
            for item in items:
                if type(item.message_id) is not str:
                    raise TypeError("a delivered message's ID is text")
                if item.message_id in self._state:
                    continue
                mail = self._take(item)
                if mail is not None:
                    mails.append(mail)
            return mails

    @property
    def refused(self) -> list[tuple[str, str]]:
        """(message ID, reason) of every message refused and not yet forgotten."""
        with self._lock:
            return list(self._refused.items())

    def done_ids(self) -> list[str]:
        """Message IDs of the mails returned (every part of a stream), not yet forgotten."""
        with self._lock:
            return list(self._done)

    def deletable_ids(self) -> list[str]:
        """Message IDs to delete from the server now: those of returned mails and refused
        messages (never those of a stream still being assembled)."""
        with self._lock:
            return [*self._done, *self._refused]

    def pending_ids(self) -> list[str]:
        """Message IDs held by streams not complete yet (do not delete them)."""
        with self._lock:
            return [mid for stream in self._streams.values() for mid in stream.message_ids]

    def forget(self, message_ids: Iterable[str]) -> None:
        """Drop the bookkeeping of returned or refused messages (once deleted on the
        server). A message delivered again after this is treated as new: a replay."""
        with self._lock:
            for mid in message_ids:
                if self._state.get(mid) in ("done", "refused"):
                    del self._state[mid]
                    self._done.pop(mid, None)
                    self._refused.pop(mid, None)

    def expire(self, now: float | None = None) -> int:
        """Drop the streams idle for over ``idle_seconds`` (their messages are refused);
        how many were dropped."""
        with self._lock:
            now = self._clock() if now is None else now
            idle = [
                key for key, stream in self._streams.items()
                if now - stream.last_part_at > self.idle_seconds
            ]  # fmt: skip
            for key in idle:
                reason = f"an incomplete mailbox stream, dropped after {self.idle_seconds:g} s idle"
                self._refuse_stream(key, self._streams[key], None, reason)
            return len(idle)

    # -- internals -----------------------------------------------------------------------

    def _take(self, item: Delivered) -> Mail | None:
        mid, sender_id = item.message_id, item.sender_id
        try:
            check_id(sender_id, "sender ID")
        except ValueError:
            return self._refuse(mid, "refused a mailbox message from a malformed sender ID")
        if self._senders is not None and not self._senders(sender_id):
            return self._refuse(mid, f"refused a mailbox message from {sender_id}: not accepted")
        try:
            header = peek_header(item.envelope)
        except EnvelopeRefused as exc:
            return self._refuse(mid, str(exc))
        if header.kind not in self.kinds:
            return self._refuse(mid, f"refused a mailbox message of unexpected kind {header.kind}")
        if header.sender_id != sender_id:
            return self._refuse(
                mid, f"refused a mailbox message that says it is from {header.sender_id}, "
                f"not {sender_id}",
            )  # fmt: skip
        key = self._sender_keys(sender_id) if self._sender_keys is not None else None
        if header.stream is None:
            return self._open_single(item, header.nonce, key)
        return self._add_part(item, header.stream.stream_id, header.sender_key, key)

    def _open_single(self, item: Delivered, nonce: bytes, key: bytes | None) -> Mail | None:
        mid, sender_id = item.message_id, item.sender_id
        if (sender_id, nonce) in self._nonces:
            return self._refuse(mid, "refused a mailbox message opened before (a replay)")
        try:  # every check first, the replay store included; only then decrypt
            header, body = mailbox_envelope.verify_envelope(
                self.identity, item.envelope, sender_id=sender_id, sender_key=key,
                kinds=self.kinds, max_age=self.max_age, now=self._clock(),
            )  # fmt: skip
            if header.stream is not None:
                raise EnvelopeRefused("refused a mailbox message: it is part of a stream")
            if len(body) > self.max_bytes + _BOX_OVERHEAD:
                raise EnvelopeRefused(f"refused a mailbox message over {self.max_bytes} bytes")
            _remember(self._nonces, (sender_id, nonce), MAX_REMEMBERED_NONCES)
            if self._seen is not None:
                self._seen.add(sender_id, nonce, header.created_at + self.max_age + 1)
            payload = mailbox_envelope.box_open(self.identity, header, body)
        except (DuetError, ValueError, TypeError) as exc:
            return self._refuse(mid, str(exc))
        self._state[mid] = "done"
        self._done[mid] = None
        return Mail(header.kind, sender_id, header.sender_key, payload, (mid,))

    def _add_part(
        self, item: Delivered, stream_id: bytes, sender_key: bytes, key: bytes | None
    ) -> Mail | None:
        mid, skey = item.message_id, (item.sender_id, stream_id)
        if skey in self._closed:
            return self._refuse(mid, "refused a part of a mailbox stream already ended or refused")
        stream = self._streams.get(skey)
        if stream is None:
            if len(self._streams) >= self.max_streams:
                _remember(self._closed, skey, MAX_CLOSED_STREAMS)
                return self._refuse(
                    mid, f"refused a mailbox stream: more than {self.max_streams} at once"
                )
            assembler = StreamAssembler(
                self.identity, sender_id=item.sender_id, max_bytes=self.max_bytes,
                sender_key=key, kinds=self.kinds, seen=self._seen,
                max_buffered=self.max_buffered, max_age=self.max_age, clock=self._clock,
            )  # fmt: skip
            stream = _Stream(assembler, [], self._clock())
        try:
            complete = stream.assembler.add(item.envelope)
            total = sum(s.assembler.size or 0 for k, s in self._streams.items() if k != skey)
            if total + (stream.assembler.size or 0) > self.max_total_bytes:
                raise EnvelopeRefused(
                    f"refused a mailbox stream: streams over {self.max_total_bytes} bytes at once"
                )
        except (DuetError, ValueError, TypeError) as exc:
            return self._refuse_stream(skey, stream, mid, str(exc))
        self._streams[skey] = stream
        stream.message_ids.append(mid)
        stream.last_part_at = self._clock()
        self._state[mid] = "pending"
        if not complete:
            return None
        try:
            payload = stream.assembler.payload()
        except (DuetError, ValueError) as exc:  # complete streams have one; fail closed
            return self._refuse_stream(skey, stream, None, str(exc))
        del self._streams[skey]
        _remember(self._closed, skey, MAX_CLOSED_STREAMS)
        for part in stream.message_ids:
            self._state[part] = "done"
            self._done[part] = None
        kind = stream.assembler.kind
        assert kind is not None
        return Mail(kind, item.sender_id, sender_key, payload, tuple(stream.message_ids))

    def _refuse(self, message_id: str, reason: str) -> None:
        self._state[message_id] = "refused"
        self._refused[message_id] = reason[:_MAX_REASON]
        return None

    def _refuse_stream(
        self, skey: tuple[str, bytes], stream: _Stream, message_id: str | None, reason: str
    ) -> None:
        """Refuse a whole stream: every part taken so far, and ``message_id``."""
        self._streams.pop(skey, None)
        _remember(self._closed, skey, MAX_CLOSED_STREAMS)
        for part in [*stream.message_ids, *([message_id] if message_id else [])]:
            self._refuse(part, reason)
        return None


def _remember(seen: OrderedDict, key: object, limit: int) -> None:
    seen[key] = None
    seen.move_to_end(key)
    while len(seen) > limit:
        seen.popitem(last=False)
