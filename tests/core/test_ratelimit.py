"""core/ratelimit.py: per-key token buckets (fake clock)."""

from __future__ import annotations

import pytest

from backchannel.core.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_burst_then_limited(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=2, burst=5, clock=clock)
    assert limiter.enabled
    assert [limiter.check("a") for _ in range(5)] == [0.0] * 5
    assert limiter.check("a") == pytest.approx(0.5)
    # Refused checks take nothing: the wait does not grow while being refused.
    assert limiter.check("a") == pytest.approx(0.5)
    # Keys are independent.
    assert limiter.check("b") == 0.0


def test_refill_rate(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=4, burst=2, clock=clock)
    assert limiter.check("a") == limiter.check("a") == 0.0
    assert limiter.check("a") > 0
    clock.now += 0.125  # half a token: not yet
    assert limiter.check("a") == pytest.approx(0.125)
    clock.now += 0.125  # one token
    assert limiter.check("a") == 0.0
    assert limiter.check("a") > 0
    # A long pause refills up to the burst, not beyond.
    clock.now += 3600
    assert [limiter.check("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.check("a") > 0
    # A sustained rate of exactly `rate` per second is allowed.
    for _ in range(20):
        clock.now += 0.25
        assert limiter.check("a") == 0.0


def test_retry_after(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=0.5, burst=1, clock=clock)
    assert limiter.check("a") == 0.0
    wait = limiter.check("a")
    assert wait == pytest.approx(2.0)
    assert RateLimiter.retry_after(wait) == 2
    clock.now += 1.5
    wait = limiter.check("a")
    assert wait == pytest.approx(0.5)
    assert RateLimiter.retry_after(wait) == 1
    clock.now += wait
    assert limiter.check("a") == 0.0


@pytest.mark.parametrize(
    ("wait", "header"), [(0.001, 1), (0.5, 1), (1.0, 1), (1.0001, 2), (2.5, 3), (60.0, 60)]
)
def test_retry_after_rounds_up_to_whole_seconds(wait: float, header: int) -> None:
    assert RateLimiter.retry_after(wait) == header


def test_rate_zero_disables(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=0, burst=1, clock=clock)
    assert not limiter.enabled
    assert all(limiter.check("a") == 0.0 for _ in range(1000))
    assert all(limiter.check(f"k{i}") == 0.0 for i in range(1000))
    assert len(limiter) == 0  # nothing is tracked


def test_memory_is_bounded_by_forgetting_idle_keys(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=1, burst=2, clock=clock, max_keys=3)
    # One request per key, from ever new keys, one second apart: every older key has
    # refilled by the time the next one arrives, so it is forgotten.
    for i in range(1000):
        assert limiter.check(f"k{i}") == 0.0
        assert len(limiter) <= 4
        clock.now += 1.0
    assert len(limiter) <= 4


def test_busy_keys_are_never_forgotten(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=1, burst=2, clock=clock, max_keys=3)
    for key in ("busy1", "busy2"):
        assert limiter.check(key) == limiter.check(key) == 0.0
        assert limiter.check(key) > 0
    assert limiter.check("idle") == 0.0
    clock.now += 1.0  # "idle" is full again (2 tokens), the busy ones have 1
    assert limiter.check("new") == 0.0  # a 4th key: over max_keys, idle keys go
    assert len(limiter) == 3
    # The busy keys kept their state: one token each, not a fresh burst of two.
    for key in ("busy1", "busy2"):
        assert limiter.check(key) == 0.0
        assert limiter.check(key) > 0
    # The forgotten key lost nothing: it starts again with a full burst.
    assert limiter.check("idle") == limiter.check("idle") == 0.0
    assert limiter.check("idle") > 0


def test_no_forgetting_at_or_below_max_keys(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=1, burst=2, clock=clock, max_keys=3)
    for key in ("a", "b", "c"):
        limiter.check(key)
    clock.now += 100
    limiter.check("a")
    assert len(limiter) == 3


def test_a_flood_of_busy_keys_stays_bounded(clock: FakeClock) -> None:
    limiter = RateLimiter(rate=1, burst=1, clock=clock, max_keys=100)
    for i in range(10_000):
        assert limiter.check(f"flood{i}") == 0.0  # each new key spends its only token
        assert len(limiter) <= 101
