"""The simulator routes the benchmark relies on: message batches, replies since a sequence
number, and the model simulator's timings; the same answers from the lean front and from
aiohttp; frames and deliveries under load."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from imrelay.sim.dingtalk import BOT_MESSAGE_TOPIC, DingTalkSimulator
from imrelay.sim.dingtalk_webhook import DingTalkWebhookSender
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


async def test_sim_replies_pages_hold_only_newer_ones_after_old_ones_are_forgotten(
    http: aiohttp.ClientSession,
) -> None:
    """With the oldest replies forgotten, ``after`` still pages exactly the newer ones."""
    async with DingTalkSimulator(max_records=3) as sim:
        for i in range(5):
            sim.record_reply(f"m{i % 2}", "cidA", "text", {"text": {"content": f"r{i}"}})
        url = f"{sim.base_url}/_sim/replies"
        pages = {}
        for after in ("0", "3", "4", "5", "9"):
            async with http.get(url, params={"after": after}) as resp:
                pages[after] = [r["seq"] for r in (await resp.json())["replies"]]
        async with http.get(url, params={"after": "2", "msg_id": "m0"}) as resp:
            filtered = (await resp.json())["replies"]
        async with http.get(url, params={"after": "-1"}) as resp:
            assert resp.status == 400
    assert pages == {"0": [3, 4, 5], "3": [4, 5], "4": [5], "5": [], "9": []}
    assert [(r["seq"], r["body"]["text"]["content"]) for r in filtered] == [(3, "r2"), (5, "r4")]


async def test_sim_messages_pages_hold_only_newer_ones(http: aiohttp.ClientSession) -> None:
    """``GET /_sim/messages?after=N`` pages the injected messages like the replies."""
    async with DingTalkSimulator(max_records=3) as sim:
        for i in range(5):
            await sim.send_message(f"t{i}", conversation_id=f"cid{i % 2}", sender_id="u")
        url = f"{sim.base_url}/_sim/messages"
        async with http.get(url, params={"after": "1"}) as resp:
            texts = [m["text"] for m in (await resp.json())["messages"]]
        async with http.get(url, params={"after": "3", "conversation_id": "cid0"}) as resp:
            filtered = [m["text"] for m in (await resp.json())["messages"]]
    assert texts == ["t2", "t3", "t4"]
    assert filtered == ["t4"]


async def test_sim_model_timings_pages_hold_only_newer_ones(http: aiohttp.ClientSession) -> None:
    """``after`` pages the model's timings exactly, also once the oldest are forgotten."""
    async with ModelSimulator(max_recorded=2) as sim:
        for i in range(4):
            body = {"model": "sim-model", "messages": [{"role": "user", "content": f"q{i}"}]}
            async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
                assert resp.status == 200
        url = sim.base_url.removesuffix("/v1") + "/_sim/timings"
        pages = {}
        for after in ("0", "3", "4"):
            async with http.get(url, params={"after": after}) as resp:
                pages[after] = [(t["seq"], t["text"]) for t in (await resp.json())["timings"]]
    assert pages == {"0": [(3, "q2"), (4, "q3")], "3": [(4, "q3")], "4": []}


async def raw_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send one raw request on a new connection; return the status and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = int(head.lower().split("content-length:")[1].split("\r\n")[0])
        return int(head.split()[1]), await reader.readexactly(length)
    finally:
        writer.close()


