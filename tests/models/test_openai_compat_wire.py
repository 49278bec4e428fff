"""OpenAICompatBackend on the wire: request shape, server-sent events, error bodies, connections.

The endpoints here are small servers on loopback that answer with exactly the bytes a test
scripts, so every edge case of the event stream and of error bodies reaches the real socket.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from imrelay.errors import ModelResponseError, ModelUnavailable
from imrelay.models.base import REQUEST_ID, ChatMessage, Generation
from imrelay.models.openai_compat import SIM_TIME_HEADER, OpenAICompatBackend, _SSEDecoder
from imrelay.sim.model import ModelSimulator

Factory = Callable[..., OpenAICompatBackend]
HELLO: list[ChatMessage] = [{"role": "user", "content": "hello"}]
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"

Step = bytes | asyncio.Event


@dataclass
class Seen:
    """One request a scripted server received."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class ScriptedServer:
    """A raw HTTP/1.1 server: answers each request with the scripted steps, then closes.

    A step is bytes to write (each write is drained, then the server pauses 10 ms so the next
    one travels separately) or an event to wait for before going on.
    """

    script: list[Step] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ")
            headers: dict[str, str] = {}
            for line in head[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Seen(method, path, headers, body))
            for step in self.script:
                if isinstance(step, asyncio.Event):
                    await asyncio.wait_for(step.wait(), 5.0)
                else:
                    writer.write(step)
                    await writer.drain()
                    await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedServer]:
    """A scripted raw HTTP server on an ephemeral loopback port."""
    server = ScriptedServer()
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


def event(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    """One chat completion chunk as an SSE event (LF line ends)."""
    choice = {"index": 0, "delta": {} if content is None else {"content": content}}
    choice["finish_reason"] = finish
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "choices": [choice], **extra}
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


USAGE = (
    b'data: {"id":"chatcmpl-usage","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
)


async def collect(
    backend: OpenAICompatBackend, messages: list[ChatMessage] = HELLO
) -> tuple[list[str], Generation]:
    """Run one generation to the end; return its deltas and the filled result."""
    result = Generation()
    deltas = [delta async for delta in backend.generate(messages, result)]
    return deltas, result


async def test_openai_wire_request_shape(make_backend: Factory, scripted: ScriptedServer):
    """Compact UTF-8 JSON body, JSON and SSE headers, no Authorization without a key."""
    scripted.script = [SSE_HEAD, event("ok"), b"data: [DONE]\n\n"]
    backend = make_backend(base_url=scripted.base_url + "/", api_key=None, max_tokens=7)
    messages: list[ChatMessage] = [{"role": "user", "content": "你好 «hi»"}]
    deltas, _ = await collect(backend, messages)
    assert deltas == ["ok"]
    seen = scripted.requests[-1]
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert "authorization" not in seen.headers
    assert "x-request-id" not in seen.headers
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["accept"] == "text/event-stream"
    assert (
        seen.body
        == (
            '{"model":"sim-model","messages":[{"role":"user","content":"你好 «hi»"}],'
            '"max_tokens":7,"temperature":0.7,"stream":true,"stream_options":{"include_usage":true}}'
        ).encode()
    )


async def test_openai_wire_sends_key_and_request_id(
    make_backend: Factory, scripted: ScriptedServer, api_key: str
):
    """With a key: ``Authorization: Bearer``; the request id goes out with chat and probe."""
    body = json.dumps({"object": "list", "data": [{"id": "sim-model"}]}).encode()
    scripted.script = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    ]
    backend = make_backend(base_url=scripted.base_url)
    token = REQUEST_ID.set("turn-7")
    try:
        assert await backend.probe() == "1 model, sim-model available"
    finally:
        REQUEST_ID.reset(token)
    seen = scripted.requests[-1]
    assert (seen.method, seen.path) == ("GET", "/v1/models")
    assert seen.headers["authorization"] == f"Bearer {api_key}"
    assert seen.headers["x-request-id"] == "turn-7"
    assert seen.headers["accept"] == "application/json"


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_wire_forwards_request_id(
    make_backend: Factory, openai_sim: ModelSimulator, stream: bool
):
    """REQUEST_ID reaches the endpoint as ``x-request-id`` (the simulator keys timings by it)."""
    token = REQUEST_ID.set(f"turn-{stream}")
    try:
        _, result = await collect(make_backend(stream=stream))
    finally:
        REQUEST_ID.reset(token)
    assert f"turn-{stream}" in openai_sim.timings
    assert result.extra["response_id"] == f"chatcmpl-turn-{stream}"


