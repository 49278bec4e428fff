"""Tests of the DingTalk HTTP-mode endpoint on a loopback server, and of the simulator's sender.

A small aiohttp app routes ``POST /webhooks/dingtalk`` to :class:`DingTalkWebhook`; requests are
signed with the real algorithm (or deliberately not). :class:`RecordingIntake` records every
message offered and can fail or cancel the commit. The wall clock is injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from imrelay.config import DingTalkSettings
from imrelay.errors import StoreError
from imrelay.message import InboundMessage
from imrelay.observability.metrics import Metrics
from imrelay.platforms.dingtalk.crypto import sign_webhook
from imrelay.platforms.dingtalk.webhook import REJECT_REASONS, DingTalkWebhook
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.dingtalk_webhook import DingTalkWebhookSender, send_event, webhook_headers

NAME = "dingtalk"
APP_KEY = "dingwebhookappkey"
SECRET = "webhook-app-secret-value"
TOKEN = "123456"
AES_KEY = "1234567890123456789012345678901234567890123"
NOW = 1_700_000_000.0
NOW_MS = int(NOW * 1000)
MAX_BODY = 1024
PATH = "/webhooks/dingtalk"


def payload(msg_id: str = "msgA==", text: str = "hello") -> dict[str, Any]:
    """A realistic 1:1 text bot message (protocol doc §1.7)."""
    return {
        "conversationId": "cidDirect==",
        "conversationType": "1",
        "chatbotUserId": "$:LWCP_v1:$bot",
        "msgId": msg_id,
        "senderNick": "Alice",
        "senderStaffId": "staff-1",
        "senderId": "$:LWCP_v1:$alice",
        "sessionWebhookExpiredTime": NOW_MS + 5_400_000,
        "createAt": NOW_MS,
        "isInAtList": True,
        "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=abc",
        "text": {"content": text},
        "robotCode": APP_KEY,
        "msgtype": "text",
    }


def signed(ts_ms: int = NOW_MS, secret: str = SECRET) -> dict[str, str]:
    """The ``timestamp``/``sign`` headers for ``ts_ms``."""
    return {"timestamp": str(ts_ms), "sign": sign_webhook(secret, ts_ms)}


class RecordingIntake:
    """An Intake that records offers; the commit succeeds, fails or is cancelled on demand."""

    def __init__(self) -> None:
        self.offers: list[InboundMessage] = []
        self.error: Exception | None = None
        self.cancel = False
        self.hang = False
        self.new = True
        self.task: asyncio.Task[Any] | None = None

    def offer(self, message: InboundMessage) -> Awaitable[bool]:
        self.offers.append(message)
        self.task = asyncio.current_task()  # the handler's task: offer() is called synchronously
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self.hang:
            pass
        elif self.error is not None:
            future.set_exception(self.error)
        elif self.cancel:
            future.cancel()
        else:
            future.set_result(self.new)
        return future

    async def wait_capacity(self) -> None:
        return None

    def has_capacity(self) -> bool:
        return True


@dataclass
class Endpoint:
    """A running webhook endpoint and what it was built with."""

    url: str
    webhook: DingTalkWebhook
    intake: RecordingIntake
    registry: CollectorRegistry
    clock: list[float]
    capacity: list[bool]
    http: aiohttp.ClientSession

    def rejected(self, reason: str) -> float:
        value = self.registry.get_sample_value(
            "imrelay_messages_rejected_total", {"platform": NAME, "reason": reason}
        )
        return value or 0.0

    def rejections(self) -> dict[str, float]:
        return {r: self.rejected(r) for r in REJECT_REASONS if self.rejected(r)}

    async def post(
        self,
        body: bytes | str | dict[str, Any] | list[Any] | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[int, Any, Mapping[str, str]]:
        """POST ``body`` (default: a valid payload) with ``headers`` (default: signed now)."""
        if body is None:
            body = payload()
        data = json.dumps(body).encode() if isinstance(body, dict | list) else body
        hdrs = signed() if headers is None else headers
        async with self.http.post(self.url, data=data, headers=hdrs, **kwargs) as resp:
            raw = await resp.read()
            try:
                decoded: Any = json.loads(raw)
            except ValueError:
                decoded = raw
            return resp.status, decoded, resp.headers


EndpointFactory = Callable[..., Awaitable[Endpoint]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session with a bounded timeout."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def endpoint_factory(http: aiohttp.ClientSession) -> AsyncIterator[EndpointFactory]:
    """Start webhook endpoints on 127.0.0.1:0; keyword arguments override platform settings."""
    runners: list[web.AppRunner] = []

    async def start(replay_capacity: int = 100_000, **overrides: Any) -> Endpoint:
        conf: dict[str, Any] = {
            "type": "dingtalk",
            "mode": "webhook",
            "app_key": APP_KEY,
            "app_secret": SECRET,
            "max_body_bytes": MAX_BODY,
            "aes_key": AES_KEY,
            "token": TOKEN,
        }
        conf.update(overrides)
        settings = DingTalkSettings.model_validate(conf)
        registry = CollectorRegistry()
        clock = [NOW]
        capacity = [True]
        intake = RecordingIntake()
        webhook = DingTalkWebhook(
            NAME,
            settings,
            intake,
            Metrics(registry, process=False),
            clock=lambda: clock[0],
            has_capacity=lambda: capacity[0],
            replay_capacity=replay_capacity,
        )
        app = web.Application()
        app.router.add_post(PATH, webhook.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}{PATH}"
        return Endpoint(url, webhook, intake, registry, clock, capacity, http)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def endpoint(endpoint_factory: EndpointFactory) -> Endpoint:
    """An endpoint with the default test settings (events configured, no allowlist)."""
    return await endpoint_factory()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` every 5 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# -- bot messages: accepted -------------------------------------------------------------------


async def test_webhook_signed_message_accepted_and_offered_once(endpoint: Endpoint) -> None:
    """A correctly signed message gets 200 {"msgtype":"empty"} and is offered exactly once."""
    status, body, _ = await endpoint.post(payload("msgOK==", "hi there"))
    assert (status, body) == (200, {"msgtype": "empty"})
    (message,) = endpoint.intake.offers
    assert message.message_id == "msgOK=="
    assert message.platform == NAME
    assert message.ingress == "webhook"
    assert message.text == "hi there"
    assert message.received_at == NOW
    assert message.reply_to["session_webhook"].startswith("https://oapi.dingtalk.com/")
    assert endpoint.rejections() == {}


async def test_webhook_duplicate_message_still_answered_200(endpoint: Endpoint) -> None:
    """A message the inbox already holds (commit resolves False) is still answered 200."""
    endpoint.intake.new = False
    status, body, _ = await endpoint.post(payload("msgDup=="))
    assert (status, body) == (200, {"msgtype": "empty"})
    assert len(endpoint.intake.offers) == 1


@pytest.mark.parametrize("offset_ms", [-3_600_000, 3_600_000])
async def test_webhook_timestamp_at_window_edge_accepted(
    endpoint: Endpoint, offset_ms: int
) -> None:
    """A timestamp exactly one window old (or ahead) is still accepted."""
    status, _, _ = await endpoint.post(headers=signed(NOW_MS + offset_ms))
    assert status == 200
    assert len(endpoint.intake.offers) == 1


async def test_webhook_body_exactly_at_cap_accepted(endpoint: Endpoint) -> None:
    """A body of exactly ``max_body_bytes`` is accepted (the cap is inclusive)."""
    base = payload()
    base["pad"] = ""
    filler = MAX_BODY - len(json.dumps(base).encode())
    base["pad"] = "x" * filler
    data = json.dumps(base).encode()
    assert len(data) == MAX_BODY
    status, _, _ = await endpoint.post(data)
    assert status == 200
    assert len(endpoint.intake.offers) == 1


async def test_webhook_chunked_body_under_cap_accepted(endpoint: Endpoint) -> None:
    """A body sent without Content-Length (chunked) is read in full and accepted."""
    data = json.dumps(payload("msgChunked==")).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 100):
            yield data[i : i + 100]

    status, _, _ = await endpoint.post(chunks())  # type: ignore[arg-type]
    assert status == 200
    assert [m.message_id for m in endpoint.intake.offers] == ["msgChunked=="]


# -- bot messages: rejected, nothing offered ----------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (signed(secret="wrong-secret"), "bad_signature"),
        ({"timestamp": str(NOW_MS), "sign": signed()["sign"][:-4] + "AAA="}, "bad_signature"),
        ({"timestamp": str(NOW_MS + 1), "sign": signed()["sign"]}, "bad_signature"),
        ({"timestamp": str(NOW_MS)}, "bad_signature"),
        ({"sign": signed()["sign"]}, "bad_signature"),
        ({}, "bad_signature"),
        ({"timestamp": "yesterday", "sign": signed()["sign"]}, "bad_signature"),
        (signed(NOW_MS - 3_600_001), "stale_timestamp"),
        (signed(NOW_MS - 86_400_000), "stale_timestamp"),
        (signed(NOW_MS + 3_600_001), "stale_timestamp"),
    ],
    ids=[
        "wrong-secret",
        "tampered-sign",
        "other-timestamp",
        "missing-sign",
        "missing-timestamp",
        "no-headers",
        "non-numeric-timestamp",
        "just-too-old",
        "day-old",
        "future",
    ],
)
async def test_webhook_bad_or_stale_signature_rejected_401(
    endpoint: Endpoint, headers: dict[str, str], reason: str
) -> None:
    """Bad, missing or stale signatures get 401, nothing is offered, the reason is counted."""
    status, body, _ = await endpoint.post(headers=headers)
    assert status == 401
    assert isinstance(body["error"], str)
    assert endpoint.intake.offers == []
    assert endpoint.rejections() == {reason: 1.0}
    assert endpoint.webhook.replay_entries == 0


async def test_webhook_replayed_request_rejected(endpoint: Endpoint) -> None:
    """The same signed request sent again is refused as a replay; another message signed in
    the same millisecond (same timestamp, same sign: DingTalk's signature covers only the
    timestamp) is a different request and is accepted."""
    headers = signed()
    first, _, _ = await endpoint.post(payload("msg1=="), headers)
    again, body, _ = await endpoint.post(payload("msg1=="), headers)
    same_ms, _, _ = await endpoint.post(payload("msg2=="), headers)
    replayed, _, _ = await endpoint.post(payload("msg2=="), headers)
    assert (first, again, same_ms, replayed) == (200, 401, 200, 401)
    assert body == {"error": "request already received"}
    assert [m.message_id for m in endpoint.intake.offers] == ["msg1==", "msg2=="]
    assert endpoint.rejections() == {"replay": 2.0}


async def test_webhook_replay_check_forgets_pairs_outside_window(
    endpoint_factory: EndpointFactory,
) -> None:
    """Pairs are pruned once their timestamp leaves the window, and bounded in number."""
    ep = await endpoint_factory(replay_capacity=3)
    for i in range(5):
        status, _, _ = await ep.post(payload(f"msg{i}=="), signed(NOW_MS + i))
        assert status == 200
    assert ep.webhook.replay_entries == 3
    ep.clock[0] = NOW + 3600 + 10
    status, _, _ = await ep.post(payload("msgLater=="), signed(int(ep.clock[0] * 1000)))
    assert status == 200
    assert ep.webhook.replay_entries == 1


async def test_webhook_replay_check_bounded_with_released_pairs(
    endpoint_factory: EndpointFactory,
) -> None:
    """Pairs released after a refusal neither count against the bound nor outlive the window."""
    ep = await endpoint_factory(replay_capacity=2)
    ep.capacity[0] = False
    for i in range(6):  # reserved then released: only stale bookkeeping is left behind
        status, _, _ = await ep.post(payload(), signed(NOW_MS + i))
        assert status == 503
    assert ep.webhook.replay_entries == 0
    ep.capacity[0] = True
    for i in range(3):
        status, _, _ = await ep.post(payload(f"msg{i}=="), signed(NOW_MS + 100 + i))
        assert status == 200
    assert ep.webhook.replay_entries == 2
    again, _, _ = await ep.post(payload("msg2=="), signed(NOW_MS + 102))
    assert again == 401  # the newest pair is still held
    ep.capacity[0] = False
    refused, _, _ = await ep.post(payload("msg9=="), signed(NOW_MS + 200))
    assert refused == 503
    ep.capacity[0] = True
    ep.clock[0] = NOW + 3600 + 1
    status, _, _ = await ep.post(payload("msgLate=="), signed(int(ep.clock[0] * 1000)))
    assert status == 200
    assert ep.webhook.replay_entries == 1


async def test_webhook_replay_capacity_must_be_positive() -> None:
    """A replay capacity below one is refused at construction."""
    settings = DingTalkSettings.model_validate(
        {"type": "dingtalk", "app_key": APP_KEY, "app_secret": SECRET}
    )
    with pytest.raises(ValueError, match="at least 1"):
        DingTalkWebhook(
            NAME, settings, RecordingIntake(), Metrics(process=False), replay_capacity=0
        )


async def test_webhook_oversize_body_with_content_length_rejected(endpoint: Endpoint) -> None:
    """A Content-Length above the cap gets 413 before anything is read or verified."""
    big = payload()
    big["pad"] = "x" * (MAX_BODY * 4)
    status, _, _ = await endpoint.post(big)
    unsigned, _, _ = await endpoint.post(big, headers={})
    assert (status, unsigned) == (413, 413)
    assert endpoint.intake.offers == []
    assert endpoint.rejections() == {"too_large": 2.0}


async def test_webhook_oversize_chunked_body_rejected(endpoint: Endpoint) -> None:
    """A chunked body that grows past the cap gets 413 and nothing is offered."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b" " * 256

    status, _, _ = await endpoint.post(chunks())  # type: ignore[arg-type]
    assert status == 413
    assert endpoint.intake.offers == []
    assert endpoint.rejections() == {"too_large": 1.0}
    # The pair was released: the same headers may be retried with a smaller body.
    status, _, _ = await endpoint.post(payload(), signed())
    assert status == 200


