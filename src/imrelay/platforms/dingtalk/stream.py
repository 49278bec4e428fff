"""DingTalk Stream mode: the long WebSocket connection that brings bot messages.

Theory of operation (protocols/dingtalk.md §1): :meth:`DingTalkStream.run` loops forever:

1. ``POST /v1.0/gateway/connections/open`` (with a timeout) gives an endpoint and a single-use
   ticket; the WebSocket is opened on ``endpoint?ticket=…``.
2. A reader handles text frames: SYSTEM ``ping`` is answered at once by echoing its data;
   a bot-message CALLBACK is parsed, handed to the intake (which fixes its place in its
   conversation's order), and ACKed only after the inbox commit; a frame that fails to parse is
   ACKed with code 400 when it has a messageId, and logged; unknown SYSTEM topics are ignored.
   Before reading the next frame the reader waits for worker capacity (backpressure).
3. A heartbeat sends a WebSocket ping every ``heartbeat_s`` and declares the connection dead
   if no pong comes within ``pong_timeout_s`` (a silent, half-open connection), unless the
   reader is paused by backpressure: the pong is then waiting unread behind the frames.
4. On SYSTEM ``disconnect`` the server stops pushing and closes about 10 s later. The old
   connection keeps being read (and its frames ACKed) by a lingering task while a new one is
   opened at once: make-before-break.
5. Any other end of a connection (abrupt drop, close, silence, open failure) is followed by a
   delay from :func:`~imrelay.platforms._reconnect.backoff` (exponential, full jitter, capped).
   The backoff restarts from its initial value after a connection that stayed healthy for
   ``healthy_after_s``. Refused credentials on the very first connection stop the connector
   with :class:`~imrelay.errors.AuthError`; later they are retried at the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp

from imrelay.config import DingTalkSettings
from imrelay.errors import AuthError, ProtocolError
from imrelay.observability.metrics import Metrics
from imrelay.platforms._reconnect import backoff, is_retryable
from imrelay.platforms.base import Intake
from imrelay.platforms.dingtalk.api import DingTalkAPI
from imrelay.platforms.dingtalk.events import parse_bot_message
from imrelay.platforms.dingtalk.protocol import (
    MAX_FRAME_BYTES,
    TOPIC_BOT_DELEGATE,
    TOPIC_BOT_MESSAGE,
    TOPIC_DISCONNECT,
    TOPIC_PING,
    Frame,
    build_ack,
    build_ping_ack,
    build_ws_url,
    parse_frame,
)

__all__ = ["DingTalkStream"]

logger = logging.getLogger(__name__)

_BOT_TOPICS = frozenset({TOPIC_BOT_MESSAGE, TOPIC_BOT_DELEGATE})
_LINGER_S = 15.0  # how long an old connection is still read after a disconnect notice
_WS_CLOSE_S = 2.0

WS = aiohttp.ClientWebSocketResponse
_CLOSED = frozenset({aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED})


class DingTalkStream:
    """One DingTalk app's Stream connection (see the module docstring)."""

    def __init__(
        self,
        name: str,
        settings: DingTalkSettings,
        api: DingTalkAPI,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        delays: Callable[[], Iterator[float]] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.api = api
        self.http = http
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self.sleep = sleep
        self._delays = delays or (
            lambda: backoff(settings.backoff_initial_s, settings.backoff_max_s)
        )
        self.connected = False
        self.not_ready_reason = "not connected yet"
        self.connections = 0  # WebSockets opened so far
        self._ws: WS | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = logging.LoggerAdapter(logger, {"platform": name})
        metrics.connection_up.labels(name).set(0)

    # -- the connection loop ---------------------------------------------------------------

    async def run(self, intake: Intake) -> None:
        """Keep a connection open until cancelled (see the module docstring)."""
        delays = self._delays()
        try:
            while True:
                try:
                    ws = await self._connect()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if isinstance(exc, AuthError) and self.connections == 0:
                        self.not_ready_reason = "credentials refused"
                        raise
                    self._down("open_failed", f"connect failed: {exc}")
                    delay = next(delays)
                    if not is_retryable(exc):
                        delay = self.settings.backoff_max_s
                    self._log.warning("connection failed (%s); retrying in %.1fs", exc, delay)
                    await self.sleep(delay)
                    continue
                opened = self.clock()
                reason = await self._serve(ws, intake)
                lived = self.clock() - opened
                if lived >= self.settings.healthy_after_s:
                    delays = self._delays()
                self._down(reason, f"connection ended: {reason}")
                if reason == "disconnect":
                    self._spawn(self._linger(ws, intake))
                    continue  # make-before-break: the new connection opens at once
                await self._close(ws)
                delay = next(delays)
                self._log.warning("connection ended (%s); reconnecting in %.1fs", reason, delay)
                await self.sleep(delay)
        finally:
            self.connected = False
            self.metrics.connection_up.labels(self.name).set(0)

    async def aclose(self) -> None:
        """Wait briefly for pending ACKs, then cancel lingering work."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=_WS_CLOSE_S)
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._ws is not None:
            await self._close(self._ws)
            self._ws = None

    async def _connect(self) -> WS:
        endpoint, ticket = await self.api.open_connection()
        url = build_ws_url(endpoint, ticket)
        async with asyncio.timeout(self.settings.open_timeout_s):
            ws = await self.http.ws_connect(
                url,
                autoping=False,
                heartbeat=None,
                max_msg_size=MAX_FRAME_BYTES,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_WS_CLOSE_S),
            )
        self.connections += 1
        self._ws = ws
        self.connected = True
        self.not_ready_reason = ""
        self.metrics.connection_up.labels(self.name).set(1)
        self._log.info("stream connected (connection %d)", self.connections)
        return ws

    def _down(self, reason: str, why: str) -> None:
        self.connected = False
        self.not_ready_reason = why
        self.metrics.connection_up.labels(self.name).set(0)
        self.metrics.reconnects.labels(self.name, reason).inc()

    async def _serve(self, ws: WS, intake: Intake) -> str:
        """Read and heartbeat until the connection ends; return why it ended."""
        pong = asyncio.Event()
        paused = asyncio.Event()  # set while the reader waits for worker capacity
        reader = asyncio.ensure_future(self._read(ws, intake, pong, paused))
        heart = asyncio.ensure_future(self._heartbeat(ws, pong, paused))
        try:
            done, _ = await asyncio.wait({reader, heart}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, heart):
                task.cancel()
            # Not ``await task``: that would re-raise a failed reader's exception out of run().
            await asyncio.wait((reader, heart))
        first = done.pop()
        if first.cancelled():
            return "error"
        exc = first.exception()
        if exc is not None:
            self._log.warning("stream connection failed: %r", exc)
            return "error"
        return first.result()

    async def _heartbeat(self, ws: WS, pong: asyncio.Event, paused: asyncio.Event) -> str:
        while True:
            await self.sleep(self.settings.heartbeat_s)
            pong.clear()
            try:
                await ws.ping()
                async with asyncio.timeout(self.settings.pong_timeout_s):
                    await pong.wait()
            except (TimeoutError, ConnectionError, aiohttp.ClientError) as exc:
                if isinstance(exc, TimeoutError) and paused.is_set():
                    continue  # not read yet because of backpressure, which is not silence
                self._log.warning(
                    "no pong within %.1fs; declaring the connection dead",
                    self.settings.pong_timeout_s,
                )
                return "silent"

    async def _read(
        self, ws: WS, intake: Intake, pong: asyncio.Event, paused: asyncio.Event
    ) -> str:
        while True:
            paused.set()
            await intake.wait_capacity()
            paused.clear()
            msg = await ws.receive()
            # ``==``, not ``is``: if aiohttp's Python modules are imported twice (coverage does
            # it for a dotted --source), its Cython reader keeps the first WSMsgType class.
            if msg.type == aiohttp.WSMsgType.TEXT:
                if await self._on_text(ws, msg.data, intake):
                    return "disconnect"
            elif msg.type == aiohttp.WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type == aiohttp.WSMsgType.PONG:
                pong.set()
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self._reject("binary_frame", "binary frame ignored")
            elif msg.type in _CLOSED:
                return "closed"
            else:  # ERROR
                return "error"

    async def _linger(self, ws: WS, intake: Intake) -> None:
        """Keep reading a connection that announced its end, until it closes or times out."""
        try:
            with contextlib.suppress(TimeoutError, aiohttp.ClientError, ConnectionError):
                async with asyncio.timeout(_LINGER_S):
                    await self._read(ws, intake, asyncio.Event(), asyncio.Event())
        finally:  # also when aclose() cancels us: the old socket must not be left open
            await self._close(ws)

    async def _close(self, ws: WS) -> None:
        with contextlib.suppress(Exception):
            await ws.close()

    # -- frames ----------------------------------------------------------------------------

    async def _on_text(self, ws: WS, raw: str, intake: Intake) -> bool:
        """Handle one text frame; return True for a disconnect notice."""
        try:
            frame = parse_frame(raw)
        except ProtocolError as exc:
            message_id = _salvage_message_id(raw)
            self._reject("bad_frame", f"unreadable frame ({exc})", message_id)
            if message_id:
                await self._send(ws, build_ack(message_id, {}, code=400, message=str(exc)))
            return False
        if frame.type == "SYSTEM":
            if frame.topic == TOPIC_PING:
                await self._send(ws, build_ping_ack(frame))
            elif frame.topic == TOPIC_DISCONNECT:
                self._log.info("server announced disconnect: %s", frame.data[:200])
                return True
            else:
                self._log.debug("ignoring SYSTEM topic %s", frame.topic)
            return False
        if frame.type == "CALLBACK" and frame.topic in _BOT_TOPICS:
            await self._on_bot_message(ws, frame, intake)
            return False
        # EVENT or a callback topic we do not handle: tell the server we did not handle it.
        self._log.debug("unhandled %s topic %s", frame.type, frame.topic)
        if frame.message_id:
            await self._send(ws, build_ack(frame.message_id, {}, code=404, message="not handled"))
        return False

    async def _on_bot_message(self, ws: WS, frame: Frame, intake: Intake) -> None:
        try:
            message = parse_bot_message(
                frame.data_json(),
                platform=self.name,
                received_at=self.wall_clock(),
                frame_message_id=frame.message_id,
                ingress="stream",
            )
        except ProtocolError as exc:
            self._reject("bad_payload", f"unreadable bot message ({exc})", frame.message_id)
            await self._send(ws, build_ack(frame.message_id, {}, code=400, message=str(exc)))
            return
        committed = intake.offer(message)
        self._spawn(self._ack_after_commit(ws, frame.message_id, committed))

    async def _ack_after_commit(self, ws: WS, message_id: str, committed: Awaitable[bool]) -> None:
        try:
            await committed
        except Exception as exc:
            # Not ACKed: the platform will redeliver it.
            self._log.error("not acknowledging %s: inbox commit failed: %s", message_id, exc)
            return
        await self._send(ws, build_ack(message_id, {"response": None}))

    async def _send(self, ws: WS, text: str) -> None:
        try:
            await ws.send_str(text)
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            self._log.debug("could not send on a closing connection: %s", exc)

    def _reject(self, reason: str, why: str, message_id: str = "") -> None:
        self.metrics.messages_rejected.labels(self.name, reason).inc()
        self._log.warning("%s", why, extra={"message.id": message_id} if message_id else None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _salvage_message_id(raw: str) -> str:
    """Best effort: the messageId of a frame that failed validation, to ACK it with 400."""
    try:
        headers = json.loads(raw).get("headers", {})
        value = headers.get("messageId", "")
    except (ValueError, AttributeError, TypeError, RecursionError):
        return ""
    return value if isinstance(value, str) else ""
