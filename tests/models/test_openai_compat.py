"""OpenAICompatBackend against the model simulator over real loopback sockets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from imrelay import __version__
from imrelay.config import OpenAIModelSettings
from imrelay.errors import ModelError, ModelResponseError, ModelTimeout, ModelUnavailable
from imrelay.http import HTTPClient, HTTPStatusError
from imrelay.models import ModelPool, OpenAICompatBackend, build_model
from imrelay.models.base import ChatMessage, Generation
from imrelay.sim.model import ModelSimulator

Factory = Callable[..., OpenAICompatBackend]
HELLO: list[ChatMessage] = [{"role": "user", "content": "hello there world"}]


async def collect(
    backend: OpenAICompatBackend, messages: list[ChatMessage] = HELLO
) -> tuple[list[str], Generation]:
    """Run one generation to the end; return its deltas and the filled result."""
    result = Generation()
    deltas = [delta async for delta in backend.generate(messages, result)]
    return deltas, result


async def expect_error(
    backend: OpenAICompatBackend, kind: type[ModelError]
) -> tuple[ModelError, Generation]:
    """Run one generation that must fail with ``kind``; return the error and the result."""
    result = Generation()
    with pytest.raises(kind) as info:
        async for _ in backend.generate(HELLO, result):
            pass
    return info.value, result


async def test_openai_backend_streams_deltas(make_backend: Factory, openai_sim: ModelSimulator):
    """Streamed deltas concatenate to the full answer, and the result is filled in; paced
    tokens arrive as separate deltas."""
    openai_sim.set_behaviour(tokens_per_s=50)  # 20 ms apart: one read each
    backend = make_backend(max_tokens=100, temperature=0.2)
    deltas, result = await collect(backend)
    assert len(deltas) > 1
    assert "".join(deltas) == result.text == "echo: hello there world (turns: 1)"
    assert result.first_token_s is not None
    assert 0 <= result.first_token_s <= result.total_s
    assert result.prompt_tokens is not None
    assert result.prompt_tokens > 0
    assert result.completion_tokens == len(deltas)

    assert result.model_time_s is not None
    assert result.extra["finish_reason"] == "stop"
    assert result.extra["response_id"].startswith("chatcmpl-")
    sent = openai_sim.requests[-1]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 100
    assert sent["temperature"] == 0.2
    assert sent["model"] == "sim-model"
    assert sent["messages"] == HELLO


async def test_openai_backend_yields_what_one_read_brought_as_one_delta(
    make_backend: Factory, openai_sim: ModelSimulator
) -> None:
    """An unpaced answer arrives in one read: its tokens come out as one delta (each delta
    costs a trip through the pipeline), and usage still counts every token."""
    openai_sim.set_behaviour(tokens_per_s=None, latency_ms=None)
    deltas, result = await collect(make_backend())
    assert deltas == ["echo: hello there world (turns: 1)"]
    assert result.completion_tokens is not None
    assert result.completion_tokens > 1


async def test_openai_backend_non_stream_yields_once(
    make_backend: Factory, openai_sim: ModelSimulator
):
    """Without streaming the whole answer is yielded once, with usage."""
    backend = make_backend(stream=False)
    deltas, result = await collect(backend)
    assert deltas == ["echo: hello there world (turns: 1)"]
    assert result.text == deltas[0]
    assert result.completion_tokens == 6
    assert result.first_token_s is not None
    assert "stream" not in openai_sim.requests[-1]


async def test_openai_backend_sends_history_and_images(
    make_backend: Factory, openai_sim: ModelSimulator
):
    """System prompt, history and content parts reach the endpoint unchanged."""
    messages: list[ChatMessage] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "echo: first (turns: 1)"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ]
    _, result = await collect(make_backend(), messages)
    assert result.text == "echo: what is this (turns: 3, images: 1)"
    assert openai_sim.requests[-1]["messages"] == messages


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_backend_reports_model_time(
    make_backend: Factory, openai_sim: ModelSimulator, stream: bool
):
    """The simulator's own time (latency included) is copied to ``model_time_s``."""
    openai_sim.set_behaviour(latency_ms=40)
    _, result = await collect(make_backend(stream=stream))
    assert result.model_time_s is not None
    assert 0.04 <= result.model_time_s <= result.total_s
    assert result.first_token_s is not None
    assert result.first_token_s >= 0.04


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_backend_timeout_raises_model_timeout(
    make_backend: Factory, openai_sim: ModelSimulator, stream: bool
):
    """A model that never answers gives a retryable ModelTimeout within ``timeout_s``."""
    openai_sim.set_behaviour(hang=True)
    started = time.perf_counter()
    exc, _ = await expect_error(make_backend(timeout_s=0.3, stream=stream), ModelTimeout)
    assert 0.25 <= time.perf_counter() - started < 2.0
    assert exc.retryable
    assert exc.backend == "default"


