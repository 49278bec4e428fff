"""Tests of the platform-neutral token buckets, driven by a hand-moved clock."""

from __future__ import annotations

import asyncio
import math

import pytest

from imrelay.platforms._ratelimit import BucketSet, TokenBucket, bucket_params


class ManualTime:
    """A clock that only moves when the test calls :meth:`advance`; sleepers wake on time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, future))
        await future

    async def settle(self) -> None:
        """Let every runnable task run until it blocks again."""
        for _ in range(20):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move the clock, wake the sleepers that are due, let them run."""
        self.now += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self.now + 1e-9]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self.now + 1e-9]
        for _, future in due:
            if not future.done():
                future.set_result(None)
        await self.settle()


class AutoTime:
    """A clock whose ``sleep`` moves time forward at once (for sequential scenarios)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay
        await asyncio.sleep(0)


def bucket(time_: ManualTime | AutoTime, rate: float, burst: float) -> TokenBucket:
    return TokenBucket(rate, burst, clock=time_.clock, sleep=time_.sleep)


def test_bucket_params_fill_the_limit_exactly() -> None:
    """Burst plus rate over the window equals the limit; the burst is clamped to [1, limit]."""
    assert bucket_params(20, 60.0, burst=10) == (10 / 60, 10)
    assert bucket_params(20, 1.0, burst=1) == (19.0, 1)
    assert bucket_params(20, 60.0, burst=50) == (20 / 60, 20)  # burst clamped to the limit
    assert bucket_params(20, 60.0, burst=0) == (19 / 60, 1)
    rate, burst = bucket_params(1, 60.0, burst=5)
    assert (rate, burst) == (1 / 60, 1)
    rate, burst = bucket_params(0.5, 1.0)
    assert (rate, burst) == (0.5, 1)
    for limit, window, want_burst in [(7, 60.0, 3), (100, 60.0, 50), (3.5, 1.0, 1)]:
        rate, burst = bucket_params(limit, window, burst=want_burst)
        assert math.isclose(burst + rate * window, limit)


@pytest.mark.parametrize(("limit", "window"), [(0, 1.0), (-1, 1.0), (5, 0.0), (math.inf, 1.0)])
def test_bucket_params_rejects_non_positive(limit: float, window: float) -> None:
    """A limit or window that is not a positive finite number is refused."""
    with pytest.raises(ValueError, match="positive"):
        bucket_params(limit, window)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (math.nan, 1), (1, 0.5), (1, 0)])
def test_token_bucket_rejects_bad_arguments(rate: float, burst: float) -> None:
    """A non-positive rate or a burst below one is refused at construction."""
    with pytest.raises(ValueError, match=r"rate_per_s|burst"):
        TokenBucket(rate, burst)


async def test_token_bucket_token_at_hand_is_no_wait_on_the_real_clock() -> None:
    """With a token there, ``acquire`` reports 0.0 exactly, not the clock's tick between two
    readings (the connector counts any wait above zero as throttling)."""
    b = TokenBucket(1000.0, 50)
    assert [await b.acquire() for _ in range(20)] == [0.0] * 20


async def test_token_bucket_burst_then_rate() -> None:
    """A full bucket hands out its burst at once, then one token per 1/rate seconds."""
    t = AutoTime()
    b = bucket(t, rate=2.0, burst=3)
    assert [await b.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await b.acquire() == pytest.approx(0.5)
    assert await b.acquire() == pytest.approx(0.5)
    assert t.now == pytest.approx(1001.0)


async def test_token_bucket_refill_is_capped_at_burst() -> None:
    """Idle time refills the bucket, never beyond its burst."""
    t = AutoTime()
    b = bucket(t, rate=1.0, burst=2)
    await b.acquire()
    await b.acquire()
    assert b.tokens == pytest.approx(0.0)
    t.now += 0.5
    assert b.tokens == pytest.approx(0.5)
    t.now += 100
    assert b.tokens == pytest.approx(2.0)
    assert b.idle
    assert "rate_per_s=1" in repr(b)


async def test_token_bucket_never_exceeds_the_window_bound() -> None:
    """Back-to-back sends never put more than burst + rate*T into any T-second window."""
    t = AutoTime()
    rate, burst = bucket_params(20, 60.0, burst=10)
    b = bucket(t, rate, burst)
    stamps = []
    for _ in range(100):
        await b.acquire()
        stamps.append(t.now)
    assert stamps[-1] - stamps[0] > 60 * 4  # it really was slowed down
    for i, start in enumerate(stamps):
        in_window = sum(1 for s in stamps[i:] if s < start + 60.0 - 1e-9)
        assert in_window <= 20


async def test_token_bucket_serves_waiters_in_arrival_order() -> None:
    """Waiters get tokens first come, first served, and a newcomer never overtakes them."""
    t = ManualTime()
    b = bucket(t, rate=1.0, burst=1)
    order: list[str] = []

    async def take(name: str) -> None:
        await b.acquire()
        order.append(name)

    tasks = [asyncio.create_task(take(f"w{i}")) for i in range(4)]
    await t.settle()
    assert order == ["w0"]
    assert b.waiters == 3
    await t.advance(1.0)
    assert order == ["w0", "w1"]
    # A token has accrued for w2 (asleep); a newcomer arriving now must queue behind w2 and w3.
    await t.advance(0.5)
    late = asyncio.create_task(take("late"))
    await t.advance(0.5)
    assert order == ["w0", "w1", "w2"]
    await t.advance(1.0)
    await t.advance(1.0)
    assert order == ["w0", "w1", "w2", "w3", "late"]
    await asyncio.gather(*tasks, late)
    assert b.waiters == 0


async def test_token_bucket_acquire_reports_time_waited() -> None:
    """acquire() returns how long the caller waited, including time queued behind others."""
    t = ManualTime()
    b = bucket(t, rate=2.0, burst=1)
    first = asyncio.create_task(b.acquire())
    second = asyncio.create_task(b.acquire())
    third = asyncio.create_task(b.acquire())
    await t.settle()
    for _ in range(4):
        await t.advance(0.5)
    assert await first == 0.0
    assert await second == pytest.approx(0.5)
    assert await third == pytest.approx(1.0)


async def test_token_bucket_penalize_blocks_everyone_until_the_deadline() -> None:
    """After penalize(s) nobody gets a token for s seconds, then one token, then the rate."""
    t = AutoTime()
    b = bucket(t, rate=4.0, burst=5)
    b.penalize(2.0)
    assert b.tokens == 0.0
    assert b.blocked_until == pytest.approx(1002.0)
    assert not b.idle
    assert await b.acquire() == pytest.approx(2.0)
    assert await b.acquire() == pytest.approx(0.25)  # no burst released after a penalty


async def test_token_bucket_penalize_extends_but_never_shortens() -> None:
    """A longer penalty extends the current one; a shorter or non-positive one is ignored."""
    t = AutoTime()
    b = bucket(t, rate=1.0, burst=1)
    b.penalize(5.0)
    b.penalize(1.0)
    b.penalize(0.0)
    b.penalize(-3.0)
    b.penalize(math.nan)
    assert b.blocked_until == pytest.approx(1005.0)
    b.penalize(10.0)
    assert b.blocked_until == pytest.approx(1010.0)
    assert math.isinf(bucket(t, 1.0, 1).blocked_until)


async def test_token_bucket_penalty_reaches_a_sleeping_waiter() -> None:
    """A waiter already asleep for a token re-checks and also waits out a new penalty."""
    t = ManualTime()
    b = bucket(t, rate=1.0, burst=1)
    await b.acquire()
    waiter = asyncio.create_task(b.acquire())
    await t.settle()
    b.penalize(3.0)
    await t.advance(1.0)
    assert not waiter.done()
    await t.advance(2.0)
    assert await waiter == pytest.approx(3.0)


async def test_token_bucket_cancelled_waiter_gives_up_its_turn() -> None:
    """Cancelling a queued caller lets the next one proceed and leaves no waiter behind."""
    t = ManualTime()
    b = bucket(t, rate=1.0, burst=1)
    await b.acquire()
    first = asyncio.create_task(b.acquire())
    second = asyncio.create_task(b.acquire())
    await t.settle()
    first.cancel()
    await t.settle()
    await t.advance(1.0)
    assert await second == pytest.approx(1.0)
    assert first.cancelled()
    assert b.waiters == 0


async def test_bucket_set_one_bucket_per_key() -> None:
    """The same key gives the same bucket; different keys have independent buckets."""
    t = AutoTime()
    buckets = BucketSet(lambda: bucket(t, 1.0, 1), max_keys=10)
    a = buckets.get("a")
    assert buckets.get("a") is a
    assert buckets.get("b") is not a
    assert "a" in buckets
    assert len(buckets) == 2
    await a.acquire()
    assert buckets.get("b").tokens == 1.0


async def test_bucket_set_forgets_idle_buckets_first() -> None:
    """Beyond max_keys an idle bucket goes before a recently drained one, even if newer."""
    t = AutoTime()
    buckets = BucketSet(lambda: bucket(t, 1.0, 2), max_keys=2)
    drained = buckets.get("drained")
    await drained.acquire()
    buckets.get("idle")
    buckets.get("new")
    assert "drained" in buckets
    assert "idle" not in buckets
    assert "new" in buckets
    t.now += 10  # now "drained" has refilled: it is idle and least recently used
    buckets.get("newer")
    assert "drained" not in buckets
    assert len(buckets) == 2


async def test_bucket_set_never_forgets_a_bucket_with_waiters() -> None:
    """When no bucket is idle, the oldest without waiters goes; with waiters everywhere, none."""
    t = ManualTime()
    buckets = BucketSet(lambda: bucket(t, 1.0, 1), max_keys=1)
    busy = buckets.get("busy")
    await busy.acquire()
    waiter = asyncio.create_task(busy.acquire())
    await t.settle()
    drained = buckets.get("drained")  # over the limit, but "busy" has a waiter
    assert "busy" in buckets
    assert "drained" in buckets
    await drained.acquire()
    buckets.get("third")  # "drained" is not idle but nobody waits on it: it goes
    assert "drained" not in buckets
    assert "busy" in buckets
    await t.advance(1.0)
    await waiter
    with pytest.raises(ValueError, match="max_keys"):
        BucketSet(lambda: bucket(t, 1.0, 1), max_keys=0)
