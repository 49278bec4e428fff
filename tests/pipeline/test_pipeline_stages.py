"""Unit tests for each pipeline stage and for the reply sender, with real stores and metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from imrelay.errors import (
    AuthError,
    ModelError,
    ModelResponseError,
    ModelTimeout,
    ModelUnavailable,
    PlatformAPIError,
    RateLimited,
)
from imrelay.message import OutboundReply
from imrelay.observability.metrics import Metrics
from imrelay.pipeline.command import CommandStage, context_key_for
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.pipeline.filter import DUPLICATE, AccessStage, DedupStage, KindStage
from imrelay.pipeline.format import EMPTY_ANSWER, FormatStage, title_of
from imrelay.pipeline.history import HistoryStage, estimate_tokens, trim_to_budget
from imrelay.pipeline.model import GenerateStage, build_prompt
from imrelay.pipeline.route import RouteStage
from imrelay.pipeline.send import ReplySender, SendStage
from imrelay.stores.base import ContextTurn, MessageState
from imrelay.stores.memory import MemoryStore

PLATFORM = "dingtalk"
FAILURE = "sorry, the model failed"


def _turn(role: str, content: str, at: float = 0.0) -> ContextTurn:
    return ContextTurn(role, content, at)


def _sender(platform: Any, store: MemoryStore, metrics: Metrics, clock: Any, **kw: Any) -> Any:
    return ReplySender({PLATFORM: platform}, store, metrics, clock=clock, sleep=clock.sleep, **kw)


# -- DedupStage --------------------------------------------------------------------------


async def test_dedup_claims_new_message(store: MemoryStore, make_ctx: Callable[..., Any]) -> None:
    """A message not finished yet passes and is marked ``processing`` with one attempt."""
    ctx = make_ctx("m1")
    assert await store.put(ctx.message)
    stage = DedupStage(store)
    assert await stage(ctx) is ctx
    record = await store.get(PLATFORM, "m1")
    assert record is not None
    assert record.state is MessageState.PROCESSING
    assert record.attempts == 1


async def test_dedup_drops_finished_message_keeping_state(
    store: MemoryStore, make_ctx: Callable[..., Any]
) -> None:
    """A message the stage was told is finished is dropped as a duplicate, its state untouched."""
    ctx = make_ctx("m1")
    await store.put(ctx.message)
    await store.set_state(PLATFORM, "m1", MessageState.REPLIED)
    stage = DedupStage(store)
    stage.finished(PLATFORM, "m1")
    assert await stage(ctx) == Drop(DUPLICATE)
    record = await store.get(PLATFORM, "m1")
    assert record is not None
    assert record.state is MessageState.REPLIED
    assert record.attempts == 0


async def test_dedup_forgets_oldest_beyond_capacity(
    store: MemoryStore, make_ctx: Callable[..., Any]
) -> None:
    """Past its capacity the stage forgets the oldest finished message first."""
    first, second = make_ctx("m1"), make_ctx("m2")
    for ctx in (first, second):
        await store.put(ctx.message)
    stage = DedupStage(store, capacity=1)
    stage.finished(PLATFORM, "m1")
    stage.finished(PLATFORM, "m2")
    assert await stage(second) == Drop(DUPLICATE)
    assert await stage(first) is first


# -- AccessStage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conv_kind", "mentions_bot", "require", "passes"),
    [
        ("group", False, True, False),
        ("group", True, True, True),
        ("direct", False, True, True),
        ("group", False, False, True),
    ],
    ids=["group-unmentioned", "group-mentioned", "direct", "mention-not-required"],
)
async def test_access_requires_mention_in_groups(
    make_ctx: Callable[..., Any], conv_kind: str, mentions_bot: bool, require: bool, passes: bool
) -> None:
    """In groups only a mention passes (unless configured off); direct messages always pass."""
    ctx = make_ctx(conv_kind=conv_kind, mentions_bot=mentions_bot)
    result = await AccessStage(group_require_mention=require)(ctx)
    assert result == (ctx if passes else Drop("not_mentioned"))


# -- KindStage ---------------------------------------------------------------------------


async def test_kind_non_text_gets_notice(make_ctx: Callable[..., Any]) -> None:
    """A non-text message is dropped with the configured notice."""
    stage = KindStage(unsupported_notice="text only")
    result = await stage(make_ctx(kind="image", text=""))
    assert result == Drop("unsupported_kind", notice="text only")


async def test_kind_empty_text_dropped_silently(make_ctx: Callable[..., Any]) -> None:
    """A text message with only whitespace is dropped without a notice."""
    result = await KindStage(unsupported_notice="text only")(make_ctx(text=" \n\t"))
    assert result == Drop("empty")
    assert isinstance(result, Drop)
    assert result.notice is None


async def test_kind_text_passes(make_ctx: Callable[..., Any]) -> None:
    """A text message with text passes unchanged."""
    ctx = make_ctx(text="你好")
    assert await KindStage(unsupported_notice="text only")(ctx) is ctx


# -- CommandStage ------------------------------------------------------------------------


def _command_stage(store: MemoryStore, scope: str = "conversation") -> CommandStage:
    return CommandStage(store, scope=scope, help_text="HELP", reset_notice="CLEARED")


async def test_command_reset_clears_history_and_notices(
    store: MemoryStore, make_ctx: Callable[..., Any]
) -> None:
    """``/reset`` (any case, with arguments) clears the conversation's history and notices."""
    await store.append("dingtalk:cid-1", [_turn("user", "q"), _turn("assistant", "a")], keep=10)
    await store.append("dingtalk:cid-2", [_turn("user", "other")], keep=10)
    result = await _command_stage(store)(make_ctx(text="  /RESET now please"))
    assert result == Drop("command", notice="CLEARED")
    assert await store.load("dingtalk:cid-1", since=0) == []
    assert len(await store.load("dingtalk:cid-2", since=0)) == 1


