"""The route stage with the rule engine, token counters in the context stage, the think stage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from imrelay.config import Settings
from imrelay.errors import ConfigError
from imrelay.message import InboundMessage
from imrelay.observability.metrics import Metrics
from imrelay.pipeline.history import PER_TURN_OVERHEAD, HistoryStage, trim_to_budget
from imrelay.pipeline.model import build_prompt
from imrelay.pipeline.route import RouteStage
from imrelay.pipeline.think import ThinkStage
from imrelay.routing.rules import Router
from imrelay.routing.tokens import EstimateCounter, TokenizerCounter
from imrelay.stores.base import ContextTurn
from imrelay.stores.memory import MemoryStore

KEY = "dingtalk:cid-1"


def router(**routing: Any) -> Router:
    """A router over echo models qwen, coder and finance."""
    routing.setdefault("default", "qwen")
    data = {
        "models": {n: {"type": "echo"} for n in ("qwen", "coder", "finance")},
        "routing": routing,
    }
    return Router(Settings.model_validate(data).routing)


# -- RouteStage ---------------------------------------------------------------------------------


async def test_route_stage_records_model_reason_and_rule_prompt(
    make_ctx: Callable[..., Any], metrics: Metrics, sample: Callable[..., float]
) -> None:
    """The decision's model, reason and the rule's system prompt land on the context."""
    stage = RouteStage(
        router(
            by_kind={"code": "coder"},
            rules=[
                {"name": "fin", "match": {"keyword": "tax"}, "model": "finance",
                 "system_prompt": "Be exact."},
            ],
        ),
        metrics=metrics,
    )  # fmt: skip
    ctx = make_ctx(text="a tax question")
    assert await stage(ctx) is ctx
    assert (ctx.model_name, ctx.system_prompt) == ("finance", "Be exact.")
    assert ctx.route_reason == "rule fin: keyword 'tax'"
    ctx = make_ctx(text="x = 1\ny = 2")
    await stage(ctx)
    assert (ctx.model_name, ctx.system_prompt) == ("coder", None)
    assert ctx.route_reason == "by_kind.code: code (2 of 2 lines look like code)"
    assert sample("imrelay_route_decisions_total", model="finance", rule="rule fin", canary="none")
    assert sample(
        "imrelay_route_decisions_total", model="coder", rule="by_kind.code", canary="none"
    )


async def test_route_stage_without_a_router_uses_default_and_by_kind(
    make_ctx: Callable[..., Any],
) -> None:
    """The old form (``default``, ``by_kind``) still works; ``pick`` answers by kind."""
    stage = RouteStage(default="chat", by_kind={"image": "vision"})
    ctx = make_ctx(kind="image")
    await stage(ctx)
    assert ctx.model_name == "vision"
    assert stage.pick("image") == "vision"
    assert stage.pick("audio") == "chat"
    assert RouteStage().pick("text") == "default"


async def test_route_stage_counts_canary_arms(
    make_ctx: Callable[..., Any], metrics: Metrics, sample: Callable[..., float]
) -> None:
    """A canary rule's decision is counted with its arm."""
    stage = RouteStage(
        router(
            rules=[{"name": "c", "model": "qwen", "canary": {"model": "coder", "percent": 100}}]
        ),
        metrics=metrics,
    )
    await stage(make_ctx())
    assert sample(
        "imrelay_route_decisions_total", model="coder", rule="rule c", canary="candidate"
    )


async def test_route_stage_department_rules_need_a_lookup(make_ctx: Callable[..., Any]) -> None:
    """Department rules without a lookup are refused; with one, the sender's departments count."""
    departments = router(
        rules=[{"model": "qwen"}, {"match": {"department": "d7"}, "model": "finance"}]
    )
    with pytest.raises(ConfigError) as info:
        RouteStage(departments)
    assert info.value.key == "routing.rules.1.match.department"
    looked_up: list[InboundMessage] = []

    async def lookup(message: InboundMessage) -> frozenset[str]:
        looked_up.append(message)
        return frozenset({"d7"})

    stage = RouteStage(
        router(rules=[{"match": {"department": "d7"}, "model": "finance"}]), departments_of=lookup
    )
    ctx = make_ctx()
    await stage(ctx)
    assert ctx.model_name == "finance"
    assert looked_up == [ctx.message]
    plain = RouteStage(router(), departments_of=lookup)  # no department rule: no lookup
    await plain(make_ctx())
    assert len(looked_up) == 1


