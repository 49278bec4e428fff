"""Stages that decide whether a message gets a model answer at all: dedup, access, kind."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection

from imrelay.pipeline.context import Drop, TurnContext
from imrelay.pipeline.media import has_pictures
from imrelay.stores.base import Inbox, MessageState

__all__ = ["DUPLICATE", "AccessStage", "DedupStage", "KindStage"]

DUPLICATE = "duplicate"


class DedupStage:
    """Drop a message this process already finished; otherwise claim it (``processing``).

    The inbox deduplicates redeliveries durably at intake; this stage guards the worker itself
    (a message resumed at start-up that a racing redelivery also brought in). A message it
    drops keeps its state.
    """

    name = "dedup"

    def __init__(self, inbox: Inbox, capacity: int = 65536) -> None:
        self.inbox = inbox
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._capacity = capacity

    def finished(self, platform: str, message_id: str) -> None:
        """Remember that a message is done."""
        self._seen[(platform, message_id)] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        msg = ctx.message
        if (msg.platform, msg.message_id) in self._seen:
            return Drop(DUPLICATE)
        await self.inbox.set_state(msg.platform, msg.message_id, MessageState.PROCESSING)
        return ctx


class AccessStage:
    """In groups, answer only when the bot is @-mentioned (configurable); ignore empty text."""

    name = "access"

    def __init__(self, *, group_require_mention: bool = True) -> None:
        self.group_require_mention = group_require_mention

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        msg = ctx.message
        if (
            msg.conversation.kind == "group"
            and self.group_require_mention
            and not msg.mentions_bot
        ):
            return Drop("not_mentioned")
        return ctx


class KindStage:
    """Let through what a configured model can read; other kinds get a polite notice.

    * ``text``: passes; without text (DingTalk sends those when the organisation's quota is
      used up) it is dropped without a notice.
    * ``audio``: passes when the platform recognised speech in it (DingTalk's
      ``recognition``, which is the message's text); otherwise the notice.
    * ``image``: passes when some routing step names ``image`` (the media stage downloads it,
      or gives the notice if no such step matched this message).
    * ``rich``: with pictures, like ``image``; without, like ``text``.
    * ``file`` and ``video``: pass when some routing step names their kind (the media stage
      tells that model what was sent; imrelay does not read the content); otherwise the notice.
    * anything else: the notice.

    Args:
        unsupported_notice: sent for a message no model can take.
        routes: the kinds some routing step names (``Router.routed_kinds``: ``by_kind`` and
            the rules' ``kind``); a mapping's keys count.
    """

    name = "kind"

    def __init__(self, *, unsupported_notice: str, routes: Collection[str] | None = None) -> None:
        self.unsupported_notice = unsupported_notice
        self.routes = frozenset(routes or ())

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        msg = ctx.message
        kind = msg.kind
        if kind == "rich" and has_pictures(msg):
            kind = "image"
        if kind in ("text", "rich"):
            return ctx if msg.text.strip() else Drop("empty")
        if kind in ("image", "file", "video") and kind in self.routes:
            return ctx
        if kind == "audio" and msg.text.strip():
            return ctx
        return Drop("unsupported_kind", notice=self.unsupported_notice)
