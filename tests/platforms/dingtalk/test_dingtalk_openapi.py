"""OpenAPI robot sends, the simulator's OpenAPI extension, and the connector's send path.

Everything runs against a real :class:`DingTalkSimulator` on loopback with
:class:`OpenAPIExtension` installed. Inbound messages (with working sessionWebhooks) are taken
from the simulator by a bare Stream client (:class:`Receiver`); HTTP requests are counted with
an aiohttp ``TraceConfig`` on the client session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from imrelay.config import DingTalkSettings
from imrelay.errors import PlatformAPIError, RateLimited
from imrelay.message import InboundMessage, OutboundReply
from imrelay.observability.metrics import Metrics
from imrelay.platforms.dingtalk.api import DingTalkAPI
from imrelay.platforms.dingtalk.connector import DingTalkConnector
from imrelay.platforms.dingtalk.errors import DingTalkRequestRejected
from imrelay.platforms.dingtalk.events import parse_bot_message
from imrelay.platforms.dingtalk.openapi import (
    BATCH_SEND_PATH,
    FLOW_CONTROLLED_ERRCODE,
    GROUP_SEND_PATH,
    INVALID_STAFF_ERRCODE,
    build_msg_param,
    send_to_group,
    send_to_user,
)
from imrelay.sim.dingtalk import DEFAULT_GROUP_ID, DingTalkSimulator
from imrelay.sim.dingtalk_openapi import MSG_KEYS, OpenAPIExtension

NAME = "dingtalk"
TOKEN_PATH = "/v1.0/oauth2/accessToken"


# -- helpers -----------------------------------------------------------------------------------


def reply_text(reply: dict[str, Any]) -> str:
    """The visible text of a recorded reply, whichever channel carried it."""
    body = reply["body"]
    if body["msgtype"] == "markdown":
        return str(body["markdown"]["text"])
    return str(body["text"]["content"])


class Receiver:
    """A bare Stream client on the simulator: injects a message and returns it parsed."""

    def __init__(self, sim: DingTalkSimulator, http: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.http = http
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def open(self) -> None:
        api = DingTalkAPI(
            self.http,
            platform=NAME,
            app_key=self.sim.app_key,
            app_secret=self.sim.app_secret,
            api_base=self.sim.base_url,
        )
        endpoint, ticket = await api.open_connection()
        self.ws = await self.http.ws_connect(f"{endpoint}?ticket={ticket}")

    async def receive(
        self, text: str = "hello", *, received_at: float | None = None, **kwargs: Any
    ) -> InboundMessage:
        assert self.ws is not None
        ids = await self.sim.send_message(text, **kwargs)
        while True:
            msg = await self.ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            frame = json.loads(msg.data)
            if frame["type"] != "CALLBACK":
                continue
            data = json.loads(frame["data"])
            if data["msgId"] == ids["msg_id"]:
                break
        return parse_bot_message(
            data,
            platform=NAME,
            received_at=time.time() if received_at is None else received_at,
            frame_message_id=frame["headers"]["messageId"],
        )

    async def aclose(self) -> None:
        if self.ws is not None:
            await self.ws.close()


@dataclasses.dataclass
class Env:
    """A simulator with the OpenAPI extension, a counting HTTP session and an API client."""

    sim: DingTalkSimulator
    ext: OpenAPIExtension
    http: aiohttp.ClientSession
    requests: Counter[str]
    api: DingTalkAPI
    receiver: Receiver

    def connector(
        self,
        *,
        openapi_after_s: float = 600.0,
        per_minute: int = 20,
        app_qps: float = 20.0,
        **kwargs: Any,
    ) -> tuple[DingTalkConnector, CollectorRegistry]:
        settings = DingTalkSettings.model_validate(
            {
                "type": "dingtalk",
                "app_key": self.sim.app_key,
                "app_secret": self.sim.app_secret,
                "api_base": self.sim.base_url,
                "reply": {"openapi_after_s": openapi_after_s},
                "rate_limit": {"per_conversation_per_minute": per_minute, "app_qps": app_qps},
            }
        )
        registry = CollectorRegistry()
        metrics = Metrics(registry, process=False)
        return DingTalkConnector(NAME, settings, self.http, metrics, **kwargs), registry


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env() -> AsyncIterator[EnvFactory]:
    """Start simulator environments (``make_env(clock=...)``); all are closed at the end."""
    closers: list[Callable[[], Awaitable[None]]] = []

    async def make(clock: Callable[[], float] = time.time) -> Env:
        ext = OpenAPIExtension()
        sim = DingTalkSimulator(clock=clock, extensions=[ext])
        await sim.start()
        closers.append(sim.aclose)
        requests: Counter[str] = Counter()
        trace = aiohttp.TraceConfig()

        async def on_request_start(
            session: aiohttp.ClientSession,
            context: Any,
            params: aiohttp.TraceRequestStartParams,
        ) -> None:
            requests[params.url.path] += 1

        trace.on_request_start.append(on_request_start)
        http = aiohttp.ClientSession(trace_configs=[trace])
        closers.append(http.close)
        api = DingTalkAPI(
            http,
            platform=NAME,
            app_key=sim.app_key,
            app_secret=sim.app_secret,
            api_base=sim.base_url,
        )
        receiver = Receiver(sim, http)
        await receiver.open()
        closers.append(receiver.aclose)
        return Env(sim, ext, http, requests, api, receiver)

    try:
        yield make
    finally:
        for close in reversed(closers):
            await close()


@pytest.fixture
async def env(make_env: EnvFactory) -> Env:
    """One environment on the real clock."""
    return await make_env()


class FakeCaller:
    """An :class:`OpenAPICaller` answering every call with a fixed body, recording calls."""

    platform = NAME

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, dict[str, Any] | None]] = []

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, what: str = ""
    ) -> dict[str, Any]:
        self.calls.append((method, path, body))
        return self.answer


class AutoTime:
    """A monotonic clock whose ``sleep`` moves time forward at once."""

    def __init__(self) -> None:
        self.now = 5000.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay
        self.slept += delay
        await asyncio.sleep(0)


def throttled(registry: CollectorRegistry, scope: str) -> float:
    value = registry.get_sample_value(
        "imrelay_platform_throttled_total", {"platform": NAME, "scope": scope}
    )
    return value or 0.0


# -- build_msg_param / send functions ------------------------------------------------------------


def test_build_msg_param_text_and_markdown_are_json_strings() -> None:
    """msgParam is a JSON string: {content} for sampleText, {title, text} for sampleMarkdown."""
    key, param = build_msg_param("你好 world", markdown=False)
    assert key == "sampleText"
    assert isinstance(param, str)
    assert json.loads(param) == {"content": "你好 world"}
    assert "你好" in param  # not \u-escaped
    key, param = build_msg_param("## Heading\n\nbody", markdown=True)
    assert key == "sampleMarkdown"
    assert json.loads(param) == {"title": "Heading", "text": "## Heading\n\nbody"}
    _, param = build_msg_param("x" * 50, markdown=True, title="My title")
    assert json.loads(param)["title"] == "My title"
    _, param = build_msg_param("   \n", markdown=True)
    assert json.loads(param)["title"] == "message"
    _, param = build_msg_param("a" * 50, markdown=True)
    assert json.loads(param)["title"] == "a" * 20


async def test_send_to_user_posts_batch_send_and_is_recorded(env: Env) -> None:
    """A 1:1 send reaches batchSend and is recorded in the user's 1:1 conversation."""
    key = await send_to_user(env.api, env.sim.app_key, "lisi", "**hi**", True, "greeting")
    assert key
    (reply,) = env.sim.replies()
    assert reply["msg_id"] is None
    assert reply["conversation_id"] == env.sim.direct_conversation_id("lisi")
    assert reply["body"] == {
        "msgtype": "markdown",
        "markdown": {"title": "greeting", "text": "**hi**"},
        "via": "openapi",
    }
    assert env.requests[BATCH_SEND_PATH] == 1
    assert env.sim.state()["openapi"]["sends_direct"] == 1


