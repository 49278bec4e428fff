"""A local fake DingTalk (钉钉): Stream gateway, sessionWebhook, token API and a web chat page.

The official ``dingtalk-stream`` SDK connects to it unchanged when ``DINGTALK_OPENAPI_ENDPOINT``
points at :attr:`DingTalkSimulator.base_url` (see ``protocols/dingtalk.md`` §6).

Theory of operation
-------------------
One aiohttp application on one port serves:

* ``POST /v1.0/gateway/connections/open`` — checks clientId/clientSecret, records the body
  (without the secret) in :attr:`~DingTalkSimulator.open_calls` and hands out a single-use ticket
  (90 s TTL, measured with the injected ``clock``).
* ``GET /connect?ticket=…`` — upgrades to a WebSocket. Server frames are text frames shaped as
  §1.3: every header value is a string and ``data`` is a JSON string. Every connection gets a
  SYSTEM ``ping`` each ``ping_interval_s``. Each client frame carrying ``headers.messageId`` is
  recorded as an ACK in :attr:`~DingTalkSimulator.acks`. WebSocket-level pings are answered by
  hand (``autoping=False``) so that a silence fault can withhold the pongs.
* ``POST /robot/sendBySession?session=…`` — the sessionWebhook; replies are validated (§2.1) and
  recorded in arrival order.
* ``POST /v1.0/oauth2/accessToken`` — a token that stays the same while valid (7200 s).
* ``/_sim/…`` — the control API (inject messages, one or a batch, read replies, inject
  faults, state), and
  ``GET /``, a self-contained chat page for people.

Delivery semantics
------------------
Each injected bot message is pushed to exactly **one** live connection that subscribed CALLBACK
``/v1.0/im/bot/messages/get`` (round-robin among them). When there is none — no connection, all
of them were sent ``disconnect``, or a silence fault is active — the message waits in a FIFO
queue and is pushed as soon as a usable connection appears (a real platform retries; the queue
keeps tests deterministic). A message that was already **pushed** on a connection that then died
without ACKing it is not queued again; it is redelivered (same ``messageId`` and ``msgId``) only
when ``redeliver_after_s`` is set, once that many seconds pass without an ACK.

Faults (:meth:`~DingTalkSimulator.fault`, ``POST /_sim/faults``), windows in real seconds:

* ``{"disconnect": true}`` — SYSTEM ``disconnect`` to every live connection, no more pushes on
  them, close them ``disconnect_close_after_s`` later (10 s like the real server).
* ``{"drop": true}`` — abort every connection's TCP transport, no close frame (client sees 1006).
* ``{"refuse_s": N}`` — answer 503 to gateway opens and WebSocket upgrades for N s.
* ``{"silence_s": N}`` — for N s: push nothing (not even pings), answer no WebSocket ping and
  ignore every client frame (ACKs sent meanwhile are lost, as on a half-open link).
* ``{"throttle_s": N}`` — the sessionWebhook answers errcode 130101 (send too fast) for N s.

HTTP mode: with :attr:`~DingTalkSimulator.webhook_url` set (constructor or attribute), an injected
bot message is not pushed on a WebSocket but signed and POSTed to that URL like DingTalk's HTTP
mode (§3.1, :mod:`imrelay.sim.dingtalk_webhook`); 5xx/429 answers are retried a few times, and the
final HTTP status is recorded in :attr:`~DingTalkSimulator.webhook_results` by ``msgId``.

Recorded traffic (ACKs, replies, injected messages, sessions) is bounded by ``max_records``;
the oldest entries are forgotten first, and a forgotten session answers errcode 300001.

Cost per message
----------------
A benchmark runs this simulator beside the bot under test on the same cores, so what it spends
per message is taken from the bot. The routes every benchmark message goes through (the
sessionWebhook, ``/_sim/messages/batch``, ``/_sim/replies``, ``/_sim/state`` and the gateway
open) are answered by a lean HTTP/1.1 front (:class:`~imrelay.sim._common.FastFront`) that
hands every other connection, WebSocket upgrades included, to aiohttp on the same port; both
paths share one implementation per route. A batch's frames for one connection leave in one
write. Payloads and frames are assembled from JSON pieces (same text as ``json.dumps``), ids
come from a seeded RNG rather than system calls, messages and replies are kept as tuples (a
reply's body as the JSON text that came), and ``?after=`` pages cost what is new, not what is
remembered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import inspect
import itertools
import json
import logging
import random
import secrets
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from aiohttp import WSCloseCode, WSMsgType, web

from imrelay.sim._common import (
    BoundedDict,
    FastExchange,
    FastFront,
    api_error,
    api_error_text,
    json_response,
    json_str,
    json_text,
    json_text_response,
    loopback_url,
    parse_json_object,
    read_json_object,
    require_seconds,
)
from imrelay.sim.dingtalk_page import render_page
from imrelay.sim.dingtalk_webhook import DingTalkWebhookSender

__all__ = [
    "BOT_MESSAGE_TOPIC",
    "DEFAULT_GROUP_ID",
    "INBOUND_MSGTYPES",
    "PRESET_GROUPS",
    "PRESET_USERS",
    "REPLY_MSGTYPES",
    "DingTalkSimulator",
    "serve",
]

logger = logging.getLogger(__name__)

BOT_MESSAGE_TOPIC: Final = "/v1.0/im/bot/messages/get"
INBOUND_MSGTYPES: Final = frozenset(
    {"text", "picture", "richText", "audio", "video", "file", "unknownMsgType"}
)
REPLY_MSGTYPES: Final = frozenset({"text", "markdown", "actionCard", "link", "feedCard"})
PRESET_USERS: Final[tuple[tuple[str, str], ...]] = (
    ("zhangsan", "张三"),
    ("lisi", "李四"),
    ("alice", "Alice"),
    ("bob", "Bob"),
)
PRESET_GROUPS: Final[tuple[tuple[str, str], ...]] = (
    ("cidSimGroupRnD0000000001==", "研发群 R&D"),
    ("cidSimGroupOps0000000002==", "Ops 运维群"),
)
DEFAULT_GROUP_ID: Final = PRESET_GROUPS[0][0]
DEFAULT_SENDER: Final = PRESET_USERS[0][0]
_R = TypeVar("_R")
_PRESET_NICKS: Final[Mapping[str, str]] = dict(PRESET_USERS)
_PRESET_TITLES: Final[Mapping[str, str]] = dict(PRESET_GROUPS)

_MAX_BODY: Final = 1024**2  # aiohttp's default client_max_size
_WS_HIGH_WATER: Final = 2**16  # unsent bytes on a WebSocket before a batch waits
_TICKET_TTL_S: Final = 90.0
_TOKEN_TTL_S: Final = 7200.0
_SESSION_TTL_MS: Final = 90 * 60 * 1000
_UNKNOWN_TEXT: Final = "用户发送了一条消息，机器人暂不支持接收。"
_dumps_compact: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_JSON_BOOL: Final = {True: "true", False: "false"}
_FAULT_KEYS: Final = frozenset({"disconnect", "drop", "refuse_s", "silence_s", "throttle_s"})


class SimExtension(Protocol):
    """A part of the simulator kept in a module of its own (OpenAPI sends, cards, media, …).

    :meth:`install` is called by :meth:`DingTalkSimulator.start` before the server binds, so the
    extension can add routes; fault keys in :attr:`fault_keys` are handed to :meth:`fault`;
    :meth:`state` is merged into ``GET /_sim/state``.
    """

    name: str
    fault_keys: frozenset[str]

    def install(self, sim: DingTalkSimulator, app: web.Application) -> None:
        """Add routes and keep a reference to the simulator."""
        ...

    async def fault(self, spec: Mapping[str, Any]) -> None:
        """Apply this extension's keys of a fault spec (validated by the extension)."""
        ...

    def state(self) -> dict[str, Any]:
        """Counters for ``GET /_sim/state``."""
        ...

    async def aclose(self) -> None:
        """Release anything the extension started."""
        ...


