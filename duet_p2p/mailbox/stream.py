"""Streams: a payload too large for one envelope, as a sequence of envelopes.

Sealing. A stream of ``count`` chunks is ``count + 1`` envelopes sharing a random 16-byte
stream ID, each signed by the sender like any envelope (see :mod:`duet_p2p.mailbox.envelope`)
and carrying (stream ID, index, count) in its header. Index 0 opens the stream: its Box holds
a fresh libsodium secretstream (XChaCha20-Poly1305) key and header, the payload's size and
the chunk size. Indexes 1..count each hold one secretstream chunk of the payload, the last
tagged ``TAG_FINAL``; every chunk's associated data binds the stream ID, its index, the count,
the kind, the sender and the recipient. The payload may be bytes or an iterable of bytes
(with its ``size`` declared), so a sender never holds more than one chunk.

Assembling. :class:`StreamAssembler` takes the envelopes of one stream from one sender in any
order: each is verified on arrival (signature, recipient, freshness, and with ``seen`` not a
replay); chunks that arrive early wait in a buffer of at most ``max_buffered`` chunks; chunks
are decrypted strictly in order. A chunk of another stream, a duplicated index, a chunk that
does not decrypt, a final tag too early or missing, a size other than declared, or a buffer
overflow refuses the whole stream (``EnvelopeRefused``) and every later call; a missing chunk
leaves it incomplete (``finish`` refuses). Secretstream itself guarantees order and
completeness, so a bug in the bookkeeping cannot release reordered or truncated data. The
payload goes to a ``sink`` (a binary file, for large results; discard it if the stream is
refused) or to memory, at most ``max_bytes`` either way.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import BinaryIO

from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from duet_p2p.errors import ProtocolError
from duet_p2p.identity import Identity
from duet_p2p.mailbox.envelope import (
    DEFAULT_MAX_AGE,
    MAX_PAYLOAD_BYTES,
    MAX_STREAM_CHUNKS,
    STREAM_ID_BYTES,
    EnvelopeRefused,
    Header,
    SeenMessages,
    StreamInfo,
    box_open,
    box_seal,
    check_kind,
    new_header,
    pinned_recipient,
    sign_envelope,
    verify_envelope,
)
from duet_p2p.mailbox.known_keys import check_id
from duet_p2p.rpc import codec

DEFAULT_CHUNK_BYTES = 256 * 1024
MIN_CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = MAX_PAYLOAD_BYTES
DEFAULT_MAX_BUFFERED = 64
"""Chunks an assembler holds while waiting for an earlier one."""
_KEY_BYTES = sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES
_SS_HEADER_BYTES = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
_TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_AD_CONTEXT = b"duet_p2p mailbox stream v1"
_OPENING_KEYS = {"key", "header", "size", "chunk_bytes"}
_OPENING_LIMITS = codec.DecodeLimits(
    max_depth=2, max_items=16, max_bytes=256, max_tensor_elements=1
)


def chunk_count(size: int, chunk_bytes: int) -> int:
    """Chunks of a payload of ``size`` bytes (at least one, possibly empty)."""
    return max(1, math.ceil(size / chunk_bytes))


def seal_stream(
    sender: Identity,
    recipient_id: str,
    recipient_key: bytes,
    kind: str,
    data: bytes | Iterable[bytes],
    *,
    size: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    now: float | None = None,
) -> Iterator[bytes]:
    """The envelopes carrying ``data`` from ``sender`` to ``recipient_id`` (pinned key
    ``recipient_key``), opening envelope first. ``size`` is required when ``data`` is an
    iterable; the iterator raises ValueError if it yields another number of bytes."""
    pinned_recipient(recipient_id, recipient_key)
    check_kind(kind)
    if type(chunk_bytes) is not int or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES}")
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
        if size is not None and size != view.nbytes:
            raise ValueError("size differs from the length of data")
        size, pieces = view.nbytes, _slices(view, chunk_bytes)
    else:
        if type(size) is not int or size < 0:
            raise ValueError("size (an int >= 0) is required when data is an iterable")
        pieces = _rechunk(data, size, chunk_bytes)
    count = chunk_count(size, chunk_bytes)
    if count > MAX_STREAM_CHUNKS:
        raise ValueError(f"a stream is at most {MAX_STREAM_CHUNKS} chunks: raise chunk_bytes")
    return _envelopes(sender, recipient_id, recipient_key, kind, pieces, size, chunk_bytes, now)


def _envelopes(
    sender: Identity,
    recipient_id: str,
    recipient_key: bytes,
    kind: str,
    pieces: Iterator[bytes],
    size: int,
    chunk_bytes: int,
    now: float | None,
) -> Iterator[bytes]:
    count = chunk_count(size, chunk_bytes)
    stream_id = os.urandom(STREAM_ID_BYTES)
    key = sodium.crypto_secretstream_xchacha20poly1305_keygen()
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    ss_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    opening = codec.encode({"key": key, "header": ss_header, "size": size,
                            "chunk_bytes": chunk_bytes})  # fmt: skip
    first = new_header(sender, recipient_id, kind, stream=StreamInfo(stream_id, 0, count), now=now)
    yield sign_envelope(sender, first, box_seal(sender, recipient_key, first.nonce, opening))
    for index, piece in enumerate(pieces, start=1):
        info = StreamInfo(stream_id, index, count)
        header = new_header(sender, recipient_id, kind, stream=info, now=now)
        body = sodium.crypto_secretstream_xchacha20poly1305_push(
            state, piece, _associated_data(header, info), _push_tag(index, count)
        )
        yield sign_envelope(sender, header, body)


def _push_tag(index: int, count: int) -> int:
    """The tag the sender gives chunk ``index``: the last one ends the stream."""
    return _TAG_FINAL if index == count else _TAG_MESSAGE


def _slices(view: memoryview, chunk_bytes: int) -> Iterator[bytes]:
    count = chunk_count(view.nbytes, chunk_bytes)
    for i in range(count):
        yield bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes])


def _rechunk(data: Iterable[bytes], size: int, chunk_bytes: int) -> Iterator[bytes]:
    """Exactly the chunks of ``size`` bytes of ``data``; ValueError if it has more or less."""
    count = chunk_count(size, chunk_bytes)
    buffer, seen, sent = bytearray(), 0, 0
    for piece in data:
        buffer += piece
        seen += len(piece)
        if seen > size:
            raise ValueError(f"data yielded more than the {size} bytes declared")
        while len(buffer) >= chunk_bytes and sent < count - 1:
            yield bytes(buffer[:chunk_bytes])
            del buffer[:chunk_bytes]
            sent += 1
    if seen != size:
        raise ValueError(f"data yielded {seen} bytes, not the {size} declared")
    yield bytes(buffer)


def _associated_data(header: Header, s: StreamInfo) -> bytes:
    """What each chunk's authentication binds besides its bytes."""
    parts = (
        _AD_CONTEXT, s.stream_id, s.index.to_bytes(4, "big"), s.count.to_bytes(4, "big"),
        header.kind.encode(), header.sender_id.encode(), header.recipient_id.encode(),
    )  # fmt: skip
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