async def test_send_to_group_posts_group_send_and_is_recorded(env: Env) -> None:
    """A group send reaches groupMessages/send and is recorded in that group, without @."""
    await send_to_group(env.api, env.sim.app_key, DEFAULT_GROUP_ID, "plain", False)
    (reply,) = env.sim.replies()
    assert reply["conversation_id"] == DEFAULT_GROUP_ID
    assert reply["body"] == {"msgtype": "text", "text": {"content": "plain"}, "via": "openapi"}
    assert "at" not in reply["body"]
    assert env.requests[GROUP_SEND_PATH] == 1
    assert env.ext.sends[-1] == {
        "kind": "group",
        "conversation_id": DEFAULT_GROUP_ID,
        "msg_key": "sampleText",
    }


async def test_openapi_token_is_fetched_once_and_cached(env: Env) -> None:
    """Several sends share one access token; it is never fetched per call."""
    for i in range(3):
        await send_to_user(env.api, env.sim.app_key, "zhangsan", f"m{i}", False)
    await send_to_group(env.api, env.sim.app_key, DEFAULT_GROUP_ID, "g", False)
    assert env.requests[TOKEN_PATH] == 1
    assert len(env.sim.replies()) == 4


async def test_openapi_token_invalid_fault_costs_exactly_one_refresh(env: Env) -> None:
    """After token_invalid the next call is refused once, the token refreshed once, then sent."""
    await send_to_user(env.api, env.sim.app_key, "zhangsan", "before", False)
    await env.sim.fault({"token_invalid": True})
    await send_to_user(env.api, env.sim.app_key, "zhangsan", "after", False)
    await send_to_user(env.api, env.sim.app_key, "zhangsan", "again", False)
    assert env.requests[TOKEN_PATH] == 2
    state = env.sim.state()["openapi"]
    assert state["token_rejections"] == 1
    assert state["tokens_invalidated"] == 1
    assert [reply_text(r) for r in env.sim.replies()] == ["before", "after", "again"]


