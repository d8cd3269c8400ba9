"""Client of the signaling server: post and fetch one offer and one answer by Duet ID.

The server is untrusted like any peer: response bodies are capped, must be JSON of the
expected shape, redirects are not followed and compressed bodies are not inflated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import re
from typing import Any, NoReturn

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
KEY_BYTES = 32
NONCE_BYTES = 32
SIGNATURE_BYTES = 64
CHALLENGE_BYTES = 40
MAX_OFFER_SDP = 65536
"""Longest SDP accepted in an offer delivered to a host, in characters."""
MAX_OFFERS_PER_WAIT = 16
"""Offers taken from one wait response, at most."""
MAX_REASON = 500
"""Longest refusal reason, in characters (longer ones are cut)."""
_WAIT_CONTEXT = b"duet_p2p host wait v1"


class HostProofRefused(SignalingError):
    """The signaling server did not accept the host's proof of its key (HTTP 403)."""


def wait_message(host_id: str, challenge: bytes) -> bytes:
    """The bytes a host signs to open a wait: each part as 4-byte big-endian length + bytes."""
    parts = [_WAIT_CONTEXT, host_id.encode("ascii"), challenge]
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(value: object, size: int) -> bytes | None:
    """`value` decoded if it is the canonical padded base64 of exactly `size` bytes."""
    if not isinstance(value, str) or len(value) != 4 * math.ceil(size / 3):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != size or _b64(raw) != value:
        return None
    return raw


