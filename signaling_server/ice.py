"""ICE servers handed to clients, with short-lived TURN REST credentials.

The TURN REST scheme is the one coturn implements with `use-auth-secret` and
`static-auth-secret`: username = "<unix expiry>:<label>", credential =
base64(HMAC-SHA1(secret, username)). The TURN server recomputes it; nothing is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Any

ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")
TURN_SCHEMES = ("turn:", "turns:")
_ICE_KEYS = {"urls", "username", "credential"}


def _check_urls(urls: Any, schemes: tuple[str, ...]) -> list[str]:
    items = [urls] if isinstance(urls, str) else urls
    if not isinstance(items, list) or not items:
        raise ValueError("'urls' must be a URL or a non-empty list of URLs")
    for url in items:
        if not isinstance(url, str) or not url.startswith(schemes):
            raise ValueError(f"ICE URL {url!r} must start with one of {', '.join(schemes)}")
    return items


def validate_ice_servers(servers: Any) -> list[dict[str, Any]]:
    """Check a list of RTCIceServer-like dicts; raise ValueError naming what is wrong."""
    if not isinstance(servers, list):
        raise ValueError("ICE servers must be a JSON list of objects")
    checked = []
    for server in servers:
        if not isinstance(server, dict) or "urls" not in server:
            raise ValueError("each ICE server must be an object with 'urls'")
        extra = set(server) - _ICE_KEYS
        if extra:
            raise ValueError(f"unknown ICE server keys: {', '.join(sorted(extra))}")
        _check_urls(server["urls"], ICE_SCHEMES)
        for key in ("username", "credential"):
            if key in server and not isinstance(server[key], str):
                raise ValueError(f"ICE server '{key}' must be a string")
        checked.append(dict(server))
    return checked


def validate_turn_urls(urls: Sequence[str]) -> list[str]:
    """Check TURN URLs for REST credentials (turn: or turns: only)."""
    return _check_urls(list(urls), TURN_SCHEMES) if urls else []


def turn_rest_credential(
    secret: str, label: str, ttl: int, now: float | None = None
) -> tuple[str, str]:
    """Return (username, credential) valid until now + ttl under the TURN REST scheme."""
    expiry = int(now if now is not None else time.time()) + ttl
    username = f"{expiry}:{label}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers_for_client(
    servers: Sequence[dict[str, Any]],
    *,
    turn_secret: str | None = None,
    turn_urls: Sequence[str] = (),
    turn_ttl: int = 3600,
    turn_label: str = "duet",
) -> list[dict[str, Any]]:
    """The configured servers, plus a fresh TURN REST entry when a secret is set."""
    result = [dict(s) for s in servers]
    if turn_secret and turn_urls:
        username, credential = turn_rest_credential(turn_secret, turn_label, turn_ttl)
        result.append({"urls": list(turn_urls), "username": username, "credential": credential})
    return result
