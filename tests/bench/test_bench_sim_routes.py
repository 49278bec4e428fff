"""The simulator routes the benchmark relies on: message batches, replies since a sequence
number, and the model simulator's timings."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the control APIs."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def item(text: str, conversation: str) -> dict[str, Any]:
    """One batch item for a 1:1 chat."""
    return {"text": text, "conversation_id": conversation, "sender_id": conversation.lower()}


async def test_sim_batch_hands_messages_over_in_order(
    dingtalk_sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """A batch is handed over in item order, each with its ids and hand-over time."""
    batch = [item(f"t{i}", "cidA") for i in range(3)]
    async with http.post(
        f"{dingtalk_sim.base_url}/_sim/messages/batch", json={"messages": batch}
    ) as resp:
        assert resp.status == 200
        sent = (await resp.json())["sent"]
    assert [set(s) for s in sent] == [{"msg_id", "message_id", "sent_at"}] * 3
    assert [s["sent_at"] for s in sent] == sorted(s["sent_at"] for s in sent)
    async with http.get(f"{dingtalk_sim.base_url}/_sim/messages") as resp:
        messages = (await resp.json())["messages"]
    assert [m["text"] for m in messages] == ["t0", "t1", "t2"]
    assert [m["msg_id"] for m in messages] == [s["msg_id"] for s in sent]
    assert dingtalk_sim.pending_count() == 3  # no connection: they wait, in order


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"messages": [item("ok", "cidA"), {"text": "x", "msgtype": "fax"}]}, "messages[1]: "),
        ({"messages": [{"text": "x", "colour": "red"}]}, "messages[0]: unknown keys: colour"),
        ({"messages": "all of them"}, "messages must be a list of objects"),
        ({"messages": [item("ok", "cidA"), {"text": 5}]}, "text must be a string"),
    ],
)
async def test_sim_batch_with_a_bad_item_sends_nothing(
    dingtalk_sim: DingTalkSimulator,
    http: aiohttp.ClientSession,
    batch: dict[str, Any],
    message: str,
) -> None:
    """One invalid item refuses the whole batch with 400 before anything is sent."""
    async with http.post(f"{dingtalk_sim.base_url}/_sim/messages/batch", json=batch) as resp:
        assert resp.status == 400
        assert message in (await resp.json())["error"]
    async with http.get(f"{dingtalk_sim.base_url}/_sim/messages") as resp:
        assert (await resp.json())["messages"] == []


async def test_sim_batch_webhook_mode_keeps_each_conversation_in_order(
    dingtalk_sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """HTTP mode: conversations are delivered concurrently, each one's messages in order."""
    arrivals: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        payload = json.loads(await request.read())
        text = payload["text"]["content"]
        arrivals.append(text)
        if text == "a1":
            await asyncio.sleep(0.03)  # conversation B must not wait for this
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    dingtalk_sim.webhook_url = f"http://127.0.0.1:{port}/hook"
    try:
        batch = [item("a1", "cidA"), item("b1", "cidB"), item("a2", "cidA"), item("b2", "cidB")]
        async with http.post(
            f"{dingtalk_sim.base_url}/_sim/messages/batch", json={"messages": batch}
        ) as resp:
            assert resp.status == 200
            sent = (await resp.json())["sent"]
    finally:
        await runner.cleanup()
    assert [s["webhook_status"] for s in sent] == [200] * 4
    assert sent[0]["webhook_ms"] >= 30
    assert [t for t in arrivals if t.startswith("a")] == ["a1", "a2"]
    assert [t for t in arrivals if t.startswith("b")] == ["b1", "b2"]
    assert arrivals.index("b2") < arrivals.index("a2")  # B went on while A's first waited


async def test_sim_replies_after_returns_only_newer_ones(
    dingtalk_sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """``GET /_sim/replies?after=N`` lists the replies after seq N, oldest first, filtered."""
    for i in range(5):
        dingtalk_sim.record_reply(f"m{i % 2}", "cidA", "text", {"text": {"content": str(i)}})
    url = f"{dingtalk_sim.base_url}/_sim/replies"
    async with http.get(url, params={"after": "3"}) as resp:
        assert [r["seq"] for r in (await resp.json())["replies"]] == [4, 5]
    async with http.get(url, params={"after": "1", "msg_id": "m0"}) as resp:
        assert [r["seq"] for r in (await resp.json())["replies"]] == [3, 5]
    async with http.get(url, params={"after": "5"}) as resp:
        assert (await resp.json())["replies"] == []


async def test_sim_model_timings_list_answered_requests(
    model_sim: ModelSimulator, http: aiohttp.ClientSession
) -> None:
    """Each answered chat request is listed once with its id, time and last user text."""
    chat = f"{model_sim.base_url}/chat/completions"
    for stream in (False, True):
        body = {
            "model": "sim-model",
            "stream": stream,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"b{int(stream)} c0 k0 hello " + "x" * 300},
            ],
        }
        async with http.post(chat, json=body) as resp:
            assert resp.status == 200
            await resp.read()
    timings_url = model_sim.base_url.removesuffix("/v1") + "/_sim/timings"
    async with http.get(timings_url, params={"after": "0"}) as resp:
        timings = (await resp.json())["timings"]
    assert [t["seq"] for t in timings] == [1, 2]
    assert [t["text"][:12] for t in timings] == ["b0 c0 k0 hel", "b1 c0 k0 hel"]
    assert all(len(t["text"]) == 200 for t in timings)
    assert all(t["model_time_ms"] >= 0 for t in timings)
    assert {t["request_id"] for t in timings} == set(model_sim.timings)
    async with http.get(timings_url, params={"after": "1"}) as resp:
        assert [t["seq"] for t in (await resp.json())["timings"]] == [2]
    async with http.get(timings_url, params={"after": "x"}) as resp:
        assert resp.status == 400
