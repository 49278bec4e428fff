"""Tests for the runner: the full stage list on real stores, and how each message ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from imrelay.errors import ModelTimeout, PlatformAPIError
from imrelay.message import InboundMessage
from imrelay.observability.logging import conversation_hash
from imrelay.observability.metrics import Metrics
from imrelay.pipeline.command import CommandStage
from imrelay.pipeline.context import Drop, Stage, TurnContext
from imrelay.pipeline.filter import AccessStage, DedupStage, KindStage
from imrelay.pipeline.format import FormatStage
from imrelay.pipeline.history import HistoryStage
from imrelay.pipeline.model import GenerateStage
from imrelay.pipeline.route import RouteStage
from imrelay.pipeline.runner import Runner
from imrelay.pipeline.send import ReplySender, SendStage
from imrelay.stores.base import MessageState
from imrelay.stores.memory import MemoryStore

PLATFORM = "dingtalk"
FAILURE = "sorry, something went wrong"
UNSUPPORTED = "text only, please"
STAGES = [
    "dedup",
    "access",
    "kind",
    "command",
    "context",
    "route",
    "generate",
    "format",
    "send",
]


class _Counter:
    """A monotonic clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class _Boom:
    """A stage that raises an unexpected error."""

    name = "boom"

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        raise RuntimeError("stage exploded")


class _Blocker:
    """A stage that waits until released."""

    name = "block"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        self.entered.set()
        await self.release.wait()
        return ctx


class _Pipeline:
    """The stage list ``Gateway._build_worker`` builds, on test collaborators."""

    def __init__(
        self,
        store: MemoryStore,
        platform: Any,
        metrics: Metrics,
        clock: Any,
        backend: Any,
        *,
        extra: Sequence[Stage] = (),
        include_text: bool = False,
        markdown: bool = True,
        streams: bool = False,
    ) -> None:
        self.store = store
        self.platform = platform
        self.clock = clock
        self.backend = backend
        self.dedup = DedupStage(store)
        self.sender = ReplySender(
            {PLATFORM: platform}, store, metrics, clock=clock, sleep=clock.sleep
        )
        stages: list[Stage] = [
            self.dedup,
            AccessStage(group_require_mention=True),
            KindStage(unsupported_notice=UNSUPPORTED),
            CommandStage(store, scope="conversation", help_text="HELP", reset_notice="CLEARED"),
            HistoryStage(
                store, scope="conversation", max_turns=10, max_tokens=1000, ttl_s=3600, clock=clock
            ),
            RouteStage(default="default", by_kind={}),
            *extra,
            GenerateStage(
                {"default": backend},
                system_prompts={"default": "be kind"},
                metrics=metrics,
                failure_notice=FAILURE,
                streams=self.sender.open_stream if streams else None,
            ),
            FormatStage(markdown={PLATFORM: markdown}),
            SendStage(self.sender, store, keep_turns=10, clock=clock),
        ]
        self.stage_clock = _Counter()
        self.runner = Runner(
            stages,
            sender=self.sender,
            inbox=store,
            metrics=metrics,
            dedup=self.dedup,
            failure_notice=FAILURE,
            include_text=include_text,
            wall_clock=clock,
            clock=self.stage_clock,
        )

    async def handle(self, message: InboundMessage, *, resumed: bool = False) -> MessageState:
        if resumed:
            return await self.runner.handle(message, resumed=True)
        assert await self.store.put(message)
        return await self.runner.handle(message)

    async def record(self, message_id: str = "m1") -> Any:
        record = await self.store.get(PLATFORM, message_id)
        assert record is not None
        return record


@pytest.fixture
def build(
    store: MemoryStore,
    platform: Any,
    metrics: Metrics,
    clock: Any,
    make_backend: Callable[..., Any],
) -> Callable[..., _Pipeline]:
    """Build a pipeline; keywords go to :class:`_Pipeline` (``backend`` overrides the model)."""

    def factory(**kw: Any) -> _Pipeline:
        backend = kw.pop("backend", None) or make_backend("default", ["the ", "answer"])
        return _Pipeline(store, platform, metrics, clock, backend, **kw)

    return factory