@functools.lru_cache(maxsize=65_536)
def _encrypted_id(kind: str, value: str) -> str:
    """Return a stable opaque id shaped like DingTalk's ``$:LWCP_v1:$…`` ids (memoised)."""
    digest = hashlib.sha256(f"{kind}:{value}".encode()).digest()[:18]
    return "$:LWCP_v1:$" + base64.b64encode(digest).decode()


def _errcode(errcode: int, errmsg: str) -> str:
    """Return a webhook-style answer (sent with HTTP 200: the outcome is in ``errcode``)."""
    return json_text({"errcode": errcode, "errmsg": errmsg})


_OK_TEXT: Final = _errcode(0, "ok")
_AFTER_ERROR: Final = '{"error": "after must be a non-negative integer"}'


_BAD_CREDENTIALS: Final = "无效的clientId或者clientSecret"


def _bad_credentials() -> web.Response:
    return api_error(400, "invalidClientIdOrSecret", _BAD_CREDENTIALS)


def _is_str(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _text_frame(text: str) -> bytes:
    """One unmasked, final WebSocket text frame (RFC 6455 §5.2), as a server sends it."""
    payload = text.encode("utf-8")
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x81, size) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def _check_message_args(args: dict[str, object]) -> None:
    """Validate injected-message arguments, which may come straight from JSON.

    Raises:
        ValueError: naming the first bad argument.
    """
    if not isinstance(args["text"], str):
        raise ValueError("text must be a string")
    if args["conversation_type"] not in ("1", "2"):
        raise ValueError('conversation_type must be "1" or "2"')
    if args["msgtype"] not in INBOUND_MSGTYPES:
        raise ValueError(f"msgtype must be one of {', '.join(sorted(INBOUND_MSGTYPES))}")
    for name in ("conversation_id", "sender_id", "message_id", "msg_id"):
        if args[name] is not None and not _is_str(args[name]):
            raise ValueError(f"{name} must be a non-empty string")
    if args["sender_nick"] is not None and not isinstance(args["sender_nick"], str):
        raise ValueError("sender_nick must be a string")
    for name in ("at_bot", "is_admin"):
        if not isinstance(args[name], bool):
            raise ValueError(f"{name} must be a boolean")


_REQUIRED_REPLY_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "text": ("content",),
    "markdown": ("title", "text"),
    "actionCard": ("title", "text"),
    "link": ("title", "text", "messageUrl"),
    "feedCard": (),
}


def _check_reply(msgtype: str, body: dict[str, Any]) -> str | None:
    """Validate a sessionWebhook body of a known msgtype (§2.1).

    Returns:
        The dotted name of the first missing or invalid field, or ``None`` when valid.
    """
    sub = body.get(msgtype)
    if not isinstance(sub, dict):
        return msgtype
    for key in _REQUIRED_REPLY_FIELDS[msgtype]:
        if not _is_str(sub.get(key)):
            return f"{msgtype}.{key}"
    if msgtype == "actionCard" and not (
        _is_str(sub.get("singleTitle")) and _is_str(sub.get("singleURL"))
    ):
        btns = sub.get("btns")
        if not isinstance(btns, list) or not btns:
            return "actionCard.btns"
        for btn in btns:
            if not (isinstance(btn, dict) and _is_str(btn.get("title"))):
                return "actionCard.btns.title"
            if not _is_str(btn.get("actionURL")):
                return "actionCard.btns.actionURL"
    if msgtype == "feedCard":
        links = sub.get("links")
        if not isinstance(links, list) or not links:
            return "feedCard.links"
        for link in links:
            for key in ("title", "messageURL", "picURL"):
                if not (isinstance(link, dict) and _is_str(link.get(key))):
                    return f"feedCard.links.{key}"
    at = body.get("at")
    if at is not None:
        if not isinstance(at, dict):
            return "at"
        for key in ("atUserIds", "atMobiles"):
            if key in at and not _is_str_list(at[key]):
                return f"at.{key}"
        if "isAtAll" in at and not isinstance(at["isAtAll"], bool):
            return "at.isAtAll"
    return None


@dataclass(slots=True)
class _Inbound:
    """One injected bot message: its ids and the ready-made ``data`` JSON string.

    ``data_json`` is ``data`` quoted as a JSON string, ready to be placed in a frame (a message
    that is redelivered is not quoted again).
    """

    message_id: str
    msg_id: str
    data: str
    data_json: str


class _Message(NamedTuple):
    """One injected message as ``GET /_sim/messages`` lists it (field names are the keys)."""

    seq: int
    msg_id: str
    message_id: str
    conversation_id: str
    conversation_type: str
    conversation_title: str
    sender_id: str
    sender_nick: str
    msgtype: str
    text: str
    at_bot: bool
    created_at: float


class _Reply(NamedTuple):
    """One message the bot sent; ``body`` is kept as JSON text, served again as it came."""

    seq: int
    msg_id: str | None
    conversation_id: str
    msgtype: str
    body: str
    received_at: float

    def as_dict(self) -> dict[str, Any]:
        """The record as ``replies()`` returns it, the body parsed."""
        return {
            "seq": self.seq,
            "msg_id": self.msg_id,
            "conversation_id": self.conversation_id,
            "msgtype": self.msgtype,
            "body": json.loads(self.body),
            "received_at": self.received_at,
        }

    def as_json(self) -> str:
        """The record as one JSON object (``json.dumps`` of :meth:`as_dict`, body verbatim)."""
        msg_id = "null" if self.msg_id is None else json_str(self.msg_id)
        return (
            f'{{"seq": {self.seq}, "msg_id": {msg_id}, '
            f'"conversation_id": {json_str(self.conversation_id)}, '
            f'"msgtype": {json_str(self.msgtype)}, "body": {self.body}, '
            f'"received_at": {self.received_at!r}}}'
        )


@dataclass(slots=True)
class _Ticket:
    expires_at: float
    subscriptions: list[dict[str, str]]


@dataclass(slots=True)
class _Session:
    msg_id: str
    conversation_id: str
    expires_ms: int


@dataclass(eq=False, slots=True)
class _Connection:
    """One accepted WebSocket and what the simulator knows about it."""

    id: str
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    subscriptions: list[dict[str, str]]
    wants_bot: bool
    draining: bool = False
    ping_task: asyncio.Task[None] | None = None
    close_task: asyncio.Task[None] | None = None


