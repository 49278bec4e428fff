"""The simulators' lean HTTP/1.1 front (imrelay.sim._common.FastFront) over real sockets.

Every test runs on the standard loop and on uvloop (the simulators' processes run on uvloop).
A small aiohttp application stands behind the front; its handlers answer with an ``aiohttp``
marker, the front's routes with a ``front`` marker, so each test sees who answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from imrelay.sim._common import FastExchange, FastFront

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run_on(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` on a new loop of the given kind, bounded in time."""

    async def bounded() -> None:
        async with asyncio.timeout(20):
            await main()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(bounded())


class Routes:
    """The front's routes of the tests, and what they saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.seen: list[str] = []

    def fast(self, exchange: FastExchange) -> None:
        self.seen.append(exchange.body.decode())
        exchange.respond(200, b"front:" + exchange.body, "text/plain; charset=utf-8")

    def declines(self, exchange: FastExchange) -> None:
        return None

    async def slow(self, exchange: FastExchange) -> None:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        exchange.respond(200, b"front:slow", "text/plain; charset=utf-8")

    def boom(self, exchange: FastExchange) -> None:
        raise RuntimeError("boom")

    def stream(self, exchange: FastExchange) -> None:
        exchange.end_stream(b"data: 1\n\n", head=[("content-type", "text/event-stream")])

    async def broken_stream(self, exchange: FastExchange) -> None:
        exchange.start_stream(200, [("content-type", "text/event-stream")])
        exchange.write_chunk(b"data: 1\n\n")
        await asyncio.sleep(0)
        raise RuntimeError("broken mid-stream")


async def aiohttp_marker(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text=f"aiohttp:{request.path}")


@asynccontextmanager
async def front_server(routes: Routes, **options: Any) -> AsyncIterator[tuple[FastFront, int]]:
    """An aiohttp app behind a FastFront on an ephemeral loopback port."""
    app = web.Application(client_max_size=1024)
    for path in ("/fast", "/other", "/declines", "/slow", "/boom", "/stream", "/broken"):
        app.router.add_route("*", path, aiohttp_marker)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    front = FastFront(
        runner.server,
        {
            ("POST", "/fast"): routes.fast,
            ("GET", "/declines"): routes.declines,
            ("POST", "/slow"): routes.slow,
            ("POST", "/boom"): routes.boom,
            ("GET", "/stream"): routes.stream,
            ("GET", "/broken"): routes.broken_stream,
        },
        max_body=1024,
        **options,
    )
    await front.start("127.0.0.1", 0)
    try:
        yield front, front.port
    finally:
        await front.close(grace_s=0.1)
        await runner.cleanup()


def post(path: str, body: bytes, *extra: str, version: str = "HTTP/1.1") -> bytes:
    """A request with a Content-Length body."""
    head = [f"POST {path} {version}", "Host: 127.0.0.1", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer: status, headers (lower-case names), body (de-chunked); 1xx skipped."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    while head[0].split()[1].startswith("1"):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(await reader.readuntil(b"\r\n"), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
        return int(head[0].split()[1]), headers, body
    length = int(headers.get("content-length", "0"))
    return int(head[0].split()[1]), headers, await reader.readexactly(length)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_front_answers_its_routes_in_order_on_one_connection(loop: str) -> None:
    """Pipelined requests to a route are answered in order, keep-alive, with aiohttp's headers."""

    async def main() -> None:
        routes = Routes()
        async with front_server(routes) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/fast", b"one") + post("/fast", b"two"))
            first, second = await read_answer(reader), await read_answer(reader)
            writer.write(post("/fast", b"three")[:20])  # a head split over two segments
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(post("/fast", b"three")[20:])
            third = await read_answer(reader)
            writer.close()
        assert [a[2] for a in (first, second, third)] == [
            b"front:one",
            b"front:two",
            b"front:three",
        ]
        status, headers, _ = first
        assert status == 200
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert headers["content-length"] == "9"
        assert headers["server"] == SERVER_SOFTWARE
        assert headers["date"].endswith(" GMT")
        assert routes.seen == ["one", "two", "three"]

    run_on(loop, main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_front_hands_the_connection_to_aiohttp_at_the_first_other_request(loop: str) -> None:
    """Another route goes to aiohttp with the rest of the connection, pipelined data included."""

    async def main() -> None:
        routes = Routes()
        async with front_server(routes) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/fast", b"a") + get("/other") + post("/fast", b"b"))
            answers = [await read_answer(reader) for _ in range(3)]
            writer.write(get("/declines"))  # still aiohttp's connection
            answers.append(await read_answer(reader))
            writer.close()
        assert [a[2] for a in answers] == [
            b"front:a",
            b"aiohttp:/other",
            b"aiohttp:/fast",
            b"aiohttp:/declines",
        ]
        assert routes.seen == ["a"]

    run_on(loop, main)


@pytest.mark.parametrize(
    "request_bytes",
    [
        post("/fast", b"x", version="HTTP/1.0"),
        post("/fast", b"x", "Connection: close"),
        post("/fast", b"x", "Expect: 100-continue"),
        post("/fast", b"x", " folded: header"),
        post("/fast", b"x", "X-Twice: 1", "x-twice: 2"),
        post("/f%61st", b"x"),
        b"POST /fast HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        get("/declines"),
    ],
    ids=["http10", "close", "expect", "folded", "repeated", "encoded", "chunked", "declined"],
)
def test_front_leaves_unusual_requests_to_aiohttp(request_bytes: bytes) -> None:
    """Whatever the front does not take plainly is answered by aiohttp, as it would be alone."""

    async def main() -> None:
        routes = Routes()
        async with front_server(routes) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_bytes)
            status, _, body = await read_answer(reader)
            writer.close()
        assert routes.seen == []
        assert body.startswith(b"aiohttp:") or status == 400  # aiohttp refuses the folded line

    run_on("uvloop", main)