async def test_runner_replied_settles_and_observes(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
    clock: Any,
) -> None:
    """A message through every stage is answered, REPLIED, remembered and fully timed."""
    p = build()
    message = make_message(received_at=clock())
    clock.advance(2.5)
    assert await p.handle(message) is MessageState.REPLIED
    assert p.platform.texts == ["the answer"]
    _, reply = p.platform.sent[0]
    assert reply.markdown is True
    assert reply.mention_sender is True
    record = await p.record()
    assert (record.state, record.reason, record.attempts) == (MessageState.REPLIED, "", 1)
    assert p.backend.prompts[0][0] == {"role": "system", "content": "be kind"}
    history = await p.store.load("dingtalk:cid-1", since=0)
    assert [(t.role, t.content) for t in history] == [
        ("user", "hello m1"),
        ("assistant", "the answer"),
    ]
    labels = {"platform": PLATFORM}
    assert sample("imrelay_message_processing_latency_seconds_count", **labels) == 1
    assert sample("imrelay_message_processing_latency_seconds_sum", **labels) == 2.5
    for stage in STAGES:
        assert sample("imrelay_stage_latency_seconds_count", stage=stage) == 1, stage
        assert sample("imrelay_stage_latency_seconds_sum", stage=stage) == 1.0, stage
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="sent") == 1


async def test_runner_second_message_sees_history(
    build: Callable[..., _Pipeline], make_message: Callable[..., InboundMessage]
) -> None:
    """The exchange remembered for one message is in the next message's prompt."""
    p = build()
    await p.handle(make_message("m1", text="first"))
    await p.handle(make_message("m2", text="second"))
    assert p.backend.prompts[1][1:] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "the answer"},
        {"role": "user", "content": "second"},
    ]


async def test_runner_processing_latency_never_negative(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
    clock: Any,
) -> None:
    """A message stamped in the future (clock skew) is observed as zero latency."""
    p = build()
    await p.handle(make_message(received_at=clock() + 100))
    assert sample("imrelay_message_processing_latency_seconds_count", platform=PLATFORM) == 1
    assert sample("imrelay_message_processing_latency_seconds_sum", platform=PLATFORM) == 0


async def test_runner_drop_with_notice_sends_and_settles_dropped(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
) -> None:
    """A Drop with a notice sends the notice, settles DROPPED and stops the stages."""
    p = build()
    assert await p.handle(make_message(kind="image", text="")) is MessageState.DROPPED
    assert p.platform.texts == [UNSUPPORTED]
    _, reply = p.platform.sent[0]
    assert (reply.markdown, reply.mention_sender, reply.part) == (False, True, 0)
    record = await p.record()
    assert (record.state, record.reason) == (MessageState.DROPPED, "unsupported_kind")
    assert p.backend.prompts == []
    labels = {"platform": PLATFORM}
    assert sample("imrelay_messages_dropped_total", reason="unsupported_kind", **labels) == 1
    assert sample("imrelay_message_processing_latency_seconds_count", **labels) == 1
    assert sample("imrelay_stage_latency_seconds_count", stage="kind") == 1
    assert sample("imrelay_stage_latency_seconds_count", stage="command") == 0


async def test_runner_drop_without_notice_is_silent(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
) -> None:
    """A Drop without a notice sends nothing and observes no processing latency."""
    p = build()
    assert await p.handle(make_message(mentions_bot=False)) is MessageState.DROPPED
    assert p.platform.sent == []
    record = await p.record()
    assert (record.state, record.reason) == (MessageState.DROPPED, "not_mentioned")
    labels = {"platform": PLATFORM}
    assert sample("imrelay_messages_dropped_total", reason="not_mentioned", **labels) == 1
    assert sample("imrelay_message_processing_latency_seconds_count", **labels) == 0


async def test_runner_command_notice_direct_without_mention(
    build: Callable[..., _Pipeline], make_message: Callable[..., InboundMessage]
) -> None:
    """A command in a direct chat is answered by its notice, without an @-mention."""
    p = build()
    message = make_message(text="/help", conv_kind="direct", mentions_bot=False)
    assert await p.handle(message) is MessageState.DROPPED
    assert p.platform.texts == ["HELP"]
    assert p.platform.sent[0][1].mention_sender is False


