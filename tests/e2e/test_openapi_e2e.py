"""The gateway end to end with OpenAPI sends: expired sessions, throttling, token loss.

Each test runs its own :class:`DingTalkSimulator` with :class:`OpenAPIExtension` installed
explicitly, so it does not depend on which extensions the simulator ships by default. Replies
sent through the OpenAPI name no message, only a conversation, so a reply is matched to its
message by the unique text the echo model sends back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from _support import gateway_settings, wait_for
from imrelay.app import Gateway
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.dingtalk_openapi import OpenAPIExtension
from imrelay.sim.model import ModelSimulator

Start = Callable[..., Awaitable[tuple[DingTalkSimulator, OpenAPIExtension, Gateway]]]


def reply_text(reply: dict[str, Any]) -> str:
    """The visible text of a recorded reply, whichever channel carried it."""
    body = reply["body"]
    if body["msgtype"] == "markdown":
        return str(body["markdown"]["text"])
    return str(body["text"]["content"])


def replies_with(sim: DingTalkSimulator, token: str) -> list[dict[str, Any]]:
    """Every recorded reply whose text carries ``token``."""
    return [r for r in sim.replies() if token in reply_text(r)]


def all_answered_once(sim: DingTalkSimulator, tokens: list[str]) -> bool:
    return all(len(replies_with(sim, t)) >= 1 for t in tokens)


def throttled(gateway: Gateway, scope: str) -> float:
    value = gateway.metrics.registry.get_sample_value(
        "imrelay_platform_throttled_total", {"platform": "dingtalk", "scope": scope}
    )
    return value or 0.0


@pytest.fixture
async def start(model_sim: ModelSimulator, tmp_path: Path) -> AsyncIterator[Start]:
    """Start a simulator with the OpenAPI extension and a gateway wired to it."""
    running: list[tuple[DingTalkSimulator, Gateway]] = []

    async def make(
        clock: Callable[[], float] = time.time, **overrides: Any
    ) -> tuple[DingTalkSimulator, OpenAPIExtension, Gateway]:
        ext = OpenAPIExtension()
        sim = DingTalkSimulator(ping_interval_s=5.0, clock=clock, extensions=[ext])
        await sim.start()
        settings = gateway_settings(
            sim, model_sim, tmp_path / f"openapi{len(running)}.db", **overrides
        )
        gateway = Gateway(settings, registry=CollectorRegistry())
        await gateway.start()
        running.append((sim, gateway))
        await wait_for(lambda: sim.active_connections() == 1, what="stream connection")
        return sim, ext, gateway

    try:
        yield make
    finally:
        for sim, gateway in reversed(running):
            await gateway.stop()
            await sim.aclose()


async def test_openapi_expired_sessions_replies_arrive_via_openapi(
    start: Start, model_sim: ModelSimulator
) -> None:
    """Sessions expiring while the model works: every reply arrives via the OpenAPI, once."""
    sim, ext, _ = await start()
    model_sim.set_behaviour(latency_ms=1000)
    tokens = [f"exp-{i:02d}-end" for i in range(8)]
    for i, token in enumerate(tokens):
        if i % 4 == 3:
            await sim.send_message(
                token, conversation_type="2", conversation_id=f"cidExpGroup{i}", sender_id="bob"
            )
        else:
            await sim.send_message(token, sender_id=f"exp-user-{i}")
    await wait_for(lambda: len(model_sim.requests) == len(tokens), what="model calls")
    await sim.fault({"expire_sessions": True})
    await wait_for(lambda: all_answered_once(sim, tokens), timeout=20, what="replies")
    await asyncio.sleep(0.05)
    for token in tokens:
        (reply,) = replies_with(sim, token)
        assert reply["body"]["via"] == "openapi"
    assert ext.direct_sends == 6
    assert ext.group_sends == 2
    model_sim.set_behaviour(latency_ms=None)
    await sim.send_message("fresh-after-expiry", sender_id="exp-user-0")
    await wait_for(lambda: bool(replies_with(sim, "fresh-after-expiry")), what="fresh reply")
    (fresh,) = replies_with(sim, "fresh-after-expiry")
    assert "via" not in fresh["body"]  # a new message's sessionWebhook works again


async def test_openapi_expired_webhook_falls_back_without_a_try(start: Start) -> None:
    """A message whose sessionWebhook is already expired is answered through the OpenAPI."""
    # The simulator's clock runs two hours behind: its sessions expire 90 minutes after
    # createAt, so by the gateway's clock every sessionWebhook is already past its expiry.
    sim, ext, _ = await start(clock=lambda: time.time() - 7200)
    await sim.send_message("too-late-for-webhook", sender_id="alice")
    await wait_for(lambda: bool(replies_with(sim, "too-late-for-webhook")), what="reply")
    (reply,) = replies_with(sim, "too-late-for-webhook")
    assert reply["body"]["via"] == "openapi"
    assert reply["conversation_id"] == sim.direct_conversation_id("alice")
    assert ext.direct_sends == 1


async def test_openapi_throttle_loses_and_doubles_nothing(start: Start) -> None:
    """Under throttle qps=2, thirty messages are all answered exactly once, in order."""
    sim, ext, gateway = await start()
    await sim.fault({"throttle": {"qps": 2}})
    tokens = [f"thr-{i:02d}-end" for i in range(30)]
    groups: dict[str, list[str]] = {}
    for i, token in enumerate(tokens):
        if i % 5 == 0:
            cid = f"cidThrGroup{i % 2}"
            groups.setdefault(cid, []).append(token)
            await sim.send_message(token, conversation_type="2", conversation_id=cid)
        else:
            await sim.send_message(token, sender_id=f"thr-user-{i}")
    await wait_for(lambda: all_answered_once(sim, tokens), timeout=45, what="30 replies")
    await asyncio.sleep(0.05)
    for token in tokens:
        assert len(replies_with(sim, token)) == 1, token
    for cid, sent in groups.items():
        got = [reply_text(r) for r in sim.replies() if r["conversation_id"] == cid]
        assert [next(t for t in sent if t in g) for g in got] == sent
    assert ext.throttled > 0
    assert throttled(gateway, "platform") > 0
    sent_ok = gateway.metrics.registry.get_sample_value(
        "imrelay_replies_total", {"platform": "dingtalk", "outcome": "sent"}
    )
    assert sent_ok == 30
    failed = gateway.metrics.registry.get_sample_value(
        "imrelay_replies_total", {"platform": "dingtalk", "outcome": "failed"}
    )
    assert not failed


async def test_openapi_token_invalid_mid_run_still_answers(start: Start) -> None:
    """The access token revoked mid-run: one refusal, one refresh, every message answered."""
    sim, ext, _ = await start(platforms__dingtalk__reply__openapi_after_s=0)
    first = [f"tok-a{i}-end" for i in range(5)]
    for i, token in enumerate(first):
        await sim.send_message(token, sender_id=f"tok-user-{i}")
    await wait_for(lambda: all_answered_once(sim, first), what="first replies")
    await sim.fault({"token_invalid": True})
    second = [f"tok-b{i}-end" for i in range(5)]
    for i, token in enumerate(second):
        await sim.send_message(token, sender_id=f"tok-user-{i}")
    await wait_for(lambda: all_answered_once(sim, second), what="second replies")
    await asyncio.sleep(0.05)
    for token in first + second:
        (reply,) = replies_with(sim, token)
        assert reply["body"]["via"] == "openapi"
    state = sim.state()["openapi"]
    assert state["tokens_invalidated"] == 1
    assert 1 <= state["token_rejections"] <= 5
    assert ext.direct_sends == 10
