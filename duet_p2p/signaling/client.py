"""Client of the signaling server: post and fetch one offer and one answer by Duet ID.

The server is untrusted like any peer: response bodies are capped, must be JSON of the
expected shape, redirects are not followed and compressed bodies are not inflated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import aiohttp
from yarl import URL

from duet_p2p.errors import (
    ConfigurationError,
    ConnectionTimeout,
    SignalingError,
    SignalingNotFound,
)

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 1 << 20
"""Largest response body read from a signaling server."""
LONG_POLL_SECONDS = 25.0
"""Longest single long-poll; longer waits are made of several."""
_DUET_ID_RE = re.compile(r"[0-9a-f]{32}")
_START_HINT = "start one with `python -m signaling_server` or pass the URL of a running one"


def _clean(text: object, limit: int = 300) -> str:
    """A server-supplied text made safe to show: printable and short."""
    s = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return s if len(s) <= limit else s[:limit] + "..."


class SignalingClient:
    """Async client of one signaling server; use as `async with SignalingClient(url) as c:`."""

    def __init__(
        self,
        url: str,
        *,
        request_timeout: float = 10.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigurationError(
                f"signaling URL must look like http://HOST:PORT, got {_clean(url, 100)!r}"
            )
        self.url = str(url).rstrip("/")
        self._request_timeout = request_timeout
        self._max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SignalingClient:
        self._get_session()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- API --------------------------------------------------------------------------

    async def post_offer(self, duet_id: str, sdp: str) -> None:
        """Publish the owner's offer under `duet_id`."""
        await self._post(duet_id, "offer", sdp)

    async def get_offer(self, duet_id: str, wait: float = 10.0) -> str:
        """The offer's SDP, waiting up to `wait` seconds for the owner to post it."""
        sdp = await self._poll(duet_id, "offer", wait)
        if sdp is None:
            raise SignalingNotFound(
                f"no offer for Duet ID {duet_id} at {self.url} after {wait:g} s: the ID may be "
                "mistyped or expired, or the owner has not started yet"
            )
        return sdp

    async def post_answer(self, duet_id: str, sdp: str) -> None:
        """Publish the scientist's answer to the offer under `duet_id` (once per ID)."""
        await self._post(duet_id, "answer", sdp)

    async def wait_answer(self, duet_id: str, timeout: float) -> str:
        """The answer's SDP; raise ConnectionTimeout if none arrives within `timeout` s."""
        sdp = await self._poll(duet_id, "answer", timeout)
        if sdp is None:
            raise ConnectionTimeout(
                f"the partner did not join within {timeout:g} s "
                f"(no answer for Duet ID {duet_id} at {self.url})"
            )
        return sdp

    async def ice_servers(self) -> list[dict[str, Any]]:
        """ICE servers (STUN/TURN, with credentials) the server hands out."""
        status, data = await self._request("GET", "/v1/ice-servers")
        if status != 200:
            self._raise(status, data, None, "list ICE servers")
        servers = data.get("iceServers") if isinstance(data, dict) else None
        if not isinstance(servers, list) or not all(
            isinstance(s, dict) and isinstance(s.get("urls"), str | list) for s in servers
        ):
            raise SignalingError(f"signaling server at {self.url} sent malformed ICE servers")
        return servers

    # -- internals --------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
                auto_decompress=False,
            )
        return self._session

    @staticmethod
    def _check_id(duet_id: str) -> None:
        if not isinstance(duet_id, str) or not _DUET_ID_RE.fullmatch(duet_id):
            raise SignalingNotFound(
                f"{_clean(duet_id, 80)!r} is not a Duet ID (32 lowercase hex characters); "
                "check it was copied completely"
            )

    async def _post(self, duet_id: str, kind: str, sdp: str) -> None:
        self._check_id(duet_id)
        path = f"/v1/duets/{duet_id}/{kind}"
        status, data = await self._request("POST", path, {"type": kind, "sdp": sdp})
        if status != 201:
            self._raise(status, data, duet_id, f"post the {kind}")
        logger.debug("posted %s for duet %s... (%d chars)", kind, duet_id[:8], len(sdp))

    async def _poll(self, duet_id: str, kind: str, timeout: float) -> str | None:
        """Long-poll for the offer or answer until `timeout`; None if it never came."""
        self._check_id(duet_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            wait = min(LONG_POLL_SECONDS, max(0.0, deadline - loop.time()))
            started = loop.time()
            path = f"/v1/duets/{duet_id}/{kind}?wait={wait:.3f}"
            status, data = await self._request("GET", path, wait=wait)
            if status == 200:
                return self._sdp(data, kind)
            if kind == "answer":
                pending = status == 204
            else:
                pending = (
                    status == 404 and isinstance(data, dict) and data.get("error") == "unknown_id"
                )
            if not pending:
                self._raise(status, data, duet_id, f"get the {kind}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if loop.time() - started < wait / 2:  # answered early: do not spin
                await asyncio.sleep(min(0.5, remaining))

    def _sdp(self, data: Any, kind: str) -> str:
        if (
            not isinstance(data, dict)
            or data.get("type") != kind
            or not isinstance(data.get("sdp"), str)
        ):
            raise SignalingError(f"signaling server at {self.url} sent a malformed {kind}")
        return data["sdp"]

    async def _request(
        self, method: str, path: str, payload: dict[str, Any] | None = None, wait: float = 0.0
    ) -> tuple[int, Any]:
        """One HTTP exchange: (status, parsed JSON or None for 204)."""
        timeout = aiohttp.ClientTimeout(total=wait + self._request_timeout)
        try:
            async with self._get_session().request(
                method, self.url + path, json=payload, timeout=timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                raw = await self._read_capped(resp)
        except TimeoutError:
            raise SignalingError(
                f"signaling server at {self.url} did not answer within "
                f"{timeout.total:g} s; is it running? {_START_HINT}"
            ) from None
        except aiohttp.ClientError as exc:
            raise SignalingError(
                f"cannot reach the signaling server at {self.url} ({_clean(exc, 120)}); "
                f"{_START_HINT}"
            ) from exc
        if status == 204:
            return status, None
        try:
            return status, json.loads(raw)
        except (ValueError, RecursionError):
            raise SignalingError(
                f"signaling server at {self.url} answered HTTP {status} with a body that is "
                "not JSON; is this URL a duet signaling server?"
            ) from None

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self._max_response_bytes
        too_large = SignalingError(
            f"signaling server at {self.url} sent a response larger than {cap} bytes; refused"
        )
        if resp.content_length is not None and resp.content_length > cap:
            raise too_large
        body = bytearray()
        while chunk := await resp.content.read(65536):
            body += chunk
            if len(body) > cap:
                raise too_large
        return bytes(body)

    def _raise(self, status: int, data: Any, duet_id: str | None, action: str) -> None:
        """Raise the exception a refusal maps to; always raises."""
        info = data if isinstance(data, dict) else {}
        code = _clean(info.get("error", "error"), 60)
        said = _clean(info.get("message", "")) or "(no message)"
        if duet_id is not None and (status in (404, 410) or code == "malformed_id"):
            if code in ("unknown_id", "expired", "malformed_id"):
                raise SignalingNotFound(
                    f"Duet ID {duet_id} is unknown to the signaling server at {self.url}: it may "
                    f"have expired or be mistyped (server said: {said})"
                )
        raise SignalingError(
            f"signaling server at {self.url} refused to {action}: HTTP {status} {code}: {said}"
        )
