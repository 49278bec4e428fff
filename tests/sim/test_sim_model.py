"""The OpenAI-compatible model simulator, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai
import pytest

from imrelay.sim.model import ModelSimulator, serve

HELLO: list[Any] = [{"role": "user", "content": "hello there world"}]
ANSWER = "echo: hello there world (turns: 1)"


@pytest.fixture
async def sim() -> AsyncIterator[ModelSimulator]:
    """A model simulator on an ephemeral loopback port."""
    async with ModelSimulator() as simulator:
        yield simulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A raw HTTP client."""
    async with aiohttp.ClientSession() as session:
        yield session


def client_for(sim: ModelSimulator, timeout: float = 5.0) -> openai.AsyncOpenAI:
    """The official client against the simulator, without retries."""
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0, timeout=timeout)


@pytest.fixture
async def client(sim: ModelSimulator) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official openai client pointed at ``sim``."""
    async with client_for(sim) as c:
        yield c


async def test_sim_model_lists_models(client: openai.AsyncOpenAI):
    """GET /v1/models lists the configured models the way OpenAI does."""
    page = await client.models.list()
    assert [m.id for m in page.data] == ["sim-model"]
    assert page.data[0].owned_by == "imrelay-sim"
    assert page.data[0].object == "model"
    model = await client.models.retrieve("sim-model")
    assert model.id == "sim-model"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")


async def test_sim_model_answers_non_stream(client: openai.AsyncOpenAI, sim: ModelSimulator):
    """A non-streamed request gets a chat.completion with usage and the simulator's time."""
    raw = await client.chat.completions.with_raw_response.create(model="sim-model", messages=HELLO)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == 6 + completion.usage.prompt_tokens
    assert completion.model_extra is not None
    assert completion.model_extra["imrelay_sim"]["model_time_ms"] >= 0
    assert float(raw.headers["x-imrelay-sim-model-time-ms"]) >= 0
    assert sim.requests == [{"model": "sim-model", "messages": HELLO}]


async def test_sim_model_streams_sse(client: openai.AsyncOpenAI):
    """A streamed request gets role, content deltas, a stop chunk, usage, then [DONE]."""
    stream = await client.chat.completions.create(
        model="sim-model",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert "x-imrelay-sim-model-time-ms" in stream.response.headers
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 6
    assert last.model_extra is not None
    assert last.model_extra["imrelay_sim"]["model_time_ms"] >= 0
    assert all(c.object == "chat.completion.chunk" for c in chunks)


async def test_sim_model_stream_wire_format(sim: ModelSimulator, http: aiohttp.ClientSession):
    """The SSE body is ``data: <json>`` events ending with ``data: [DONE]``; no usage unasked."""
    body = {"model": "sim-model", "messages": HELLO, "stream": True}
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = await resp.text()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "usage" not in chunks[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "imrelay_sim" in chunks[-1]


async def test_sim_model_counts_turns_and_images(client: openai.AsyncOpenAI):
    """System messages are not turns; image parts are accepted and counted."""
    completion = await client.chat.completions.create(
        model="sim-model",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "echo: first (turns: 1)"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "this"},
                ],
            },
        ],
    )
    assert completion.choices[0].message.content == "echo: what is this (turns: 3, images: 1)"


