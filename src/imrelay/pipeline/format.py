"""The format stage: turn the model's answer into reply parts."""

from __future__ import annotations

from collections.abc import Mapping

from imrelay.message import OutboundReply
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.pipeline.split import split_text

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
    """Reply parts within the platform's length limit; markdown where configured; @sender.

    An answer longer than the platform's ``max_chars`` is split by
    :func:`~imrelay.pipeline.split.split_text` (paragraph and code-fence aware, numbered
    ``(i/n)``); parts are numbered ``part`` 0..n-1. Each markdown part gets a title: the
    answer's title followed by `` (i/n)`` when split. Only the first part @-mentions the sender
    (in groups).

    Args:
        markdown: per platform, whether replies are markdown (default: markdown).
        max_chars: per platform, the most characters one reply part may hold (the mention the
            connector may put in front of the first part is not counted); a platform missing
            here gets its answer in one part.
    """

    name = "format"

    def __init__(
        self, *, markdown: Mapping[str, bool], max_chars: Mapping[str, int] | None = None
    ) -> None:
        self.markdown = markdown
        self.max_chars = max_chars or {}

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        answer = ctx.answer if ctx.shown_answer is None else ctx.shown_answer
        text = answer.strip() or EMPTY_ANSWER
        platform = ctx.message.platform
        md = self.markdown.get(platform, True)
        limit = self.max_chars.get(platform)
        parts = split_text(text, limit) if limit is not None else [text]
        title = title_of(text) if md else ""
        group = ctx.message.conversation.kind == "group"
        total = len(parts)
        ctx.replies = [
            OutboundReply(
                text=part,
                markdown=md,
                title=f"{title} ({i + 1}/{total})" if md and total > 1 else title,
                mention_sender=group and i == 0,
                part=i,
            )
            for i, part in enumerate(parts)
        ]
        return ctx
