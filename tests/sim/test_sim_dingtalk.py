"""Tests for the DingTalk simulator (imrelay.sim.dingtalk) over real loopback sockets.

The official ``dingtalk_stream`` SDK is driven in a **subprocess**: it reads
``DINGTALK_OPENAPI_ENDPOINT`` at import time, its replies use blocking ``requests`` calls that
would freeze this test's event loop (which also runs the simulator), and 0.24.3's ``start()``
swallows cancellation. A subprocess gets the env var before import, keeps this interpreter free
of the SDK, and is killed decisively (SIGKILL) at teardown; a watchdog thread also ends it
after 30 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from imrelay.sim.dingtalk import BOT_MESSAGE_TOPIC, DEFAULT_GROUP_ID, DingTalkSimulator

BOT_SUBS = [{"type": "CALLBACK", "topic": BOT_MESSAGE_TOPIC}]
KEY, SECRET = "sim-app-key", "sim-app-secret"

SDK_PEER = """
import asyncio, os, sys, threading
threading.Timer(30.0, os._exit, (3,)).start()  # never outlive the test
import dingtalk_stream
from dingtalk_stream import AckMessage

# never touch 8.8.8.8 to find a local address
dingtalk_stream.stream.DingTalkStreamClient.get_host_ip = lambda self: "127.0.0.1"

class Echo(dingtalk_stream.ChatbotHandler):
    async def process(self, callback):
        incoming = dingtalk_stream.ChatbotMessage.from_dict(callback.data)
        self.reply_text("echo:" + incoming.text.content.strip(), incoming)
        return AckMessage.STATUS_OK, "OK"

client = dingtalk_stream.DingTalkStreamClient(dingtalk_stream.Credential(sys.argv[1], sys.argv[2]))
client.register_callback_handler(dingtalk_stream.ChatbotMessage.TOPIC, Echo())
asyncio.run(client.start())
"""


class FakeClock:
    """A settable wall clock (epoch seconds) for TTL tests."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` every 5 ms until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client session, closed after the test."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def sim() -> AsyncIterator[DingTalkSimulator]:
    """A simulator with default settings on an ephemeral loopback port."""
    async with DingTalkSimulator() as simulator:
        yield simulator


@pytest.fixture
async def sdk_peer(
    tmp_path: Path,
) -> AsyncIterator[Callable[[DingTalkSimulator], Awaitable[Path]]]:
    """Start the official SDK against a simulator in a subprocess; kill it at teardown."""
    procs: list[asyncio.subprocess.Process] = []
    script = tmp_path / "sdk_peer.py"
    script.write_text(SDK_PEER, encoding="utf-8")

    async def start(simulator: DingTalkSimulator) -> Path:
        log = tmp_path / f"sdk_peer_{len(procs)}.log"
        env = {**os.environ, "DINGTALK_OPENAPI_ENDPOINT": simulator.base_url}
        with log.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                KEY,
                SECRET,
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=sink,
            )
        procs.append(proc)
        return log

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 5)


async def open_ticket(
    http: aiohttp.ClientSession,
    sim: DingTalkSimulator,
    subscriptions: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Call the gateway open endpoint with good credentials and return its JSON."""
    body = {
        "clientId": KEY,
        "clientSecret": SECRET,
        "subscriptions": BOT_SUBS if subscriptions is None else subscriptions,
        "ua": "imrelay-test/1",
        "localIp": "127.0.0.1",
    }
    async with http.post(f"{sim.base_url}/v1.0/gateway/connections/open", json=body) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def connect(
    http: aiohttp.ClientSession,
    sim: DingTalkSimulator,
    subscriptions: list[dict[str, str]] | None = None,
    **kwargs: Any,
) -> aiohttp.ClientWebSocketResponse:
    """Open a gateway connection the way an SDK does: open call, then WebSocket with the ticket."""
    opened = await open_ticket(http, sim, subscriptions)
    return await http.ws_connect(opened["endpoint"], params={"ticket": opened["ticket"]}, **kwargs)


async def next_frame(
    ws: aiohttp.ClientWebSocketResponse, *, timeout: float = 3.0, skip_pings: bool = True
) -> dict[str, Any]:
    """Return the next JSON text frame, skipping SYSTEM pings unless told otherwise."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        frame: dict[str, Any] = json.loads(msg.data)
        if skip_pings and frame["type"] == "SYSTEM" and frame["headers"]["topic"] == "ping":
            continue
        return frame


async def ack(ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any]) -> None:
    """ACK a frame the way the Python SDK does for bot messages."""
    await ws.send_json(
        {
            "code": 200,
            "headers": {
                "contentType": "application/json",
                "messageId": frame["headers"]["messageId"],
            },
            "message": "",
            "data": json.dumps({"response": "OK"}),
        }
    )