class DingTalkSimulator:
    """A fake DingTalk server on loopback; see the module docstring for what it implements.

    Args:
        host: address to bind.
        port: port to bind; 0 picks a free one (read :attr:`port` after :meth:`start`).
        app_key: the accepted clientId/appKey; also the ``robotCode`` in messages.
        app_secret: the accepted clientSecret/appSecret.
        ping_interval_s: seconds between SYSTEM ``ping`` frames on each connection.
        redeliver_after_s: when set, re-push a bot message not ACKed within this many seconds.
        clock: wall clock in epoch seconds, for ``createAt``/``time`` and every TTL (tickets,
            sessions, tokens).
        disconnect_close_after_s: delay between a ``disconnect`` frame and the server's close.
        public_url: base URL clients use to reach the simulator (sessionWebhook and WebSocket
            endpoint); default :attr:`base_url` for the webhook and the request's Host for the
            endpoint.
        max_records: how many ACKs, replies, messages and sessions are remembered.
        extensions: extra parts (see :class:`SimExtension`); default: every part shipped.
        webhook_url: when set, bot messages are signed and POSTed there (HTTP mode) instead of
            pushed on a WebSocket; may also be set later through :attr:`webhook_url`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        app_key: str = "sim-app-key",
        app_secret: str = "sim-app-secret",
        ping_interval_s: float = 20.0,
        redeliver_after_s: float | None = None,
        clock: Callable[[], float] = time.time,
        disconnect_close_after_s: float = 10.0,
        public_url: str | None = None,
        max_records: int = 100_000,
        extensions: Sequence[SimExtension] | None = None,
        webhook_url: str | None = None,
    ) -> None:
        if ping_interval_s <= 0:
            raise ValueError("ping_interval_s must be positive")
        if redeliver_after_s is not None and redeliver_after_s <= 0:
            raise ValueError("redeliver_after_s must be positive")
        self._host = host
        self._bind_port = port
        self._app_key = app_key
        self._app_secret = app_secret
        self._ping_interval_s = ping_interval_s
        self._redeliver_after_s = redeliver_after_s
        self._clock = clock
        self._disconnect_close_after_s = disconnect_close_after_s
        self._public_url = public_url.rstrip("/") if public_url else None
        self.port = 0
        self.base_url = ""
        self.acks: dict[str, dict[str, Any]] = BoundedDict(max_records)
        self.connections_opened = 0
        self.open_calls: list[dict[str, Any]] = []
        self.bad_frames = 0
        self.redeliveries = 0
        self._conns: dict[str, _Connection] = {}
        self._pending: deque[_Inbound] = deque()
        self._inflight: dict[str, tuple[_Inbound, float]] = {}
        self._tickets: dict[str, _Ticket] = {}
        self._sessions: BoundedDict[str, _Session] = BoundedDict(max_records)
        self._replies: deque[_Reply] = deque(maxlen=max_records)
        self._messages: deque[_Message] = deque(maxlen=max_records)
        self._reply_seq = 0
        self._message_seq = 0
        self._frame_seq = 0
        self._rr = 0
        self._token: tuple[str, float] | None = None
        self._refuse_until = 0.0
        self._silent_until = 0.0
        self._throttle_until = 0.0
        self._send_gate: Callable[[str], bool] | None = None
        # msgtype -> downloadCode for media messages; set by the media extension when present
        self.media_code_factory: Callable[[str], str] | None = None
        self._app_id = str(uuid.uuid4())
        # Ids, sessions and download codes: unpredictable enough for a simulator, and far
        # cheaper per message than the secrets module's system calls.
        self._random = random.Random(secrets.randbits(128))  # nosec B311  # not security
        self._direct_ids: dict[str, str] = {}
        self._corp_id = "dingsim" + hashlib.sha256(app_key.encode()).hexdigest()[:16]
        self._bot_user_id = _encrypted_id("bot", app_key)
        self._runner: web.AppRunner | None = None
        self._front: FastFront | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_task: asyncio.Task[None] | None = None
        self._redeliver_task: asyncio.Task[None] | None = None
        self._closed = False
        self.extensions: list[SimExtension] = (
            list(extensions) if extensions is not None else default_extensions()
        )
        keys = [k for ext in self.extensions for k in ext.fault_keys]
        if len(keys) != len(set(keys)) or set(keys) & _FAULT_KEYS:
            raise ValueError("simulator extensions declare overlapping fault keys")
        self._fault_keys = _FAULT_KEYS | set(keys)
        self.webhook_url = webhook_url
        self.webhook_results: BoundedDict[str, int] = BoundedDict(max_records)
        self._webhook = DingTalkWebhookSender(app_secret, clock=clock)

    @property
    def app_key(self) -> str:
        """The accepted clientId/appKey (also ``robotCode`` in messages)."""
        return self._app_key

    @property
    def app_secret(self) -> str:
        """The accepted clientSecret/appSecret, for configuring a client under test."""
        return self._app_secret

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind the server; afterwards :attr:`port` and :attr:`base_url` are set."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_get("/", self._handle_index)
        app.router.add_post("/v1.0/gateway/connections/open", self._handle_open)
        app.router.add_get("/connect", self._handle_connect)
        app.router.add_post("/v1.0/oauth2/accessToken", self._handle_token)
        app.router.add_post("/robot/sendBySession", self._handle_send_by_session)
        app.router.add_post("/_sim/messages", self._handle_post_message)
        app.router.add_post("/_sim/messages/batch", self._handle_post_batch)
        app.router.add_get("/_sim/messages", self._handle_get_messages)
        app.router.add_get("/_sim/replies", self._handle_get_replies)
        app.router.add_post("/_sim/faults", self._handle_faults)
        app.router.add_get("/_sim/state", self._handle_state)
        for ext in self.extensions:
            ext.install(self, app)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        # The routes every benchmark message goes through are answered by a lean front;
        # everything else (the WebSocket included) by aiohttp, on the same port.
        assert runner.server is not None  # nosec B101  # set by setup()
        front = FastFront(
            runner.server,
            {
                ("POST", "/robot/sendBySession"): self._fast_send_by_session,
                ("POST", "/_sim/messages/batch"): self._fast_post_batch,
                ("GET", "/_sim/replies"): self._fast_get_replies,
                ("GET", "/_sim/state"): self._fast_state,
                ("POST", "/v1.0/gateway/connections/open"): self._fast_open,
            },
            max_body=_MAX_BODY,
        )
        try:
            await front.start(self._host, self._bind_port)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._front = front
        self.port = front.port
        self.base_url = loopback_url(self._host, self.port)
        if self._redeliver_after_s is not None:
            self._redeliver_task = self._spawn(self._redeliver_loop(self._redeliver_after_s))
        logger.info("dingtalk simulator listening on %s", self.base_url)

    async def aclose(self) -> None:
        """Close every WebSocket connection and the server."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(
                self._close_connection(conn, WSCloseCode.GOING_AWAY, grace_s=0.5)
                for conn in list(self._conns.values())
            )
        )
        for ext in self.extensions:
            await ext.aclose()
        await self._webhook.aclose()
        if self._front is not None:
            await self._front.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> DingTalkSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ Python control API

    async def send_message(
        self,
        text: str = "",
        *,
        conversation_id: str | None = None,
        conversation_type: str = "1",
        sender_id: str | None = None,
        sender_nick: str | None = None,
        msgtype: str = "text",
        at_bot: bool = True,
        message_id: str | None = None,
        msg_id: str | None = None,
        is_admin: bool = False,
    ) -> dict[str, str]:
        """Inject a message a person sent to the bot (same as ``POST /_sim/messages``).

        With :attr:`webhook_url` set, the message is POSTed there (HTTP mode) and this returns
        once the gateway answered; the final status is in :attr:`webhook_results`.

        In 1:1 chats (``conversation_type="1"``) the bot is always addressed; in groups
        (``"2"``) ``at_bot=False`` still delivers the message but with ``isInAtList=false`` so a
        gateway's own mention check can be tested (the real platform would not deliver it).

        Args:
            text: the text; for ``audio`` the speech recognition, for ``file`` the file name.
            conversation_id: default: one per sender in 1:1, :data:`DEFAULT_GROUP_ID` in groups.
            conversation_type: ``"1"`` (1:1) or ``"2"`` (group).
            sender_id: the sender's staffId (``senderStaffId``); default ``zhangsan``.
            sender_nick: default: the preset nick of ``sender_id``, else ``sender_id``.
            msgtype: one of :data:`INBOUND_MSGTYPES`.
            at_bot: whether the bot is @-mentioned (groups only).
            message_id: frame ``messageId`` override, e.g. to inject duplicates.
            msg_id: payload ``msgId`` override.
            is_admin: the payload's ``isAdmin``.

        Returns:
            ``{"msg_id": …, "message_id": …}``.

        Raises:
            ValueError: if an argument is invalid.
            RuntimeError: if the simulator is not started.
        """
        if self._runner is None or self._closed:
            raise RuntimeError("simulator is not running")
        args: dict[str, Any] = dict(locals())
        del args["self"]
        _check_message_args(args)
        return await self._send_checked(args)

    async def _send_checked(self, args: dict[str, Any]) -> dict[str, str]:
        """:meth:`send_message` with every argument present and already validated."""
        if self._runner is None or self._closed:
            raise RuntimeError("simulator is not running")
        rec = self._build_inbound(**args)
        ids = {"msg_id": rec.msg_id, "message_id": rec.message_id}
        if self.webhook_url is not None:
            delivery = await self._webhook.deliver(self.webhook_url, rec.data)
            self.webhook_results[rec.msg_id] = delivery.status
            return ids
        if not self._pending and (self._flush_task is None or self._flush_task.done()):
            conn = self._pick()
            if conn is not None and await self._push(conn, rec):
                return ids
        self._pending.append(rec)
        self._kick()
        return ids

    async def _push_batch(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Stream mode: hand validated messages over in order, as :meth:`send_message` would.

        Consecutive messages bound for the same connection leave in one write (with one
        connection: the whole batch), instead of one system call each.

        Returns:
            ``{"msg_id", "message_id", "sent_at"}`` per message.
        """
        if self._runner is None or self._closed:
            raise RuntimeError("simulator is not running")
        sent: list[dict[str, Any]] = []
        run: list[_Inbound] = []
        run_conn: _Connection | None = None
        for args in calls:
            sent_at = self._clock()
            rec = self._build_inbound(**args)
            sent.append({"msg_id": rec.msg_id, "message_id": rec.message_id, "sent_at": sent_at})
            conn = None
            if not self._pending and (self._flush_task is None or self._flush_task.done()):
                conn = self._pick()
            if run and conn is not run_conn:
                await self._push_run(run_conn, run)
                run = []
                if self._pending:  # the run failed and was queued: the rest waits behind it
                    conn = None
            if conn is None:
                self._pending.append(rec)
                continue
            run_conn = conn
            run.append(rec)
        if run:
            await self._push_run(run_conn, run)
        self._kick()
        return sent

    async def _push_run(self, conn: _Connection | None, recs: list[_Inbound]) -> None:
        """Send bot messages on ``conn`` in one write; queue the ones that could not go."""
        assert conn is not None  # nosec B101  # a run always has its connection
        if len(recs) == 1:
            if not await self._push(conn, recs[0]):
                self._pending.append(recs[0])
            return
        frames = [
            self._frame(conn, "CALLBACK", BOT_MESSAGE_TOPIC, rec.message_id, rec.data_json)
            for rec in recs
        ]
        tracked = self._redeliver_after_s is not None
        if tracked:
            now = asyncio.get_running_loop().time()
            for rec in recs:
                self._inflight.pop(rec.message_id, None)
                self._inflight[rec.message_id] = (rec, now)
        failed = recs[await self._send_many(conn, frames) :]
        if tracked:
            for rec in failed:
                self._inflight.pop(rec.message_id, None)
        self._pending.extend(failed)

    def replies(self, msg_id: str | None = None) -> list[dict[str, Any]]:
        """Return the recorded sessionWebhook replies in arrival order, optionally for one msgId.

        Each is ``{"seq", "msg_id", "conversation_id", "msgtype", "body", "received_at"}``.
        """
        return [r.as_dict() for r in self._replies if msg_id is None or r.msg_id == msg_id]

    def active_connections(self) -> int:
        """Return how many WebSockets are open and usable (not told to ``disconnect``)."""
        return sum(1 for c in self._conns.values() if not c.draining and not c.ws.closed)

    def pending_count(self) -> int:
        """Return how many bot messages wait for a usable connection."""
        return len(self._pending)

    async def fault(self, spec: dict[str, Any]) -> None:
        """Inject faults (same as ``POST /_sim/faults``); see the module docstring.

        Raises:
            ValueError: if ``spec`` has an unknown key or a bad value.
        """
        if not spec:
            raise ValueError("fault spec must be a non-empty object")
        unknown = sorted(set(spec) - self._fault_keys)
        if unknown:
            raise ValueError(f"unknown fault keys: {', '.join(unknown)}")
        for ext in self.extensions:
            mine = {k: v for k, v in spec.items() if k in ext.fault_keys}
            if mine:
                await ext.fault(mine)
        for key in ("disconnect", "drop"):
            if key in spec and not isinstance(spec[key], bool):
                raise ValueError(f"{key} must be a boolean")
        windows = {
            key: require_seconds(key, spec[key], maximum=3600.0)
            for key in ("refuse_s", "silence_s", "throttle_s")
            if key in spec
        }
        now = asyncio.get_running_loop().time()
        if "refuse_s" in windows:
            self._refuse_until = max(self._refuse_until, now + windows["refuse_s"])
        if "throttle_s" in windows:
            self._throttle_until = max(self._throttle_until, now + windows["throttle_s"])
        if "silence_s" in windows:
            self._silent_until = max(self._silent_until, now + windows["silence_s"])
            asyncio.get_running_loop().call_later(windows["silence_s"] + 0.001, self._kick)
        if spec.get("disconnect"):
            for conn in list(self._conns.values()):
                if not conn.draining:
                    conn.draining = True
                    data = {"reason": "connection is expired"}
                    await self._send(conn, self._system_frame(conn, "disconnect", data))
                    conn.close_task = self._spawn(self._close_later(conn))
        if spec.get("drop"):
            for conn in list(self._conns.values()):
                conn.draining = True
                if conn.transport is not None:
                    conn.transport.abort()
        logger.debug("dingtalk simulator fault applied: %s", sorted(spec))

    def state(self) -> dict[str, Any]:
        """Return the ``GET /_sim/state`` document."""
        now = asyncio.get_running_loop().time()
        return {
            "connections": self.active_connections(),
            "connections_opened": self.connections_opened,
            "open_calls": [dict(c) for c in self.open_calls],
            "acks": len(self.acks),
            "pending": len(self._pending),
            "inflight": len(self._inflight),
            "redeliveries": self.redeliveries,
            "replies": len(self._replies),
            "bad_frames": self.bad_frames,
            "refusing": now < self._refuse_until,
            "silenced": now < self._silent_until,
            "throttled": now < self._throttle_until,
            "webhook": {"url": self.webhook_url, **self._webhook.state()},
            **{ext.name: ext.state() for ext in self.extensions},
        }

    # ------------------------------------------------------------------ message building

    def _build_inbound(
        self,
        text: str,
        *,
        conversation_id: str | None,
        conversation_type: str,
        sender_id: str | None,
        sender_nick: str | None,
        msgtype: str,
        at_bot: bool,
        message_id: str | None,
        msg_id: str | None,
        is_admin: bool,
    ) -> _Inbound:
        """Build the §1.7 payload of valid arguments and register its session."""
        group = conversation_type == "2"
        sender = sender_id or DEFAULT_SENDER
        nick = sender_nick or _PRESET_NICKS.get(sender, sender)
        if conversation_id is None:
            conversation_id = DEFAULT_GROUP_ID if group else self._direct_conversation_id(sender)
        bits = self._random.getrandbits
        msg_id = msg_id or "msg" + base64.urlsafe_b64encode(bits(128).to_bytes(16)).decode()
        self._frame_seq += 1
        now_ms = int(self._clock() * 1000)
        message_id = message_id or f"{bits(32):08x}_{self._frame_seq}_{now_ms:x}_{bits(20):05x}"
        session = f"{bits(128):032x}"
        self._sessions[session] = _Session(msg_id, conversation_id, now_ms + _SESSION_TTL_MS)
        webhook_base = self._public_url or self.base_url
        mentioned = at_bot or not group
        title = _PRESET_TITLES.get(conversation_id, "模拟群 Sim group") if group else ""
        if msgtype == "text":
            content = (
                f'"text":{{"content":{json_str((" " + text) if group and at_bot else text)}}}'
            )
        else:
            content = _dumps_compact(self._content(msgtype, text, leading_space=group and at_bot))
            content = content[1:-1]
        # The §1.7 payload, written as json.dumps(..., ensure_ascii=False, separators=(",", ":"))
        # writes it, key order included (see tests/sim): assembled, it costs a fraction.
        bot = json_str(self._bot_user_id)
        corp = json_str(self._corp_id)
        webhook = f"{webhook_base}/robot/sendBySession?session={session}"
        at_users = f'[{{"dingtalkId":{bot}}}]' if group and at_bot else "[]"
        title_field = f'"conversationTitle":{json_str(title)},' if group else ""
        data = (
            f'{{"conversationId":{json_str(conversation_id)},"atUsers":{at_users},'
            f'"chatbotCorpId":{corp},"chatbotUserId":{bot},"msgId":{json_str(msg_id)},'
            f'"senderNick":{json_str(nick)},"isAdmin":{_JSON_BOOL[is_admin]},'
            f'"senderStaffId":{json_str(sender)},'
            f'"sessionWebhookExpiredTime":{now_ms + _SESSION_TTL_MS},"createAt":{now_ms},'
            f'"senderCorpId":{corp},"conversationType":{json_str(conversation_type)},'
            f'"senderId":{json_str(_encrypted_id("user", sender))},'
            f'"isInAtList":{_JSON_BOOL[mentioned]},"sessionWebhook":{json_str(webhook)},'
            f'"robotCode":{json_str(self._app_key)},"msgtype":{json_str(msgtype)},'
            f"{title_field}{content}}}"
        )
        self._message_seq += 1
        self._messages.append(
            _Message(
                self._message_seq,
                msg_id,
                message_id,
                conversation_id,
                conversation_type,
                title,
                sender,
                nick,
                msgtype,
                text,
                mentioned,
                now_ms / 1000,
            )
        )
        return _Inbound(message_id, msg_id, data, json_str(data))

    def _direct_conversation_id(self, sender_id: str) -> str:
        cid = self._direct_ids.get(sender_id)
        if cid is None:
            digest = hashlib.sha256(f"{self._app_key}:{sender_id}".encode()).digest()[:24]
            cid = "cid" + base64.b64encode(digest).decode()
            if len(self._direct_ids) >= 100_000:
                self._direct_ids.clear()
            self._direct_ids[sender_id] = cid
        return cid

    def _content(self, msgtype: str, text: str, *, leading_space: bool) -> dict[str, Any]:
        """Return the msgtype-specific part of a payload (§1.7).

        A media item's download code comes from :attr:`media_code_factory` when one is set
        (``downloadCode`` and ``pictureDownloadCode`` then name the same item).
        """

        def code() -> str:
            return base64.b64encode(self._random.getrandbits(288).to_bytes(36)).decode()

        def media() -> str:
            factory = self.media_code_factory
            return factory(msgtype) if factory is not None else code()

        if msgtype == "text":
            return {"text": {"content": (" " + text) if leading_space else text}}
        if msgtype in ("picture", "richText"):
            item = media()
            picture = {"downloadCode": item, "pictureDownloadCode": item}
            if self.media_code_factory is None:
                picture["pictureDownloadCode"] = code()
            if msgtype == "picture":
                return {"content": picture}
            return {"content": {"richText": [{"text": text}, {"type": "picture", **picture}]}}
        if msgtype == "audio":
            return {"content": {"downloadCode": media(), "recognition": text, "duration": 3000}}
        if msgtype == "video":
            return {"content": {"downloadCode": media(), "videoType": "mp4", "duration": "5"}}
        if msgtype == "file":
            return {
                "content": {
                    "downloadCode": media(),
                    "fileName": text or "文件.txt",
                    "fileId": secrets.token_hex(8),
                    "spaceId": str(secrets.randbelow(10**10)),
                }
            }
        return {"content": {"unknownMsgType": _UNKNOWN_TEXT}, "ai_robot_sessionid": code()}

    def _frame(
        self, conn: _Connection, kind: str, topic: str, message_id: str, data_json: str
    ) -> str:
        """Return a downstream frame (§1.3): every header a string, ``data`` a JSON string.

        ``data_json`` is the ``data`` string already quoted as JSON. The frame is assembled
        from pieces; the text is the same as ``json.dumps(frame, ensure_ascii=False,
        separators=(",", ":"))`` of ``{"specVersion", "type", "headers", "data"}``.
        """
        return (
            f'{{"specVersion":"1.0","type":{json_str(kind)},"headers":{{"appId":'
            f'{json_str(self._app_id)},"connectionId":{json_str(conn.id)},'
            f'"contentType":"application/json","messageId":{json_str(message_id)},'
            f'"time":"{int(self._clock() * 1000)}","topic":{json_str(topic)}}},'
            f'"data":{data_json}}}'
        )

    def _system_frame(self, conn: _Connection, topic: str, data: dict[str, str]) -> str:
        message_id = f"sys-{topic}-{uuid.uuid4()}"
        return self._frame(conn, "SYSTEM", topic, message_id, json_str(json.dumps(data)))

    # ------------------------------------------------------------------ delivery

    def _silenced(self) -> bool:
        # Asked for every message: no clock read unless a silence fault was ever applied.
        return bool(self._silent_until) and asyncio.get_running_loop().time() < self._silent_until

    def _refusing(self) -> bool:
        return asyncio.get_running_loop().time() < self._refuse_until

    def _pick(self) -> _Connection | None:
        """Return the next usable subscribed connection (round-robin), if any."""
        if self._silenced():
            return None
        live = [
            c for c in self._conns.values() if c.wants_bot and not c.draining and not c.ws.closed
        ]
        if not live:
            return None
        self._rr += 1
        return live[self._rr % len(live)]

    def _kick(self) -> None:
        """Start flushing the queue if it has messages and nothing flushes it yet."""
        if self._closed or not self._pending:
            return
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = self._spawn(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            conn = self._pick()
            if conn is None:
                return
            rec = self._pending.popleft()
            if not await self._push(conn, rec):
                self._pending.appendleft(rec)

    async def _push(self, conn: _Connection, rec: _Inbound) -> bool:
        """Send one bot message on ``conn``; track it for redelivery before the await."""
        frame = self._frame(conn, "CALLBACK", BOT_MESSAGE_TOPIC, rec.message_id, rec.data_json)
        tracked = self._redeliver_after_s is not None
        if tracked:
            self._inflight.pop(rec.message_id, None)
            self._inflight[rec.message_id] = (rec, asyncio.get_running_loop().time())
        if await self._send(conn, frame):
            return True
        if tracked:
            self._inflight.pop(rec.message_id, None)
        return False

    async def _send(self, conn: _Connection, text: str) -> bool:
        if conn.ws.closed:
            conn.draining = True
            return False
        try:
            await conn.ws.send_str(text)
        except (ConnectionError, RuntimeError):
            conn.draining = True
            return False
        return True

    async def _send_many(self, conn: _Connection, texts: list[str]) -> int:
        """Send text frames on ``conn`` in one write (framed as aiohttp frames them).

        When the transport already holds more than :data:`_WS_HIGH_WATER` unsent bytes, the
        last frame goes through aiohttp's writer instead, which waits for the transport to
        drain as it does for every frame it sends.

        Returns:
            How many of the frames (the first ones) were sent.
        """
        transport = conn.transport
        if conn.ws.closed or transport is None or transport.is_closing():
            conn.draining = True
            return 0
        backed_up = transport.get_write_buffer_size() > _WS_HIGH_WATER
        ours = texts[:-1] if backed_up else texts
        try:
            transport.write(b"".join(_text_frame(text) for text in ours))
        except (ConnectionError, RuntimeError):
            conn.draining = True
            return 0
        if backed_up and not await self._send(conn, texts[-1]):
            return len(ours)
        return len(texts)

    async def _redeliver_loop(self, after_s: float) -> None:
        loop = asyncio.get_running_loop()
        interval = min(max(after_s / 4, 0.01), 1.0)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            due: list[_Inbound] = []
            while self._inflight:
                message_id, (rec, sent_at) = next(iter(self._inflight.items()))
                if sent_at + after_s > now:
                    break
                del self._inflight[message_id]
                if message_id not in self.acks:
                    due.append(rec)
            if due:
                self.redeliveries += len(due)
                self._pending.extend(due)
                self._kick()

    async def _ping_loop(self, conn: _Connection) -> None:
        while True:
            await asyncio.sleep(self._ping_interval_s)
            if conn.draining or conn.ws.closed:
                return
            if self._silenced():
                continue
            frame = self._system_frame(conn, "ping", {"opaque": str(uuid.uuid4())})
            if not await self._send(conn, frame):
                return

    async def _close_later(self, conn: _Connection) -> None:
        await asyncio.sleep(self._disconnect_close_after_s)
        await self._close_connection(conn, WSCloseCode.OK, grace_s=2.0)

    @staticmethod
    async def _close_connection(conn: _Connection, code: int, *, grace_s: float) -> None:
        """Close with a close frame; abort the transport if the peer does not answer in time."""
        conn.draining = True
        try:
            await asyncio.wait_for(conn.ws.close(code=code, message=b"connection closed"), grace_s)
        except (TimeoutError, ConnectionError, RuntimeError):
            if conn.transport is not None:
                conn.transport.abort()

    def _on_client_text(self, raw: str) -> None:
        """Record an ACK frame by its ``headers.messageId``; count anything else as bad."""
        try:
            frame = json.loads(raw)
        except ValueError:
            self.bad_frames += 1
            return
        headers = frame.get("headers") if isinstance(frame, dict) else None
        message_id = headers.get("messageId") if isinstance(headers, dict) else None
        if not isinstance(message_id, str):
            self.bad_frames += 1
            return
        self.acks[message_id] = frame
        self._inflight.pop(message_id, None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("dingtalk simulator task failed", exc_info=task.exception())

    # ------------------------------------------------------------------ HTTP handlers

    async def _handle_open(self, request: web.Request) -> web.Response:
        status, answer = self._open(await request.read(), request.host)
        return json_text_response(answer, status=status)

    def _fast_open(self, exchange: FastExchange) -> None:
        host = exchange.headers.get("host")
        if host:  # else aiohttp names the host
            exchange.respond_json(*self._open(exchange.body, host))

    def _open(self, raw: bytes, host: str) -> tuple[int, str]:
        """``POST /v1.0/gateway/connections/open``: the status and JSON text of the answer."""
        body = parse_json_object(raw)[0]
        if body is None:
            return 400, api_error_text("invalidParameter", "body must be a json object")
        self.open_calls.append({k: v for k, v in body.items() if k != "clientSecret"})
        if self._refusing() or self._closed:
            unavailable = "service unavailable, retry later"
            return 503, api_error_text("ServiceUnavailable", unavailable)
        client_id, client_secret = body.get("clientId"), body.get("clientSecret")
        if not (
            isinstance(client_id, str)
            and isinstance(client_secret, str)
            and secrets.compare_digest(client_id.encode(), self._app_key.encode())
            and secrets.compare_digest(client_secret.encode(), self._app_secret.encode())
        ):
            return 400, api_error_text("invalidClientIdOrSecret", _BAD_CREDENTIALS)
        subscriptions = body.get("subscriptions")
        if not isinstance(subscriptions, list) or not all(
            isinstance(s, dict) and _is_str(s.get("type")) and _is_str(s.get("topic"))
            for s in subscriptions
        ):
            problem = "subscriptions must be [{type, topic}]"
            return 400, api_error_text("invalidParameter", problem)
        now = self._clock()
        for key in [k for k, t in self._tickets.items() if t.expires_at < now]:
            del self._tickets[key]
        ticket = str(uuid.uuid4())
        subs = [{"type": s["type"], "topic": s["topic"]} for s in subscriptions]
        self._tickets[ticket] = _Ticket(now + _TICKET_TTL_S, subs)
        if self._public_url:
            base = self._public_url.replace("http", "ws", 1)
        else:
            base = f"ws://{host}" if host else self.base_url.replace("http", "ws")
        return 200, json_text({"endpoint": f"{base}/connect", "ticket": ticket})

    async def _handle_connect(self, request: web.Request) -> web.StreamResponse:
        if self._refusing() or self._closed:
            return api_error(503, "ServiceUnavailable", "service unavailable, retry later")
        ws = web.WebSocketResponse(autoping=False, compress=False, timeout=1.0)
        if not ws.can_prepare(request).ok:
            return api_error(400, "invalidParameter", "websocket upgrade required")
        ticket = self._tickets.pop(request.query.get("ticket", ""), None)
        if ticket is None or ticket.expires_at < self._clock():
            return api_error(401, "invalidTicket", "ticket is invalid, used or expired")
        transport = request.transport
        await ws.prepare(request)
        wants_bot = {"type": "CALLBACK", "topic": BOT_MESSAGE_TOPIC} in ticket.subscriptions
        conn = _Connection(str(uuid.uuid4()), ws, transport, ticket.subscriptions, wants_bot)
        self._conns[conn.id] = conn
        self.connections_opened += 1
        conn.ping_task = self._spawn(self._ping_loop(conn))
        logger.debug("dingtalk simulator connection %s opened", conn.id)
        self._kick()
        try:
            async for msg in ws:
                if self._silenced():
                    continue
                if msg.type is WSMsgType.TEXT:
                    self._on_client_text(msg.data)
                elif msg.type is WSMsgType.PING:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.pong(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    self.bad_frames += 1
        finally:
            conn.draining = True
            self._conns.pop(conn.id, None)
            if conn.ping_task is not None:
                conn.ping_task.cancel()
            logger.debug("dingtalk simulator connection %s closed", conn.id)
        return ws

    async def _handle_token(self, request: web.Request) -> web.Response:
        body = await read_json_object(request) or {}
        key, secret = body.get("appKey"), body.get("appSecret")
        if not (
            isinstance(key, str)
            and isinstance(secret, str)
            and secrets.compare_digest(key.encode(), self._app_key.encode())
            and secrets.compare_digest(secret.encode(), self._app_secret.encode())
        ):
            return _bad_credentials()
        now = self._clock()
        if self._token is None or self._token[1] <= now:
            self._token = ("tok-" + secrets.token_hex(16), now + _TOKEN_TTL_S)
        else:
            self._token = (self._token[0], now + _TOKEN_TTL_S)
        return json_response({"accessToken": self._token[0], "expireIn": int(_TOKEN_TTL_S)})

    async def _handle_send_by_session(self, request: web.Request) -> web.Response:
        session = request.query.get("session", "")
        answer = self._send_by_session(request.content_type, session, await request.read())
        return json_text_response(answer)

    def _fast_send_by_session(self, exchange: FastExchange) -> None:
        if exchange.plain_query():  # else aiohttp decodes the query
            session = exchange.query("session") or ""
            answer = self._send_by_session(exchange.content_type, session, exchange.body)
            exchange.respond_json(200, answer)

    def _send_by_session(self, content_type: str, key: str, raw: bytes) -> str:
        """Validate and record one sessionWebhook send; return the errcode answer (§2.1)."""
        if content_type != "application/json":
            return _errcode(43004, "无效的HTTP HEADER Content-Type")
        session = self._sessions.get(key)
        if session is None or session.expires_ms < int(self._clock() * 1000):
            return _errcode(300001, "session 不存在")
        if asyncio.get_running_loop().time() < self._throttle_until:
            return _errcode(130101, "send too fast, exceed 20 times per minute")
        body, text = parse_json_object(raw)
        if body is None:
            return _errcode(40035, "缺少参数 json")
        msgtype = body.get("msgtype")
        if not isinstance(msgtype, str) or msgtype not in REPLY_MSGTYPES:
            return _errcode(400105, "不支持的消息类型")
        problem = _check_reply(msgtype, body)
        if problem is not None:
            return _errcode(40035, f"缺少参数 {problem}")
        if not self.admit_send("webhook"):
            return _errcode(130101, "send too fast, exceed 20 times per minute")
        # The body is kept as the text that came, already known to be one JSON object.
        self._reply_seq += 1
        self._replies.append(
            _Reply(
                self._reply_seq,
                session.msg_id,
                session.conversation_id,
                msgtype,
                text,
                self._clock(),
            )
        )
        return _OK_TEXT

    # ------------------------------------------------------------------ for extensions

    @property
    def clock(self) -> Callable[[], float]:
        """The simulator's wall clock (epoch seconds)."""
        return self._clock

    def throttled(self) -> bool:
        """Whether a ``throttle_s`` fault window is open."""
        return asyncio.get_running_loop().time() < self._throttle_until

    def record_reply(
        self, msg_id: str | None, conversation_id: str, msgtype: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Record a message the bot sent (any channel), shown by the page and ``/_sim/replies``.

        ``msg_id`` is the inbound message answered when the channel tells (sessionWebhook),
        else ``None`` (OpenAPI sends name only the conversation).
        """
        self._reply_seq += 1
        record = _Reply(
            self._reply_seq,
            msg_id,
            conversation_id,
            msgtype,
            json.dumps(body, ensure_ascii=False),
            self._clock(),
        )
        self._replies.append(record)
        return record.as_dict()

    def check_token(self, request: web.Request) -> web.Response | None:
        """``None`` if the request carries the current access token, else the error response.

        Missing header → 400 ``AuthenticationFailed.MissingParameter``; a wrong or expired
        token → 401 ``InvalidAuthentication`` (protocols/dingtalk.md §4).
        """
        token = request.headers.get("x-acs-dingtalk-access-token")
        if not token:
            return api_error(
                400,
                "AuthenticationFailed.MissingParameter",
                "缺少参数 x-acs-dingtalk-access-token",
            )
        current = self._token
        if (
            current is None
            or current[1] <= self._clock()
            or not secrets.compare_digest(token.encode(), current[0].encode())
        ):
            return api_error(401, "InvalidAuthentication", "不合法的access_token")
        return None

    def invalidate_token(self) -> None:
        """Forget the current access token (clients must fetch a new one)."""
        self._token = None

    def expire_sessions(self) -> None:
        """Expire every sessionWebhook handed out so far: each answers errcode 300001 from now.

        Messages injected afterwards get working sessions as usual.
        """
        for session in self._sessions.values():
            session.expires_ms = 0

    def set_send_gate(self, gate: Callable[[str], bool] | None) -> None:
        """Install (or remove, with ``None``) a check every valid bot send must pass.

        ``gate(api)`` is called with ``"webhook"`` for a valid sessionWebhook send just before
        it would be recorded; ``False`` answers errcode 130101 (send too fast) instead.
        Extensions ask it for their own APIs through :meth:`admit_send`.
        """
        self._send_gate = gate

    def admit_send(self, api: str) -> bool:
        """Ask the send gate (see :meth:`set_send_gate`) whether one send on ``api`` may go.

        Extensions call it for their own send endpoints (``"batchSend"``, card updates, …) and
        answer with the platform's throttling error when it returns ``False``.
        """
        return self._send_gate is None or self._send_gate(api)

    def direct_conversation_id(self, sender_id: str) -> str:
        """The conversation id of the 1:1 chat between ``sender_id`` and the bot."""
        return self._direct_conversation_id(sender_id)

    def knows_user(self, staff_id: str) -> bool:
        """Whether ``staff_id`` is a preset user or sent one of the remembered messages."""
        if staff_id in _PRESET_NICKS:
            return True
        return any(m.sender_id == staff_id for m in reversed(self._messages))

    def knows_group(self, conversation_id: str) -> bool:
        """Whether ``conversation_id`` is a preset group or a remembered message's group."""
        if conversation_id in _PRESET_TITLES:
            return True
        return any(
            m.conversation_id == conversation_id and m.conversation_type == "2"
            for m in reversed(self._messages)
        )

    async def _handle_index(self, request: web.Request) -> web.Response:
        config = {
            "users": [{"id": uid, "nick": nick} for uid, nick in PRESET_USERS],
            "groups": [{"id": gid, "title": title} for gid, title in PRESET_GROUPS],
        }
        return web.Response(text=render_page(config), content_type="text/html", charset="utf-8")

    async def _handle_post_message(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        if body is None:
            return json_response({"error": "body must be a json object"}, status=400)
        unknown = sorted(set(body) - _MESSAGE_KEYS)
        if unknown:
            return json_response({"error": f"unknown keys: {', '.join(unknown)}"}, status=400)
        kwargs = {k: v for k, v in body.items() if k != "text" and v is not None}
        try:
            ids = await self.send_message(body.get("text", ""), **kwargs)
        except (ValueError, TypeError) as exc:
            return json_response({"error": str(exc)}, status=400)
        return json_response(ids)

    async def _handle_post_batch(self, request: web.Request) -> web.Response:
        status, answer = await self._post_batch(await request.read())
        return json_text_response(answer, status=status)

    async def _fast_post_batch(self, exchange: FastExchange) -> None:
        status, answer = await self._post_batch(exchange.body)
        exchange.respond_json(status, answer)

    async def _post_batch(self, raw: bytes) -> tuple[int, str]:
        """``POST /_sim/messages/batch``: inject ``{"messages": [<POST /_sim/messages body>…]}``.

        Every item is validated first (a bad one answers 400 and nothing is sent). Stream
        mode sends them in order; HTTP mode delivers each conversation's items in order and
        different conversations concurrently. Answers ``{"sent": [...]}`` in item order, each
        ``{"msg_id", "message_id", "sent_at"}`` (this simulator's clock just before the
        message was handed over) plus, in HTTP mode, ``webhook_status`` and ``webhook_ms``
        (the gateway's final answer and how long the delivery took).

        Returns:
            The HTTP status and the JSON text of the answer.
        """
        body = parse_json_object(raw)[0]
        items = body.get("messages") if body is not None else None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return 400, json_text({"error": "messages must be a list of objects"})
        calls: list[dict[str, Any]] = []
        for n, item in enumerate(items):
            if not _MESSAGE_KEYS.issuperset(item):
                unknown = sorted(set(item) - _MESSAGE_KEYS)
                error = f"messages[{n}]: unknown keys: {', '.join(unknown)}"
                return 400, json_text({"error": error})
            # The arguments send_message() would see: its defaults, then the item's values.
            given = {k: v for k, v in item.items() if v is not None or k == "text"}
            args = {**_MESSAGE_DEFAULTS, **given}
            try:
                _check_message_args(args)
            except ValueError as exc:
                return 400, json_text({"error": f"messages[{n}]: {exc}"})
            calls.append(args)
        sent: list[dict[str, Any]] = [{} for _ in calls]

        async def deliver(indexes: list[int]) -> None:
            for n in indexes:
                sent_at, started = self._clock(), time.perf_counter()
                ids = await self._send_checked(calls[n])
                sent[n] = {**ids, "sent_at": sent_at}
                if self.webhook_url is not None:
                    sent[n]["webhook_status"] = self.webhook_results.get(ids["msg_id"], 0)
                    sent[n]["webhook_ms"] = (time.perf_counter() - started) * 1000.0

        try:
            if self.webhook_url is None:
                sent = await self._push_batch(calls)
            else:
                lanes: dict[str, list[int]] = {}
                for n, args in enumerate(calls):
                    lanes.setdefault(self._conversation_of(args), []).append(n)
                await asyncio.gather(*(deliver(lane) for lane in lanes.values()))
        except RuntimeError as exc:  # the simulator is closing
            return 503, json_text({"error": str(exc)})
        return 200, json_text({"sent": sent})

    def _conversation_of(self, args: Mapping[str, Any]) -> str:
        """The conversation a :meth:`send_message` call with ``args`` lands in."""
        cid = args.get("conversation_id")
        if isinstance(cid, str):
            return cid
        if args.get("conversation_type") == "2":
            return DEFAULT_GROUP_ID
        return self._direct_conversation_id(str(args.get("sender_id") or DEFAULT_SENDER))

    @staticmethod
    def _after(request: web.Request) -> int:
        raw = request.query.get("after", "0")
        if not raw.isdigit():
            raise web.HTTPBadRequest(text=_AFTER_ERROR, content_type="application/json")
        return int(raw)

    async def _handle_get_messages(self, request: web.Request) -> web.Response:
        after = self._after(request)
        cid = request.query.get("conversation_id")
        found = [
            m._asdict()
            for m in _newer(self._messages, self._message_seq, after)
            if cid is None or m.conversation_id == cid
        ]
        return json_response({"messages": found})

    async def _handle_get_replies(self, request: web.Request) -> web.Response:
        query = request.query
        status, answer = self._replies_page(
            query.get("after", "0"), query.get("msg_id"), query.get("conversation_id")
        )
        return json_text_response(answer, status=status)

    def _fast_get_replies(self, exchange: FastExchange) -> None:
        if exchange.plain_query():  # else aiohttp decodes the query
            after = exchange.query("after")
            status, answer = self._replies_page(
                "0" if after is None else after,
                exchange.query("msg_id"),
                exchange.query("conversation_id"),
            )
            exchange.respond_json(status, answer)

    def _replies_page(self, after: str, msg_id: str | None, cid: str | None) -> tuple[int, str]:
        """``GET /_sim/replies``: the replies after seq ``after``, optionally filtered."""
        if not after.isdigit():
            return 400, _AFTER_ERROR
        found = ", ".join(
            r.as_json()
            for r in _newer(self._replies, self._reply_seq, int(after))
            if (msg_id is None or r.msg_id == msg_id) and (cid is None or r.conversation_id == cid)
        )
        return 200, f'{{"replies": [{found}]}}'

    async def _handle_faults(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        if body is None:
            return json_response({"error": "body must be a json object"}, status=400)
        try:
            await self.fault(body)
        except ValueError as exc:
            return json_response({"error": str(exc)}, status=400)
        return json_response({"ok": True, "applied": sorted(body)})

    async def _handle_state(self, request: web.Request) -> web.Response:
        return json_response(self.state())

    def _fast_state(self, exchange: FastExchange) -> None:
        exchange.respond_json(200, json_text(self.state()))


_MESSAGE_KEYS: Final = frozenset(inspect.signature(DingTalkSimulator.send_message).parameters) - {
    "self"
}
_MESSAGE_DEFAULTS: Final[Mapping[str, Any]] = {
    name: param.default
    for name, param in inspect.signature(DingTalkSimulator.send_message).parameters.items()
    if name != "self"
}


def _newer(records: deque[_R], last_seq: int, after: int) -> Iterable[_R]:
    """The records with a sequence number above ``after``, oldest first.

    ``records`` holds the newest records of a run numbered 1, 2, … ``last_seq`` without gaps
    (older ones forgotten), so the new ones are the last ``last_seq - after``: a poller pays
    for what is new, not for everything remembered.
    """
    count = min(last_seq - after, len(records))
    if count <= 0:
        return ()
    if count == len(records):
        return records
    newest_first = list(itertools.islice(reversed(records), count))
    newest_first.reverse()
    return newest_first


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    app_key: str = "sim-app-key",
    app_secret: str = "sim-app-secret",
    ping_interval_s: float = 20.0,
    *,
    redeliver_after_s: float | None = None,
    disconnect_close_after_s: float = 10.0,
    public_url: str | None = None,
    on_ready: Callable[[DingTalkSimulator], None] | None = None,
) -> None:
    """Run a :class:`DingTalkSimulator` until cancelled; prints nothing.

    Args:
        host: address to bind.
        port: port to bind (0 = any free port; read it in ``on_ready``).
        app_key: accepted clientId/appKey.
        app_secret: accepted clientSecret/appSecret.
        ping_interval_s: seconds between SYSTEM ping frames.
        redeliver_after_s: redeliver un-ACKed bot messages after this many seconds.
        disconnect_close_after_s: delay between a ``disconnect`` frame and the close.
        public_url: base URL clients use to reach the simulator, if not loopback.
        on_ready: called with the started simulator (e.g. to print its URL).
    """
    async with DingTalkSimulator(
        host=host,
        port=port,
        app_key=app_key,
        app_secret=app_secret,
        ping_interval_s=ping_interval_s,
        redeliver_after_s=redeliver_after_s,
        disconnect_close_after_s=disconnect_close_after_s,
        public_url=public_url,
    ) as sim:
        if on_ready is not None:
            on_ready(sim)
        await asyncio.Event().wait()


def default_extensions() -> list[SimExtension]:
    """Every simulator part shipped beside the core: OpenAPI sends, AI cards, media."""
    from imrelay.sim.dingtalk_cards import CardExtension
    from imrelay.sim.dingtalk_media import MediaExtension
    from imrelay.sim.dingtalk_openapi import OpenAPIExtension

    return [OpenAPIExtension(), CardExtension(), MediaExtension()]
