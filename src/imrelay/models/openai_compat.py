"""A model backend for any OpenAI-compatible endpoint (vLLM, Ollama /v1, TGI, llama.cpp, …).

Theory of operation: the backend speaks the chat completions protocol itself
(https://platform.openai.com/docs/api-reference/chat) over the gateway's own HTTP/1.1 client,
:class:`imrelay.http.HTTPClient`, which the backend builds on first use (a keep-alive pool of
up to 1000 connections to the endpoint, idle ones dropped after 4 s, before a uvicorn-based
server's 5 s) and closes in :meth:`OpenAICompatBackend.aclose`; tests may inject one
(``client``), whose owner closes it. A call is one
``POST {base_url}/chat/completions`` whose JSON body is built as a plain dict: ``model``,
``messages`` (as given), ``max_tokens``, ``temperature``, and with streaming ``stream: true``
and ``stream_options: {include_usage: true}``. ``Authorization: Bearer`` is sent only when an
API key is configured, and the request id of the turn being served
(:data:`~imrelay.models.base.REQUEST_ID`, when set) as ``x-request-id``. Nothing is retried
here: retrying belongs to the reliability layer above, which reads ``ModelError.retryable``.

With ``stream: true`` the answer is read as server-sent events
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
the body is read as it arrives and cut into lines (CR, LF or CRLF, wherever the network split
them); ``data:`` lines accumulate, a blank line ends an event, comments and other fields are
skipped, and an event left incomplete when the body ends is dropped, as the standard says. Each
event's data is decoded once (``json``); the ``choices[0].delta.content`` of the events one read
of the socket brought are yielded together, as one delta (a fast server's whole answer often
arrives in one read, and every delta costs a trip through the pipeline's generators),
``finish_reason``, ``usage``, ``id`` and the simulator's ``imrelay_sim.model_time_ms`` are
copied to the :class:`~imrelay.models.base.Generation`. No other object is built per chunk and
nothing is logged per chunk. ``data: [DONE]`` ends the answer (the rest of the body is read,
briefly, so the connection goes back to the pool); a body that simply ends does too. A
streaming request answered with plain JSON (a server that ignores ``stream``) is read as a
whole answer. Without streaming one request returns the whole text, yielded once.

``timeout_s`` bounds the whole generation: every wait on the endpoint (the request, then each
read of the body) runs under one deadline fixed when :meth:`OpenAICompatBackend.generate`
starts. The deadline is applied around each wait rather than around the generator body,
because a timeout scope that spans a ``yield`` would cancel the *consumer* while it holds a
delta. Data already received is parsed without arming a timer. Connecting (DNS, TCP and TLS)
is also bounded by ``min(timeout_s, 10)`` s on the backend's own client; waiting for a free
pooled connection only by the deadline.

Errors are translated here, at the edge (https://platform.openai.com/docs/guides/error-codes):

=====================================  ==========================================
transport error or answer              imrelay error
=====================================  ==========================================
timeout (connect, read, or budget)     ``ModelTimeout(retryable=True)``
connection refused / reset / DNS       ``ModelUnavailable(retryable=True)``
HTTP 429, 502, 503, 504                ``ModelUnavailable(retryable=True)``
HTTP 408                               ``ModelTimeout(retryable=True)``
HTTP 409, 500 and other 5xx            ``ModelResponseError(retryable=True)``
other HTTP status (400, 401, 404…)     ``ModelResponseError(retryable=False)``
unreadable response / error event      ``ModelResponseError(retryable=False)``
=====================================  ==========================================

An HTTP error's text carries the endpoint's own message (``error.message``, or a top-level
``message``), and every text that may repeat the request has the API key replaced by ``***``
and is cut to 200 characters. The exception's ``__cause__`` is an
:class:`imrelay.http.HTTPStatusError` (method, URL without query, status and reason; never
headers or body). The transport is classified from the deepest exception in the cause chain,
which says what really happened (``ConnectionRefusedError`` under the client's
``HTTPConnectError``). Whatever arrived before an error stays in ``result.text``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final

from imrelay import __version__, _json
from imrelay.config import OpenAIModelSettings
from imrelay.errors import ModelError, ModelResponseError, ModelTimeout, ModelUnavailable
from imrelay.http import HTTPClient, HTTPError, HTTPStatusError, Response
from imrelay.models.base import REQUEST_ID, ChatMessage, Generation

__all__ = ["SIM_TIME_HEADER", "OpenAICompatBackend"]

logger = logging.getLogger(__name__)

SIM_TIME_HEADER: Final = "x-imrelay-sim-model-time-ms"
"""Response header in which the model simulator reports the time it deliberately spent."""

_CONNECT_TIMEOUT_S: Final = 10.0
_DETAIL_MAX: Final = 200
_ERROR_BODY_MAX: Final = 64 * 1024
# After [DONE], how long the rest of the body may take before the connection is dropped rather
# than put back in the pool. The end of the body normally follows [DONE] at once.
_DRAIN_S: Final = 0.25
# Connections kept per endpoint. Idle ones close after 4 s: shorter than the 5 s keep-alive of
# uvicorn-based servers (vLLM), so a pooled connection is not reused just as the server drops it.
_POOL_SIZE: Final = 1000
_KEEPALIVE_S: Final = 4.0
# Errors the HTTP client and the standard library raise while talking or decoding (HTTPError
# and TimeoutError are OSErrors); ValueError covers undecodable JSON.
_TRANSLATABLE: Final = (OSError, ValueError)
# Raised by reading fields of a JSON answer of the wrong shape.
_SHAPE_ERRORS: Final = (AttributeError, TypeError, KeyError, IndexError, ValueError)
_UNAVAILABLE_STATUS: Final = frozenset({429, 502, 503, 504})
_BOM: Final = b"\xef\xbb\xbf"


class _SSEDecoder:
    """Cuts a ``text/event-stream`` body into the data of its events.

    Feed it the body as it arrives, in pieces of any size; each call returns the data (the
    ``data:`` lines joined by LF) of the events completed so far, as bytes. Line ends are CR, LF
    or CRLF; a CR at the end of a piece is held back until the next piece says whether an LF
    follows. Comments, ``event``, ``id``, ``retry`` and unknown fields are skipped; an event
    without data is not an event.
    """

    __slots__ = ("_data", "_pending", "_started")

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # the unfinished line, in pieces
        self._data: list[bytes] = []  # data lines of the event being read
        self._started = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event that ``chunk`` completes."""
        if not self._started:
            self._started = True
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        end = len(chunk) - 1 if chunk.endswith(b"\r") else len(chunk)
        cut = max(chunk.rfind(b"\n", 0, end), chunk.rfind(b"\r", 0, end))
        if cut < 0:
            self._pending.append(chunk)
            return []
        if self._pending:
            self._pending.append(chunk[: cut + 1])
            lines = b"".join(self._pending).splitlines()
            self._pending.clear()
        else:
            lines = chunk[: cut + 1].splitlines()
        if cut + 1 < len(chunk):
            self._pending.append(chunk[cut + 1 :])
        return self._events(lines)

    def finish(self) -> list[bytes]:
        """At the end of the body: the events a held-back CR completes. An event the body did
        not finish is dropped."""
        lines = b"".join(self._pending).splitlines()
        self._pending.clear()
        return self._events(lines)  # an unterminated last line cannot end an event

    def _events(self, lines: list[bytes]) -> list[bytes]:
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data.clear()
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line == b"data":
                data.append(b"")
        return events


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
        if isinstance(cause, TimeoutError):
            return "timeout"
        if isinstance(cause, OSError):
            return "unavailable"
    return None


