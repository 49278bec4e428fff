"""Tests of DingTalk media downloads (imrelay.platforms.dingtalk.media) against the simulator.

The simulator runs with its media extension (imrelay.sim.dingtalk_media), which is also tested
here: download codes, temporary URLs, the control API, and real pictures in injected messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from imrelay.errors import PlatformAPIError
from imrelay.platforms.dingtalk.api import DingTalkAPI
from imrelay.platforms.dingtalk.errors import DingTalkRequestRejected, UnknownDingTalkError
from imrelay.platforms.dingtalk.media import DOWNLOAD_PATH, fetch_media
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.dingtalk_media import MediaExtension, build_png

PNG = build_png()


class FakeClock:
    """A settable wall clock (epoch seconds)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ext() -> MediaExtension:
    return MediaExtension(url_ttl_s=60.0)


@pytest.fixture
async def sim(ext: MediaExtension, clock: FakeClock) -> AsyncIterator[DingTalkSimulator]:
    async with DingTalkSimulator(extensions=[ext], clock=clock) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def api_for(sim: DingTalkSimulator, http: aiohttp.ClientSession, clock: FakeClock) -> DingTalkAPI:
    """A DingTalk API client with ``sim``'s credentials."""
    return DingTalkAPI(
        http,
        platform="dt",
        app_key=sim.app_key,
        app_secret=sim.app_secret,
        api_base=sim.base_url,
        timeout_s=5.0,
        clock=clock,
    )


@pytest.fixture
def api(sim: DingTalkSimulator, http: aiohttp.ClientSession, clock: FakeClock) -> DingTalkAPI:
    return api_for(sim, http, clock)


