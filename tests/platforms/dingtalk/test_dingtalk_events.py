"""Tier 1 tests of DingTalk bot-message parsing (protocol doc §1.7)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imrelay.errors import ProtocolError
from imrelay.message import Attachment, InboundMessage
from imrelay.platforms.dingtalk.events import parse_bot_message

# The doc's minimal realistic sample (group text).
GROUP_TEXT: dict[str, Any] = {
    "conversationId": "cidAsXSBLnA==",
    "atUsers": [{"dingtalkId": "$:LWCP_v1:$abc"}],
    "chatbotCorpId": "ding9f",
    "chatbotUserId": "$:LWCP_v1:$abc",
    "msgId": "msgLICYe==",
    "senderNick": "用户",
    "isAdmin": True,
    "senderStaffId": "16650698",
    "sessionWebhookExpiredTime": 1690367502152,
    "createAt": 1690362101894,
    "senderCorpId": "ding9f",
    "conversationType": "2",
    "senderId": "$:LWCP_v1:$xyz",
    "conversationTitle": "测试群",
    "isInAtList": True,
    "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=76da",
    "text": {"content": " 测试数据"},
    "robotCode": "dingrobot",
    "msgtype": "text",
}


def _direct(**fields: Any) -> dict[str, Any]:
    base = {
        "msgId": "msg1==",
        "conversationId": "cidDirect==",
        "conversationType": "1",
        "senderId": "$:LWCP_v1:$s",
        "senderStaffId": "staff01",
        "senderNick": "Ann",
        "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=aa",
        "sessionWebhookExpiredTime": 1690367502152,
        "robotCode": "dingrobot",
    }
    base.update(fields)
    return base


def _parse(data: Any, **kwargs: Any) -> InboundMessage:
    return parse_bot_message(data, platform="dt", received_at=12.5, **kwargs)


def test_parse_bot_message_group_text() -> None:
    """The doc's group text sample maps onto every InboundMessage field."""
    msg = _parse(GROUP_TEXT, frame_message_id="212ca9d7_974")
    assert msg.platform == "dt"
    assert msg.message_id == "msgLICYe=="
    assert msg.conversation.id == "cidAsXSBLnA=="
    assert msg.conversation.kind == "group"
    assert msg.conversation.title == "测试群"
    assert msg.sender.id == "16650698"
    assert msg.sender.name == "用户"
    assert msg.sender.is_admin is True
    assert msg.kind == "text"
    assert msg.text == "测试数据"
    assert msg.received_at == 12.5
    assert msg.ingress == "stream"
    assert msg.mentions_bot is True
    assert msg.attachments == ()
    assert msg.reply_to == {
        "session_webhook": "https://oapi.dingtalk.com/robot/sendBySession?session=76da",
        "expires_at_ms": 1690367502152,
        "sender_staff_id": "16650698",
        "conversation_type": "2",
        "robot_code": "dingrobot",
    }
    assert msg.dedup_keys == ("frame:212ca9d7_974",)
    assert msg.raw == GROUP_TEXT
    assert InboundMessage.from_dict(json.loads(json.dumps(msg.to_dict()))) == msg


def test_parse_bot_message_group_without_mention() -> None:
    """A group message not @-mentioning the bot has mentions_bot False."""
    msg = _parse({**GROUP_TEXT, "isInAtList": False})
    assert msg.mentions_bot is False
    msg = _parse({k: v for k, v in GROUP_TEXT.items() if k != "isInAtList"})
    assert msg.mentions_bot is False


def test_parse_bot_message_direct_mentions_bot() -> None:
    """A 1:1 message always counts as addressed to the bot and has no title."""
    msg = _parse(_direct(msgtype="text", text={"content": "hello"}), ingress="webhook")
    assert msg.conversation.kind == "direct"
    assert msg.conversation.title == ""
    assert msg.mentions_bot is True
    assert msg.sender.is_admin is False
    assert msg.ingress == "webhook"
    assert msg.dedup_keys == ()
    assert msg.reply_to["conversation_type"] == "1"


def test_parse_bot_message_strips_surrounding_whitespace() -> None:
    """The leading space left by a stripped @mention and trailing newlines are removed."""
    msg = _parse(_direct(msgtype="text", text={"content": "  what is 1+1? \n"}))
    assert msg.text == "what is 1+1?"


def test_parse_bot_message_external_sender_uses_sender_id() -> None:
    """Without a senderStaffId (external user) the encrypted senderId identifies the sender."""
    msg = _parse(_direct(senderStaffId="", msgtype="text", text={"content": "x"}))
    assert msg.sender.id == "$:LWCP_v1:$s"
    assert msg.reply_to["sender_staff_id"] == ""


