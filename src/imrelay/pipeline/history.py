"""The context stage: load the conversation's recent turns within a token budget.

Token counts here are an estimate (the model's own tokenizer is used when a model directory is
configured, in a later release): each CJK character counts as one token, and other text as one
token per four characters, rounded up, plus four tokens of overhead per turn.
"""

from __future__ import annotations

from collections.abc import Callable

from imrelay.pipeline.command import context_key_for
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.stores.base import ContextStore, ContextTurn

__all__ = ["HistoryStage", "estimate_tokens", "trim_to_budget"]

_PER_TURN_OVERHEAD = 4


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (
        0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= code <= 0x4DBF  # extension A
        or 0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0xAC00 <= code <= 0xD7AF  # hangul syllables
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0x3000 <= code <= 0x303F  # CJK punctuation
        or 0xFF00 <= code <= 0xFFEF  # full-width forms
    )


def estimate_tokens(text: str) -> int:
    """Estimate the tokens of ``text`` (see the module docstring)."""
    cjk = sum(1 for ch in text if _is_cjk(ch))
    other = len(text) - cjk
    return cjk + (other + 3) // 4


def trim_to_budget(turns: list[ContextTurn], budget: int, max_turns: int) -> list[ContextTurn]:
    """Keep the newest turns that fit both ``budget`` tokens and ``max_turns`` turns.

    The result never starts with an assistant turn (its question was cut off).
    """
    kept: list[ContextTurn] = []
    used = 0
    for turn in reversed(turns[-max_turns:] if max_turns else []):
        cost = estimate_tokens(turn.content) + _PER_TURN_OVERHEAD
        if used + cost > budget:
            break
        kept.append(turn)
        used += cost
    kept.reverse()
    while kept and kept[0].role != "user":
        kept.pop(0)
    return kept


class HistoryStage:
    """Attach the conversation's recent history to the turn."""

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
    ) -> None:
        self.store = store
        self.scope = scope
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.ttl_s = ttl_s
        self.clock = clock

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        ctx.context_key = context_key_for(ctx, self.scope)
        if self.max_turns == 0:
            return ctx
        turns = await self.store.load(ctx.context_key, since=self.clock() - self.ttl_s)
        # A message resumed after a crash may already have its own exchange in the history.
        own = ctx.message.message_id
        turns = [t for t in turns if t.message_id != own]
        # The current message's own text is part of the budget.
        budget = self.max_tokens - estimate_tokens(ctx.message.text) - _PER_TURN_OVERHEAD
        ctx.history = trim_to_budget(turns, max(budget, 0), self.max_turns)
        return ctx
