"""Robot messages sent through the DingTalk OpenAPI (protocols/dingtalk.md §2.3).

The OpenAPI reaches a conversation without a sessionWebhook: when the webhook has expired, or
for a reply sent long after the question. Both calls take ``msgKey`` (the message template) and
``msgParam``, which is a **JSON string**, not an object. The access token is handled by
:meth:`DingTalkAPI.call <imrelay.platforms.dingtalk.api.DingTalkAPI.call>` (cached, refreshed
once on ``InvalidAuthentication``).

An HTTP 200 from ``oToMessages/batchSend`` does not mean delivered: a user listed in
``invalidStaffIdList`` does not exist for this app (a permanent failure), and one listed in
``flowControlledStaffIdList`` was throttled (retry later).

The OpenAPI cannot @-mention anyone: a group reply sent this way loses the mention that the
sessionWebhook would have carried.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final, Protocol

from imrelay.errors import RateLimited
from imrelay.platforms.dingtalk.api import markdown_title
from imrelay.platforms.dingtalk.errors import DingTalkRequestRejected

__all__ = [
    "BATCH_SEND_PATH",
    "FLOW_CONTROLLED_ERRCODE",
    "FLOW_CONTROL_RETRY_AFTER_S",
    "GROUP_SEND_PATH",
    "INVALID_STAFF_ERRCODE",
    "OpenAPICaller",
    "build_msg_param",
    "send_to_group",
    "send_to_user",
]

logger = logging.getLogger(__name__)

BATCH_SEND_PATH: Final = "/v1.0/robot/oToMessages/batchSend"
GROUP_SEND_PATH: Final = "/v1.0/robot/groupMessages/send"
#: How long to wait after DingTalk flow-controlled a 1:1 send (it gives no time).
FLOW_CONTROL_RETRY_AFTER_S: Final = 2.0
#: The ``errcode`` of the RateLimited raised for a user in ``flowControlledStaffIdList``.
FLOW_CONTROLLED_ERRCODE: Final = "flowControlledStaffIdList"
#: The ``errcode`` of the error raised for a user in ``invalidStaffIdList``.
INVALID_STAFF_ERRCODE: Final = "invalidStaffIdList"


class OpenAPICaller(Protocol):
    """What the send functions need: :class:`~imrelay.platforms.dingtalk.api.DingTalkAPI`."""

    platform: str

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, what: str = ""
    ) -> dict[str, Any]:
        """Call a token-guarded endpoint; return its JSON object or raise."""
        ...


def build_msg_param(text: str, *, markdown: bool, title: str = "") -> tuple[str, str]:
    """Return ``(msgKey, msgParam)`` for a text or markdown robot message (§2.3).

    Args:
        text: the body (markdown when ``markdown``).
        markdown: use ``sampleMarkdown`` (``{title, text}``) rather than ``sampleText``
            (``{content}``).
        title: the markdown title shown in chat lists (default: the first line, ≤ 20 chars).

    Returns:
        The template key and its parameters as a JSON string.
    """
    if markdown:
        param: dict[str, str] = {"title": title or markdown_title(text), "text": text}
        key = "sampleMarkdown"
    else:
        param = {"content": text}
        key = "sampleText"
    return key, json.dumps(param, ensure_ascii=False)


def _str_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str)]


async def send_to_user(
    api: OpenAPICaller,
    robot_code: str,
    user_id: str,
    text: str,
    markdown: bool,
    title: str = "",
) -> str:
    """Send a 1:1 message to one user through ``oToMessages/batchSend``.

    Args:
        api: the app's API client.
        robot_code: the robot code (the app key for enterprise-internal apps).
        user_id: the user's staffId (``senderStaffId``).
        text: the body.
        markdown: send markdown rather than plain text.
        title: the markdown title.

    Returns:
        The ``processQueryKey`` (empty when DingTalk gave none).

    Raises:
        DingTalkRequestRejected: the user is in ``invalidStaffIdList`` (not retryable), or
            ``user_id`` is empty.
        RateLimited: the user is in ``flowControlledStaffIdList`` (retry later).
        PlatformAPIError: the call failed (see :meth:`DingTalkAPI.call`).
    """
    if not user_id:
        raise DingTalkRequestRejected(
            "no user id to send a 1:1 message to", platform=api.platform, errcode="no_user_id"
        )
    msg_key, msg_param = build_msg_param(text, markdown=markdown, title=title)
    body = {
        "robotCode": robot_code,
        "userIds": [user_id],
        "msgKey": msg_key,
        "msgParam": msg_param,
    }
    answer = await api.call("POST", BATCH_SEND_PATH, body, what="1:1 robot message send")
    if user_id in _str_list(answer, INVALID_STAFF_ERRCODE):
        raise DingTalkRequestRejected(
            "dingtalk does not know the recipient (invalidStaffIdList)",
            platform=api.platform,
            errcode=INVALID_STAFF_ERRCODE,
            status=200,
        )
    if user_id in _str_list(answer, FLOW_CONTROLLED_ERRCODE):
        raise RateLimited(
            "dingtalk flow-controlled the recipient (flowControlledStaffIdList)",
            retry_after=FLOW_CONTROL_RETRY_AFTER_S,
            platform=api.platform,
            errcode=FLOW_CONTROLLED_ERRCODE,
            status=200,
        )
    key = answer.get("processQueryKey")
    logger.debug("1:1 robot message accepted")
    return key if isinstance(key, str) else ""


async def send_to_group(
    api: OpenAPICaller,
    robot_code: str,
    open_conversation_id: str,
    text: str,
    markdown: bool,
    title: str = "",
) -> str:
    """Send a message to a group through ``groupMessages/send`` (no @-mention possible).

    Args:
        api: the app's API client.
        robot_code: the robot code (the app key for enterprise-internal apps).
        open_conversation_id: the group's ``conversationId`` as the bot received it.
        text: the body.
        markdown: send markdown rather than plain text.
        title: the markdown title.

    Returns:
        The ``processQueryKey`` (empty when DingTalk gave none).

    Raises:
        DingTalkRequestRejected: ``open_conversation_id`` is empty, or DingTalk refused the
            group for good (e.g. ``invalid.openConversationId``).
        PlatformAPIError: the call failed (see :meth:`DingTalkAPI.call`).
    """
    if not open_conversation_id:
        raise DingTalkRequestRejected(
            "no conversation id to send a group message to",
            platform=api.platform,
            errcode="no_conversation_id",
        )
    msg_key, msg_param = build_msg_param(text, markdown=markdown, title=title)
    body = {
        "robotCode": robot_code,
        "openConversationId": open_conversation_id,
        "msgKey": msg_key,
        "msgParam": msg_param,
    }
    answer = await api.call("POST", GROUP_SEND_PATH, body, what="group robot message send")
    key = answer.get("processQueryKey")
    logger.debug("group robot message accepted")
    return key if isinstance(key, str) else ""
