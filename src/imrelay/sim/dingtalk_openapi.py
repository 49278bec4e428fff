"""OpenAPI robot sends for the DingTalk simulator (protocols/dingtalk.md §2.3, §4, §6.11).

Theory of operation: :class:`OpenAPIExtension` adds the two send endpoints to a
:class:`~imrelay.sim.dingtalk.DingTalkSimulator`:

* ``POST /v1.0/robot/oToMessages/batchSend`` ``{robotCode, userIds, msgKey, msgParam}``
* ``POST /v1.0/robot/groupMessages/send`` ``{robotCode, openConversationId, msgKey, msgParam}``

Each checks the access token (``sim.check_token``), that ``robotCode`` is the app key, that
``msgKey`` is a known template and ``msgParam`` a **JSON string** holding that template's keys
(400 ``invalidParameter.msgKey.invalid`` / ``invalidParameter.msgParam.invalid``). A 1:1 send
to a user the simulator has never seen lands in ``invalidStaffIdList``; a group send to an
unknown group gets 400 ``invalid.openConversationId``. Every delivered message is recorded
with ``sim.record_reply(None, conversation_id, msgtype, body)`` (for 1:1 the conversation is
``sim.direct_conversation_id(user)``), where ``body`` is shaped like the sessionWebhook body of
the same message (``{"msgtype": "markdown", "markdown": {"title", "text"}}`` …) plus
``"via": "openapi"``, so tests and the chat page treat both channels alike.

Faults (``sim.fault(...)`` / ``POST /_sim/faults``):

* ``{"throttle": {"qps": N, "seconds": S}}`` — for S seconds (default 10), each API accepts at
  most N sends in any second: beyond that the OpenAPI answers 403
  ``Forbidden.AccessDenied.QpsLimitForAppkeyAndApi`` and the sessionWebhook errcode 130101
  (through ``sim.set_send_gate``). Only accepted sends count, so a client that backs off gets
  through. The sessionWebhook, 1:1 and group sends are three APIs with a window each; other
  extensions get a window for their own APIs by asking ``sim.admit_send(api)``.
* ``{"flow_control": {"users": [ids], "times": N}}`` — the next N (default 1) 1:1 sends to
  each of these users are not delivered: the user lands in ``flowControlledStaffIdList``.
* ``{"expire_sessions": true}`` — every sessionWebhook handed out so far answers 300001.
* ``{"token_invalid": true}`` — the current access token stops working: the next
  token-guarded call gets 401 ``InvalidAuthentication`` and the client must fetch a new one.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from imrelay.sim._common import (
    api_error,
    json_response,
    read_json_object,
    require_seconds,
)

if TYPE_CHECKING:
    from imrelay.sim.dingtalk import DingTalkSimulator

__all__ = ["BATCH_SEND_PATH", "GROUP_SEND_PATH", "MSG_KEYS", "OpenAPIExtension"]

BATCH_SEND_PATH: Final = "/v1.0/robot/oToMessages/batchSend"
GROUP_SEND_PATH: Final = "/v1.0/robot/groupMessages/send"
_MAX_USER_IDS: Final = 20
_DEFAULT_THROTTLE_S: Final = 10.0

#: Every ``msgKey`` the robot send APIs accept, with the ``msgParam`` keys each requires (§2.3).
MSG_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "sampleText": ("content",),
    "sampleMarkdown": ("title", "text"),
    "sampleImageMsg": ("photoURL",),
    "sampleLink": ("text", "title", "picUrl", "messageUrl"),
    "sampleActionCard": ("title", "text", "singleTitle", "singleURL"),
    **{
        f"sampleActionCard{n}": ("title", "text", "actionTitle1", "actionURL1")
        for n in range(2, 6)
    },
    "sampleActionCard6": (
        "title", "text", "buttonTitle1", "buttonUrl1", "buttonTitle2", "buttonUrl2",
    ),
    "sampleAudio": ("mediaId", "duration"),
    "sampleFile": ("mediaId", "fileName", "fileType"),
    "sampleVideo": ("duration", "videoMediaId", "videoType", "picMediaId"),
}  # fmt: skip


def _rendered(msg_key: str, param: Mapping[str, Any]) -> dict[str, Any]:
    """The sessionWebhook-shaped body of a validated template message, marked ``via``."""
    if msg_key == "sampleText":
        body: dict[str, Any] = {"msgtype": "text", "text": {"content": param["content"]}}
    elif msg_key == "sampleMarkdown":
        markdown = {"title": param["title"], "text": param["text"]}
        body = {"msgtype": "markdown", "markdown": markdown}
    elif msg_key == "sampleLink":
        link = {k: param[k] for k in ("title", "text", "messageUrl", "picUrl")}
        body = {"msgtype": "link", "link": link}
    elif msg_key == "sampleActionCard":
        card = {k: param[k] for k in ("title", "text", "singleTitle", "singleURL")}
        body = {"msgtype": "actionCard", "actionCard": card}
    elif msg_key.startswith("sampleActionCard"):
        prefix = ("buttonTitle", "buttonUrl") if msg_key == "sampleActionCard6" else None
        title_key, url_key = prefix or ("actionTitle", "actionURL")
        btns = [
            {"title": param[f"{title_key}{i}"], "actionURL": param.get(f"{url_key}{i}", "")}
            for i in range(1, 6)
            if f"{title_key}{i}" in param
        ]
        card = {"title": param["title"], "text": param["text"], "btns": btns}
        body = {"msgtype": "actionCard", "actionCard": card}
    else:
        kind = {
            "sampleImageMsg": "image",
            "sampleAudio": "audio",
            "sampleFile": "file",
            "sampleVideo": "video",
        }[msg_key]
        body = {"msgtype": kind, kind: dict(param)}
    body["via"] = "openapi"
    return body


class OpenAPIExtension:
    """The simulator's OpenAPI robot-send endpoints and faults (see the module docstring).

    Args:
        max_records: how many recent sends :attr:`sends` keeps.
    """

    name = "openapi"
    fault_keys: frozenset[str] = frozenset(
        {"throttle", "flow_control", "expire_sessions", "token_invalid"}
    )

    def __init__(self, *, max_records: int = 100_000) -> None:
        self._sim: DingTalkSimulator | None = None
        #: the most recent accepted sends: ``{"kind": "direct"|"group", "msg_key", …}``
        self.sends: deque[dict[str, Any]] = deque(maxlen=max_records)
        self.direct_sends = 0
        self.group_sends = 0
        self.token_rejections = 0
        self.bad_requests = 0
        self.invalid_staff = 0
        self.throttled = 0
        self.tokens_invalidated = 0
        self.sessions_expired = 0
        self._qps = 0
        self._throttle_until = 0.0
        self._windows: dict[str, deque[float]] = {}
        self._flow_controlled: dict[str, int] = {}
        self.flow_controlled = 0

    @property
    def sim(self) -> DingTalkSimulator:
        """The simulator this extension was installed in."""
        if self._sim is None:
            raise RuntimeError("extension is not installed")
        return self._sim

    def install(self, sim: DingTalkSimulator, app: web.Application) -> None:
        """Add the send routes and the sessionWebhook gate."""
        self._sim = sim
        app.router.add_post(BATCH_SEND_PATH, self._handle_batch_send)
        app.router.add_post(GROUP_SEND_PATH, self._handle_group_send)
        sim.set_send_gate(self._admit)

    async def fault(self, spec: Mapping[str, Any]) -> None:
        """Apply this extension's fault keys (all validated before any is applied).

        Raises:
            ValueError: a value is malformed.
        """
        throttle: tuple[int, float] | None = None
        if "throttle" in spec:
            throttle = self._parse_throttle(spec["throttle"])
        flow: tuple[list[str], int] | None = None
        if "flow_control" in spec:
            flow = self._parse_flow_control(spec["flow_control"])
        for key in ("expire_sessions", "token_invalid"):
            if key in spec and not isinstance(spec[key], bool):
                raise ValueError(f"{key} must be a boolean")
        if throttle is not None:
            self._qps, seconds = throttle
            self._throttle_until = asyncio.get_running_loop().time() + seconds
            self._windows.clear()
        if flow is not None:
            users, times = flow
            for user_id in users:
                self._flow_controlled[user_id] = times
        if spec.get("expire_sessions"):
            self.sim.expire_sessions()
            self.sessions_expired += 1
        if spec.get("token_invalid"):
            self.sim.invalidate_token()
            self.tokens_invalidated += 1

    @staticmethod
    def _parse_throttle(value: object) -> tuple[int, float]:
        if not isinstance(value, Mapping):
            raise ValueError('throttle must be an object {"qps": N, "seconds": S}')
        unknown = sorted(set(value) - {"qps", "seconds"})
        if unknown:
            raise ValueError(f"unknown throttle keys: {', '.join(unknown)}")
        qps = value.get("qps")
        if isinstance(qps, bool) or not isinstance(qps, int) or qps < 0:
            raise ValueError("throttle.qps must be a non-negative integer")
        seconds = require_seconds(
            "throttle.seconds", value.get("seconds", _DEFAULT_THROTTLE_S), maximum=3600.0
        )
        return qps, seconds

    @staticmethod
    def _parse_flow_control(value: object) -> tuple[list[str], int]:
        if not isinstance(value, Mapping):
            raise ValueError('flow_control must be an object {"users": [ids], "times": N}')
        unknown = sorted(set(value) - {"users", "times"})
        if unknown:
            raise ValueError(f"unknown flow_control keys: {', '.join(unknown)}")
        users = value.get("users")
        if not isinstance(users, list) or not all(isinstance(u, str) and u for u in users):
            raise ValueError("flow_control.users must be a list of user ids")
        times = value.get("times", 1)
        if isinstance(times, bool) or not isinstance(times, int) or times < 0:
            raise ValueError("flow_control.times must be a non-negative integer")
        return users, times

    def state(self) -> dict[str, Any]:
        """Counters for ``GET /_sim/state``."""
        return {
            "sends": self.direct_sends + self.group_sends,
            "sends_direct": self.direct_sends,
            "sends_group": self.group_sends,
            "invalid_staff": self.invalid_staff,
            "flow_controlled": self.flow_controlled,
            "throttled": self.throttled,
            "throttle_active": self._throttle_active(),
            "throttle_qps": self._qps if self._throttle_active() else None,
            "token_rejections": self.token_rejections,
            "tokens_invalidated": self.tokens_invalidated,
            "sessions_expired": self.sessions_expired,
            "bad_requests": self.bad_requests,
        }

    async def aclose(self) -> None:
        """Remove the sessionWebhook gate (there are no background tasks)."""
        if self._sim is not None:
            self._sim.set_send_gate(None)

    # ------------------------------------------------------------------ throttling

    def _throttle_active(self) -> bool:
        return asyncio.get_running_loop().time() < self._throttle_until

    def _admit(self, api: str) -> bool:
        """The simulator's send gate: whether one more send on ``api`` fits the throttle window.

        Every API (``"webhook"``, ``"batchSend"``, ``"groupSend"``, or one another extension
        names through ``sim.admit_send``) has its own window; without a throttle, always true.
        """
        now = asyncio.get_running_loop().time()
        if now >= self._throttle_until:
            return True
        window = self._windows.setdefault(api, deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= self._qps:
            self.throttled += 1
            return False
        window.append(now)
        return True

    def _qps_limited(self, api: str) -> web.Response:
        window = self._windows.get(api)
        now = asyncio.get_running_loop().time()
        free_in = 1.0 if not window else max(0.0, window[0] + 1.0 - now)
        ends = self.sim.clock() + math.ceil(free_in * 1000) / 1000
        return api_error(
            403,
            "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
            f"请求过于频繁，限制将在 {ends:.3f} 结束",
        )

    # ------------------------------------------------------------------ handlers

    async def _common(
        self, request: web.Request
    ) -> tuple[dict[str, Any], str, dict[str, Any]] | web.Response:
        """Token, body, robotCode and template checks shared by both send APIs.

        Returns:
            ``(body, msgKey, decoded msgParam)`` or the error response.
        """
        denied = self.sim.check_token(request)
        if denied is not None:
            self.token_rejections += 1
            return denied
        body = await read_json_object(request)
        if body is None:
            return self._bad("invalidParameter", "body must be a json object")
        if body.get("robotCode") != self.sim.app_key:
            return self._bad("invalidParameter.robotCode.auth", "robotCode 无权限")
        msg_key = body.get("msgKey")
        if not isinstance(msg_key, str) or msg_key not in MSG_KEYS:
            return self._bad("invalidParameter.msgKey.invalid", "msgKey 不合法")
        raw = body.get("msgParam")
        param: object = None
        if isinstance(raw, str):
            try:
                param = json.loads(raw)
            except ValueError:
                param = None
        if not isinstance(param, dict) or not all(
            isinstance(param.get(key), str | int | float) and param.get(key) != ""
            for key in MSG_KEYS[msg_key]
        ):
            return self._bad(
                "invalidParameter.msgParam.invalid", "msgParam 必须是该 msgKey 对应的 JSON 字符串"
            )
        return body, msg_key, param

    def _bad(self, code: str, message: str) -> web.Response:
        self.bad_requests += 1
        return api_error(400, code, message)

    async def _handle_batch_send(self, request: web.Request) -> web.Response:
        checked = await self._common(request)
        if isinstance(checked, web.Response):
            return checked
        body, msg_key, param = checked
        user_ids = body.get("userIds")
        if (
            not isinstance(user_ids, list)
            or not user_ids
            or not all(isinstance(u, str) and u for u in user_ids)
        ):
            return self._bad("invalidParameter.userIds.invalid", "userIds 不能为空")
        if len(user_ids) > _MAX_USER_IDS:
            return self._bad("invalidParameter.userIds.overMax", "userIds 最多 20 个")
        if not self.sim.admit_send("batchSend"):
            return self._qps_limited("batchSend")
        rendered = _rendered(msg_key, param)
        invalid: list[str] = []
        controlled: list[str] = []
        for user_id in dict.fromkeys(user_ids):
            if not self.sim.knows_user(user_id):
                invalid.append(user_id)
                continue
            if self._flow_controlled.get(user_id, 0) > 0:
                self._flow_controlled[user_id] -= 1
                controlled.append(user_id)
                continue
            conversation_id = self.sim.direct_conversation_id(user_id)
            self.sim.record_reply(None, conversation_id, rendered["msgtype"], dict(rendered))
            self.sends.append({"kind": "direct", "user_id": user_id, "msg_key": msg_key})
            self.direct_sends += 1
        self.invalid_staff += len(invalid)
        self.flow_controlled += len(controlled)
        return json_response(
            {
                "processQueryKey": secrets.token_urlsafe(24),
                "invalidStaffIdList": invalid,
                "flowControlledStaffIdList": controlled,
                "filteredStaffIdList": [],
            }
        )

    async def _handle_group_send(self, request: web.Request) -> web.Response:
        checked = await self._common(request)
        if isinstance(checked, web.Response):
            return checked
        body, msg_key, param = checked
        conversation_id = body.get("openConversationId")
        if not isinstance(conversation_id, str) or not self.sim.knows_group(conversation_id):
            return self._bad("invalid.openConversationId", "openConversationId 不合法")
        if not self.sim.admit_send("groupSend"):
            return self._qps_limited("groupSend")
        rendered = _rendered(msg_key, param)
        self.sim.record_reply(None, conversation_id, rendered["msgtype"], rendered)
        self.sends.append(
            {"kind": "group", "conversation_id": conversation_id, "msg_key": msg_key}
        )
        self.group_sends += 1
        return json_response({"processQueryKey": secrets.token_urlsafe(24)})
