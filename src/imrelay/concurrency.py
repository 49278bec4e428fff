"""How many messages the worker processes at once: a ceiling, lowered while the event loop lags.

Theory of operation: one event loop serves the platforms' intake (Stream frames and their ACKs,
webhook requests), the HTTP surface (``/healthz``, ``/metrics``) and every message in flight.
asyncio runs ready callbacks first come, first served, so when hundreds of pipelines are ready
at once a single loop turn takes many milliseconds, and a webhook request, which needs several
turns and an inbox commit before its answer, waits for all of them each time: under overload
the platform's callbacks time out and are retried, and health checks fail, although the inbox
has room.

:class:`AdaptiveLimit` takes the place of a fixed semaphore. A probe runs every
``interval_s`` (10 ms) and measures how late the loop ran it (the loop lag). Every
``window_s`` (50 ms; at least 200 ms, two scheduler periods, under a CPU quota) the mean lag
of the window and the process's CPU share over it (CPU time over wall time) decide:

* lag above ``lag_target_s`` while the process used at least 90 % of what it may use
  (``core_share``: one core, or its CPU quota when that is less; then the lag is its own,
  not another process's or the host's): the limit drops to the messages in flight times
  ``lag_target_s / lag``, between a half and three quarters, never below ``floor``; and not
  again until the messages in flight have come down to the limit (a cut takes effect as
  pipelines finish, and cutting again before that would overshoot);
* the lag at most half the target, or at most the target while the process is below that
  share: the limit rises by an eighth (at least one), up to ``ceiling``. A lag above the
  target while the process is not saturated (the host, or a CPU quota's throttling) changes
  nothing.

Messages waiting for a slot are served in arrival order. A pipeline already running is never
interrupted: a message is only started later, and it waits in the inbox, where it already is.

With a model that takes its time, pipelines mostly wait on sockets, the process is not
saturated, and the limit stays at the ceiling. With a fast model and more messages than one
core can handle, the limit settles where the loop turns over in a few milliseconds: intake
answers in tens of milliseconds instead of hundreds, but each turn does less, and the highest
sustainable rate falls by 5–10 % (which is why the gateway's setting,
``pipeline.loop_lag_target_ms``, is off by default). ``lag_target_s = 0`` turns the probe off:
the limit is then the ceiling, as with a plain semaphore.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Final

__all__ = ["AdaptiveLimit"]

_DECREASE: Final = 0.75
_MIN_FACTOR: Final = 0.5
_BUSY: Final = 0.9  # share of its CPU (core_share) the process used for its lag to be its own


class AdaptiveLimit:
    """A concurrency limit between ``floor`` and ``ceiling`` that follows the event loop's lag.

    Use ``async with limit:`` around the work it bounds. :meth:`start` begins probing on the
    running loop and :meth:`stop` ends it; without :meth:`start` it is a fixed limit at
    ``ceiling``.
    """

    def __init__(
        self,
        ceiling: int,
        *,
        lag_target_s: float = 0.002,
        floor: int = 4,
        interval_s: float = 0.01,
        window_s: float = 0.05,
        core_share: float = 1.0,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        if ceiling < 1:
            raise ValueError("ceiling must be at least 1")
        if lag_target_s < 0 or interval_s <= 0 or window_s < interval_s:
            raise ValueError("need lag_target_s >= 0 and 0 < interval_s <= window_s")
        if not 0 < core_share <= 1:
            raise ValueError("core_share must be in (0, 1]")
        self.ceiling = ceiling
        self.floor = max(1, min(floor, ceiling))
        self.lag_target_s = lag_target_s
        self.interval_s = interval_s
        # under a CPU quota, a window shorter than the CFS period (100 ms) would see a burst
        # that used the period's quota, then a throttled stretch: use two periods
        self.window_s = window_s if core_share >= 1 else max(window_s, 0.2)
        self._busy = _BUSY * core_share
        self._window_start = 0.0
        self._lags = 0.0
        self._probes = 0
        self._cpu_clock = cpu_clock
        self._limit = ceiling
        self._inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._cpu = 0.0
        self.lag_s = 0.0
        """The lag the last probe measured (seconds); 0 while not probing."""
        self.cuts = 0
        """How many times the limit was lowered."""

    @property
    def limit(self) -> int:
        """How many messages may run at once now."""
        return self._limit

    @property
    def inflight(self) -> int:
        """How many hold a slot."""
        return self._inflight

    @property
    def waiting(self) -> int:
        """How many wait for a slot."""
        return len(self._waiters)

    # -- the slots ---------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait for a slot; slots are handed out in the order they were asked for."""
        if self._inflight < self._limit and not self._waiters:
            self._inflight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot, then cancelled
                self.release()
            else:  # still queued, unless a release already skipped it
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back."""
        self._inflight -= 1
        self._wake()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _wake(self) -> None:
        while self._waiters and self._inflight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._inflight += 1
                waiter.set_result(None)

    # -- the probe ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin probing the running loop (nothing happens when ``lag_target_s`` is 0)."""
        if self.lag_target_s <= 0 or self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        self._cpu = self._cpu_clock()
        self._window_start = loop.time()
        self._lags, self._probes = 0.0, 0
        self._schedule(loop)

    def stop(self) -> None:
        """Stop probing; the limit returns to the ceiling."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._limit = self.ceiling
        self.lag_s = 0.0
        self._wake()

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.interval_s
        self._timer = loop.call_at(self._due, self._probe, loop)

    def _probe(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        lag = max(now - self._due, 0.0)
        self.lag_s = lag
        self._lags += lag
        self._probes += 1
        if now - self._window_start >= self.window_s:
            cpu = self._cpu_clock()
            busy = (cpu - self._cpu) / (now - self._window_start)
            self.observe(self._lags / self._probes, busy)
            self._cpu, self._window_start = cpu, now
            self._lags, self._probes = 0.0, 0
        self._schedule(loop)

    def observe(self, lag_s: float, busy: float) -> None:
        """Adjust the limit to one window: the loop's mean lag and the process's CPU share."""
        if busy >= self._busy and lag_s > self.lag_target_s:
            if self._inflight <= self._limit:  # the previous cut has taken effect
                factor = max(_MIN_FACTOR, min(_DECREASE, self.lag_target_s / lag_s))
                lowered = max(self.floor, int(min(self._limit, self._inflight) * factor))
                if lowered < self._limit:
                    self._limit = lowered
                    self.cuts += 1
        elif (
            self._limit < self.ceiling
            and lag_s <= self.lag_target_s
            and (busy < self._busy or lag_s <= self.lag_target_s / 2)
        ):
            self._limit = min(self.ceiling, self._limit + max(1, self._limit // 8))
            self._wake()
