"""The worker: takes messages from the inbox and runs the pipeline for them.

Theory of operation: :meth:`Worker.offer` is called by a connector in the order frames arrive.
It starts the inbox commit in a task, appends an entry holding that task to the message's
conversation queue *at once* (so order is fixed before any I/O), and returns a separate future
for the caller that resolves when the commit is done (``True``: new, ``False``: duplicate; the
commit's exception if it failed). The caller may stop waiting (cancel its future) without
affecting the worker, which only ever waits on its own commit task. One drain task per
conversation with queued entries takes them in order: it waits for the entry's commit, then runs
the pipeline under the global concurrency limit (:class:`~imrelay.concurrency.AdaptiveLimit`:
``max_concurrency``, lowered while the event loop lags). So one conversation is strictly sequential
while many conversations run at once.

``pending`` counts entries offered and not finished. When it reaches ``max_pending``,
:meth:`wait_capacity` blocks, and connectors stop reading (backpressure). At start-up
:meth:`resume` queues every message the inbox still holds as ``received`` or ``processing``
(a crash or a stop past the drain deadline cut them off), oldest first, except a message already
started ``max_attempts`` times without finishing: one that crashes the process would otherwise
crash every start after it, so the runner settles it ``failed`` (reason ``max_attempts``, nothing
sent) and the rest of its conversation goes on. :meth:`drain` waits for
in-flight and queued work up to a deadline, then cancels what is left; those messages stay in
the inbox and are resumed by the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from imrelay.concurrency import AdaptiveLimit
from imrelay.message import ConversationKey, InboundMessage
from imrelay.observability.metrics import CounterChildren, Metrics
from imrelay.pipeline.runner import Runner
from imrelay.stores.base import Inbox, InboxRecord

__all__ = ["MAX_ATTEMPTS", "Worker"]

MAX_ATTEMPTS = "max_attempts"
"""The failure reason of a message the worker gave up on at start-up."""

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(slots=True)
class _Entry:
    message: InboundMessage
    committed: asyncio.Future[bool]  # the worker's own commit task (resolved for resumed ones)
    resumed: bool = False


@dataclass(slots=True)
class _Lane:
    entries: deque[_Entry] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


class Worker:
    """Ordered per conversation, concurrent across conversations, bounded overall."""

    def __init__(
        self,
        inbox: Inbox,
        runner: Runner,
        metrics: Metrics,
        *,
        max_concurrency: int = 64,
        max_pending: int = 10000,
        max_attempts: int = 3,
        lag_target_s: float = 0.0,
        core_share: float = 1.0,
        on_accepted: Callable[[InboundMessage], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.inbox = inbox
        self.runner = runner
        self.metrics = metrics
        self._received = CounterChildren(metrics.messages_received)
        self.max_pending = max_pending
        self.max_attempts = max_attempts
        self.limit = AdaptiveLimit(
            max_concurrency, lag_target_s=lag_target_s, core_share=core_share
        )
        self._lanes: dict[ConversationKey, _Lane] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending = 0
        self._inflight = 0
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_accepted = on_accepted
        self._wall_clock = wall_clock
        metrics.inbox_oldest_age.set_function(self.oldest_age)
        # read at scrape time: no gauge writes (each takes a lock) per message
        metrics.inbox_depth.set_function(lambda: self._pending)
        metrics.inflight.set_function(lambda: self._inflight)
        metrics.concurrency_limit.set_function(lambda: self.limit.limit)
        metrics.loop_lag.set_function(lambda: self.limit.lag_s)

    @property
    def pending(self) -> int:
        """Messages offered or resumed and not finished."""
        return self._pending

    def oldest_age(self) -> float:
        """Seconds since the oldest unfinished message was received; 0 when there is none.

        Each conversation's queue is in arrival order, so the oldest message is the head of
        one of them: this costs one look per active conversation (it runs at each scrape).
        """
        heads = [
            lane.entries[0].message.received_at for lane in self._lanes.values() if lane.entries
        ]
        if not heads:
            return 0.0
        return max(self._wall_clock() - min(heads), 0.0)

    def offer(self, message: InboundMessage) -> asyncio.Future[bool]:
        """Queue ``message`` in its conversation's order and commit it to the inbox.

        Returns:
            A future for the caller: ``True`` once committed, ``False`` for a duplicate; it
            raises the commit's error if the commit failed, and is cancelled if the worker is
            closed first. Cancelling it does not affect the worker.
        """
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[bool] = loop.create_future()
        commit = self._spawn(self._commit(message))
        commit.add_done_callback(functools.partial(_relay, outcome))
        self._enqueue(_Entry(message, commit))
        return outcome

    def has_capacity(self) -> bool:
        """Whether another message can be taken now (webhooks answer 503 when not)."""
        return self._pending < self.max_pending

    async def wait_capacity(self) -> None:
        """Return once fewer than ``max_pending`` messages are pending."""
        while self._pending >= self.max_pending:
            await self._capacity.wait()

    async def resume(self) -> int:
        """Queue every unfinished inbox message, oldest first; return how many.

        A message started ``max_attempts`` times already is settled ``failed`` instead (see the
        module docstring) and not counted.
        """
        records: list[InboxRecord] = await self.inbox.pending()
        loop = asyncio.get_running_loop()
        resumed = 0
        for record in records:
            if record.attempts >= self.max_attempts:
                await self._give_up(record)
                continue
            done: asyncio.Future[bool] = loop.create_future()
            done.set_result(True)
            self._enqueue(_Entry(record.message, done, resumed=True))
            resumed += 1
        if resumed:
            logger.info("resuming %d unfinished messages", resumed)
        return resumed

    async def _give_up(self, record: InboxRecord) -> None:
        message = record.message
        fields = {"platform": message.platform, "message.id": message.message_id}
        logger.warning(
            "message was started %d times without finishing; marking it failed, not retrying",
            record.attempts,
            extra=fields,
        )
        try:
            await self.runner.give_up(message, MAX_ATTEMPTS)
        except Exception as exc:  # it stays in the inbox; the next start decides again
            logger.error("could not mark the message failed: %s", exc, extra=fields)

    async def drain(self, deadline_s: float) -> bool:
        """Wait up to ``deadline_s`` for all pending work; cancel the rest. True if all done."""
        try:
            await asyncio.wait_for(self._idle.wait(), deadline_s)
            done = True
        except TimeoutError:
            done = False
            logger.warning(
                "drain deadline passed with %d messages unfinished; they stay in the inbox",
                self._pending,
            )
        await self.aclose()
        return done

    def start(self) -> None:
        """Begin adapting the concurrency limit to the event loop's lag (see ``concurrency``)."""
        self.limit.start()

    async def aclose(self) -> None:
        """Stop adapting the limit and cancel every task the worker owns."""
        self.limit.stop()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- internals -------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _enqueue(self, entry: _Entry) -> None:
        self._pending += 1
        self._update_events()
        key = entry.message.key
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.entries.append(entry)
        if lane.task is None:
            lane.task = self._spawn(self._drain_lane(key, lane))

    async def _commit(self, message: InboundMessage) -> bool:
        try:
            new = await self.inbox.put(message)
        except Exception as exc:
            logger.error(
                "inbox commit failed; the message is not acknowledged: %s",
                exc,
                extra={"platform": message.platform, "message.id": message.message_id},
            )
            raise
        if new:
            self._received(message.platform, message.kind).inc()
            if self._on_accepted is not None:
                self._on_accepted(message)
        else:
            self.metrics.messages_duplicate.labels(message.platform).inc()
        return new

    async def _drain_lane(self, key: ConversationKey, lane: _Lane) -> None:
        try:
            while lane.entries:
                entry = lane.entries[0]
                try:
                    try:
                        new = await asyncio.shield(entry.committed)
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # the commit failed: not ACKed, so redelivered later
                        new = False
                    if new:
                        async with self.limit:
                            self._inflight += 1
                            try:
                                await self.runner.handle(entry.message, resumed=entry.resumed)
                            finally:
                                self._inflight -= 1
                except asyncio.CancelledError:
                    raise
                except Exception:  # the runner settles its own failures; this is a last resort
                    logger.exception(
                        "worker failed on a message",
                        extra={
                            "platform": entry.message.platform,
                            "message.id": entry.message.message_id,
                        },
                    )
                lane.entries.popleft()
                self._finished()
        finally:
            lane.task = None
            if not lane.entries:
                self._lanes.pop(key, None)

    def _finished(self) -> None:
        self._pending -= 1
        self._update_events()

    def _update_events(self) -> None:
        if self._pending < self.max_pending:
            self._capacity.set()
        else:
            self._capacity.clear()
        if self._pending == 0:
            self._idle.set()
        else:
            self._idle.clear()


def _relay(outcome: asyncio.Future[bool], commit: asyncio.Task[bool]) -> None:
    """Pass a commit's result on to the caller's future, unless the caller stopped waiting."""
    if commit.cancelled():
        outcome.cancel()
        return
    exc = commit.exception()  # retrieved here even if nobody else looks at it
    if outcome.done():
        return
    if exc is not None:
        outcome.set_exception(exc)
    else:
        outcome.set_result(commit.result())