def test_front_lets_aiohttp_refuse_an_oversized_body() -> None:
    """A body over ``max_body`` gets aiohttp's 413, not the route."""

    async def main() -> None:
        routes = Routes()
        async with front_server(routes) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/fast", b"x" * 2000))
            status, _, _ = await read_answer(reader)
            writer.close()
        assert status == 413
        assert routes.seen == []

    run_on("uvloop", main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_front_finishes_a_waiting_route_before_the_next_request(loop: str) -> None:
    """A pipelined request waits for the answer under way: answers keep the request order."""

    async def main() -> None:
        routes = Routes()
        async with front_server(routes) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/slow", b"") + post("/fast", b"after"))
            await asyncio.sleep(0.05)
            assert routes.seen == []  # not taken while /slow waits
            routes.release.set()
            first, second = await read_answer(reader), await read_answer(reader)
            writer.close()
        assert (first[2], second[2]) == (b"front:slow", b"front:after")

    run_on(loop, main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_front_answers_500_and_closes_when_a_route_fails(loop: str) -> None:
    """An exception in a route is a 500, and the connection is closed."""

    async def main() -> None:
        async with front_server(Routes()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/boom", b""))
            status, _, _ = await read_answer(reader)
            assert status == 500
            assert await reader.read() == b""
            writer.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_front_cancels_a_waiting_route_when_its_client_leaves(loop: str) -> None:
    """With ``cancel_on_disconnect`` (the model simulator's), a client that goes away ends it."""

    async def main() -> None:
        routes = Routes()
        async with front_server(routes, cancel_on_disconnect=True) as (_, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/slow", b""))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
            await asyncio.wait_for(routes.cancelled.wait(), 5)

    run_on(loop, main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_front_close_lets_an_answer_under_way_finish(loop: str) -> None:
    """Closing the front gives a waiting route its grace period to answer."""

    async def main() -> None:
        routes = Routes()
        async with front_server(routes) as (front, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/slow", b""))
            await writer.drain()
            await asyncio.sleep(0.05)
            closing = asyncio.ensure_future(front.close(grace_s=5))
            await asyncio.sleep(0.05)
            routes.release.set()
            status, _, body = await read_answer(reader)
            await closing
            assert (status, body) == (200, b"front:slow")
            assert await reader.read() == b""
            writer.close()

    run_on(loop, main)


def test_front_sends_a_whole_chunked_answer() -> None:
    """``end_stream(head=...)`` sends head, chunk and end together, chunked."""

    async def main() -> None:
        async with front_server(Routes()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get("/stream") + get("/stream"))
            answers = [await read_answer(reader), await read_answer(reader)]
            writer.close()
        for status, headers, body in answers:
            assert (status, body) == (200, b"data: 1\n\n")
            assert headers["transfer-encoding"] == "chunked"
            assert headers["content-type"] == "text/event-stream"

    run_on("uvloop", main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_front_stops_reading_behind_a_waiting_route_and_resumes(loop: str) -> None:
    """Requests piling up behind a waiting route pause reading; all are answered afterwards."""

    async def main() -> None:
        routes = Routes()
        async with front_server(routes) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            bodies = [bytes([65 + i]) * 900 for i in range(12)]  # more than max_body + a head
            writer.write(post("/slow", b""))
            await asyncio.sleep(0.05)
            writer.write(b"".join(post("/fast", b) for b in bodies))  # arrives while /slow waits
            await asyncio.sleep(0.1)
            assert routes.seen == []
            routes.release.set()
            answers = [await read_answer(reader) for _ in range(13)]
            writer.write(post("/fast", b"last"))  # read only if reading was resumed
            answers.append(await read_answer(reader))
            writer.close()
        expected = [b"front:slow"] + [b"front:" + b for b in bodies] + [b"front:last"]
        assert [a[2] for a in answers] == expected

    run_on(loop, main)


def test_front_cuts_a_stream_short_when_its_route_fails_midway() -> None:
    """After the head went out, a failing route ends the connection; no second status line."""

    async def main() -> None:
        async with front_server(Routes()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get("/broken"))
            received = await reader.read()
            writer.close()
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert received.count(b"HTTP/1.1") == 1
        assert received.endswith(b"data: 1\n\n\r\n")  # the chunk, then nothing: no end marker

    run_on("uvloop", main)
