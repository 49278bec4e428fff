"""An OpenAI-compatible model server for trying, testing and benchmarking imrelay.

Theory of operation: one aiohttp server answers ``GET /v1/models`` and
``POST /v1/chat/completions`` the way vLLM or the OpenAI API do, closely enough that the official
``openai`` client works against it, streaming (SSE) included. The answer is
``echo: <last user text> (turns: N)`` (see :func:`imrelay.models.echo.build_echo_answer`), so a
person sees what the gateway sent.

Behaviour is set at start and can be changed while running (:meth:`ModelSimulator.set_behaviour`):

- ``latency_ms``: waited before the first token (time to first token);
- ``tokens_per_s``: the answer is produced word by word at this rate, so a request takes
  ``latency + words / tokens_per_s`` (a non-streamed request waits the same total);
- ``error_rate``: the share of chat requests answered 500 (seeded RNG);
- ``hang``: requests are never answered until the client gives up or the simulator closes;
- ``status``: every request is answered with this HTTP status and an OpenAI error body.

Every response carries ``x-imrelay-sim-model-time-ms``, the time the simulator deliberately spent
(latency and pacing, not network). For a streamed answer the header is sent before the tokens,
so it holds the planned time; the measured time is in the final chunk's ``imrelay_sim`` field.
Non-streamed answers carry the measured time in the header and in the JSON (``imrelay_sim``).
Measured times are also kept in :attr:`ModelSimulator.timings`, keyed by the request's
``x-request-id`` header (or a generated id, returned in the response's ``x-request-id``).
``GET /_sim/timings?after=<seq>`` lists the answered requests since ``seq``, each
``{"seq", "request_id", "model_time_ms", "text"}`` (``text``: the start of the last user
message), so a benchmark in another process can take the model's time out of its latencies.

Chat requests and the timings poll are answered by a lean HTTP/1.1 front
(:class:`~imrelay.sim._common.FastFront`); anything it does not take plainly goes to aiohttp on
the same port, and both go through one implementation (:meth:`ModelSimulator._answer`, writing
to a :class:`_Sink`). An answer that needs no waiting is complete before the handler returns:
a streamed one leaves in a single write, headers, events and the end of the chunked body
together, its events assembled from constant pieces and the quoted words (the same text as
``json.dumps``). With latency the headers go out first, as from a server that is thinking.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import json.encoder
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, Final, NamedTuple, Protocol

from aiohttp import web

from imrelay.models.echo import build_echo_answer, extract_content_text
from imrelay.sim._common import FastExchange, FastFront

__all__ = ["UNCHANGED", "ModelSimulator", "serve"]

logger = logging.getLogger(__name__)

_TIME_HEADER: Final = "x-imrelay-sim-model-time-ms"
_TIMING_TEXT_CHARS: Final = 200
_MAX_BODY: Final = 64 * 1024 * 1024
_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_PART_TYPES: Final = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
_WORD = re.compile(r"\s*\S+")
_ERROR_KINDS: Final[Mapping[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "bad request"),
    401: ("invalid_request_error", "invalid_api_key", "incorrect api key provided"),
    403: ("invalid_request_error", "forbidden", "you are not allowed to use this model"),
    404: ("invalid_request_error", "not_found", "not found"),
    408: ("timeout", None, "request timed out"),
    429: ("requests", "rate_limit_exceeded", "rate limit reached, try again later"),
    500: ("server_error", None, "the server had an error while processing your request"),
    502: ("server_error", None, "bad gateway"),
    503: ("server_error", None, "the engine is currently overloaded, please try again later"),
    504: ("server_error", None, "gateway timeout"),
}


_quote: Final = json.encoder.encode_basestring_ascii
_WORD_END: Final = b'}, "logprobs": null, "finish_reason": null}]}\n\n'


class _Answered(NamedTuple):
    """One answered chat request, as ``GET /_sim/timings`` lists it (field names are keys)."""

    seq: int
    request_id: str
    model_time_ms: float
    text: str


class _BufferedStream(web.StreamResponse):
    """A stream response whose headers go out with the first body bytes, not on ``prepare``.

    Used when the whole answer is ready at once: headers, events and the end of the chunked
    body then leave in a single write.
    """

    _send_headers_immediately = False


class _Unchanged(Enum):
    UNCHANGED = "unchanged"


UNCHANGED: Final = _Unchanged.UNCHANGED
"""Default of :meth:`ModelSimulator.set_behaviour` arguments: keep the current value."""


class _BadRequest(Exception):
    def __init__(
        self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass(slots=True)
class _Behaviour:
    latency_ms: float = 0.0
    tokens_per_s: float | None = None
    error_rate: float = 0.0
    hang: bool = False
    status: int | None = None


@dataclass(slots=True)
class _ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_content(index: int, message: Mapping[str, Any]) -> None:
    param = f"messages[{index}].content"
    content = message.get("content")
    if content is None:
        if message["role"] in ("assistant", "function") or "tool_calls" in message:
            return
        raise _BadRequest(f"{param} is required", param=param)
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _BadRequest(f"{param} must be a string or a list of content parts", param=param)
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or part.get("type") not in _PART_TYPES:
            raise _BadRequest(f"{where} must be a content part with a known type", param=where)
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise _BadRequest(f"{where}.text must be a string", param=f"{where}.text")
        if part["type"] == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise _BadRequest(f"{where}.image_url.url is required", param=f"{where}.image_url")


def _parse_chat_request(body: object, model_names: Sequence[str]) -> _ChatRequest:
    """Validate a chat completions request body the way an OpenAI server does.

    Raises:
        _BadRequest: the body is not a valid request (400), or names an unknown model (404).
    """
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a json object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("model is required", param="model")
    if model not in model_names:
        raise _BadRequest(
            f"the model {model!r} does not exist",
            param="model",
            status=404,
            code="model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        if message.get("role") not in _ROLES:
            raise _BadRequest(f"messages[{i}].role is invalid", param=f"messages[{i}].role")
        _check_content(i, message)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _BadRequest("stream must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _BadRequest("stream_options must be an object", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise _BadRequest("max_tokens must be a positive integer", param="max_tokens")
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float)
        or isinstance(temperature, bool)
        or not 0 <= temperature <= 2
    ):
        raise _BadRequest("temperature must be a number from 0 to 2", param="temperature")
    n = body.get("n")
    if n is not None and n != 1:
        raise _BadRequest("the simulator answers with one choice only (n=1)", param="n")
    return _ChatRequest(model, messages, stream, include_usage, max_tokens)


def _error_body(status: int, message: str | None = None, **fields: Any) -> dict[str, Any]:
    kind, code, default = _ERROR_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, "error")
    )
    error = {"message": message or default, "type": kind, "param": None, "code": code}
    error.update(fields)
    return {"error": error}


class ModelSimulator:
    """An OpenAI-compatible chat model server on a real socket.

    Args:
        host: the address to listen on.
        port: the port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        latency_ms: time before the first token.
        tokens_per_s: answer pace in words per second; ``None`` answers at once.
        error_rate: share (0..1) of chat requests answered with a 500.
        seed: seeds the RNG behind ``error_rate``.
        model_names: the models listed by ``/v1/models``; a chat request for another model
            gets a 404 ``model_not_found``, like a real server.
        max_recorded: at most this many entries are kept in :attr:`requests` and
            :attr:`timings` (oldest dropped first), so a long benchmark does not grow memory.

    Attributes:
        requests: every chat completions request body received (valid or not), in order.
        timings: measured model time in ms per request id.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        tokens_per_s: float | None = None,
        error_rate: float = 0.0,
        seed: int | None = None,
        model_names: Sequence[str] = ("sim-model",),
        max_recorded: int = 100_000,
    ) -> None:
        self.host = host
        self.port = port
        self.model_names = tuple(model_names)
        self.max_recorded = max_recorded
        self.requests: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self._answered: deque[_Answered] = deque(maxlen=max_recorded)
        self._answered_seq = 0
        self._behaviour = _Behaviour()
        self.set_behaviour(latency_ms=latency_ms, tokens_per_s=tokens_per_s, error_rate=error_rate)
        self._rng = random.Random(seed)  # nosec B311  # simulated faults, not security
        self._ids = itertools.count(1)
        self._created = int(time.time())
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._front: FastFront | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def set_behaviour(
        self,
        *,
        latency_ms: float | _Unchanged | None = UNCHANGED,
        tokens_per_s: float | _Unchanged | None = UNCHANGED,
        error_rate: float | _Unchanged | None = UNCHANGED,
        hang: bool | _Unchanged | None = UNCHANGED,
        status: int | _Unchanged | None = UNCHANGED,
    ) -> None:
        """Change how requests are answered, at run time.

        An omitted argument keeps its value; ``None`` turns the behaviour off (latency 0,
        no pacing, no errors, no hang, normal status).

        Raises:
            ValueError: a value is out of range.
        """
        b = self._behaviour
        if latency_ms is not UNCHANGED:
            if latency_ms is not None and latency_ms < 0:
                raise ValueError("latency_ms must be >= 0")
            b.latency_ms = latency_ms or 0.0
        if tokens_per_s is not UNCHANGED:
            if tokens_per_s is not None and tokens_per_s <= 0:
                raise ValueError("tokens_per_s must be > 0")
            b.tokens_per_s = tokens_per_s
        if error_rate is not UNCHANGED:
            if error_rate is not None and not 0 <= error_rate <= 1:
                raise ValueError("error_rate must be between 0 and 1")
            b.error_rate = error_rate or 0.0
        if hang is not UNCHANGED:
            b.hang = bool(hang)
        if status is not UNCHANGED:
            if status is not None and not 200 <= status <= 599:
                raise ValueError("status must be an http status code")
            b.status = status

    async def start(self) -> None:
        """Start listening; :attr:`port` and :attr:`base_url` are valid afterwards."""
        if self._runner is not None:
            return
        self._closing.clear()
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{name}", self._get_model)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/_sim/timings", self._list_timings)
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        assert runner.server is not None  # nosec B101  # set by setup()
        # Chat requests and the timings poll are answered by a lean front, the rest (and
        # anything unusual) by aiohttp, on the same port.
        front = FastFront(
            runner.server,
            {
                ("POST", "/v1/chat/completions"): self._fast_chat,
                ("GET", "/_sim/timings"): self._fast_list_timings,
            },
            max_body=_MAX_BODY,
            cancel_on_disconnect=True,
        )
        try:
            await front.start(self.host, self.port)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._front = front
        self.port = front.port
        logger.info("model simulator listening on %s", self.base_url)

    async def aclose(self) -> None:
        """Stop listening and end pending requests (hanging ones included)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        if self._front is not None:
            await self._front.close()
            self._front = None
        await runner.cleanup()
        logger.info("model simulator stopped")

    async def __aenter__(self) -> ModelSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- handlers ---------------------------------------------------------------------------

    def _json_parts(
        self, payload: Mapping[str, Any], *, status: int = 200, ms: float = 0.0, rid: str = ""
    ) -> tuple[bytes, list[tuple[str, str]]]:
        """The body and headers of a JSON answer (``Content-Type`` is added by the sender)."""
        headers = [(_TIME_HEADER, f"{ms:.3f}")]
        if rid:
            headers.append(("x-request-id", rid))
        if status == 429:
            headers.append(("retry-after", "1"))
        return json.dumps(payload).encode(), headers

    def _json(
        self, payload: Mapping[str, Any], *, status: int = 200, ms: float = 0.0, rid: str = ""
    ) -> web.Response:
        body, headers = self._json_parts(payload, status=status, ms=ms, rid=rid)
        return web.Response(
            body=body, status=status, headers=dict(headers), content_type="application/json"
        )

    async def _hang(self) -> web.Response:
        # Cancelled when the client disconnects (handler_cancellation) or woken at aclose().
        await self._closing.wait()
        return self._json(_error_body(503, "the simulator is shutting down"), status=503)

    def _forced(self, rid: str = "") -> web.Response | None:
        status = self._behaviour.status
        if status is None:
            return None
        if status < 400:
            return self._json({}, status=status, rid=rid)
        return self._json(_error_body(status), status=status, rid=rid)

    async def _list_models(self, request: web.Request) -> web.Response:
        if self._behaviour.hang:
            return await self._hang()
        forced = self._forced()
        if forced is not None:
            return forced
        data = [self._model_object(name) for name in self.model_names]
        return self._json({"object": "list", "data": data})

    async def _list_timings(self, request: web.Request) -> web.Response:
        status, payload = self._timings_page(request.query.get("after", "0"))
        return self._json(payload, status=status)

    def _fast_list_timings(self, exchange: FastExchange) -> None:
        if exchange.plain_query():  # else aiohttp decodes the query
            after = exchange.query("after")
            status, payload = self._timings_page("0" if after is None else after)
            body, headers = self._json_parts(payload, status=status)
            exchange.respond(status, body, "application/json", headers)

    def _timings_page(self, after: str) -> tuple[int, dict[str, Any]]:
        """``GET /_sim/timings``: the status and document listing the answers after ``after``."""
        if not after.isdigit():
            return 400, _error_body(400, "after must be a non-negative integer")
        # Sequence numbers have no gaps: the new records are the last ``seq - after`` ones.
        count = min(self._answered_seq - int(after), len(self._answered))
        newest = itertools.islice(reversed(self._answered), max(count, 0))
        found = [record._asdict() for record in newest]
        found.reverse()
        return 200, {"timings": found}

    async def _get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.model_names:
            return self._json(_error_body(404, f"the model {name!r} does not exist"), status=404)
        return self._json(self._model_object(name))

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "imrelay-sim"}

    def _record(self, body: Any) -> None:
        self.requests.append(body)
        if len(self.requests) > self.max_recorded:
            del self.requests[: len(self.requests) - self.max_recorded // 2]

    def _record_time(self, rid: str, ms: float, chat: _ChatRequest) -> None:
        self.timings[rid] = ms
        text = ""
        for message in reversed(chat.messages):
            if message.get("role") == "user":
                text = extract_content_text(message.get("content"))[0][:_TIMING_TEXT_CHARS]
                break
        self._answered_seq += 1
        self._answered.append(_Answered(self._answered_seq, rid, ms, text))
        if len(self.timings) > self.max_recorded:
            for key in list(itertools.islice(self.timings, len(self.timings) // 2)):
                del self.timings[key]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        rid = request.headers.get("x-request-id") or f"req_sim_{next(self._ids)}"
        sink = _AiohttpSink(self, request)
        pending = self._answer(sink, rid, await request.read())
        if pending is not None:
            await pending
        return await sink.finish()

    def _fast_chat(self, exchange: FastExchange) -> Awaitable[None] | None:
        rid = exchange.headers.get("x-request-id") or f"req_sim_{next(self._ids)}"
        return self._answer(_FastSink(self, exchange), rid, exchange.body)

    def _answer(self, sink: _Sink, rid: str, raw: bytes) -> Awaitable[None] | None:
        """Answer one chat completions request through ``sink``.

        Everything that needs no waiting is answered before this returns; otherwise the
        returned awaitable finishes the answer (latency, pacing, a hang).
        """
        try:
            body = json.loads(raw)
        except ValueError:
            self._record({"_unparsed": raw[:1000].decode("utf-8", "replace")})
            error = _error_body(400, "we could not parse the json body of your request")
            sink.json(error, status=400, rid=rid)
            return None
        self._record(body)
        b = self._behaviour
        if b.hang:
            return self._hang_then(sink)
        if b.status is not None:
            payload = {} if b.status < 400 else _error_body(b.status)
            sink.json(payload, status=b.status, rid=rid)
            return None
        try:
            chat = _parse_chat_request(body, self.model_names)
        except _BadRequest as exc:
            error = _error_body(exc.status, exc.message, param=exc.param, code=exc.code)
            error["error"]["type"] = "invalid_request_error"
            sink.json(error, status=exc.status, rid=rid)
            return None
        if b.error_rate and self._rng.random() < b.error_rate:
            sink.json(_error_body(500), status=500, rid=rid)
            return None
        words = _WORD.findall(build_echo_answer(chat.messages))
        finish = "stop"
        if chat.max_tokens is not None and len(words) > chat.max_tokens:
            words, finish = words[: chat.max_tokens], "length"
        prompt_tokens = sum(
            len(extract_content_text(m.get("content"))[0].split()) + 1 for m in chat.messages
        )
        answer = _Plan(chat, words, finish, prompt_tokens, rid, time.perf_counter())
        latency, tps = b.latency_ms / 1000.0, b.tokens_per_s
        if chat.stream:
            if latency <= 0 and tps is None:
                sink.stream_all(self._stream_headers(answer, 0.0), self._events_now(answer))
                return None
            return self._stream(sink, answer, latency, tps)
        delay = latency + (len(words) / tps if tps else 0.0)
        if delay <= 0:
            self._complete(sink, answer)
            return None
        return self._complete_later(sink, answer, delay)

    async def _hang_then(self, sink: _Sink) -> None:
        # Cancelled when the client disconnects (handler cancellation) or woken at aclose().
        await self._closing.wait()
        sink.json(_error_body(503, "the simulator is shutting down"), status=503)

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def _complete_later(self, sink: _Sink, answer: _Plan, delay: float) -> None:
        await asyncio.sleep(delay)
        self._complete(sink, answer)

    def _complete(self, sink: _Sink, answer: _Plan) -> None:
        chat, words, rid = answer.chat, answer.words, answer.rid
        ms = (time.perf_counter() - answer.started) * 1000.0
        self._record_time(rid, ms, chat)
        payload = {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(words)},
                    "logprobs": None,
                    "finish_reason": answer.finish,
                }
            ],
            "usage": self._usage(answer.prompt_tokens, len(words)),
            "imrelay_sim": {"model_time_ms": ms},
        }
        sink.json(payload, ms=ms, rid=rid)

    @staticmethod
    def _stream_headers(answer: _Plan, planned_ms: float) -> list[tuple[str, str]]:
        return [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
            ("x-request-id", answer.rid),
            (_TIME_HEADER, f"{planned_ms:.3f}"),
        ]

    def _events_now(self, answer: _Plan) -> bytes:
        """Every event of an answer that is ready at once, ``[DONE]`` included."""
        events = _Events(answer)
        return events.head + events.words(answer.words) + self._tail(events, answer)

    def _tail(self, events: _Events, answer: _Plan) -> bytes:
        """Record the answer's time; return the closing events (finish, usage, ``[DONE]``)."""
        ms = (time.perf_counter() - answer.started) * 1000.0
        self._record_time(answer.rid, ms, answer.chat)
        sim = {"imrelay_sim": {"model_time_ms": ms}}
        if answer.chat.include_usage:
            usage = self._usage(answer.prompt_tokens, len(answer.words))
            tail = events.event({}, answer.finish) + events.document(
                {"choices": [], "usage": usage, **sim}
            )
        else:
            tail = events.finish(answer.finish, ms)
        return tail + b"data: [DONE]\n\n"

    async def _stream(self, sink: _Sink, answer: _Plan, latency: float, tps: float | None) -> None:
        words = answer.words
        planned = (latency + (len(words) / tps if tps else 0.0)) * 1000.0
        # The headers go out at once, before the wait, as a server that is thinking sends them.
        await sink.stream_start(self._stream_headers(answer, planned))
        events = _Events(answer)
        if latency > 0:
            await asyncio.sleep(latency)
        body = b""
        if tps is None:
            body = events.head + events.words(words)
        else:
            await sink.stream_write(events.head)
            begin, sent = time.perf_counter(), 0
            while sent < len(words):
                due = begin + (sent + 1) / tps
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
                    now = time.perf_counter()
                # Send every word that is due now, so the pace holds even when sleeps run late.
                upto = min(len(words), max(sent + 1, int((now - begin) * tps)))
                await sink.stream_write(events.words(words[sent:upto]))
                sent = upto
        await sink.stream_end(body + self._tail(events, answer))


