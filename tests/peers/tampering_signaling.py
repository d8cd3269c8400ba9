"""A hostile signaling server: it forwards everything to a real one, but substitutes what a
man in the middle would, to put its own DTLS certificate between a scientist and a host.

One proxy listens on one port per mode and remembers which port each offer was posted
through; every substitution is recorded in ``proxy.tampered`` as (mode, offer_id), so a test
can tell the attack was made. Modes:

``none``                forward unchanged (the host waits for offers through this one)
``answer-fingerprint``  the host's answer reaches the scientist with other DTLS fingerprints
``answer-key``          ... and with the attacker's own key and a valid signature of it over
                        the substituted answer, the scientist's ID and nonce
``offer-fingerprint``   the scientist's offer reaches the host with other DTLS fingerprints
``offer-key``           ... and as the attacker's own offer: its Client ID, key and a valid
                        signature over the substituted offer and the scientist's nonce

    python tampering_signaling.py UPSTREAM_URL MODE...   # prints "MODE URL" per mode
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from duet_p2p.identity import Identity, SessionBinding

MODES = ("none", "answer-fingerprint", "answer-key", "offer-fingerprint", "offer-key")
MAX_BODY = 1 << 20
MODE = web.AppKey("mode", str)
UPSTREAM_SECONDS = 60.0
_FINGERPRINT = re.compile(r"^(a=fingerprint:\S+ )([0-9A-Fa-f:]+)(\s*)$", re.MULTILINE)
_OFFERS = re.compile(r"/v1/hosts/([0-9a-f]{32})/offers")
_ANSWER = re.compile(r"/v1/hosts/([0-9a-f]{32})/offers/([0-9a-f]{32})/answer")
_WAIT = re.compile(r"/v1/hosts/([0-9a-f]{32})/wait")


def other_fingerprints(sdp: str) -> str:
    """``sdp`` with every DTLS fingerprint replaced by a random one of the same length."""

    def swap(match: re.Match[str]) -> str:
        size = len(match.group(2).split(":"))
        fake = ":".join(f"{b:02X}" for b in secrets.token_bytes(size))
        return match.group(1) + fake + match.group(3)

    changed = _FINGERPRINT.sub(swap, sdp)
    if changed == sdp:
        raise ValueError("the description has no fingerprint to substitute")
    return changed


@dataclass(frozen=True)
class SeenOffer:
    """An offer posted through the proxy: the port's mode and what the attacker learnt."""

    mode: str
    host_id: str
    client_id: str
    nonce: bytes


class TamperingSignaling:
    """The proxy: ``urls = await proxy.start(modes)``, then ``await proxy.close()``."""

    def __init__(self, upstream: str, attacker: Identity | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.attacker = attacker or Identity.generate()
        self.offers: dict[str, SeenOffer] = {}
        self.tampered: list[tuple[str, str]] = []
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self, modes: Iterable[str], host: str = "127.0.0.1") -> dict[str, str]:
        """Listen on a free port per mode; {mode: URL}."""
        self._session = aiohttp.ClientSession(auto_decompress=False)
        urls = {}
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}")
            app = web.Application(client_max_size=MAX_BODY)
            app[MODE] = mode
            app.router.add_route("*", "/{tail:.*}", self._forward)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            site = web.TCPSite(runner, host, 0)
            await site.start()
            self._runners.append(runner)
            port = runner.addresses[0][1]
            urls[mode] = f"http://{host}:{port}"
        return urls

    async def close(self) -> None:
        """Stop listening; requests still waiting upstream (long-polls) are cut short."""
        if self._session is not None:
            await self._session.close()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        timeout = aiohttp.ClientTimeout(total=UPSTREAM_SECONDS)
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body or None,
            headers=headers, timeout=timeout, allow_redirects=False,
        ) as upstream:  # fmt: skip
            status, raw = upstream.status, await upstream.read()
        if status == 204:
            return web.Response(status=204)
        mode = request.app[MODE]
        raw = self._tamper(request, mode, body, status, raw)
        return web.Response(status=status, body=raw, content_type="application/json")

    def _tamper(
        self, request: web.Request, mode: str, body: bytes, status: int, raw: bytes
    ) -> bytes:
        path = request.path
        if request.method == "POST" and (match := _OFFERS.fullmatch(path)) and status == 201:
            self._remember(mode, match.group(1), body, raw)
        elif request.method == "POST" and _WAIT.fullmatch(path) and status == 200:
            return self._tamper_offers(raw)
        elif request.method == "GET" and (match := _ANSWER.fullmatch(path)) and status == 200:
            return self._tamper_answer(mode, match.group(2), raw)
        return raw

    def _remember(self, mode: str, host_id: str, body: bytes, raw: bytes) -> None:
        offer, reply = json.loads(body), json.loads(raw)
        nonce = _unb64(offer["nonce"])
        self.offers[reply["offer_id"]] = SeenOffer(mode, host_id, offer["client_id"], nonce)

    def _tamper_offers(self, raw: bytes) -> bytes:
        data = json.loads(raw)
        for offer in data.get("offers", []):
            seen = self.offers.get(offer.get("offer_id", ""))
            if seen is None or not seen.mode.startswith("offer-"):
                continue
            offer["sdp"] = other_fingerprints(offer["sdp"])
            if seen.mode == "offer-key":  # the attacker's own offer, validly signed
                binding = SessionBinding.for_sdp(
                    "scientist", seen.host_id, seen.nonce, offer["sdp"]
                )
                offer["client_id"] = self.attacker.id
                offer["public_key"] = _b64(self.attacker.public_key)
                offer["signature"] = _b64(self.attacker.sign(binding))
            self.tampered.append((seen.mode, offer["offer_id"]))
        return json.dumps(data).encode()

    def _tamper_answer(self, mode: str, offer_id: str, raw: bytes) -> bytes:
        data: dict[str, Any] = json.loads(raw)
        seen = self.offers.get(offer_id)
        if data.get("type") != "answer" or seen is None or not mode.startswith("answer-"):
            return raw
        data["sdp"] = other_fingerprints(data["sdp"])
        if mode == "answer-key":  # a perfectly signed answer, by the wrong key
            binding = SessionBinding.for_sdp("host", seen.client_id, seen.nonce, data["sdp"])
            data["public_key"] = _b64(self.attacker.public_key)
            data["signature"] = _b64(self.attacker.sign(binding))
        self.tampered.append((mode, offer_id))
        return json.dumps(data).encode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


async def _main(upstream: str, modes: list[str]) -> None:
    proxy = TamperingSignaling(upstream)
    for mode, url in (await proxy.start(modes)).items():
        print(mode, url, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await proxy.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2:]))
