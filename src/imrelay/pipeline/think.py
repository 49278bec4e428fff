"""The think stage: remove a model's reasoning blocks from its answer.

It runs right after the generate stage, so the formatted reply, the stored context (the send
stage stores ``ctx.answer``) and the audit record all see the answer without its
``<think>…</think>`` blocks (see :mod:`imrelay.routing.think` for the forms removed).
"""

from __future__ import annotations

from imrelay.pipeline.context import Drop, TurnContext
from imrelay.routing.think import strip_think

__all__ = ["ThinkStage"]


class ThinkStage:
    """Strip reasoning blocks from ``ctx.answer``."""

    name = "think"

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        answer = strip_think(ctx.answer)
        if answer != ctx.answer:
            ctx.log.debug(
                "reasoning removed from the answer (%d of %d characters kept)",
                len(answer),
                len(ctx.answer),
            )
            ctx.answer = answer
        return ctx