async def test_command_reset_sender_scope_clears_only_sender(
    store: MemoryStore, make_ctx: Callable[..., Any]
) -> None:
    """With ``scope=sender`` in a group, ``/reset`` clears only the sender's history."""
    mine, theirs = "dingtalk:cid-1:staff-1", "dingtalk:cid-1:staff-2"
    await store.append(mine, [_turn("user", "q")], keep=10)
    await store.append(theirs, [_turn("user", "q")], keep=10)
    result = await _command_stage(store, "sender")(make_ctx(text="/reset"))
    assert isinstance(result, Drop)
    assert await store.load(mine, since=0) == []
    assert len(await store.load(theirs, since=0)) == 1


async def test_command_help_answers_help_text(
    store: MemoryStore, make_ctx: Callable[..., Any]
) -> None:
    """``/help`` is answered with the help text and touches no history."""
    await store.append("dingtalk:cid-1", [_turn("user", "q")], keep=10)
    assert await _command_stage(store)(make_ctx(text="/help")) == Drop("command", notice="HELP")
    assert len(await store.load("dingtalk:cid-1", since=0)) == 1


@pytest.mark.parametrize("text", ["/unknown thing", "what does /reset do?", "hello"])
async def test_command_other_text_passes(
    store: MemoryStore, make_ctx: Callable[..., Any], text: str
) -> None:
    """Unknown commands and ordinary text pass through, history untouched."""
    await store.append("dingtalk:cid-1", [_turn("user", "q")], keep=10)
    ctx = make_ctx(text=text)
    assert await _command_stage(store)(ctx) is ctx
    assert len(await store.load("dingtalk:cid-1", since=0)) == 1


@pytest.mark.parametrize(
    ("scope", "conv_kind", "key"),
    [
        ("conversation", "group", "dingtalk:cid-1"),
        ("sender", "group", "dingtalk:cid-1:staff-1"),
        ("sender", "direct", "dingtalk:cid-1"),
        ("conversation", "direct", "dingtalk:cid-1"),
    ],
)
def test_context_key_for_scopes(
    make_ctx: Callable[..., Any], scope: str, conv_kind: str, key: str
) -> None:
    """The key is the conversation, plus the sender only for sender scope in groups."""
    assert context_key_for(make_ctx(conv_kind=conv_kind), scope) == key


# -- history: estimate_tokens / trim_to_budget -------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("a", 1),
        ("abcd", 1),
        ("abcde", 2),
        ("你好", 2),
        ("你好ab", 3),
        ("こんにちは", 5),  # hiragana
        ("カタカナ", 4),  # katakana
        ("안녕", 2),  # hangul
        ("。、", 2),  # CJK punctuation
        ("ＡＢ", 2),  # full-width forms
        ("\u3400\uf900", 2),  # extension A, compatibility ideograph
        ("é" * 8, 2),  # accented latin is "other" text
    ],
)
def test_estimate_tokens_counts_cjk_and_other(text: str, tokens: int) -> None:
    """CJK characters count one each; other text one per four characters, rounded up."""
    assert estimate_tokens(text) == tokens


def test_trim_to_budget_keeps_newest_that_fit() -> None:
    """Turns are kept newest first until the next would pass the budget (4 overhead each)."""
    turns = [_turn("user", "aaaa"), _turn("assistant", "bbbb"), _turn("user", "cccc")]
    # Each turn costs 1 + 4 = 5 tokens.
    assert trim_to_budget(turns, 15, 10) == turns
    assert trim_to_budget(turns, 14, 10) == [turns[2]]  # dropping turn 0 exposes an assistant
    assert trim_to_budget(turns, 4, 10) == []
    assert trim_to_budget(turns, 0, 10) == []


def test_trim_to_budget_stops_at_first_turn_over_budget() -> None:
    """An older short turn is not kept once a newer one did not fit (no gaps in history)."""
    turns = [_turn("user", "q"), _turn("assistant", "x" * 400), _turn("user", "q2")]
    assert trim_to_budget(turns, 20, 10) == [turns[2]]


def test_trim_to_budget_cjk_costs_more() -> None:
    """A CJK turn costs one token per character, so fewer fit than for Latin text."""
    latin = [_turn("user", "abcdefgh"), _turn("assistant", "abcdefgh")]  # 2 + 4 each
    cjk = [_turn("user", "一二三四五六七八"), _turn("assistant", "一二三四五六七八")]  # 8 + 4
    assert trim_to_budget(latin, 12, 10) == latin
    assert trim_to_budget(cjk, 12, 10) == []  # the assistant fits alone, then is popped
    assert trim_to_budget(cjk, 24, 10) == cjk


def test_trim_to_budget_max_turns() -> None:
    """At most ``max_turns`` newest turns are kept; zero keeps none."""
    turns = [_turn("user" if i % 2 == 0 else "assistant", f"t{i}") for i in range(6)]
    assert trim_to_budget(turns, 1000, 4) == turns[2:]
    assert trim_to_budget(turns, 1000, 3) == turns[4:]  # turns[3] is an assistant: popped
    assert trim_to_budget(turns, 1000, 0) == []
    assert trim_to_budget([], 1000, 4) == []


def test_trim_to_budget_never_starts_with_assistant() -> None:
    """Leading assistant (or other non-user) turns are removed after trimming."""
    turns = [_turn("assistant", "a"), _turn("assistant", "b"), _turn("user", "q")]
    assert trim_to_budget(turns, 1000, 10) == [turns[2]]
    assert trim_to_budget(turns[:2], 1000, 10) == []


# -- HistoryStage ------------------------------------------------------------------------


def _history(store: MemoryStore, clock: Any, **kw: Any) -> HistoryStage:
    options: dict[str, Any] = {
        "scope": "conversation",
        "max_turns": 20,
        "max_tokens": 3000,
        "ttl_s": 3600.0,
    }
    options.update(kw)
    return HistoryStage(store, clock=clock, **options)


