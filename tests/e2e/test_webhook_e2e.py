"""The gateway end to end in HTTP mode: simulator POSTs signed messages → inbox → model → reply.

The gateway runs with ``platforms.dingtalk.mode: webhook`` and serves
``POST /webhooks/dingtalk`` on its one HTTP port; the simulator, given that URL, signs and POSTs
each bot message instead of pushing it on a WebSocket, and records the answer's status.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from _support import GatewayFactory, wait_for
from imrelay.app import Gateway
from imrelay.platforms.dingtalk.crypto import sign_webhook
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.dingtalk_webhook import send_event
from imrelay.sim.model import ModelSimulator
from imrelay.stores.base import MessageState

AES_KEY = "1234567890123456789012345678901234567890123"
TOKEN = "123456"


async def start_webhook_gateway(
    factory: GatewayFactory, sim: DingTalkSimulator, **overrides: Any
) -> tuple[Gateway, str]:
    """Start a gateway in webhook mode and point the simulator at its endpoint."""
    gateway = await factory(platforms__dingtalk__mode="webhook", **overrides)
    url = f"http://127.0.0.1:{gateway.port}/webhooks/dingtalk"
    sim.webhook_url = url
    return gateway, url


def reply_text(reply: dict[str, Any]) -> str:
    """The visible text of a recorded sessionWebhook reply."""
    body = reply["body"]
    if body["msgtype"] == "markdown":
        return str(body["markdown"]["text"])
    return str(body["text"]["content"])


def rejected(gateway: Gateway, reason: str) -> float:
    """``imrelay_messages_rejected_total`` for ``reason`` on the DingTalk platform."""
    value = gateway.metrics.registry.get_sample_value(
        "imrelay_messages_rejected_total", {"platform": "dingtalk", "reason": reason}
    )
    return value or 0.0


async def test_webhook_message_answered_once_via_session_webhook(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """A signed POST is stored before its 200, then answered once through the sessionWebhook."""
    gateway, _ = await start_webhook_gateway(gateway_factory, dingtalk_sim)
    ids = await dingtalk_sim.send_message("hello over http", conversation_type="1")
    assert dingtalk_sim.webhook_results[ids["msg_id"]] == 200
    assert await gateway.store.get("dingtalk", ids["msg_id"]) is not None
    await wait_for(lambda: len(dingtalk_sim.replies(ids["msg_id"])) >= 1, what="the reply")
    (reply,) = dingtalk_sim.replies(ids["msg_id"])
    assert "echo: hello over http" in reply_text(reply)
    assert len(model_sim.requests) == 1
    assert dingtalk_sim.active_connections() == 0  # no Stream connection in webhook mode
    assert dingtalk_sim.open_calls == []

    async def replied() -> bool:
        record = await gateway.store.get("dingtalk", ids["msg_id"])
        return record is not None and record.state is MessageState.REPLIED

    await wait_for(replied, what="replied state")


async def test_webhook_answers_before_the_model(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """The 200 comes back while the model is still thinking; the reply follows later."""
    model_sim.set_behaviour(latency_ms=1500)
    await start_webhook_gateway(gateway_factory, dingtalk_sim)
    started = time.monotonic()
    ids = await dingtalk_sim.send_message("slow question")
    answered_in = time.monotonic() - started
    assert dingtalk_sim.webhook_results[ids["msg_id"]] == 200
    assert answered_in < 1.0
    assert dingtalk_sim.replies(ids["msg_id"]) == []
    await wait_for(lambda: len(dingtalk_sim.replies(ids["msg_id"])) == 1, what="the late reply")


async def test_webhook_redelivered_message_answered_once(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """The same msgId POSTed twice (each newly signed) is accepted twice and answered once."""
    gateway, _ = await start_webhook_gateway(gateway_factory, dingtalk_sim)
    first = await dingtalk_sim.send_message("only once", msg_id="msgWebhookDup")
    await wait_for(lambda: len(dingtalk_sim.replies("msgWebhookDup")) == 1, what="first reply")
    second = await dingtalk_sim.send_message("only once", msg_id="msgWebhookDup")
    assert first["msg_id"] == second["msg_id"]
    assert dingtalk_sim.webhook_results["msgWebhookDup"] == 200
    # The duplicate is recognised at the inbox commit, which the 200 waited for.
    duplicates = gateway.metrics.registry.get_sample_value(
        "imrelay_messages_duplicate_total", {"platform": "dingtalk"}
    )
    assert duplicates == 1
    assert len(dingtalk_sim.replies("msgWebhookDup")) == 1
    assert len(model_sim.requests) == 1


async def test_webhook_rejections_store_nothing(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """Bad sign, old timestamp, replay, oversize and non-JSON are refused and nothing is stored."""
    gateway, url = await start_webhook_gateway(
        gateway_factory, dingtalk_sim, platforms__dingtalk__max_body_bytes=4096
    )
    secret = dingtalk_sim.app_secret
    now_ms = int(time.time() * 1000)
    body = {
        "msgId": "msgRejected",
        "conversationId": "cidRejected",
        "conversationType": "1",
        "senderStaffId": "mallory",
        "msgtype": "text",
        "text": {"content": "let me in"},
    }
    good = {"timestamp": str(now_ms), "sign": sign_webhook(secret, now_ms)}
    old_ms = now_ms - 2 * 3600 * 1000
    cases = [
        ({"timestamp": str(now_ms), "sign": sign_webhook("wrong", now_ms)}, body, 401),
        ({"timestamp": str(old_ms), "sign": sign_webhook(secret, old_ms)}, body, 401),
        ({}, body, 401),
        (good, b"not json", 400),
        (good, {**body, "pad": "x" * 8192}, 413),
    ]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for headers, data, expected in cases:
            raw = json.dumps(data).encode() if isinstance(data, dict) else data
            async with http.post(url, data=raw, headers=headers) as resp:
                assert resp.status == expected, (headers, expected)
        # Accepted once, then the very same request again is a replay.
        replay_ms = now_ms + 1
        replay = {"timestamp": str(replay_ms), "sign": sign_webhook(secret, replay_ms)}
        ok = {**body, "msgId": "msgOnce"}
        statuses = []
        for _ in range(2):
            async with http.post(url, data=json.dumps(ok).encode(), headers=replay) as resp:
                statuses.append(resp.status)
        assert statuses == [200, 401]
    assert await gateway.store.get("dingtalk", "msgRejected") is None
    assert rejected(gateway, "bad_signature") == 2
    assert rejected(gateway, "stale_timestamp") == 1
    assert rejected(gateway, "bad_json") == 1
    assert rejected(gateway, "too_large") == 1
    assert rejected(gateway, "replay") == 1
    assert await gateway.store.get("dingtalk", "msgOnce") is not None


async def test_webhook_event_url_check_through_gateway(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator
) -> None:
    """With aes_key and token configured, the encrypted URL check is answered with ``success``."""
    _, url = await start_webhook_gateway(
        gateway_factory,
        dingtalk_sim,
        platforms__dingtalk__aes_key=AES_KEY,
        platforms__dingtalk__token=TOKEN,
    )
    result = await send_event(url, "check_url", {}, TOKEN, AES_KEY, owner_key=dingtalk_sim.app_key)
    assert (result.status, result.reply) == (200, "success")


async def test_webhook_gateway_is_ready_without_stream(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator
) -> None:
    """In webhook mode /readyz does not wait for a Stream connection."""
    gateway, _ = await start_webhook_gateway(gateway_factory, dingtalk_sim)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{gateway.port}/readyz") as resp,
    ):
        assert resp.status == 200, await resp.text()
