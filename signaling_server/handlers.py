"""HTTP handlers: relay one offer and one answer per Duet ID, and nothing else.

Logs name IDs (a short prefix) and sizes, never SDP text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from signaling_server.config import ServerConfig
from signaling_server.ice import ice_servers_for_client
from signaling_server.middleware import ApiError, client_key
from signaling_server.ratelimit import ConcurrencyLimiter, in_networks, parse_networks
from signaling_server.responses import json_response
from signaling_server.state import SignalingState

logger = logging.getLogger(__name__)

DUET_ID_RE = re.compile(r"[0-9a-f]{32}")


def _short(duet_id: str) -> str:
    return duet_id[:8] + "..."


def wait_seconds(request: web.Request, max_wait: float) -> float:
    """The ``wait`` query parameter: a number of seconds >= 0, at most ``max_wait``."""
    raw = request.query.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not math.isfinite(wait) or wait < 0:
        raise ApiError(400, "invalid_wait", "'wait' must be a number of seconds >= 0")
    return min(wait, max_wait)


async def json_object(request: web.Request, limit: int) -> dict[str, Any]:
    """The request's body as a JSON object, never more than ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "body_too_large", f"request body too large (limit {limit} bytes)")
    raw = await request.read()  # aiohttp stops at client_max_size with a 413
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "malformed_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the request body must be a JSON object")
    return body


class SignalingHandlers:
    """Route handlers bound to one state and one config."""

    def __init__(self, state: SignalingState, config: ServerConfig) -> None:
        self._state = state
        self._config = config
        self.waits = ConcurrencyLimiter(config.max_waits_per_client)
        """Open long-polls per client (the host routes count against the same)."""
        self._exempt = parse_networks(config.exempt_networks)

    # -- input checks ---------------------------------------------------------------

    @staticmethod
    def _duet_id(request: web.Request) -> str:
        duet_id = request.match_info["duet_id"]
        if not DUET_ID_RE.fullmatch(duet_id):
            raise ApiError(400, "malformed_id", "a Duet ID is exactly 32 lowercase hex characters")
        return duet_id

    def _wait(self, request: web.Request) -> float:
        return wait_seconds(request, self._config.max_wait)

    async def _sdp(self, request: web.Request, kind: str) -> str:
        """Read a {"type": kind, "sdp": str} body, never more than max_body bytes."""
        body = await json_object(request, self._config.max_body)
        if body.get("type") != kind:
            raise ApiError(400, "invalid_body", f'"type" must be "{kind}"')
        sdp = body.get("sdp")
        if not isinstance(sdp, str) or not sdp:
            raise ApiError(400, "invalid_body", '"sdp" must be a non-empty string')
        if len(sdp) > self._config.max_sdp:
            raise ApiError(
                400, "invalid_body", f'"sdp" is longer than {self._config.max_sdp} characters'
            )
        return sdp

    async def _long_poll(
        self,
        request: web.Request,
        waiter: Callable[[str, float], Awaitable[str | None]],
        duet_id: str,
        wait: float,
    ) -> str | None:
        """Run a state wait, counting it against the client's concurrent long-polls."""
        if wait <= 0:
            return await waiter(duet_id, 0.0)
        key = client_key(request)
        if not self.waits.try_acquire(key):
            raise ApiError(
                429,
                "too_many_waits",
                "too many open long-polls from this address",
                {"Retry-After": "1"},
            )
        try:
            return await waiter(duet_id, wait)
        finally:
            self.waits.release(key)

    # -- routes ---------------------------------------------------------------------

    async def post_offer(self, request: web.Request) -> web.Response:
        duet_id = self._duet_id(request)
        sdp = await self._sdp(request, "offer")
        exempt = in_networks(request.remote, self._exempt)
        owner = None if exempt else client_key(request)  # None: counts against no quota
        await self._state.put_offer(duet_id, sdp, owner=owner)
        logger.info("offer posted for duet %s (%d chars)", _short(duet_id), len(sdp))
        return json_response({"duet_id": duet_id, "expires_in": self._config.ttl}, status=201)

    async def get_offer(self, request: web.Request) -> web.Response:
        duet_id = self._duet_id(request)
        wait = self._wait(request)
        sdp = await self._long_poll(request, self._state.wait_for_offer, duet_id, wait)
        if sdp is None:
            raise ApiError(
                404,
                "unknown_id",
                f"no offer for Duet ID {duet_id}: it may be mistyped, or not posted yet",
            )
        logger.info("offer fetched for duet %s", _short(duet_id))
        return json_response({"type": "offer", "sdp": sdp})

    async def post_answer(self, request: web.Request) -> web.Response:
        duet_id = self._duet_id(request)
        sdp = await self._sdp(request, "answer")
        await self._state.put_answer(duet_id, sdp)
        logger.info("answer posted for duet %s (%d chars)", _short(duet_id), len(sdp))
        return json_response({"duet_id": duet_id}, status=201)

    async def get_answer(self, request: web.Request) -> web.Response:
        duet_id = self._duet_id(request)
        wait = self._wait(request)
        sdp = await self._long_poll(request, self._state.wait_for_answer, duet_id, wait)
        if sdp is None:
            return web.Response(status=204, headers={"Cache-Control": "no-store"})
        logger.info("answer fetched for duet %s", _short(duet_id))
        return json_response({"type": "answer", "sdp": sdp})

    async def health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok", "duets": await self._state.count()})

    async def ice_servers(self, request: web.Request) -> web.Response:
        c = self._config
        servers = ice_servers_for_client(
            c.ice_servers,
            turn_secret=c.turn_secret,
            turn_urls=c.turn_urls,
            turn_ttl=c.turn_ttl,
            turn_label=c.turn_label,
        )
        return json_response({"iceServers": servers})


@contextlib.asynccontextmanager
async def long_poll_slot(
    waits: ConcurrencyLimiter, request: web.Request, wait: float
) -> AsyncIterator[None]:
    """Count a long-poll against the client's concurrent long-polls (none if wait is 0)."""
    if wait <= 0:
        yield
        return
    key = client_key(request)
    if not waits.try_acquire(key):
        raise ApiError(
            429,
            "too_many_waits",
            "too many open long-polls from this address",
            {"Retry-After": "1"},
        )
    try:
        yield
    finally:
        waits.release(key)