async def test_history_loads_turns_within_ttl(
    store: MemoryStore, clock: Any, make_ctx: Callable[..., Any]
) -> None:
    """Only turns written within ``ttl_s`` of now are loaded, oldest first."""
    now = clock()
    old = [_turn("user", "old q", now - 7200), _turn("assistant", "old a", now - 7200)]
    new = [_turn("user", "new q", now - 60), _turn("assistant", "new a", now - 60)]
    await store.append("dingtalk:cid-1", [*old, *new], keep=10)
    ctx = make_ctx()
    assert await _history(store, clock)(ctx) is ctx
    assert ctx.context_key == "dingtalk:cid-1"
    assert ctx.history == new
    clock.advance(3600 - 60)  # ``since`` is inclusive
    ctx = make_ctx()
    await _history(store, clock)(ctx)
    assert ctx.history == new
    clock.advance(1)
    ctx = make_ctx()
    await _history(store, clock)(ctx)
    assert ctx.history == []


async def test_history_budget_includes_current_message(
    store: MemoryStore, clock: Any, make_ctx: Callable[..., Any]
) -> None:
    """The message's own tokens come out of the budget before history is kept."""
    turns = [_turn("user", "问题一", clock()), _turn("assistant", "回答一", clock())]
    await store.append("dingtalk:cid-1", turns, keep=10)
    # message "你好" costs 2 + 4; each history turn 3 + 4.
    ctx = make_ctx(text="你好")
    await _history(store, clock, max_tokens=20)(ctx)
    assert ctx.history == turns
    ctx = make_ctx(text="你好")
    await _history(store, clock, max_tokens=19)(ctx)
    assert ctx.history == []  # the assistant fits alone and is popped
    ctx = make_ctx(text="长" * 100)
    await _history(store, clock, max_tokens=20)(ctx)  # budget below zero
    assert ctx.history == []


async def test_history_max_turns(
    store: MemoryStore, clock: Any, make_ctx: Callable[..., Any]
) -> None:
    """No more than ``max_turns`` turns are attached."""
    turns = [_turn("user" if i % 2 == 0 else "assistant", f"t{i}", clock()) for i in range(8)]
    await store.append("dingtalk:cid-1", turns, keep=20)
    ctx = make_ctx()
    await _history(store, clock, max_turns=4)(ctx)
    assert ctx.history == turns[4:]


async def test_history_max_turns_zero_skips_store(
    clock: Any, make_ctx: Callable[..., Any]
) -> None:
    """With ``max_turns=0`` the key is still set but the store is not read."""

    class NoLoadStore(MemoryStore):
        async def load(self, key: str, since: float) -> list[ContextTurn]:
            raise AssertionError("history loaded with max_turns=0")

    async with NoLoadStore(clock=clock) as store:
        ctx = make_ctx()
        assert await _history(store, clock, max_turns=0, scope="sender")(ctx) is ctx
    assert ctx.context_key == "dingtalk:cid-1:staff-1"
    assert ctx.history == []


# -- RouteStage --------------------------------------------------------------------------


async def test_route_by_kind_then_default(make_ctx: Callable[..., Any]) -> None:
    """A kind listed in ``by_kind`` gets its model; others get the default."""
    stage = RouteStage(default="chat", by_kind={"image": "vision"})
    ctx = make_ctx(kind="image")
    assert await stage(ctx) is ctx
    assert ctx.model_name == "vision"
    ctx = make_ctx(kind="text")
    await stage(ctx)
    assert ctx.model_name == "chat"
    assert stage.pick("audio") == "chat"


# -- GenerateStage -----------------------------------------------------------------------