async def post_reply(
    http: aiohttp.ClientSession, url: str, body: Any, content_type: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    """POST a raw body to a sessionWebhook URL; return (HTTP status, JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers={"Content-Type": content_type}) as resp:
        return resp.status, await resp.json()


# ---------------------------------------------------------------- official SDK


async def test_sim_official_sdk_receives_acks_and_replies(
    sdk_peer: Callable[[DingTalkSimulator], Awaitable[Path]],
) -> None:
    """The official dingtalk-stream SDK connects, ACKs pings and a bot message, and replies."""
    async with DingTalkSimulator(ping_interval_s=0.1) as sim:
        log = await sdk_peer(sim)
        await wait_until(lambda: sim.active_connections() == 1, 15, f"sdk connect; {log}")
        assert sim.open_calls[0]["subscriptions"] == BOT_SUBS
        assert sim.open_calls[0]["localIp"] == "127.0.0.1"
        assert "clientSecret" not in sim.open_calls[0]
        ids = await sim.send_message("你好 hello")
        await wait_until(lambda: ids["message_id"] in sim.acks, 5, f"sdk ack; {log}")
        replies = sim.replies(ids["msg_id"])
        assert [r["body"]["text"]["content"] for r in replies] == ["echo:你好 hello"]
        assert replies[0]["body"]["at"] == {"atUserIds": ["zhangsan"]}
        assert sim.acks[ids["message_id"]]["code"] == 200
        await wait_until(lambda: any(m.startswith("sys-ping-") for m in sim.acks), 5, "ping ack")
        ping_ack = next(f for m, f in sim.acks.items() if m.startswith("sys-ping-"))
        assert ping_ack["code"] == 200
        assert "opaque" in json.loads(ping_ack["data"])


async def test_sim_official_sdk_reconnects_after_disconnect(
    sdk_peer: Callable[[DingTalkSimulator], Awaitable[Path]],
) -> None:
    """After a SYSTEM disconnect the SDK reopens a connection and keeps answering."""
    async with DingTalkSimulator(disconnect_close_after_s=0.5) as sim:
        log = await sdk_peer(sim)
        await wait_until(lambda: sim.active_connections() == 1, 15, f"sdk connect; {log}")
        await sim.fault({"disconnect": True})
        await wait_until(
            lambda: sim.connections_opened == 2 and sim.active_connections() == 1, 5, "reconnect"
        )
        assert len(sim.open_calls) == 2
        ids = await sim.send_message("群消息", conversation_type="2")
        await wait_until(lambda: bool(sim.replies(ids["msg_id"])), 5, f"sdk reply; {log}")
        reply = sim.replies(ids["msg_id"])[0]
        assert reply["body"]["text"]["content"] == "echo:群消息"
        assert reply["conversation_id"] == DEFAULT_GROUP_ID


# ---------------------------------------------------------------- gateway open + tickets


async def test_sim_open_rejects_bad_credentials(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """A wrong clientSecret gets 400 invalidClientIdOrSecret and the secret is not recorded."""
    body = {"clientId": KEY, "clientSecret": "wrong", "subscriptions": BOT_SUBS}
    async with http.post(f"{sim.base_url}/v1.0/gateway/connections/open", json=body) as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert answer["code"] == "invalidClientIdOrSecret"
    assert answer["message"] == "无效的clientId或者clientSecret"
    assert answer["requestid"]
    assert sim.open_calls == [{"clientId": KEY, "subscriptions": BOT_SUBS}]
    assert (sim.app_key, sim.app_secret) == (KEY, SECRET)
    async with http.post(f"{sim.base_url}/v1.0/gateway/connections/open", data=b"[") as resp:
        assert resp.status == 400


async def test_sim_ticket_is_single_use_and_expires(http: aiohttp.ClientSession) -> None:
    """A ticket upgrades once; reused, unknown or 90-s-old tickets get 401 before the upgrade."""
    clock = FakeClock()
    async with DingTalkSimulator(clock=clock) as sim:
        opened = await open_ticket(http, sim)
        assert opened["endpoint"] == f"ws://127.0.0.1:{sim.port}/connect"
        ws = await http.ws_connect(opened["endpoint"], params={"ticket": opened["ticket"]})
        await wait_until(lambda: sim.active_connections() == 1)
        for ticket in (opened["ticket"], "no-such-ticket"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(opened["endpoint"], params={"ticket": ticket})
            assert err.value.status == 401
        stale = await open_ticket(http, sim)
        clock.now += 91
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(stale["endpoint"], params={"ticket": stale["ticket"]})
        assert err.value.status == 401
        async with http.get(opened["endpoint"], params={"ticket": "x"}) as resp:
            assert resp.status == 400  # not a WebSocket upgrade
        assert sim.connections_opened == 1
        await ws.close()


# ---------------------------------------------------------------- frames and payloads


async def test_sim_bot_frame_has_string_headers_and_string_data(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """A 1:1 text message arrives as §1.3 CALLBACK frame with a §1.7 payload."""
    ws = await connect(http, sim)
    ids = await sim.send_message("hi 你好", sender_id="lisi")
    frame = await next_frame(ws)
    assert frame["specVersion"] == "1.0"
    assert frame["type"] == "CALLBACK"
    headers = frame["headers"]
    assert set(headers) == {"appId", "connectionId", "contentType", "messageId", "time", "topic"}
    assert all(isinstance(v, str) for v in headers.values())
    assert headers["topic"] == BOT_MESSAGE_TOPIC
    assert headers["messageId"] == ids["message_id"]
    assert abs(int(headers["time"]) / 1000 - time.time()) < 60
    assert isinstance(frame["data"], str)
    data = json.loads(frame["data"])
    assert data["msgId"] == ids["msg_id"]
    assert data["msgId"].startswith("msg")
    assert data["msgtype"] == "text"
    assert data["text"] == {"content": "hi 你好"}
    assert data["conversationType"] == "1"
    assert data["conversationId"].startswith("cid")
    assert "conversationTitle" not in data
    assert data["senderStaffId"] == "lisi"
    assert data["senderNick"] == "李四"
    assert data["senderId"].startswith("$:LWCP_v1:$")
    assert data["robotCode"] == KEY
    assert data["isInAtList"] is True
    assert isinstance(data["createAt"], int)
    assert data["sessionWebhookExpiredTime"] == data["createAt"] + 90 * 60 * 1000
    assert data["sessionWebhook"].startswith(f"{sim.base_url}/robot/sendBySession?session=")
    assert len(data["sessionWebhook"].rsplit("=", 1)[1]) == 32
    other = await sim.send_message("x", sender_id="lisi")
    assert json.loads((await next_frame(ws))["data"])["conversationId"] == data["conversationId"]
    assert other["msg_id"] != ids["msg_id"]
    await ws.close()


async def test_sim_group_message_mention_fields(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """Group messages carry a title; at_bot controls isInAtList, atUsers and the leading space."""
    ws = await connect(http, sim)
    await sim.send_message("问题", conversation_type="2", sender_nick="Wang")
    await sim.send_message("chatter", conversation_type="2", at_bot=False)
    mentioned = json.loads((await next_frame(ws))["data"])
    unmentioned = json.loads((await next_frame(ws))["data"])
    assert mentioned["conversationType"] == "2"
    assert mentioned["conversationId"] == DEFAULT_GROUP_ID
    assert mentioned["conversationTitle"]
    assert mentioned["senderNick"] == "Wang"
    assert mentioned["text"] == {"content": " 问题"}
    assert mentioned["isInAtList"] is True
    assert mentioned["atUsers"] == [{"dingtalkId": mentioned["chatbotUserId"]}]
    assert unmentioned["isInAtList"] is False
    assert unmentioned["atUsers"] == []
    assert unmentioned["text"] == {"content": "chatter"}
    await ws.close()


async def test_sim_media_msgtypes_carry_download_codes(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """picture/richText/audio/video/file/unknownMsgType payloads follow §1.7."""
    ws = await connect(http, sim)
    for msgtype in ("picture", "richText", "audio", "video", "file", "unknownMsgType"):
        await sim.send_message("语音 text", msgtype=msgtype)
    got = {}
    for _ in range(6):
        data = json.loads((await next_frame(ws))["data"])
        got[data["msgtype"]] = data
        assert "text" not in data
    assert got["picture"]["content"]["downloadCode"]
    assert got["picture"]["content"]["pictureDownloadCode"]
    rich = got["richText"]["content"]["richText"]
    assert rich[0] == {"text": "语音 text"}
    assert rich[1]["type"] == "picture"
    assert rich[1]["downloadCode"]
    assert got["audio"]["content"]["recognition"] == "语音 text"
    assert got["audio"]["content"]["downloadCode"]
    assert got["video"]["content"]["videoType"] == "mp4"
    assert got["file"]["content"]["fileName"] == "语音 text"
    assert got["file"]["content"]["downloadCode"]
    assert got["unknownMsgType"]["content"]["unknownMsgType"]
    await ws.close()


# ---------------------------------------------------------------- pings and ACKs


async def test_sim_ping_frames_and_acks_are_recorded(http: aiohttp.ClientSession) -> None:
    """SYSTEM ping frames carry an opaque; the client's ACK is recorded under its messageId."""
    async with DingTalkSimulator(ping_interval_s=0.05) as sim:
        ws = await connect(http, sim)
        ping = await next_frame(ws, skip_pings=False)
        assert ping["type"] == "SYSTEM"
        assert ping["headers"]["topic"] == "ping"
        assert all(isinstance(v, str) for v in ping["headers"].values())
        opaque = json.loads(ping["data"])["opaque"]
        mid = ping["headers"]["messageId"]
        await ws.send_json(
            {
                "code": 200,
                "headers": {"contentType": "application/json", "messageId": mid},
                "message": "OK",
                "data": ping["data"],
            }
        )
        await wait_until(lambda: mid in sim.acks, what="ping ack")
        assert json.loads(sim.acks[mid]["data"]) == {"opaque": opaque}
        await ws.send_str("not json")
        await wait_until(lambda: sim.bad_frames == 1, what="bad frame counted")
        await ws.close()


# ---------------------------------------------------------------- delivery


async def test_sim_queues_messages_until_a_connection_arrives(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """Messages injected with no connection wait, then arrive in order on the first one."""
    sent = [await sim.send_message(f"m{i}") for i in range(3)]
    assert sim.pending_count() == 3
    ws = await connect(http, sim)
    got = [(await next_frame(ws))["headers"]["messageId"] for _ in range(3)]
    assert got == [ids["message_id"] for ids in sent]
    assert sim.pending_count() == 0
    await ws.close()


async def test_sim_only_subscribed_connections_get_bot_messages(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """A connection that subscribed only EVENT gets no bot message; a subscribed one does."""
    events_only = await connect(http, sim, [{"type": "EVENT", "topic": "*"}])
    await wait_until(lambda: sim.active_connections() == 1)
    ids = await sim.send_message("for the bot")
    assert sim.pending_count() == 1
    with pytest.raises(TimeoutError):
        await next_frame(events_only, timeout=0.1)
    bot = await connect(http, sim)
    assert (await next_frame(bot))["headers"]["messageId"] == ids["message_id"]
    await events_only.close()
    await bot.close()


async def test_sim_each_message_goes_to_one_connection(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """With two subscribed connections, each message is pushed to exactly one (round-robin)."""
    first, second = await connect(http, sim), await connect(http, sim)
    await wait_until(lambda: sim.active_connections() == 2)
    sent = {(await sim.send_message(f"n{i}"))["message_id"] for i in range(4)}
    got_first = {(await next_frame(first))["headers"]["messageId"] for _ in range(2)}
    got_second = {(await next_frame(second))["headers"]["messageId"] for _ in range(2)}
    assert got_first | got_second == sent
    assert not got_first & got_second
    await first.close()
    await second.close()


async def test_sim_redelivers_unacked_message_when_configured(http: aiohttp.ClientSession) -> None:
    """With redeliver_after_s set, an un-ACKed message comes again with the same ids."""
    async with DingTalkSimulator(redeliver_after_s=0.1) as sim:
        ws = await connect(http, sim)
        ids = await sim.send_message("again")
        first = await next_frame(ws)
        second = await next_frame(ws, timeout=2)
        assert second["headers"]["messageId"] == ids["message_id"]
        assert json.loads(second["data"])["msgId"] == ids["msg_id"]
        assert second["data"] == first["data"]
        await ack(ws, second)
        await wait_until(lambda: ids["message_id"] in sim.acks)
        with pytest.raises(TimeoutError):
            await next_frame(ws, timeout=0.3)
        assert sim.redeliveries >= 1
        await ws.close()


async def test_sim_unacked_push_is_not_requeued_without_redelivery(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """A message pushed on a connection that died un-ACKed is not re-pushed by default."""
    first = await connect(http, sim)
    await sim.send_message("lost")
    await next_frame(first)
    await first.close()
    await wait_until(lambda: sim.active_connections() == 0)
    second = await connect(http, sim)
    with pytest.raises(TimeoutError):
        await next_frame(second, timeout=0.2)
    assert sim.pending_count() == 0
    await second.close()


async def test_sim_delivers_thousands_of_messages_quickly(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """2000 messages are pushed and their ACKs recorded within a few seconds."""
    ws = await connect(http, sim)
    await wait_until(lambda: sim.active_connections() == 1)
    count = 2000

    async def acker() -> None:
        for _ in range(count):
            await ack(ws, await next_frame(ws))

    task = asyncio.create_task(acker())
    started = time.monotonic()
    for i in range(count):
        await sim.send_message(f"load {i}")
    await asyncio.wait_for(task, 10)
    await wait_until(lambda: len(sim.acks) >= count, what="all acks")
    assert time.monotonic() - started < 5
    await ws.close()


# ---------------------------------------------------------------- faults


async def test_sim_disconnect_fault_sends_frame_then_closes(http: aiohttp.ClientSession) -> None:
    """disconnect: SYSTEM disconnect frame, no more pushes, close after the delay, queue kept."""
    async with DingTalkSimulator(disconnect_close_after_s=0.2) as sim:
        ws = await connect(http, sim)
        await wait_until(lambda: sim.active_connections() == 1)
        started = time.monotonic()
        await sim.fault({"disconnect": True})
        frame = await next_frame(ws)
        assert frame["type"] == "SYSTEM"
        assert frame["headers"]["topic"] == "disconnect"
        assert frame["headers"]["contentType"] == "application/json"
        assert json.loads(frame["data"]) == {"reason": "connection is expired"}
        assert sim.active_connections() == 0
        ids = await sim.send_message("after disconnect")
        assert sim.pending_count() == 1
        closing = await asyncio.wait_for(ws.receive(), 3)
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert time.monotonic() - started >= 0.15
        fresh = await connect(http, sim)
        assert (await next_frame(fresh))["headers"]["messageId"] == ids["message_id"]
        await ws.close()
        await fresh.close()


async def test_sim_drop_fault_aborts_without_close_frame(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """drop: the TCP connection is aborted and the client sees an abnormal closure."""
    ws = await connect(http, sim)
    await wait_until(lambda: sim.active_connections() == 1)
    await sim.fault({"drop": True})
    msg = await asyncio.wait_for(ws.receive(), 3)
    assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    assert ws.close_code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE
    await wait_until(lambda: sim.state()["connections"] == 0)


async def test_sim_refuse_fault_rejects_opens_and_upgrades(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """refuse_s: opens and upgrades get 503 for the window, then work again."""
    opened = await open_ticket(http, sim)
    await sim.fault({"refuse_s": 0.3})
    body = {"clientId": KEY, "clientSecret": SECRET, "subscriptions": BOT_SUBS}
    async with http.post(f"{sim.base_url}/v1.0/gateway/connections/open", json=body) as resp:
        assert resp.status == 503
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await http.ws_connect(opened["endpoint"], params={"ticket": opened["ticket"]})
    assert err.value.status == 503

    async def ticket_works() -> bool:
        async with http.post(f"{sim.base_url}/v1.0/gateway/connections/open", json=body) as resp:
            return resp.status == 200

    await wait_until(ticket_works, 3, "refusal to end")
    ws = await http.ws_connect(opened["endpoint"], params={"ticket": opened["ticket"]})
    await wait_until(lambda: sim.active_connections() == 1)
    await ws.close()


async def test_sim_silence_fault_withholds_pongs_pushes_and_acks(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """silence_s: no pong, no push, ACKs ignored; afterwards pongs and queued messages resume."""
    ws = await connect(http, sim, autoping=False)
    first = await sim.send_message("before")
    frame = await next_frame(ws)
    await sim.fault({"silence_s": 0.3})
    await ack(ws, frame)
    await ws.ping(b"are you there")
    queued = await sim.send_message("during")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.receive(), 0.15)
    assert first["message_id"] not in sim.acks
    assert sim.pending_count() == 1
    frame = await next_frame(ws, timeout=2)
    assert frame["headers"]["messageId"] == queued["message_id"]
    await ws.ping(b"now?")
    pong = await asyncio.wait_for(ws.receive(), 2)
    assert pong.type is aiohttp.WSMsgType.PONG
    assert pong.data == b"now?"
    await ws.close()


# ---------------------------------------------------------------- sessionWebhook


async def test_sim_session_webhook_validates_and_records_replies(
    http: aiohttp.ClientSession,
) -> None:
    """The sessionWebhook answers §2.1/§4 errcodes with HTTP 200 and records valid replies."""
    clock = FakeClock()
    async with DingTalkSimulator(clock=clock) as sim:
        ws = await connect(http, sim)
        ids = await sim.send_message("q")
        payload = json.loads((await next_frame(ws))["data"])
        url = payload["sessionWebhook"]
        text = {"msgtype": "text", "text": {"content": "答案"}, "at": {"atUserIds": ["zhangsan"]}}
        markdown = {"msgtype": "markdown", "markdown": {"title": "t", "text": "# 标题"}}
        card = {
            "msgtype": "actionCard",
            "actionCard": {"title": "t", "text": "x", "btns": [{"title": "A", "actionURL": "u"}]},
        }
        cases: list[tuple[Any, str, int]] = [
            (text, "text/plain", 43004),
            (b"{not json", "application/json", 40035),
            ({"msgtype": "image", "image": {}}, "application/json", 400105),
            ({"msgtype": "text", "text": {}}, "application/json", 40035),
            ({"msgtype": "markdown", "markdown": {"title": "t"}}, "application/json", 40035),
            ({"msgtype": "actionCard", "actionCard": {"title": "t", "text": "x"}}, "", 40035),
            ({**text, "at": {"atUserIds": "zhangsan"}}, "application/json", 40035),
            (text, "application/json", 0),
            (markdown, "application/json; charset=utf-8", 0),
            (card, "application/json", 0),
        ]
        for body, ctype, errcode in cases:
            status, answer = await post_reply(http, url, body, ctype or "application/json")
            assert (status, answer["errcode"]) == (200, errcode), (body, answer)
        assert answer == {"errcode": 0, "errmsg": "ok"}
        bad_session = url.rsplit("=", 1)[0] + "=" + "0" * 32
        assert (await post_reply(http, bad_session, text))[1] == {
            "errcode": 300001,
            "errmsg": "session 不存在",
        }
        replies = sim.replies(ids["msg_id"])
        assert [r["msgtype"] for r in replies] == ["text", "markdown", "actionCard"]
        assert replies[0]["body"] == text
        assert replies[0]["conversation_id"] == payload["conversationId"]
        assert replies[0]["received_at"] == clock.now
        assert sim.replies("other") == []
        await sim.fault({"throttle_s": 0.2})
        assert (await post_reply(http, url, text))[1]["errcode"] == 130101
        clock.now += 90 * 60 + 1
        assert (await post_reply(http, url, text))[1]["errcode"] == 300001
        async with http.get(f"{sim.base_url}/_sim/replies", params={"msg_id": ids["msg_id"]}) as r:
            assert [x["msgtype"] for x in (await r.json())["replies"]] == [
                "text",
                "markdown",
                "actionCard",
            ]
        await ws.close()


async def test_sim_token_endpoint_returns_stable_token(http: aiohttp.ClientSession) -> None:
    """The token stays the same while valid, changes after expiry, and bad creds get 400."""
    clock = FakeClock()
    async with DingTalkSimulator(clock=clock) as sim:
        url = f"{sim.base_url}/v1.0/oauth2/accessToken"
        good = {"appKey": KEY, "appSecret": SECRET}
        tokens = []
        for advance in (0, 100, 7201):
            clock.now += advance
            async with http.post(url, json=good) as resp:
                assert resp.status == 200
                answer = await resp.json()
                assert answer["expireIn"] == 7200
                assert answer["accessToken"].startswith("tok-")
                tokens.append(answer["accessToken"])
        assert tokens[0] == tokens[1] != tokens[2]
        async with http.post(url, json={"appKey": KEY, "appSecret": "nope"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["code"] == "invalidClientIdOrSecret"


# ---------------------------------------------------------------- control API and page


async def test_sim_control_api_validates_input(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """/_sim/messages, /_sim/faults and /_sim/replies reject bad input with 400 JSON errors."""
    bad_messages: list[Any] = [
        b"nope",
        {"text": "x", "colour": "red"},
        {"text": 5},
        {"text": "x", "conversation_type": "3"},
        {"text": "x", "msgtype": "sticker"},
        {"text": "x", "at_bot": "yes"},
        {"text": "x", "sender_id": ""},
    ]
    for body in bad_messages:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with http.post(f"{sim.base_url}/_sim/messages", data=data) as resp:
            assert resp.status == 400, body
            assert (await resp.json())["error"]
    for spec in ({}, {"explode": True}, {"refuse_s": -1}, {"drop": "yes"}, {"silence_s": "1"}):
        async with http.post(f"{sim.base_url}/_sim/faults", json=spec) as resp:
            assert resp.status == 400, spec
    with pytest.raises(ValueError, match="unknown fault keys"):
        await sim.fault({"explode": True})
    with pytest.raises(ValueError, match="conversation_type"):
        await sim.send_message("x", conversation_type="group")
    async with http.get(f"{sim.base_url}/_sim/replies", params={"after": "x"}) as resp:
        assert resp.status == 400
    good = {"text": "控制", "conversation_type": "2", "sender_id": "bob", "at_bot": False}
    async with http.post(f"{sim.base_url}/_sim/messages", json=good) as resp:
        assert resp.status == 200
        ids = await resp.json()
    assert set(ids) == {"msg_id", "message_id"}
    async with http.get(f"{sim.base_url}/_sim/messages") as resp:
        [logged] = (await resp.json())["messages"]
    assert logged["msg_id"] == ids["msg_id"]
    assert logged["text"] == "控制"
    assert logged["sender_nick"] == "Bob"
    assert logged["at_bot"] is False
    async with http.post(f"{sim.base_url}/_sim/faults", json={"throttle_s": 0.01}) as resp:
        assert await resp.json() == {"ok": True, "applied": ["throttle_s"]}
    async with http.get(f"{sim.base_url}/_sim/state") as resp:
        state = await resp.json()
    assert state["connections"] == 0
    assert state["pending"] == 1
    assert state["acks"] == 0
    assert state["open_calls"] == []


async def test_sim_index_serves_chat_page(
    sim: DingTalkSimulator, http: aiohttp.ClientSession
) -> None:
    """GET / returns a self-contained UTF-8 HTML chat page wired to the control API."""
    async with http.get(f"{sim.base_url}/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.charset == "utf-8"
        page = await resp.text()
    assert page.startswith("<!doctype html>")
    assert "/_sim/messages" in page
    assert "/_sim/replies" in page
    assert "张三" in page
    assert DEFAULT_GROUP_ID in page
    assert "<script src" not in page
    assert "http://" not in page
    assert "https://" not in page
