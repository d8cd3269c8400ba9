"""Client of a signaling server's mailbox: post envelopes to a recipient, fetch and delete
one's own.

The HTTP API (JSON bodies, binary fields in padded base64):

- ``POST /v1/mailbox/{recipient_id}`` ``{"sender_id", "envelope"}`` -> 201
  ``{"message_id", "expires_in"}``
- ``POST /v1/mailbox/{recipient_id}/challenge`` -> ``{"challenge", "expires_in"}``
- ``POST /v1/mailbox/{recipient_id}/fetch?wait=S`` ``{"public_key", "challenge",
  "signature", "after"?}`` -> ``{"messages": [{"message_id", "sender_id", "envelope",
  "posted_at"}], "challenge"}``
- ``POST /v1/mailbox/{recipient_id}/delete`` ``{"public_key", "challenge", "signature",
  "message_ids"}`` -> ``{"deleted"}``

Only the recipient may fetch or delete: it signs :func:`mailbox_message` (the recipient ID, a
one-time server challenge and the action) with its identity key. A fetch answers with the
next challenge, which the next fetch or delete uses, so a recipient that polls asks for a
challenge once; a kept challenge that the server no longer takes (HTTP 403) is replaced by a
fresh one, once.

The server is as untrusted as any peer. It sees only envelopes (sealed and signed, see
:mod:`duet_p2p.mailbox.envelope`), so it can withhold, delay, reorder or replay messages but
not read, change or forge them; opening each envelope catches the rest. Here, every response
body is capped, must be JSON of the expected shape (each delivered message has exactly the
fields above, checked: IDs, canonical base64, sizes, finite numbers, no duplicates), else
SignalingError; redirects are not followed and compressed bodies are not inflated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from duet_p2p.errors import SignalingError
from duet_p2p.identity import Identity
from duet_p2p.mailbox.envelope import MAX_ENVELOPE_BYTES
from duet_p2p.signaling.client import LONG_POLL_SECONDS, SignalingClient, _b64, _clean, _is_id

MAX_FETCH_RESPONSE_BYTES = 2 << 20
"""Largest response read (the server fills a fetch with under 1 MiB of JSON)."""
MAX_MESSAGES_PER_FETCH = 64
MIN_CHALLENGE_BYTES = 16
MAX_CHALLENGE_BYTES = 64
MAX_DELETE_IDS = 256
"""Message IDs in one delete request (more go in several)."""
_CONTEXT = b"duet_p2p mailbox v1"
ACTIONS = frozenset({b"fetch", b"delete"})
_MESSAGE_KEYS = {"message_id", "sender_id", "envelope", "posted_at"}


class MailboxProofRefused(SignalingError):
    """The server did not accept the recipient's proof of its key (HTTP 403)."""


@dataclass(frozen=True)
class Delivered:
    """A message as the mailbox delivered it: open ``envelope`` before trusting anything."""

    message_id: str
    sender_id: str
    """As the server claims: pass it to ``open_envelope``, which checks it."""
    envelope: bytes = field(repr=False)
    posted_at: float