class _StepClock:
    """A monotonic clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def test_generate_builds_prompt_and_records_metrics(
    make_ctx: Callable[..., Any],
    make_backend: Callable[..., Any],
    metrics: Metrics,
    sample: Callable[..., float],
) -> None:
    """System prompt, history in order, then the message; the answer and metrics are kept."""
    backend = make_backend("default", ["你好", "，世界"])
    stage = GenerateStage(
        {"default": backend},
        system_prompts={"default": "be brief"},
        metrics=metrics,
        failure_notice=FAILURE,
        clock=_StepClock(1.5),
    )
    ctx = make_ctx(text="next question")
    ctx.model_name = "default"
    ctx.history = [_turn("user", "q1"), _turn("assistant", "a1")]
    assert await stage(ctx) is ctx
    expected = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "next question"},
    ]
    assert ctx.prompt == expected
    assert backend.prompts == [expected]
    assert ctx.answer == "你好，世界"
    assert ctx.generation is not None
    assert ctx.generation.text == "你好，世界"
    m = {"model": "default"}
    assert sample("imrelay_model_requests_total", outcome="ok", **m) == 1
    assert sample("imrelay_model_latency_seconds_count", **m) == 1
    assert sample("imrelay_model_latency_seconds_sum", **m) == pytest.approx(1.5)
    assert sample("imrelay_model_first_token_seconds_sum", **m) == pytest.approx(0.01)
    assert sample("imrelay_model_tokens_total", direction="prompt", **m) == 7
    assert sample("imrelay_model_tokens_total", direction="completion", **m) == 2


async def test_generate_without_system_prompt_or_usage(
    make_ctx: Callable[..., Any],
    make_backend: Callable[..., Any],
    metrics: Metrics,
    sample: Callable[..., float],
) -> None:
    """No system prompt, no first token and no usage: the prompt and metrics leave them out."""
    backend = make_backend("local", [], prompt_tokens=None, completion_tokens=0)
    stage = GenerateStage(
        {"local": backend},
        system_prompts={"local": None},
        metrics=metrics,
        failure_notice=FAILURE,
    )
    ctx = make_ctx(text="hi")
    ctx.model_name = "local"
    assert await stage(ctx) is ctx
    assert ctx.prompt == [{"role": "user", "content": "hi"}]
    assert ctx.answer == ""
    assert sample("imrelay_model_requests_total", model="local", outcome="ok") == 1
    assert sample("imrelay_model_first_token_seconds_count", model="local") == 0
    assert sample("imrelay_model_tokens_total", model="local", direction="prompt") == 0
    assert sample("imrelay_model_tokens_total", model="local", direction="completion") == 0


def test_build_prompt_empty_system_prompt_left_out(make_ctx: Callable[..., Any]) -> None:
    """An empty system prompt adds no system message."""
    assert build_prompt(make_ctx(text="x"), "") == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ModelTimeout("timed out"), "timeout"),
        (ModelUnavailable("connection refused"), "unavailable"),
        (ModelResponseError("bad json"), "error"),
        (ModelError("other"), "error"),
    ],
)
async def test_generate_model_error_becomes_failed_drop(
    make_ctx: Callable[..., Any],
    make_backend: Callable[..., Any],
    metrics: Metrics,
    sample: Callable[..., float],
    error: ModelError,
    outcome: str,
) -> None:
    """Each model error (even after some deltas) is a failed Drop with the failure notice."""
    stage = GenerateStage(
        {"default": make_backend("default", ["partial"], error=error)},
        system_prompts={},
        metrics=metrics,
        failure_notice=FAILURE,
    )
    ctx = make_ctx()
    ctx.model_name = "default"
    result = await stage(ctx)
    assert result == Drop(f"model_{outcome}", notice=FAILURE, failed=True)
    assert ctx.answer == ""
    assert sample("imrelay_model_requests_total", model="default", outcome=outcome) == 1
    assert sample("imrelay_model_requests_total", model="default", outcome="ok") == 0
    assert sample("imrelay_model_latency_seconds_count", model="default") == 0


# -- FormatStage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "title"),
    [
        ("## Heading\nbody", "Heading"),
        ("\n\n   \n> quoted line", "quoted line"),
        ("- **bold item**", "bold item**"),
        (
            "一二三四五六七八九十一二三四五六七八九十一二三",
            "一二三四五六七八九十一二三四五六七八九十",
        ),
        ("```\n```", "reply"),
        ("", "reply"),
    ],
)
def test_title_of_first_meaningful_line(text: str, title: str) -> None:
    """The title is the first non-empty line without leading markers, cut to 20 characters."""
    assert title_of(text) == title


def test_title_of_limit() -> None:
    """The limit argument cuts the title."""
    assert title_of("abcdef", limit=3) == "abc"


async def test_format_markdown_per_platform(make_ctx: Callable[..., Any]) -> None:
    """Markdown (with a title) where the platform is configured for it, plain text elsewhere."""
    ctx = make_ctx()
    ctx.answer = "  # Answer\nDetails  "
    assert await FormatStage(markdown={PLATFORM: True})(ctx) is ctx
    assert ctx.replies == [
        OutboundReply(text="# Answer\nDetails", markdown=True, title="Answer", mention_sender=True)
    ]
    ctx = make_ctx()
    ctx.answer = "# Answer"
    await FormatStage(markdown={PLATFORM: False})(ctx)
    assert ctx.replies == [OutboundReply(text="# Answer", markdown=False, mention_sender=True)]


async def test_format_unconfigured_platform_defaults_to_markdown(
    make_ctx: Callable[..., Any],
) -> None:
    """A platform missing from the mapping gets markdown."""
    ctx = make_ctx()
    ctx.answer = "ok"
    await FormatStage(markdown={"other": False})(ctx)
    assert ctx.replies[0].markdown is True
    assert ctx.replies[0].title == "ok"


async def test_format_empty_answer_placeholder(make_ctx: Callable[..., Any]) -> None:
    """An empty or blank answer is replaced by a placeholder text."""
    ctx = make_ctx()
    ctx.answer = " \n "
    await FormatStage(markdown={})(ctx)
    assert [r.text for r in ctx.replies] == [EMPTY_ANSWER]


async def test_format_mentions_sender_only_in_groups(make_ctx: Callable[..., Any]) -> None:
    """Group replies @-mention the sender; direct replies do not."""
    ctx = make_ctx(conv_kind="direct")
    ctx.answer = "hi"
    await FormatStage(markdown={})(ctx)
    assert ctx.replies[0].mention_sender is False


# -- ReplySender -------------------------------------------------------------------------


async def test_sender_fresh_message_sends_and_records(
    store: MemoryStore,
    clock: Any,
    platform: Any,
    metrics: Metrics,
    sample: Callable[..., float],
    make_ctx: Callable[..., Any],
) -> None:
    """Every part is sent in order and recorded in the outbox; each counts as sent."""
    ctx = make_ctx()
    parts = [OutboundReply(text="one", part=0), OutboundReply(text="two", part=1)]
    await _sender(platform, store, metrics, clock).send_all(ctx, parts)
    assert platform.texts == ["one", "two"]
    assert all(msg is ctx.message for msg, _ in platform.sent)
    assert await store.was_sent(PLATFORM, "m1", 0)
    assert await store.was_sent(PLATFORM, "m1", 1)
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="sent") == 2
    assert clock.sleeps == []


async def test_sender_resumed_skips_recorded_parts(
    store: MemoryStore,
    clock: Any,
    platform: Any,
    metrics: Metrics,
    sample: Callable[..., float],
    make_ctx: Callable[..., Any],
) -> None:
    """A resumed message does not send again a part the outbox records as sent."""
    await store.record_sent(PLATFORM, "m1", 0, clock())
    ctx = make_ctx(resumed=True)
    parts = [OutboundReply(text="one", part=0), OutboundReply(text="two", part=1)]
    await _sender(platform, store, metrics, clock).send_all(ctx, parts)
    assert platform.texts == ["two"]
    assert await store.was_sent(PLATFORM, "m1", 1)
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="skipped") == 1
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="sent") == 1


async def test_sender_fresh_message_does_not_ask_outbox(
    clock: Any, platform: Any, metrics: Metrics, make_ctx: Callable[..., Any]
) -> None:
    """For a message that was not resumed the outbox is never asked (one round trip less)."""

    class CountingStore(MemoryStore):
        asked = 0

        async def was_sent(self, platform: str, message_id: str, part: int) -> bool:
            self.asked += 1
            return await super().was_sent(platform, message_id, part)

    async with CountingStore(clock=clock) as store:
        await store.record_sent(PLATFORM, "m1", 0, clock())
        sender = _sender(platform, store, metrics, clock)
        await sender.send_all(make_ctx(), [OutboundReply(text="one")])
        assert store.asked == 0
        assert platform.texts == ["one"]
        await sender.send_all(make_ctx(resumed=True), [OutboundReply(text="one")])
        assert store.asked == 1
        assert platform.texts == ["one"]


async def test_sender_retries_with_exponential_backoff(
    store: MemoryStore,
    clock: Any,
    platform: Any,
    metrics: Metrics,
    sample: Callable[..., float],
    make_ctx: Callable[..., Any],
) -> None:
    """Retryable errors are retried; delays double each attempt (with jitter in [½, 1])."""
    platform.failures = [PlatformAPIError("busy", retryable=True) for _ in range(3)]
    sender = _sender(platform, store, metrics, clock, max_attempts=4, backoff_s=0.4)
    await sender.send_all(make_ctx(), [OutboundReply(text="hi")])
    assert platform.attempts == 4
    assert platform.texts == ["hi"]
    assert len(clock.sleeps) == 3
    for n, delay in enumerate(clock.sleeps):
        assert 0.2 * 2**n <= delay <= 0.4 * 2**n
    assert await store.was_sent(PLATFORM, "m1", 0)
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="sent") == 1
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="failed") == 0


async def test_sender_rate_limited_waits_retry_after(
    store: MemoryStore, clock: Any, platform: Any, metrics: Metrics, make_ctx: Callable[..., Any]
) -> None:
    """A throttled send waits the larger of the backoff and the platform's ``retry_after``."""
    platform.failures = [
        RateLimited("slow down", retry_after=7.0),
        RateLimited("slow down", retry_after=0.001),
    ]
    sender = _sender(platform, store, metrics, clock, backoff_s=0.5)
    await sender.send_all(make_ctx(), [OutboundReply(text="hi")])
    assert platform.texts == ["hi"]
    assert clock.sleeps[0] == 7.0
    assert 0.5 <= clock.sleeps[1] <= 1.0


