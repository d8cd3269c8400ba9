"""Settings from arguments or the environment: signaling URL, ICE servers, host addresses."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from duet_p2p.errors import ConfigurationError

SIGNALING_URL_ENV = "DUET_SIGNALING_URL"
ICE_SERVERS_ENV = "DUET_ICE_SERVERS"
HOST_ADDRESSES_ENV = "DUET_ICE_HOST_ADDRESSES"
DEFAULT_CONNECT_TIMEOUT = 30.0


def signaling_url(explicit: str | None) -> str | None:
    """The signaling server's base URL: the argument, else DUET_SIGNALING_URL, else None."""
    url = explicit or os.environ.get(SIGNALING_URL_ENV) or None
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"the signaling URL must start with http:// or https://: {url!r}")
    return url.rstrip("/") if url else None


def ice_servers(explicit: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """ICE servers from the argument, else DUET_ICE_SERVERS (JSON), else None (ask the server)."""
    if explicit is not None:
        return [dict(s) for s in explicit]
    raw = os.environ.get(ICE_SERVERS_ENV)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{ICE_SERVERS_ENV} is not valid JSON: {exc}") from None
    if isinstance(value, dict):
        value = value.get("iceServers", [value])
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        raise ConfigurationError(f"{ICE_SERVERS_ENV} must be a JSON list of ICE server objects")
    return value


def host_addresses(explicit: Sequence[str] | None) -> list[str] | None:
    """Local addresses to gather host candidates on; None means every interface."""
    if explicit is not None:
        return list(explicit)
    raw = os.environ.get(HOST_ADDRESSES_ENV, "").strip()
    return [a.strip() for a in raw.split(",") if a.strip()] or None
