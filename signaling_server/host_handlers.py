"""HTTP handlers of standing hosts: scientists post offers to a host, the host proves its
key and long-polls for them, and answers or refuses each.

Binary fields are standard padded base64, decoded strictly. Logs name IDs by a short
prefix and give sizes, never SDP text.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from typing import Any

from aiohttp import web

from signaling_server.config import ServerConfig
from signaling_server.handlers import DUET_ID_RE, json_object, long_poll_slot, wait_seconds
from signaling_server.hosts import (
    CHALLENGE_BYTES,
    CHALLENGE_TTL,
    KEY_BYTES,
    MAX_REASON,
    NONCE_BYTES,
    SIGNATURE_BYTES,
    HostOffer,
    HostState,
    host_id_of,
    verify_wait_proof,
)
from signaling_server.middleware import ApiError, client_key
from signaling_server.ratelimit import ConcurrencyLimiter, in_networks, parse_networks
from signaling_server.responses import json_response

logger = logging.getLogger(__name__)

_OFFER_KEYS = {"type", "sdp", "client_id", "public_key", "nonce", "signature"}
_ANSWER_KEYS = {"type", "sdp", "public_key", "signature"}
_REFUSAL_KEYS = {"type", "reason"}
_WAIT_KEYS = {"public_key", "challenge", "signature"}
_NOT_HOST = "the server could not verify that this request comes from the host"


def b64_field(value: object, size: int) -> bytes | None:
    """`value` decoded if it is the canonical padded base64 of exactly `size` bytes."""
    if not isinstance(value, str) or len(value) != 4 * math.ceil(size / 3):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != size or base64.b64encode(raw).decode("ascii") != value:
        return None
    return raw


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _short(some_id: str) -> str:
    return some_id[:8] + "..."


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_body", message)


class HostHandlers:
    """Route handlers of standing hosts, bound to one HostState and one config.

    `waits` counts concurrent long-polls per client; pass the one the duet handlers use
    so that both kinds of long-poll share one budget.
    """

    def __init__(
        self, hosts: HostState, config: ServerConfig, waits: ConcurrencyLimiter | None = None
    ) -> None:
        self._hosts = hosts
        self._config = config
        self._waits = (
            waits if waits is not None else ConcurrencyLimiter(config.max_waits_per_client)
        )
        self._exempt = parse_networks(config.exempt_networks)

    def add_routes(self, app: web.Application) -> None:
        host = "/v1/hosts/{host_id}"
        app.router.add_get(host, self.get_host)
        app.router.add_post(f"{host}/offers", self.post_offer)
        app.router.add_get(f"{host}/offers/{{offer_id}}/answer", self.get_answer)
        app.router.add_post(f"{host}/offers/{{offer_id}}/answer", self.post_answer)
        app.router.add_post(f"{host}/challenge", self.challenge)
        app.router.add_post(f"{host}/wait", self.wait)

    # -- input checks ---------------------------------------------------------------

    @staticmethod
    def _id(request: web.Request, name: str) -> str:
        value = request.match_info[name]
        if not DUET_ID_RE.fullmatch(value):
            what = "a host ID" if name == "host_id" else "an offer ID"
            raise ApiError(400, "malformed_id", f"{what} is exactly 32 lowercase hex characters")
        return value

    def _wait_seconds(self, request: web.Request) -> float:
        return wait_seconds(request, self._config.max_wait)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The JSON object body, never more than max_body bytes."""
        return await json_object(request, self._config.max_body)

    @staticmethod
    def _keys(body: dict[str, Any], expected: set[str]) -> None:
        if set(body) != expected:
            names = ", ".join(sorted(expected))
            raise _invalid(f"the body must have exactly the fields: {names}")

    def _sdp(self, body: dict[str, Any]) -> str:
        sdp = body.get("sdp")
        if not isinstance(sdp, str) or not sdp:
            raise _invalid('"sdp" must be a non-empty string')
        if len(sdp) > self._config.max_sdp:
            raise _invalid(f'"sdp" is longer than {self._config.max_sdp} characters')
        return sdp

    @staticmethod
    def _binary(body: dict[str, Any], name: str, size: int) -> bytes:
        raw = b64_field(body.get(name), size)
        if raw is None:
            raise _invalid(f'"{name}" must be the padded base64 of {size} bytes')
        return raw

    def _long_poll_slot(self, request: web.Request, wait: float) -> Any:
        """Count a long-poll against the client's concurrent long-polls (none if wait is 0)."""
        return long_poll_slot(self._waits, request, wait)

    # -- routes ---------------------------------------------------------------------

    async def get_host(self, request: web.Request) -> web.Response:
        host_id = self._id(request, "host_id")
        return json_response({"host_id": host_id, "online": await self._hosts.online(host_id)})

    async def post_offer(self, request: web.Request) -> web.Response:
        host_id = self._id(request, "host_id")
        body = await self._body(request)
        self._keys(body, _OFFER_KEYS)
        if body["type"] != "offer":
            raise _invalid('"type" must be "offer"')
        sdp = self._sdp(body)
        client_id = body["client_id"]
        if not isinstance(client_id, str) or not DUET_ID_RE.fullmatch(client_id):
            raise _invalid('"client_id" must be 32 lowercase hex characters')
        public_key = self._binary(body, "public_key", KEY_BYTES)
        if host_id_of(public_key) != client_id:
            raise _invalid('"client_id" is not the ID of "public_key"')
        offer = HostOffer(
            sdp=sdp,
            client_id=client_id,
            public_key=public_key,
            nonce=self._binary(body, "nonce", NONCE_BYTES),
            signature=self._binary(body, "signature", SIGNATURE_BYTES),
        )
        exempt = in_networks(request.remote, self._exempt)
        owner = None if exempt else client_key(request)
        offer_id = await self._hosts.put_offer(host_id, offer, owner=owner)
        logger.info(
            "offer %s posted for host %s (%d chars)", _short(offer_id), _short(host_id), len(sdp)
        )
        return json_response({"offer_id": offer_id, "expires_in": self._config.ttl}, status=201)

    async def get_answer(self, request: web.Request) -> web.Response:
        host_id = self._id(request, "host_id")
        offer_id = self._id(request, "offer_id")
        wait = self._wait_seconds(request)
        async with self._long_poll_slot(request, wait):
            answer = await self._hosts.wait_answer(host_id, offer_id, wait)
        if answer is None:
            return web.Response(status=204, headers={"Cache-Control": "no-store"})
        logger.info("answer to offer %s fetched", _short(offer_id))
        if answer["type"] == "refusal":
            return json_response({"type": "refusal", "reason": answer["reason"]})
        return json_response(
            {
                "type": "answer",
                "sdp": answer["sdp"],
                "public_key": b64(answer["public_key"]),
                "signature": b64(answer["signature"]),
            }
        )

    async def post_answer(self, request: web.Request) -> web.Response:
        host_id = self._id(request, "host_id")
        offer_id = self._id(request, "offer_id")
        body = await self._body(request)
        kind = body.get("type")
        if kind == "refusal":
            self._keys(body, _REFUSAL_KEYS)
            reason = body["reason"]
            if not isinstance(reason, str) or len(reason) > MAX_REASON:
                raise _invalid(f'"reason" must be a string of at most {MAX_REASON} characters')
            answer: dict[str, Any] = {"type": "refusal", "reason": reason}
        elif kind == "answer":
            self._keys(body, _ANSWER_KEYS)
            sdp = self._sdp(body)
            public_key = self._binary(body, "public_key", KEY_BYTES)
            signature = self._binary(body, "signature", SIGNATURE_BYTES)
            if host_id_of(public_key) != host_id:
                raise ApiError(403, "not_host", _NOT_HOST)
            answer = {
                "type": "answer",
                "sdp": sdp,
                "public_key": public_key,
                "signature": signature,
            }
        else:
            raise _invalid('"type" must be "answer" or "refusal"')
        await self._hosts.put_answer(host_id, offer_id, answer)
        logger.info("%s posted to offer %s for host %s", kind, _short(offer_id), _short(host_id))
        return json_response({"offer_id": offer_id}, status=201)

    async def challenge(self, request: web.Request) -> web.Response:
        host_id = self._id(request, "host_id")
        challenge = await self._hosts.new_challenge(host_id)
        return json_response({"challenge": b64(challenge), "expires_in": CHALLENGE_TTL})

    async def wait(self, request: web.Request) -> web.Response:
        host_id = self._id(request, "host_id")
        wait = self._wait_seconds(request)
        body = await self._body(request)
        challenge = b64_field(body.get("challenge"), CHALLENGE_BYTES)
        public_key = b64_field(body.get("public_key"), KEY_BYTES)
        signature = b64_field(body.get("signature"), SIGNATURE_BYTES)
        # Every failure looks the same; only a valid proof spends the challenge, and only
        # once the long-poll slot is held (so a 429 leaves the challenge usable).
        ok = (
            set(body) == _WAIT_KEYS
            and public_key is not None
            and signature is not None
            and challenge is not None
            and await self._hosts.check_challenge(host_id, challenge)
            and verify_wait_proof(host_id, public_key, challenge, signature)
        )
        if not ok or challenge is None:
            logger.info("refused a wait for host %s", _short(host_id))
            raise ApiError(403, "not_host", _NOT_HOST)
        async with self._long_poll_slot(request, wait):
            if not await self._hosts.take_challenge(host_id, challenge):
                logger.info("refused a wait for host %s (challenge spent)", _short(host_id))
                raise ApiError(403, "not_host", _NOT_HOST)
            offers, next_challenge = await self._hosts.wait_offers(host_id, wait)
        if offers:
            logger.info("delivered %d offers to host %s", len(offers), _short(host_id))
        return json_response(
            {
                "offers": [
                    {
                        "offer_id": d.offer_id,
                        "sdp": d.offer.sdp,
                        "client_id": d.offer.client_id,
                        "public_key": b64(d.offer.public_key),
                        "nonce": b64(d.offer.nonce),
                        "signature": b64(d.offer.signature),
                        "age": round(d.age, 3),
                    }
                    for d in offers
                ],
                "challenge": b64(next_challenge),
            }
        )