def raw_request(method: str, target: str, body: bytes, *extra: str) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    return ("\r\n".join([*head, *extra]) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize("via", ["front", "aiohttp"])
async def test_sim_session_webhook_answers_alike_on_both_paths(
    dingtalk_sim: DingTalkSimulator, via: str
) -> None:
    """The lean front and aiohttp (``Connection: close`` goes there) give the same answers."""
    extra = ("Connection: close",) if via == "aiohttp" else ()
    await dingtalk_sim.send_message("hi")
    session = next(iter(dingtalk_sim._sessions))
    target = f"/robot/sendBySession?session={session}"
    reply = json.dumps({"msgtype": "text", "text": {"content": "答 ok"}}).encode()
    port = dingtalk_sim.port
    answers = [
        await raw_exchange(port, raw_request("POST", target, reply, *extra)),
        await raw_exchange(
            port, raw_request("POST", target, reply, "Content-Type: text/plain", *extra)
        ),
        await raw_exchange(
            port, raw_request("POST", target, b"[1]", "Content-Type: application/json", *extra)
        ),
        await raw_exchange(
            port,
            raw_request(
                "POST",
                "/robot/sendBySession?session=nope",
                reply,
                "Content-Type: application/json",
                *extra,
            ),
        ),
        await raw_exchange(
            port,
            raw_request(
                "POST", target, reply, "Content-Type: application/json; charset=utf-8", *extra
            ),
        ),
    ]
    assert [(status, json.loads(body)["errcode"]) for status, body in answers] == [
        (200, 43004),  # no content type
        (200, 43004),
        (200, 40035),
        (200, 300001),
        (200, 0),
    ]
    replies = dingtalk_sim.replies()
    assert [r["body"] for r in replies] == [{"msgtype": "text", "text": {"content": "答 ok"}}]
    status, page = await raw_exchange(
        port, raw_request("GET", "/_sim/replies?after=0", b"", *extra)
    )
    assert status == 200
    assert json.loads(page)["replies"] == replies


async def test_sim_batch_frames_reach_the_bot_in_order(
    dingtalk_sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """A batch's frames (written together) arrive as separate, well-formed frames, in order."""
    open_body = {
        "clientId": dingtalk_sim.app_key,
        "clientSecret": dingtalk_sim.app_secret,
        "subscriptions": [{"type": "CALLBACK", "topic": BOT_MESSAGE_TOPIC}],
    }
    async with http.post(
        f"{dingtalk_sim.base_url}/v1.0/gateway/connections/open", json=open_body
    ) as resp:
        ticket = await resp.json()
    async with http.ws_connect(f"{ticket['endpoint']}?ticket={ticket['ticket']}") as ws:
        batch = [item(f"t{i}" + "字" * (i * 7), f"cid{i % 3}") for i in range(20)]
        async with http.post(
            f"{dingtalk_sim.base_url}/_sim/messages/batch", json={"messages": batch}
        ) as resp:
            sent = (await resp.json())["sent"]
        frames = [json.loads((await ws.receive(timeout=5)).data) for _ in sent]
    assert [f["headers"]["messageId"] for f in frames] == [s["message_id"] for s in sent]
    texts = [json.loads(f["data"])["text"]["content"] for f in frames]
    assert texts == [b["text"] for b in batch]
    assert dingtalk_sim.pending_count() == 0


async def test_sim_webhook_sender_keeps_more_than_100_deliveries_in_flight() -> None:
    """HTTP mode: 150 deliveries can wait on the gateway at once (aiohttp's default is 100)."""
    in_flight = 0
    all_in = asyncio.Event()

    async def slow_gateway(request: web.Request) -> web.Response:
        nonlocal in_flight
        in_flight += 1
        if in_flight >= 150:
            all_in.set()
        await all_in.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", slow_gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sender = DingTalkWebhookSender("secret", retry_delays=())
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        deliveries = [sender.deliver(url, json.dumps({"n": i})) for i in range(150)]
        results = await asyncio.wait_for(asyncio.gather(*deliveries), 10)
    finally:
        all_in.set()  # let the handlers still waiting end, so cleanup does not wait for them
        await sender.aclose()
        await runner.cleanup()
    assert [r.status for r in results] == [200] * 150


@pytest.mark.parametrize("via", ["front", "aiohttp"])
@pytest.mark.parametrize("include_usage", [False, True])
async def test_sim_model_stream_events_are_json_dumps_text(
    model_sim: ModelSimulator, via: str, include_usage: bool
) -> None:
    """Each SSE event is byte for byte what ``json.dumps`` writes, whichever path answers."""
    body: dict[str, Any] = {
        "model": "sim-model",
        "stream": True,
        "messages": [{"role": "user", "content": 'b7 c0 k0 say "引号" \\ and\nmore'}],
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    raw = json.dumps(body).encode()
    extra = ["Content-Type: application/json", "x-request-id: r-1"]
    if via == "aiohttp":
        extra.append("Connection: close")
    port = int(model_sim.base_url.rsplit(":", 1)[1].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_request("POST", "/v1/chat/completions", raw, *extra))
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    stream = b""
    while size := int(await reader.readuntil(b"\r\n"), 16):
        stream += (await reader.readexactly(size + 2))[:-2]
    writer.close()
    assert "transfer-encoding: chunked" in head
    assert "x-request-id: r-1" in head
    events = stream.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    documents = [e.removeprefix("data: ") for e in events[:-2]]
    parsed = [json.loads(d) for d in documents]
    assert documents == [json.dumps(p) for p in parsed]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    words = "".join(p["choices"][0]["delta"].get("content", "") for p in parsed if p["choices"])
    assert words == 'echo: b7 c0 k0 say "引号" \\ and\nmore (turns: 1)'
    assert {p["id"] for p in parsed} == {"chatcmpl-r-1"}
    assert ("usage" in parsed[0]) is include_usage
    assert parsed[-1]["imrelay_sim"]["model_time_ms"] >= 0
