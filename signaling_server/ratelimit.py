"""Per-client limits: a token bucket on request rate, a cap on concurrent long-polls.

A "client" is what `address_key` makes of its address: an IPv4 address as it is, an
IPv6 address by its /64 prefix (one host usually owns a whole /64 and could rotate
through it), an IPv4-mapped IPv6 address as the IPv4 address it maps.
`in_networks` tells whether an address is in networks exempt from some limits.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address (an IPv4-mapped IPv6 one as IPv4), None if it is not one."""
    try:
        ip = ipaddress.ip_address((host or "").split("%", 1)[0])  # drop a zone ("%eth0")
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_key(host: str | None) -> str:
    """The key per-client limits count `host` against: IPv4 address, or IPv6 /64 prefix."""
    ip = _ip(host)
    if ip is None:
        return host or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def parse_networks(specs: Iterable[str]) -> list[Network]:
    """Networks from strings like "127.0.0.0/8" or "::1"; ValueError names a bad one."""
    networks = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP network: {spec!r}") from None
    return networks


def in_networks(host: str | None, networks: Iterable[Network]) -> bool:
    """Whether `host` is an IP address inside one of `networks`."""
    ip = _ip(host)
    return ip is not None and any(ip in net for net in networks)


class RateLimiter:
    """Token buckets keyed by client (remote IP), at most `max_clients` of them.

    A bucket holds up to `burst` tokens and refills at `rate` per second; each request
    takes one. The least recently seen clients are forgotten first, which only ever
    gives a forgotten client a full bucket again.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def acquire(self, key: str) -> float:
        """Take a token for `key`: 0.0 if allowed, else the seconds until one is free."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        retry_after = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            retry_after = (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return retry_after

    def __len__(self) -> int:
        return len(self._buckets)


class ConcurrencyLimiter:
    """Counts what each client has in flight; the map holds only clients with something open."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: dict[str, int] = {}

    def try_acquire(self, key: str) -> bool:
        """Open one for `key` if under the limit; pair every True with `release`."""
        count = self._open.get(key, 0)
        if count >= self._limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)
