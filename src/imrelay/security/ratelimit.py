"""Inbound rate limits: one token bucket per key (a user, a conversation), on an injected clock.

Theory of operation: a bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per
second; a message takes one token. A key's bucket is created full when the key is first seen.
Buckets are kept in an LRU map bounded by ``max_keys``: a bucket that has been idle long
enough to be full again carries no information and is dropped first, so the map only holds
keys that sent recently. If more than ``max_keys`` distinct keys are active at once, the least
recently used bucket is forgotten (that key starts full again): ``max_keys`` bounds memory
against a flood of distinct senders, at the price of leniency towards the oldest ones.

Everything here is synchronous and O(1) per call: it runs inline in the pipeline before any
I/O, so a flood is cut off without touching the store or the model. Limits are per process; a
deployment of N replicas admits up to N times the configured rate (see ``RateLimitSettings``).

This module is for *inbound* messages. Outbound sending limits (platform QPS, per-conversation
send rates) live in :mod:`imrelay.platforms._ratelimit` and are unrelated.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_NOTICE", "KeyedLimiter", "RateLimitRule", "RateLimitSettings"]

DEFAULT_NOTICE: Final = (
    "You are sending messages faster than I can answer them. "
    "Please wait about {retry_after} seconds and try again."
)


class RateLimitRule(BaseModel):
    """One token bucket shape: ``burst`` messages at once, refilled at ``per_minute``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_minute: float = Field(gt=0)
    burst: int = Field(ge=1)


class RateLimitSettings(BaseModel):
    """Inbound message limits (``security.rate_limit``).

    Attributes:
        enabled: apply the limits at all.
        per_user: the bucket of each sender (per platform); ``null`` disables it.
        per_conversation: the bucket of each conversation (a group or a direct chat).
        notice: sent once per ``notice_interval_s`` to a limited sender; ``{retry_after}`` is
            replaced with whole seconds. An empty notice limits silently.
        notice_interval_s: at most one notice per limited key within this many seconds.
        max_keys: buckets kept in memory per limiter (see the module docstring).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    per_user: RateLimitRule | None = Field(
        default_factory=lambda: RateLimitRule(per_minute=20, burst=10)
    )
    per_conversation: RateLimitRule | None = Field(
        default_factory=lambda: RateLimitRule(per_minute=60, burst=30)
    )
    notice: str = DEFAULT_NOTICE
    notice_interval_s: float = Field(60.0, ge=0)
    max_keys: int = Field(100_000, ge=1)


class KeyedLimiter:
    """A token bucket per key.

    Args:
        rate: tokens added per second.
        burst: bucket capacity (and the number of messages a new key may send at once).
        clock: monotonic seconds.
        max_keys: the most buckets kept (see the module docstring).
    """

    __slots__ = ("_buckets", "_clock", "_full_after", "burst", "max_keys", "rate")

    def __init__(
        self,
        *,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be positive, burst and max_keys at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        self._full_after = self.burst / rate
        # key -> (tokens, time of that count); most recently used last
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @classmethod
    def from_rule(
        cls, rule: RateLimitRule, *, clock: Callable[[], float] = time.monotonic, max_keys: int
    ) -> KeyedLimiter:
        """A limiter shaped by ``rule``."""
        return cls(rate=rule.per_minute / 60.0, burst=rule.burst, clock=clock, max_keys=max_keys)

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.burst
        tokens, at = entry
        return min(self.burst, tokens + max(now - at, 0.0) * self.rate)

    def wait_time(self, key: str, cost: float = 1.0) -> float:
        """Seconds until ``key`` could take ``cost`` tokens; 0.0 if it can now. Takes nothing."""
        missing = cost - self._tokens(key, self._clock())
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, key: str, cost: float = 1.0) -> None:
        """Take ``cost`` tokens from ``key`` unconditionally (the count may go negative)."""
        now = self._clock()
        tokens = self._tokens(key, now) - cost
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        self._prune(now)

    def acquire(self, key: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens if there are enough.

        Returns:
            0.0 if the tokens were taken, else the seconds until they would be (nothing taken).
        """
        wait = self.wait_time(key, cost)
        if wait == 0.0:
            self.take(key, cost)
        return wait

    def _prune(self, now: float) -> None:
        buckets = self._buckets
        # the oldest entries come first: drop those that have refilled completely
        while buckets:
            key, (tokens, at) = next(iter(buckets.items()))
            if len(buckets) <= self.max_keys and now - at < (self.burst - tokens) / self.rate:
                break
            del buckets[key]
