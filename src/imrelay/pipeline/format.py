"""The format stage: turn the model's answer into reply parts."""

from __future__ import annotations

from collections.abc import Mapping

from imrelay.message import OutboundReply
from imrelay.pipeline.context import Drop, TurnContext

__all__ = ["FormatStage", "title_of"]

EMPTY_ANSWER = "(the model returned an empty answer)"


def title_of(text: str, limit: int = 20) -> str:
    """The first non-empty line, without markdown markers, cut to ``limit`` characters."""
    for line in text.splitlines():
        line = line.strip().lstrip("#>*-` ").strip()
        if line:
            return line[:limit]
    return "reply"


class FormatStage:
    """One reply part, markdown where the platform is configured for it, @sender in groups."""

    name = "format"

    def __init__(self, *, markdown: Mapping[str, bool]) -> None:
        self.markdown = markdown

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        text = ctx.answer.strip() or EMPTY_ANSWER
        md = self.markdown.get(ctx.message.platform, True)
        ctx.replies = [
            OutboundReply(
                text=text,
                markdown=md,
                title=title_of(text) if md else "",
                mention_sender=ctx.message.conversation.kind == "group",
            )
        ]
        return ctx
