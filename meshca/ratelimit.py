"""Token-bucket rate limiting per key (an identity, a source address); pure: time comes from
an injected monotonic clock."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    """`rate` requests a second per key, bursts up to `burst`.

    `check(key)` returns 0.0 when the request may go on (and takes a token), or
    the seconds to wait before one would be allowed. Full, idle buckets are
    dropped when the table grows, so memory stays bounded by active keys.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def check(self, key: str) -> float:
        """Take one token for `key`; 0.0 if allowed, else seconds until the next token."""
        now = self._clock()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self._max_keys:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def peek(self, key: str) -> float:
        """Seconds until `key` would have a token (0.0: it has one now); takes nothing."""
        hit = self._buckets.get(key)
        if hit is None:
            return 0.0
        tokens, at = hit
        tokens = min(float(self.burst), tokens + (self._clock() - at) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}

    def __len__(self) -> int:
        return len(self._buckets)
