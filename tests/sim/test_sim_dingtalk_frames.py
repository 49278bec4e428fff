"""The text of the DingTalk simulator's bot-message frames, read by a WebSocket client.

The frames and their ``data`` payloads are assembled from pieces; these tests pin that the
text is exactly what ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))`` writes for
the same keys in the same order (protocols/dingtalk.md §1.3, §1.7).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from imrelay.sim.dingtalk import BOT_MESSAGE_TOPIC, DingTalkSimulator

BASE_KEYS = [
    "conversationId",
    "atUsers",
    "chatbotCorpId",
    "chatbotUserId",
    "msgId",
    "senderNick",
    "isAdmin",
    "senderStaffId",
    "sessionWebhookExpiredTime",
    "createAt",
    "senderCorpId",
    "conversationType",
    "senderId",
    "isInAtList",
    "sessionWebhook",
    "robotCode",
    "msgtype",
]


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@pytest.fixture
async def bot(dingtalk_sim: DingTalkSimulator) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A WebSocket subscribed to bot messages."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        body = {
            "clientId": dingtalk_sim.app_key,
            "clientSecret": dingtalk_sim.app_secret,
            "subscriptions": [{"type": "CALLBACK", "topic": BOT_MESSAGE_TOPIC}],
        }
        async with http.post(
            f"{dingtalk_sim.base_url}/v1.0/gateway/connections/open", json=body
        ) as resp:
            ticket = await resp.json()
        async with http.ws_connect(f"{ticket['endpoint']}?ticket={ticket['ticket']}") as ws:
            yield ws


@pytest.mark.parametrize(
    ("kwargs", "content_keys"),
    [
        ({"text": 'plain "quoted" \\ 中文\n\u2028'}, ["text"]),
        ({"text": "hi", "conversation_type": "2"}, ["text"]),
        ({"text": "hi", "conversation_type": "2", "at_bot": False, "is_admin": True}, ["text"]),
        (
            {"text": "x", "sender_id": 'we"ird', "sender_nick": "尼克", "msg_id": "msg\\1"},
            ["text"],
        ),
        ({"text": "", "msgtype": "picture"}, ["content"]),
        ({"text": "rich", "msgtype": "richText", "conversation_type": "2"}, ["content"]),
        ({"text": "语音", "msgtype": "audio"}, ["content"]),
        ({"text": "a.txt", "msgtype": "file"}, ["content"]),
        ({"text": "", "msgtype": "unknownMsgType"}, ["content", "ai_robot_sessionid"]),
    ],
)
async def test_sim_bot_message_frames_are_json_dumps_text(
    dingtalk_sim: DingTalkSimulator,
    bot: aiohttp.ClientWebSocketResponse,
    kwargs: dict[str, Any],
    content_keys: list[str],
) -> None:
    """Frame and payload text equal their compact ``json.dumps``, keys in the §1.7 order."""
    ids = await dingtalk_sim.send_message(**kwargs)
    raw = (await bot.receive(timeout=5)).data
    frame = json.loads(raw)
    assert raw == compact(frame)
    assert list(frame) == ["specVersion", "type", "headers", "data"]
    assert frame["headers"]["messageId"] == ids["message_id"]
    data = frame["data"]
    payload = json.loads(data)
    assert data == compact(payload)
    group = kwargs.get("conversation_type") == "2"
    assert list(payload) == BASE_KEYS + (["conversationTitle"] if group else []) + content_keys
    assert payload["msgId"] == ids["msg_id"]
    assert payload["isAdmin"] is kwargs.get("is_admin", False)
    assert payload["isInAtList"] is (kwargs.get("at_bot", True) or not group)
    if group and kwargs.get("at_bot", True):
        assert payload["atUsers"] == [{"dingtalkId": payload["chatbotUserId"]}]
    else:
        assert payload["atUsers"] == []
    if "sender_id" in kwargs:
        assert payload["senderStaffId"] == kwargs["sender_id"]
        assert payload["senderNick"] == kwargs["sender_nick"]
    if kwargs.get("msgtype", "text") == "text":
        leading = " " if group and kwargs.get("at_bot", True) else ""
        assert payload["text"] == {"content": leading + kwargs["text"]}
