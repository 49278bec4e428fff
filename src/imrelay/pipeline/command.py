"""Chat commands: ``/reset`` clears the conversation's context, ``/help`` explains the bot."""

from __future__ import annotations

from imrelay.pipeline.context import Drop, TurnContext
from imrelay.stores.base import ContextStore

__all__ = ["CommandStage", "context_key_for"]


def context_key_for(ctx: TurnContext, scope: str) -> str:
    """The history key of a message: its conversation, or its sender within it."""
    msg = ctx.message
    base = f"{msg.platform}:{msg.conversation.id}"
    if scope == "sender" and msg.conversation.kind == "group":
        return f"{base}:{msg.sender.id}"
    return base


class CommandStage:
    """Answer ``/reset`` and ``/help`` without a model; other text passes through."""

    name = "command"

    def __init__(
        self, store: ContextStore, *, scope: str, help_text: str, reset_notice: str
    ) -> None:
        self.store = store
        self.scope = scope
        self.help_text = help_text
        self.reset_notice = reset_notice

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        text = ctx.message.text.strip()
        if not text.startswith("/"):
            return ctx
        command = text.split(maxsplit=1)[0].lower()
        if command == "/reset":
            await self.store.clear(context_key_for(ctx, self.scope))
            return Drop("command", notice=self.reset_notice)
        if command == "/help":
            return Drop("command", notice=self.help_text)
        return ctx