@dataclass(slots=True)
class _Plan:
    """A valid chat request and the answer it gets (``started``: ``perf_counter`` on arrival)."""

    chat: _ChatRequest
    words: list[str]
    finish: str
    prompt_tokens: int
    rid: str
    started: float


class _Events:
    """The SSE events of one streamed answer.

    Every event is ``{**base, "choices": [...], ...}`` exactly as ``json.dumps`` writes it; the
    per-word events are assembled from that constant start and the quoted word.
    """

    def __init__(self, answer: _Plan) -> None:
        self.base: dict[str, Any] = {
            "id": f"chatcmpl-{answer.rid}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": answer.chat.model,
            "system_fingerprint": None,
        }
        usage = ""
        if answer.chat.include_usage:
            self.base["usage"] = None
            usage = ', "usage": null'
        base = (
            f'data: {{"id": {_quote(self.base["id"])}, "object": "chat.completion.chunk", '
            f'"created": {self.base["created"]}, "model": {_quote(answer.chat.model)}, '
            f'"system_fingerprint": null{usage}, "choices": [{{"index": 0, '
        )
        self._start = start = base.encode()
        self._word = start + b'"delta": {"content": '
        self.head = start + b'"delta": {"role": "assistant", "content": ""' + _WORD_END

    def words(self, chunk: list[str]) -> bytes:
        """One event per word."""
        opening = self._word
        return b"".join(opening + _quote(w).encode() + _WORD_END for w in chunk)

    def document(self, fields: dict[str, Any]) -> bytes:
        """One event of ``{**base, **fields}``."""
        return b"data: " + json.dumps({**self.base, **fields}).encode() + b"\n\n"

    def event(
        self, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any
    ) -> bytes:
        """One event with one choice."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.document({"choices": [choice], **extra})

    def finish(self, reason: str, model_time_ms: float) -> bytes:
        """The finishing event with the simulator's measured time (``event({}, reason, ...)``)."""
        return b'%s"delta": {}, "logprobs": null, "finish_reason": %s}], %s}\n\n' % (
            self._start,
            _quote(reason).encode(),
            b'"imrelay_sim": {"model_time_ms": %s}' % repr(model_time_ms).encode(),
        )


