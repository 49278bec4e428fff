"""Runs the stages for one message, times each, and settles the message's final state.

Theory of operation: :meth:`Runner.handle` runs the stages in order (the first, dedup, marks
the message ``processing``) and ends in exactly one of three ways. Every stage passed: the
message is ``replied``. A stage returned a :class:`Drop`: its notice (if any) is sent, and the
message is ``dropped`` (or ``failed`` if the Drop says so). A stage raised: the failure is
logged with its stack, the configured failure notice is sent if possible (and if no part of an
answer went out already), and the message is ``failed``. Cancellation (shutdown past the drain
deadline) leaves the message ``processing``, so the next start resumes it.

Each of the three endings writes one INFO line, ``message <state>``, with the ECS fields an
operator searches by (``event.outcome``, ``event.reason``, ``event.duration`` from receipt, the
model's name, outcome and timings): the one per-message line above DEBUG, so that a log
pipeline has a record of every message without DEBUG's volume. It never holds message text.

While a message is handled, :data:`~imrelay.models.base.REQUEST_ID` holds its id: model
backends send it to their endpoint as ``x-request-id``, so the model server's logs can be
matched with the message's ``trace.id``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from imrelay.errors import PlatformAPIError
from imrelay.message import InboundMessage, OutboundReply
from imrelay.models.base import REQUEST_ID
from imrelay.observability.logging import log_context, message_logger
from imrelay.observability.metrics import HistogramChild, Metrics
from imrelay.pipeline.context import Drop, Stage, TurnContext
from imrelay.pipeline.filter import DUPLICATE, DedupStage
from imrelay.pipeline.send import ReplySender
from imrelay.stores.base import Inbox, MessageState

__all__ = ["Runner"]

logger = logging.getLogger(__name__)

_MODEL_DROP: Final = "model_"  # GenerateStage's Drop reasons: model_timeout, model_error, …
_NS: Final = 1_000_000_000


class Runner:
    """The fixed list of stages, and what happens after them."""

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        sender: ReplySender,
        inbox: Inbox,
        metrics: Metrics,
        dedup: DedupStage,
        failure_notice: str,
        include_text: bool = False,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.perf_counter,
        on_settled: Callable[[TurnContext, MessageState, str], Awaitable[None]] | None = None,
    ) -> None:
        self.stages = list(stages)
        # each stage's histogram child, looked up once (labels() takes a lock and a dict lookup)
        self._timers = [metrics.stage_latency.labels(stage.name) for stage in self.stages]
        self._done_timers: dict[str, tuple[HistogramChild, HistogramChild]] = {}  # per platform
        self.on_settled = on_settled
        self.sender = sender
        self.inbox = inbox
        self.metrics = metrics
        self.dedup = dedup
        self.failure_notice = failure_notice
        self.include_text = include_text
        self.wall_clock = wall_clock
        self.clock = clock

    async def handle(self, message: InboundMessage, *, resumed: bool = False) -> MessageState:
        """Process ``message`` to a final state and return it."""
        log = _logger_for(message)
        ctx = TurnContext(message=message, log=log, resumed=resumed)
        # model backends send it as x-request-id: the endpoint's logs match the message's trace
        request_id = REQUEST_ID.set(message.message_id)
        try:
            with log_context(log.extra):  # lines written by collaborators carry it too
                if self.include_text and logger.isEnabledFor(logging.DEBUG):
                    log.debug("processing %s message: %s", message.kind, message.text)
                try:
                    state = await self._run(ctx)
                except PlatformAPIError as exc:
                    log.warning("reply could not be sent: %s", exc)
                    state = await self._settle(ctx, MessageState.FAILED, "send_failed")
                except Exception:
                    log.exception("message processing failed")
                    await self._notify_failure(ctx)
                    state = await self._settle(ctx, MessageState.FAILED, "internal_error")
        finally:
            REQUEST_ID.reset(request_id)
        return state

    async def give_up(self, message: InboundMessage, reason: str) -> MessageState:
        """Settle ``message`` as ``failed`` with ``reason`` without running any stage.

        For a message that must not be processed again (the worker gives up on one that was
        started too many times without finishing): its state, metrics, audit record and INFO
        line are written as for any failed message; nothing is sent.
        """
        log = _logger_for(message)
        ctx = TurnContext(message=message, log=log, resumed=True)
        with log_context(log.extra):
            return await self._settle(ctx, MessageState.FAILED, reason)

    async def _run(self, ctx: TurnContext) -> MessageState:
        for stage, timer in zip(self.stages, self._timers, strict=True):
            started = self.clock()
            outcome = await stage(ctx)
            timer.observe(self.clock() - started)
            if isinstance(outcome, Drop):
                return await self._dropped(ctx, stage.name, outcome)
            ctx = outcome
        self._observe_done(ctx)
        return await self._settle(ctx, MessageState.REPLIED, "")

    async def _dropped(self, ctx: TurnContext, stage: str, drop: Drop) -> MessageState:
        ctx.log.debug("dropped at %s: %s", stage, drop.reason)
        if drop.reason == DUPLICATE:  # already settled by whoever handled it first
            self.metrics.messages_duplicate.labels(ctx.message.platform).inc()
            return MessageState.DROPPED
        if drop.notice:
            await self.sender.send_all(ctx, [_notice(ctx, drop.notice)])
            self._observe_done(ctx)
        state = MessageState.FAILED if drop.failed else MessageState.DROPPED
        return await self._settle(ctx, state, drop.reason)

    async def _notify_failure(self, ctx: TurnContext) -> None:
        if ctx.sent_parts:  # the user has the answer; an apology would contradict it
            return
        try:
            await self.sender.send_all(ctx, [_notice(ctx, self.failure_notice)])
        except Exception as exc:  # the failure is recorded below either way
            ctx.log.warning("failure notice could not be sent: %s", exc)

    def _observe_done(self, ctx: TurnContext) -> None:
        msg = ctx.message
        latency = max(self.wall_clock() - msg.received_at, 0.0)
        timers = self._done_timers.get(msg.platform)
        if timers is None:
            timers = self._done_timers[msg.platform] = (
                self.metrics.processing_latency.labels(msg.platform),
                self.metrics.gateway_overhead.labels(msg.platform),
            )
        timers[0].observe(latency)
        model_s = ctx.generation.total_s if ctx.generation is not None else 0.0
        timers[1].observe(max(latency - model_s, 0.0))

    async def _settle(self, ctx: TurnContext, state: MessageState, reason: str) -> MessageState:
        msg = ctx.message
        if state is MessageState.DROPPED:
            self.metrics.messages_dropped.labels(msg.platform, reason).inc()
        elif state is MessageState.FAILED:
            self.metrics.messages_failed.labels(msg.platform, reason).inc()
        await self.inbox.set_state(msg.platform, msg.message_id, state, reason)
        self.dedup.finished(msg.platform, msg.message_id)
        if self.on_settled is not None:  # e.g. the audit record
            await self.on_settled(ctx, state, reason)
        ctx.log.info(
            "message %s%s",
            state.value,
            f" ({reason})" if reason else "",
            extra=self._handled_fields(ctx, state, reason),
        )
        return state

    def _handled_fields(
        self, ctx: TurnContext, state: MessageState, reason: str
    ) -> dict[str, object]:
        """ECS fields of the one INFO line per message (see the module docstring)."""
        elapsed = max(self.wall_clock() - ctx.message.received_at, 0.0)
        fields: dict[str, object] = {
            "event.action": "message-handled",
            "event.outcome": "failure" if state is MessageState.FAILED else "success",
            "event.duration": int(elapsed * _NS),
            "imrelay.state": state.value,
        }
        if reason:
            fields["event.reason"] = reason
        gen = ctx.generation
        if gen is not None:
            fields["imrelay.model.name"] = ctx.model_name
            fields["imrelay.model.outcome"] = "ok"
            fields["imrelay.model.duration"] = int(gen.total_s * _NS)
            if gen.first_token_s is not None:
                fields["imrelay.model.first_token"] = int(gen.first_token_s * _NS)
            if gen.prompt_tokens is not None:
                fields["imrelay.model.tokens.prompt"] = gen.prompt_tokens
            if gen.completion_tokens is not None:
                fields["imrelay.model.tokens.completion"] = gen.completion_tokens
        elif reason.startswith(_MODEL_DROP):
            fields["imrelay.model.name"] = ctx.model_name
            fields["imrelay.model.outcome"] = reason.removeprefix(_MODEL_DROP)
        return fields


def _logger_for(message: InboundMessage) -> logging.LoggerAdapter[logging.Logger]:
    """The runner's logger, carrying the message's ECS fields."""
    return message_logger(
        logger,
        platform=message.platform,
        message_id=message.message_id,
        conversation=message.conversation.id,
    )


def _notice(ctx: TurnContext, text: str) -> OutboundReply:
    return OutboundReply(text=text, mention_sender=ctx.message.conversation.kind == "group")