def test_parse_bot_message_picture() -> None:
    """A picture becomes an image attachment with its downloadCode."""
    msg = _parse(
        _direct(msgtype="picture", content={"downloadCode": "dc1", "pictureDownloadCode": "p1"})
    )
    assert msg.kind == "image"
    assert msg.text == ""
    assert msg.attachments == (Attachment("image", "dc1"),)


def test_parse_bot_message_picture_download_code_fallback() -> None:
    """pictureDownloadCode is used when downloadCode is absent."""
    msg = _parse(_direct(msgtype="picture", content={"pictureDownloadCode": "p1"}))
    assert msg.attachments == (Attachment("image", "p1"),)


def test_parse_bot_message_rich_text_order() -> None:
    """richText text joins with newlines; with pictures, every segment is kept in order."""
    content = {
        "richText": [
            {"text": " first"},
            {"type": "picture", "downloadCode": "img1", "pictureDownloadCode": "p1"},
            {"text": "second"},
            {"type": "picture", "pictureDownloadCode": "img2"},
            {"type": "emoji", "code": "[smile]"},
            {"type": "text", "text": "third "},
            {"type": "picture"},
        ]
    }
    msg = _parse(_direct(msgtype="richText", content=content))
    assert msg.kind == "rich"
    assert msg.text == "first\nsecond\nthird"
    assert msg.attachments == (
        Attachment("text", "", text="first"),
        Attachment("image", "img1"),
        Attachment("text", "", text="second"),
        Attachment("image", "img2"),
        Attachment("text", "", text="third"),
    )


def test_parse_bot_message_rich_text_without_pictures_has_no_attachments() -> None:
    """A richText message of text only reads like a text message: no attachments."""
    content = {"richText": [{"text": "one"}, {"text": "two"}]}
    msg = _parse(_direct(msgtype="richText", content=content))
    assert (msg.text, msg.attachments) == ("one\ntwo", ())


def test_parse_bot_message_audio_recognition() -> None:
    """Audio carries the speech recognition as text and on its attachment."""
    content = {"downloadCode": "au1", "recognition": "你好", "duration": 3000}
    msg = _parse(_direct(msgtype="audio", content=content))
    assert msg.kind == "audio"
    assert msg.text == "你好"
    assert msg.attachments == (Attachment("audio", "au1", "", "你好"),)


def test_parse_bot_message_video() -> None:
    """Video becomes a video attachment."""
    content = {"downloadCode": "v1", "videoType": "mp4", "duration": "5"}
    msg = _parse(_direct(msgtype="video", content=content))
    assert msg.kind == "video"
    assert msg.attachments == (Attachment("video", "v1"),)


def test_parse_bot_message_file() -> None:
    """A file becomes a file attachment named after fileName."""
    content = {"downloadCode": "f1", "fileName": "a.zip", "fileId": "id", "spaceId": "sp"}
    msg = _parse(_direct(msgtype="file", content=content))
    assert msg.kind == "file"
    assert msg.text == ""
    assert msg.attachments == (Attachment("file", "f1", "a.zip"),)


def test_parse_bot_message_unknown_msg_type() -> None:
    """unknownMsgType (and any type we do not know) is 'unsupported' with no text."""
    data = _direct(
        msgtype="unknownMsgType",
        content={"unknownMsgType": "用户发送了一条消息，机器人暂不支持接收。"},
        ai_robot_sessionid="x",
    )
    msg = _parse(data)
    assert (msg.kind, msg.text, msg.attachments) == ("unsupported", "", ())
    assert _parse(_direct(msgtype="interactiveCard")).kind == "unsupported"
    assert _parse(_direct()).kind == "unsupported"


@pytest.mark.parametrize("msgtype", ["text", "picture", "richText", "audio", "video", "file"])
def test_parse_bot_message_quota_exhausted_payload(msgtype: str) -> None:
    """A quota-exhausted payload (no text/content, an errMsg) parses with empty text."""
    msg = _parse(_direct(msgtype=msgtype, errMsg="受调用量超量影响，已经暂停", errorCode=20001))
    assert msg.text == ""
    assert msg.attachments == ()


