"""DingTalk (钉钉) enterprise-internal app bots.

``protocol`` is the sans-I/O Stream codec, ``events`` turns bot-message payloads into
:class:`~imrelay.message.InboundMessage`, ``api`` makes the REST calls and ``errors`` maps
DingTalk error codes to exceptions.
"""

from __future__ import annotations

from imrelay.platforms.dingtalk.api import (
    DingTalkAPI,
    build_webhook_body,
    is_session_webhook_expired,
)
from imrelay.platforms.dingtalk.errors import (
    DingTalkInvalidCredentials,
    DingTalkMissingToken,
    DingTalkQpsLimited,
    DingTalkRequestRejected,
    DingTalkServerError,
    DingTalkSessionExpired,
    DingTalkTokenInvalid,
    DingTalkWebhookThrottled,
    UnknownDingTalkError,
    error_from_response,
)
from imrelay.platforms.dingtalk.events import parse_bot_message
from imrelay.platforms.dingtalk.protocol import (
    DEFAULT_SUBSCRIPTIONS,
    MAX_FRAME_BYTES,
    TOPIC_BOT_DELEGATE,
    TOPIC_BOT_MESSAGE,
    TOPIC_DISCONNECT,
    TOPIC_PING,
    Frame,
    FrameType,
    build_ack,
    build_open_request,
    build_ping_ack,
    build_ws_url,
    parse_frame,
    parse_open_response,
)

__all__ = [
    "DEFAULT_SUBSCRIPTIONS",
    "MAX_FRAME_BYTES",
    "TOPIC_BOT_DELEGATE",
    "TOPIC_BOT_MESSAGE",
    "TOPIC_DISCONNECT",
    "TOPIC_PING",
    "DingTalkAPI",
    "DingTalkInvalidCredentials",
    "DingTalkMissingToken",
    "DingTalkQpsLimited",
    "DingTalkRequestRejected",
    "DingTalkServerError",
    "DingTalkSessionExpired",
    "DingTalkTokenInvalid",
    "DingTalkWebhookThrottled",
    "Frame",
    "FrameType",
    "UnknownDingTalkError",
    "build_ack",
    "build_open_request",
    "build_ping_ack",
    "build_webhook_body",
    "build_ws_url",
    "error_from_response",
    "is_session_webhook_expired",
    "parse_bot_message",
    "parse_frame",
    "parse_open_response",
]