async def test_openai_backend_timeout_bounds_whole_stream(
    make_backend: Factory, openai_sim: ModelSimulator
):
    """``timeout_s`` bounds the whole generation, even while deltas keep arriving."""
    openai_sim.set_behaviour(tokens_per_s=20)  # 6 words: 0.3 s in all, one word each 50 ms
    started = time.perf_counter()
    exc, result = await expect_error(make_backend(timeout_s=0.18), ModelTimeout)
    assert time.perf_counter() - started < 1.0
    assert exc.retryable
    assert result.text.startswith("echo:")
    assert result.text != "echo: hello there world (turns: 1)"


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (429, ModelUnavailable, True),
        (503, ModelUnavailable, True),
        (502, ModelUnavailable, True),
        (504, ModelUnavailable, True),
        (500, ModelResponseError, True),
        (409, ModelResponseError, True),
        (408, ModelTimeout, True),
        (400, ModelResponseError, False),
        (401, ModelResponseError, False),
        (403, ModelResponseError, False),
        (422, ModelResponseError, False),
    ],
)
@pytest.mark.parametrize("stream", [True, False])
async def test_openai_backend_maps_http_status(
    make_backend: Factory,
    openai_sim: ModelSimulator,
    api_key: str,
    status: int,
    kind: type[ModelError],
    retryable: bool,
    stream: bool,
):
    """HTTP errors map to the error class and retryability the reliability layer needs."""
    openai_sim.set_behaviour(status=status)
    exc, _ = await expect_error(make_backend(stream=stream), kind)
    assert exc.retryable is retryable
    assert f"http {status}" in str(exc)
    assert api_key not in str(exc)
    cause = exc.__cause__
    assert isinstance(cause, HTTPStatusError)
    assert cause.status == status
    assert cause.url == openai_sim.base_url + "/chat/completions"
    assert api_key not in repr(cause)  # the request's headers are not kept


async def test_openai_backend_unknown_model_not_retryable(make_backend: Factory):
    """A model the endpoint does not serve (404) is a non-retryable response error."""
    exc, _ = await expect_error(make_backend(model="no-such-model"), ModelResponseError)
    assert not exc.retryable
    assert "http 404" in str(exc)
    assert "does not exist" in str(exc)


async def test_openai_backend_random_errors_are_retryable(
    make_backend: Factory, openai_sim: ModelSimulator
):
    """The simulator's random 500s surface as retryable response errors."""
    openai_sim.set_behaviour(error_rate=1.0)
    exc, _ = await expect_error(make_backend(), ModelResponseError)
    assert exc.retryable


@pytest.mark.parametrize("injected", [False, True])
async def test_openai_backend_connection_refused_is_unavailable(
    make_backend: Factory, closed_port: int, api_key: str, injected: bool
):
    """Nothing listening gives a retryable ModelUnavailable naming the root cause."""
    base_url = f"http://127.0.0.1:{closed_port}/v1"
    if injected:
        async with HTTPClient() as http:
            backend = OpenAICompatBackend(
                "default",
                OpenAIModelSettings(type="openai", base_url=base_url, model="m", api_key=api_key),
                client=http,
            )
            exc, _ = await expect_error(backend, ModelUnavailable)
            await backend.aclose()
            assert not http.closed  # an injected client belongs to its owner
    else:
        exc, _ = await expect_error(make_backend(base_url=base_url), ModelUnavailable)
    assert exc.retryable
    assert "unreachable (ConnectionRefusedError)" in str(exc)
    assert api_key not in str(exc)


