"""Tests of the DingTalk Stream connector against a programmable fake gateway on loopback.

The fake (:class:`FakeGateway`) is deliberately not :mod:`imrelay.sim.dingtalk`: each test
scripts the open-connection answers, pushes raw frames (valid or not), answers or ignores
WebSocket pings, and closes or aborts sockets at chosen moments. Backoff sleeps go through an
injected :class:`Sleeper` that records each delay instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from imrelay.config import DingTalkSettings
from imrelay.errors import (
    AuthError,
    ConnectionLost,
    PlatformAPIError,
    ProtocolError,
    RateLimited,
    StoreError,
)
from imrelay.message import InboundMessage
from imrelay.observability.metrics import Metrics
from imrelay.platforms._reconnect import backoff, is_retryable
from imrelay.platforms.dingtalk.api import DingTalkAPI
from imrelay.platforms.dingtalk.protocol import TOPIC_BOT_DELEGATE, TOPIC_BOT_MESSAGE
from imrelay.platforms.dingtalk.stream import DingTalkStream

NAME = "dt"
APP_KEY = "dingfakeappkey"
APP_SECRET = "fake-app-secret-value"
WALL_NOW = 1_700_000_000.0
HEARTBEAT_OFF = 30.0  # long enough that no heartbeat fires during a test
BACKOFF_MAX = 7.0
TIMEOUT_FACTOR = float(os.environ.get("IMRELAY_TESTS_TIMEOUT_FACTOR", "1"))

# -- frames ----------------------------------------------------------------------------------


def bot_payload(msg_id: str = "msgA==", text: str = " hello") -> dict[str, Any]:
    """A realistic 1:1 text bot message (protocol doc §1.7)."""
    return {
        "conversationId": "cidDirect==",
        "conversationType": "1",
        "chatbotCorpId": "dingcorp",
        "chatbotUserId": "$:LWCP_v1:$bot",
        "msgId": msg_id,
        "senderNick": "Alice",
        "isAdmin": False,
        "senderStaffId": "staff-1",
        "senderId": "$:LWCP_v1:$alice",
        "sessionWebhookExpiredTime": 1_690_367_502_152,
        "createAt": 1_690_362_101_894,
        "senderCorpId": "dingcorp",
        "isInAtList": True,
        "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=abc",
        "text": {"content": text},
        "robotCode": APP_KEY,
        "msgtype": "text",
    }


def frame(ftype: str, topic: str, message_id: str | None, data: Any = "", **extra: Any) -> str:
    """A downstream frame (§1.3); ``data`` is sent as given (normally a JSON string)."""
    headers: dict[str, Any] = {"topic": topic, "contentType": "application/json"}
    headers["time"] = "1690362102194"
    if message_id is not None:
        headers["messageId"] = message_id
    return json.dumps(
        {"specVersion": "1.0", "type": ftype, "headers": headers, "data": data, **extra}
    )


def bot_frame(
    message_id: str, msg_id: str = "msgA==", topic: str = TOPIC_BOT_MESSAGE, text: str = " hi"
) -> str:
    return frame("CALLBACK", topic, message_id, json.dumps(bot_payload(msg_id, text)))


def ping_frame(message_id: str, opaque: str = "op-1") -> str:
    return frame("SYSTEM", "ping", message_id, json.dumps({"opaque": opaque}))


DISCONNECT = frame("SYSTEM", "disconnect", None, json.dumps({"reason": "connection is expired"}))


# -- the fake gateway ------------------------------------------------------------------------


@dataclass
class ServerConn:
    """One WebSocket the fake gateway accepted; the test drives it."""

    ticket: str
    request: web.Request
    ws: web.WebSocketResponse
    answer_pings: bool = True
    received: list[aiohttp.WSMessage] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def acks(self) -> list[dict[str, Any]]:
        """Every text frame the client sent, decoded."""
        return [json.loads(m.data) for m in self.received if m.type == aiohttp.WSMsgType.TEXT]

    def acks_for(self, message_id: str) -> list[dict[str, Any]]:
        return [a for a in self.acks if a["headers"]["messageId"] == message_id]

    def count(self, kind: aiohttp.WSMsgType) -> int:
        return sum(1 for m in self.received if m.type == kind)

    async def push(self, text: str) -> None:
        await self.ws.send_str(text)

    async def push_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    def write_raw(self, data: bytes) -> None:
        """Write bytes that bypass the WebSocket framing (to break the protocol)."""
        assert self.request.transport is not None
        self.request.transport.write(data)

    async def close(self) -> None:
        await self.ws.close()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()


class FakeGateway:
    """A DingTalk gateway whose open-connection answers and sockets the test scripts.

    ``open_plan`` / ``connect_plan`` hold the behaviours of the next calls (``"ok"`` once
    exhausted): ``ok``, ``auth`` (400 invalidClientIdOrSecret), ``bad`` (400, another code),
    ``500``, ``hang`` (until :attr:`release`); for ``/connect``: ``ok``, ``refuse`` (403),
    ``hang``.
    """

    def __init__(self) -> None:
        self.open_plan: list[str] = []
        self.connect_plan: list[str] = []
        self.open_requests: list[dict[str, Any]] = []
        self.conns: list[ServerConn] = []
        self.answer_pings = True
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1.0/gateway/connections/open", self._open)
        app.router.add_get("/connect", self._connect)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        self.release.set()
        for conn in self.conns:
            if not conn.ended.is_set():
                conn.abort()
        assert self._runner is not None
        await self._runner.cleanup()

    async def _open(self, request: web.Request) -> web.StreamResponse:
        self.open_requests.append(await request.json())
        mode = self.open_plan.pop(0) if self.open_plan else "ok"
        if mode == "auth":
            body = {"requestid": "r1", "code": "invalidClientIdOrSecret", "message": "无效的"}
            return web.json_response(body, status=400)
        if mode == "bad":
            body = {"requestid": "r2", "code": "someOtherProblem", "message": "no"}
            return web.json_response(body, status=400)
        if mode == "500":
            return web.json_response({"code": "unknownError", "message": "boom"}, status=500)
        if mode == "hang":
            await self.release.wait()
            return web.Response(status=503)
        ticket = f"ticket {len(self.open_requests)}"
        endpoint = f"ws://127.0.0.1:{self.port}/connect"
        return web.json_response({"endpoint": endpoint, "ticket": ticket})

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        mode = self.connect_plan.pop(0) if self.connect_plan else "ok"
        if mode == "refuse":
            return web.Response(status=403)
        if mode == "hang":
            await self.release.wait()
            return web.Response(status=503)
        ws = web.WebSocketResponse(autoping=False, timeout=0.5)
        await ws.prepare(request)
        conn = ServerConn(request.query["ticket"], request, ws, answer_pings=self.answer_pings)
        self.conns.append(conn)
        try:
            while True:
                msg = await ws.receive()
                if msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    break
                conn.received.append(msg)
                if msg.type == aiohttp.WSMsgType.PING and conn.answer_pings:
                    await ws.pong(msg.data)
        finally:
            conn.ended.set()
        return ws


# -- the test's side of the connector --------------------------------------------------------


class FakeIntake:
    """An :class:`~imrelay.platforms.base.Intake` whose commits and capacity the test controls.

    ``results`` scripts the commits in order: ``True``/``False`` resolve at once, an exception
    fails the commit, ``"hold"`` leaves it pending in :attr:`held` for the test to resolve.
    ``full_after_offer`` makes every offer use up the capacity (a worker of size one).
    """

    def __init__(self) -> None:
        self.offered: list[InboundMessage] = []
        self.results: list[bool | BaseException | str] = []
        self.held: list[asyncio.Future[bool]] = []
        self.capacity = asyncio.Event()
        self.capacity.set()
        self.capacity_waits = 0
        self.capacity_errors: list[BaseException] = []
        self.full_after_offer = False

    def offer(self, message: InboundMessage) -> Awaitable[bool]:
        self.offered.append(message)
        if self.full_after_offer:
            self.capacity.clear()
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        result = self.results.pop(0) if self.results else True
        if result == "hold":
            self.held.append(fut)
        elif isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(bool(result))
        return fut

    async def wait_capacity(self) -> None:
        self.capacity_waits += 1
        if self.capacity_errors:
            raise self.capacity_errors.pop(0)
        await self.capacity.wait()

    def has_capacity(self) -> bool:
        return True

    def message_ids(self) -> list[str]:
        return [m.message_id for m in self.offered]


class Sleeper:
    """The injected ``sleep``: records backoff delays without waiting.

    The heartbeat shares the injected sleep, so its interval (recognised by value) is really
    slept. While :attr:`gate` is clear, backoff sleeps block, to observe the "down" state.
    """

    def __init__(self, heartbeat_s: float) -> None:
        self.heartbeat_s = heartbeat_s
        self.delays: list[float] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, delay: float) -> None:
        if delay == self.heartbeat_s:
            await asyncio.sleep(delay)
            return
        self.delays.append(delay)
        await self.gate.wait()


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_delays() -> Iterator[float]:
    """Delays 0.001, 0.002, … so recorded sleeps show which retry they belong to."""
    return (0.001 * k for k in itertools.count(1))


async def until(predicate: Callable[[], bool], what: str = "", timeout: float = 3.0) -> None:
    """Poll ``predicate`` every 5 ms; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