def test_parse_bot_message_expiry_variants() -> None:
    """The webhook expiry accepts numbers and numeric strings, and is 0 when absent."""
    assert (
        _parse(_direct(sessionWebhookExpiredTime="1690367502152")).reply_to["expires_at_ms"]
        == 1690367502152
    )
    assert _parse(_direct(sessionWebhookExpiredTime=1.6e12)).reply_to["expires_at_ms"] == int(
        1.6e12
    )
    data = _direct()
    del data["sessionWebhookExpiredTime"], data["sessionWebhook"], data["robotCode"]
    reply_to = _parse(data).reply_to
    assert reply_to["expires_at_ms"] == 0
    assert reply_to["session_webhook"] == ""
    assert reply_to["robot_code"] == ""


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"msgId": None}, "msgId"),
        ({"msgId": ""}, "msgId"),
        ({"msgId": 5}, "msgId"),
        ({"conversationId": None}, "conversationId"),
        ({"conversationType": "3"}, "conversationType"),
        ({"conversationType": 1}, "conversationType"),
        ({"conversationType": None}, "conversationType"),
        ({"senderStaffId": "", "senderId": ""}, "sender"),
        ({"senderStaffId": 7}, "senderStaffId"),
        ({"senderNick": ["x"]}, "senderNick"),
        ({"isAdmin": "yes"}, "isAdmin"),
        ({"isInAtList": 1}, "isInAtList"),
        ({"msgtype": 3}, "msgtype"),
        ({"msgtype": "text", "text": "hello"}, "text"),
        ({"msgtype": "text", "text": {"content": 5}}, "content"),
        ({"msgtype": "picture", "content": "x"}, "content"),
        ({"msgtype": "picture", "content": {"downloadCode": 5}}, "downloadCode"),
        ({"msgtype": "richText", "content": {"richText": {"text": "x"}}}, "richText"),
        ({"msgtype": "richText", "content": {"richText": ["x"]}}, "richText"),
        ({"msgtype": "richText", "content": {"richText": [{"text": 1}]}}, "text"),
        ({"msgtype": "file", "content": {"downloadCode": "d", "fileName": 1}}, "fileName"),
        ({"sessionWebhookExpiredTime": "soon"}, "sessionWebhookExpiredTime"),
        ({"sessionWebhookExpiredTime": True}, "sessionWebhookExpiredTime"),
        ({"sessionWebhookExpiredTime": float("inf")}, "sessionWebhookExpiredTime"),
        ({"sessionWebhook": 1}, "sessionWebhook"),
    ],
)
def test_parse_bot_message_rejects_bad_fields(changes: dict[str, Any], reason: str) -> None:
    """Missing required fields and wrongly typed fields raise ProtocolError naming the field."""
    data = {k: v for k, v in _direct().items() if changes.get(k, 0) is not None}
    data.update({k: v for k, v in changes.items() if v is not None})
    with pytest.raises(ProtocolError) as info:
        _parse(data)
    assert reason in str(info.value)
    assert info.value.platform == "dt"
    assert str(info.value)[0].islower()


@pytest.mark.parametrize("data", [None, [], "x", 5])
def test_parse_bot_message_rejects_non_objects(data: Any) -> None:
    """A payload that is not an object raises ProtocolError."""
    with pytest.raises(ProtocolError):
        _parse(data)


# -- properties -------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_KEYS = [*GROUP_TEXT.keys(), "content", "errMsg"]


def _check(data: Any) -> None:
    try:
        msg = _parse(data)
    except ProtocolError:
        return
    assert msg.message_id
    assert msg.conversation.kind in ("direct", "group")
    assert msg.sender.id
    assert isinstance(msg.text, str)
    json.dumps(msg.to_dict())


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), _json, max_size=10) | _json)
def test_parse_bot_message_property_random_dicts(data: Any) -> None:
    """For any JSON value, parse_bot_message returns a message or raises ProtocolError."""
    _check(data)


_PAYLOADS = [
    GROUP_TEXT,
    _direct(msgtype="picture", content={"downloadCode": "d"}),
    _direct(
        msgtype="richText",
        content={"richText": [{"text": "a"}, {"type": "picture", "downloadCode": "i"}]},
    ),
    _direct(msgtype="audio", content={"downloadCode": "a", "recognition": "r"}),
    _direct(msgtype="file", content={"downloadCode": "f", "fileName": "n"}),
]


@st.composite
def _mutations(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(draw(st.sampled_from(_PAYLOADS)))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(sorted(data)))
        target: Any = data
        # sometimes descend one level into a nested object before mutating
        if isinstance(data[key], dict) and data[key] and draw(st.booleans()):
            target = data[key]
            key = draw(st.sampled_from(sorted(target)))
        if draw(st.booleans()):
            target[key] = draw(_json)
        else:
            del target[key]
    return data


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_parse_bot_message_property_mutated_payloads(data: dict[str, Any]) -> None:
    """Mutating or deleting fields of valid payloads never raises anything but ProtocolError."""
    _check(data)
