"""Tests for the adaptive concurrency limit: slots, the controller, the probe on a real loop."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from imrelay.concurrency import AdaptiveLimit

TIMEOUT_FACTOR = float(os.environ.get("IMRELAY_TESTS_TIMEOUT_FACTOR", "1"))


async def spin(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def hold(limit: AdaptiveLimit, order: list[int], n: int, release: asyncio.Event) -> None:
    async with limit:
        order.append(n)
        await release.wait()


# -- slots ------------------------------------------------------------------------------------


async def test_slots_are_bounded_by_the_limit_and_handed_out_in_order() -> None:
    limit = AdaptiveLimit(2)
    release = asyncio.Event()
    order: list[int] = []
    tasks = [asyncio.create_task(hold(limit, order, n, release)) for n in range(5)]
    await spin()
    assert order == [0, 1]
    assert (limit.inflight, limit.waiting) == (2, 3)
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert (limit.inflight, limit.waiting) == (0, 0)


async def test_a_newcomer_does_not_overtake_the_queue() -> None:
    limit = AdaptiveLimit(1)
    await limit.acquire()
    order: list[int] = []
    release = asyncio.Event()
    first = asyncio.create_task(hold(limit, order, 1, release))
    await spin()
    limit.release()  # the slot goes to the waiter, not to whoever asks next
    second = asyncio.create_task(hold(limit, order, 2, release))
    await spin()
    assert order == [1]
    release.set()
    await asyncio.gather(first, second)
    assert order == [1, 2]


async def test_cancelled_waiter_leaves_the_queue() -> None:
    limit = AdaptiveLimit(1)
    await limit.acquire()
    waiter = asyncio.create_task(limit.acquire())
    await spin()
    assert limit.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (limit.inflight, limit.waiting) == (1, 0)
    limit.release()
    assert limit.inflight == 0


async def test_waiter_cancelled_after_it_was_handed_a_slot_gives_it_back() -> None:
    limit = AdaptiveLimit(1)
    await limit.acquire()
    waiter = asyncio.create_task(limit.acquire())
    behind = asyncio.create_task(limit.acquire())
    await spin()
    limit.release()  # hands the slot to `waiter`, which has not run yet
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(behind, 1)  # the slot moved on to the next in line
    assert (limit.inflight, limit.waiting) == (1, 0)


async def test_cancelled_waiter_a_release_already_skipped() -> None:
    limit = AdaptiveLimit(1)
    await limit.acquire()
    waiter = asyncio.create_task(limit.acquire())
    await spin()
    waiter.cancel()
    await asyncio.sleep(0)  # the future is cancelled; the task has not handled it yet
    limit.release()  # skips the cancelled waiter
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (limit.inflight, limit.waiting) == (0, 0)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="ceiling"):
        AdaptiveLimit(0)
    with pytest.raises(ValueError, match="lag_target_s"):
        AdaptiveLimit(4, lag_target_s=-1)
    with pytest.raises(ValueError, match="interval_s"):
        AdaptiveLimit(4, interval_s=0.1, window_s=0.05)
    with pytest.raises(ValueError, match="core_share"):
        AdaptiveLimit(4, core_share=0)


# -- the controller (one window at a time) --------------------------------------------------


async def busy_limit(ceiling: int, inflight: int) -> AdaptiveLimit:
    limit = AdaptiveLimit(ceiling, lag_target_s=0.002, floor=4)
    for _ in range(inflight):
        await limit.acquire()
    return limit


async def test_lag_of_a_saturated_process_cuts_to_a_share_of_the_messages_in_flight() -> None:
    limit = await busy_limit(256, 100)
    limit.observe(0.0022, busy=0.97)  # just over the target: three quarters at most
    assert limit.limit == 75
    assert limit.cuts == 1


async def test_the_cut_follows_how_far_the_lag_is_over_the_target() -> None:
    limit = await busy_limit(256, 100)
    limit.observe(0.003, busy=0.95)  # 1.5x the target: two thirds
    assert limit.limit == 66


async def test_a_large_lag_cuts_to_half_at_most() -> None:
    limit = await busy_limit(256, 100)
    limit.observe(0.050, busy=1.0)
    assert limit.limit == 50


async def test_no_second_cut_until_the_first_took_effect() -> None:
    limit = await busy_limit(256, 100)
    limit.observe(0.010, busy=1.0)
    assert limit.limit == 50
    limit.observe(0.010, busy=1.0)  # 100 still in flight: no new cut
    assert (limit.limit, limit.cuts) == (50, 1)
    for _ in range(50):
        limit.release()
    limit.observe(0.010, busy=1.0)
    assert (limit.limit, limit.cuts) == (25, 2)


async def test_the_limit_never_drops_below_the_floor() -> None:
    limit = await busy_limit(256, 6)
    limit.observe(0.100, busy=1.0)
    assert limit.limit == 4
    for _ in range(2):
        limit.release()
    limit.observe(0.100, busy=1.0)
    assert (limit.limit, limit.cuts) == (4, 1)


async def test_lag_of_an_idle_process_is_not_ours_and_does_not_cut() -> None:
    limit = await busy_limit(256, 100)
    limit.observe(0.050, busy=0.3)  # the host or another process was slow, not the pipelines
    assert limit.limit == 256


async def test_under_a_cpu_quota_saturation_is_measured_against_the_quota() -> None:
    """A container with half a core is saturated at half a core: its lag is its own."""
    limit = AdaptiveLimit(256, lag_target_s=0.002, core_share=0.5)
    for _ in range(100):
        await limit.acquire()
    limit.observe(0.010, busy=0.4)  # well below its half core: not saturated
    assert limit.limit == 256
    limit.observe(0.010, busy=0.48)
    assert limit.limit == 50


async def test_lag_while_not_saturated_neither_cuts_nor_raises() -> None:
    """Lag the process did not cause (the host, a CPU quota's throttling) changes nothing."""
    limit = await busy_limit(256, 100)
    limit.observe(0.010, busy=1.0)
    assert limit.limit == 50
    for _ in range(60):
        limit.release()
    limit.observe(0.050, busy=0.2)
    assert limit.limit == 50
    limit.observe(0.0015, busy=0.2)  # within the target and not saturated: it rises
    assert limit.limit == 56


def test_under_a_cpu_quota_the_window_spans_two_scheduler_periods() -> None:
    assert AdaptiveLimit(8).window_s == 0.05
    assert AdaptiveLimit(8, core_share=0.5).window_s == 0.2


async def test_the_limit_climbs_back_to_the_ceiling_and_wakes_waiters() -> None:
    limit = await busy_limit(64, 40)
    limit.observe(0.010, busy=1.0)
    assert limit.limit == 20
    for _ in range(30):
        limit.release()  # 10 in flight now
    waiters = [asyncio.create_task(limit.acquire()) for _ in range(30)]
    await spin()
    assert limit.inflight == 20  # ten of them got a slot
    seen = [limit.limit]
    while limit.limit < 64:
        limit.observe(0.0005, busy=1.0)  # lag well under the target
        seen.append(limit.limit)
    assert seen[:3] == [20, 22, 24]  # an eighth, at least one
    await spin()
    assert all(w.done() for w in waiters)
    assert limit.inflight == 40


async def test_between_half_and_the_whole_target_the_limit_holds() -> None:
    limit = await busy_limit(256, 100)
    limit.observe(0.010, busy=1.0)
    limit.observe(0.0015, busy=1.0)
    assert limit.limit == 50


async def test_stop_returns_the_limit_to_the_ceiling() -> None:
    limit = await busy_limit(64, 40)
    limit.observe(0.010, busy=1.0)
    assert limit.limit == 20
    limit.stop()
    assert limit.limit == 64


# -- the probe on a real loop ----------------------------------------------------------------


async def test_without_a_target_the_probe_does_not_run() -> None:
    limit = AdaptiveLimit(8, lag_target_s=0)
    limit.start()
    await asyncio.sleep(0.05)
    assert (limit.limit, limit.lag_s, limit.cuts) == (8, 0.0, 0)
    limit.stop()


async def test_a_saturated_loop_lowers_the_limit_and_an_idle_one_restores_it() -> None:
    """32 tasks each burn 1 ms of CPU per loop turn: the loop lags ~32 ms a turn, then less."""
    # core_share 0.5: the burners count as saturating at half a core, so a busy CI host
    # that takes some of this core from the test does not keep the limit up
    limit = AdaptiveLimit(32, lag_target_s=0.002, floor=2, core_share=0.5)
    limit.start()
    stop = asyncio.Event()

    async def burner() -> None:
        while not stop.is_set():
            async with limit:  # the slot is held across loop turns, as a pipeline holds it
                for _ in range(2):
                    end = time.process_time() + 0.001
                    while time.process_time() < end:
                        pass
                    await asyncio.sleep(0)

    tasks = [asyncio.create_task(burner()) for _ in range(32)]
    try:
        deadline = time.monotonic() + 5 * TIMEOUT_FACTOR
        while limit.limit > 16 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert limit.limit <= 16, f"the limit stayed at {limit.limit}"
        assert limit.cuts >= 1
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    deadline = time.monotonic() + 5 * TIMEOUT_FACTOR
    while limit.limit < 32 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert limit.limit == 32
    limit.stop()
