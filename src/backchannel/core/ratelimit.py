"""Per-key token buckets (public tunnel requests per client IP)."""

from __future__ import annotations

import math

from backchannel.core.clock import Clock


class RateLimiter:
    """``rate`` requests per second per key, with bursts of up to ``burst``.

    Memory is bounded: when more than ``max_keys`` keys are tracked, the keys whose bucket
    has refilled completely (idle ones) are forgotten, which loses nothing.
    """

    def __init__(self, rate: float, burst: int, clock: Clock, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens left, monotonic time of that reading)
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        """False when the rate is 0 (no limit)."""
        return self.rate > 0

    def check(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when allowed, else the seconds until it would be."""
        if self.rate <= 0:
            return 0.0
        now = self._clock.monotonic()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self._max_keys:
                self._forget_idle(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> int:
        """``wait`` as a Retry-After value: whole seconds, at least 1."""
        return max(1, math.ceil(wait))

    def _forget_idle(self, now: float) -> None:
        full = [
            k
            for k, (tokens, then) in self._buckets.items()
            if tokens + (now - then) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        # A flood from more busy addresses than max_keys: forget the oldest tenth too, so
        # that the scan above runs once per max_keys/10 new keys, not on every request.
        if len(self._buckets) > self._max_keys:
            excess = len(self._buckets) - self._max_keys * 9 // 10
            for k in list(self._buckets)[:excess]:
                del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)