async def fetch(
    api: DingTalkAPI,
    http: aiohttp.ClientSession,
    code: str,
    *,
    max_bytes: int = 1 << 20,
    robot_code: str | None = None,
) -> bytes:
    return await fetch_media(
        api,
        http,
        robot_code=robot_code or api.app_key,
        download_code=code,
        max_bytes=max_bytes,
        timeout_s=5.0,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- build_png ------------------------------------------------------------------------------


def test_build_png_is_a_valid_png() -> None:
    """The generated PNG has the signature, a correct IHDR, and pixel rows that decompress."""
    png = build_png(3, 2, (1, 2, 3))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[12:16] == b"IHDR"
    assert int.from_bytes(png[16:20], "big") == 3
    assert int.from_bytes(png[20:24], "big") == 2
    assert zlib.crc32(png[12:29]) == int.from_bytes(png[29:33], "big")
    idat = png.index(b"IDAT")
    length = int.from_bytes(png[idat - 4 : idat], "big")
    assert (
        zlib.decompress(png[idat + 4 : idat + 4 + length]) == (b"\x00" + b"\x01\x02\x03" * 3) * 2
    )
    assert png.endswith(b"IEND\xaeB`\x82")


@pytest.mark.parametrize(
    ("size", "rgb"), [((0, 1), (0, 0, 0)), ((1, -1), (0, 0, 0)), ((1, 1), (0, 256, 0))]
)
def test_build_png_rejects_bad_arguments(size: tuple[int, int], rgb: tuple[int, int, int]) -> None:
    """Sizes must be positive and colours bytes."""
    with pytest.raises(ValueError, match="must be"):
        build_png(*size, rgb)


# -- fetch_media ----------------------------------------------------------------------------


async def test_fetch_media_downloads_bytes(
    api: DingTalkAPI, http: aiohttp.ClientSession, ext: MediaExtension
) -> None:
    """A known download code yields the stored bytes through a temporary URL."""
    code = ext.add_media(PNG)
    assert await fetch(api, http, code) == PNG
    assert ext.state() == {"items": 1, "queued": 0, "downloads": 1, "fetches": 1}


async def test_fetch_media_never_logs_url_or_token(
    api: DingTalkAPI,
    http: aiohttp.ClientSession,
    ext: MediaExtension,
    sim: DingTalkSimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Neither the temporary URL nor the access token appears in logs, even at DEBUG."""
    caplog.set_level(logging.DEBUG)
    code = ext.add_media(b"secret bytes")
    async with http.post(
        sim.base_url + DOWNLOAD_PATH,
        json={"downloadCode": code, "robotCode": sim.app_key},
        headers={"x-acs-dingtalk-access-token": await api.access_token()},
    ) as resp:
        url = (await resp.json())["downloadUrl"]
    assert url.startswith(sim.base_url + "/_sim/media/")
    caplog.clear()
    assert await fetch(api, http, code) == b"secret bytes"
    token = url.rsplit("/", 1)[1]
    assert caplog.records, "nothing was logged; the check would be vacuous"
    assert "/_sim/media/" not in caplog.text
    assert token[:8] not in caplog.text
    assert (await api.access_token()) not in caplog.text


async def test_fetch_media_refreshes_token_once(
    api: DingTalkAPI, http: aiohttp.ClientSession, ext: MediaExtension, sim: DingTalkSimulator
) -> None:
    """A token the platform no longer accepts is refreshed once and the call repeated."""
    old = await api.access_token()
    sim.invalidate_token()
    assert await fetch(api, http, ext.add_media(PNG)) == PNG
    assert await api.access_token() != old


async def test_fetch_media_oversize_by_content_length(
    api: DingTalkAPI, http: aiohttp.ClientSession, ext: MediaExtension
) -> None:
    """A file above the cap is refused (not retryable) from its Content-Length."""
    code = ext.add_media(b"x" * 5000, "application/octet-stream")
    with pytest.raises(PlatformAPIError, match="larger than the 4096-byte limit") as info:
        await fetch(api, http, code, max_bytes=4096)
    assert info.value.retryable is False
    assert await fetch(api, http, code, max_bytes=5000) == b"x" * 5000


async def test_fetch_media_unknown_code(
    api: DingTalkAPI, http: aiohttp.ClientSession, sim: DingTalkSimulator
) -> None:
    """An unknown download code is a permanent error."""
    with pytest.raises(UnknownDingTalkError) as info:
        await fetch(api, http, "no-such-code")
    assert info.value.errcode == "invalidParameter.downloadCode"
    assert info.value.retryable is False


async def test_fetch_media_wrong_robot_code(
    api: DingTalkAPI, http: aiohttp.ClientSession, ext: MediaExtension
) -> None:
    """Another robot's code is refused for good."""
    with pytest.raises(DingTalkRequestRejected):
        await fetch(api, http, ext.add_media(PNG), robot_code="other-robot")


async def test_fetch_media_network_error_retryable(
    sim: DingTalkSimulator, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A download URL nobody answers at is a retryable failure that does not name the URL."""
    dead = MediaExtension(url_base=f"http://127.0.0.1:{free_port()}")
    async with DingTalkSimulator(extensions=[dead], clock=clock) as other:
        api = api_for(other, http, clock)
        with pytest.raises(PlatformAPIError) as info:
            await fetch(api, http, dead.add_media(PNG))
    assert info.value.retryable is True
    assert "failed: Client" in str(info.value)
    assert "127.0.0.1" not in str(info.value)
    assert info.value.__cause__ is None


async def test_fetch_media_non_http_download_url(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """An answer whose downloadUrl is not http(s) is an error."""
    odd = MediaExtension(url_base="ftp://files.example")
    async with DingTalkSimulator(extensions=[odd], clock=clock) as other:
        api = api_for(other, http, clock)
        with pytest.raises(PlatformAPIError, match="lacks an http"):
            await fetch(api, http, odd.add_media(PNG))


async def test_fetch_media_expired_url(
    api: DingTalkAPI,
    http: aiohttp.ClientSession,
    ext: MediaExtension,
    sim: DingTalkSimulator,
    clock: FakeClock,
) -> None:
    """A temporary URL stops working after its TTL; an error status is not retryable."""
    code = ext.add_media(PNG)
    async with http.post(
        sim.base_url + DOWNLOAD_PATH,
        json={"downloadCode": code, "robotCode": sim.app_key},
        headers={"x-acs-dingtalk-access-token": await api.access_token()},
    ) as resp:
        url = (await resp.json())["downloadUrl"]
    async with http.get(url) as resp:
        assert resp.status == 200
    clock.now += 61
    async with http.get(url) as resp:
        assert resp.status == 404
    async with http.get(sim.base_url + "/_sim/media/unknown") as resp:
        assert resp.status == 404


class StreamServer:
    """Serves a chunked body without Content-Length, or a chosen status, at any path."""

    def __init__(self) -> None:
        self.body = b""
        self.status = 200

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.status != 200:
            return web.Response(status=self.status)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(self.body), 1000):
            await resp.write(self.body[i : i + 1000])
        await resp.write_eof()
        return resp


@pytest.fixture
async def stream_server() -> AsyncIterator[tuple[StreamServer, str]]:
    server = StreamServer()
    app = web.Application()
    app.router.add_get("/{tail:.*}", server.handle)
    test_server = TestServer(app, host="127.0.0.1", port=0)
    await test_server.start_server()
    try:
        yield server, str(test_server.make_url("")).rstrip("/")
    finally:
        await test_server.close()


async def test_fetch_media_oversize_counted_without_content_length(
    stream_server: tuple[StreamServer, str], clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A chunked body with no Content-Length is counted and refused past the cap."""
    server, base = stream_server
    ext = MediaExtension(url_base=base)
    async with DingTalkSimulator(extensions=[ext], clock=clock) as other:
        api = api_for(other, http, clock)
        code = ext.add_media(b"unused")
        server.body = b"y" * 10_000
        assert await fetch(api, http, code, max_bytes=10_000) == server.body
        with pytest.raises(PlatformAPIError, match="larger than") as info:
            await fetch(api, http, code, max_bytes=9_999)
        assert info.value.retryable is False
        server.status = 503
        with pytest.raises(PlatformAPIError, match="http 503") as info:
            await fetch(api, http, code)
        assert info.value.retryable is True
        server.status = 403
        with pytest.raises(PlatformAPIError, match="http 403") as info:
            await fetch(api, http, code)
        assert info.value.retryable is False


async def test_fetch_media_timeout_retryable(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A download that stalls past the timeout is a retryable failure."""

    never = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b"x")
        await never.wait()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", stall)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        ext = MediaExtension(url_base=str(server.make_url("")).rstrip("/"))
        async with DingTalkSimulator(extensions=[ext], clock=clock) as other:
            api = api_for(other, http, clock)
            with pytest.raises(PlatformAPIError, match="timed out") as info:
                await fetch_media(
                    api,
                    http,
                    robot_code=other.app_key,
                    download_code=ext.add_media(PNG),
                    max_bytes=1000,
                    timeout_s=0.05,
                )
            assert info.value.retryable is True
    finally:
        never.set()
        await server.close()


# -- the simulator's media extension ------------------------------------------------------


async def post_download(
    http: aiohttp.ClientSession, sim: DingTalkSimulator, body: Any, token: str | None
) -> tuple[int, dict[str, Any]]:
    headers = {"x-acs-dingtalk-access-token": token} if token else {}
    async with http.post(sim.base_url + DOWNLOAD_PATH, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_sim_media_download_errors(
    api: DingTalkAPI, http: aiohttp.ClientSession, sim: DingTalkSimulator, ext: MediaExtension
) -> None:
    """Missing or bad token, bad bodies, a foreign robot and an unknown code get their errors."""
    code = ext.add_media(PNG)
    good = json.dumps({"downloadCode": code, "robotCode": sim.app_key})
    status, body = await post_download(http, sim, good, None)
    assert (status, body["code"]) == (400, "AuthenticationFailed.MissingParameter")
    status, body = await post_download(http, sim, good, "tok-wrong")
    assert (status, body["code"]) == (401, "InvalidAuthentication")
    token = await api.access_token()
    for bad in ("not json", "[]", json.dumps({"downloadCode": code}), json.dumps({})):
        status, body = await post_download(http, sim, bad, token)
        assert (status, body["code"]) == (400, "MissingParameter")
    status, body = await post_download(
        http, sim, json.dumps({"downloadCode": code, "robotCode": "x"}), token
    )
    assert (status, body["code"]) == (400, "invalidParameter.robotCode.auth")
    status, body = await post_download(
        http, sim, json.dumps({"downloadCode": "nope", "robotCode": sim.app_key}), token
    )
    assert (status, body["code"]) == (400, "invalidParameter.downloadCode")
    assert body["requestid"]
    status, body = await post_download(http, sim, good, token)
    assert status == 200
    assert set(body) == {"downloadUrl"}


async def test_sim_media_control_api(
    api: DingTalkAPI, http: aiohttp.ClientSession, sim: DingTalkSimulator, ext: MediaExtension
) -> None:
    """``POST /_sim/media`` stores an item (``?next=1`` queues it for the next message)."""
    async with http.post(
        sim.base_url + "/_sim/media", data=b"GIF89a...", headers={"Content-Type": "image/gif"}
    ) as resp:
        code = (await resp.json())["download_code"]
    assert ext.media(code) == b"GIF89a..."
    assert await fetch(api, http, code) == b"GIF89a..."
    async with http.post(sim.base_url + "/_sim/media?next=1", data=b"queued") as resp:
        queued = (await resp.json())["download_code"]
    assert ext.state()["queued"] == 1
    assert ext.code_for("file") == queued
    async with http.post(sim.base_url + "/_sim/media", data=b"") as resp:
        assert resp.status == 400
    async with http.get(sim.base_url + "/_sim/state") as resp:
        assert (await resp.json())["media"]["items"] == 2


def test_sim_media_default_items_per_kind() -> None:
    """Without a queued item, pictures get a PNG and other kinds placeholder bytes."""
    ext = MediaExtension(max_items=3)
    png = ext.media(ext.code_for("picture"))
    assert png is not None
    assert png.startswith(b"\x89PNG")
    assert ext.media(ext.code_for("audio")) == b"#!AMR\n" + bytes(32)
    assert ext.media(ext.code_for("unknownMsgType")) == b"\x00"
    queued = ext.attach_next(b"gone")
    ext.add_media(b"a")
    ext.add_media(b"b")
    ext.add_media(b"c")  # max_items=3: the queued item is forgotten
    assert ext.media(queued) is None
    assert ext.media(ext.code_for("picture")) == png


async def test_sim_media_extension_requires_install() -> None:
    """The extension refuses to serve before it is installed, and has no faults."""
    ext = MediaExtension()
    with pytest.raises(RuntimeError, match="not installed"):
        _ = ext.sim
    with pytest.raises(ValueError, match="no faults"):
        await ext.fault({"x": 1})
    with pytest.raises(ValueError, match="url_ttl_s"):
        MediaExtension(url_ttl_s=0)
    ext.attach_next(b"x")
    await ext.aclose()
    assert ext.state()["queued"] == 0


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[list[dict[str, Any]], str]]:
    """A webhook receiver that records the bot payloads the simulator POSTs (HTTP mode)."""
    received: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"msgtype": "empty"})

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield received, str(server.make_url("/hook"))
    finally:
        await server.close()


async def test_sim_messages_carry_downloadable_media(
    receiver: tuple[list[dict[str, Any]], str],
    api: DingTalkAPI,
    http: aiohttp.ClientSession,
    sim: DingTalkSimulator,
    ext: MediaExtension,
) -> None:
    """Picture, rich-text and file messages carry codes that download real media."""
    received, url = receiver
    sim.webhook_url = url
    await sim.send_message(msgtype="picture")
    jpeg = b"\xff\xd8\xff\xe0fake"
    ext.attach_next(jpeg, "image/jpeg")
    await sim.send_message("看这张图", msgtype="richText")
    await sim.send_message("notes.txt", msgtype="file")
    picture, rich, file = received
    content = picture["content"]
    assert content["downloadCode"] == content["pictureDownloadCode"]
    assert (await fetch(api, http, content["downloadCode"])).startswith(b"\x89PNG")
    text_item, picture_item = rich["content"]["richText"]
    assert text_item == {"text": "看这张图"}
    assert picture_item["type"] == "picture"
    assert await fetch(api, http, picture_item["downloadCode"]) == jpeg
    assert file["content"]["fileName"] == "notes.txt"
    assert (await fetch(api, http, file["content"]["downloadCode"])).startswith("模拟".encode())


async def test_sim_without_media_extension_uses_random_codes(
    receiver: tuple[list[dict[str, Any]], str],
) -> None:
    """Without the extension, media messages still carry (undownloadable) distinct codes."""
    received, url = receiver
    async with DingTalkSimulator(extensions=[], webhook_url=url) as sim:
        assert sim.media_code_factory is None
        await sim.send_message(msgtype="picture")
    content = received[0]["content"]
    assert content["downloadCode"] != content["pictureDownloadCode"]