def _sim_time_ms(sim: Any) -> float | None:
    value = sim.get("model_time_ms") if isinstance(sim, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _header_ms(headers: Mapping[str, str]) -> float | None:
    value = headers.get(SIM_TIME_HEADER)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _error_detail(body: Any) -> str | None:
    """The endpoint's message in an error body: ``error.message``, ``error`` or ``message``."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    if not isinstance(message, str) or not message:
        message = body.get("message")
    return message if isinstance(message, str) and message else None


def _loads(raw: bytes) -> Any:
    # strict UTF-8 first (SSE always is): json.loads(bytes) would guess UTF-16/32
    return _json.loads(raw.decode())


def _encode(body: Mapping[str, Any]) -> bytes:
    try:
        return _json.dumpb(body)
    except UnicodeEncodeError:  # a lone surrogate (e.g. from a "\ud83d" escape): send it escaped
        return json.dumps(body, separators=(",", ":")).encode()


def _usage(result: Generation, usage: Any) -> None:
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int):
        result.prompt_tokens = prompt
    if isinstance(completion, int):
        result.completion_tokens = completion


class OpenAICompatBackend:
    """A :class:`~imrelay.models.base.ModelBackend` for an OpenAI-compatible endpoint.

    Args:
        name: the configured model name (used in errors and logs).
        settings: endpoint, model, sampling and timeout settings.
        client: an HTTP client to use instead of the backend's own (tests); its owner closes
            it. By default the backend builds one on first use and closes it in :meth:`aclose`.
        clock: a monotonic clock in seconds, for the timings in :class:`Generation`.
    """

    def __init__(
        self,
        name: str,
        settings: OpenAIModelSettings,
        *,
        client: HTTPClient | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._secret = settings.api_key.get_secret_value() if settings.api_key else ""
        base = settings.urls[0].rstrip("/")
        self._chat_url = f"{base}/chat/completions"
        self._models_url = f"{base}/models"
        self._http = client
        self._owns_http = client is None
        self._connect_s = min(settings.timeout_s, _CONNECT_TIMEOUT_S)
        headers = {"User-Agent": f"imrelay/{__version__}", "Accept": "application/json"}
        if self._secret:
            headers["Authorization"] = f"Bearer {self._secret}"
        self._get_headers = headers
        self._post_headers = {
            **headers,
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if settings.stream else "application/json",
        }

    def _client(self) -> HTTPClient:
        client = self._http
        if client is None:
            client = self._http = HTTPClient(
                limit=_POOL_SIZE,
                connect_timeout_s=self._connect_s,
                keepalive_s=_KEEPALIVE_S,
                user_agent=f"imrelay/{__version__}",
            )
        return client

    def _with_request_id(self, headers: dict[str, str]) -> dict[str, str]:
        rid = REQUEST_ID.get()
        # a header line is Latin-1 without CR or LF: an id it cannot carry is left out
        if not rid or not (rid.isascii() and rid.isprintable()):
            return headers
        return {**headers, "x-request-id": rid}

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
            resp = await self._post(messages, deadline)
            try:
                content_type = resp.headers.get("content-type", "").partition(";")[0].strip()
                if not self.settings.stream or content_type.lower() == "application/json":
                    text = self._read_completion(await self._read_json(resp, deadline), result)
                    result.first_token_s = self._clock() - started
                    if text:
                        parts.append(text)
                        yield text
                else:
                    decoder = _SSEDecoder()
                    done = False
                    while not done:
                        data = await self._read(resp, deadline)
                        arrived = len(parts)
                        for payload in decoder.feed(data) if data else decoder.finish():
                            if payload.startswith(b"[DONE]"):
                                done = True
                                break
                            delta = self._read_chunk(payload, result)
                            if delta:
                                if result.first_token_s is None:
                                    result.first_token_s = self._clock() - started
                                parts.append(delta)
                        if len(parts) > arrived:  # what one read brought: one delta
                            yield "".join(parts[arrived:])
                        if not data:
                            break
                    if done:
                        await self._drain(resp, deadline)
                if result.model_time_s is None:
                    header_ms = _header_ms(resp.headers)
                    if header_ms is not None:
                        result.model_time_s = header_ms / 1000.0
            finally:
                resp.release()  # back to the pool when the body was read to its end
        finally:
            result.text = "".join(parts)
            result.total_s = self._clock() - started

    async def _post(self, messages: Sequence[ChatMessage], deadline: float) -> Response:
        """Send the request; the response once its status and headers say it is an answer."""
        s = self.settings
        body: dict[str, Any] = {
            "model": s.model,
            "messages": messages if isinstance(messages, list) else list(messages),
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
        }
        if s.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        data = _encode(body)
        headers = self._with_request_id(self._post_headers)
        try:
            async with asyncio.timeout_at(deadline):
                resp = await self._client().request(
                    "POST", self._chat_url, body=data, headers=headers
                )
                if not 200 <= resp.status < 300:
                    try:
                        raise await self._status_error(resp, "POST", self._chat_url)
                    finally:
                        resp.release()
        except _TRANSLATABLE as exc:
            raise self._translate(exc, s.timeout_s) from exc
        return resp

    async def _read(self, resp: Response, deadline: float) -> bytes:
        """What has arrived of the body, waiting under the deadline if nothing has; EOF: b""."""
        try:
            async with asyncio.timeout_at(deadline):
                return await resp.read_chunk()
        except _TRANSLATABLE as exc:
            raise self._translate(exc, self.settings.timeout_s) from exc

    async def _read_json(self, resp: Response, deadline: float) -> Any:
        try:
            async with asyncio.timeout_at(deadline):
                raw = await resp.read()
            return _loads(raw)
        except _TRANSLATABLE as exc:
            raise self._translate(exc, self.settings.timeout_s) from exc

    async def _drain(self, resp: Response, deadline: float) -> None:
        """Read what follows ``[DONE]``, so the connection can be reused; else drop it."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + _DRAIN_S)):
                while await resp.read_chunk():
                    pass
        except _TRANSLATABLE:  # read_chunk released (closed) the connection
            logger.debug("model %s: body did not end after [DONE]; connection dropped", self.name)

    def _read_chunk(self, payload: bytes, result: Generation) -> str | None:
        """One stream event: copy usage, ids and timings to ``result``; return its text."""
        try:
            data = _loads(payload)
            error = data.get("error")
            if error:
                detail = _error_detail(data) or "no message"
                raise ModelResponseError(
                    f"model {self.name} sent an error mid-stream: {self._scrub(detail)}",
                    backend=self.name,
                )
            usage = data.get("usage")
            if usage:
                _usage(result, usage)
            sim = data.get("imrelay_sim")
            if sim:
                sim_ms = _sim_time_ms(sim)
                if sim_ms is not None:
                    result.model_time_s = sim_ms / 1000.0
            extra = result.extra
            if "response_id" not in extra:
                response_id = data.get("id")
                if response_id is not None:
                    extra["response_id"] = response_id
            choices = data.get("choices")
            if not choices:
                return None
            choice = choices[0]
            finish = choice.get("finish_reason")
            if finish is not None:
                extra["finish_reason"] = finish
            delta = choice.get("delta")
            content = delta.get("content") if delta else None
            return content if isinstance(content, str) else None
        except _SHAPE_ERRORS as exc:
            raise self._unusable(exc) from exc

    def _read_completion(self, data: Any, result: Generation) -> str:
        try:
            usage = data.get("usage")
            if usage:
                _usage(result, usage)
            sim_ms = _sim_time_ms(data.get("imrelay_sim"))
            if sim_ms is not None:
                result.model_time_s = sim_ms / 1000.0
            choices = data.get("choices")
            if not choices:
                raise ModelResponseError(
                    f"model {self.name} answered without choices", backend=self.name
                )
            choice = choices[0]
            result.extra["response_id"] = data.get("id")
            result.extra["finish_reason"] = choice.get("finish_reason")
            message = choice.get("message")
            content = message.get("content") if message else None
        except _SHAPE_ERRORS as exc:
            raise self._unusable(exc) from exc
        return content if isinstance(content, str) else ""

    async def probe(self) -> str:
        """List the endpoint's models (``GET {base_url}/models``).

        Returns:
            e.g. ``"3 models, qwen2.5 available"``; ``"… qwen2.5 not listed"`` when the endpoint
            answers but does not list the configured model (some servers list aliases only).

        Raises:
            ModelError: the endpoint is unreachable, too slow, or refused the request.
        """
        budget_s = min(self.settings.timeout_s, _CONNECT_TIMEOUT_S)
        headers = self._with_request_id(self._get_headers)
        try:
            async with asyncio.timeout(budget_s):
                resp = await self._client().request("GET", self._models_url, headers=headers)
                try:
                    if not 200 <= resp.status < 300:
                        raise await self._status_error(resp, "GET", self._models_url)
                    page = _loads(await resp.read())
                finally:
                    resp.release()
        except _TRANSLATABLE as exc:
            raise self._translate(exc, budget_s) from exc
        try:
            ids = [m.get("id") for m in page["data"]]
        except _SHAPE_ERRORS as exc:
            raise self._unusable(exc) from exc
        count = f"{len(ids)} model{'' if len(ids) == 1 else 's'}"
        state = "available" if self.settings.model in ids else "not listed"
        return f"{count}, {self.settings.model} {state}"

    async def aclose(self) -> None:
        """Close the HTTP client, unless it was injected (its owner closes it)."""
        client = self._http
        if self._owns_http and client is not None:
            self._http = None
            await client.aclose()

    # -- errors -------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"

    async def _status_error(self, resp: Response, method: str, url: str) -> ModelError:
        """The error for a non-2xx answer, with the endpoint's message when it gives one."""
        chunks: list[bytes] = []
        size = 0
        try:
            while size < _ERROR_BODY_MAX and (chunk := await resp.read_chunk()):
                chunks.append(chunk)
                size += len(chunk)
            detail = _error_detail(_loads(b"".join(chunks)))
        except _TRANSLATABLE:  # not JSON, or cut short: the status says enough
            detail = None
        status, name = resp.status, self.name
        message = f"model {name} answered http {status}"
        if detail:
            message += f": {self._scrub(detail)}"
        if status == 408:
            error: ModelError = ModelTimeout(message, backend=name, retryable=True)
        elif status in _UNAVAILABLE_STATUS:
            error = ModelUnavailable(message, backend=name, retryable=True)
        else:
            retryable = status >= 500 or status == 409
            error = ModelResponseError(message, backend=name, retryable=retryable)
        # The request's headers hold the API key: the cause keeps only the method and the URL.
        error.__cause__ = HTTPStatusError(method, url, status, resp.reason)
        return error

    def _unusable(self, exc: BaseException) -> ModelResponseError:
        return ModelResponseError(
            f"model {self.name} sent an unusable response: {type(exc).__name__}",
            backend=self.name,
        )

    def _translate(self, exc: BaseException, budget_s: float) -> ModelError:
        name, backend = self.name, self.name
        if isinstance(exc, TimeoutError) and not isinstance(exc, HTTPError):
            return ModelTimeout(
                f"model {name} did not answer within {budget_s:g} s",
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
        return self._unusable(exc)