def _is_id(value: object) -> bool:
    return isinstance(value, str) and _DUET_ID_RE.fullmatch(value) is not None


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")


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

    # -- standing hosts ---------------------------------------------------------------

    async def host_online(self, host_id: str) -> bool:
        """Whether the host is serving now (it has been in touch with this server lately)."""
        self._check_host_id(host_id)
        status, data = await self._request("GET", f"/v1/hosts/{host_id}")
        if status != 200:
            self._raise(status, data, None, "tell whether the host is online")
        if (
            not isinstance(data, dict)
            or data.get("host_id") != host_id
            or not isinstance(data.get("online"), bool)
        ):
            raise SignalingError(f"signaling server at {self.url} sent a malformed host status")
        return data["online"]

    async def post_host_offer(
        self,
        host_id: str,
        *,
        sdp: str,
        client_id: str,
        public_key: bytes,
        nonce: bytes,
        signature: bytes,
    ) -> str:
        """Post a scientist's signed offer to a standing host; return its offer ID."""
        self._check_host_id(host_id)
        if not _is_id(client_id):
            raise ValueError("client_id must be 32 lowercase hex characters")
        if not isinstance(sdp, str) or not sdp:
            raise ValueError("sdp must be a non-empty string")
        _check_bytes("public_key", public_key, KEY_BYTES)
        _check_bytes("nonce", nonce, NONCE_BYTES)
        _check_bytes("signature", signature, SIGNATURE_BYTES)
        payload = {
            "type": "offer",
            "sdp": sdp,
            "client_id": client_id,
            "public_key": _b64(public_key),
            "nonce": _b64(nonce),
            "signature": _b64(signature),
        }
        status, data = await self._request("POST", f"/v1/hosts/{host_id}/offers", payload)
        if status == 404 and isinstance(data, dict) and data.get("error") == "host_offline":
            raise SignalingNotFound(
                f"host {host_id} is not serving now (signaling server {self.url}): check the "
                "host ID, and that the host is running and uses this signaling server"
            )
        if status != 201:
            self._raise(status, data, None, "post the offer to the host")
        offer_id = data.get("offer_id") if isinstance(data, dict) else None
        if not _is_id(offer_id):
            raise SignalingError(f"signaling server at {self.url} sent a malformed offer ID")
        logger.debug("posted offer %s... to host %s...", offer_id[:8], host_id[:8])
        return offer_id

    async def wait_host_answer(self, host_id: str, offer_id: str, timeout: float) -> dict:
        """The host's answer to an offer: {"type": "answer", "sdp", "public_key",
        "signature"} (bytes) or {"type": "refusal", "reason"}; ConnectionTimeout if none
        arrives within `timeout` s, SignalingNotFound if the offer is unknown or expired."""
        self._check_host_id(host_id)
        if not _is_id(offer_id):
            raise ValueError("offer_id must be 32 lowercase hex characters")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        path = f"/v1/hosts/{host_id}/offers/{offer_id}/answer"
        while True:
            wait = min(LONG_POLL_SECONDS, max(0.0, deadline - loop.time()))
            started = loop.time()
            status, data = await self._request("GET", f"{path}?wait={wait:.3f}", wait=wait)
            if status == 200:
                return self._host_answer(data)
            if status == 404 and isinstance(data, dict) and data.get("error") == "unknown_id":
                raise SignalingNotFound(
                    f"the signaling server at {self.url} no longer knows offer {offer_id[:8]}... "
                    f"to host {host_id}: it expired"
                )
            if status != 204:
                self._raise(status, data, None, "get the host's answer")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ConnectionTimeout(
                    f"host {host_id} did not answer within {timeout:g} s (signaling server "
                    f"{self.url}); it may be busy or unable to serve"
                )
            if loop.time() - started < wait / 2:  # answered early: do not spin
                await asyncio.sleep(min(0.5, remaining))

    async def host_challenge(self, host_id: str) -> bytes:
        """A fresh one-time challenge the host signs to open a wait."""
        self._check_host_id(host_id)
        status, data = await self._request("POST", f"/v1/hosts/{host_id}/challenge", {})
        if status != 200:
            self._raise(status, data, None, "issue a host challenge")
        challenge = (
            _unb64(data.get("challenge"), CHALLENGE_BYTES) if isinstance(data, dict) else None
        )
        if challenge is None:
            raise SignalingError(f"signaling server at {self.url} sent a malformed challenge")
        return challenge

    async def host_wait(
        self, host_id: str, *, public_key: bytes, challenge: bytes, signature: bytes, wait: float
    ) -> tuple[list[dict], bytes]:
        """Prove the host's key and wait up to `wait` s for offers: (offers, next challenge).

        Each offer is {"offer_id", "sdp", "client_id", "public_key", "nonce", "signature",
        "age"} with bytes fields; malformed ones are skipped. HostProofRefused on HTTP 403.
        """
        self._check_host_id(host_id)
        _check_bytes("public_key", public_key, KEY_BYTES)
        _check_bytes("challenge", challenge, CHALLENGE_BYTES)
        _check_bytes("signature", signature, SIGNATURE_BYTES)
        if not math.isfinite(wait) or wait < 0:
            raise ValueError("wait must be a number of seconds >= 0")
        payload = {
            "public_key": _b64(public_key),
            "challenge": _b64(challenge),
            "signature": _b64(signature),
        }
        path = f"/v1/hosts/{host_id}/wait?wait={wait:.3f}"
        status, data = await self._request("POST", path, payload, wait=wait)
        if status == 403:
            raise HostProofRefused(
                f"the signaling server at {self.url} refused the host's proof of identity "
                f"for {host_id} (a stale challenge, or a key that is not this host's)"
            )
        if status != 200:
            self._raise(status, data, None, "wait for offers to the host")
        if not isinstance(data, dict) or not isinstance(data.get("offers"), list):
            raise SignalingError(f"signaling server at {self.url} sent malformed host offers")
        next_challenge = _unb64(data.get("challenge"), CHALLENGE_BYTES)
        if next_challenge is None:
            raise SignalingError(f"signaling server at {self.url} sent a malformed challenge")
        offers: list[dict] = []
        seen: set[str] = set()
        for item in data["offers"][:MAX_OFFERS_PER_WAIT]:
            offer = _host_offer(item)
            if offer is None or offer["offer_id"] in seen:
                logger.warning("skipped a malformed offer from the signaling server")
                continue
            seen.add(offer["offer_id"])
            offers.append(offer)
        return offers, next_challenge

    async def post_host_answer(self, host_id: str, offer_id: str, answer: dict) -> None:
        """Post the host's answer ({"type": "answer", "sdp", "public_key", "signature"},
        bytes fields) or refusal ({"type": "refusal", "reason"}) to one offer."""
        self._check_host_id(host_id)
        if not _is_id(offer_id):
            raise ValueError("offer_id must be 32 lowercase hex characters")
        payload: dict[str, Any]
        if answer.get("type") == "answer":
            sdp = answer.get("sdp")
            if not isinstance(sdp, str) or not sdp:
                raise ValueError("an answer's sdp must be a non-empty string")
            _check_bytes("public_key", answer.get("public_key"), KEY_BYTES)
            _check_bytes("signature", answer.get("signature"), SIGNATURE_BYTES)
            payload = {
                "type": "answer",
                "sdp": sdp,
                "public_key": _b64(answer["public_key"]),
                "signature": _b64(answer["signature"]),
            }
        elif answer.get("type") == "refusal":
            reason = answer.get("reason")
            if not isinstance(reason, str):
                raise ValueError("a refusal's reason must be a string")
            payload = {"type": "refusal", "reason": reason[:MAX_REASON]}
        else:
            raise ValueError('answer["type"] must be "answer" or "refusal"')
        path = f"/v1/hosts/{host_id}/offers/{offer_id}/answer"
        status, data = await self._request("POST", path, payload)
        if status == 404 and isinstance(data, dict) and data.get("error") == "unknown_id":
            raise SignalingNotFound(
                f"the signaling server at {self.url} no longer knows offer {offer_id[:8]}...: "
                "it expired"
            )
        if status != 201:
            self._raise(status, data, None, f"post the {payload['type']} to the offer")

    # -- internals --------------------------------------------------------------------

    @staticmethod
    def _check_host_id(host_id: str) -> None:
        if not _is_id(host_id):
            raise SignalingNotFound(
                f"{_clean(host_id, 80)!r} is not a host ID (32 lowercase hex characters); "
                "check it was copied completely"
            )

    def _host_answer(self, data: Any) -> dict:
        """A host's answer or refusal from a response body; SignalingError if malformed."""
        malformed = SignalingError(f"signaling server at {self.url} sent a malformed host answer")
        if not isinstance(data, dict):
            raise malformed
        if data.get("type") == "refusal" and set(data) == {"type", "reason"}:
            if not isinstance(data["reason"], str):
                raise malformed
            return {"type": "refusal", "reason": _clean(data["reason"], MAX_REASON)}
        if data.get("type") != "answer" or set(data) != {"type", "sdp", "public_key", "signature"}:
            raise malformed
        sdp = data["sdp"]
        public_key = _unb64(data["public_key"], KEY_BYTES)
        signature = _unb64(data["signature"], SIGNATURE_BYTES)
        if not isinstance(sdp, str) or not sdp or public_key is None or signature is None:
            raise malformed
        return {"type": "answer", "sdp": sdp, "public_key": public_key, "signature": signature}

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

    def _raise(self, status: int, data: Any, duet_id: str | None, action: str) -> NoReturn:
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


def _host_offer(item: object) -> dict | None:
    """An offer delivered to a host, with binary fields decoded; None if malformed."""
    keys = {"offer_id", "sdp", "client_id", "public_key", "nonce", "signature", "age"}
    if not isinstance(item, dict) or set(item) != keys:
        return None
    sdp, age = item["sdp"], item["age"]
    public_key = _unb64(item["public_key"], KEY_BYTES)
    nonce = _unb64(item["nonce"], NONCE_BYTES)
    signature = _unb64(item["signature"], SIGNATURE_BYTES)
    if (
        not _is_id(item["offer_id"])
        or not _is_id(item["client_id"])
        or not isinstance(sdp, str)
        or not sdp
        or len(sdp) > MAX_OFFER_SDP
        or isinstance(age, bool)
        or not isinstance(age, int | float)
        or not math.isfinite(age)
        or age < 0
        or public_key is None
        or nonce is None
        or signature is None
        or hashlib.sha256(public_key).hexdigest()[:32] != item["client_id"]
    ):
        return None
    return {
        "offer_id": item["offer_id"],
        "sdp": sdp,
        "client_id": item["client_id"],
        "public_key": public_key,
        "nonce": nonce,
        "signature": signature,
        "age": float(age),
    }
