"""DingTalk bot-message payloads → :class:`~imrelay.message.InboundMessage`.

The payload (protocol doc §1.7) is the same in Stream mode (the ``data`` of a
``/v1.0/im/bot/messages/get`` frame) and HTTP mode (the POST body). Parsing is strict about
types (a wrong type is a :class:`~imrelay.errors.ProtocolError`, never another exception) and
tolerant about absence: a payload cut short by an exhausted quota (no ``text``/``content``,
errcode 20001 in §4) still parses, with empty text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from imrelay.errors import ProtocolError
from imrelay.message import (
    Attachment,
    Conversation,
    ConversationKind,
    InboundMessage,
    Ingress,
    MessageKind,
    Sender,
)

__all__ = ["parse_bot_message"]

_KINDS: Final[Mapping[str, MessageKind]] = {
    "text": "text",
    "picture": "image",
    "audio": "audio",
    "video": "video",
    "file": "file",
    "richText": "rich",
}
_CONVERSATION_KINDS: Final[Mapping[str, ConversationKind]] = {"1": "direct", "2": "group"}


def _opt_str(obj: Mapping[str, Any], key: str, where: str = "payload") -> str:
    """``obj[key]`` as a string; "" when absent or null."""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError(f"{where} field {key!r} is not a string")
    return value


def _req_str(obj: Mapping[str, Any], key: str) -> str:
    value = _opt_str(obj, key)
    if not value:
        raise ProtocolError(f"payload field {key!r} is missing or empty")
    return value


def _opt_bool(obj: Mapping[str, Any], key: str) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(f"payload field {key!r} is not a boolean")
    return value


def _opt_object(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ProtocolError(f"payload field {key!r} is not an object")
    return value


def _expiry_ms(obj: Mapping[str, Any]) -> int:
    """``sessionWebhookExpiredTime`` in epoch ms (a number, or a numeric string); 0 if absent."""
    value = obj.get("sessionWebhookExpiredTime")
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ProtocolError("payload field 'sessionWebhookExpiredTime' is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value.strip())
    raise ProtocolError("payload field 'sessionWebhookExpiredTime' is not a number")


def _download_code(content: Mapping[str, Any], where: str) -> str:
    return _opt_str(content, "downloadCode", where) or _opt_str(
        content, "pictureDownloadCode", where
    )


def _rich_text(content: Mapping[str, Any]) -> tuple[str, tuple[Attachment, ...]]:
    """Join the text items of a richText payload; keep its segments in order.

    When the message holds pictures, the attachments list every segment in payload order:
    ``Attachment("text", "", text=…)`` for a non-blank text item, ``Attachment("image", code)``
    for a picture, so the interleaving survives. Without pictures there are no attachments.
    """
    items = content.get("richText")
    if items is None:
        return "", ()
    if not isinstance(items, list):
        raise ProtocolError("payload field 'content.richText' is not a list")
    texts: list[str] = []
    segments: list[Attachment] = []
    for item in items:
        if not isinstance(item, Mapping):
            raise ProtocolError("richText item is not an object")
        item_type = _opt_str(item, "type", "richText item")
        if item_type == "picture":
            code = _download_code(item, "richText item")
            if code:
                segments.append(Attachment("image", code))
        elif "text" in item:
            text = _opt_str(item, "text", "richText item")
            texts.append(text)
            if text.strip():
                segments.append(Attachment("text", "", text=text.strip()))
    pictures = any(a.kind == "image" for a in segments)
    return "\n".join(texts).strip(), tuple(segments) if pictures else ()


def _body(
    msgtype: str, data: Mapping[str, Any]
) -> tuple[MessageKind, str, tuple[Attachment, ...]]:
    """The kind, text and attachments of a message."""
    kind: MessageKind = _KINDS.get(msgtype, "unsupported")
    if kind == "text":
        text_obj = _opt_object(data, "text")
        return kind, _opt_str(text_obj, "content", "text").strip(), ()
    if kind == "unsupported":
        return kind, "", ()
    content = _opt_object(data, "content")
    if kind == "rich":
        rich, images = _rich_text(content)
        return kind, rich, images
    code = _download_code(content, "content")
    name = _opt_str(content, "fileName", "content") if kind == "file" else ""
    recognition = _opt_str(content, "recognition", "content") if kind == "audio" else ""
    attachments = (Attachment(kind, code, name, recognition),) if code else ()
    return kind, recognition.strip(), attachments


def parse_bot_message(
    data: Mapping[str, Any],
    *,
    platform: str,
    received_at: float,
    frame_message_id: str = "",
    ingress: Ingress = "stream",
) -> InboundMessage:
    """Turn a bot-message payload (§1.7) into an :class:`InboundMessage`.

    Args:
        data: the decoded payload.
        platform: the configured platform name.
        received_at: when it arrived (epoch seconds).
        frame_message_id: the Stream frame's ``headers.messageId``, a second dedup key.
        ingress: ``"stream"`` or ``"webhook"``.

    Returns:
        The message. ``reply_to`` holds ``session_webhook``, ``expires_at_ms``,
        ``sender_staff_id``, ``conversation_type`` and ``robot_code``.

    Raises:
        ProtocolError: the payload is unusable (no ``msgId``, no conversation, no sender, an
            unknown conversation type, or a field of the wrong type). No other exception is
            raised for any input.
    """
    try:
        return _parse(data, platform, received_at, frame_message_id, ingress)
    except ProtocolError as exc:
        exc.platform = platform
        raise


def _parse(
    data: Mapping[str, Any],
    platform: str,
    received_at: float,
    frame_message_id: str,
    ingress: Ingress,
) -> InboundMessage:
    if not isinstance(data, Mapping):
        raise ProtocolError("payload is not an object")
    message_id = _req_str(data, "msgId")
    conversation_id = _req_str(data, "conversationId")
    conversation_type = data.get("conversationType")
    if not isinstance(conversation_type, str) or conversation_type not in _CONVERSATION_KINDS:
        raise ProtocolError("payload field 'conversationType' is not '1' or '2'")
    conversation_kind = _CONVERSATION_KINDS[conversation_type]
    staff_id = _opt_str(data, "senderStaffId")
    sender_id = staff_id or _opt_str(data, "senderId")
    if not sender_id:
        raise ProtocolError("payload has neither 'senderStaffId' nor 'senderId'")
    msgtype = _opt_str(data, "msgtype")
    kind, text, attachments = _body(msgtype, data)
    return InboundMessage(
        platform=platform,
        message_id=message_id,
        conversation=Conversation(
            id=conversation_id,
            kind=conversation_kind,
            title=_opt_str(data, "conversationTitle"),
        ),
        sender=Sender(
            id=sender_id,
            name=_opt_str(data, "senderNick"),
            is_admin=_opt_bool(data, "isAdmin"),
        ),
        kind=kind,
        text=text,
        received_at=received_at,
        ingress=ingress,
        mentions_bot=_opt_bool(data, "isInAtList") or conversation_kind == "direct",
        attachments=attachments,
        reply_to={
            "session_webhook": _opt_str(data, "sessionWebhook"),
            "expires_at_ms": _expiry_ms(data),
            "sender_staff_id": staff_id,
            "conversation_type": conversation_type,
            "robot_code": _opt_str(data, "robotCode"),
        },
        dedup_keys=(f"frame:{frame_message_id}",) if frame_message_id else (),
        raw=dict(data),
    )
