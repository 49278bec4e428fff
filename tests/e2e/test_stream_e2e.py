"""The gateway end to end: DingTalk simulator → Stream → inbox → pipeline → model → reply."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from _support import GatewayFactory, gateway_settings, wait_for
from imrelay.app import Gateway
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator
from imrelay.stores.base import MessageState


def reply_text(reply: dict[str, object]) -> str:
    """The visible text of a recorded sessionWebhook reply."""
    body = reply["body"]
    assert isinstance(body, dict)
    if body["msgtype"] == "markdown":
        return str(body["markdown"]["text"])
    return str(body["text"]["content"])


async def replies_for(sim: DingTalkSimulator, msg_id: str, count: int = 1) -> list[dict]:
    """Wait until ``count`` replies to ``msg_id`` arrived; return them."""
    await wait_for(lambda: len(sim.replies(msg_id)) >= count, what=f"{count} replies")
    return sim.replies(msg_id)


async def test_direct_text_gets_model_answer(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """A 1:1 text message is ACKed, sent to the model, and answered once."""
    ids = await dingtalk_sim.send_message("hello bot", conversation_type="1")
    (reply,) = await replies_for(dingtalk_sim, ids["msg_id"])
    assert "echo: hello bot (turns: 1)" in reply_text(reply)
    assert dingtalk_sim.acks[ids["message_id"]]["code"] == 200
    assert len(model_sim.requests) == 1
    assert list(model_sim.timings) == [ids["msg_id"]]  # sent as x-request-id: the trace id
    record = await gateway.store.get("dingtalk", ids["msg_id"])
    assert record is not None
    await wait_for(
        lambda: _state(gateway, ids["msg_id"], MessageState.REPLIED), what="replied state"
    )


async def _state(gateway: Gateway, msg_id: str, state: MessageState) -> bool:
    record = await gateway.store.get("dingtalk", msg_id)
    return record is not None and record.state is state


async def test_group_message_mentions_sender_only_when_bot_is_mentioned(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """In a group, an @bot message is answered with an @sender; a message without @bot is not."""
    quiet = await dingtalk_sim.send_message(
        "just chatting", conversation_type="2", conversation_id="cidGroupA", at_bot=False,
        sender_id="staff-7",
    )  # fmt: skip
    asked = await dingtalk_sim.send_message(
        "what is 2+2?", conversation_type="2", conversation_id="cidGroupA", at_bot=True,
        sender_id="staff-7",
    )  # fmt: skip
    (reply,) = await replies_for(dingtalk_sim, asked["msg_id"])
    assert "echo: what is 2+2?" in reply_text(reply)
    assert reply["body"]["at"]["atUserIds"] == ["staff-7"]
    assert "@staff-7" in reply_text(reply)
    await wait_for(lambda: _state(gateway, quiet["msg_id"], MessageState.DROPPED))
    assert dingtalk_sim.replies(quiet["msg_id"]) == []
    assert len(model_sim.requests) == 1
    assert dingtalk_sim.acks[quiet["message_id"]]["code"] == 200


async def test_picture_gets_notice_without_model_call(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """A picture gets the configured polite notice and never reaches the text model."""
    ids = await dingtalk_sim.send_message(msgtype="picture")
    (reply,) = await replies_for(dingtalk_sim, ids["msg_id"])
    assert reply_text(reply) == gateway.settings.pipeline.unsupported_notice
    assert model_sim.requests == []


async def test_redelivered_message_is_answered_once(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """The same message delivered twice (same msgId, new or same frame id) gets one reply."""
    ids = await dingtalk_sim.send_message("only once", msg_id="msgDup1", message_id="frame-1")
    await replies_for(dingtalk_sim, ids["msg_id"])
    await dingtalk_sim.send_message("only once", msg_id="msgDup1", message_id="frame-2")
    await dingtalk_sim.send_message("only once", msg_id="msgDup1", message_id="frame-1")
    await wait_for(lambda: "frame-2" in dingtalk_sim.acks, what="ack of the redelivery")
    await wait_for(lambda: len(model_sim.requests) >= 1)
    await asyncio.sleep(0.05)
    assert len(dingtalk_sim.replies("msgDup1")) == 1
    assert len(model_sim.requests) == 1


async def test_twenty_conversations_each_answered_in_order(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """Twenty conversations at once, five messages each: every reply comes, in order."""
    model_sim.set_behaviour(latency_ms=20)
    sent: dict[str, list[str]] = {}
    for round_ in range(5):
        for conv in range(20):
            cid = f"cidConv{conv}"
            ids = await dingtalk_sim.send_message(
                f"c{conv} m{round_}", conversation_id=cid, sender_id=f"user{conv}"
            )
            sent.setdefault(cid, []).append(ids["msg_id"])
    await wait_for(lambda: len(dingtalk_sim.replies()) >= 100, timeout=20, what="100 replies")
    for cid, msg_ids in sent.items():
        order = [r["msg_id"] for r in dingtalk_sim.replies() if r["conversation_id"] == cid]
        assert order == msg_ids, cid
    assert len(dingtalk_sim.replies()) == 100


async def test_context_is_kept_and_reset(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """The model sees earlier turns of the conversation; /reset clears them."""
    first = await dingtalk_sim.send_message("my name is Li", conversation_id="cidCtx")
    await replies_for(dingtalk_sim, first["msg_id"])
    second = await dingtalk_sim.send_message("what is my name?", conversation_id="cidCtx")
    (reply,) = await replies_for(dingtalk_sim, second["msg_id"])
    assert "(turns: 3)" in reply_text(reply)
    reset = await dingtalk_sim.send_message("/reset", conversation_id="cidCtx")
    (notice,) = await replies_for(dingtalk_sim, reset["msg_id"])
    assert reply_text(notice) == gateway.settings.pipeline.reset_notice
    third = await dingtalk_sim.send_message("hello again", conversation_id="cidCtx")
    (reply,) = await replies_for(dingtalk_sim, third["msg_id"])
    assert "(turns: 1)" in reply_text(reply)
    helped = await dingtalk_sim.send_message("/help", conversation_id="cidCtx")
    (help_reply,) = await replies_for(dingtalk_sim, helped["msg_id"])
    assert "/reset" in reply_text(help_reply)


async def test_model_failure_sends_apology_and_records_failure(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """When the model answers 500, the user gets the failure notice and the message is failed."""
    model_sim.set_behaviour(status=500)
    ids = await dingtalk_sim.send_message("will fail")
    (reply,) = await replies_for(dingtalk_sim, ids["msg_id"])
    assert reply_text(reply) == gateway.settings.pipeline.failure_notice
    await wait_for(lambda: _state(gateway, ids["msg_id"], MessageState.FAILED))


async def test_disconnect_fault_loses_nothing(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator
) -> None:
    """A SYSTEM disconnect mid-stream: a new connection opens and every message is answered."""
    msg_ids = []
    for i in range(30):
        if i == 10:
            await dingtalk_sim.fault({"disconnect": True})
        ids = await dingtalk_sim.send_message(f"d{i}", conversation_id=f"cidD{i % 3}")
        msg_ids.append(ids["msg_id"])
    await wait_for(lambda: all(dingtalk_sim.replies(m) for m in msg_ids), timeout=15)
    assert all(len(dingtalk_sim.replies(m)) == 1 for m in msg_ids)
    assert dingtalk_sim.connections_opened >= 2


async def test_dropped_connection_reconnects_and_redelivery_is_answered_once(
    gateway_factory: GatewayFactory, model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """An abrupt TCP drop: the gateway reconnects within its backoff; nothing lost or doubled."""
    async with DingTalkSimulator(redeliver_after_s=0.5, ping_interval_s=5.0) as sim:
        settings = gateway_settings(sim, model_sim, tmp_path / "drop.db")
        from prometheus_client import CollectorRegistry

        gw = Gateway(settings, registry=CollectorRegistry())
        await gw.start()
        try:
            await wait_for(lambda: sim.active_connections() == 1)
            msg_ids = []
            for i in range(30):
                if i == 10:
                    await sim.fault({"drop": True})
                ids = await sim.send_message(f"x{i}", conversation_id=f"cidX{i % 4}")
                msg_ids.append(ids["msg_id"])
            await wait_for(lambda: all(sim.replies(m) for m in msg_ids), timeout=15)
            await asyncio.sleep(0.6)  # a late redelivery would show up here
            assert all(len(sim.replies(m)) == 1 for m in msg_ids)
            assert sim.connections_opened >= 2
            text = (await _metrics(gw)).decode()
            assert 'imrelay_reconnects_total{platform="dingtalk"' in text
        finally:
            await gw.stop()


async def test_silent_connection_is_detected_and_replaced(
    model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """A connection that stops answering pings is declared dead and replaced.

    The message queued during the silence may be pushed, when the silence ends, on the very
    connection the gateway is abandoning at that moment (its pong deadline falls there too);
    like DingTalk, this simulator redelivers what was not ACKed, so it is answered anyway.
    """
    async with DingTalkSimulator(redeliver_after_s=1.0, ping_interval_s=5.0) as sim:
        gateway = Gateway(
            gateway_settings(sim, model_sim, tmp_path / "silent.db"), registry=CollectorRegistry()
        )
        await gateway.start()
        try:
            await wait_for(lambda: sim.active_connections() == 1, what="stream connection")
            before = sim.connections_opened
            await sim.fault({"silence_s": 3})
            await wait_for(lambda: sim.connections_opened > before, timeout=10)
            ids = await sim.send_message("after silence")
            await replies_for(sim, ids["msg_id"])
            text = (await _metrics(gateway)).decode()
            assert 'reason="silent"' in text
        finally:
            await gateway.stop()


async def test_readyz_reports_a_down_connection(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator
) -> None:
    """/readyz is 200 while connected and 503 with a reason while the platform refuses us."""
    url = f"http://127.0.0.1:{gateway.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 200
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        await dingtalk_sim.fault({"refuse_s": 3})
        await dingtalk_sim.fault({"drop": True})

        async def unready() -> bool:
            async with http.get(f"{url}/readyz") as resp:
                return resp.status == 503 and "dingtalk" in (await resp.text())

        await wait_for(unready, timeout=5)
        await wait_for(lambda: gateway.platforms["dingtalk"].ready, timeout=10)
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 200


async def _metrics(gateway: Gateway) -> bytes:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{gateway.port}/metrics") as resp,
    ):
        assert resp.status == 200
        return await resp.read()


async def test_metrics_count_messages_replies_and_latency(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator
) -> None:
    """/metrics exposes the message, reply, latency and connection series."""
    ids = await dingtalk_sim.send_message("count me")
    await replies_for(dingtalk_sim, ids["msg_id"])
    await wait_for(lambda: _state(gateway, ids["msg_id"], MessageState.REPLIED))
    text = (await _metrics(gateway)).decode()
    assert 'imrelay_messages_received_total{kind="text",platform="dingtalk"} 1.0' in text
    assert 'imrelay_replies_total{outcome="sent",platform="dingtalk"} 1.0' in text
    assert 'imrelay_message_processing_latency_seconds_count{platform="dingtalk"} 1.0' in text
    assert 'imrelay_model_latency_seconds_count{model="default"} 1.0' in text
    assert 'imrelay_connection_up{platform="dingtalk"} 1.0' in text
    assert 'imrelay_stage_latency_seconds_count{stage="generate"} 1.0' in text
    samples = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert not any(
        "staff" in ln or "cidConv" in ln or "cid" in ln.split("{")[-1] for ln in samples
    )


async def test_unfinished_message_is_resumed_after_restart(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """A message left in the inbox by a stop is answered by the next start, once."""
    model_sim.set_behaviour(hang=True)
    gw = await gateway_factory(pipeline__drain_timeout_s=0.2)
    await wait_for(lambda: dingtalk_sim.active_connections() >= 1)
    ids = await dingtalk_sim.send_message("survive a restart")
    await wait_for(lambda: len(model_sim.requests) == 1, what="model call")
    assert await gw.stop() is False  # drain deadline passed with the message in flight
    record = await _reopen_state(gw, ids["msg_id"])
    assert record is MessageState.PROCESSING
    model_sim.set_behaviour(hang=False)
    await gateway_factory()
    (reply,) = await replies_for(dingtalk_sim, ids["msg_id"])
    assert "survive a restart" in reply_text(reply)
    await asyncio.sleep(0.05)
    assert len(dingtalk_sim.replies(ids["msg_id"])) == 1


async def _reopen_state(gw: Gateway, msg_id: str) -> MessageState | None:
    from imrelay.stores import open_store

    store = open_store(gw.settings.storage.url)
    await store.open()
    try:
        record = await store.get("dingtalk", msg_id)
        return None if record is None else record.state
    finally:
        await store.aclose()


async def test_expired_session_webhook_falls_back_to_openapi(
    model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """A message whose sessionWebhook has expired is answered through the OpenAPI instead."""
    import time

    from prometheus_client import CollectorRegistry

    # The simulator's clock runs two hours behind: its sessions expire 90 minutes after
    # createAt, so by the gateway's clock every session webhook is already past its expiry
    # (while the simulator itself would still accept it, so a webhook send would show up).
    async with DingTalkSimulator(clock=lambda: time.time() - 7200) as sim:
        gw = Gateway(
            gateway_settings(sim, model_sim, tmp_path / "exp.db"), registry=CollectorRegistry()
        )
        await gw.start()
        try:
            await wait_for(lambda: sim.active_connections() == 1)
            ids = await sim.send_message("too late", sender_id="staff-late")
            await wait_for(lambda: _state(gw, ids["msg_id"], MessageState.REPLIED))
            assert sim.replies(ids["msg_id"]) == []  # not through the expired webhook
            (reply,) = [r for r in sim.replies() if r["body"].get("via") == "openapi"]
            assert "echo: too late" in reply_text(reply)
            assert reply["conversation_id"] == sim.direct_conversation_id("staff-late")
        finally:
            await gw.stop()


async def test_reply_recorded_as_sent_is_not_sent_again_after_restart(
    gateway_factory: GatewayFactory,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
    tmp_path: Path,
) -> None:
    """A resumed message whose reply was recorded as sent before a crash is not sent twice."""
    from imrelay.stores import open_store

    # First life: a message arrives and is answered normally.
    gw = await gateway_factory()
    await wait_for(lambda: dingtalk_sim.active_connections() >= 1)
    ids = await dingtalk_sim.send_message("answer me once")
    await replies_for(dingtalk_sim, ids["msg_id"])
    await wait_for(lambda: _state(gw, ids["msg_id"], MessageState.REPLIED))
    await gw.stop()
    # Simulate a crash after the reply was accepted and recorded, before the final state was:
    # the message is back in `processing`.
    store = open_store(gw.settings.storage.url)
    await store.open()
    await store.set_state("dingtalk", ids["msg_id"], MessageState.PROCESSING)
    assert await store.was_sent("dingtalk", ids["msg_id"], 0)
    await store.aclose()
    # Second life: the message is resumed, processed again, and its reply is skipped.
    gw2 = await gateway_factory()
    await wait_for(lambda: _state(gw2, ids["msg_id"], MessageState.REPLIED))
    assert len(dingtalk_sim.replies(ids["msg_id"])) == 1
    text = (await _metrics(gw2)).decode()
    assert 'imrelay_replies_total{outcome="skipped",platform="dingtalk"} 1.0' in text
