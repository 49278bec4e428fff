"""Token buckets that keep sends below a platform's rate limits (platform-neutral).

Theory of operation: a :class:`TokenBucket` holds up to ``burst`` tokens and gains
``rate_per_s`` tokens per second; every send takes one token, waiting for it when there is none.
Waiters are served strictly in arrival order (an :class:`asyncio.Lock` is FIFO: a newcomer never
overtakes a waiter), so under sustained pressure nobody starves. When the platform says "back
off" anyway (its own limit is lower than configured, or shared with other clients),
:meth:`TokenBucket.penalize` closes the bucket until the given time: nobody gets a token before
it, and afterwards the bucket restarts with a single token (one caller probes the platform) and
refills at its rate, rather than releasing a whole burst into a platform that just refused us.

A bucket with burst ``B`` and rate ``r`` lets at most ``B + r * T`` tokens out in any window of
``T`` seconds. :func:`bucket_params` derives the rate from a platform limit "``N`` per
``window`` seconds" and a chosen burst so that this bound equals ``N``.

:class:`BucketSet` keeps one bucket per key (e.g. per conversation), bounded in size: beyond
``max_keys`` the least recently used bucket that is full and unused is forgotten (a fresh bucket
behaves the same, so nothing is lost); failing that, the least recently used one nobody waits on.

Both clocks are injected: ``clock`` returns monotonic seconds and ``sleep`` waits, so tests can
drive time by hand.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

__all__ = ["BucketSet", "TokenBucket", "bucket_params"]


def bucket_params(limit: float, window_s: float, burst: int = 1) -> tuple[float, int]:
    """Return ``(rate_per_s, burst)`` keeping a bucket at ``limit`` sends per ``window_s``.

    The burst is clamped to ``[1, limit]``; the rate is what is left of the limit spread over
    the window, so that ``burst + rate * window_s == limit`` and no window of ``window_s``
    seconds ever carries more than ``limit`` sends. A bigger burst lets more sends go at once
    but leaves a slower sustained rate. When the limit is not above the burst (a limit of 1, or
    below) the rate is the limit itself and one window may carry one send more than ``limit``.

    Args:
        limit: sends allowed per window (positive).
        window_s: the window in seconds (positive).
        burst: how many sends may go at once.

    Returns:
        The refill rate in tokens per second and the bucket size.

    Raises:
        ValueError: a non-positive limit or window.
    """
    if not (math.isfinite(limit) and limit > 0 and math.isfinite(window_s) and window_s > 0):
        raise ValueError("limit and window must be positive numbers")
    burst = max(1, min(int(burst), int(limit)))
    spare = limit - burst
    rate = (spare if spare > 0 else limit) / window_s
    return rate, burst


class TokenBucket:
    """An asyncio token bucket with FIFO waiters and a "back off until" penalty.

    Args:
        rate_per_s: tokens gained per second (positive).
        burst: the bucket size, i.e. how many sends may go at once (at least 1).
        clock: monotonic seconds.
        sleep: waits the given number of seconds.

    Raises:
        ValueError: a non-positive rate or a burst below 1.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ValueError("rate_per_s must be a positive number")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError("burst must be at least 1")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._updated = clock()
        self._blocked_until = float("-inf")
        self._lock = asyncio.Lock()
        self._waiters = 0

    def __repr__(self) -> str:
        return f"TokenBucket(rate_per_s={self.rate_per_s:g}, burst={self.burst:g})"

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_per_s)
            self._updated = now

    @property
    def tokens(self) -> float:
        """Tokens available now (0 while a penalty lasts)."""
        now = self._clock()
        if now < self._blocked_until:
            return 0.0
        self._refill(now)
        return self._tokens

    @property
    def blocked_until(self) -> float:
        """The clock time before which no token is handed out (``-inf``: no penalty)."""
        return self._blocked_until

    @property
    def waiters(self) -> int:
        """How many callers are inside :meth:`acquire`."""
        return self._waiters

    @property
    def idle(self) -> bool:
        """Whether the bucket is full, unpenalized and unused (the same as a fresh one)."""
        return self._waiters == 0 and self.tokens >= self.burst

    async def acquire(self) -> float:
        """Take one token, waiting for it (behind earlier callers) when there is none.

        Returns:
            The seconds spent waiting (0.0 when a token was there at once).
        """
        started = self._clock()
        waited = self._waiters > 0 or self._lock.locked()  # behind earlier callers
        self._waiters += 1
        try:
            async with self._lock:
                while True:
                    now = self._clock()
                    if now < self._blocked_until:
                        delay = self._blocked_until - now
                    else:
                        self._refill(now)
                        if self._tokens >= 1.0:
                            self._tokens -= 1.0
                            # not the clock's own tick between two readings: that is no wait
                            return max(0.0, now - started) if waited else 0.0
                        delay = (1.0 - self._tokens) / self.rate_per_s
                    await self._sleep(delay)
                    waited = True
        finally:
            self._waiters -= 1

    def penalize(self, seconds: float) -> None:
        """Hand out no token for ``seconds`` from now (the platform asked us to back off).

        A later penalty extends an earlier one, never shortens it. When it ends, the bucket
        holds one token and refills at its rate from there.

        Args:
            seconds: how long to back off; non-positive or non-finite values are ignored.
        """
        if not (math.isfinite(seconds) and seconds > 0):
            return
        until = self._clock() + seconds
        if until <= self._blocked_until:
            return
        self._blocked_until = until
        self._tokens = min(1.0, self.burst)
        self._updated = until


class BucketSet:
    """One :class:`TokenBucket` per key, created on first use, at most ``max_keys`` kept.

    Args:
        factory: builds the bucket for a new key.
        max_keys: how many buckets to keep (at least 1); see the module docstring for which
            one is forgotten beyond that.

    Raises:
        ValueError: ``max_keys`` below 1.
    """

    def __init__(self, factory: Callable[[], TokenBucket], max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._factory = factory
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def get(self, key: Hashable) -> TokenBucket:
        """Return the bucket of ``key``, creating it (and maybe forgetting an old one)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket
        bucket = self._factory()
        self._buckets[key] = bucket
        if len(self._buckets) > self.max_keys:
            self._evict(keep=key)
        return bucket

    def _evict(self, keep: Hashable) -> None:
        """Forget one bucket: the oldest idle one, else the oldest nobody waits on."""
        fallback: list[Hashable] = []
        for key, bucket in self._buckets.items():
            if key == keep:
                continue
            if bucket.idle:
                del self._buckets[key]
                return
            if not fallback and bucket.waiters == 0:
                fallback.append(key)
        if fallback:
            del self._buckets[fallback[0]]
