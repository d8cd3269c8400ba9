"""Settings of one signaling server instance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from signaling_server.ice import validate_ice_servers, validate_turn_urls


@dataclass
class ServerConfig:
    """Limits and ICE settings of a signaling server; every field has a safe default."""

    ttl: float = 600.0
    """Seconds an offer (and its answer) lives after it was posted."""
    max_body: int = 65536
    """Largest request body accepted, in bytes (413 above it)."""
    max_sdp: int = 32768
    """Largest SDP accepted, in characters (400 above it)."""
    max_entries: int = 10_000
    """Live Duet IDs held at once (503 when full)."""
    max_wait: float = 30.0
    """Upper bound of one long-poll, in seconds, whatever the client asks."""
    tombstone_ttl: float = 3600.0
    """Seconds an expired ID is remembered, so the server can answer 410 instead of 404."""
    rate: float = 20.0
    """Requests per second allowed per client IP (token bucket refill rate)."""
    burst: int = 60
    """Requests a client may make at once before the rate applies."""
    max_clients: int = 10_000
    """Client IPs tracked by the rate limiter; the least recently seen are forgotten."""
    max_waits_per_client: int = 32
    """Concurrent long-polls allowed per client IP."""
    ice_servers: list[dict[str, Any]] = field(default_factory=list)
    """RTCIceServer-like dicts handed to clients as they are."""
    turn_secret: str | None = None
    """Shared secret with a TURN server (coturn `static-auth-secret`); enables TURN REST."""
    turn_urls: list[str] = field(default_factory=list)
    """turn:/turns: URLs the TURN REST credentials are valid for."""
    turn_ttl: int = 3600
    """Lifetime of a TURN REST credential, in seconds."""
    turn_label: str = "duet"
    """User part of TURN REST usernames (`<expiry>:<label>`)."""
    shutdown_timeout: float = 2.0
    """Seconds open requests get to finish when the server stops."""

    def __post_init__(self) -> None:
        for name in ("ttl", "max_wait", "tombstone_ttl", "rate", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("max_body", "max_sdp", "max_entries", "burst", "max_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_waits_per_client < 0 or self.turn_ttl < 1:
            raise ValueError("max_waits_per_client must be >= 0 and turn_ttl >= 1")
        self.ice_servers = validate_ice_servers(self.ice_servers)
        self.turn_urls = validate_turn_urls(self.turn_urls)
        if self.turn_secret and not self.turn_urls:
            raise ValueError("a TURN secret needs at least one TURN URL (--turn-urls)")