async def test_sender_gives_up_after_max_attempts(
    store: MemoryStore,
    clock: Any,
    platform: Any,
    metrics: Metrics,
    sample: Callable[..., float],
    make_ctx: Callable[..., Any],
) -> None:
    """After ``max_attempts`` retryable failures the last error is raised and nothing recorded."""
    errors = [PlatformAPIError(f"busy {i}", retryable=True) for i in range(5)]
    platform.failures = list(errors)
    sender = _sender(platform, store, metrics, clock, max_attempts=3)
    parts = [OutboundReply(text="one", part=0), OutboundReply(text="two", part=1)]
    with pytest.raises(PlatformAPIError) as info:
        await sender.send_all(make_ctx(), parts)
    assert info.value is errors[2]
    assert platform.attempts == 3
    assert len(clock.sleeps) == 2
    assert platform.sent == []
    assert not await store.was_sent(PLATFORM, "m1", 0)
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="failed") == 1
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="sent") == 0


async def test_sender_gives_up_when_deadline_would_pass(
    store: MemoryStore,
    clock: Any,
    platform: Any,
    metrics: Metrics,
    sample: Callable[..., float],
    make_ctx: Callable[..., Any],
) -> None:
    """A retry whose wait would end past the deadline is not attempted."""
    platform.failures = [RateLimited("slow down", retry_after=2.0) for _ in range(3)]
    sender = _sender(platform, store, metrics, clock, deadline_s=3.0, backoff_s=0.01)
    with pytest.raises(RateLimited):
        await sender.send_all(make_ctx(), [OutboundReply(text="hi")])
    assert clock.sleeps == [2.0]  # the second wait would end at 4 s > 3 s
    assert platform.attempts == 2
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="failed") == 1


@pytest.mark.parametrize(
    "error",
    [PlatformAPIError("bad request", errcode=400), AuthError("token refused")],
    ids=["permanent", "auth"],
)
async def test_sender_non_retryable_raises_at_once(
    store: MemoryStore,
    clock: Any,
    platform: Any,
    metrics: Metrics,
    sample: Callable[..., float],
    make_ctx: Callable[..., Any],
    error: PlatformAPIError,
) -> None:
    """A permanent error is raised on the first attempt, without waiting."""
    platform.failures = [error]
    with pytest.raises(PlatformAPIError) as info:
        await _sender(platform, store, metrics, clock).send_all(
            make_ctx(), [OutboundReply(text="hi")]
        )
    assert info.value is error
    assert platform.attempts == 1
    assert clock.sleeps == []
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="failed") == 1