class _Sink(Protocol):
    """Where :meth:`ModelSimulator._answer` sends an answer: aiohttp's response or the front's."""

    def json(
        self, payload: Mapping[str, Any], *, status: int = 200, ms: float = 0.0, rid: str = ""
    ) -> None:
        """Answer with a JSON document (whole, at once)."""
        ...

    def stream_all(self, headers: list[tuple[str, str]], events: bytes) -> None:
        """Answer with a whole event stream in one write."""
        ...

    async def stream_start(self, headers: list[tuple[str, str]]) -> None:
        """Send the head of an event stream now."""
        ...

    async def stream_write(self, events: bytes) -> None:
        """Send events."""
        ...

    async def stream_end(self, events: bytes) -> None:
        """Send the last events and end the stream."""
        ...


class _AiohttpSink:
    """A :class:`_Sink` building aiohttp responses; :meth:`finish` returns the one to send."""

    def __init__(self, sim: ModelSimulator, request: web.Request) -> None:
        self._sim = sim
        self._request = request
        self._response: web.StreamResponse | None = None
        self._events = b""

    def json(
        self, payload: Mapping[str, Any], *, status: int = 200, ms: float = 0.0, rid: str = ""
    ) -> None:
        self._response = self._sim._json(payload, status=status, ms=ms, rid=rid)

    def stream_all(self, headers: list[tuple[str, str]], events: bytes) -> None:
        self._response = _BufferedStream(headers=dict(headers))
        self._events = events

    async def stream_start(self, headers: list[tuple[str, str]]) -> None:
        self._response = web.StreamResponse(headers=dict(headers))
        await self._response.prepare(self._request)

    async def stream_write(self, events: bytes) -> None:
        assert self._response is not None  # nosec B101  # stream_start came first
        await self._response.write(events)

    async def stream_end(self, events: bytes) -> None:
        assert self._response is not None  # nosec B101  # stream_start came first
        await self._response.write_eof(events)

    async def finish(self) -> web.StreamResponse:
        """The response; a whole event stream is sent here (headers and events, one write)."""
        response = self._response
        assert response is not None  # nosec B101  # _answer always answers
        if isinstance(response, _BufferedStream) and not response.prepared:
            await response.prepare(self._request)
            await response.write_eof(self._events)
        return response


