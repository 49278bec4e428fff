"""The generate stage: build the prompt and call the routed model."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from imrelay.errors import ModelError, ModelTimeout, ModelUnavailable
from imrelay.models.base import ChatMessage, Generation, ModelBackend
from imrelay.observability.metrics import Metrics
from imrelay.pipeline.context import Drop, TurnContext

__all__ = ["GenerateStage", "build_prompt"]


def build_prompt(ctx: TurnContext, system_prompt: str | None) -> list[ChatMessage]:
    """System prompt (if any), the kept history, then the message itself.

    The message is ``ctx.user_content`` (OpenAI content parts, e.g. text and images) when a
    stage set it, else its text.
    """
    prompt: list[ChatMessage] = []
    if system_prompt:
        prompt.append({"role": "system", "content": system_prompt})
    prompt.extend({"role": t.role, "content": t.content} for t in ctx.history)
    content = ctx.user_content if ctx.user_content is not None else ctx.message.text
    prompt.append({"role": "user", "content": content})
    return prompt


def _outcome(exc: ModelError) -> str:
    if isinstance(exc, ModelTimeout):
        return "timeout"
    if isinstance(exc, ModelUnavailable):
        return "unavailable"
    return "error"


class GenerateStage:
    """Call the model named by the route stage; a failure becomes a failed Drop with a notice."""

    name = "generate"

    def __init__(
        self,
        models: Mapping[str, ModelBackend],
        *,
        system_prompts: Mapping[str, str | None],
        metrics: Metrics,
        failure_notice: str,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.models = models
        self.system_prompts = system_prompts
        self.metrics = metrics
        self.failure_notice = failure_notice
        self.clock = clock

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        backend = self.models[ctx.model_name]
        ctx.prompt = build_prompt(ctx, self.system_prompts.get(ctx.model_name))
        result = Generation()
        started = self.clock()
        try:
            async for _ in backend.generate(ctx.prompt, result):
                pass
        except ModelError as exc:
            outcome = _outcome(exc)
            self.metrics.model_requests.labels(ctx.model_name, outcome).inc()
            ctx.log.warning("model %s failed: %s", ctx.model_name, exc)
            return Drop(f"model_{outcome}", notice=self.failure_notice, failed=True)
        elapsed = self.clock() - started
        m = self.metrics
        m.model_requests.labels(ctx.model_name, "ok").inc()
        m.model_latency.labels(ctx.model_name).observe(elapsed)
        if result.first_token_s is not None:
            m.model_first_token.labels(ctx.model_name).observe(result.first_token_s)
        if result.prompt_tokens:
            m.model_tokens.labels(ctx.model_name, "prompt").inc(result.prompt_tokens)
        if result.completion_tokens:
            m.model_tokens.labels(ctx.model_name, "completion").inc(result.completion_tokens)
        ctx.generation = result
        ctx.answer = result.text
        return ctx