# -- build_prompt with a rule's system prompt -----------------------------------------------------


def test_route_rule_system_prompt_replaces_the_models(make_ctx: Callable[..., Any]) -> None:
    """A rule's prompt wins over the model's; an empty one means no system message."""
    ctx = make_ctx(text="q")
    assert build_prompt(ctx, "model prompt")[0] == {"role": "system", "content": "model prompt"}
    ctx.system_prompt = "rule prompt"
    assert build_prompt(ctx, "model prompt")[0] == {"role": "system", "content": "rule prompt"}
    ctx.system_prompt = ""
    assert build_prompt(ctx, "model prompt") == [{"role": "user", "content": "q"}]


# -- HistoryStage with counters -------------------------------------------------------------------


def word_tokenizer(directory: Path) -> TokenizerCounter:
    """A counter whose tokenizer counts one token per whitespace-separated word."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    tokenizer.train_from_iterator(["aaaaaaaa bbbbbbbb"], trainer=trainer)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return TokenizerCounter(path)


def _turns(at: float, *texts: str) -> list[ContextTurn]:
    roles = ("user", "assistant")
    return [ContextTurn(roles[i % 2], t, at, f"old{i // 2}") for i, t in enumerate(texts)]


async def test_history_counts_with_the_routed_models_tokenizer(
    store: MemoryStore, clock: Any, make_ctx: Callable[..., Any], tmp_path: Path
) -> None:
    """The routed model's counter decides what fits; other models use the default counter."""
    words = "aaaaaaaa " * 4  # 4 tokens by the tokenizer, 9 by the estimate
    turns = _turns(clock(), words, words, words, words)
    await store.append(KEY, turns, keep=20)
    stage = HistoryStage(
        store,
        scope="conversation",
        max_turns=20,
        max_tokens=5 * (4 + PER_TURN_OVERHEAD),  # the message and four turns, by tokenizer
        ttl_s=3600,
        clock=clock,
        counters={"local": word_tokenizer(tmp_path)},
    )
    assert isinstance(stage.counter, EstimateCounter)
    ctx = make_ctx(text=words)
    ctx.model_name = "local"
    await stage(ctx)
    assert ctx.history == turns
    ctx = make_ctx(text=words)
    ctx.model_name = "remote"  # estimated: 9 + 4 per turn, so only two turns fit
    await stage(ctx)
    assert ctx.history == turns[2:]
    assert stage.counter_for("local") is stage.counters["local"]
    assert stage.counter_for("remote") is stage.counter


def test_history_trim_to_budget_with_a_counter(tmp_path: Path) -> None:
    """``trim_to_budget`` counts with the counter it is given."""
    counter = word_tokenizer(tmp_path)
    turns = _turns(0.0, "aaaaaaaa bbbbbbbb", "aaaaaaaa")
    assert trim_to_budget(turns, 2 + 1 + 2 * PER_TURN_OVERHEAD, 10, counter) == turns
    assert trim_to_budget(turns, 2 + 1 + 2 * PER_TURN_OVERHEAD, 10) == []  # the estimate: 5 + 2


async def test_history_removes_reasoning_from_stored_answers(
    store: MemoryStore, clock: Any, make_ctx: Callable[..., Any]
) -> None:
    """Answers stored with a <think> block are given to the model without it."""
    turns = _turns(clock(), "<think>not an answer</think>q", "<think>plan</think>\n\nfour")
    await store.append(KEY, turns, keep=20)
    stage = HistoryStage(
        store, scope="conversation", max_turns=20, max_tokens=3000, ttl_s=3600, clock=clock
    )
    ctx = make_ctx()
    await stage(ctx)
    assert [t.content for t in ctx.history] == ["<think>not an answer</think>q", "four"]
    assert ctx.history[0] is turns[0]  # user turns are left as written


# -- ThinkStage ---------------------------------------------------------------------------------


async def test_think_stage_strips_the_answer(make_ctx: Callable[..., Any]) -> None:
    """The answer loses its reasoning block; an answer without one is left alone."""
    stage = ThinkStage()
    assert stage.name == "think"
    ctx = make_ctx()
    ctx.answer = "<think>2+2 is 4</think>\n\nFour."
    assert await stage(ctx) is ctx
    assert ctx.answer == "Four."
    ctx.answer = answer = "Plain."
    await stage(ctx)
    assert ctx.answer is answer
