"""Sending replies exactly once, and the send stage.

Theory of operation: a reply part is identified by ``(platform, message_id, part)``. Before a
part is sent for a message that was resumed after a restart, the outbox is asked whether it was
already accepted; after the platform accepts a part, it is recorded. Retryable platform errors
(throttling, 5xx, network) are retried with exponential backoff within a deadline; a permanent
error fails the message. After all parts are sent, the exchange joins the conversation's
history, unless this run delivered nothing (a resumed message whose parts had all gone out
before the restart): the answer just generated was never seen by the user, and the one that
was seen may already be in the history.

A streamed answer (``ctx.streamed``: shown while generated, e.g. in a DingTalk AI card) was
delivered by the generate stage; it counts as reply part 0. The send stage records every part
index of it as sent instead of sending anything, so a restart after that point sends nothing
again. :meth:`ReplySender.open_stream` opens such a stream only when part 0 of a resumed
message is not recorded yet: an answer that already went out (streamed or not) is not
streamed a second time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from imrelay.errors import PlatformAPIError, RateLimited
from imrelay.message import OutboundReply
from imrelay.observability.metrics import CounterChildren, Metrics
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.platforms.base import Platform, ReplyStream
from imrelay.stores.base import ContextStore, ContextTurn, Outbox

__all__ = ["ReplySender", "SendStage"]


class ReplySender:
    """Send reply parts through their platform, each at most once."""

    def __init__(
        self,
        platforms: Mapping[str, Platform],
        outbox: Outbox,
        metrics: Metrics,
        *,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        deadline_s: float = 120.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.platforms = platforms
        self.outbox = outbox
        self.metrics = metrics
        self._replies = CounterChildren(metrics.replies)
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.deadline_s = deadline_s
        self.clock = clock
        self.sleep = sleep

    async def open_stream(self, ctx: TurnContext) -> ReplyStream | None:
        """Open a streamed answer to ``ctx.message`` when its platform can stream one.

        Returns:
            The stream; ``None`` when the platform does not stream (no ``open_stream``, or it
            declined) or when part 0 of a resumed message was already sent.
        """
        msg = ctx.message
        opener = getattr(self.platforms.get(msg.platform), "open_stream", None)
        if opener is None:
            return None
        if ctx.resumed and await self.outbox.was_sent(msg.platform, msg.message_id, 0):
            return None
        stream: ReplyStream | None = await opener(msg)
        return stream

    async def record_streamed(self, ctx: TurnContext, replies: Sequence[OutboundReply]) -> None:
        """Record a streamed answer as delivered: part 0 and every other part of ``replies``.

        Nothing is sent; the answer counts as one part sent by this run.
        """
        msg = ctx.message
        ctx.sent_parts += 1
        now = self.clock()
        for part in sorted({0, *(reply.part for reply in replies)}):
            await self.outbox.record_sent(msg.platform, msg.message_id, part, now)
        self._replies(msg.platform, "sent").inc()

    async def send_all(self, ctx: TurnContext, replies: Sequence[OutboundReply]) -> None:
        """Send every part not recorded as sent yet.

        Raises:
            PlatformAPIError: a part could not be sent (after retries, for retryable errors).
        """
        msg = ctx.message
        platform = self.platforms[msg.platform]
        for reply in replies:
            if ctx.resumed and await self.outbox.was_sent(
                msg.platform, msg.message_id, reply.part
            ):
                self._replies(msg.platform, "skipped").inc()
                continue
            await self._send_one(ctx, platform, reply)
            ctx.sent_parts += 1
            await self.outbox.record_sent(msg.platform, msg.message_id, reply.part, self.clock())
            self._replies(msg.platform, "sent").inc()

    async def _send_one(self, ctx: TurnContext, platform: Platform, reply: OutboundReply) -> None:
        deadline = self.clock() + self.deadline_s
        attempt = 0
        while True:
            attempt += 1
            try:
                await platform.send(ctx.message, reply)
                return
            except PlatformAPIError as exc:
                if not exc.retryable or attempt >= self.max_attempts:
                    self._replies(ctx.message.platform, "failed").inc()
                    raise
                delay = self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random() / 2)  # nosec B311  # retry jitter
                if isinstance(exc, RateLimited):
                    delay = max(delay, exc.retry_after)
                if self.clock() + delay > deadline:
                    self._replies(ctx.message.platform, "failed").inc()
                    raise
                ctx.log.info("send attempt %d failed (%s); retrying in %.2fs", attempt, exc, delay)
                await self.sleep(delay)


class SendStage:
    """Send the formatted parts (or record a streamed answer), then remember the exchange."""

    name = "send"

    def __init__(
        self,
        sender: ReplySender,
        history: ContextStore,
        *,
        keep_turns: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sender = sender
        self.history = history
        self.keep_turns = keep_turns
        self.clock = clock

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        if ctx.streamed:
            await self.sender.record_streamed(ctx, ctx.replies)
        else:
            await self.sender.send_all(ctx, ctx.replies)
        if ctx.remember and ctx.sent_parts and self.keep_turns > 0 and ctx.context_key:
            now = self.clock()
            await self.history.append(
                ctx.context_key,
                [
                    ContextTurn("user", ctx.message.text, now, ctx.message.message_id),
                    ContextTurn("assistant", ctx.answer, now, ctx.message.message_id),
                ],
                keep=self.keep_turns,
            )
        return ctx