async def test_runner_failed_drop_settles_failed(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    make_backend: Callable[..., Any],
    sample: Callable[..., float],
) -> None:
    """A failed Drop (the model timed out) sends its notice and settles FAILED with its reason."""
    p = build(backend=make_backend("default", [], error=ModelTimeout("too slow")))
    assert await p.handle(make_message()) is MessageState.FAILED
    assert p.platform.texts == [FAILURE]
    record = await p.record()
    assert (record.state, record.reason) == (MessageState.FAILED, "model_timeout")
    labels = {"platform": PLATFORM}
    assert sample("imrelay_messages_failed_total", reason="model_timeout", **labels) == 1
    assert sample("imrelay_messages_dropped_total", reason="model_timeout", **labels) == 0
    assert await p.store.load("dingtalk:cid-1", since=0) == []


async def test_runner_duplicate_leaves_state(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
) -> None:
    """A message handled again after it finished is a duplicate: nothing sent, state kept."""
    p = build()
    message = make_message()
    assert await p.handle(message) is MessageState.REPLIED
    assert await p.runner.handle(message) is MessageState.DROPPED
    assert p.platform.texts == ["the answer"]
    record = await p.record()
    assert (record.state, record.attempts) == (MessageState.REPLIED, 1)
    assert sample("imrelay_messages_duplicate_total", platform=PLATFORM) == 1
    assert sample("imrelay_messages_dropped_total", platform=PLATFORM, reason="duplicate") == 0
    assert sample("imrelay_stage_latency_seconds_count", stage="dedup") == 2
    assert sample("imrelay_stage_latency_seconds_count", stage="access") == 1


async def test_runner_resumed_does_not_resend_recorded_part(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
    clock: Any,
) -> None:
    """A message resumed after its answer went out is settled without sending it again."""
    p = build()
    message = make_message()
    await p.store.put(message)
    await p.store.set_state(PLATFORM, "m1", MessageState.PROCESSING)
    await p.store.record_sent(PLATFORM, "m1", 0, clock())
    assert await p.handle(message, resumed=True) is MessageState.REPLIED
    assert p.platform.sent == []
    record = await p.record()
    assert (record.state, record.attempts) == (MessageState.REPLIED, 2)
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="skipped") == 1


async def test_runner_send_failure_settles_send_failed(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
) -> None:
    """A platform error while sending the answer settles FAILED ``send_failed``."""
    p = build()
    p.platform.failures = [PlatformAPIError("session webhook expired", errcode=300001)]
    assert await p.handle(make_message()) is MessageState.FAILED
    assert p.platform.sent == []
    assert p.platform.attempts == 1  # no failure notice through the same broken channel
    record = await p.record()
    assert (record.state, record.reason) == (MessageState.FAILED, "send_failed")
    labels = {"platform": PLATFORM}
    assert sample("imrelay_messages_failed_total", reason="send_failed", **labels) == 1
    assert sample("imrelay_replies_total", outcome="failed", **labels) == 1
    assert sample("imrelay_message_processing_latency_seconds_count", **labels) == 0
    assert sample("imrelay_stage_latency_seconds_count", stage="send") == 0


async def test_runner_notice_send_failure_settles_send_failed(
    build: Callable[..., _Pipeline], make_message: Callable[..., InboundMessage]
) -> None:
    """A Drop notice that cannot be sent also settles FAILED ``send_failed``."""
    p = build()
    p.platform.failures = [PlatformAPIError("forbidden")]
    assert await p.handle(make_message(kind="file", text="")) is MessageState.FAILED
    record = await p.record()
    assert (record.state, record.reason) == (MessageState.FAILED, "send_failed")