@pytest.mark.parametrize(
    "body",
    [b"not json", b"", b"\xff\xfe{", b"[1, 2, 3]", b'"text"', b"null", b"[" * 1000],
    ids=["text", "empty", "bad-utf8", "array", "string", "null", "unclosed"],
)
async def test_webhook_non_json_body_rejected_400(endpoint: Endpoint, body: bytes) -> None:
    """A body that is not a JSON object gets 400 and nothing is offered."""
    status, resp, _ = await endpoint.post(body)
    assert status == 400
    assert resp == {"error": "body is not a json object"}
    assert endpoint.intake.offers == []
    assert endpoint.rejections() == {"bad_json": 1.0}


async def test_webhook_deeply_nested_json_rejected_400(endpoint_factory: EndpointFactory) -> None:
    """JSON nested beyond the parser's recursion limit is a 400, not a crashed handler."""
    ep = await endpoint_factory(max_body_bytes=200_000)
    status, _, _ = await ep.post(b"[" * 90_000 + b"]" * 90_000)
    assert status == 400
    assert ep.rejections() == {"bad_json": 1.0}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p.pop("msgId"),
        lambda p: p.update(conversationType="3"),
        lambda p: p.update(msgId=42),
        lambda p: (p.pop("senderStaffId"), p.pop("senderId")),
    ],
    ids=["no-msgId", "bad-conversation-type", "msgId-not-string", "no-sender"],
)
async def test_webhook_bad_payload_rejected_400(
    endpoint: Endpoint, mutate: Callable[[dict[str, Any]], object]
) -> None:
    """A JSON object that is not a usable bot message gets 400 and nothing is offered."""
    body = payload()
    mutate(body)
    status, resp, _ = await endpoint.post(body)
    assert status == 400
    assert "payload" in resp["error"]
    assert endpoint.intake.offers == []
    assert endpoint.rejections() == {"bad_payload": 1.0}