async def test_send_to_user_unknown_user_is_not_retryable(env: Env) -> None:
    """A user in invalidStaffIdList is a permanent failure, and nothing is delivered."""
    with pytest.raises(DingTalkRequestRejected) as caught:
        await send_to_user(env.api, env.sim.app_key, "ghost-user", "hi", False)
    assert caught.value.errcode == INVALID_STAFF_ERRCODE
    assert caught.value.retryable is False
    assert env.sim.replies() == []
    assert env.sim.state()["openapi"]["invalid_staff"] == 1


async def test_send_to_user_flow_controlled_is_rate_limited(env: Env) -> None:
    """A user in flowControlledStaffIdList raises RateLimited with a wait of at least 1 s."""
    await env.sim.fault({"flow_control": {"users": ["alice"], "times": 1}})
    with pytest.raises(RateLimited) as caught:
        await send_to_user(env.api, env.sim.app_key, "alice", "hi", False)
    assert caught.value.errcode == FLOW_CONTROLLED_ERRCODE
    assert caught.value.retryable is True
    assert caught.value.retry_after >= 1.0
    assert env.sim.replies() == []
    await send_to_user(env.api, env.sim.app_key, "alice", "hi", False)
    assert len(env.sim.replies()) == 1
    assert env.sim.state()["openapi"]["flow_controlled"] == 1


async def test_send_functions_build_the_documented_bodies() -> None:
    """The request bodies carry robotCode, the target, msgKey and msgParam as a string."""
    caller = FakeCaller({"processQueryKey": "pqk", "invalidStaffIdList": ["other"]})
    assert await send_to_user(caller, "robot", "u1", "hey", False) == "pqk"
    assert await send_to_group(caller, "robot", "cidG", "**b**", True, "T") == "pqk"
    (m1, p1, b1), (m2, p2, b2) = caller.calls
    assert (m1, p1) == ("POST", BATCH_SEND_PATH)
    assert b1 == {
        "robotCode": "robot",
        "userIds": ["u1"],
        "msgKey": "sampleText",
        "msgParam": '{"content": "hey"}',
    }
    assert (m2, p2) == ("POST", GROUP_SEND_PATH)
    assert b2 is not None
    assert b2["openConversationId"] == "cidG"
    assert json.loads(b2["msgParam"]) == {"title": "T", "text": "**b**"}
    assert await send_to_user(FakeCaller({}), "robot", "u1", "hey", False) == ""
    assert await send_to_group(FakeCaller({"processQueryKey": 3}), "r", "c", "x", False) == ""


async def test_send_functions_refuse_an_empty_target() -> None:
    """No user id or no conversation id is a permanent error raised before any call."""
    caller = FakeCaller({})
    with pytest.raises(DingTalkRequestRejected, match="no user id"):
        await send_to_user(caller, "robot", "", "hey", False)
    with pytest.raises(DingTalkRequestRejected, match="no conversation id"):
        await send_to_group(caller, "robot", "", "hey", False)
    assert caller.calls == []


async def test_send_to_user_ignores_malformed_staff_lists() -> None:
    """Lists that are not lists of strings do not turn a send into a failure."""
    caller = FakeCaller({"invalidStaffIdList": "u1", "flowControlledStaffIdList": [1, None]})
    assert await send_to_user(caller, "robot", "u1", "hey", False) == ""


# -- the simulator extension -----------------------------------------------------------------