@pytest.mark.parametrize("rid", [None, "", "bad\r\nx-injected: 1", "消息1"])
async def test_openai_wire_no_request_id_when_unset_or_unsafe(
    make_backend: Factory, scripted: ScriptedServer, rid: str | None
):
    """No id, an empty one, or one a header cannot carry (a line break, non-Latin-1 text): no
    ``x-request-id`` is sent, and the call goes through."""
    scripted.script = [SSE_HEAD, event("ok"), b"data: [DONE]\n\n"]
    token = REQUEST_ID.set(rid)
    try:
        deltas, _ = await collect(make_backend(base_url=scripted.base_url))
    finally:
        REQUEST_ID.reset(token)
    assert deltas == ["ok"]
    assert "x-request-id" not in scripted.requests[-1].headers
    assert "x-injected" not in scripted.requests[-1].headers


async def test_openai_wire_lone_surrogate_is_sent_escaped(make_backend: Factory):
    """Text that UTF-8 cannot encode (a lone surrogate) is sent as a JSON escape."""
    _, result = await collect(make_backend(), [{"role": "user", "content": "a \ud83d b"}])
    assert result.text == "echo: a \ud83d b (turns: 1)"


async def test_openai_wire_sse_comments_fields_and_multiline_data(
    make_backend: Factory, scripted: ScriptedServer
):
    """Comments, ``event``/``id``/``retry``/unknown fields and data-less events are skipped;
    ``data:`` lines of one event are joined by LF, with or without a space after the colon."""
    scripted.script = [
        SSE_HEAD
        + b": keep-alive\n\n"
        + b"event: message\nid: 1\nretry: 100\nfoo: bar\n"
        + event("one")
        + b"event: ping\n\n"
        + b'data:{"id":"chatcmpl-x","choices":[{"index":0,\n'
        + b'data: "delta":{"content":" two"},\n'
        + b"data:\n"
        + b'data: "finish_reason":null}]}\n\n'
        + event(finish="stop")
        + USAGE
        + b"data: [DONE]\n\n"
    ]
    deltas, result = await collect(make_backend(base_url=scripted.base_url))
    assert deltas == ["one two"]  # one read of the socket: one delta
    assert result.extra == {"response_id": "chatcmpl-x", "finish_reason": "stop"}
    assert (result.prompt_tokens, result.completion_tokens) == (3, 2)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
async def test_openai_wire_sse_line_ends(
    make_backend: Factory, scripted: ScriptedServer, eol: bytes
):
    """LF, CRLF and CR all end lines; a BOM at the start of the body is ignored."""
    body = b"\xef\xbb\xbf" + event("a") + b": hi\n\n" + event(" b", "stop") + b"data: [DONE]\n\n"
    scripted.script = [SSE_HEAD, body.replace(b"\n", eol)]
    deltas, result = await collect(make_backend(base_url=scripted.base_url))
    assert deltas == ["a b"]  # one read of the socket: one delta
    assert result.extra["finish_reason"] == "stop"


async def test_openai_wire_sse_event_split_across_writes(
    make_backend: Factory, scripted: ScriptedServer
):
    """An event cut anywhere (inside a UTF-8 character, between CR and LF) is put back
    together; the first delta is yielded before the rest of the body is even sent."""
    first = event("你").replace(b"\n", b"\r\n")
    second = event("好", "stop").replace(b"\n", b"\r\n")
    cut = second.index("好".encode()) + 1  # inside the 3-byte character
    sent_rest = asyncio.Event()
    scripted.script = [
        SSE_HEAD,
        first + second[:cut],
        sent_rest,
        second[cut:-3],
        second[-3:-1],  # "\n\r"
        second[-1:] + USAGE[:10],
        USAGE[10:],
        b"data: [DONE]",
        b"\n\n",
    ]
    backend = make_backend(base_url=scripted.base_url)
    result = Generation()
    gen = backend.generate(HELLO, result)
    assert await anext(gen) == "你"
    sent_rest.set()
    assert [d async for d in gen] == ["好"]
    assert result.text == "你好"
    assert result.extra["finish_reason"] == "stop"
    assert result.completion_tokens == 2


