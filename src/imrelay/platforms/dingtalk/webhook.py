"""DingTalk HTTP mode: the ``POST /webhooks/<name>`` endpoint (protocols/dingtalk.md §3).

Theory of operation: :meth:`DingTalkWebhook.handle` serves one request in this order, and every
rejection is answered before anything is handed to the intake (nothing is stored):

1. The peer address (``request.remote``) must be in ``allow_cidrs`` when that list is set
   (403). Behind a reverse proxy this is the proxy's address unless a middleware rewrites it.
2. A ``Content-Length`` above ``max_body_bytes`` is refused before reading (413); a body without
   one is read in chunks and refused as soon as it grows past the cap (413).
3. A request with a ``msg_signature`` query parameter is an encrypted event callback (§3.2):
   it is verified and decrypted with
   :class:`~imrelay.platforms.dingtalk.crypto.DingTalkCallbackCrypto` (owner key = AppKey) and
   answered with the encrypted ``success``. The URL check
   (``EventType: check_url``) needs nothing else; other events are logged by type only and not
   processed further (no event handler exists yet). Without ``aes_key`` and ``token`` configured
   the callback is refused (404).
4. Anything else is a bot message (§3.1): the ``timestamp`` and ``sign`` headers are verified
   (window ``timestamp_window_s``, 401). The body is read, and ``(timestamp, sign, digest of
   the body)`` is reserved: the same request seen again within its window is refused (401,
   ``replay``). The body is part of the key because DingTalk's signature covers only the
   timestamp: every message DingTalk sends within the same millisecond carries the same
   ``timestamp`` and ``sign``, so a guard on the header pair alone refused legitimate messages
   of a busy bot. The flip side, inherent in that signature: whoever captured one signed
   request can sign other bodies with it until its timestamp leaves the window; set
   ``allow_cidrs`` to DingTalk's egress addresses where that matters. The body must be a JSON
   object (400) that
   :func:`~imrelay.platforms.dingtalk.events.parse_bot_message` accepts (400). If the worker is
   at capacity the answer is 503 with ``Retry-After: 1`` at once (no waiting). Otherwise the
   message is offered to the intake and the answer, ``200 {"msgtype":"empty"}``, is sent only
   after the inbox commit (a failed commit is a 500); the model is never waited for. A
   reservation is released whenever the answer is not 200, so DingTalk may retry it.

Every rejection increments ``imrelay_messages_rejected_total{reason}``. Rejections are logged at
WARNING at most once a minute per reason (the rest at DEBUG), so a flood of unauthenticated
requests cannot flood the log. Logs never contain the app secret, a signature or message text.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import ipaddress
import logging
import secrets
import string
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from imrelay import _json
from imrelay.config import DingTalkSettings
from imrelay.errors import ProtocolError, SignatureError
from imrelay.observability.metrics import Metrics
from imrelay.platforms.base import Intake
from imrelay.platforms.dingtalk.crypto import (
    DingTalkCallbackCrypto,
    DingTalkStaleTimestamp,
    verify_webhook_signature,
)
from imrelay.platforms.dingtalk.events import parse_bot_message

__all__ = ["REJECT_REASONS", "DingTalkWebhook"]

_ReplayKey = tuple[str, str, bytes]

logger = logging.getLogger(__name__)

#: Every ``reason`` label this endpoint gives ``imrelay_messages_rejected_total``.
REJECT_REASONS: Final = frozenset(
    {
        "forbidden_ip",
        "too_large",
        "bad_signature",
        "stale_timestamp",
        "replay",
        "bad_json",
        "bad_payload",
        "overloaded",
        "store_error",
        "not_configured",
    }
)

_EMPTY_REPLY: Final = {"msgtype": "empty"}
_CHUNK: Final = 64 * 1024
_WARN_EVERY_S: Final = 60.0
_NONCE_ALPHABET: Final = string.ascii_letters + string.digits
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _ReplayGuard:
    """``(timestamp, sign, body digest)`` keys seen within their window; bounded and pruned by
    time.

    Each key expires when its timestamp leaves the window (it would then be refused as stale
    anyway). When ``capacity`` keys are held, the one expiring first is forgotten.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("replay capacity must be at least 1")
        self.capacity = capacity
        self._expiry: dict[_ReplayKey, float] = {}
        self._heap: list[tuple[float, _ReplayKey]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def reserve(self, key: _ReplayKey, expires_at: float, now: float) -> bool:
        """Hold ``key`` until ``expires_at``; ``False`` if it is already held."""
        self._prune(now)
        if key in self._expiry:
            return False
        while len(self._expiry) >= self.capacity:
            when, old = heapq.heappop(self._heap)
            if self._expiry.get(old) == when:
                del self._expiry[old]
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        if len(self._heap) > 2 * self.capacity:  # released keys leave stale heap entries
            self._heap = [(when, k) for k, when in self._expiry.items()]
            heapq.heapify(self._heap)
        return True

    def release(self, key: _ReplayKey) -> None:
        """Forget ``key`` (its request was not accepted)."""
        self._expiry.pop(key, None)

    def _prune(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            when, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == when:
                del self._expiry[key]


class DingTalkWebhook:
    """The HTTP-mode endpoint of one DingTalk app (see the module docstring).

    Args:
        name: the configured platform name (metrics label, ``InboundMessage.platform``).
        settings: the platform's settings (secret, ``allow_cidrs``, ``max_body_bytes``,
            ``timestamp_window_s``, ``aes_key``, ``token``).
        intake: where accepted messages go (the worker).
        metrics: the gateway's metrics.
        clock: wall clock, epoch seconds (timestamp window, replay expiry, ``received_at``).
        has_capacity: whether the intake can take another message now, without waiting
            (e.g. ``lambda: worker.pending < worker.max_pending``).
        replay_capacity: how many ``(timestamp, sign, body digest)`` keys the replay check
            holds.
    """

    def __init__(
        self,
        name: str,
        settings: DingTalkSettings,
        intake: Intake,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        has_capacity: Callable[[], bool] = lambda: True,
        replay_capacity: int = 100_000,
    ) -> None:
        self.name = name
        self.settings = settings
        self.intake = intake
        self.metrics = metrics
        self.clock = clock
        self.has_capacity = has_capacity
        self._secret = settings.app_secret.get_secret_value()
        self._allow: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in settings.allow_cidrs
        )
        self._events: DingTalkCallbackCrypto | None = None
        if settings.aes_key is not None and settings.token is not None:
            self._events = DingTalkCallbackCrypto(
                settings.token.get_secret_value(),
                settings.aes_key.get_secret_value(),
                settings.app_key,
            )
        self._replay = _ReplayGuard(replay_capacity)
        self._warned: dict[str, float] = {}
        self._log = logging.LoggerAdapter(logger, {"platform": name})

    def __repr__(self) -> str:
        return f"DingTalkWebhook(name={self.name!r})"

    @property
    def replay_entries(self) -> int:
        """How many ``(timestamp, sign, body digest)`` keys the replay check currently holds."""
        return len(self._replay)

    async def handle(self, request: web.Request) -> web.Response:
        """Serve one ``POST /webhooks/<name>`` request (see the module docstring)."""
        if not self._allowed(request.remote):
            return self._reject("forbidden_ip", 403, "address not allowed")
        length = request.content_length
        if length is not None and length > self.settings.max_body_bytes:
            return self._reject("too_large", 413, "request body too large")
        if "msg_signature" in request.query:
            return await self._handle_event(request)
        return await self._handle_bot_message(request)

    # -- bot messages (§3.1) ---------------------------------------------------------------

    async def _handle_bot_message(self, request: web.Request) -> web.Response:
        now = self.clock()
        timestamp = request.headers.get("timestamp")
        sign = request.headers.get("sign")
        window_s = self.settings.timestamp_window_s
        try:
            verify_webhook_signature(
                timestamp, sign, self._secret, now_ms=int(now * 1000), window_s=window_s
            )
        except DingTalkStaleTimestamp as exc:
            return self._reject("stale_timestamp", 401, str(exc))
        except SignatureError as exc:
            return self._reject("bad_signature", 401, str(exc))
        body = await self._read_body(request)
        if body is None:
            return self._reject("too_large", 413, "request body too large")
        # both verified present above; the signature does not cover the body (see the module
        # docstring), so the body's digest is part of what makes a request a replay
        key = (timestamp or "", sign or "", hashlib.blake2b(body, digest_size=16).digest())
        if not self._replay.reserve(key, int(key[0]) / 1000 + window_s, now):
            return self._reject("replay", 401, "request already received")
        accepted = False
        try:
            response = await self._accept(body, now)
            accepted = response.status == 200
            return response
        finally:
            if not accepted:
                self._replay.release(key)

    async def _accept(self, body: bytes, now: float) -> web.Response:
        data = _json_object(body)
        if data is None:
            return self._reject("bad_json", 400, "body is not a json object")
        try:
            message = parse_bot_message(
                data, platform=self.name, received_at=now, ingress="webhook"
            )
        except ProtocolError as exc:
            return self._reject("bad_payload", 400, str(exc))
        if not self.has_capacity():
            return self._reject("overloaded", 503, "busy, retry later", {"Retry-After": "1"})
        try:
            await self.intake.offer(message)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # The intake cancelled the commit (it is closing): not stored, so retryable.
            return self._reject("overloaded", 503, "shutting down", {"Retry-After": "1"})
        except Exception as exc:
            self._log.error(
                "not accepting a bot message: inbox commit failed: %r",
                exc,
                extra={"message.id": message.message_id},
            )
            return self._reject("store_error", 500, "could not store the message", warn=False)
        self._log.debug("bot message accepted", extra={"message.id": message.message_id})
        return web.json_response(_EMPTY_REPLY)

    # -- encrypted event callbacks (§3.2) --------------------------------------------------

    async def _handle_event(self, request: web.Request) -> web.Response:
        if self._events is None:
            return self._reject(
                "not_configured",
                404,
                "event subscription is not configured: set aes_key and token",
            )
        body = await self._read_body(request)
        if body is None:
            return self._reject("too_large", 413, "request body too large")
        data = _json_object(body)
        if data is None:
            return self._reject("bad_json", 400, "body is not a json object")
        encrypt = data.get("encrypt")
        if not isinstance(encrypt, str):
            return self._reject("bad_payload", 400, "body has no 'encrypt' string")
        query = request.query
        try:
            event = self._events.decrypt(
                query.get("msg_signature"), query.get("timestamp"), query.get("nonce"), encrypt
            )
        except SignatureError as exc:
            return self._reject("bad_signature", 401, str(exc))
        except ProtocolError as exc:
            return self._reject("bad_payload", 400, str(exc))
        event_type = event.get("EventType")
        if event_type == "check_url":
            self._log.info("event subscription url check answered")
        else:
            shown = event_type[:64] if isinstance(event_type, str) else "unknown"
            self._log.info("event %r received and acknowledged (events are not processed)", shown)
        nonce = "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(16))
        reply = self._events.reply_success(str(int(self.clock() * 1000)), nonce)
        return web.json_response(reply)

    # -- helpers ---------------------------------------------------------------------------

    def _allowed(self, remote: str | None) -> bool:
        if not self._allow:
            return True
        if not remote:
            return False
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)  # a dual-stack socket reports ::ffff:a.b.c.d
        return any(a in net for a in candidates for net in self._allow)

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The body, or ``None`` as soon as it exceeds ``max_body_bytes``."""
        limit = self.settings.max_body_bytes
        body = bytearray()
        async for chunk in request.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)

    def _reject(
        self,
        reason: str,
        status: int,
        why: str,
        headers: dict[str, str] | None = None,
        *,
        warn: bool = True,
    ) -> web.Response:
        self.metrics.messages_rejected.labels(self.name, reason).inc()
        if warn:
            now = time.monotonic()
            last = self._warned.get(reason)
            level = logging.DEBUG
            if last is None or now - last >= _WARN_EVERY_S:
                self._warned[reason] = now
                level = logging.WARNING
            self._log.log(level, "webhook request rejected (%s, %d): %s", reason, status, why)
        return web.json_response({"error": why}, status=status, headers=headers)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = _json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