class StreamAssembler:
    """Reassembles and decrypts one stream from ``sender_id`` to ``recipient``."""

    def __init__(
        self,
        recipient: Identity,
        *,
        sender_id: str,
        max_bytes: int,
        sink: BinaryIO | None = None,
        sender_key: bytes | None = None,
        kinds: Collection[str] | None = None,
        seen: SeenMessages | None = None,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        max_age: float = DEFAULT_MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if type(max_bytes) is not int or max_bytes < 0:
            raise ValueError("max_bytes must be an int >= 0")
        if type(max_buffered) is not int or max_buffered < 1:
            raise ValueError("max_buffered must be a positive int")
        self._recipient = recipient
        self.sender_id = check_id(sender_id, "sender ID")
        self._sender_key, self._kinds, self._seen = sender_key, kinds, seen
        self.max_bytes, self.max_buffered, self._max_age = max_bytes, max_buffered, max_age
        self._clock, self._sink = clock, sink
        self._buffer = bytearray()
        self._pending: dict[int, bytes] = {}
        self._first: Header | None = None
        self._state: object | None = None
        self._opened = False
        self._next = 1
        self.size: int | None = None
        self._chunk_bytes = 0
        self._written = 0
        self._failed = False
        self.done = False

    @property
    def stream_id(self) -> bytes | None:
        return None if self._first is None or self._first.stream is None else (
            self._first.stream.stream_id
        )  # fmt: skip

    @property
    def kind(self) -> str | None:
        return None if self._first is None else self._first.kind

    def add(self, envelope: bytes) -> bool:
        """Take one envelope of the stream; whether the stream is now complete.
        EnvelopeRefused (and every later call refused) if it breaks the stream."""
        if self._failed:
            raise EnvelopeRefused("refused a mailbox stream that was refused before")
        try:
            return self._add(envelope)
        except BaseException:
            self._fail()
            raise

    def payload(self) -> bytes:
        """The whole payload (assembled in memory, i.e. without a sink)."""
        self.finish()
        if self._sink is not None:
            raise ValueError("the payload went to the sink")
        return bytes(self._buffer)

    def finish(self) -> None:
        """EnvelopeRefused unless the whole stream arrived and decrypted."""
        if self._failed:
            raise EnvelopeRefused("refused a mailbox stream that was refused before")
        if not self.done:
            total = "?" if self._first is None or self._first.stream is None else (
                self._first.stream.count
            )  # fmt: skip
            raise EnvelopeRefused(
                f"refused an incomplete mailbox stream: {self._next - 1} of {total} chunks "
                "arrived in order (missing or truncated)"
            )

    # -- internals ---------------------------------------------------------------------

    def _add(self, envelope: bytes) -> bool:
        if self.done:
            raise EnvelopeRefused("refused a mailbox stream envelope after its end (duplicate)")
        header, body = verify_envelope(
            self._recipient, envelope, sender_id=self.sender_id, sender_key=self._sender_key,
            kinds=self._kinds, max_age=self._max_age, now=self._clock(),
        )  # fmt: skip
        info = header.stream
        if info is None:
            raise EnvelopeRefused("refused a mailbox message: it is not part of a stream")
        self._check_same_stream(header, info)
        if (
            (info.index == 0 and self._opened)
            or info.index in self._pending
            or (0 < info.index < self._next)
        ):
            raise EnvelopeRefused(f"refused a mailbox stream: chunk {info.index} came twice")
        if self._seen is not None:
            self._seen.add(header.sender_id, header.nonce, header.created_at + self._max_age + 1)
        if info.index == 0:
            self._open(header, body)
        else:
            if len(self._pending) >= self.max_buffered:
                raise EnvelopeRefused(
                    f"refused a mailbox stream: more than {self.max_buffered} chunks arrived "
                    "ahead of a missing one"
                )
            self._pending[info.index] = body
        self._drain(header)
        return self.done

    def _check_same_stream(self, header: Header, info: StreamInfo) -> None:
        if self._first is None:
            self._first = header
            return
        first = self._first.stream
        if (
            first is None
            or info.stream_id != first.stream_id
            or info.count != first.count
            or header.kind != self._first.kind
        ):
            raise EnvelopeRefused("refused a mailbox stream: an envelope of another stream came")

    def _open(self, header: Header, body: bytes) -> None:
        info = header.stream
        assert info is not None
        fields = _opening(box_open(self._recipient, header, body))
        size, chunk_bytes = fields["size"], fields["chunk_bytes"]
        if chunk_count(size, chunk_bytes) != info.count:
            raise EnvelopeRefused("refused a mailbox stream: its size and chunk count disagree")
        if size > self.max_bytes:
            raise EnvelopeRefused(
                f"refused a mailbox stream of {size} bytes (at most {self.max_bytes} accepted)"
            )
        state = sodium.crypto_secretstream_xchacha20poly1305_state()
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(
                state, fields["header"], fields["key"]
            )
        except (CryptoError, ValueError, TypeError):
            raise EnvelopeRefused("refused a mailbox stream: its key is malformed") from None
        self._state, self._opened = state, True
        self.size, self._chunk_bytes = size, chunk_bytes

    def _drain(self, header: Header) -> None:
        if not self._opened or self._first is None or self._first.stream is None:
            return
        count = self._first.stream.count
        while self._next in self._pending:
            index = self._next
            body = self._pending.pop(index)
            info = StreamInfo(self._first.stream.stream_id, index, count)
            try:
                chunk, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                    self._state, body, _associated_data(header, info)
                )
            except (CryptoError, ValueError, TypeError):
                raise EnvelopeRefused(
                    f"refused a mailbox stream: chunk {index} does not decrypt (changed, "
                    "reordered or from another stream)"
                ) from None
            assert self.size is not None
            expected = min(self._chunk_bytes, self.size - (index - 1) * self._chunk_bytes)
            if tag != (_TAG_FINAL if index == count else _TAG_MESSAGE) or len(chunk) != expected:
                raise EnvelopeRefused(
                    f"refused a mailbox stream: chunk {index} is not the one expected there "
                    "(its end tag or size is wrong)"
                )
            self._write(chunk)
            self._next += 1
        if self._next > count:
            if self._written != self.size:
                raise EnvelopeRefused("refused a mailbox stream: its size is not as declared")
            self.done = True
            self._state = None

    def _write(self, chunk: bytes) -> None:
        self._written += len(chunk)
        if self._written > self.max_bytes:
            raise EnvelopeRefused(f"refused a mailbox stream over {self.max_bytes} bytes")
        if self._sink is None:
            self._buffer += chunk
        else:
            self._sink.write(chunk)

    def _fail(self) -> None:
        self._failed = True
        self._pending.clear()
        self._buffer = bytearray()
        self._state = None


def _opening(plaintext: bytes) -> dict:
    """The opening record of a stream, validated; EnvelopeRefused if malformed."""
    malformed = EnvelopeRefused("refused a mailbox stream: its opening record is malformed")
    try:
        fields = codec.decode(plaintext, limits=_OPENING_LIMITS)
    except ProtocolError:
        raise malformed from None
    if not isinstance(fields, dict) or set(fields) != _OPENING_KEYS:
        raise malformed
    key, ss_header = fields["key"], fields["header"]
    size, chunk_bytes = fields["size"], fields["chunk_bytes"]
    if (
        not isinstance(key, bytes)
        or len(key) != _KEY_BYTES
        or not isinstance(ss_header, bytes)
        or len(ss_header) != _SS_HEADER_BYTES
        or type(size) is not int
        or size < 0
        or type(chunk_bytes) is not int
        or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES
    ):
        raise malformed
    return fields
