"""The DingTalk simulator's HTTP-mode side: it signs and POSTs bot messages to a gateway.

In HTTP mode (protocols/dingtalk.md §3.1) DingTalk does not push bot messages on a WebSocket: it
POSTs the §1.7 payload to the app's URL with the headers ``timestamp`` (epoch ms) and ``sign``
(Base64 HMAC-SHA256 of ``timestamp + "\\n" + appSecret`` keyed with the appSecret).
:class:`DingTalkWebhookSender` does that for :class:`~imrelay.sim.dingtalk.DingTalkSimulator`
when it is given a ``webhook_url``. The signature is computed here independently of
:mod:`imrelay.platforms.dingtalk.crypto`, so the simulator checks the gateway's implementation
instead of sharing its mistakes.

A delivery answered with 5xx or 429, or not answered at all, is retried a few times with a short
growing delay (each attempt newly signed, with a fresh timestamp); ``Retry-After`` is not
honoured, since DingTalk documents no retry policy for this path. Anything else is final.

:func:`send_event` POSTs one encrypted event-subscription callback (§3.2), for tests of the
URL-check handshake; it uses :class:`~imrelay.platforms.dingtalk.crypto.DingTalkCallbackCrypto`
to encrypt, whose decryption is pinned by the official test vector.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from imrelay.errors import ProtocolError, SignatureError
from imrelay.http import HTTPClient
from imrelay.platforms.dingtalk.crypto import DingTalkCallbackCrypto

__all__ = [
    "DEFAULT_RETRY_DELAYS",
    "DingTalkWebhookSender",
    "EventResult",
    "WebhookDelivery",
    "send_event",
    "webhook_headers",
]

#: Delays before the second, third and fourth attempt of a delivery, in seconds.
DEFAULT_RETRY_DELAYS: Final = (0.05, 0.1, 0.2)
#: Delivery attempts (so connections to the gateway) under way at once, at most. A pool of
#: 100 (aiohttp's default) queued the deliveries of a benchmark with more conversations in flight.
MAX_CONNECTIONS: Final = 1000
_NONCE_ALPHABET: Final = string.ascii_letters + string.digits


def webhook_headers(app_secret: str, timestamp_ms: int) -> dict[str, str]:
    """The ``timestamp``/``sign`` headers DingTalk adds to an HTTP-mode bot message (§3.1)."""
    timestamp = str(timestamp_ms)
    mac = hmac.new(
        app_secret.encode("utf-8"), f"{timestamp}\n{app_secret}".encode(), hashlib.sha256
    )
    return {"timestamp": timestamp, "sign": base64.b64encode(mac.digest()).decode("ascii")}


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """The outcome of one delivery.

    Attributes:
        status: the last HTTP status, or 0 when the last attempt got no response.
        attempts: how many POSTs were made.
        body: the last response body (empty without a response).
    """

    status: int
    attempts: int
    body: bytes


def _retryable(status: int) -> bool:
    return status == 0 or status == 429 or status >= 500


class DingTalkWebhookSender:
    """Signs and POSTs bot-message payloads, retrying 5xx/429/no answer a bounded number of times.

    Deliveries go over the keep-alive connections of one :class:`imrelay.http.HTTPClient` (a
    benchmark's webhook ingress sends hundreds a second, and aiohttp's client would cost more
    CPU than the rest of the delivery). At most :data:`MAX_CONNECTIONS` attempts are under way
    at once. The client is opened on first use, inside the running event loop, and closed by
    :meth:`aclose`.

    Args:
        app_secret: the app's AppSecret, the signing key.
        clock: wall clock in epoch seconds, for the ``timestamp`` header.
        retry_delays: the delay before each retry; its length is the number of retries.
        timeout_s: the whole time allowed for one attempt.
    """

    def __init__(
        self,
        app_secret: str,
        *,
        clock: Callable[[], float] = time.time,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        timeout_s: float = 5.0,
    ) -> None:
        if any(d < 0 for d in retry_delays):
            raise ValueError("retry delays must not be negative")
        self._secret = app_secret
        self._clock = clock
        self._delays = tuple(retry_delays)
        self._timeout_s = timeout_s
        self._client: HTTPClient | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.posts = 0
        self.retries = 0
        self.failures = 0

    def __repr__(self) -> str:
        return "DingTalkWebhookSender(app_secret=***)"

    async def deliver(self, url: str, data: str) -> WebhookDelivery:
        """POST the payload ``data`` (JSON text) to ``url``, signed; retry as described above.

        Returns:
            The outcome of the last attempt.
        """
        payload = data.encode("utf-8")
        status, body, attempts = 0, b"", 0
        for delay in (0.0, *self._delays):
            if attempts:
                self.retries += 1
                await asyncio.sleep(delay)
            attempts += 1
            self.posts += 1
            headers = webhook_headers(self._secret, int(self._clock() * 1000))
            headers["Content-Type"] = "application/json; charset=utf-8"
            try:
                async with self._slots:
                    status, body = await self._post(url, payload, headers)
            except (TimeoutError, OSError, ValueError):  # no answer, or an unusable URL
                status, body = 0, b""
            if not _retryable(status):
                break
        if status != 200:
            self.failures += 1
        return WebhookDelivery(status, attempts, body)

    async def _post(self, url: str, payload: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """One attempt: the answer's status and body."""
        if self._client is None or self._client.closed:
            self._client = HTTPClient(limit=MAX_CONNECTIONS, user_agent="imrelay-sim")
        async with asyncio.timeout(self._timeout_s):
            async with await self._client.request(
                "POST", url, body=payload, headers=headers
            ) as resp:
                return resp.status, await resp.read()

    def state(self) -> dict[str, Any]:
        """Counters for ``GET /_sim/state``."""
        return {"posts": self.posts, "retries": self.retries, "failures": self.failures}

    async def aclose(self) -> None:
        """Close the HTTP client's connections, if any were opened."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


@dataclass(frozen=True, slots=True)
class EventResult:
    """The gateway's answer to an encrypted event callback.

    Attributes:
        status: the HTTP status.
        body: the response body as JSON (``None`` if it was not JSON).
        reply: the decrypted reply (``"success"`` for a correct answer), or ``None`` when the
            body is not a well-signed encrypted reply.
    """

    status: int
    body: Any
    reply: str | None


async def send_event(
    url: str,
    event_type: str,
    payload: Mapping[str, Any],
    token: str,
    aes_key: str,
    *,
    owner_key: str,
    http: aiohttp.ClientSession | None = None,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> EventResult:
    """POST one encrypted event callback (§3.2) to ``url`` and decrypt the answer.

    Args:
        url: the gateway's endpoint, e.g. ``http://127.0.0.1:8080/webhooks/dingtalk``.
        event_type: the plaintext's ``EventType`` (``check_url`` for the URL check).
        payload: further plaintext fields.
        token: the callback token.
        aes_key: the 43-character EncodingAESKey.
        owner_key: the AppKey the message is encrypted for.
        http: a session to use (default: a new one, closed afterwards).
        timestamp: the query ``timestamp`` (default: now, epoch ms).
        nonce: the query ``nonce`` (default: 16 random letters and digits).

    Returns:
        The status, the JSON body and the decrypted reply.
    """
    crypto = DingTalkCallbackCrypto(token, aes_key, owner_key)
    timestamp = timestamp or str(int(time.time() * 1000))
    nonce = nonce or "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(16))
    plaintext = json.dumps({"EventType": event_type, **payload}, ensure_ascii=False)
    sealed = crypto.encrypt(plaintext, timestamp=timestamp, nonce=nonce)
    query = {"msg_signature": sealed["msg_signature"], "timestamp": timestamp, "nonce": nonce}
    session = http or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        async with session.post(url, params=query, json={"encrypt": sealed["encrypt"]}) as resp:
            status, raw = resp.status, await resp.read()
    finally:
        if http is None:
            await session.close()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    reply: str | None = None
    if isinstance(body, dict):
        fields = [body.get(k) for k in ("msg_signature", "timeStamp", "nonce", "encrypt")]
        if all(isinstance(f, str) for f in fields):
            try:
                reply = crypto.decrypt_text(*fields)
            except (SignatureError, ProtocolError):
                reply = None
    return EventResult(status, body, reply)