class _FastSink:
    """A :class:`_Sink` answering through the lean front (:class:`FastExchange`)."""

    def __init__(self, sim: ModelSimulator, exchange: FastExchange) -> None:
        self._sim = sim
        self._exchange = exchange

    def json(
        self, payload: Mapping[str, Any], *, status: int = 200, ms: float = 0.0, rid: str = ""
    ) -> None:
        body, headers = self._sim._json_parts(payload, status=status, ms=ms, rid=rid)
        self._exchange.respond(status, body, "application/json", headers)

    def stream_all(self, headers: list[tuple[str, str]], events: bytes) -> None:
        self._exchange.end_stream(events, head=headers)

    async def stream_start(self, headers: list[tuple[str, str]]) -> None:
        self._exchange.start_stream(200, headers)

    async def stream_write(self, events: bytes) -> None:
        self._exchange.write_chunk(events)

    async def stream_end(self, events: bytes) -> None:
        self._exchange.end_stream(events)


async def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    latency_ms: float = 0.0,
    tokens_per_s: float | None = None,
    error_rate: float = 0.0,
    seed: int | None = None,
    model_names: Sequence[str] = ("sim-model",),
) -> None:
    """Run a model simulator until cancelled. Prints nothing; logs start and stop at INFO.

    Args:
        host: the address to listen on.
        port: the port (0 picks a free one, logged at start).
        latency_ms: time before the first token.
        tokens_per_s: answer pace in words per second; ``None`` answers at once.
        error_rate: share of chat requests answered with a 500.
        seed: seeds the RNG behind ``error_rate``.
        model_names: the models the simulator serves.
    """
    async with ModelSimulator(
        host=host,
        port=port,
        latency_ms=latency_ms,
        tokens_per_s=tokens_per_s,
        error_rate=error_rate,
        seed=seed,
        model_names=model_names,
    ):
        await asyncio.get_running_loop().create_future()
