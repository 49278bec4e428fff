"""The per-key token bucket: burst, refill, no charge when refused, bounded memory."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from imrelay.security.ratelimit import KeyedLimiter, RateLimitRule, RateLimitSettings


class Clock:
    """Monotonic seconds moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ratelimit_burst_then_refill() -> None:
    """A new key may send ``burst`` at once, then one more per 1/rate seconds."""
    clock = Clock()
    limiter = KeyedLimiter(rate=0.5, burst=3, clock=clock)
    assert [limiter.acquire("u") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("u") == pytest.approx(2.0)
    clock.now += 1.0
    assert limiter.wait_time("u") == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.acquire("u") == 0.0
    assert limiter.acquire("u") == pytest.approx(2.0)


def test_ratelimit_refused_requests_are_not_charged() -> None:
    """Refused attempts take nothing, so a flood does not push the next allowance back."""
    clock = Clock()
    limiter = KeyedLimiter(rate=1.0, burst=1, clock=clock)
    assert limiter.acquire("u") == 0.0
    for _ in range(100):
        assert limiter.acquire("u") > 0
    clock.now += 1.0
    assert limiter.acquire("u") == 0.0


def test_ratelimit_keys_are_independent_and_capped_at_burst() -> None:
    """One key's flood does not touch another's bucket; idle time never exceeds burst."""
    clock = Clock()
    limiter = KeyedLimiter(rate=1.0, burst=2, clock=clock)
    limiter.take("a", 2)
    assert limiter.wait_time("a") > 0
    assert limiter.wait_time("b") == 0.0
    clock.now += 1000
    assert [limiter.acquire("a") for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.wait_time("a") > 0


def test_ratelimit_take_may_go_negative() -> None:
    """``take`` charges unconditionally; the debt is repaid before the next token."""
    clock = Clock()
    limiter = KeyedLimiter(rate=1.0, burst=1, clock=clock)
    limiter.take("a", 3)
    assert limiter.wait_time("a") == pytest.approx(3.0)


def test_ratelimit_full_buckets_are_forgotten() -> None:
    """Buckets that have refilled are dropped, so memory holds recent senders only."""
    clock = Clock()
    limiter = KeyedLimiter(rate=1.0, burst=2, clock=clock)
    for n in range(50):
        limiter.take(f"k{n}")
    assert len(limiter) == 50
    clock.now += 1.0  # each took one token: full again after 1 s
    limiter.take("fresh", 0)  # a free take leaves its bucket full: nothing worth keeping
    assert len(limiter) == 0
    limiter.take("fresh")
    assert len(limiter) == 1


def test_ratelimit_max_keys_bounds_memory() -> None:
    """Past max_keys the least recently used bucket is forgotten (it starts full again)."""
    clock = Clock()
    limiter = KeyedLimiter(rate=0.001, burst=1, clock=clock, max_keys=3)
    for key in ("a", "b", "c", "d"):
        limiter.take(key)
    assert len(limiter) == 3
    assert limiter.wait_time("a") == 0.0  # forgotten
    assert limiter.wait_time("d") > 0


def test_ratelimit_invalid_shapes_are_refused() -> None:
    """A zero rate, a burst below one or no room for keys is a programming error."""
    for kwargs in ({"rate": 0, "burst": 1}, {"rate": 1, "burst": 0}):
        with pytest.raises(ValueError, match="rate must be positive"):
            KeyedLimiter(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate must be positive"):
        KeyedLimiter(rate=1, burst=1, max_keys=0)


def test_ratelimit_from_rule_and_settings() -> None:
    """A rule's per-minute rate becomes tokens per second; settings validate their fields."""
    clock = Clock()
    limiter = KeyedLimiter.from_rule(
        RateLimitRule(per_minute=6, burst=1), clock=clock, max_keys=10
    )
    assert limiter.acquire("u") == 0.0
    assert limiter.acquire("u") == pytest.approx(10.0)
    settings = RateLimitSettings()
    assert settings.per_user == RateLimitRule(per_minute=20, burst=10)
    assert settings.per_conversation == RateLimitRule(per_minute=60, burst=30)
    assert "{retry_after}" in settings.notice
    assert RateLimitSettings.model_validate({"per_user": None}).per_user is None
    with pytest.raises(ValidationError):
        RateLimitRule(per_minute=0, burst=1)
    with pytest.raises(ValidationError):
        RateLimitSettings.model_validate({"per_user": {"per_minute": 1, "burst": 1, "x": 1}})


def test_ratelimit_is_fast() -> None:
    """A decision costs microseconds (it runs inline before any I/O)."""
    limiter = KeyedLimiter(rate=1000.0, burst=10)
    keys = [f"user:{n}" for n in range(1000)]
    started = time.perf_counter()
    for _ in range(20):
        for key in keys:
            limiter.acquire(key)
    per_call = (time.perf_counter() - started) / 20000
    assert per_call < 50e-6