async def test_sender_stops_at_failed_part(
    store: MemoryStore,
    clock: Any,
    make_platform: Any,
    metrics: Metrics,
    make_ctx: Callable[..., Any],
) -> None:
    """When part 1 fails, part 0 stays recorded (a resume would skip it) and part 2 is not sent."""

    class FailSecond(make_platform):  # type: ignore[misc]
        async def send(self, message: Any, reply: OutboundReply) -> None:
            if reply.part == 1:
                raise PlatformAPIError("too long")
            await super().send(message, reply)

    plat = FailSecond()
    parts = [OutboundReply(text=str(i), part=i) for i in range(3)]
    with pytest.raises(PlatformAPIError):
        await _sender(plat, store, metrics, clock).send_all(make_ctx(), parts)
    assert plat.texts == ["0"]
    assert await store.was_sent(PLATFORM, "m1", 0)
    assert not await store.was_sent(PLATFORM, "m1", 2)


# -- SendStage ---------------------------------------------------------------------------


def _answered(make_ctx: Callable[..., Any], text: str = "question", answer: str = "answer") -> Any:
    ctx = make_ctx(text=text)
    ctx.context_key = "dingtalk:cid-1"
    ctx.answer = answer
    ctx.replies = [OutboundReply(text=answer)]
    return ctx


async def test_send_stage_sends_and_remembers(
    store: MemoryStore, clock: Any, platform: Any, metrics: Metrics, make_ctx: Callable[..., Any]
) -> None:
    """The parts go out, then the exchange joins the history, which keeps ``keep_turns`` turns."""
    older = [_turn("user" if i % 2 == 0 else "assistant", f"t{i}", clock()) for i in range(4)]
    await store.append("dingtalk:cid-1", older, keep=10)
    stage = SendStage(_sender(platform, store, metrics, clock), store, keep_turns=3, clock=clock)
    ctx = _answered(make_ctx)
    assert await stage(ctx) is ctx
    assert platform.texts == ["answer"]
    history = await store.load("dingtalk:cid-1", since=0)
    assert history == [
        older[3],
        ContextTurn("user", "question", clock(), "m1"),
        ContextTurn("assistant", "answer", clock(), "m1"),
    ]


@pytest.mark.parametrize(
    ("remember", "keep_turns", "key"),
    [(False, 5, "dingtalk:cid-1"), (True, 0, "dingtalk:cid-1"), (True, 5, "")],
    ids=["remember-off", "keep-zero", "no-key"],
)
async def test_send_stage_does_not_remember(
    store: MemoryStore,
    clock: Any,
    platform: Any,
    metrics: Metrics,
    make_ctx: Callable[..., Any],
    remember: bool,
    keep_turns: int,
    key: str,
) -> None:
    """With ``remember`` off, ``keep_turns=0`` or no context key, history is left alone."""
    stage = SendStage(
        _sender(platform, store, metrics, clock), store, keep_turns=keep_turns, clock=clock
    )
    ctx = _answered(make_ctx)
    ctx.remember = remember
    ctx.context_key = key
    assert await stage(ctx) is ctx
    assert platform.texts == ["answer"]
    assert await store.load("dingtalk:cid-1", since=0) == []
    assert await store.load("", since=0) == []


async def test_send_stage_failed_send_not_remembered(
    store: MemoryStore, clock: Any, platform: Any, metrics: Metrics, make_ctx: Callable[..., Any]
) -> None:
    """An answer that could not be sent does not join the history."""
    platform.failures = [PlatformAPIError("gone")]
    stage = SendStage(_sender(platform, store, metrics, clock), store, keep_turns=5, clock=clock)
    with pytest.raises(PlatformAPIError):
        await stage(_answered(make_ctx))
    assert await store.load("dingtalk:cid-1", since=0) == []


def test_turn_context_defaults(make_ctx: Callable[..., Any]) -> None:
    """A new TurnContext remembers by default, is not resumed and has nothing computed."""
    ctx: TurnContext = make_ctx()
    assert (ctx.remember, ctx.resumed, ctx.answer, ctx.replies, ctx.generation) == (
        True,
        False,
        "",
        [],
        None,
    )


async def test_send_stage_does_not_remember_when_nothing_was_delivered(
    store: MemoryStore, clock: Any, platform: Any, metrics: Metrics, make_ctx: Callable[..., Any]
) -> None:
    """A resumed message whose parts all went out before the restart adds no history."""
    await store.put(make_ctx().message)
    await store.record_sent("dingtalk", "m1", 0, clock())
    stage = SendStage(_sender(platform, store, metrics, clock), store, keep_turns=4, clock=clock)
    ctx = _answered(make_ctx)
    ctx.resumed = True
    assert await stage(ctx) is ctx
    assert platform.texts == []
    assert ctx.sent_parts == 0
    assert await store.load("dingtalk:cid-1", since=0) == []


async def test_history_ignores_the_current_messages_own_turns(
    store: MemoryStore, clock: Any, make_ctx: Callable[..., Any]
) -> None:
    """Turns written for this very message before a crash are not shown to the model again."""
    await store.append(
        "dingtalk:cid-1",
        [
            _turn("user", "earlier", clock()),
            _turn("assistant", "earlier answer", clock()),
            ContextTurn("user", "question", clock(), "m1"),
            ContextTurn("assistant", "answer", clock(), "m1"),
        ],
        keep=10,
    )
    ctx = make_ctx(text="question")
    out = await _history(store, clock)(ctx)
    assert not isinstance(out, Drop)
    assert [t.content for t in out.history] == ["earlier", "earlier answer"]


# -- streamed answers (GenerateStage + ReplySender + SendStage) --------------------------


class _Stream:
    """A ReplyStream that records what it is shown; ``finish_error``/``fail_error`` raise."""

    def __init__(
        self,
        *,
        finish_error: Exception | None = None,
        fail_error: Exception | None = None,
    ) -> None:
        self.updates: list[str] = []
        self.behind = False  # every update is shown at once
        self.finished: list[str] = []
        self.failed: list[str] = []
        self.finish_error = finish_error
        self.fail_error = fail_error

    async def update(self, text: str) -> None:
        self.updates.append(text)

    async def finish(self, text: str) -> None:
        if self.finish_error is not None:
            raise self.finish_error
        self.finished.append(text)

    async def fail(self, notice: str) -> None:
        if self.fail_error is not None:
            raise self.fail_error
        self.failed.append(notice)


