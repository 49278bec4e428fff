"""The context stage: load the conversation's recent turns within a token budget.

The history is kept in the store (so it survives restarts), per conversation or per sender
within a group (``context.scope``), for ``context.ttl_s``. The newest turns are kept while
they fit both ``context.max_turns`` and ``context.max_tokens``; the current message's own
tokens come out of the budget first. Tokens are counted by a
:class:`~imrelay.routing.tokens.TokenCounter`: the routed model's own tokenizer when one is
configured for it, else the default counter (``context.tokenizer``, or the estimate described
in :mod:`imrelay.routing.tokens`), plus four tokens of overhead per turn (the chat template's
role markers). Reasoning blocks (``<think>…</think>``) are removed from loaded answers, so a
history written before they were stripped does not carry them into the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from imrelay.pipeline.command import context_key_for
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.routing.think import strip_think
from imrelay.routing.tokens import EstimateCounter, TokenCounter, estimate_tokens
from imrelay.stores.base import ContextStore, ContextTurn

__all__ = ["PER_TURN_OVERHEAD", "HistoryStage", "estimate_tokens", "trim_to_budget"]

PER_TURN_OVERHEAD = 4
_ESTIMATE = EstimateCounter()


def trim_to_budget(
    turns: list[ContextTurn],
    budget: int,
    max_turns: int,
    counter: TokenCounter = _ESTIMATE,
) -> list[ContextTurn]:
    """Keep the newest turns that fit both ``budget`` tokens and ``max_turns`` turns.

    Each turn costs its tokens by ``counter`` plus :data:`PER_TURN_OVERHEAD`. The result
    never starts with an assistant turn (its question was cut off).
    """
    kept: list[ContextTurn] = []
    used = 0
    for turn in reversed(turns[-max_turns:] if max_turns else []):
        cost = counter.count(turn.content) + PER_TURN_OVERHEAD
        if used + cost > budget:
            break
        kept.append(turn)
        used += cost
    kept.reverse()
    while kept and kept[0].role != "user":
        kept.pop(0)
    return kept


def _without_reasoning(turn: ContextTurn) -> ContextTurn:
    if turn.role != "assistant":
        return turn
    content = strip_think(turn.content)
    return turn if content == turn.content else replace(turn, content=content)


class HistoryStage:
    """Attach the conversation's recent history to the turn.

    Args:
        store: where the history is kept.
        scope: ``conversation`` or ``sender`` (see :func:`context_key_for`).
        max_turns: at most this many turns (0: no history, the store is not read).
        max_tokens: the token budget, the current message included.
        ttl_s: turns older than this are ignored.
        clock: epoch seconds.
        counter: counts tokens when the routed model has no counter of its own.
        counters: a counter per model name (its own tokenizer).
    """

    name = "context"

    def __init__(
        self,
        store: ContextStore,
        *,
        scope: str,
        max_turns: int,
        max_tokens: int,
        ttl_s: float,
        clock: Callable[[], float],
        counter: TokenCounter = _ESTIMATE,
        counters: Mapping[str, TokenCounter] | None = None,
    ) -> None:
        self.store = store
        self.scope = scope
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.ttl_s = ttl_s
        self.clock = clock
        self.counter = counter
        self.counters = dict(counters or {})

    def counter_for(self, model: str) -> TokenCounter:
        """The counter for ``model`` (its own, else the default)."""
        return self.counters.get(model, self.counter)

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        ctx.context_key = context_key_for(ctx, self.scope)
        if self.max_turns == 0:
            return ctx
        turns = await self.store.load(ctx.context_key, since=self.clock() - self.ttl_s)
        # A message resumed after a crash may already have its own exchange in the history.
        own = ctx.message.message_id
        turns = [_without_reasoning(t) for t in turns if t.message_id != own]
        counter = self.counter_for(ctx.model_name)
        # The current message's own text is part of the budget.
        budget = self.max_tokens - counter.count(ctx.message.text) - PER_TURN_OVERHEAD
        ctx.history = trim_to_budget(turns, max(budget, 0), self.max_turns, counter)
        return ctx
