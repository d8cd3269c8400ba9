"""HTTP handlers of the mailbox: anyone posts an envelope for a recipient ID; only the
recipient, by a signed one-time challenge, fetches (long-polling) and deletes its messages.

Bodies are JSON objects (duplicate keys refused), read up to a cap of their own: a post
may carry a whole envelope (base64), so its cap follows mailbox_max_message_bytes, not
max_body; fetch and delete bodies are small. Binary fields are canonical padded base64.
Logs name IDs by an 8-character prefix and give sizes, never envelope bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from typing import Any

from aiohttp import web

from signaling_server.config import ServerConfig
from signaling_server.handlers import DUET_ID_RE, long_poll_slot, wait_seconds
from signaling_server.host_handlers import b64, b64_field
from signaling_server.hosts import CHALLENGE_BYTES, CHALLENGE_TTL, KEY_BYTES, SIGNATURE_BYTES
from signaling_server.mailbox import (
    DELETE,
    FETCH,
    MAX_DELETE,
    MailboxState,
    verify_mailbox_proof,
)
from signaling_server.middleware import ApiError, client_key
from signaling_server.ratelimit import ConcurrencyLimiter, in_networks, parse_networks
from signaling_server.responses import json_response

logger = logging.getLogger(__name__)

_POST_KEYS = {"sender_id", "envelope"}
_PROOF_KEYS = {"public_key", "challenge", "signature"}
"""A body missing one fails the proof (403, as any failed proof); an unknown field is 400."""
_FETCH_KEYS = _PROOF_KEYS | {"after"}
_DELETE_KEYS = _PROOF_KEYS | {"message_ids"}
_CONTROL_BODY = 32 * 1024
"""Cap of fetch and delete bodies, in bytes (MAX_DELETE IDs take about 9 KiB)."""
_POST_SLACK = 1024
"""Bytes of a post body besides its base64 envelope."""
_CHUNK = 64 * 1024
_NOT_RECIPIENT = "the server could not verify that this request comes from the recipient"


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_body", message)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body = dict(pairs)
    if len(body) != len(pairs):
        raise ValueError("duplicate key")
    return body


async def read_json_object(request: web.Request, limit: int) -> dict[str, Any]:
    """The request's body as a JSON object of at most `limit` bytes (413 above it)."""
    too_large = ApiError(413, "body_too_large", f"request body too large (limit {limit} bytes)")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    raw = bytearray()
    while chunk := await request.content.read(_CHUNK):
        raw += chunk
        if len(raw) > limit:
            raise too_large
    try:
        body = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise ApiError(400, "malformed_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    return body


def b64_bounded(value: object, max_size: int) -> bytes | None:
    """`value` decoded if it is the canonical padded base64 of 1 to `max_size` bytes."""
    if not isinstance(value, str) or not 0 < len(value) <= 4 * math.ceil(max_size / 3):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not 0 < len(raw) <= max_size or base64.b64encode(raw).decode("ascii") != value:
        return None
    return raw


class MailboxHandlers:
    """Route handlers of the mailbox, bound to one MailboxState and one config.

    `waits` counts concurrent long-polls per client; pass the duet handlers' one so that
    every kind of long-poll shares one budget.
    """

    def __init__(
        self, mailbox: MailboxState, config: ServerConfig, waits: ConcurrencyLimiter | None = None
    ) -> None:
        self._mailbox = mailbox
        self._config = config
        self._waits = (
            waits if waits is not None else ConcurrencyLimiter(config.max_waits_per_client)
        )
        self._exempt = parse_networks(config.exempt_networks)
        self.max_post_body = 4 * math.ceil(config.mailbox_max_message_bytes / 3) + _POST_SLACK
        """Cap of a post body, in bytes."""

    def add_routes(self, app: web.Application) -> None:
        box = "/v1/mailbox/{recipient_id}"
        app.router.add_post(box, self.post)
        app.router.add_post(f"{box}/challenge", self.challenge)
        app.router.add_post(f"{box}/fetch", self.fetch)
        app.router.add_post(f"{box}/delete", self.delete)

    # -- input checks -------------------------------------------------------------------

    @staticmethod
    def _recipient(request: web.Request) -> str:
        value = request.match_info["recipient_id"]
        if not DUET_ID_RE.fullmatch(value):
            raise ApiError(
                400, "malformed_id", "a recipient ID is exactly 32 lowercase hex characters"
            )
        return value

    async def _proven(self, recipient_id: str, body: dict[str, Any], action: bytes) -> bytes:
        """The body's challenge once the proof holds (not yet spent); 403 otherwise, the
        same whatever failed."""
        challenge = b64_field(body.get("challenge"), CHALLENGE_BYTES)
        public_key = b64_field(body.get("public_key"), KEY_BYTES)
        signature = b64_field(body.get("signature"), SIGNATURE_BYTES)
        ok = (
            public_key is not None
            and signature is not None
            and challenge is not None
            and await self._mailbox.check_challenge(recipient_id, challenge)
            and verify_mailbox_proof(recipient_id, public_key, challenge, action, signature)
        )
        if not ok or challenge is None:
            logger.info("refused a %s for %s", action.decode(), recipient_id[:8])
            raise ApiError(403, "not_recipient", _NOT_RECIPIENT)
        return challenge

    async def _spend(self, recipient_id: str, challenge: bytes, action: bytes) -> None:
        if not await self._mailbox.take_challenge(recipient_id, challenge):
            logger.info("refused a %s for %s (challenge spent)", action.decode(), recipient_id[:8])
            raise ApiError(403, "not_recipient", _NOT_RECIPIENT)

    # -- routes -------------------------------------------------------------------------

    async def post(self, request: web.Request) -> web.Response:
        recipient_id = self._recipient(request)
        body = await read_json_object(request, self.max_post_body)
        if set(body) != _POST_KEYS:
            raise _invalid("the body must have exactly the fields: envelope, sender_id")
        sender_id = body["sender_id"]
        if not isinstance(sender_id, str) or not DUET_ID_RE.fullmatch(sender_id):
            raise _invalid('"sender_id" must be 32 lowercase hex characters')
        limit = self._config.mailbox_max_message_bytes
        envelope = b64_bounded(body["envelope"], limit)
        if envelope is None:
            raise _invalid(f'"envelope" must be the padded base64 of 1 to {limit} bytes')
        exempt = in_networks(request.remote, self._exempt)
        owner = None if exempt else client_key(request)
        message = await self._mailbox.put(recipient_id, sender_id, envelope, owner=owner)
        return json_response(
            {"message_id": message.message_id, "expires_in": self._config.mailbox_ttl},
            status=201,
        )

    async def challenge(self, request: web.Request) -> web.Response:
        recipient_id = self._recipient(request)
        challenge = await self._mailbox.new_challenge(recipient_id)
        return json_response({"challenge": b64(challenge), "expires_in": CHALLENGE_TTL})

    async def fetch(self, request: web.Request) -> web.Response:
        recipient_id = self._recipient(request)
        wait = wait_seconds(request, self._config.max_wait)
        body = await read_json_object(request, _CONTROL_BODY)
        if not set(body) <= _FETCH_KEYS:  # a missing proof field is a failed proof (403)
            raise _invalid(
                "the body may only have the fields: after, challenge, public_key, signature"
            )
        after = body.get("after")
        if after is not None and (not isinstance(after, str) or not DUET_ID_RE.fullmatch(after)):
            raise _invalid('"after" must be a message ID (32 lowercase hex characters) or null')
        challenge = await self._proven(recipient_id, body, FETCH)
        # Only a valid proof spends the challenge, and only once the long-poll slot is
        # held (so a 429 leaves the challenge usable).
        async with long_poll_slot(self._waits, request, wait):
            await self._spend(recipient_id, challenge, FETCH)
            messages = await self._mailbox.fetch(recipient_id, after, wait)
        if messages:
            logger.info("delivered %d messages to %s", len(messages), recipient_id[:8])
        return json_response(
            {
                "messages": [
                    {
                        "message_id": m.message_id,
                        "sender_id": m.sender_id,
                        "envelope": b64(m.envelope),
                        "posted_at": m.posted_at,
                    }
                    for m in messages
                ],
                "challenge": b64(await self._mailbox.new_challenge(recipient_id)),
            }
        )

    async def delete(self, request: web.Request) -> web.Response:
        recipient_id = self._recipient(request)
        body = await read_json_object(request, _CONTROL_BODY)
        if not set(body) <= _DELETE_KEYS or "message_ids" not in body:
            raise _invalid(
                "the body must have the fields: challenge, message_ids, public_key, signature"
            )
        ids = body["message_ids"]
        if (
            not isinstance(ids, list)
            or len(ids) > MAX_DELETE
            or not all(isinstance(i, str) and DUET_ID_RE.fullmatch(i) for i in ids)
        ):
            raise _invalid(f'"message_ids" must be a list of at most {MAX_DELETE} message IDs')
        challenge = await self._proven(recipient_id, body, DELETE)
        await self._spend(recipient_id, challenge, DELETE)
        return json_response({"deleted": await self._mailbox.delete(recipient_id, ids)})