async def test_openai_wire_sse_body_end_without_done(
    make_backend: Factory, scripted: ScriptedServer
):
    """A body that ends without ``[DONE]`` ends the answer; an unfinished last event is dropped."""
    scripted.script = [SSE_HEAD, event("a") + event(" b", "stop") + USAGE + event(" lost")[:-1]]
    deltas, result = await collect(make_backend(base_url=scripted.base_url))
    assert deltas == ["a b"]  # one read of the socket: one delta
    assert result.completion_tokens == 2


async def test_openai_wire_sse_nothing_read_after_done(
    make_backend: Factory, scripted: ScriptedServer
):
    """``[DONE]`` ends the answer: events after it are not read as part of it."""
    scripted.script = [SSE_HEAD, event("a") + b"data: [DONE]\n\n" + event(" late") + b"junk"]
    deltas, _ = await collect(make_backend(base_url=scripted.base_url))
    assert deltas == ["a"]


async def test_openai_wire_sse_error_event_mid_stream(
    make_backend: Factory, scripted: ScriptedServer, api_key: str
):
    """An ``error`` event is a non-retryable ModelResponseError with the endpoint's message
    (key scrubbed); the text before it is kept."""
    error = {"error": {"message": f"engine died (key {api_key})", "type": "server_error"}}
    scripted.script = [
        SSE_HEAD,
        event("partial"),
        b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n",
        event(" never"),
    ]
    result = Generation()
    with pytest.raises(ModelResponseError) as info:
        async for _ in make_backend(base_url=scripted.base_url).generate(HELLO, result):
            pass
    assert str(info.value) == "model default sent an error mid-stream: engine died (key ***)"
    assert not info.value.retryable
    assert result.text == "partial"


@pytest.mark.parametrize(
    "payload", [b"{not json", b"[1, 2]", b'{"choices": "none"}', b'{"choices": [{"delta": 1}]}']
)
async def test_openai_wire_sse_unreadable_event(
    make_backend: Factory, scripted: ScriptedServer, payload: bytes
):
    """An event that is not a chat completion chunk is a non-retryable ModelResponseError."""
    scripted.script = [SSE_HEAD, event("partial") + b"data: " + payload + b"\n\n"]
    result = Generation()
    with pytest.raises(ModelResponseError, match="sent an unusable response") as info:
        async for _ in make_backend(base_url=scripted.base_url).generate(HELLO, result):
            pass
    assert not info.value.retryable
    assert result.text == "partial"


async def test_openai_wire_sse_cut_connection_is_unavailable(
    make_backend: Factory, scripted: ScriptedServer
):
    """A body cut short (fewer bytes than announced) is a retryable ModelUnavailable."""
    scripted.script = [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100000\r\n\r\n",
        event("partial"),
    ]
    result = Generation()
    with pytest.raises(ModelUnavailable, match="unreachable") as info:
        async for _ in make_backend(base_url=scripted.base_url).generate(HELLO, result):
            pass
    assert info.value.retryable
    assert result.text == "partial"


async def test_openai_wire_json_answer_to_streaming_request(
    make_backend: Factory, scripted: ScriptedServer
):
    """A server that ignores ``stream`` and answers JSON is read as a whole answer."""
    body = json.dumps(
        {
            "id": "chatcmpl-j",
            "choices": [{"message": {"content": "whole"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }
    ).encode()
    scripted.script = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    ]
    deltas, result = await collect(make_backend(base_url=scripted.base_url))
    assert deltas == ["whole"]
    assert result.extra == {"response_id": "chatcmpl-j", "finish_reason": "stop"}


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_wire_model_time_from_header(
    make_backend: Factory, scripted: ScriptedServer, stream: bool
):
    """Without ``imrelay_sim`` in the body, the simulator's time header is used."""
    body = (
        event("a", "stop") + b"data: [DONE]\n\n"
        if stream
        else json.dumps({"id": "c", "choices": [{"message": {"content": "a"}}]}).encode()
    )
    kind = b"text/event-stream" if stream else b"application/json"
    scripted.script = [
        b"HTTP/1.1 200 OK\r\nContent-Type: "
        + kind
        + b"\r\n"
        + f"{SIM_TIME_HEADER}: 12.5\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    ]
    deltas, result = await collect(make_backend(base_url=scripted.base_url, stream=stream))
    assert deltas == ["a"]
    assert result.model_time_s == 0.0125


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"choices": []}', "model default answered without choices"),
        (b"{not json", "model default sent an unusable response: JSONDecodeError"),
        (b'{"choices": [7]}', "model default sent an unusable response: AttributeError"),
    ],
)
async def test_openai_wire_unreadable_completion(
    make_backend: Factory, scripted: ScriptedServer, body: bytes, expected: str
):
    """A non-streamed answer that is not a chat completion is a non-retryable error."""
    scripted.script = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    ]
    result = Generation()
    with pytest.raises(ModelResponseError) as info:
        async for _ in make_backend(base_url=scripted.base_url, stream=False).generate(
            HELLO, result
        ):
            pass
    assert str(info.value) == expected
    assert not info.value.retryable


