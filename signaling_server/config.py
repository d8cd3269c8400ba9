"""Settings of one signaling server instance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from signaling_server.ice import validate_ice_servers, validate_turn_urls
from signaling_server.ratelimit import parse_networks

LOOPBACK = ("127.0.0.0/8", "::1/128")
"""This host. Behind a same-host reverse proxy every client comes from here, so
per-client caps would bind all clients together; they are waived for it by default."""

_POSITIVE = (
    "ttl",
    "max_wait",
    "tombstone_ttl",
    "rate",
    "shutdown_timeout",
    "header_timeout",
    "body_timeout",
    "keepalive_timeout",
    "host_idle",
)
_AT_LEAST_ONE = (
    "max_body",
    "max_sdp",
    "max_entries",
    "max_entries_per_client",
    "burst",
    "max_clients",
    "max_connections",
    "max_connections_per_client",
    "max_offers_per_host",
)


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
    max_entries_per_client: int = 20
    """Live Duet IDs one client address (IPv4, or IPv6 /64) may hold at once (429 above it)."""
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
    max_connections: int = 1000
    """Open TCP connections, all clients together; more are closed at once."""
    max_connections_per_client: int = 32
    """Open TCP connections per client address (IPv4, or IPv6 /64); more are closed at once."""
    header_timeout: float = 10.0
    """Seconds a connection gets to send a whole request head, then it is closed (slowloris)."""
    body_timeout: float = 10.0
    """Seconds a request body gets to arrive once its head is in; then 408 and close."""
    keepalive_timeout: float = 5.0
    """Seconds an idle keep-alive connection stays open between requests."""
    exempt_networks: list[str] = field(default_factory=lambda: list(LOOPBACK))
    """Client networks free of the per-client offer quota and connection cap (this host)."""
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
    host_idle: float = 60.0
    """Seconds a standing host counts as online after its last wait for offers ended."""
    max_offers_per_host: int = 64
    """Offers waiting for one standing host (undelivered or unanswered); more get HTTP 503."""

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_waits_per_client < 0 or self.turn_ttl < 1:
            raise ValueError("max_waits_per_client must be >= 0 and turn_ttl >= 1")
        if isinstance(self.exempt_networks, str):
            raise ValueError("exempt_networks must be a list of networks, not one string")
        self.exempt_networks = [str(n) for n in parse_networks(self.exempt_networks)]
        self.ice_servers = validate_ice_servers(self.ice_servers)
        self.turn_urls = validate_turn_urls(self.turn_urls)
        if self.turn_secret and not self.turn_urls:
            raise ValueError("a TURN secret needs at least one TURN URL (--turn-urls)")
