"""The generate stage: build the prompt and call the routed model.

Theory of operation (streamed answers): when the stage is given ``streams`` (in the app:
:meth:`~imrelay.pipeline.send.ReplySender.open_stream`) and it returns a
:class:`~imrelay.platforms.base.ReplyStream` for the message (e.g. a DingTalk AI card), the
stream is opened before the model is called, every delta hands it the whole text so far, and
the final text is finished in it; ``ctx.streamed`` then tells the send stage that the answer
was delivered (it records it instead of sending it again). On a model failure the stream shows
the failure notice and the Drop carries no notice of its own. If the stream cannot be finished
or marked failed, the stage falls back to the ordinary path: the answer (or the notice) goes
out as plain reply parts.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter

from imrelay.errors import ModelError, ModelTimeout, ModelUnavailable, PlatformAPIError
from imrelay.models.base import ChatMessage, Generation, ModelBackend
from imrelay.observability.metrics import HistogramChild, Metrics
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.pipeline.format import EMPTY_ANSWER
from imrelay.platforms.base import ReplyStream
from imrelay.routing.think import strip_think

__all__ = ["GenerateStage", "StreamOpener", "build_prompt"]

#: Opens a streamed answer for a message, or returns ``None`` to answer with reply parts.
StreamOpener = Callable[[TurnContext], Awaitable[ReplyStream | None]]


def build_prompt(ctx: TurnContext, system_prompt: str | None) -> list[ChatMessage]:
    """System prompt (if any), the kept history, then the message itself.

    The system prompt is the routing rule's (``ctx.system_prompt``) when it set one (an empty
    one means none), else ``system_prompt`` (the model's). The message is ``ctx.user_content``
    (OpenAI content parts, e.g. text and images) when a stage set it, else its text.
    """
    prompt: list[ChatMessage] = []
    if ctx.system_prompt is not None:
        system_prompt = ctx.system_prompt
    if system_prompt:
        prompt.append({"role": "system", "content": system_prompt})
    prompt.extend({"role": t.role, "content": t.content} for t in ctx.history)
    content = ctx.user_content if ctx.user_content is not None else ctx.message.text
    prompt.append({"role": "user", "content": content})
    return prompt


@dataclass(frozen=True, slots=True)
class _OkMetrics:
    """One model's metric children for a successful call."""

    requests: Counter
    latency: HistogramChild
    first_token: HistogramChild
    prompt_tokens: Counter
    completion_tokens: Counter


def _outcome(exc: ModelError) -> str:
    if isinstance(exc, ModelTimeout):
        return "timeout"
    if isinstance(exc, ModelUnavailable):
        return "unavailable"
    return "error"


class GenerateStage:
    """Call the model named by the route stage; a failure becomes a failed Drop with a notice.

    Args:
        models: the backends by configured name.
        system_prompts: each model's system prompt (``None``: none).
        metrics: where model calls are counted and timed.
        failure_notice: what the user is shown when the model fails.
        clock: monotonic seconds, for the model latency.
        streams: opens a streamed answer (see the module docstring); ``None``: never stream.
    """

    name = "generate"

    def __init__(
        self,
        models: Mapping[str, ModelBackend],
        *,
        system_prompts: Mapping[str, str | None],
        metrics: Metrics,
        failure_notice: str,
        clock: Callable[[], float] = time.perf_counter,
        streams: StreamOpener | None = None,
        view: Callable[[TurnContext, str], Awaitable[str]] | None = None,
    ) -> None:
        self.view = view
        self.models = models
        self.system_prompts = system_prompts
        self.metrics = metrics
        self.failure_notice = failure_notice
        self.clock = clock
        self.streams = streams
        self._ok_metrics: dict[str, _OkMetrics] = {}  # per model: label lookups done once

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        backend = self.models[ctx.model_name]
        ctx.prompt = build_prompt(ctx, self.system_prompts.get(ctx.model_name))
        stream = await self.streams(ctx) if self.streams is not None else None
        result = Generation()
        started = self.clock()
        shown = ""  # backends may fill ``result.text`` only at the end: the deltas add up
        try:
            async for delta in backend.generate(ctx.prompt, result):
                if stream is not None:
                    shown += delta
                    if not stream.behind:  # the view costs O(answer): built once per push
                        await stream.update(await self._visible(ctx, shown, partial=True))
        except ModelError as exc:
            outcome = _outcome(exc)
            self.metrics.model_requests.labels(ctx.model_name, outcome).inc()
            ctx.log.warning("model %s failed: %s", ctx.model_name, exc)
            if stream is not None and await self._show_failure(ctx, stream):
                return Drop(f"model_{outcome}", failed=True)  # the stream shows the notice
            return Drop(f"model_{outcome}", notice=self.failure_notice, failed=True)
        except Exception:
            if stream is not None:  # not left half-written; the runner reports the error
                await self._show_failure(ctx, stream)
            raise
        elapsed = self.clock() - started
        ok = self._ok_metrics.get(ctx.model_name)
        if ok is None:
            m, name = self.metrics, ctx.model_name
            ok = self._ok_metrics[name] = _OkMetrics(
                m.model_requests.labels(name, "ok"),
                m.model_latency.labels(name),
                m.model_first_token.labels(name),
                m.model_tokens.labels(name, "prompt"),
                m.model_tokens.labels(name, "completion"),
            )
        ok.requests.inc()
        ok.latency.observe(elapsed)
        if result.first_token_s is not None:
            ok.first_token.observe(result.first_token_s)
        if result.prompt_tokens:
            ok.prompt_tokens.inc(result.prompt_tokens)
        if result.completion_tokens:
            ok.completion_tokens.inc(result.completion_tokens)
        ctx.generation = result
        ctx.answer = result.text
        if stream is not None:
            try:
                final = await self._visible(ctx, result.text, partial=False)
                await stream.finish(final if final.strip() else EMPTY_ANSWER)
            except PlatformAPIError as exc:
                ctx.log.warning("streamed answer not finished (%s); sending it as a reply", exc)
            else:
                ctx.streamed = True
        return ctx

    async def _visible(self, ctx: TurnContext, text: str, *, partial: bool) -> str:
        """What a streamed answer may show: no reasoning block, the outbound safety view."""
        text = strip_think(text, partial=partial)
        return await self.view(ctx, text) if self.view is not None else text

    async def _show_failure(self, ctx: TurnContext, stream: ReplyStream) -> bool:
        """Mark ``stream`` failed with the failure notice; whether the platform accepted it."""
        try:
            await stream.fail(self.failure_notice)
        except PlatformAPIError as exc:
            ctx.log.warning("streamed answer not marked failed: %s", exc)
            return False
        return True