def stream_tasks() -> list[asyncio.Task[Any]]:
    """Tasks running a coroutine of DingTalkStream (reader, heartbeat, linger, ACKs)."""
    found = []
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", "")
        if name.startswith("DingTalkStream.") and not task.done():
            found.append(task)
    return found


_UNSET: Any = object()


@dataclass
class Harness:
    """Builds connectors wired to the fake gateway, and cleans them up."""

    gateway: FakeGateway
    http: aiohttp.ClientSession
    metrics: Metrics
    sleeper: Sleeper = field(default_factory=lambda: Sleeper(HEARTBEAT_OFF))
    streams: list[DingTalkStream] = field(default_factory=list)
    runs: list[asyncio.Task[None]] = field(default_factory=list)

    def make(
        self,
        *,
        delays: Callable[[], Iterator[float]] | None = _UNSET,
        clock: Callable[[], float] = time.monotonic,
        api_timeout_s: float = 1.0,
        **overrides: Any,
    ) -> DingTalkStream:
        values: dict[str, Any] = {
            "type": "dingtalk",
            "app_key": APP_KEY,
            "app_secret": APP_SECRET,
            "api_base": self.gateway.url,
            "heartbeat_s": HEARTBEAT_OFF,
            "pong_timeout_s": 0.1,
            "open_timeout_s": 1.0,
            "backoff_initial_s": 0.01,
            "backoff_max_s": BACKOFF_MAX,
            "healthy_after_s": 10.0,
            "http_timeout_s": api_timeout_s,
        }
        values.update(overrides)
        settings = DingTalkSettings.model_validate(values)
        self.sleeper.heartbeat_s = settings.heartbeat_s
        api = DingTalkAPI(
            self.http,
            platform=NAME,
            app_key=APP_KEY,
            app_secret=APP_SECRET,
            api_base=self.gateway.url,
            timeout_s=settings.http_timeout_s,
        )
        stream = DingTalkStream(
            NAME,
            settings,
            api,
            self.http,
            self.metrics,
            clock=clock,
            wall_clock=lambda: WALL_NOW,
            sleep=self.sleeper,
            delays=counting_delays if delays is _UNSET else delays,
        )
        self.streams.append(stream)
        return stream

    def start(self, stream: DingTalkStream, intake: FakeIntake) -> asyncio.Task[None]:
        task = asyncio.create_task(stream.run(intake))
        self.runs.append(task)
        return task

    async def started(
        self, intake: FakeIntake | None = None, **kwargs: Any
    ) -> tuple[DingTalkStream, FakeIntake, ServerConn]:
        """Make and start a connector; return it once its first WebSocket is up."""
        intake = intake or FakeIntake()
        stream = self.make(**kwargs)
        self.start(stream, intake)
        await self.conn(0)
        await until(lambda: stream.connected, "connected")
        return stream, intake, self.gateway.conns[0]

    async def conn(self, index: int) -> ServerConn:
        await until(lambda: len(self.gateway.conns) > index, f"websocket #{index + 1}")
        return self.gateway.conns[index]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"platform": NAME, **labels})

    def up(self) -> float | None:
        return self.sample("imrelay_connection_up")

    def reconnects(self, reason: str) -> float:
        return self.sample("imrelay_reconnects_total", reason=reason) or 0.0

    def rejected(self, reason: str) -> float:
        return self.sample("imrelay_messages_rejected_total", reason=reason) or 0.0


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A fake gateway, a real client session, and cleanup of every connector started."""
    gateway = FakeGateway()
    await gateway.start()
    http = aiohttp.ClientSession()
    h = Harness(gateway, http, Metrics(CollectorRegistry(), process=False))
    try:
        yield h
    finally:
        h.sleeper.gate.set()
        for task in h.runs:
            task.cancel()
        for task in h.runs:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for stream in h.streams:
            await stream.aclose()
        await http.close()
        await gateway.close()


async def wait_ack(conn: ServerConn, message_id: str) -> dict[str, Any]:
    await until(lambda: bool(conn.acks_for(message_id)), f"ack of {message_id}")
    return conn.acks_for(message_id)[0]


# -- bot messages and ACK timing -------------------------------------------------------------


async def test_stream_callback_offered_and_acked_after_commit(harness: Harness) -> None:
    """A bot CALLBACK is offered parsed, and ACKed with code 200 only once its commit resolves."""
    intake = FakeIntake()
    intake.results = ["hold"]
    _, intake, conn = await harness.started(intake)

    await conn.push(bot_frame("mid-1", msg_id="msgA==", text=" hello there"))
    await until(lambda: len(intake.held) == 1, "offer")
    # A later frame is handled while the commit is held: the ACK is really waiting for it.
    await conn.push(ping_frame("ping-1"))
    await wait_ack(conn, "ping-1")
    assert conn.acks_for("mid-1") == []

    message = intake.offered[0]
    assert message.platform == NAME
    assert message.message_id == "msgA=="
    assert message.ingress == "stream"
    assert message.text == "hello there"
    assert message.conversation.id == "cidDirect=="
    assert message.sender.id == "staff-1"
    assert message.received_at == WALL_NOW
    assert message.dedup_keys == ("frame:mid-1",)
    assert message.reply_to["session_webhook"].startswith("https://oapi.dingtalk.com/")

    intake.held[0].set_result(True)
    ack = await wait_ack(conn, "mid-1")
    assert ack["code"] == 200
    assert ack["headers"] == {"contentType": "application/json", "messageId": "mid-1"}
    assert isinstance(ack["data"], str)
    assert json.loads(ack["data"]) == {"response": None}
    assert len(conn.acks_for("mid-1")) == 1


async def test_stream_delegate_topic_is_a_bot_message(harness: Harness) -> None:
    """The delegate bot topic is handled like the ordinary bot topic."""
    _, intake, conn = await harness.started()
    await conn.push(bot_frame("mid-d", msg_id="msgD==", topic=TOPIC_BOT_DELEGATE))
    ack = await wait_ack(conn, "mid-d")
    assert ack["code"] == 200
    assert intake.message_ids() == ["msgD=="]


async def test_stream_commit_failure_is_not_acked(harness: Harness) -> None:
    """A commit that raises leaves the frame un-ACKed (DingTalk redelivers); reading goes on."""
    intake = FakeIntake()
    intake.results = [StoreError("disk full"), True]
    _, intake, conn = await harness.started(intake)

    await conn.push(bot_frame("mid-fail", msg_id="msgF=="))
    await conn.push(bot_frame("mid-ok", msg_id="msgG=="))
    await wait_ack(conn, "mid-ok")
    await conn.push(ping_frame("ping-after"))
    await wait_ack(conn, "ping-after")
    assert conn.acks_for("mid-fail") == []
    assert intake.message_ids() == ["msgF==", "msgG=="]


async def test_stream_duplicate_commit_is_acked(harness: Harness) -> None:
    """A duplicate (commit resolves False) is still ACKed with code 200."""
    intake = FakeIntake()
    intake.results = [False]
    _, intake, conn = await harness.started(intake)
    await conn.push(bot_frame("mid-dup"))
    ack = await wait_ack(conn, "mid-dup")
    assert ack["code"] == 200
    assert len(intake.offered) == 1


async def test_stream_ack_after_connection_dropped_is_dropped(harness: Harness) -> None:
    """A commit that resolves after its connection closed sends nothing and breaks nothing."""
    intake = FakeIntake()
    intake.results = ["hold"]
    stream, intake, conn1 = await harness.started(intake)
    await conn1.push(bot_frame("mid-late"))
    await until(lambda: len(intake.held) == 1, "offer")
    await conn1.close()
    conn2 = await harness.conn(1)
    intake.held[0].set_result(True)
    await until(lambda: not stream._tasks, "ack task finished")
    await conn2.push(ping_frame("ping-2"))
    await wait_ack(conn2, "ping-2")
    assert conn1.acks_for("mid-late") == []
    assert conn2.acks_for("mid-late") == []


# -- SYSTEM, EVENT, unknown and malformed frames ---------------------------------------------


async def test_stream_ping_acked_with_echoed_data(harness: Harness) -> None:
    """A SYSTEM ping is ACKed at once with its opaque data echoed verbatim."""
    _, intake, conn = await harness.started()
    data = '{"opaque":  "op-123"}'  # odd spacing: echoed as is, not re-encoded
    await conn.push(frame("SYSTEM", "ping", "ping-mid-1", data))
    ack = await wait_ack(conn, "ping-mid-1")
    assert ack == {
        "code": 200,
        "headers": {"contentType": "application/json", "messageId": "ping-mid-1"},
        "message": "OK",
        "data": data,
    }
    assert intake.offered == []


async def test_stream_unknown_system_topic_ignored(harness: Harness) -> None:
    """An unknown SYSTEM topic gets no ACK and the loop keeps reading."""
    _, intake, conn = await harness.started()
    await conn.push(frame("SYSTEM", "KEEPALIVE", "sys-1", "{}"))
    await conn.push(ping_frame("ping-after"))
    await wait_ack(conn, "ping-after")
    assert conn.acks_for("sys-1") == []
    assert len(conn.acks) == 1
    assert intake.offered == []


@pytest.mark.parametrize(
    ("ftype", "topic"),
    [("EVENT", "*"), ("CALLBACK", "/v1.0/card/instances/callback")],
    ids=["event", "unknown-callback"],
)
async def test_stream_unhandled_topic_acked_404(harness: Harness, ftype: str, topic: str) -> None:
    """An EVENT frame or a CALLBACK for a topic we do not handle is ACKed with code 404."""
    _, intake, conn = await harness.started()
    await conn.push(frame(ftype, topic, "mid-404", json.dumps({"k": "v"})))
    ack = await wait_ack(conn, "mid-404")
    assert ack["code"] == 404
    assert json.loads(ack["data"]) == {}
    assert intake.offered == []


@pytest.mark.parametrize(
    ("raw", "ack_id", "reason"),
    [
        pytest.param("{{not json", None, "bad_frame", id="not-json"),
        pytest.param('[1, "a"]', None, "bad_frame", id="json-array"),
        pytest.param(
            json.dumps({"type": "CALLBACK", "data": "{}"}), None, "bad_frame", id="no-headers"
        ),
        pytest.param(
            json.dumps({"type": "CALLBACK", "headers": "nope"}),
            None,
            "bad_frame",
            id="headers-not-object",
        ),
        pytest.param(
            json.dumps({"headers": {"messageId": 42, "topic": "x"}}),
            None,
            "bad_frame",
            id="numeric-message-id",
        ),
        pytest.param(
            json.dumps({"type": "CALLBACK", "headers": {"messageId": "m-400"}}),
            "m-400",
            "bad_frame",
            id="no-topic",
        ),
        pytest.param(
            frame("CALLBACK", TOPIC_BOT_MESSAGE, "m-400", {"msgId": "x"}),
            "m-400",
            "bad_frame",
            id="data-is-object",
        ),
        pytest.param(
            frame("NOTIFY", TOPIC_BOT_MESSAGE, "m-400", "{}"),
            "m-400",
            "bad_frame",
            id="unknown-type",
        ),
        pytest.param(
            frame("CALLBACK", TOPIC_BOT_MESSAGE, "m-400", "[1, 2]"),
            "m-400",
            "bad_payload",
            id="data-not-json-object",
        ),
        pytest.param(
            frame("CALLBACK", TOPIC_BOT_MESSAGE, "m-400", "{oops"),
            "m-400",
            "bad_payload",
            id="data-not-json",
        ),
        pytest.param(
            frame("CALLBACK", TOPIC_BOT_MESSAGE, "m-400", json.dumps({"text": {}})),
            "m-400",
            "bad_payload",
            id="payload-without-msgid",
        ),
    ],
)
async def test_stream_garbage_frame_rejected_and_loop_continues(
    harness: Harness, raw: str, ack_id: str | None, reason: str
) -> None:
    """Garbage is ACKed 400 when a messageId can be salvaged, else not at all; reading goes on."""
    _, intake, conn = await harness.started()
    await conn.push(raw)
    await conn.push(bot_frame("mid-valid", msg_id="msgV=="))
    await wait_ack(conn, "mid-valid")
    assert intake.message_ids() == ["msgV=="]
    assert harness.rejected(reason) == 1
    others = [a for a in conn.acks if a["headers"]["messageId"] != "mid-valid"]
    if ack_id is None:
        assert others == []
    else:
        assert len(others) == 1
        assert others[0]["code"] == 400
        assert others[0]["headers"]["messageId"] == ack_id
        assert isinstance(others[0]["data"], str)


async def test_stream_binary_frame_ignored(harness: Harness) -> None:
    """A binary frame is counted as rejected, not ACKed, and the loop keeps reading."""
    _, intake, conn = await harness.started()
    await conn.push_bytes(bot_frame("mid-bin").encode())
    await conn.push(bot_frame("mid-text", msg_id="msgT=="))
    await wait_ack(conn, "mid-text")
    assert conn.acks_for("mid-bin") == []
    assert intake.message_ids() == ["msgT=="]
    assert harness.rejected("binary_frame") == 1


async def test_stream_server_ping_answered_with_pong(harness: Harness) -> None:
    """A WebSocket ping from the server is answered with a pong carrying the same payload."""
    _, _, conn = await harness.started()
    await conn.ws.ping(b"are-you-there")
    await until(lambda: conn.count(aiohttp.WSMsgType.PONG) == 1, "pong")
    pong = next(m for m in conn.received if m.type == aiohttp.WSMsgType.PONG)
    assert pong.data == b"are-you-there"
    assert harness.up() == 1


# -- disconnect: make-before-break -----------------------------------------------------------


async def test_stream_disconnect_reconnects_before_old_socket_closes(harness: Harness) -> None:
    """SYSTEM disconnect opens a new connection at once; the old one is still read and ACKed."""
    stream, intake, conn1 = await harness.started()
    await conn1.push(DISCONNECT)
    conn2 = await harness.conn(1)
    assert len(harness.gateway.open_requests) == 2
    assert conn2.ticket == "ticket 2"
    assert not conn1.ended.is_set()  # make-before-break: the old socket is still open
    await until(lambda: stream.connected, "connected again")
    assert harness.up() == 1
    assert harness.reconnects("disconnect") == 1
    assert harness.sleeper.delays == []  # no backoff before the new connection

    # The server still has frames in flight on the old connection: they are handled.
    await conn1.push(bot_frame("mid-old", msg_id="msgOld=="))
    ack = await wait_ack(conn1, "mid-old")
    assert ack["code"] == 200
    await conn1.push(ping_frame("ping-old"))
    await wait_ack(conn1, "ping-old")
    assert len(conn1.acks) == 2  # the disconnect notice itself is not ACKed

    await conn2.push(bot_frame("mid-new", msg_id="msgNew=="))
    await wait_ack(conn2, "mid-new")
    assert intake.message_ids() == ["msgOld==", "msgNew=="]

    # The server drops the old socket: the lingering reader lets it go, the new one stays up.
    await conn1.close()
    await until(lambda: not stream._tasks, "linger finished")
    assert conn1.ended.is_set()
    assert not conn2.ended.is_set()
    assert stream.connected
    assert len(harness.gateway.conns) == 2


async def test_stream_aclose_closes_lingering_socket(harness: Harness) -> None:
    """After a disconnect notice, cancel + aclose() also close the old socket still being read."""
    stream, _, conn1 = await harness.started()
    old_ws = stream._ws  # held here so that only aclose(), not garbage collection, can close it
    await conn1.push(DISCONNECT)
    conn2 = await harness.conn(1)
    await until(lambda: stream.connected, "connected again")
    new_ws = stream._ws
    assert old_ws is not None
    assert new_ws is not None
    assert new_ws is not old_ws
    run = harness.runs[0]
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert not old_ws.closed  # still lingering
    await stream.aclose()
    assert old_ws.closed
    assert new_ws.closed
    await until(lambda: conn1.ended.is_set() and conn2.ended.is_set(), "both sockets closed")
    assert stream_tasks() == []


# -- drops and reconnects --------------------------------------------------------------------


async def test_stream_server_close_reconnects_after_backoff(harness: Harness) -> None:
    """A clean close by the server is followed by a backoff delay, then a new connection."""
    harness.sleeper.gate.clear()
    stream, _, conn1 = await harness.started()
    assert harness.up() == 1
    await conn1.close()
    await until(lambda: harness.sleeper.delays == [0.001], "backoff sleep")
    assert harness.up() == 0
    assert not stream.connected
    assert stream.not_ready_reason == "connection ended: closed"
    assert harness.reconnects("closed") == 1
    assert len(harness.gateway.open_requests) == 1  # still waiting out the delay
    harness.sleeper.gate.set()
    conn2 = await harness.conn(1)
    await until(lambda: stream.connected, "connected again")
    assert harness.up() == 1
    assert stream.connections == 2
    assert stream.not_ready_reason == ""
    await conn2.push(ping_frame("ping-2"))
    await wait_ack(conn2, "ping-2")


async def test_stream_abort_reconnects_after_backoff(harness: Harness) -> None:
    """An aborted transport is followed by a backoff delay, then a new connection."""
    harness.sleeper.gate.clear()
    stream, _, conn1 = await harness.started()
    conn1.abort()
    await until(lambda: harness.sleeper.delays == [0.001], "backoff sleep")
    assert harness.up() == 0
    reasons = {r: harness.reconnects(r) for r in ("closed", "error")}
    assert sum(reasons.values()) == 1, reasons
    harness.sleeper.gate.set()
    await harness.conn(1)
    await until(lambda: stream.connected, "connected again")
    assert harness.up() == 1


async def test_stream_protocol_violation_reconnects_as_error(harness: Harness) -> None:
    """A frame that breaks the WebSocket protocol ends the connection with reason "error"."""
    stream, _, conn1 = await harness.started()
    conn1.write_raw(b"\x8f\x00")  # FIN + reserved opcode 0xF
    await harness.conn(1)
    await until(lambda: stream.connected, "connected again")
    assert harness.reconnects("error") == 1
    assert harness.sleeper.delays == [0.001]


async def test_stream_successive_drops_use_successive_delays(harness: Harness) -> None:
    """Each short-lived connection takes the next delay from the same backoff iterator."""
    stream, _, conn1 = await harness.started()
    await conn1.close()
    conn2 = await harness.conn(1)
    await conn2.close()
    conn3 = await harness.conn(2)
    await conn3.close()
    await harness.conn(3)
    await until(lambda: stream.connected, "connected again")
    assert harness.sleeper.delays == [0.001, 0.002, 0.003]
    assert harness.reconnects("closed") == 3
    assert stream.connections == 4
    assert [c.ticket for c in harness.gateway.conns] == [
        "ticket 1",
        "ticket 2",
        "ticket 3",
        "ticket 4",
    ]


async def test_stream_reader_error_reconnects(harness: Harness) -> None:
    """An exception in the reader (here from the intake) ends the connection as "error"."""
    intake = FakeIntake()
    intake.capacity_errors = [RuntimeError("worker exploded")]
    stream, intake, _ = await harness.started(intake)
    await harness.conn(1)
    await until(lambda: stream.connected, "connected again")
    assert harness.reconnects("error") == 1
    assert harness.sleeper.delays == [0.001]


async def test_stream_reader_cancelled_by_intake_reconnects(harness: Harness) -> None:
    """A reader cancelled from inside (the intake raised CancelledError) ends as "error"."""
    intake = FakeIntake()
    intake.capacity_errors = [asyncio.CancelledError()]
    stream, intake, _ = await harness.started(intake)
    await harness.conn(1)
    await until(lambda: stream.connected, "connected again")
    assert harness.reconnects("error") == 1
    assert harness.sleeper.delays == [0.001]
    assert not harness.runs[0].done()


# -- heartbeat -------------------------------------------------------------------------------


async def test_stream_heartbeat_keeps_answering_connection(harness: Harness) -> None:
    """Pings answered with pongs keep the connection up across several heartbeats."""
    stream, _, conn = await harness.started(heartbeat_s=0.02, pong_timeout_s=0.2)
    await until(lambda: conn.count(aiohttp.WSMsgType.PING) >= 3, "three heartbeats")
    assert len(harness.gateway.conns) == 1
    assert harness.reconnects("silent") == 0
    assert stream.connected


async def test_stream_silent_server_declared_dead(harness: Harness) -> None:
    """A server that stops answering pings is declared dead within heartbeat + pong timeout."""
    harness.gateway.answer_pings = False
    heartbeat_s, pong_timeout_s = 0.05, 0.1
    started = time.monotonic()
    stream, _, conn1 = await harness.started(
        heartbeat_s=heartbeat_s, pong_timeout_s=pong_timeout_s
    )
    await until(lambda: harness.reconnects("silent") == 1, "silent reconnect")
    elapsed = time.monotonic() - started
    assert elapsed < (heartbeat_s + pong_timeout_s) * 3 + 0.3 * TIMEOUT_FACTOR
    assert elapsed >= heartbeat_s + pong_timeout_s
    assert conn1.count(aiohttp.WSMsgType.PING) == 1
    await until(lambda: conn1.ended.is_set(), "old socket closed by the client")
    assert harness.sleeper.delays[0] == 0.001
    await harness.conn(1)
    await until(lambda: stream.connected, "connected again")


# -- opening a connection --------------------------------------------------------------------


async def test_stream_open_request_body(harness: Harness) -> None:
    """The open call carries credentials and the bot-message subscription; the ticket is used."""
    await harness.started()
    (body,) = harness.gateway.open_requests
    assert body["clientId"] == APP_KEY
    assert body["clientSecret"] == APP_SECRET
    assert body["subscriptions"] == [{"type": "CALLBACK", "topic": TOPIC_BOT_MESSAGE}]
    assert harness.gateway.conns[0].ticket == "ticket 1"


async def test_stream_open_500_retried_with_backoff(harness: Harness) -> None:
    """Open calls answered 500 are retried after successive backoff delays."""
    harness.gateway.open_plan = ["500", "500"]
    stream, _, _ = await harness.started()
    assert len(harness.gateway.open_requests) == 3
    assert harness.sleeper.delays == [0.001, 0.002]
    assert harness.reconnects("open_failed") == 2
    assert stream.connections == 1


async def test_stream_refused_credentials_first_time_raise(harness: Harness) -> None:
    """Credentials refused on the very first connection stop run() with AuthError."""
    harness.gateway.open_plan = ["auth"]
    stream = harness.make(delays=None)
    run = harness.start(stream, FakeIntake())
    with pytest.raises(AuthError) as info:
        await asyncio.wait_for(run, 3 * TIMEOUT_FACTOR)
    assert APP_SECRET not in str(info.value)
    assert harness.sleeper.delays == []
    assert len(harness.gateway.open_requests) == 1
    assert stream.not_ready_reason == "credentials refused"
    assert not stream.connected
    assert harness.up() == 0
    assert stream_tasks() == []


async def test_stream_refused_credentials_later_retried_at_cap(harness: Harness) -> None:
    """Credentials refused after a successful connection are retried at backoff_max_s."""
    stream, _, conn1 = await harness.started()
    harness.gateway.open_plan = ["auth", "auth"]
    await conn1.close()
    await harness.conn(1)
    await until(lambda: stream.connected, "connected again")
    assert harness.sleeper.delays == [0.001, BACKOFF_MAX, BACKOFF_MAX]
    assert harness.reconnects("open_failed") == 2
    assert not harness.runs[0].done()


async def test_stream_non_retryable_open_error_waits_cap(harness: Harness) -> None:
    """A permanent (non-auth) open error is retried at backoff_max_s even before any connection."""
    harness.gateway.open_plan = ["bad"]
    stream, _, _ = await harness.started()
    assert harness.sleeper.delays == [BACKOFF_MAX]
    assert stream.connections == 1


async def test_stream_hanging_open_call_bounded_by_api_timeout(harness: Harness) -> None:
    """An open call that never answers times out after the API timeout and is retried."""
    harness.gateway.open_plan = ["hang"]
    api_timeout_s = 0.15
    started = time.monotonic()
    stream, _, _ = await harness.started(api_timeout_s=api_timeout_s)
    elapsed = time.monotonic() - started
    assert api_timeout_s <= elapsed < api_timeout_s + 1.0 * TIMEOUT_FACTOR
    assert harness.sleeper.delays == [0.001]
    assert harness.reconnects("open_failed") == 1
    assert stream.connections == 1


async def test_stream_hanging_websocket_upgrade_bounded(harness: Harness) -> None:
    """A WebSocket upgrade that never answers is bounded by open_timeout_s and retried."""
    harness.gateway.connect_plan = ["hang"]
    started = time.monotonic()
    stream, _, _ = await harness.started(open_timeout_s=0.15)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 1.15 * TIMEOUT_FACTOR
    assert harness.sleeper.delays == [0.001]
    assert len(harness.gateway.open_requests) == 2  # a fresh ticket for the retry
    assert stream.connections == 1


async def test_stream_refused_websocket_upgrade_retried(harness: Harness) -> None:
    """A refused WebSocket upgrade (HTTP 403) is retried after a backoff delay."""
    harness.gateway.connect_plan = ["refuse"]
    stream, _, _ = await harness.started()
    assert harness.sleeper.delays == [0.001]
    assert harness.reconnects("open_failed") == 1
    assert stream.connections == 1


# -- backoff reset ---------------------------------------------------------------------------


async def test_stream_backoff_reset_only_after_healthy_connection(harness: Harness) -> None:
    """The delays iterator is recreated after a connection that lived healthy_after_s only."""
    made: list[int] = []

    def delays() -> Iterator[float]:
        made.append(len(made) + 1)
        n = len(made)
        return (n + 0.001 * k for k in itertools.count(1))

    clock = FakeClock()
    stream, _, conn1 = await harness.started(delays=delays, clock=clock, healthy_after_s=10.0)
    clock.now += 9.9  # short-lived: the iterator goes on
    await conn1.close()
    conn2 = await harness.conn(1)
    await until(lambda: stream.connected, "connection 2")
    assert harness.sleeper.delays == [1.001]
    assert made == [1]

    clock.now += 10.0  # healthy: the next delay comes from a fresh iterator
    await conn2.close()
    conn3 = await harness.conn(2)
    await until(lambda: stream.connected, "connection 3")
    assert harness.sleeper.delays == [1.001, 2.001]
    assert made == [1, 2]

    await conn3.close()  # short-lived again: continues the fresh iterator
    await harness.conn(3)
    await until(lambda: stream.connected, "connection 4")
    assert harness.sleeper.delays == [1.001, 2.001, 2.002]
    assert made == [1, 2]


# -- backpressure ----------------------------------------------------------------------------


async def test_stream_backpressure_stops_reading(harness: Harness) -> None:
    """While the intake has no capacity, no further frame is read, offered or ACKed."""
    intake = FakeIntake()
    intake.full_after_offer = True
    _, intake, conn = await harness.started(intake)
    await conn.push(bot_frame("mid-1", msg_id="msg1=="))
    await wait_ack(conn, "mid-1")
    await conn.push(bot_frame("mid-2", msg_id="msg2=="))
    await conn.push(ping_frame("ping-blocked"))
    await asyncio.sleep(0.05)
    assert intake.message_ids() == ["msg1=="]
    assert conn.acks_for("ping-blocked") == []
    assert conn.acks_for("mid-2") == []

    intake.capacity.set()  # one slot: mid-2 is read (and fills it again)
    await wait_ack(conn, "mid-2")
    await asyncio.sleep(0.02)
    assert conn.acks_for("ping-blocked") == []
    intake.capacity.set()
    await wait_ack(conn, "ping-blocked")
    assert intake.message_ids() == ["msg1==", "msg2=="]


async def test_stream_backpressure_is_not_silence(harness: Harness) -> None:
    """A long backpressure pause on a server that answers pings is not declared silent."""
    intake = FakeIntake()
    intake.full_after_offer = True
    stream, intake, conn = await harness.started(intake, heartbeat_s=0.02, pong_timeout_s=0.05)
    await conn.push(bot_frame("mid-1", msg_id="msg1=="))
    await wait_ack(conn, "mid-1")
    # Several heartbeat periods while the worker is full, each ping answered at once.
    await until(lambda: conn.count(aiohttp.WSMsgType.PING) >= 5, "heartbeats while paused")
    assert harness.reconnects("silent") == 0
    assert len(harness.gateway.conns) == 1
    intake.capacity.set()
    await conn.push(bot_frame("mid-2", msg_id="msg2=="))
    await wait_ack(conn, "mid-2")
    assert stream.connected
    assert harness.reconnects("silent") == 0


# -- shutdown --------------------------------------------------------------------------------


async def test_stream_aclose_waits_for_pending_ack(harness: Harness) -> None:
    """aclose() lets a pending commit finish and its ACK go out, then closes the socket."""
    intake = FakeIntake()
    intake.results = ["hold"]
    stream, intake, conn = await harness.started(intake)
    await conn.push(bot_frame("mid-pending"))
    await until(lambda: len(intake.held) == 1, "offer")

    run = harness.runs[0]
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert not stream.connected
    assert harness.up() == 0
    # Only the ACK waiting for its commit is left: reader and heartbeat are gone.
    assert [t.get_coro().__qualname__ for t in stream_tasks()] == [
        "DingTalkStream._ack_after_commit"
    ]

    closing = asyncio.create_task(stream.aclose())
    await asyncio.sleep(0.02)
    assert not closing.done()
    assert not conn.ended.is_set()
    intake.held[0].set_result(True)
    await asyncio.wait_for(closing, 2 * TIMEOUT_FACTOR)
    await wait_ack(conn, "mid-pending")
    await until(lambda: conn.ended.is_set(), "socket closed")
    assert stream_tasks() == []


async def test_stream_aclose_gives_up_on_stuck_commit(harness: Harness) -> None:
    """aclose() waits at most about two seconds for a commit that never resolves, then cancels."""
    intake = FakeIntake()
    intake.results = ["hold"]
    stream, intake, conn = await harness.started(intake)
    await conn.push(bot_frame("mid-stuck"))
    await until(lambda: len(intake.held) == 1, "offer")
    run = harness.runs[0]
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await run
    started = time.monotonic()
    await asyncio.wait_for(stream.aclose(), 4 * TIMEOUT_FACTOR)
    assert time.monotonic() - started >= 1.9
    await until(lambda: conn.ended.is_set(), "socket closed")
    assert conn.acks_for("mid-stuck") == []
    assert stream_tasks() == []
    assert intake.held[0].cancelled()


async def test_stream_cancel_while_opening_leaves_nothing(harness: Harness) -> None:
    """Cancelling run() during a hanging open call ends it at once, leaving no task behind."""
    harness.gateway.open_plan = ["hang"]
    stream = harness.make(api_timeout_s=5.0)
    run = harness.start(stream, FakeIntake())
    await until(lambda: len(harness.gateway.open_requests) == 1, "open call")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 1 * TIMEOUT_FACTOR)
    assert harness.sleeper.delays == []
    assert harness.reconnects("open_failed") == 0
    assert harness.up() == 0
    await stream.aclose()
    assert stream_tasks() == []


async def test_stream_aclose_without_connection(harness: Harness) -> None:
    """aclose() on a connector that never connected returns at once."""
    stream = harness.make()
    assert stream.not_ready_reason == "not connected yet"
    assert harness.up() == 0
    await asyncio.wait_for(stream.aclose(), 1 * TIMEOUT_FACTOR)


# -- _reconnect: backoff() and is_retryable() ------------------------------------------------


def test_backoff_full_jitter_bounds_and_cap() -> None:
    """With rng at its extremes each delay spans [0, min(cap, initial * 2**n)]."""
    high = backoff(0.5, 5.0, rng=lambda: 1.0)
    assert list(itertools.islice(high, 7)) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    low = backoff(0.5, 5.0, rng=lambda: 0.0)
    assert list(itertools.islice(low, 4)) == [0.0, 0.0, 0.0, 0.0]
    half = backoff(1.0, 60.0, factor=3.0, rng=lambda: 0.5)
    assert list(itertools.islice(half, 5)) == [0.5, 1.5, 4.5, 13.5, 30.0]


def test_backoff_default_rng_within_bounds() -> None:
    """With the default random source every delay lies within its full-jitter ceiling."""
    delays = list(itertools.islice(backoff(1.0, 8.0), 200))
    ceilings = [min(8.0, 2.0**n) for n in range(200)]
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) > 100  # jittered, not constant


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (AuthError("refused"), False),
        (AuthError("refused", retryable=True), False),
        (PlatformAPIError("server error", retryable=True), True),
        (PlatformAPIError("bad request", retryable=False), False),
        (RateLimited("slow down"), True),
        (aiohttp.ClientConnectionError("reset"), True),
        (aiohttp.ServerTimeoutError("slow"), True),
        (ConnectionRefusedError("refused"), True),
        (OSError("network down"), True),
        (TimeoutError(), True),
        (ConnectionLost("gone"), True),
        (ProtocolError("garbled"), True),
        (ValueError("bug"), False),
        (RuntimeError("bug"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_is_retryable_classifies_failures(exc: BaseException, expected: bool) -> None:
    """Refused credentials and programming errors are fatal; network and server trouble is not."""
    assert is_retryable(exc) is expected
