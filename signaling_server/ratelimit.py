"""Per-client limits: a token bucket on request rate, a cap on concurrent long-polls."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


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
