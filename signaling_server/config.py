"""Settings of one signaling server instance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from signaling_server.ice import validate_ice_servers, validate_turn_urls
from signaling_server.ratelimit import parse_networks

LOOPBACK = ("127.0.0.0/8", "::1/128")
"""This host. Behind a same-host reverse proxy every client comes from here, so
per-client caps would bind all clients together; they are waived for it by default."""

MAILBOX_MESSAGE_LIMIT = 512 * 1024
"""Largest mailbox message the server can ever be set to accept, in bytes: any one message
must fit, base64-encoded, in one fetch response, and clients read at most 1 MiB of one."""
_SQLITE_PREFIX = "sqlite://"

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
    "mailbox_ttl",
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
    "mailbox_max_message_bytes",
    "mailbox_max_messages_per_recipient",
    "mailbox_max_bytes_per_recipient",
    "mailbox_max_messages_per_client",
    "mailbox_max_bytes_per_client",
    "mailbox_max_messages",
    "mailbox_max_bytes",
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
    mailbox_state: str = "memory"
    """Where mailbox messages live: "memory", or "sqlite:///absolute/path.sqlite" (survives
    restarts; one server instance per file)."""
    mailbox_ttl: float = 7 * 86400.0
    """Seconds a mailbox message is held (unless its recipient deletes it sooner)."""
    mailbox_max_message_bytes: int = MAILBOX_MESSAGE_LIMIT
    """Largest envelope accepted, in bytes (at most MAILBOX_MESSAGE_LIMIT)."""
    mailbox_max_messages_per_recipient: int = 256
    """Messages held for one recipient; more get HTTP 507 until it deletes some."""
    mailbox_max_bytes_per_recipient: int = 64 * 1024 * 1024
    """Envelope bytes held for one recipient; more get HTTP 507 until it deletes some."""
    mailbox_max_messages_per_client: int = 256
    """Live messages one client address (IPv4, or IPv6 /64) may have posted (429 above it)."""
    mailbox_max_bytes_per_client: int = 64 * 1024 * 1024
    """Live envelope bytes one client address may have posted (429 above it)."""
    mailbox_max_messages: int = 100_000
    """Messages held, all recipients together (503 when full)."""
    mailbox_max_bytes: int = 1024 * 1024 * 1024
    """Envelope bytes held, all recipients together (503 when full)."""

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
        self._check_mailbox()

    def _check_mailbox(self) -> None:
        mailbox_state_path(self.mailbox_state)  # raises ValueError on a bad spec
        if self.mailbox_max_message_bytes > MAILBOX_MESSAGE_LIMIT:
            raise ValueError(
                f"mailbox_max_message_bytes must be <= {MAILBOX_MESSAGE_LIMIT}: a message "
                "must fit in one fetch response, which clients read up to 1 MiB"
            )
        for name in ("mailbox_max_bytes_per_recipient", "mailbox_max_bytes_per_client"):
            if getattr(self, name) < self.mailbox_max_message_bytes:
                raise ValueError(f"{name} must be >= mailbox_max_message_bytes")
        if self.mailbox_max_bytes < self.mailbox_max_message_bytes:
            raise ValueError("mailbox_max_bytes must be >= mailbox_max_message_bytes")


def mailbox_state_path(spec: str) -> str | None:
    """The SQLite file a `mailbox_state` spec names, None for "memory"; ValueError if the
    spec is neither "memory" nor "sqlite:///absolute/path" (no "..", no query)."""
    if spec == "memory":
        return None
    spec = spec if isinstance(spec, str) else repr(spec)
    path = spec[len(_SQLITE_PREFIX) :]
    parts = PurePosixPath(path).parts
    if (
        not spec.startswith(_SQLITE_PREFIX)
        or not path.startswith("/")
        or path.endswith("/")
        or len(parts) < 2
        or ".." in parts
        or any(c in path for c in "?#")
        or not path.isprintable()
    ):
        raise ValueError(
            f"the mailbox state must be memory or sqlite:///absolute/path.sqlite, "
            f"not {spec[:200]!r}"
        )
    return path