async def raw_post(
    env: Env, path: str, body: Any, *, token: str | None = "current"
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` (JSON) to the simulator, with the current token unless told otherwise."""
    headers = {"Content-Type": "application/json"}
    if token == "current":
        headers["x-acs-dingtalk-access-token"] = await env.api.access_token()
    elif token is not None:
        headers["x-acs-dingtalk-access-token"] = token
    async with env.http.post(env.sim.base_url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


def batch_body(env: Env, **override: Any) -> dict[str, Any]:
    body = {
        "robotCode": env.sim.app_key,
        "userIds": ["zhangsan"],
        "msgKey": "sampleText",
        "msgParam": json.dumps({"content": "x"}),
    }
    body.update(override)
    return body


@pytest.mark.parametrize(
    ("override", "status", "code"),
    [
        ({"msgParam": {"content": "x"}}, 400, "invalidParameter.msgParam.invalid"),
        ({"msgParam": "not json"}, 400, "invalidParameter.msgParam.invalid"),
        ({"msgParam": json.dumps({"text": "x"})}, 400, "invalidParameter.msgParam.invalid"),
        ({"msgParam": json.dumps({"content": ""})}, 400, "invalidParameter.msgParam.invalid"),
        ({"msgKey": "sampleNope"}, 400, "invalidParameter.msgKey.invalid"),
        ({"msgKey": None}, 400, "invalidParameter.msgKey.invalid"),
        ({"robotCode": "someone-else"}, 400, "invalidParameter.robotCode.auth"),
        ({"userIds": []}, 400, "invalidParameter.userIds.invalid"),
        ({"userIds": "zhangsan"}, 400, "invalidParameter.userIds.invalid"),
        ({"userIds": [f"u{i}" for i in range(21)]}, 400, "invalidParameter.userIds.overMax"),
    ],
)
async def test_sim_batch_send_rejects_bad_requests(
    env: Env, override: dict[str, Any], status: int, code: str
) -> None:
    """Malformed batchSend requests get the documented 400 codes and deliver nothing."""
    got_status, answer = await raw_post(env, BATCH_SEND_PATH, batch_body(env, **override))
    assert (got_status, answer["code"]) == (status, code)
    assert "requestid" in answer
    assert env.sim.replies() == []
    assert env.sim.state()["openapi"]["bad_requests"] == 1


async def test_sim_send_checks_the_access_token(env: Env) -> None:
    """Missing token → 400 MissingParameter; a wrong one → 401 InvalidAuthentication."""
    status, answer = await raw_post(env, BATCH_SEND_PATH, batch_body(env), token=None)
    assert (status, answer["code"]) == (400, "AuthenticationFailed.MissingParameter")
    status, answer = await raw_post(env, GROUP_SEND_PATH, {}, token="tok-wrong")
    assert (status, answer["code"]) == (401, "InvalidAuthentication")
    assert env.sim.state()["openapi"]["token_rejections"] == 2


async def test_sim_send_rejects_non_object_body_and_unknown_group(env: Env) -> None:
    """A non-object body and an unknown openConversationId are refused."""
    status, answer = await raw_post(env, GROUP_SEND_PATH, ["not", "an", "object"])
    assert (status, answer["code"]) == (400, "invalidParameter")
    body = batch_body(env, openConversationId="cidNoSuchGroup")
    status, answer = await raw_post(env, GROUP_SEND_PATH, body)
    assert (status, answer["code"]) == (400, "invalid.openConversationId")


async def test_sim_batch_send_mixes_valid_and_invalid_users(env: Env) -> None:
    """Known users are delivered once each; unknown ones come back in invalidStaffIdList."""
    body = batch_body(env, userIds=["zhangsan", "nobody", "zhangsan", "bob"])
    status, answer = await raw_post(env, BATCH_SEND_PATH, body)
    assert status == 200
    assert answer["invalidStaffIdList"] == ["nobody"]
    assert answer["flowControlledStaffIdList"] == []
    assert answer["processQueryKey"]
    conversations = {r["conversation_id"] for r in env.sim.replies()}
    assert conversations == {
        env.sim.direct_conversation_id("zhangsan"),
        env.sim.direct_conversation_id("bob"),
    }


async def test_sim_knows_users_and_groups_that_wrote_to_the_bot(env: Env) -> None:
    """A sender or group seen in an injected message becomes a valid OpenAPI target."""
    await env.receiver.receive("hi", sender_id="newcomer")
    await env.receiver.receive("hi", conversation_type="2", conversation_id="cidNewGroup")
    await send_to_user(env.api, env.sim.app_key, "newcomer", "welcome", False)
    await send_to_group(env.api, env.sim.app_key, "cidNewGroup", "welcome", False)
    assert len(env.sim.replies()) == 2


@pytest.mark.parametrize(
    ("msg_key", "param", "msgtype", "expected"),
    [
        ("sampleImageMsg", {"photoURL": "https://x/p.png"}, "image", {"photoURL": "https://x/p.png"}),
        (
            "sampleLink",
            {"text": "t", "title": "T", "picUrl": "p", "messageUrl": "m"},
            "link",
            {"title": "T", "text": "t", "messageUrl": "m", "picUrl": "p"},
        ),
        (
            "sampleActionCard",
            {"title": "T", "text": "t", "singleTitle": "Go", "singleURL": "u"},
            "actionCard",
            {"title": "T", "text": "t", "singleTitle": "Go", "singleURL": "u"},
        ),
        (
            "sampleActionCard3",
            {"title": "T", "text": "t", "actionTitle1": "A", "actionURL1": "a",
             "actionTitle2": "B", "actionURL2": "b"},
            "actionCard",
            {"title": "T", "text": "t",
             "btns": [{"title": "A", "actionURL": "a"}, {"title": "B", "actionURL": "b"}]},
        ),
        (
            "sampleActionCard6",
            {"title": "T", "text": "t", "buttonTitle1": "A", "buttonUrl1": "a",
             "buttonTitle2": "B", "buttonUrl2": "b"},
            "actionCard",
            {"title": "T", "text": "t",
             "btns": [{"title": "A", "actionURL": "a"}, {"title": "B", "actionURL": "b"}]},
        ),
        ("sampleAudio", {"mediaId": "@m", "duration": 3000}, "audio",
         {"mediaId": "@m", "duration": 3000}),
        ("sampleFile", {"mediaId": "@m", "fileName": "a.pdf", "fileType": "pdf"}, "file",
         {"mediaId": "@m", "fileName": "a.pdf", "fileType": "pdf"}),
        ("sampleVideo", {"duration": "5", "videoMediaId": "@v", "videoType": "mp4",
                         "picMediaId": "@p"}, "video",
         {"duration": "5", "videoMediaId": "@v", "videoType": "mp4", "picMediaId": "@p"}),
    ],
)  # fmt: skip
async def test_sim_records_templates_like_webhook_bodies(
    env: Env, msg_key: str, param: dict[str, Any], msgtype: str, expected: dict[str, Any]
) -> None:
    """Every known msgKey is accepted and recorded in the sessionWebhook body shape."""
    assert msg_key in MSG_KEYS
    body = batch_body(env, msgKey=msg_key, msgParam=json.dumps(param))
    status, _ = await raw_post(env, BATCH_SEND_PATH, body)
    assert status == 200
    (reply,) = env.sim.replies()
    assert reply["msgtype"] == msgtype
    assert reply["body"] == {"msgtype": msgtype, msgtype: expected, "via": "openapi"}


async def test_sim_throttle_fault_limits_openapi_and_webhook(env: Env) -> None:
    """Under throttle qps=1 the second send in a second is refused on every channel."""
    message = await env.receiver.receive("hi")
    webhook = str(message.reply_to["session_webhook"])
    await env.sim.fault({"throttle": {"qps": 1, "seconds": 30}})
    assert env.sim.state()["openapi"]["throttle_active"] is True
    assert env.sim.state()["openapi"]["throttle_qps"] == 1
    await send_to_user(env.api, env.sim.app_key, "zhangsan", "one", False)
    with pytest.raises(RateLimited) as caught:
        await send_to_user(env.api, env.sim.app_key, "zhangsan", "two", False)
    assert caught.value.status == 403
    assert caught.value.errcode == "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"
    # Each API has its own window: the group API still has room for one.
    await send_to_group(env.api, env.sim.app_key, DEFAULT_GROUP_ID, "g1", False)
    with pytest.raises(RateLimited):
        await send_to_group(env.api, env.sim.app_key, DEFAULT_GROUP_ID, "g2", False)
    body = {"msgtype": "text", "text": {"content": "w"}}
    await env.api.send_session_webhook(webhook, body)
    with pytest.raises(RateLimited) as caught:
        await env.api.send_session_webhook(webhook, body)
    assert caught.value.errcode == 130101
    assert [reply_text(r) for r in env.sim.replies()] == ["one", "g1", "w"]
    assert env.sim.state()["openapi"]["throttled"] == 3


async def test_sim_throttle_fault_ends_after_its_seconds(env: Env) -> None:
    """A throttle window closes after its duration and sends flow again."""
    await env.sim.fault({"throttle": {"qps": 0, "seconds": 0.2}})
    with pytest.raises(RateLimited):
        await send_to_user(env.api, env.sim.app_key, "zhangsan", "refused", False)
    deadline = time.monotonic() + 5
    while env.sim.state()["openapi"]["throttle_active"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await send_to_user(env.api, env.sim.app_key, "zhangsan", "accepted", False)
    assert [reply_text(r) for r in env.sim.replies()] == ["accepted"]
    assert env.sim.state()["openapi"]["throttle_qps"] is None


async def test_sim_expire_sessions_fault_expires_existing_webhooks_only(env: Env) -> None:
    """expire_sessions makes existing sessionWebhooks answer 300001; new ones still work."""
    old = await env.receiver.receive("old")
    await env.sim.fault({"expire_sessions": True})
    new = await env.receiver.receive("new")
    body = {"msgtype": "text", "text": {"content": "r"}}
    with pytest.raises(PlatformAPIError) as caught:
        await env.api.send_session_webhook(str(old.reply_to["session_webhook"]), body)
    assert caught.value.errcode == 300001
    await env.api.send_session_webhook(str(new.reply_to["session_webhook"]), body)
    assert [r["msg_id"] for r in env.sim.replies()] == [new.message_id]
    assert env.sim.state()["openapi"]["sessions_expired"] == 1


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"throttle": 5}, "throttle must be an object"),
        ({"throttle": {"qps": -1}}, "qps"),
        ({"throttle": {"qps": 1.5}}, "qps"),
        ({"throttle": {"qps": True}}, "qps"),
        ({"throttle": {"qps": 1, "seconds": -1}}, "seconds"),
        ({"throttle": {"qps": 1, "burst": 2}}, "unknown throttle keys"),
        ({"flow_control": ["a"]}, "flow_control must be an object"),
        ({"flow_control": {"users": "a"}}, "users"),
        ({"flow_control": {"users": ["a"], "times": -1}}, "times"),
        ({"flow_control": {"users": ["a"], "extra": 1}}, "unknown flow_control keys"),
        ({"expire_sessions": "yes"}, "expire_sessions must be a boolean"),
        ({"token_invalid": 1}, "token_invalid must be a boolean"),
    ],
)
async def test_sim_openapi_fault_specs_are_validated(
    env: Env, spec: dict[str, Any], match: str
) -> None:
    """Malformed fault values are refused with a ValueError naming the key."""
    with pytest.raises(ValueError, match=match):
        await env.sim.fault(spec)


async def test_sim_openapi_faults_over_http_and_state(env: Env) -> None:
    """The faults work through POST /_sim/faults and show in GET /_sim/state."""
    url = env.sim.base_url
    async with env.http.post(f"{url}/_sim/faults", json={"token_invalid": True}) as resp:
        assert resp.status == 200
    async with env.http.post(f"{url}/_sim/faults", json={"throttle": {"qps": "x"}}) as resp:
        assert resp.status == 400
    async with env.http.get(f"{url}/_sim/state") as resp:
        state = (await resp.json())["openapi"]
    assert state["tokens_invalidated"] == 1
    assert state["throttle_active"] is False
    assert state["sends"] == 0


async def test_sim_openapi_extension_requires_install() -> None:
    """Using the extension before it is installed is a clear error."""
    ext = OpenAPIExtension()
    with pytest.raises(RuntimeError, match="not installed"):
        _ = ext.sim
    await ext.aclose()


# -- the connector's send path -----------------------------------------------------------------


async def test_connector_fresh_message_replies_via_session_webhook(env: Env) -> None:
    """A fresh message with a live sessionWebhook is answered through it, with the @mention."""
    conn, registry = env.connector()
    message = await env.receiver.receive(
        "hi", conversation_type="2", conversation_id="cidWebhookGroup", sender_id="alice"
    )
    await conn.send(message, OutboundReply("answer", mention_sender=True))
    (reply,) = env.sim.replies()
    assert reply["msg_id"] == message.message_id
    assert "via" not in reply["body"]
    assert reply["body"]["at"]["atUserIds"] == ["alice"]
    assert env.requests[BATCH_SEND_PATH] + env.requests[GROUP_SEND_PATH] == 0
    assert env.requests[TOKEN_PATH] == 0
    assert throttled(registry, "platform") == 0
    assert throttled(registry, "conversation") == throttled(registry, "app") == 0  # no wait


async def test_connector_expired_webhook_replies_via_openapi(make_env: EnvFactory) -> None:
    """A sessionWebhook already past its expiry by our clock is skipped for the OpenAPI."""
    # The simulator's clock runs two hours behind: its sessions expire 90 min after createAt,
    # so by our clock every sessionWebhook is already expired (the simulator would accept it).
    env = await make_env(clock=lambda: time.time() - 7200)
    conn, _ = env.connector()
    message = await env.receiver.receive("hi", sender_id="bob")
    await conn.send(message, OutboundReply("**late**", markdown=True, title="t"))
    (reply,) = env.sim.replies()
    assert reply["body"]["via"] == "openapi"
    assert reply["conversation_id"] == message.conversation.id
    assert reply["body"]["markdown"] == {"title": "t", "text": "**late**"}
    assert env.requests[BATCH_SEND_PATH] == 1


async def test_connector_falls_back_to_openapi_on_300001(env: Env) -> None:
    """A sessionWebhook answering 300001 hands the same reply to the OpenAPI at once."""
    conn, _ = env.connector()
    message = await env.receiver.receive("hi")
    await env.sim.fault({"expire_sessions": True})
    await conn.send(message, OutboundReply("rescued"))
    (reply,) = env.sim.replies()
    assert reply_text(reply) == "rescued"
    assert reply["body"]["via"] == "openapi"
    assert reply["conversation_id"] == message.conversation.id


async def test_connector_old_message_replies_via_openapi(env: Env) -> None:
    """A message older than reply.openapi_after_s is answered through the OpenAPI."""
    conn, _ = env.connector(openapi_after_s=0)
    message = await env.receiver.receive("hi")
    await conn.send(message, OutboundReply("via api"))
    (reply,) = env.sim.replies()
    assert reply["body"]["via"] == "openapi"
    conn2, _ = env.connector(openapi_after_s=60)
    aged = await env.receiver.receive("hi", received_at=time.time() - 61)
    await conn2.send(aged, OutboundReply("also via api"))
    assert env.sim.replies()[-1]["body"]["via"] == "openapi"
    young = await env.receiver.receive("hi", received_at=time.time() - 1)
    await conn2.send(young, OutboundReply("webhook"))
    assert "via" not in env.sim.replies()[-1]["body"]


async def test_connector_group_and_direct_openapi_targets(env: Env) -> None:
    """Group replies go to the group (mention lost); 1:1 replies go to the sender's staffId."""
    conn, _ = env.connector(openapi_after_s=0)
    group = await env.receiver.receive(
        "hi", conversation_type="2", conversation_id="cidApiGroup", sender_id="bob"
    )
    direct = await env.receiver.receive("hi", sender_id="alice")
    await conn.send(group, OutboundReply("to group", mention_sender=True))
    await conn.send(direct, OutboundReply("to alice"))
    to_group, to_alice = env.sim.replies()
    assert to_group["conversation_id"] == "cidApiGroup"
    assert "at" not in to_group["body"]
    assert to_alice["conversation_id"] == env.sim.direct_conversation_id("alice")
    assert env.requests[GROUP_SEND_PATH] == 1
    assert env.requests[BATCH_SEND_PATH] == 1


async def test_connector_direct_without_staff_id_is_not_retryable(env: Env) -> None:
    """A 1:1 reply with no usable sessionWebhook and no staffId fails permanently, sending
    nothing."""
    conn, _ = env.connector(openapi_after_s=0)
    message = await env.receiver.receive("hi")
    anonymous = dataclasses.replace(message, reply_to={"sender_staff_id": ""})
    with pytest.raises(DingTalkRequestRejected) as caught:
        await conn.send(anonymous, OutboundReply("lost"))
    assert caught.value.retryable is False
    assert caught.value.errcode == "no_staff_id"
    no_webhook = dataclasses.replace(message, reply_to={"sender_staff_id": "zhangsan"})
    conn2, _ = env.connector()
    await conn2.send(no_webhook, OutboundReply("found"))
    assert [reply_text(r) for r in env.sim.replies()] == ["found"]


async def test_connector_direct_without_staff_id_keeps_to_its_session_webhook(env: Env) -> None:
    """Only the sessionWebhook reaches a 1:1 sender without a staffId: an old message still
    uses it, and a throttled one waits on it instead of failing on the OpenAPI."""
    conn, registry = env.connector(openapi_after_s=0)
    message = await env.receiver.receive("hi")
    anonymous = dataclasses.replace(message, reply_to={**message.reply_to, "sender_staff_id": ""})
    await conn.send(anonymous, OutboundReply("old but reachable"))
    assert [r["body"].get("via") for r in env.sim.replies()] == [None]

    class RealishTime(AutoTime):  # fake minutes, but the simulator's throttle ends for real
        async def sleep(self, delay: float) -> None:
            await super().sleep(delay)
            await asyncio.sleep(0.05)

    fake = RealishTime()
    conn, registry = env.connector(monotonic=fake.clock, sleep=fake.sleep, throttle_wait_s=900)
    await env.sim.fault({"throttle": {"qps": 0, "seconds": 0.2}})
    await conn.send(anonymous, OutboundReply("after the throttle"))
    assert [reply_text(r) for r in env.sim.replies()][-1] == "after the throttle"
    assert env.sim.replies()[-1]["body"].get("via") is None
    assert throttled(registry, "platform") >= 1
    assert env.requests[BATCH_SEND_PATH] == 0  # the OpenAPI was never tried


async def test_connector_throttled_reply_waits_and_is_delivered(env: Env) -> None:
    """Throttled by DingTalk on both channels, a reply waits out the penalty and then goes."""
    conn, registry = env.connector()
    message = await env.receiver.receive("hi")
    await env.sim.fault({"throttle": {"qps": 0, "seconds": 0.3}})
    started = time.monotonic()
    await conn.send(message, OutboundReply("patient"))
    assert time.monotonic() - started >= 0.3
    (reply,) = env.sim.replies()
    assert reply_text(reply) == "patient"
    assert reply["body"]["via"] == "openapi"  # the throttled webhook is avoided for a while
    assert throttled(registry, "platform") == 2  # webhook 130101, then OpenAPI 403
    assert throttled(registry, "app") >= 1  # waited out the app bucket's penalty
    # The conversation's webhook stays blocked: the next reply goes straight to the OpenAPI.
    await conn.send(message, OutboundReply("next"))
    assert env.sim.replies()[-1]["body"]["via"] == "openapi"


async def test_connector_gives_up_after_its_throttle_budget(env: Env) -> None:
    """When DingTalk keeps throttling, RateLimited is raised once the wait budget is spent."""
    fake = AutoTime()
    conn, registry = env.connector(monotonic=fake.clock, sleep=fake.sleep, throttle_wait_s=2.5)
    message = await env.receiver.receive("hi")
    await env.sim.fault({"throttle": {"qps": 0, "seconds": 60}})
    with pytest.raises(RateLimited) as caught:
        await conn.send(message, OutboundReply("never"))
    assert caught.value.retryable is True
    # webhook refused once, then the OpenAPI at 0 s, 1 s and 2 s (each penalty is 1 s)
    assert env.sim.state()["openapi"]["throttled"] == 4
    assert throttled(registry, "platform") == 4
    # two 1 s penalties (the webhook takes no app token: the app limit is on the OpenAPI)
    assert fake.slept == pytest.approx(2.0)
    assert env.sim.replies() == []


async def test_connector_flow_control_penalizes_the_conversation(env: Env) -> None:
    """A flow-controlled 1:1 reply waits on its conversation's bucket, then is delivered."""
    fake = AutoTime()
    conn, registry = env.connector(openapi_after_s=0, monotonic=fake.clock, sleep=fake.sleep)
    message = await env.receiver.receive("hi", sender_id="lisi")
    await env.sim.fault({"flow_control": {"users": ["lisi"], "times": 2}})
    await conn.send(message, OutboundReply("eventually"))
    assert [reply_text(r) for r in env.sim.replies()] == ["eventually"]
    assert throttled(registry, "platform") == 2
    assert throttled(registry, "conversation") == 2
    assert fake.slept >= 4.0  # two flow-control penalties of 2 s each


async def test_connector_keeps_to_the_conversation_limit(env: Env) -> None:
    """Beyond its burst a conversation's replies are paced, and the waits are counted."""
    fake = AutoTime()
    conn, registry = env.connector(per_minute=4, monotonic=fake.clock, sleep=fake.sleep)
    message = await env.receiver.receive("hi")
    for i in range(4):
        await conn.send(message, OutboundReply(f"part {i}"))
    # burst 2, then (4 - 2) per minute: one every 30 s
    assert fake.slept == pytest.approx(60.0)
    assert throttled(registry, "conversation") == 2
    assert len(env.sim.replies()) == 4


async def test_connector_keeps_to_the_app_limit(env: Env) -> None:
    """OpenAPI replies to many conversations together are paced by the app bucket."""
    fake = AutoTime()
    conn, registry = env.connector(
        app_qps=3, openapi_after_s=0, monotonic=fake.clock, sleep=fake.sleep
    )
    messages = [await env.receiver.receive("hi", sender_id=f"user{i}") for i in range(5)]
    for message in messages:
        await conn.send(message, OutboundReply("ok"))
    # burst 1, then 2 per second
    assert fake.slept == pytest.approx(2.0)
    assert throttled(registry, "app") == 4
    assert len(env.sim.replies()) == 5


async def test_connector_app_limit_covers_every_openapi_call(env: Env) -> None:
    """Any token-guarded call of the connector's API (here sends made outside the reply path,
    as AI cards and media downloads make theirs) is paced by the app bucket, and DingTalk's
    QpsLimit answer to one penalizes the bucket for all."""
    fake = AutoTime()
    conn, registry = env.connector(app_qps=3, monotonic=fake.clock, sleep=fake.sleep)
    robot = conn.settings.effective_robot_code
    for i in range(4):
        await send_to_group(conn.api, robot, DEFAULT_GROUP_ID, f"call {i}", False)
    assert fake.slept == pytest.approx(1.5)  # burst 1, then 2 per second
    assert throttled(registry, "app") == 3
    await env.sim.fault({"throttle": {"qps": 0, "seconds": 0.2}})
    slept = fake.slept
    with pytest.raises(RateLimited):
        await send_to_group(conn.api, robot, DEFAULT_GROUP_ID, "refused", False)
    assert fake.slept - slept == pytest.approx(0.5)  # the bucket's own pace, no penalty yet
    slept = fake.slept
    deadline = time.monotonic() + 5
    while env.sim.state()["openapi"]["throttle_active"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await send_to_group(conn.api, robot, DEFAULT_GROUP_ID, "after", False)
    assert fake.slept - slept >= 1.0  # the QpsLimit's 1 s penalty on the app bucket


async def test_connector_webhook_throttle_mark_expires_and_is_bounded(env: Env) -> None:
    """A throttled webhook is avoided for retry_after, then used again; old marks are dropped."""
    fake = AutoTime()
    conn, _ = env.connector(monotonic=fake.clock, sleep=fake.sleep, max_conversations=1)
    a = await env.receiver.receive("a", sender_id="alice")
    b = await env.receiver.receive("b", sender_id="bob")
    c = await env.receiver.receive("c", conversation_type="2", conversation_id="cidMarks")
    await env.sim.fault({"throttle": {"qps": 1, "seconds": 0.5}})
    await conn.send(a, OutboundReply("a1"))  # the webhook's one send this second
    await conn.send(b, OutboundReply("b1"))  # webhook refused: bob marked; batchSend
    await conn.send(c, OutboundReply("c1"))  # webhook refused: group marked, bob forgotten
    assert [r["body"].get("via") for r in env.sim.replies()] == [None, "openapi", "openapi"]
    deadline = time.monotonic() + 5
    while env.sim.state()["openapi"]["throttle_active"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await conn.send(b, OutboundReply("b2"))  # bob's mark was dropped: webhook again
    await conn.send(c, OutboundReply("c2"))  # the group is still marked
    fake.now += 61  # DingTalkWebhookThrottled asks for 60 s
    await conn.send(c, OutboundReply("c3"))  # the mark has expired
    vias = [(reply_text(r), r["body"].get("via")) for r in env.sim.replies()[3:]]
    assert vias == [("b2", None), ("c2", "openapi"), ("c3", None)]


async def test_sim_throttle_gives_other_apis_their_own_window(env: Env) -> None:
    """Another extension's API asked through sim.admit_send gets its own throttle window."""
    assert env.sim.admit_send("cardStreaming") is True  # no throttle: always admitted
    await env.sim.fault({"throttle": {"qps": 2, "seconds": 30}})
    assert [env.sim.admit_send("cardStreaming") for _ in range(3)] == [True, True, False]
    assert env.sim.admit_send("otherApi") is True
    await env.sim.aclose()  # the extension removes its gate when the simulator closes
    assert env.sim.admit_send("cardStreaming") is True


async def test_connector_session_webhook_is_not_paced_by_the_app_limit(env: Env) -> None:
    """sessionWebhook replies take no app token: DingTalk's app QPS limit is on its OpenAPI."""
    fake = AutoTime()
    conn, registry = env.connector(app_qps=1, monotonic=fake.clock, sleep=fake.sleep)
    messages = [await env.receiver.receive("hi", sender_id=f"user{i}") for i in range(5)]
    for message in messages:
        await conn.send(message, OutboundReply("ok"))
    assert fake.slept == 0
    assert throttled(registry, "app") == 0
    assert [r["body"].get("via") for r in env.sim.replies()] == [None] * 5