class _SlowStream(_Stream):
    """A stream that shows an update only every third delta (``behind`` in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    @property  # type: ignore[override]
    def behind(self) -> bool:
        self.asked += 1
        return self.asked % 3 != 1

    @behind.setter
    def behind(self, value: bool) -> None:
        pass


def _opener(stream: _Stream | None, seen: list[Any]) -> Callable[..., Any]:
    async def open_stream(ctx: TurnContext) -> _Stream | None:
        seen.append(ctx)
        return stream

    return open_stream


def _streaming_stage(
    backend: Any, metrics: Metrics, stream: _Stream | None, seen: list[Any]
) -> Any:
    return GenerateStage(
        {"default": backend},
        system_prompts={},
        metrics=metrics,
        failure_notice=FAILURE,
        streams=_opener(stream, seen),
    )


async def test_generate_stream_builds_no_view_while_the_stream_is_behind(
    make_ctx: Callable[..., Any], make_backend: Callable[..., Any], metrics: Metrics
) -> None:
    """The view (outbound safety over the whole answer so far) is built only when the stream
    can show it, not for every delta; the final text still passes it and finishes the stream."""
    views: list[str] = []

    async def view(ctx: TurnContext, text: str) -> str:
        views.append(text)
        return text.upper()

    stream = _SlowStream()
    stage = GenerateStage(
        {"default": make_backend("default", [f"{i} " for i in range(7)])},
        system_prompts={},
        metrics=metrics,
        failure_notice=FAILURE,
        streams=_opener(stream, []),
        view=view,
    )
    ctx = make_ctx()
    ctx.model_name = "default"
    assert await stage(ctx) is ctx
    assert stream.updates == ["0 ", "0 1 2 3 ", "0 1 2 3 4 5 6 "]
    assert views == ["0 ", "0 1 2 3 ", "0 1 2 3 4 5 6 ", "0 1 2 3 4 5 6 "]  # 3 + the final
    assert stream.finished == ["0 1 2 3 4 5 6 "]


async def test_generate_stream_gets_every_prefix_then_final_text(
    make_ctx: Callable[..., Any], make_backend: Callable[..., Any], metrics: Metrics
) -> None:
    """Each delta shows the whole text so far; the final text finishes the stream."""
    stream, seen = _Stream(), []
    stage = _streaming_stage(make_backend("default", ["你", "好", "!"]), metrics, stream, seen)
    ctx = make_ctx()
    ctx.model_name = "default"
    assert await stage(ctx) is ctx
    assert seen == [ctx]
    assert stream.updates == ["你", "你好", "你好!"]
    assert stream.finished == ["你好!"]
    assert stream.failed == []
    assert ctx.streamed
    assert ctx.answer == "你好!"


async def test_generate_stream_declined_keeps_plain_path(
    make_ctx: Callable[..., Any], make_backend: Callable[..., Any], metrics: Metrics
) -> None:
    """When the opener returns None the answer is generated as usual and not streamed."""
    seen: list[Any] = []
    stage = _streaming_stage(make_backend("default", ["a", "b"]), metrics, None, seen)
    ctx = make_ctx()
    ctx.model_name = "default"
    assert await stage(ctx) is ctx
    assert len(seen) == 1
    assert not ctx.streamed
    assert ctx.answer == "ab"


async def test_generate_stream_empty_answer_finishes_with_placeholder(
    make_ctx: Callable[..., Any], make_backend: Callable[..., Any], metrics: Metrics
) -> None:
    """A blank answer finishes the stream with the same placeholder a reply would carry."""
    stream = _Stream()
    stage = _streaming_stage(make_backend("default", ["  "]), metrics, stream, [])
    ctx = make_ctx()
    ctx.model_name = "default"
    await stage(ctx)
    assert stream.finished == [EMPTY_ANSWER]
    assert ctx.streamed


async def test_generate_stream_not_finished_falls_back_to_reply(
    make_ctx: Callable[..., Any], make_backend: Callable[..., Any], metrics: Metrics
) -> None:
    """If the platform does not accept the final text, the answer goes out as plain parts."""
    stream = _Stream(finish_error=PlatformAPIError("card gone"))
    stage = _streaming_stage(make_backend("default", ["x"]), metrics, stream, [])
    ctx = make_ctx()
    ctx.model_name = "default"
    assert await stage(ctx) is ctx
    assert stream.updates == ["x"]
    assert not ctx.streamed
    assert ctx.answer == "x"


async def test_generate_model_error_fails_stream_without_extra_notice(
    make_ctx: Callable[..., Any],
    make_backend: Callable[..., Any],
    metrics: Metrics,
    sample: Callable[..., float],
) -> None:
    """A model failure shows the notice in the stream; the Drop then carries no notice."""
    stream = _Stream()
    backend = make_backend("default", ["part"], error=ModelTimeout("slow"))
    stage = _streaming_stage(backend, metrics, stream, [])
    ctx = make_ctx()
    ctx.model_name = "default"
    assert await stage(ctx) == Drop("model_timeout", notice=None, failed=True)
    assert stream.updates == ["part"]
    assert stream.failed == [FAILURE]
    assert stream.finished == []
    assert not ctx.streamed
    assert sample("imrelay_model_requests_total", model="default", outcome="timeout") == 1


async def test_generate_model_error_stream_refused_sends_notice(
    make_ctx: Callable[..., Any], make_backend: Callable[..., Any], metrics: Metrics
) -> None:
    """When the stream cannot show the failure, the Drop carries the notice as usual."""
    stream = _Stream(fail_error=PlatformAPIError("card gone"))
    backend = make_backend("default", [], error=ModelUnavailable("down"))
    stage = _streaming_stage(backend, metrics, stream, [])
    ctx = make_ctx()
    ctx.model_name = "default"
    assert await stage(ctx) == Drop("model_unavailable", notice=FAILURE, failed=True)


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "no-stream"])
async def test_generate_unexpected_error_propagates(
    make_ctx: Callable[..., Any],
    make_backend: Callable[..., Any],
    metrics: Metrics,
    streaming: bool,
) -> None:
    """An error that is not a ModelError propagates; an open stream is marked failed first."""
    stream = _Stream() if streaming else None
    backend = make_backend("default", ["x"], error=RuntimeError("bug"))
    stage = _streaming_stage(backend, metrics, stream, [])
    ctx = make_ctx()
    ctx.model_name = "default"
    with pytest.raises(RuntimeError, match="bug"):
        await stage(ctx)
    if stream is not None:
        assert stream.failed == [FAILURE]


async def test_sender_open_stream_without_capability_is_none(
    store: MemoryStore, clock: Any, platform: Any, metrics: Metrics, make_ctx: Callable[..., Any]
) -> None:
    """A platform without ``open_stream`` never streams."""
    assert await _sender(platform, store, metrics, clock).open_stream(make_ctx()) is None


async def test_sender_open_stream_asks_platform(
    store: MemoryStore, clock: Any, platform: Any, metrics: Metrics, make_ctx: Callable[..., Any]
) -> None:
    """A streaming platform is asked with the message; its answer is returned."""
    stream, asked = _Stream(), []

    async def open_stream(message: Any) -> _Stream:
        asked.append(message)
        return stream

    platform.open_stream = open_stream
    ctx = make_ctx()
    assert await _sender(platform, store, metrics, clock).open_stream(ctx) is stream
    assert asked == [ctx.message]


@pytest.mark.parametrize(("recorded", "opened"), [(True, False), (False, True)])
async def test_sender_open_stream_resumed_checks_outbox(
    store: MemoryStore,
    clock: Any,
    platform: Any,
    metrics: Metrics,
    make_ctx: Callable[..., Any],
    recorded: bool,
    opened: bool,
) -> None:
    """A resumed message whose part 0 already went out gets no new stream."""
    asked: list[Any] = []

    async def open_stream(message: Any) -> _Stream:
        asked.append(message)
        return _Stream()

    platform.open_stream = open_stream
    if recorded:
        await store.record_sent(PLATFORM, "m1", 0, clock())
    result = await _sender(platform, store, metrics, clock).open_stream(make_ctx(resumed=True))
    assert (result is not None) is opened
    assert len(asked) == int(opened)


async def test_send_stage_streamed_answer_recorded_not_sent(
    store: MemoryStore,
    clock: Any,
    platform: Any,
    metrics: Metrics,
    sample: Callable[..., float],
    make_ctx: Callable[..., Any],
) -> None:
    """A streamed answer is recorded as every part it would have been, sent once, remembered."""
    stage = SendStage(_sender(platform, store, metrics, clock), store, keep_turns=4, clock=clock)
    ctx = _answered(make_ctx)
    ctx.replies = [OutboundReply(text="a", part=0), OutboundReply(text="b", part=1)]
    ctx.streamed = True
    assert await stage(ctx) is ctx
    assert platform.attempts == 0
    assert ctx.sent_parts == 1
    assert await store.was_sent(PLATFORM, "m1", 0)
    assert await store.was_sent(PLATFORM, "m1", 1)
    assert sample("imrelay_replies_total", platform=PLATFORM, outcome="sent") == 1
    history = await store.load("dingtalk:cid-1", since=0)
    assert [t.content for t in history] == ["question", "answer"]


async def test_sender_record_streamed_without_parts_records_part_zero(
    store: MemoryStore, clock: Any, platform: Any, metrics: Metrics, make_ctx: Callable[..., Any]
) -> None:
    """Even with no formatted parts, the streamed answer is recorded as part 0."""
    ctx = make_ctx()
    await _sender(platform, store, metrics, clock).record_streamed(ctx, [])
    assert await store.was_sent(PLATFORM, "m1", 0)
    assert not await store.was_sent(PLATFORM, "m1", 1)
    assert ctx.sent_parts == 1


class _LateTextBackend:
    """A backend that yields deltas but fills ``result.text`` only when it ends."""

    name = "late"

    async def generate(self, messages: Any, result: Any) -> Any:
        for delta in ("one ", "two"):
            yield delta
        result.text = "one two"


async def test_generate_stream_text_built_from_deltas(
    make_ctx: Callable[..., Any], metrics: Metrics
) -> None:
    """The stream sees the deltas add up even when the backend fills the text only at the end."""
    stream = _Stream()
    stage = _streaming_stage(_LateTextBackend(), metrics, stream, [])
    ctx = make_ctx()
    ctx.model_name = "default"
    await stage(ctx)
    assert stream.updates == ["one ", "one two"]
    assert stream.finished == ["one two"]


async def test_generate_stream_shows_no_reasoning_and_the_safety_view(
    make_ctx: Callable[..., Any], make_backend: Callable[..., Any], metrics: Metrics
) -> None:
    """A streamed answer never shows a <think> block, and each snapshot passes the view."""

    async def view(ctx: TurnContext, text: str) -> str:
        return text.replace("secret", "******")

    stream = _Stream()
    stage = GenerateStage(
        {"default": make_backend("default", ["<think>plan", "</think>", "the secret", " word"])},
        system_prompts={},
        metrics=metrics,
        failure_notice=FAILURE,
        streams=_opener(stream, []),
        view=view,
    )
    ctx = make_ctx()
    ctx.model_name = "default"
    assert await stage(ctx) is ctx
    assert all(
        "<think>" not in u and "plan" not in u and "secret" not in u for u in stream.updates
    )
    assert stream.finished == ["the ****** word"]