async def test_sim_model_truncates_at_max_tokens(client: openai.AsyncOpenAI):
    """An answer longer than ``max_tokens`` words is cut, with finish_reason "length"."""
    completion = await client.chat.completions.create(
        model="sim-model", messages=HELLO, max_tokens=2
    )
    assert completion.choices[0].message.content == "echo: hello"
    assert completion.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": HELLO}, "model"),
        ({"model": "sim-model"}, "messages"),
        ({"model": "sim-model", "messages": []}, "messages"),
        ({"model": "sim-model", "messages": ["hi"]}, "messages[0]"),
        (
            {"model": "sim-model", "messages": [{"role": "boss", "content": "x"}]},
            "messages[0].role",
        ),
        ({"model": "sim-model", "messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"model": "sim-model", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
        ),
        (
            {"model": "sim-model", "messages": [{"role": "user", "content": [{"type": "x"}]}]},
            "messages[0].content[0]",
        ),
        (
            {"model": "sim-model", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
        ),
        (
            {
                "model": "sim-model",
                "messages": [{"role": "user", "content": [{"type": "image_url"}]}],
            },
            "messages[0].content[0].image_url",
        ),
        ({"model": "sim-model", "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": "sim-model", "messages": HELLO, "stream_options": 1}, "stream_options"),
        ({"model": "sim-model", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": "sim-model", "messages": HELLO, "max_tokens": True}, "max_tokens"),
        ({"model": "sim-model", "messages": HELLO, "temperature": 3}, "temperature"),
        ({"model": "sim-model", "messages": HELLO, "n": 2}, "n"),
    ],
)
async def test_sim_model_rejects_bad_bodies(
    sim: ModelSimulator, http: aiohttp.ClientSession, body: Any, param: str | None
):
    """An invalid request gets a 400 OpenAI error naming the bad parameter."""
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert sim.requests == [body]


async def test_sim_model_rejects_unparsable_json(sim: ModelSimulator, http: aiohttp.ClientSession):
    """A body that is not JSON gets a 400 error, and is still recorded."""
    async with http.post(f"{sim.base_url}/chat/completions", data=b"{nope") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert sim.requests == [{"_unparsed": "{nope"}]


async def test_sim_model_unknown_model_is_404(client: openai.AsyncOpenAI):
    """A chat request for a model the simulator does not serve gets model_not_found."""
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-x", messages=HELLO)
    assert info.value.code == "model_not_found"


async def test_sim_model_waits_latency(client: openai.AsyncOpenAI, sim: ModelSimulator):
    """``latency_ms`` delays the answer and is reported as the model time."""
    sim.set_behaviour(latency_ms=80)
    started = time.perf_counter()
    raw = await client.chat.completions.with_raw_response.create(model="sim-model", messages=HELLO)
    assert time.perf_counter() - started >= 0.08
    assert 80 <= float(raw.headers["x-imrelay-sim-model-time-ms"]) < 1000


async def test_sim_model_paces_tokens(client: openai.AsyncOpenAI, sim: ModelSimulator):
    """With ``tokens_per_s`` deltas arrive spread over latency + words / rate."""
    sim.set_behaviour(latency_ms=20, tokens_per_s=50)  # 6 words: 20 ms + 120 ms
    started = time.perf_counter()
    stream = await client.chat.completions.create(model="sim-model", messages=HELLO, stream=True)
    arrivals: list[float] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - started)
    total = time.perf_counter() - started
    assert len(arrivals) == 6
    assert arrivals[0] >= 0.02
    assert arrivals[-1] - arrivals[0] >= 0.08  # 5 gaps of 20 ms, loosely
    assert 0.14 <= total < 1.0
    planned = float(stream.response.headers["x-imrelay-sim-model-time-ms"])
    assert planned == pytest.approx(140.0)


async def test_sim_model_paced_non_stream_waits_total(
    client: openai.AsyncOpenAI, sim: ModelSimulator
):
    """A non-streamed answer waits the same total time a streamed one would take."""
    sim.set_behaviour(tokens_per_s=60)  # 6 words: 100 ms
    started = time.perf_counter()
    await client.chat.completions.create(model="sim-model", messages=HELLO)
    assert 0.1 <= time.perf_counter() - started < 1.0


async def run_with_errors(seed: int) -> list[bool]:
    """Send 30 requests to a fresh simulator with error_rate 0.5; report which failed."""
    failed: list[bool] = []
    kinds: set[tuple[int, str | None]] = set()
    async with ModelSimulator(error_rate=0.5, seed=seed) as sim, client_for(sim) as client:
        for _ in range(30):
            try:
                await client.chat.completions.create(model="sim-model", messages=HELLO)
            except openai.InternalServerError as exc:
                kinds.add((exc.status_code, exc.type))
                failed.append(True)
            else:
                failed.append(False)
    assert kinds <= {(500, "server_error")}
    return failed


async def test_sim_model_error_rate_is_seeded():
    """``error_rate`` fails about that share of requests, identically for the same seed."""
    first = await run_with_errors(seed=7)
    assert 5 <= sum(first) <= 25
    assert await run_with_errors(seed=7) == first


async def test_sim_model_hang_until_client_gives_up(sim: ModelSimulator):
    """With ``hang`` the client times out; turning it off answers again."""
    sim.set_behaviour(hang=True)
    async with client_for(sim, timeout=0.2) as client:
        started = time.perf_counter()
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="sim-model", messages=HELLO)
        assert time.perf_counter() - started < 2.0
        sim.set_behaviour(hang=None)
        completion = await client.chat.completions.create(model="sim-model", messages=HELLO)
    assert completion.choices[0].message.content == ANSWER