LONG = "x" * 300


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"message": "top-level words"}', "model default answered http 502: top-level words"),
        (b'{"error": "plain string"}', "model default answered http 502: plain string"),
        (b'{"error": {"code": 1}}', "model default answered http 502"),
        (b"<html>bad gateway</html>", "model default answered http 502"),
        (
            json.dumps({"error": {"message": LONG}}).encode(),
            f"model default answered http 502: {LONG[:199]}…",
        ),
    ],
)
async def test_openai_wire_error_bodies(
    make_backend: Factory, scripted: ScriptedServer, body: bytes, expected: str
):
    """The endpoint's message is taken from the usual places and capped at 200 characters."""
    scripted.script = [
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    ]
    result = Generation()
    with pytest.raises(ModelUnavailable) as info:
        async for _ in make_backend(base_url=scripted.base_url).generate(HELLO, result):
            pass
    assert str(info.value) == expected
    assert info.value.retryable


@dataclass
class PortServer:
    """An aiohttp chat endpoint that records the client port of each request."""

    ports: list[int] = field(default_factory=list)
    hold_after_done_s: float = 0.0
    base_url: str = ""


@pytest.fixture
async def port_server() -> AsyncIterator[PortServer]:
    """Answers like the simulator (SSE, [DONE], then the end of the chunked body)."""
    state = PortServer()

    async def chat(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        state.ports.append(peer[1] if peer else 0)
        if not (await request.json()).get("stream"):
            return web.json_response(
                {"id": "c", "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(event("hi", "stop") + b"data: [DONE]\n\n")
        if state.hold_after_done_s:
            await asyncio.sleep(state.hold_after_done_s)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("stream", "hold_s"), [(True, 0.0), (True, 0.03), (False, 0.0)])
async def test_openai_wire_connection_reused(
    make_backend: Factory, port_server: PortServer, stream: bool, hold_s: float
):
    """Answers read to their end leave the connection in the pool for the next request, also
    when the end of the body comes a little after ``[DONE]``."""
    port_server.hold_after_done_s = hold_s
    backend = make_backend(base_url=port_server.base_url, stream=stream)
    for _ in range(3):
        _, result = await collect(backend)
        assert result.text == "hi"
    assert len(port_server.ports) == 3
    assert len(set(port_server.ports)) == 1


async def test_openai_wire_body_left_open_after_done(
    make_backend: Factory, port_server: PortServer
):
    """A body that does not end after ``[DONE]`` does not hold the answer back for long."""
    port_server.hold_after_done_s = 3.0
    backend = make_backend(base_url=port_server.base_url)
    started = time.perf_counter()
    _, result = await collect(backend)
    assert result.text == "hi"
    assert time.perf_counter() - started < 1.0
    _, again = await collect(backend)  # on a new connection
    assert again.text == "hi"
    assert len(set(port_server.ports)) == 2


# -- the event stream decoder, on its own ---------------------------------------------------

_LINE = st.text(st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=12)


@given(
    events=st.lists(st.lists(_LINE, min_size=1, max_size=3), max_size=5),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_openai_wire_sse_decoder_any_split(events: list[list[str]], eol: str, cuts: list[int]):
    """However the body is cut into pieces, the decoder returns the data of every event."""
    text = "".join(
        ": comment" + eol + "".join(f"data: {line}{eol}" for line in lines) + eol
        for lines in events
    )
    body = text.encode()
    bounds = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    decoder = _SSEDecoder()
    got: list[bytes] = []
    for start, end in itertools.pairwise(bounds):
        got.extend(decoder.feed(body[start:end]))
    got.extend(decoder.finish())
    expected = ["\n".join(lines).encode() for lines in events]
    assert got == expected
    decoder = _SSEDecoder()
    got = [data for i in range(len(body)) for data in decoder.feed(body[i : i + 1])]
    assert [*got, *decoder.finish()] == expected  # one byte at a time
