"""A model backend for any OpenAI-compatible endpoint (vLLM, Ollama /v1, TGI, llama.cpp, …).

Theory of operation: the official ``openai`` client (``AsyncOpenAI``) does the HTTP work, by
default on its aiohttp transport (``openai.DefaultAioHttpClient``), with ``max_retries=0``:
retrying belongs to the reliability layer above, which reads ``ModelError.retryable``. With
``stream: true`` the answer is read as server-sent events and each text delta is yielded as it
arrives; otherwise one request returns the whole text, yielded once.

``timeout_s`` bounds the whole generation: every wait on the endpoint (the request, then each
chunk) runs under one deadline fixed when :meth:`OpenAICompatBackend.generate` starts. The
deadline is applied around each wait rather than around the generator body, because a timeout
scope that spans a ``yield`` would cancel the *consumer* while it holds a delta.

Errors are translated here, at the edge (https://platform.openai.com/docs/guides/error-codes):

=====================================  ==========================================
openai / transport error               imrelay error
=====================================  ==========================================
timeout (connect, read, or budget)     ``ModelTimeout(retryable=True)``
connection refused / reset / DNS       ``ModelUnavailable(retryable=True)``
HTTP 429, 502, 503, 504                ``ModelUnavailable(retryable=True)``
HTTP 408                               ``ModelTimeout(retryable=True)``
HTTP 409, 500 and other 5xx            ``ModelResponseError(retryable=True)``
other HTTP 4xx (400, 401, 404, 422…)   ``ModelResponseError(retryable=False)``
unreadable response / error event      ``ModelResponseError(retryable=False)``
=====================================  ==========================================

The transport is classified from the deepest exception in the cause chain: the aiohttp adapter
bundled with openai reports a refused connection as ``httpx2.ConnectTimeout``, while the root
cause (``ConnectionRefusedError``) says what really happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, cast

import aiohttp
import httpx2
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from imrelay.config import OpenAIModelSettings
from imrelay.errors import ModelError, ModelResponseError, ModelTimeout, ModelUnavailable
from imrelay.models.base import ChatMessage, Generation

__all__ = ["SIM_TIME_HEADER", "OpenAICompatBackend", "build_http_client"]

logger = logging.getLogger(__name__)

SIM_TIME_HEADER: Final = "x-imrelay-sim-model-time-ms"
"""Response header in which the model simulator reports the time it deliberately spent."""

_CONNECT_TIMEOUT_S: Final = 10.0
_DETAIL_MAX: Final = 200
# Errors the openai client and its transports raise; ValueError covers undecodable JSON.
_TRANSLATABLE: Final = (
    openai.OpenAIError,
    httpx2.HTTPError,
    aiohttp.ClientError,
    OSError,
    ValueError,
)
_UNAVAILABLE_STATUS: Final = frozenset({429, 502, 503, 504})


def build_http_client(timeout: httpx2.Timeout) -> httpx2.AsyncClient:
    """The HTTP client for ``AsyncOpenAI``: its aiohttp transport when available.

    Args:
        timeout: connect/read/write/pool timeouts.

    Returns:
        ``openai.DefaultAioHttpClient`` (aiohttp transport), or ``openai.DefaultAsyncHttpxClient``
        when the installed openai cannot use aiohttp.
    """
    try:
        return openai.DefaultAioHttpClient(timeout=timeout)
    except RuntimeError:  # openai raises this when its aiohttp extra is missing
        logger.info("openai aiohttp transport unavailable; using httpx2")
        return openai.DefaultAsyncHttpxClient(timeout=timeout)


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 16:
        chain.append(current)
        if current.__cause__ is not None:
            current = current.__cause__
        elif current.__suppress_context__:
            current = None
        else:
            current = current.__context__
    return chain


def _transport_kind(exc: BaseException) -> str | None:
    """``"timeout"``, ``"unavailable"`` or ``None``, judged from the deepest cause first."""
    for cause in reversed(_cause_chain(exc)):
        if isinstance(cause, TimeoutError | httpx2.TimeoutException):
            return "timeout"
        if isinstance(cause, OSError | aiohttp.ClientError | httpx2.TransportError):
            return "unavailable"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "unavailable"
    return None


def _sim_time_ms(extra: Mapping[str, Any] | None) -> float | None:
    sim = extra.get("imrelay_sim") if extra else None
    value = sim.get("model_time_ms") if isinstance(sim, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def _header_ms(headers: Mapping[str, str]) -> float | None:
    value = headers.get(SIM_TIME_HEADER)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


class OpenAICompatBackend:
    """A :class:`~imrelay.models.base.ModelBackend` for an OpenAI-compatible endpoint.

    Args:
        name: the configured model name (used in errors and logs).
        settings: endpoint, model, sampling and timeout settings.
        http_client: the HTTP client for ``AsyncOpenAI``; when given, its owner closes it and
            its timeouts apply. By default an aiohttp-based client is built and owned.
        clock: a monotonic clock in seconds, for the timings in :class:`Generation`.
    """

    def __init__(
        self,
        name: str,
        settings: OpenAIModelSettings,
        *,
        http_client: httpx2.AsyncClient | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._secret = settings.api_key.get_secret_value() if settings.api_key else ""
        timeout = httpx2.Timeout(
            settings.timeout_s, connect=min(settings.timeout_s, _CONNECT_TIMEOUT_S)
        )
        self._owns_http = http_client is None
        self._client = openai.AsyncOpenAI(
            base_url=settings.urls[0],
            api_key=self._secret or "not-needed",
            timeout=timeout,
            max_retries=0,
            http_client=http_client if http_client is not None else build_http_client(timeout),
        )

    async def generate(
        self, messages: Sequence[ChatMessage], result: Generation
    ) -> AsyncIterator[str]:
        """Ask the model; yield text deltas as they arrive and fill ``result``.

        Args:
            messages: the chat messages (system prompt and history included).
            result: filled with text, first-token and total time, token usage, and the model
                server's own time when it reports one (the imrelay simulator does). On error,
                ``result.text`` holds what arrived before it.

        Yields:
            Text deltas (a non-streaming call yields the whole text once).

        Raises:
            ModelTimeout: the endpoint did not answer within ``timeout_s``.
            ModelUnavailable: the endpoint is unreachable or overloaded.
            ModelResponseError: the endpoint answered with an error or an unreadable response.
        """
        deadline = asyncio.get_running_loop().time() + self.settings.timeout_s
        started = self._clock()
        parts: list[str] = []
        try:
            if self.settings.stream:
                stream = cast(
                    "openai.AsyncStream[ChatCompletionChunk]",
                    await self._create(messages, deadline, stream=True),
                )
                try:
                    header_ms = _header_ms(stream.response.headers)
                    while (chunk := await self._next(stream, deadline)) is not None:
                        delta = self._read_chunk(chunk, result)
                        if delta:
                            if result.first_token_s is None:
                                result.first_token_s = self._clock() - started
                            parts.append(delta)
                            yield delta
                    if result.model_time_s is None and header_ms is not None:
                        result.model_time_s = header_ms / 1000.0
                finally:
                    with contextlib.suppress(*_TRANSLATABLE):
                        await stream.close()
            else:
                completion = cast(
                    ChatCompletion, await self._create(messages, deadline, stream=False)
                )
                text = self._read_completion(completion, result)
                result.first_token_s = self._clock() - started
                if text:
                    parts.append(text)
                    yield text
        finally:
            result.text = "".join(parts)
            result.total_s = self._clock() - started

    async def _create(
        self, messages: Sequence[ChatMessage], deadline: float, *, stream: bool
    ) -> ChatCompletion | openai.AsyncStream[ChatCompletionChunk]:
        s = self.settings
        extra: dict[str, Any] = (
            {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        )
        try:
            async with asyncio.timeout_at(deadline):
                return await self._client.chat.completions.create(  # type: ignore[no-any-return]
                    model=s.model,
                    messages=cast(Any, list(messages)),
                    max_tokens=s.max_tokens,
                    temperature=s.temperature,
                    **extra,
                )
        except _TRANSLATABLE as exc:
            raise self._translate(exc) from exc

    async def _next(
        self, stream: openai.AsyncStream[ChatCompletionChunk], deadline: float
    ) -> ChatCompletionChunk | None:
        try:
            async with asyncio.timeout_at(deadline):
                return await anext(stream)
        except StopAsyncIteration:
            return None
        except _TRANSLATABLE as exc:
            raise self._translate(exc) from exc

    def _read_chunk(self, chunk: ChatCompletionChunk, result: Generation) -> str | None:
        if chunk.usage is not None:
            result.prompt_tokens = chunk.usage.prompt_tokens
            result.completion_tokens = chunk.usage.completion_tokens
        sim_ms = _sim_time_ms(chunk.model_extra)
        if sim_ms is not None:
            result.model_time_s = sim_ms / 1000.0
        result.extra.setdefault("response_id", chunk.id)
        if not chunk.choices:
            return None
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            result.extra["finish_reason"] = choice.finish_reason
        return choice.delta.content

    def _read_completion(self, completion: ChatCompletion, result: Generation) -> str:
        if completion.usage is not None:
            result.prompt_tokens = completion.usage.prompt_tokens
            result.completion_tokens = completion.usage.completion_tokens
        sim_ms = _sim_time_ms(completion.model_extra)
        if sim_ms is not None:
            result.model_time_s = sim_ms / 1000.0
        if not completion.choices:
            raise ModelResponseError(
                f"model {self.name} answered without choices", backend=self.name
            )
        choice = completion.choices[0]
        result.extra["response_id"] = completion.id
        result.extra["finish_reason"] = choice.finish_reason
        return choice.message.content or ""

    async def probe(self) -> str:
        """List the endpoint's models (``GET {base_url}/models``).

        Returns:
            e.g. ``"3 models, qwen2.5 available"``; ``"… qwen2.5 not listed"`` when the endpoint
            answers but does not list the configured model (some servers list aliases only).

        Raises:
            ModelError: the endpoint is unreachable, too slow, or refused the request.
        """
        try:
            async with asyncio.timeout(min(self.settings.timeout_s, _CONNECT_TIMEOUT_S)):
                page = await self._client.models.list()
        except _TRANSLATABLE as exc:
            raise self._translate(exc) from exc
        ids = [m.id for m in page.data]
        count = f"{len(ids)} model{'' if len(ids) == 1 else 's'}"
        state = "available" if self.settings.model in ids else "not listed"
        return f"{count}, {self.settings.model} {state}"

    async def aclose(self) -> None:
        """Close the HTTP client, unless it was injected (its owner closes it)."""
        if self._owns_http:
            await self._client.close()

    # -- errors -------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"

    def _translate(self, exc: BaseException) -> ModelError:
        name, backend = self.name, self.name
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            body = exc.body
            detail = body.get("message") if isinstance(body, Mapping) else None
            message = f"model {name} answered http {status}"
            if isinstance(detail, str) and detail:
                message += f": {self._scrub(detail)}"
            if status == 408:
                return ModelTimeout(message, backend=backend, retryable=True)
            if status in _UNAVAILABLE_STATUS:
                return ModelUnavailable(message, backend=backend, retryable=True)
            retryable = status >= 500 or status == 409
            return ModelResponseError(message, backend=backend, retryable=retryable)
        if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientError):
            return ModelTimeout(
                f"model {name} did not answer within {self.settings.timeout_s:g} s",
                backend=backend,
                retryable=True,
            )
        kind = _transport_kind(exc)
        if kind == "timeout":
            return ModelTimeout(
                f"model {name} timed out talking to its endpoint", backend=backend, retryable=True
            )
        if kind == "unavailable":
            root = _cause_chain(exc)[-1]
            return ModelUnavailable(
                f"model {name} endpoint unreachable ({type(root).__name__})",
                backend=backend,
                retryable=True,
            )
        detail = exc.message if isinstance(exc, openai.APIError) else type(exc).__name__
        return ModelResponseError(
            f"model {name} sent an unusable response: {self._scrub(detail)}", backend=backend
        )
