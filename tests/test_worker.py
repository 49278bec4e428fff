"""Tests for the worker: order per conversation, concurrency, backpressure, resume and drain."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from imrelay.errors import StoreError
from imrelay.message import Conversation, InboundMessage, OutboundReply, Sender
from imrelay.models.base import ChatMessage, Generation
from imrelay.observability.metrics import Metrics
from imrelay.pipeline.context import Drop, Stage, TurnContext
from imrelay.pipeline.filter import AccessStage, DedupStage
from imrelay.pipeline.format import FormatStage
from imrelay.pipeline.model import GenerateStage
from imrelay.pipeline.route import RouteStage
from imrelay.pipeline.runner import Runner
from imrelay.pipeline.send import ReplySender, SendStage
from imrelay.platforms.base import Intake
from imrelay.stores.base import MessageState
from imrelay.stores.memory import MemoryStore
from imrelay.worker import MAX_ATTEMPTS, Worker

PLATFORM = "dingtalk"
EPOCH = 1_700_000_000.0
TIMEOUT_FACTOR = float(os.environ.get("IMRELAY_TESTS_TIMEOUT_FACTOR", "1"))


async def until(predicate: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    """Poll ``predicate`` (yielding to the loop) until true, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def spin(n: int = 20) -> None:
    """Let the loop run ``n`` rounds."""
    for _ in range(n):
        await asyncio.sleep(0)


def message(message_id: str, conv: str = "c1", **overrides: Any) -> InboundMessage:
    """A mentioned group text message in conversation ``conv``."""
    fields: dict[str, Any] = {
        "platform": PLATFORM,
        "message_id": message_id,
        "conversation": Conversation(id=conv, kind="group"),
        "sender": Sender(id="staff-1"),
        "kind": "text",
        "text": f"text of {message_id}",
        "received_at": EPOCH,
        "mentions_bot": True,
    }
    fields.update(overrides)
    return InboundMessage(**fields)


class _Platform:
    """Records replies."""

    name = PLATFORM
    ingress = "stream"
    ready = True
    not_ready_reason = ""

    def __init__(self) -> None:
        self.sent: list[tuple[InboundMessage, OutboundReply]] = []

    async def run(self, intake: Intake) -> None:
        await asyncio.Event().wait()

    async def send(self, message: InboundMessage, reply: OutboundReply) -> None:
        self.sent.append((message, reply))

    async def probe(self) -> str:
        return "test"

    async def aclose(self) -> None:
        return None


class _GatedBackend:
    """A model that answers once ``gate`` is open, counting calls running at once."""

    name = "default"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self.cancelled = 0

    async def generate(self, messages: Sequence[ChatMessage], result: Generation) -> Any:
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
        result.text = "ok"
        yield "ok"

    async def probe(self) -> str:
        return "gated"

    async def aclose(self) -> None:
        return None


class _Probe:
    """Records which messages the runner processes, in the order each one finishes the stage.

    ``yields[message_id]`` makes that message take longer (loop rounds) inside the stage.
    """

    name = "probe"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []
        self.yields: dict[str, int] = {}
        self.active = 0
        self.max_active = 0

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await spin(self.yields.get(ctx.message.message_id, 0))
        finally:
            self.active -= 1
        msg = ctx.message
        self.seen.append((msg.conversation.id, msg.message_id, ctx.resumed))
        return ctx

    def order(self, conv: str) -> list[str]:
        return [mid for c, mid, _ in self.seen if c == conv]