async def test_sim_model_aclose_ends_hanging_requests(http: aiohttp.ClientSession):
    """Closing the simulator finishes promptly even while a request hangs."""
    sim = ModelSimulator()
    await sim.start()
    sim.set_behaviour(hang=True)
    body = {"model": "sim-model", "messages": HELLO}
    request = asyncio.ensure_future(http.post(f"{sim.base_url}/chat/completions", json=body))
    deadline = time.monotonic() + 5
    while not sim.requests and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sim.requests
    started = time.perf_counter()
    await sim.aclose()
    assert time.perf_counter() - started < 0.5  # shutdown_timeout (1 s) is not waited out
    try:
        async with await request as resp:
            assert resp.status == 503
    except aiohttp.ClientError:
        pass  # the connection may be closed before the 503 is written


@pytest.mark.parametrize(
    ("status", "error"),
    [(429, openai.RateLimitError), (503, openai.InternalServerError)],
)
async def test_sim_model_forced_status(
    client: openai.AsyncOpenAI, sim: ModelSimulator, status: int, error: type[Exception]
):
    """``status`` answers every request with that HTTP status and an OpenAI error body."""
    sim.set_behaviour(status=status)
    with pytest.raises(error) as info:
        await client.chat.completions.create(model="sim-model", messages=HELLO)
    assert isinstance(info.value, openai.APIStatusError)
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"]
    if status == 429:
        assert info.value.response.headers["retry-after"] == "1"
    with pytest.raises(error):
        await client.models.list()
    sim.set_behaviour(status=None)
    completion = await client.chat.completions.create(model="sim-model", messages=HELLO)
    assert completion.choices[0].message.content == ANSWER


async def test_sim_model_records_timings_by_request_id(
    client: openai.AsyncOpenAI, sim: ModelSimulator
):
    """The measured model time is kept under the caller's x-request-id."""
    sim.set_behaviour(latency_ms=30)
    raw = await client.chat.completions.with_raw_response.create(
        model="sim-model", messages=HELLO, extra_headers={"x-request-id": "abc-1"}
    )
    assert raw.headers["x-request-id"] == "abc-1"
    assert 30 <= sim.timings["abc-1"] < 1000
    stream = await client.chat.completions.create(
        model="sim-model", messages=HELLO, stream=True, extra_headers={"x-request-id": "abc-2"}
    )
    async for _ in stream:
        pass
    assert 30 <= sim.timings["abc-2"] < 1000


async def test_sim_model_bounds_recorded_requests():
    """``max_recorded`` caps the request log and the timings, dropping the oldest."""
    async with ModelSimulator(max_recorded=4) as sim, client_for(sim) as client:
        for i in range(10):
            await client.chat.completions.create(
                model="sim-model",
                messages=[{"role": "user", "content": str(i)}],
                extra_headers={"x-request-id": f"r{i}"},
            )
        assert 1 <= len(sim.requests) <= 4
        assert 1 <= len(sim.timings) <= 4
        assert sim.requests[-1]["messages"][0]["content"] == "9"
        assert "r9" in sim.timings
        assert "r0" not in sim.timings


def test_sim_model_set_behaviour_validates():
    """Out-of-range behaviour values are refused."""
    sim = ModelSimulator()
    for bad in (
        {"latency_ms": -1.0},
        {"tokens_per_s": 0.0},
        {"error_rate": 1.5},
        {"status": 99},
    ):
        with pytest.raises(ValueError, match="must be"):
            sim.set_behaviour(**bad)


async def test_sim_model_serve_runs_until_cancelled():
    """serve() answers on its port until the task is cancelled, then frees the port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    task = asyncio.create_task(serve("127.0.0.1", port, latency_ms=1.0, model_names=["m1"]))
    url = f"http://127.0.0.1:{port}/v1/models"
    deadline = time.monotonic() + 5
    async with httpx2.AsyncClient() as http:
        while True:
            try:
                resp = await http.get(url)
                break
            except httpx2.ConnectError:
                assert time.monotonic() < deadline, "serve() did not start"
                await asyncio.sleep(0.01)
        assert resp.json()["data"][0]["id"] == "m1"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(httpx2.ConnectError):
            await http.get(url)