def mailbox_message(recipient_id: str, challenge: bytes, action: bytes) -> bytes:
    """The bytes a recipient signs to fetch or delete: each part as 4-byte big-endian
    length + bytes."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {sorted(ACTIONS)}")
    parts = [_CONTEXT, recipient_id.encode("ascii"), challenge, action]
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


class MailboxClient(SignalingClient):
    """The mailbox of ``identity`` (and posting to others'), at one signaling server; use as
    ``async with MailboxClient(url, identity) as mailbox:``."""

    def __init__(
        self,
        url: str,
        identity: Identity,
        *,
        request_timeout: float = 10.0,
        max_response_bytes: int = MAX_FETCH_RESPONSE_BYTES,
    ) -> None:
        super().__init__(
            url, request_timeout=request_timeout, max_response_bytes=max_response_bytes
        )
        self.identity = identity
        self._challenge: bytes | None = None

    async def __aenter__(self) -> MailboxClient:
        self._get_session()
        return self

    async def post(self, recipient_id: str, envelope: bytes) -> str:
        """Leave ``envelope`` in ``recipient_id``'s mailbox; its message ID."""
        if not _is_id(recipient_id):
            raise ValueError("recipient_id must be 32 lowercase hex digits")
        if not isinstance(envelope, bytes) or not 0 < len(envelope) <= MAX_ENVELOPE_BYTES:
            raise ValueError(f"an envelope is 1 to {MAX_ENVELOPE_BYTES} bytes")
        payload = {"sender_id": self.identity.id, "envelope": _b64(envelope)}
        status, data = await self._request("POST", f"/v1/mailbox/{recipient_id}", payload)
        if status != 201:
            self._raise(status, data, None, f"post a message to {recipient_id}")
        message_id = data.get("message_id") if isinstance(data, dict) else None
        if not _is_message_id(message_id) or not _is_seconds(data.get("expires_in")):
            raise SignalingError(f"signaling server at {self.url} sent a malformed message ID")
        return message_id

    async def challenge(self) -> bytes:
        """A fresh one-time challenge for this identity's mailbox."""
        path = f"/v1/mailbox/{self.identity.id}/challenge"
        status, data = await self._request("POST", path, {})
        if status != 200:
            self._raise(status, data, None, "issue a mailbox challenge")
        challenge = _challenge(data.get("challenge")) if isinstance(data, dict) else None
        if challenge is None or not _is_seconds(data.get("expires_in")):
            raise SignalingError(f"signaling server at {self.url} sent a malformed challenge")
        return challenge

    async def fetch(self, wait: float = 0.0, *, after: str | None = None) -> list[Delivered]:
        """One page of the messages in this identity's mailbox (those after message ``after``
        if given; pass the last one's ID for the next page), waiting up to ``wait`` seconds
        for one to arrive; [] if none did. Fetching deletes nothing: see ``delete``."""
        if isinstance(wait, bool) or not isinstance(wait, int | float):
            raise TypeError("wait is a number of seconds")
        if not math.isfinite(wait) or wait < 0:
            raise ValueError("wait must be a number of seconds >= 0")
        if after is not None and not _is_message_id(after):
            raise ValueError("after must be a message ID")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            step = min(LONG_POLL_SECONDS, max(0.0, deadline - loop.time()))
            started = loop.time()
            messages = await self._fetch_once(step, after)
            remaining = deadline - loop.time()
            if messages or remaining <= 0:
                return messages
            if loop.time() - started < step / 2:  # answered early: do not spin
                await asyncio.sleep(min(0.5, remaining))

    async def delete(self, message_ids: Iterable[str]) -> int:
        """Delete messages from this identity's mailbox; how many the server deleted."""
        ids = list(dict.fromkeys(message_ids))
        if not all(_is_message_id(m) for m in ids):
            raise ValueError("message IDs are 32 lowercase hex digits")
        deleted = 0
        for start in range(0, len(ids), MAX_DELETE_IDS):
            batch = ids[start : start + MAX_DELETE_IDS]
            path = f"/v1/mailbox/{self.identity.id}/delete"
            status, data = await self._prove(b"delete", path, {"message_ids": batch}, 0.0)
            if status != 200:
                self._raise(status, data, None, "delete mailbox messages")
            count = data.get("deleted") if isinstance(data, dict) else None
            if type(count) is not int or not 0 <= count <= len(batch):
                raise SignalingError(f"signaling server at {self.url} sent a malformed count")
            deleted += count
        return deleted

    # -- internals ---------------------------------------------------------------------

    async def _fetch_once(self, wait: float, after: str | None) -> list[Delivered]:
        path = f"/v1/mailbox/{self.identity.id}/fetch?wait={wait:.3f}"
        extra = {} if after is None else {"after": after}
        status, data = await self._prove(b"fetch", path, extra, wait)
        if status != 200:
            self._raise(status, data, None, "fetch mailbox messages")
        malformed = SignalingError(f"signaling server at {self.url} sent malformed messages")
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise malformed
        next_challenge = _challenge(data.get("challenge"))
        if next_challenge is None or len(data["messages"]) > MAX_MESSAGES_PER_FETCH:
            raise malformed
        messages = [_delivered(item) for item in data["messages"]]
        if None in messages or len({m.message_id for m in messages}) != len(messages):
            raise malformed
        self._challenge = next_challenge
        return messages  # type: ignore[return-value]

    async def _prove(
        self, action: bytes, path: str, extra: dict[str, Any], wait: float
    ) -> tuple[int, Any]:
        """POST ``path`` with a signed challenge (the kept one, or a fresh one)."""
        while True:
            kept, self._challenge = self._challenge, None
            challenge = kept if kept is not None else await self.challenge()
            signature = self.identity.sign_bytes(
                mailbox_message(self.identity.id, challenge, action)
            )
            payload = {
                "public_key": _b64(self.identity.public_key),
                "challenge": _b64(challenge),
                "signature": _b64(signature),
                **extra,
            }
            status, data = await self._request("POST", path, payload, wait=wait)
            if status != 403:
                return status, data
            if kept is None:
                raise MailboxProofRefused(
                    f"the signaling server at {self.url} refused the proof of identity for "
                    f"mailbox {self.identity.id} ({_clean(_error(data), 60)})"
                )


def _error(data: Any) -> object:
    return data.get("error", "error") if isinstance(data, dict) else "error"


def _is_message_id(value: object) -> bool:
    return _is_id(value)  # the server names messages as it names everything: 32 hex digits


def _is_seconds(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value >= 0
    )


def _unb64(value: object, low: int, high: int) -> bytes | None:
    """``value`` decoded if it is the canonical padded base64 of ``low``..``high`` bytes."""
    if not isinstance(value, str) or not 0 < len(value) <= 4 * math.ceil(high / 3):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not low <= len(raw) <= high or _b64(raw) != value:
        return None
    return raw


def _challenge(value: object) -> bytes | None:
    return _unb64(value, MIN_CHALLENGE_BYTES, MAX_CHALLENGE_BYTES)


def _delivered(item: object) -> Delivered | None:
    """A delivered message, checked; None if malformed."""
    if not isinstance(item, dict) or set(item) != _MESSAGE_KEYS:
        return None
    envelope = _unb64(item["envelope"], 1, MAX_ENVELOPE_BYTES)
    if (
        not _is_message_id(item["message_id"])
        or not _is_id(item["sender_id"])
        or envelope is None
        or not _is_seconds(item["posted_at"])
    ):
        return None
    return Delivered(item["message_id"], item["sender_id"], envelope, float(item["posted_at"]))