async def test_openai_backend_uses_injected_client(openai_sim: ModelSimulator):
    """An injected client carries the requests (its User-Agent reaches the endpoint)."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("User-Agent", ""))
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_get("/v1/models", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with HTTPClient() as http:
            backend = OpenAICompatBackend(
                "default",
                OpenAIModelSettings(
                    type="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m"
                ),
                client=http,
            )
            assert await backend.probe() == "1 model, m available"
            assert await backend.probe() == "1 model, m available"
            await backend.aclose()
            assert not http.closed
            assert http.connections_made == 1  # the client's keep-alive pool was used
    finally:
        await runner.cleanup()
    assert seen == [f"imrelay/{__version__}"] * 2


async def test_openai_backend_owns_and_closes_its_client(openai_sim: ModelSimulator):
    """Without an injected client one is built on first use and closed by aclose()."""
    backend = OpenAICompatBackend(
        "default", OpenAIModelSettings(type="openai", base_url=openai_sim.base_url, model="m")
    )
    await backend.aclose()  # never used: nothing to close
    assert await backend.probe() == "1 model, m not listed"
    client = backend._http
    assert isinstance(client, HTTPClient)
    assert not client.closed
    await backend.aclose()
    assert client.closed


async def test_openai_backend_probe_lists_models(make_backend: Factory):
    """probe() names the model count and whether the configured model is listed."""
    assert await make_backend().probe() == "1 model, sim-model available"
    assert await make_backend(model="other").probe() == "1 model, other not listed"


async def test_openai_backend_probe_failures_raise(
    make_backend: Factory, openai_sim: ModelSimulator, closed_port: int
):
    """probe() raises ModelError when the endpoint is down or refuses the request."""
    with pytest.raises(ModelUnavailable):
        await make_backend(base_url=f"http://127.0.0.1:{closed_port}/v1").probe()
    openai_sim.set_behaviour(status=401)
    with pytest.raises(ModelResponseError) as info:
        await make_backend().probe()
    assert not info.value.retryable
    assert "http 401" in str(info.value)


@pytest.fixture
async def leaky_server(api_key: str) -> AsyncIterator[str]:
    """An endpoint whose error messages repeat the API key it was sent."""

    async def refuse(request: web.Request) -> web.Response:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        error: dict[str, Any] = {"message": f"incorrect api key provided: {key}", "type": "x"}
        return web.json_response({"error": error}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_openai_backend_never_leaks_api_key(
    make_backend: Factory, leaky_server: str, api_key: str
):
    """An endpoint that echoes the API key does not get it into the exception message."""
    backend = make_backend(base_url=leaky_server)
    exc, _ = await expect_error(backend, ModelResponseError)
    assert "incorrect api key provided: ***" in str(exc)
    assert api_key not in str(exc)
    with pytest.raises(ModelResponseError) as info:
        await backend.probe()
    assert api_key not in str(info.value)


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_backend_sends_api_key(
    make_backend: Factory, leaky_server: str, api_key: str, stream: bool
):
    """The configured key is sent as a bearer token (the leaky server saw it), never shown."""
    backend = make_backend(base_url=leaky_server, stream=stream)
    exc, _ = await expect_error(backend, ModelResponseError)
    assert str(exc) == "model default answered http 401: incorrect api key provided: ***"
    assert api_key not in repr(exc.__cause__)


async def test_openai_backend_stops_cleanly_when_consumer_stops(
    make_backend: Factory, openai_sim: ModelSimulator
):
    """Closing the generator early closes the stream; the backend stays usable."""
    openai_sim.set_behaviour(tokens_per_s=200)
    backend = make_backend()
    result = Generation()
    gen = backend.generate(HELLO, result)
    first = await anext(gen)
    await gen.aclose()
    assert result.text == first
    openai_sim.set_behaviour(tokens_per_s=None)
    _, again = await collect(backend)
    assert again.text == "echo: hello there world (turns: 1)"


def test_build_model_builds_openai_backend():
    """build_model returns a pool of one OpenAICompatBackend per endpoint (``type: openai``)."""
    settings = OpenAIModelSettings(
        type="openai",
        base_url="http://127.0.0.1:9/v1",
        endpoints=["http://127.0.0.1:10/v1", "http://127.0.0.1:9/v1"],
        model="m",
        retries=3,
    )
    backend = build_model("big", settings)
    assert isinstance(backend, ModelPool)
    assert backend.name == "big"
    assert backend.retries == 3
    replicas = [r.backend for r in backend.replicas]
    assert all(isinstance(r, OpenAICompatBackend) for r in replicas)
    assert [r.settings.base_url for r in replicas] == [
        "http://127.0.0.1:9/v1",
        "http://127.0.0.1:10/v1",
    ]