async def test_webhook_forbidden_ip_rejected_403(endpoint_factory: EndpointFactory) -> None:
    """A peer outside ``allow_cidrs`` gets 403 even with a valid signature; nothing offered."""
    ep = await endpoint_factory(allow_cidrs=["10.0.0.0/8", "fd00::/8"])
    status, body, _ = await ep.post()
    assert (status, body) == (403, {"error": "address not allowed"})
    assert ep.intake.offers == []
    assert ep.rejections() == {"forbidden_ip": 1.0}


async def test_webhook_allowed_ip_accepted(endpoint_factory: EndpointFactory) -> None:
    """A peer inside ``allow_cidrs`` is served normally."""
    ep = await endpoint_factory(allow_cidrs=["10.0.0.0/8", "127.0.0.1/32"])
    status, _, _ = await ep.post()
    assert status == 200
    assert len(ep.intake.offers) == 1


@pytest.mark.parametrize(
    ("remote", "allowed"),
    [
        ("127.0.0.1", True),
        ("::ffff:127.0.0.1", True),
        ("10.1.2.3", False),
        ("::1", False),
        (None, False),
        ("", False),
        ("not-an-ip", False),
    ],
)
async def test_webhook_allowlist_matches_peer_address(
    endpoint_factory: EndpointFactory, remote: str | None, allowed: bool
) -> None:
    """IPv4-mapped IPv6 peers match IPv4 networks; unknown or unparsable peers are refused."""
    ep = await endpoint_factory(allow_cidrs=["127.0.0.0/8"])
    assert ep.webhook._allowed(remote) is allowed