async def test_runner_unexpected_error_notifies_and_fails(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stage that raises: logged with its stack, failure notice sent, FAILED internal_error."""
    p = build(extra=[_Boom()])
    with caplog.at_level(logging.ERROR, logger="imrelay.pipeline.runner"):
        assert await p.handle(make_message()) is MessageState.FAILED
    assert p.platform.texts == [FAILURE]
    record = await p.record()
    assert (record.state, record.reason) == (MessageState.FAILED, "internal_error")
    assert sample("imrelay_messages_failed_total", platform=PLATFORM, reason="internal_error") == 1
    [logged] = [r for r in caplog.records if r.name == "imrelay.pipeline.runner"]
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], RuntimeError)
    assert getattr(logged, "message.id") == "m1"


async def test_runner_failure_notice_that_fails_is_tolerated(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """If the failure notice itself cannot be sent, the message is still settled FAILED."""
    p = build(extra=[_Boom()])
    p.platform.failures = [PlatformAPIError("blocked")]
    with caplog.at_level(logging.WARNING, logger="imrelay.pipeline.runner"):
        assert await p.handle(make_message()) is MessageState.FAILED
    assert p.platform.sent == []
    assert p.platform.attempts == 1
    record = await p.record()
    assert (record.state, record.reason) == (MessageState.FAILED, "internal_error")
    assert any("failure notice could not be sent" in r.getMessage() for r in caplog.records)


async def test_runner_cancelled_leaves_message_processing(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
) -> None:
    """Cancellation mid-pipeline settles nothing: the message stays ``processing``."""
    blocker = _Blocker()
    p = build(extra=[blocker])
    message = make_message()
    await p.store.put(message)
    task = asyncio.ensure_future(p.runner.handle(message))
    await blocker.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await p.record()
    assert record.state is MessageState.PROCESSING
    assert p.platform.attempts == 0
    assert sample("imrelay_messages_failed_total", platform=PLATFORM, reason="internal_error") == 0
    # the dedup stage did not learn it is finished: resuming it processes it
    blocker.release.set()
    assert await p.handle(message, resumed=True) is MessageState.REPLIED
    assert (await p.record()).attempts == 2


@pytest.mark.parametrize(
    ("include_text", "level", "logged"),
    [(True, logging.DEBUG, True), (True, logging.INFO, False), (False, logging.DEBUG, False)],
)
async def test_runner_include_text_logs_text_at_debug_only(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    caplog: pytest.LogCaptureFixture,
    include_text: bool,
    level: int,
    logged: bool,
) -> None:
    """Message text is logged only when configured, and only at DEBUG."""
    p = build(include_text=include_text)
    with caplog.at_level(level, logger="imrelay.pipeline.runner"):
        await p.handle(make_message(text="secret plans 机密"))
    text_lines = [r for r in caplog.records if "secret plans 机密" in r.getMessage()]
    assert bool(text_lines) is logged
    if logged:
        assert text_lines[0].levelno == logging.DEBUG


async def test_runner_debug_logs_settlement(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG, the drop and the final state are logged per message, without the text."""
    p = build()
    with caplog.at_level(logging.DEBUG, logger="imrelay.pipeline.runner"):
        await p.handle(make_message("m1", mentions_bot=False, text="private words"))
        await p.handle(make_message("m2"))
    messages = [r.getMessage() for r in caplog.records if r.name == "imrelay.pipeline.runner"]
    assert "dropped at access: not_mentioned" in messages
    assert "message dropped (not_mentioned)" in messages
    assert "message replied" in messages
    assert not any("private words" in m for m in messages)


class _HistoryFails(MemoryStore):
    """A store whose history writes fail (an injection point, not a patch)."""

    async def append(self, key: str, turns: Sequence[Any], keep: int) -> None:
        raise RuntimeError("history write failed")


async def test_runner_failure_after_delivery_sends_no_apology(
    platform: Any,
    metrics: Metrics,
    clock: Any,
    make_backend: Callable[..., Any],
    make_message: Callable[..., InboundMessage],
) -> None:
    """A failure after the answer went out settles FAILED but does not contradict the answer."""
    store = _HistoryFails(clock=clock)
    await store.open()
    try:
        p = _Pipeline(store, platform, metrics, clock, make_backend("default", ["the answer"]))
        assert await p.handle(make_message()) is MessageState.FAILED
        assert platform.texts == ["the answer"]
        record = await p.record()
        assert (record.state, record.reason) == (MessageState.FAILED, "internal_error")
    finally:
        await store.aclose()


class _TimedBackend:
    """Wraps a scripted backend and reports ``total_s`` like a real backend does."""

    def __init__(self, inner: Any, total_s: float) -> None:
        self.name = inner.name
        self.inner = inner
        self.total_s = total_s
        self.prompts = inner.prompts

    async def generate(self, messages: Sequence[Any], result: Any) -> Any:
        async for delta in self.inner.generate(messages, result):
            yield delta
        result.total_s = self.total_s


async def test_runner_gateway_overhead_excludes_model_time(
    build: Callable[..., _Pipeline],
    make_backend: Callable[..., Any],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
    clock: Any,
) -> None:
    """The overhead histogram observes the end-to-end latency minus the model's total time."""
    p = build(backend=_TimedBackend(make_backend("default", ["ok"]), total_s=1.0))
    message = make_message(received_at=clock())
    clock.advance(2.5)
    assert await p.handle(message) is MessageState.REPLIED
    labels = {"platform": PLATFORM}
    assert sample("imrelay_gateway_overhead_seconds_count", **labels) == 1
    assert sample("imrelay_gateway_overhead_seconds_sum", **labels) == 1.5
    # a notice without a model call: the whole latency is overhead
    clock.advance(0.5)
    assert await p.handle(make_message("m2", kind="image", text="", received_at=clock() - 0.25))
    assert sample("imrelay_gateway_overhead_seconds_count", **labels) == 2
    assert sample("imrelay_gateway_overhead_seconds_sum", **labels) == 1.75


def _handled(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The extra fields of each INFO ``message-handled`` line captured so far."""
    return [
        r.__dict__
        for r in caplog.records
        if r.levelno == logging.INFO and r.__dict__.get("event.action") == "message-handled"
    ]


async def test_runner_logs_one_info_line_per_message_with_ecs_fields(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    caplog: pytest.LogCaptureFixture,
    clock: Any,
) -> None:
    """A replied message gets one INFO line with outcome, duration, model fields and hashes."""
    p = build()
    message = make_message(received_at=clock(), text="confidential words")
    clock.advance(0.75)
    with caplog.at_level(logging.INFO, logger="imrelay.pipeline.runner"):
        await p.handle(message)
    (line,) = _handled(caplog)
    assert line["msg"] % line["args"] == "message replied"
    assert line["event.outcome"] == "success"
    assert line["event.duration"] == 750_000_000
    assert "event.reason" not in line
    assert line["imrelay.state"] == "replied"
    assert (line["imrelay.model.name"], line["imrelay.model.outcome"]) == ("default", "ok")
    assert line["imrelay.model.first_token"] == 10_000_000
    assert line["imrelay.model.tokens.prompt"] == 7
    assert line["imrelay.model.tokens.completion"] == 2
    assert (line["message.id"], line["trace.id"], line["platform"]) == ("m1", "m1", PLATFORM)
    assert line["conversation.hash"] == conversation_hash(PLATFORM, "cid-1")
    assert "cid-1" not in str(line["conversation.hash"])
    assert not any("confidential" in r.getMessage() for r in caplog.records)


async def test_runner_handled_line_omits_unknown_model_fields(
    build: Callable[..., _Pipeline],
    make_backend: Callable[..., Any],
    make_message: Callable[..., InboundMessage],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Timings and token counts the model did not report are left out, not logged as zero."""
    backend = make_backend(
        "default", ["hi"], first_token_s=None, prompt_tokens=None, completion_tokens=None
    )
    p = build(backend=backend)
    with caplog.at_level(logging.INFO, logger="imrelay.pipeline.runner"):
        await p.handle(make_message())
    (line,) = _handled(caplog)
    assert line["imrelay.model.outcome"] == "ok"
    for key in ("first_token", "tokens.prompt", "tokens.completion"):
        assert f"imrelay.model.{key}" not in line


async def test_runner_handled_line_for_drops_and_model_failures(
    build: Callable[..., _Pipeline],
    make_backend: Callable[..., Any],
    make_message: Callable[..., InboundMessage],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A drop logs its reason without model fields; a model failure logs the model's outcome."""
    p = build(backend=make_backend("default", [], error=ModelTimeout("too slow")))
    with caplog.at_level(logging.INFO, logger="imrelay.pipeline.runner"):
        await p.handle(make_message("m1", mentions_bot=False))
        await p.handle(make_message("m2"))
    dropped, failed = _handled(caplog)
    assert (dropped["event.outcome"], dropped["event.reason"]) == ("success", "not_mentioned")
    assert dropped["imrelay.state"] == "dropped"
    assert not [k for k in dropped if k.startswith("imrelay.model.")]
    assert (failed["event.outcome"], failed["event.reason"]) == ("failure", "model_timeout")
    assert (failed["imrelay.model.name"], failed["imrelay.model.outcome"]) == (
        "default",
        "timeout",
    )
    assert "imrelay.model.duration" not in failed


# -- streamed answers --------------------------------------------------------------------


class _Stream:
    """A ReplyStream that records the texts it is shown."""

    def __init__(self) -> None:
        self.updates: list[str] = []
        self.behind = False  # every update is shown at once
        self.finished: list[str] = []
        self.failed: list[str] = []

    async def update(self, text: str) -> None:
        self.updates.append(text)

    async def finish(self, text: str) -> None:
        self.finished.append(text)

    async def fail(self, notice: str) -> None:
        self.failed.append(notice)


def _streaming(platform: Any) -> list[_Stream]:
    """Give ``platform`` an ``open_stream``; return the list of streams it opens."""
    opened: list[_Stream] = []

    async def open_stream(message: InboundMessage) -> _Stream:
        opened.append(_Stream())
        return opened[-1]

    platform.open_stream = open_stream
    return opened


async def test_runner_streamed_answer_is_recorded_not_sent(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    sample: Callable[..., float],
) -> None:
    """A streamed answer is REPLIED and remembered, recorded as part 0, with no plain reply."""
    p = build(streams=True)
    opened = _streaming(p.platform)
    assert await p.handle(make_message()) is MessageState.REPLIED
    (stream,) = opened
    assert stream.updates == ["the ", "the answer"]
    assert stream.finished == ["the answer"]
    assert p.platform.attempts == 0
    assert await p.store.was_sent(PLATFORM, "m1", 0)
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="sent") == 1
    history = await p.store.load("dingtalk:cid-1", since=0)
    assert [t.content for t in history] == ["hello m1", "the answer"]


async def test_runner_streamed_model_failure_sends_no_plain_notice(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    make_backend: Callable[..., Any],
) -> None:
    """When the model fails, the stream shows the notice and no plain notice follows."""
    p = build(streams=True, backend=make_backend("default", ["x"], error=ModelTimeout("slow")))
    opened = _streaming(p.platform)
    assert await p.handle(make_message()) is MessageState.FAILED
    (stream,) = opened
    assert stream.failed == [FAILURE]
    assert p.platform.attempts == 0
    record = await p.record()
    assert record.reason == "model_timeout"


async def test_runner_command_notice_opens_no_stream(
    build: Callable[..., _Pipeline], make_message: Callable[..., InboundMessage]
) -> None:
    """A message answered before the generate stage (a command) never opens a stream."""
    p = build(streams=True)
    opened = _streaming(p.platform)
    assert await p.handle(make_message(text="/help")) is MessageState.DROPPED
    assert opened == []
    assert p.platform.texts == ["HELP"]


async def test_runner_resumed_streamed_answer_not_streamed_again(
    build: Callable[..., _Pipeline],
    make_message: Callable[..., InboundMessage],
    clock: Any,
) -> None:
    """A resumed message whose answer was already delivered opens no stream and sends nothing."""
    p = build(streams=True)
    opened = _streaming(p.platform)
    message = make_message()
    await p.store.put(message)
    await p.store.set_state(PLATFORM, "m1", MessageState.PROCESSING)
    await p.store.record_sent(PLATFORM, "m1", 0, clock())
    assert await p.handle(message, resumed=True) is MessageState.REPLIED
    assert opened == []
    assert p.platform.attempts == 0


async def test_runner_on_settled_sees_every_final_state(
    build: Callable[..., _Pipeline], make_message: Callable[..., InboundMessage]
) -> None:
    """The settle hook (the audit record) is called once per message with state and reason."""
    p = build()
    seen: list[tuple[str, MessageState, str]] = []

    async def hook(ctx: TurnContext, state: MessageState, reason: str) -> None:
        seen.append((ctx.message.message_id, state, reason))

    p.runner.on_settled = hook
    assert await p.handle(make_message()) is MessageState.REPLIED
    assert seen == [("m1", MessageState.REPLIED, "")]