class _Harness:
    """A worker over a real runner and stage list, with a probe and a gated model."""

    def __init__(
        self,
        store: MemoryStore,
        *,
        max_concurrency: int = 64,
        max_pending: int = 10000,
        max_attempts: int = 3,
        lag_target_s: float = 0.0,
        on_accepted: Callable[[InboundMessage], None] | None = None,
    ) -> None:
        self.store = store
        self.metrics = Metrics(CollectorRegistry(), process=False)
        self.platform = _Platform()
        self.backend = _GatedBackend()
        self.probe = _Probe()
        dedup = DedupStage(store)
        sender = ReplySender({PLATFORM: self.platform}, store, self.metrics)
        stages: list[Stage] = [
            dedup,
            AccessStage(),
            self.probe,
            RouteStage(default="default", by_kind={}),
            GenerateStage(
                {"default": self.backend},
                system_prompts={},
                metrics=self.metrics,
                failure_notice="failed",
            ),
            FormatStage(markdown={}),
            SendStage(sender, store, keep_turns=0),
        ]
        runner = Runner(
            stages,
            sender=sender,
            inbox=store,
            metrics=self.metrics,
            dedup=dedup,
            failure_notice="failed",
        )
        self.worker = Worker(
            store,
            runner,
            self.metrics,
            max_concurrency=max_concurrency,
            max_pending=max_pending,
            max_attempts=max_attempts,
            lag_target_s=lag_target_s,
            on_accepted=on_accepted,
        )

    def gauge(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        assert value is not None
        return value

    def counter(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def state(self, message_id: str) -> MessageState | None:
        record = await self.store.get(PLATFORM, message_id)
        return None if record is None else record.state

    async def settled(self, timeout: float = 3.0) -> None:
        await until(lambda: self.worker.pending == 0, "the worker to finish", timeout)


HarnessFactory = Callable[..., _Harness]


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    """An open in-memory store."""
    async with MemoryStore() as s:
        yield s


@pytest.fixture
async def harness(store: MemoryStore) -> AsyncIterator[HarnessFactory]:
    """Build harnesses on ``store`` (a subclass instance may be passed); closed at the end."""
    built: list[_Harness] = []

    def make(on: MemoryStore | None = None, **kw: Any) -> _Harness:
        h = _Harness(on or store, **kw)
        built.append(h)
        return h

    yield make
    for h in built:
        await h.worker.aclose()


async def test_worker_orders_each_conversation_runs_many_at_once(
    harness: HarnessFactory,
) -> None:
    """Messages of one conversation are processed in offer order; conversations overlap."""
    h = harness()
    convs = [f"c{n}" for n in range(8)]
    futures: list[Awaitable[bool]] = []
    expected: dict[str, list[str]] = {c: [] for c in convs}
    for i in range(5):
        for c in convs:
            mid = f"{c}-m{i}"
            h.probe.yields[mid] = (5 - i) * 4  # earlier messages are slower
            expected[c].append(mid)
            futures.append(h.worker.offer(message(mid, c)))
    assert h.worker.pending == 40
    assert await asyncio.gather(*futures) == [True] * 40
    await h.settled()
    for c in convs:
        assert h.probe.order(c) == expected[c]
    assert h.probe.max_active > 1
    assert len(h.platform.sent) == 40
    assert {await h.state(mid) for mids in expected.values() for mid in mids} == {
        MessageState.REPLIED
    }
    assert h.gauge("imrelay_inbox_depth") == 0
    assert h.gauge("imrelay_messages_inflight") == 0
    assert h.counter("imrelay_messages_received_total", platform=PLATFORM, kind="text") == 40


async def test_worker_respects_max_concurrency(harness: HarnessFactory) -> None:
    """No more than ``max_concurrency`` messages run at once; gauges follow."""
    h = harness(max_concurrency=3)
    h.backend.gate.clear()
    futures = [h.worker.offer(message(f"m{n}", f"c{n}")) for n in range(8)]
    assert await asyncio.gather(*futures) == [True] * 8
    await until(lambda: h.backend.active == 3, "three model calls")
    await spin(50)
    assert h.backend.active == 3
    assert h.gauge("imrelay_messages_inflight") == 3
    assert h.gauge("imrelay_inbox_depth") == 8
    h.backend.gate.set()
    await h.settled()
    assert h.backend.max_active == 3
    assert h.backend.calls == 8
    assert h.gauge("imrelay_messages_inflight") == 0
    assert h.gauge("imrelay_inbox_depth") == 0


async def test_worker_exports_its_concurrency_limit_and_the_loop_lag(
    harness: HarnessFactory,
) -> None:
    """The limit's gauges read the worker's limit; start() probes the loop, aclose() stops."""
    h = harness(max_concurrency=16, lag_target_s=0.002)
    assert h.gauge("imrelay_pipeline_concurrency_limit") == 16
    assert h.gauge("imrelay_event_loop_lag_seconds") == 0
    h.worker.start()
    await asyncio.sleep(0.02)
    time.sleep(0.03)  # block the loop past the next probe
    await until(lambda: h.gauge("imrelay_event_loop_lag_seconds") > 0.01, "a lagging probe")
    for _ in range(16):
        await h.worker.limit.acquire()
    h.worker.limit.observe(0.010, busy=1.0)  # a window of a saturated, lagging loop
    assert h.gauge("imrelay_pipeline_concurrency_limit") == 8
    await h.worker.aclose()
    assert h.gauge("imrelay_event_loop_lag_seconds") == 0
    assert h.gauge("imrelay_pipeline_concurrency_limit") == 16  # back to the ceiling


async def test_worker_wait_capacity_blocks_at_max_pending(harness: HarnessFactory) -> None:
    """``wait_capacity`` returns at once below ``max_pending`` and blocks at it until work ends."""
    h = harness(max_pending=2)
    await asyncio.wait_for(h.worker.wait_capacity(), 1.0)
    h.backend.gate.clear()
    first = h.worker.offer(message("m1", "c1"))
    await asyncio.wait_for(h.worker.wait_capacity(), 1.0)  # one pending: still room
    second = h.worker.offer(message("m2", "c2"))
    assert await asyncio.gather(first, second) == [True, True]
    waiter = asyncio.ensure_future(h.worker.wait_capacity())
    await spin(50)
    assert not waiter.done()
    assert h.worker.pending == 2
    h.backend.gate.set()
    await asyncio.wait_for(waiter, 2.0)
    assert h.worker.pending < 2
    await h.settled()


async def test_worker_duplicate_offer_not_processed(harness: HarnessFactory) -> None:
    """A redelivered message resolves False and is not processed again."""
    h = harness()
    assert await h.worker.offer(message("m1")) is True
    await h.settled()
    assert await h.worker.offer(message("m1")) is False
    both = [h.worker.offer(message("m2")), h.worker.offer(message("m2"))]
    assert await asyncio.gather(*both) == [True, False]
    await h.settled()
    assert h.probe.order("c1") == ["m1", "m2"]
    assert h.backend.calls == 2
    assert h.counter("imrelay_messages_duplicate_total", platform=PLATFORM) == 2
    assert h.counter("imrelay_messages_received_total", platform=PLATFORM, kind="text") == 2
    assert h.gauge("imrelay_inbox_depth") == 0


async def test_worker_on_accepted_only_for_new_messages(harness: HarnessFactory) -> None:
    """The ``on_accepted`` hook sees each new message once, never a duplicate."""
    accepted: list[str] = []
    h = harness(on_accepted=lambda m: accepted.append(m.message_id))
    assert await h.worker.offer(message("m1")) is True
    assert await h.worker.offer(message("m1")) is False
    assert await h.worker.offer(message("m2")) is True
    await h.settled()
    assert accepted == ["m1", "m2"]


class _FailingPutStore(MemoryStore):
    """A store whose commit fails for the message ids in ``fail``."""

    def __init__(self, fail: set[str]) -> None:
        super().__init__()
        self.fail = fail

    async def put(self, message: InboundMessage) -> bool:
        if message.message_id in self.fail:
            raise StoreError("disk full")
        return await super().put(message)


async def test_worker_commit_failure_raises_and_skips(
    harness: HarnessFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed commit fails the offer; the message is not processed; later ones are."""
    async with _FailingPutStore({"bad"}) as store:
        h = harness(store)
        bad = h.worker.offer(message("bad"))
        good = h.worker.offer(message("good"))
        with pytest.raises(StoreError, match="disk full"):
            await bad
        assert await good is True
        await h.settled()
        assert h.probe.order("c1") == ["good"]
        assert await h.state("bad") is None
        assert h.gauge("imrelay_inbox_depth") == 0
        assert h.counter("imrelay_messages_received_total", platform=PLATFORM, kind="text") == 1
        assert any("inbox commit failed" in r.getMessage() for r in caplog.records)


async def test_worker_resume_queues_pending_oldest_first(
    harness: HarnessFactory, store: MemoryStore
) -> None:
    """``resume`` queues received and processing messages in arrival order, as resumed."""
    for mid, conv in [("m1", "a"), ("m2", "b"), ("m3", "a"), ("m4", "a"), ("m5", "b")]:
        assert await store.put(message(mid, conv))
    await store.set_state(PLATFORM, "m2", MessageState.REPLIED)
    await store.set_state(PLATFORM, "m3", MessageState.PROCESSING)
    h = harness()
    h.probe.yields = {"m1": 30}
    assert await h.worker.resume() == 4
    assert h.worker.pending == 4
    await h.settled()
    assert h.probe.order("a") == ["m1", "m3", "m4"]
    assert h.probe.order("b") == ["m5"]
    assert all(resumed for _, _, resumed in h.probe.seen)
    for mid in ("m1", "m3", "m4", "m5"):
        assert await h.state(mid) is MessageState.REPLIED
    assert h.backend.calls == 4
    assert await h.worker.resume() == 0


async def test_worker_resume_gives_up_on_a_message_started_max_attempts_times(
    harness: HarnessFactory, store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A message started ``max_attempts`` times (it crashed every start) is settled failed at
    the next start, with nothing sent; its conversation goes on; one started fewer times is
    resumed."""
    for mid, conv in [("poison", "a"), ("after", "a"), ("twice", "b")]:
        assert await store.put(message(mid, conv))
    for _ in range(3):
        await store.set_state(PLATFORM, "poison", MessageState.PROCESSING)
    for _ in range(2):
        await store.set_state(PLATFORM, "twice", MessageState.PROCESSING)
    h = harness(max_attempts=3)
    with caplog.at_level(logging.WARNING, logger="imrelay.worker"):
        assert await h.worker.resume() == 2
    await h.settled()
    record = await store.get(PLATFORM, "poison")
    assert record is not None
    assert (record.state, record.reason, record.attempts) == (
        MessageState.FAILED,
        MAX_ATTEMPTS,
        3,
    )
    assert h.probe.order("a") == ["after"]
    assert h.probe.order("b") == ["twice"]
    assert await h.state("after") is MessageState.REPLIED
    assert await h.state("twice") is MessageState.REPLIED
    assert h.backend.calls == 2
    assert len(h.platform.sent) == 2  # no apology for the poison message
    assert h.counter("imrelay_messages_failed_total", platform=PLATFORM, reason=MAX_ATTEMPTS) == 1
    [warning] = [r for r in caplog.records if r.name == "imrelay.worker"]
    assert warning.levelno == logging.WARNING
    assert "started 3 times without finishing" in warning.getMessage()
    assert await h.worker.resume() == 0  # settled for good


async def test_worker_resume_with_max_attempts_one_gives_up_after_any_start(
    harness: HarnessFactory, store: MemoryStore
) -> None:
    """``max_attempts: 1`` never restarts a message that was started; unstarted ones resume."""
    assert await store.put(message("started"))
    assert await store.put(message("waiting", "b"))
    await store.set_state(PLATFORM, "started", MessageState.PROCESSING)
    h = harness(max_attempts=1)
    assert await h.worker.resume() == 1
    await h.settled()
    assert await h.state("started") is MessageState.FAILED
    assert await h.state("waiting") is MessageState.REPLIED


async def test_worker_drain_idle_returns_true(harness: HarnessFactory) -> None:
    """``drain`` returns True at once when idle, and after queued work completes."""
    h = harness()
    started = time.monotonic()
    assert await h.worker.drain(5.0) is True
    assert time.monotonic() - started < 1.0
    h = harness()
    futures = [h.worker.offer(message(f"m{n}", f"c{n % 2}")) for n in range(6)]
    assert await h.worker.drain(5.0) is True
    assert await asyncio.gather(*futures) == [True] * 6
    assert h.backend.calls == 6
    assert h.worker.pending == 0


async def test_worker_drain_deadline_cancels_and_keeps_inbox(
    harness: HarnessFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the deadline ``drain`` cancels work and returns False; messages stay in the inbox."""
    h = harness()
    h.backend.gate.clear()
    assert await h.worker.offer(message("m1", "c1")) is True
    assert await h.worker.offer(message("m2", "c1")) is True
    await until(lambda: h.backend.active == 1, "the model call")
    assert await h.worker.drain(0.05) is False
    assert h.backend.cancelled == 1
    assert await h.state("m1") is MessageState.PROCESSING
    assert await h.state("m2") is MessageState.RECEIVED
    assert [r.message.message_id for r in await h.store.pending()] == ["m1", "m2"]
    assert h.platform.sent == []
    assert h.worker.pending == 2
    assert h.gauge("imrelay_inbox_depth") == 2
    assert h.gauge("imrelay_messages_inflight") == 0
    assert any("drain deadline passed" in r.getMessage() for r in caplog.records)


class _BrokenStateStore(MemoryStore):
    """A store that cannot change the state of the message ids in ``broken``."""

    def __init__(self, broken: set[str]) -> None:
        super().__init__()
        self.broken = broken

    async def set_state(
        self, platform: str, message_id: str, state: MessageState, reason: str = ""
    ) -> None:
        if message_id in self.broken:
            raise StoreError("database is locked")
        await super().set_state(platform, message_id, state, reason)


async def test_worker_survives_runner_error(
    harness: HarnessFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """When even settling fails, the worker logs it and goes on with the next message."""
    async with _BrokenStateStore({"m1"}) as store:
        h = harness(store)
        with caplog.at_level(logging.ERROR, logger="imrelay.worker"):
            assert await h.worker.offer(message("m1")) is True
            assert await h.worker.offer(message("m2")) is True
            await h.settled()
        assert h.probe.order("c1") == ["m2"]
        assert await h.state("m2") is MessageState.REPLIED
        assert await h.state("m1") is MessageState.RECEIVED
        [logged] = [r for r in caplog.records if r.name == "imrelay.worker"]
        assert logged.getMessage() == "worker failed on a message"
        assert logged.exc_info is not None
        assert h.gauge("imrelay_inbox_depth") == 0


class _SlowPutStore(MemoryStore):
    """A store whose commits wait until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def put(self, message: InboundMessage) -> bool:
        await self.release.wait()
        return await super().put(message)


async def test_worker_caller_giving_up_does_not_stall_conversation(
    harness: HarnessFactory,
) -> None:
    """A connector that stops awaiting its offer (cancelled) does not wedge the conversation."""
    async with _SlowPutStore() as store:
        h = harness(store)
        first = h.worker.offer(message("m1"))
        second = h.worker.offer(message("m2"))
        assert isinstance(first, asyncio.Future)
        first.cancel()
        await spin()
        store.release.set()
        assert await second is True
        await h.settled()
        assert h.probe.order("c1") == ["m1", "m2"]
        assert await h.state("m1") is MessageState.REPLIED
        assert await h.worker.drain(1.0) is True


async def test_worker_caller_giving_up_on_failed_commit(harness: HarnessFactory) -> None:
    """A failed commit whose caller stopped waiting is still skipped cleanly."""
    async with _FailingPutStore({"bad"}) as store:
        h = harness(store)
        bad = h.worker.offer(message("bad"))
        assert isinstance(bad, asyncio.Future)
        bad.cancel()
        assert await h.worker.offer(message("good")) is True
        await h.settled()
        assert h.probe.order("c1") == ["good"]


async def test_worker_aclose_cancels_commit_in_flight(harness: HarnessFactory) -> None:
    """Closing the worker during a commit cancels the offer, so no caller waits forever."""
    async with _SlowPutStore() as store:
        h = harness(store)
        pending = h.worker.offer(message("m1"))
        await spin()
        await h.worker.aclose()
        await asyncio.wait_for(asyncio.wait([asyncio.ensure_future(pending)]), 1.0)
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert h.probe.seen == []