async def test_webhook_overloaded_answers_503_without_waiting(endpoint: Endpoint) -> None:
    """At capacity the answer is 503 with Retry-After at once; the message is not offered."""
    endpoint.capacity[0] = False
    headers = signed()
    status, _, resp_headers = await endpoint.post(payload(), headers)
    assert status == 503
    assert resp_headers["Retry-After"] == "1"
    assert endpoint.intake.offers == []
    assert endpoint.rejections() == {"overloaded": 1.0}
    endpoint.capacity[0] = True
    status, _, _ = await endpoint.post(payload(), headers)  # DingTalk's retry is not a replay
    assert status == 200
    assert len(endpoint.intake.offers) == 1


async def test_webhook_store_failure_answers_500(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed inbox commit is a 500 (not stored, so DingTalk may retry the same request)."""
    endpoint.intake.error = StoreError("disk full")
    headers = signed()
    status, body, _ = await endpoint.post(payload("msgStore=="), headers)
    assert (status, body) == (500, {"error": "could not store the message"})
    assert endpoint.rejections() == {"store_error": 1.0}
    assert "inbox commit failed" in caplog.text
    endpoint.intake.error = None
    status, _, _ = await endpoint.post(payload("msgStore=="), headers)
    assert status == 200


async def test_webhook_intake_closing_answers_503(endpoint: Endpoint) -> None:
    """A commit cancelled by a closing intake is a retryable 503, not a crashed handler."""
    endpoint.intake.cancel = True
    status, _, resp_headers = await endpoint.post()
    assert status == 503
    assert resp_headers["Retry-After"] == "1"
    assert endpoint.rejections() == {"overloaded": 1.0}


async def test_webhook_handler_cancelled_during_commit_releases_pair(endpoint: Endpoint) -> None:
    """A handler cancelled while waiting for the commit propagates it and forgets the pair."""
    endpoint.intake.hang = True
    request = asyncio.ensure_future(endpoint.post())
    await wait_until(lambda: endpoint.intake.task is not None)
    assert endpoint.webhook.replay_entries == 1
    assert endpoint.intake.task is not None
    endpoint.intake.task.cancel()
    await wait_until(lambda: endpoint.webhook.replay_entries == 0)
    with contextlib.suppress(aiohttp.ClientError):
        await request
    assert endpoint.rejections() == {}


async def test_webhook_logs_hide_secret_sign_and_text(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Accepted and rejected requests log neither the secret, the sign nor the message text."""
    caplog.set_level(logging.DEBUG, logger="imrelay")
    headers = signed()
    text = "secret-plan-text"
    await endpoint.post(payload("msgLog==", text), headers)
    await endpoint.post(payload("msgLog==", text), headers)
    await endpoint.post(payload("msgLog2==", text), signed(secret="bad"))
    bad = payload(text=text)
    del bad["msgId"]
    await endpoint.post(bad, signed(NOW_MS + 1))
    assert len(caplog.records) >= 4
    for forbidden in (SECRET, headers["sign"], text):
        assert forbidden not in caplog.text


async def test_webhook_rejection_warnings_rate_limited(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Repeated rejections for one reason log one WARNING, the rest at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="imrelay")
    for _ in range(3):
        await endpoint.post(headers={})
    levels = [r.levelno for r in caplog.records if "bad_signature" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


# -- encrypted event callbacks --------------------------------------------------------------------


async def test_webhook_event_check_url_handshake(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """The URL check is answered with an encrypted, correctly signed ``success``."""
    caplog.set_level(logging.INFO, logger="imrelay")
    result = await send_event(
        endpoint.url, "check_url", {}, TOKEN, AES_KEY, owner_key=APP_KEY, http=endpoint.http
    )
    assert result.status == 200
    assert result.reply == "success"
    assert set(result.body) == {"msg_signature", "timeStamp", "nonce", "encrypt"}
    assert result.body["timeStamp"] == str(NOW_MS)
    assert endpoint.intake.offers == []
    assert "url check" in caplog.text


async def test_webhook_event_other_type_acknowledged_not_processed(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Another event is answered with ``success`` and logged by type only."""
    caplog.set_level(logging.DEBUG, logger="imrelay")
    result = await send_event(
        endpoint.url,
        "user_add_org",
        {"UserId": ["private-user-42"], "CorpId": "dingcorp"},
        TOKEN,
        AES_KEY,
        owner_key=APP_KEY,
        http=endpoint.http,
    )
    assert (result.status, result.reply) == (200, "success")
    assert "user_add_org" in caplog.text
    assert "private-user-42" not in caplog.text
    assert endpoint.intake.offers == []


@pytest.mark.parametrize(
    ("token", "owner", "reason"),
    [("654321", APP_KEY, "bad_signature"), (TOKEN, "dingotherapp", "bad_signature")],
    ids=["wrong-token", "wrong-owner"],
)
async def test_webhook_event_bad_signature_or_owner_rejected_401(
    endpoint: Endpoint, token: str, owner: str, reason: str
) -> None:
    """An event signed with another token or encrypted for another app gets 401."""
    result = await send_event(
        endpoint.url, "check_url", {}, token, AES_KEY, owner_key=owner, http=endpoint.http
    )
    assert result.status == 401
    assert result.reply is None
    assert endpoint.rejections() == {reason: 1.0}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "bad_json"),
        (json.dumps({"other": 1}).encode(), "bad_payload"),
        (json.dumps({"encrypt": 5}).encode(), "bad_payload"),
    ],
)
async def test_webhook_event_malformed_body_rejected_400(
    endpoint: Endpoint, body: bytes, reason: str
) -> None:
    """An event body that is not ``{"encrypt": "…"}`` gets 400."""
    url = f"{endpoint.url}?msg_signature=abc&timestamp=1&nonce=n"
    async with endpoint.http.post(url, data=body) as resp:
        assert resp.status == 400
    assert endpoint.rejections() == {reason: 1.0}


async def test_webhook_event_oversize_chunked_body_rejected_413(endpoint: Endpoint) -> None:
    """An event body without Content-Length that grows past the cap gets 413."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b" " * 256

    url = f"{endpoint.url}?msg_signature=abc&timestamp=1&nonce=n"
    async with endpoint.http.post(url, data=chunks()) as resp:
        assert resp.status == 413
    assert endpoint.rejections() == {"too_large": 1.0}


async def test_webhook_event_bad_ciphertext_rejected_400(endpoint: Endpoint) -> None:
    """A correctly signed ``encrypt`` that does not decrypt gets 400."""
    from imrelay.platforms.dingtalk.crypto import DingTalkCallbackCrypto

    crypto = DingTalkCallbackCrypto(TOKEN, AES_KEY, APP_KEY)
    encrypt = "QUJD"  # valid base64, not whole AES blocks
    sig = crypto.signature("1", "n", encrypt)
    url = f"{endpoint.url}?msg_signature={sig}&timestamp=1&nonce=n"
    async with endpoint.http.post(url, json={"encrypt": encrypt}) as resp:
        assert resp.status == 400
    assert endpoint.rejections() == {"bad_payload": 1.0}


async def test_webhook_event_without_configured_keys_rejected_404(
    endpoint_factory: EndpointFactory,
) -> None:
    """Without ``aes_key`` and ``token`` an event callback is refused with a clear error."""
    ep = await endpoint_factory(aes_key=None, token=None)
    result = await send_event(
        ep.url, "check_url", {}, TOKEN, AES_KEY, owner_key=APP_KEY, http=ep.http
    )
    assert result.status == 404
    assert "aes_key and token" in result.body["error"]
    assert ep.rejections() == {"not_configured": 1.0}


# -- the simulator's sender ---------------------------------------------------------------------


@pytest.fixture
async def flaky(
    endpoint: Endpoint,
) -> AsyncIterator[tuple[str, list[int], list[dict[str, str]]]]:
    """A server answering a scripted list of statuses, then forwarding to ``endpoint``."""
    script: list[int] = []
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append({k: request.headers.get(k, "") for k in ("timestamp", "sign")})
        if script:
            return web.json_response({"error": "scripted"}, status=script.pop(0))
        body = await request.read()
        async with endpoint.http.post(endpoint.url, data=body, headers=seen[-1]) as resp:
            return web.json_response(await resp.json(), status=resp.status)

    app = web.Application()
    app.router.add_post(PATH, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}{PATH}", script, seen
    finally:
        await runner.cleanup()


def test_sim_webhook_headers_match_gateway_signature() -> None:
    """The simulator's independent signing agrees with the gateway's test vector."""
    headers = webhook_headers("test-app-secret", 1_700_000_000_000)
    assert headers == {
        "timestamp": "1700000000000",
        "sign": "dhJB8TJ0cHPEbwpUauugV2Wz8v4qlWoO+C42nEhJW+c=",
    }


async def test_sim_webhook_sender_delivers_signed_payload(endpoint: Endpoint) -> None:
    """One signed POST is accepted by the gateway endpoint."""
    sender = DingTalkWebhookSender(SECRET, clock=lambda: NOW)
    try:
        result = await sender.deliver(endpoint.url, json.dumps(payload("msgSim==")))
    finally:
        await sender.aclose()
    assert (result.status, result.attempts) == (200, 1)
    assert json.loads(result.body) == {"msgtype": "empty"}
    assert [m.message_id for m in endpoint.intake.offers] == ["msgSim=="]
    assert sender.state() == {"posts": 1, "retries": 0, "failures": 0}


async def test_sim_webhook_sender_retries_5xx_then_succeeds(
    endpoint: Endpoint, flaky: tuple[str, list[int], list[dict[str, str]]]
) -> None:
    """503 and 500 answers are retried with a fresh signature until the gateway accepts."""
    url, script, seen = flaky
    script.extend([503, 500])
    ticks = iter(range(10))
    sender = DingTalkWebhookSender(
        SECRET, clock=lambda: NOW + next(ticks) / 1000, retry_delays=(0.001, 0.001, 0.001)
    )
    try:
        result = await sender.deliver(url, json.dumps(payload("msgRetry==")))
    finally:
        await sender.aclose()
    assert (result.status, result.attempts) == (200, 3)
    assert len({h["timestamp"] for h in seen}) == 3
    assert len(endpoint.intake.offers) == 1
    assert sender.state() == {"posts": 3, "retries": 2, "failures": 0}


async def test_sim_webhook_sender_bounded_retries_and_no_retry_on_4xx(
    flaky: tuple[str, list[int], list[dict[str, str]]],
) -> None:
    """Persistent 5xx stops after the configured retries; a 401 is final at once."""
    url, script, _ = flaky
    sender = DingTalkWebhookSender(SECRET, clock=lambda: NOW, retry_delays=(0.001, 0.001))
    try:
        script.extend([500] * 5)
        failed = await sender.deliver(url, "{}")
        script.clear()
        script.append(401)
        refused = await sender.deliver(url, "{}")
    finally:
        await sender.aclose()
    assert (failed.status, failed.attempts) == (500, 3)
    assert (refused.status, refused.attempts) == (401, 1)
    assert sender.state() == {"posts": 4, "retries": 2, "failures": 2}


async def test_sim_webhook_sender_unreachable_gives_status_zero() -> None:
    """A URL nobody listens on ends with status 0 after the bounded retries."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    sender = DingTalkWebhookSender(SECRET, retry_delays=(0.001,), timeout_s=2.0)
    try:
        result = await sender.deliver(f"http://127.0.0.1:{port}{PATH}", "{}")
    finally:
        await sender.aclose()
    assert (result.status, result.attempts, result.body) == (0, 2, b"")


async def test_sim_webhook_sender_rejects_negative_delays() -> None:
    """Negative retry delays are refused at construction."""
    with pytest.raises(ValueError, match="negative"):
        DingTalkWebhookSender(SECRET, retry_delays=(-1.0,))


async def test_sim_send_message_posts_to_webhook_url(endpoint: Endpoint) -> None:
    """With ``webhook_url`` the simulator POSTs the §1.7 payload instead of pushing a frame."""
    endpoint.clock[0] = time.time()
    sim = DingTalkSimulator(
        app_key=APP_KEY, app_secret=SECRET, webhook_url=endpoint.url, extensions=[]
    )
    async with sim:
        ids = await sim.send_message("hello over http", sender_id="alice")
        assert sim.webhook_results[ids["msg_id"]] == 200
        (message,) = endpoint.intake.offers
        assert message.message_id == ids["msg_id"]
        assert message.text == "hello over http"
        assert message.ingress == "webhook"
        assert message.reply_to["session_webhook"].startswith(sim.base_url + "/robot/")
        assert sim.pending_count() == 0
        async with endpoint.http.post(
            f"{sim.base_url}/_sim/messages", json={"text": "from the page"}
        ) as resp:
            page_ids = await resp.json()
        assert sim.webhook_results[page_ids["msg_id"]] == 200
        state = sim.state()["webhook"]
        assert state == {"url": endpoint.url, "posts": 2, "retries": 0, "failures": 0}
    assert [m.text for m in endpoint.intake.offers] == ["hello over http", "from the page"]


async def test_sim_webhook_url_records_rejections_and_can_be_set_later(
    endpoint: Endpoint,
) -> None:
    """A message signed with the wrong secret is recorded as 401; the URL can be set later."""
    endpoint.clock[0] = time.time()
    sim = DingTalkSimulator(app_key=APP_KEY, app_secret="not-the-secret", extensions=[])
    async with sim:
        assert sim.webhook_url is None
        sim.webhook_url = endpoint.url
        ids = await sim.send_message("refused")
        assert sim.webhook_results[ids["msg_id"]] == 401
        assert sim.state()["webhook"]["failures"] == 1
    assert endpoint.intake.offers == []
    assert endpoint.rejections() == {"bad_signature": 1.0}


async def test_sim_send_event_reports_unreadable_replies(http: aiohttp.ClientSession) -> None:
    """A reply that is not JSON, or not a well-signed encrypted reply, gives ``reply=None``."""
    answers: list[web.Response] = [
        web.Response(text="plain text"),
        web.json_response({"msg_signature": "x", "timeStamp": "1", "nonce": "n", "encrypt": "y"}),
    ]

    async def handle(request: web.Request) -> web.Response:
        return answers.pop(0)

    app = web.Application()
    app.router.add_post(PATH, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}{PATH}"
    try:
        text = await send_event(url, "check_url", {}, TOKEN, AES_KEY, owner_key=APP_KEY)
        forged = await send_event(url, "check_url", {}, TOKEN, AES_KEY, owner_key=APP_KEY)
    finally:
        await runner.cleanup()
    assert (text.status, text.body, text.reply) == (200, None, None)
    assert (forged.status, forged.reply) == (200, None)
    assert forged.body["encrypt"] == "y"


async def test_sim_webhook_sender_repr_and_idle_close() -> None:
    """The sender's repr hides the secret, and closing an unused sender is harmless."""
    sender = DingTalkWebhookSender(SECRET)
    assert SECRET not in repr(sender)
    await sender.aclose()
    assert sender.state() == {"posts": 0, "retries": 0, "failures": 0}
