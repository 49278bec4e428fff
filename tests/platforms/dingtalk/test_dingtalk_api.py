"""Tests of the DingTalk REST client and errcode registry against a loopback fake server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from imrelay.errors import AuthError, PlatformAPIError, RateLimited
from imrelay.http import HTTPClient
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
    lookup,
    register,
)

APP_KEY = "dingappkey"
APP_SECRET = "very-secret-value"

Reply = tuple[int, Any]  # (status, JSON body or raw bytes)


@dataclass
class FakeDingTalk:
    """A minimal DingTalk: token, gateway and sessionWebhook endpoints with scripted answers."""

    requests: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    token_replies: list[Reply] = field(default_factory=list)
    open_reply: Reply = (200, {"endpoint": "ws://127.0.0.1:1/connect", "ticket": "t-1"})
    webhook_reply: Reply = (200, {"errcode": 0, "errmsg": "ok"})
    gate: asyncio.Event | None = None
    tokens_issued: int = 0

    def count(self, path: str) -> int:
        return sum(1 for p, _, _ in self.requests if p == path)

    async def _record(self, request: web.Request) -> None:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        self.requests.append((request.path, dict(request.headers), body))
        if self.gate is not None:
            await self.gate.wait()

    @staticmethod
    def _answer(reply: Reply) -> web.Response:
        status, body = reply
        if isinstance(body, bytes):
            return web.Response(status=status, body=body)
        return web.json_response(body, status=status)

    async def token(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.token_replies:
            return self._answer(self.token_replies.pop(0))
        self.tokens_issued += 1
        return web.json_response({"accessToken": f"tok-{self.tokens_issued}", "expireIn": 7200})

    async def open(self, request: web.Request) -> web.Response:
        await self._record(request)
        return self._answer(self.open_reply)

    async def webhook(self, request: web.Request) -> web.Response:
        await self._record(request)
        return self._answer(self.webhook_reply)


@dataclass
class FakeClock:
    """An injectable epoch clock."""

    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeDingTalk, str]]:
    """A FakeDingTalk on 127.0.0.1:0 and its base URL."""
    state = FakeDingTalk()
    app = web.Application()
    app.router.add_post("/v1.0/oauth2/accessToken", state.token)
    app.router.add_post("/v1.0/gateway/connections/open", state.open)
    app.router.add_post("/robot/sendBySession", state.webhook)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield state, str(server.make_url("")).rstrip("/")
    finally:
        if state.gate is not None:
            state.gate.set()
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One client session per test, as the app would share one."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(params=["imrelay-http", "aiohttp"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[HTTPClient | None]:
    """The transport: the gateway's own HTTP client, or (None) the aiohttp session."""
    if request.param == "aiohttp":
        yield None
        return
    async with HTTPClient() as http_client:
        yield http_client


@pytest.fixture
def make_api(
    http: aiohttp.ClientSession, client: HTTPClient | None, fake: tuple[FakeDingTalk, str]
) -> Callable[..., DingTalkAPI]:
    """Build a DingTalkAPI pointed at the fake server, on each transport."""

    def build(**kwargs: Any) -> DingTalkAPI:
        options: dict[str, Any] = {
            "platform": "dt",
            "app_key": APP_KEY,
            "app_secret": APP_SECRET,
            "api_base": fake[1] + "/",
            "timeout_s": 2.0,
            "client": client,
        }
        options.update(kwargs)
        return DingTalkAPI(http, **options)

    return build


async def _wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def _assert_no_secret(exc: BaseException, *secrets: str) -> None:
    for secret in (APP_SECRET, *secrets):
        assert secret not in str(exc)
        assert secret not in repr(exc)


# -- access token ----------------------------------------------------------------------------


async def test_access_token_request_shape(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """The token call POSTs appKey/appSecret as JSON with Accept and User-Agent headers."""
    state, _ = fake
    api = make_api(user_agent="imrelay/test")
    assert await api.access_token() == "tok-1"
    path, headers, body = state.requests[0]
    assert path == "/v1.0/oauth2/accessToken"
    assert body == {"appKey": APP_KEY, "appSecret": APP_SECRET}
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept"] == "application/json"
    assert headers["User-Agent"] == "imrelay/test"


async def test_access_token_cached_until_margin_then_refreshed(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """The token is reused until expireIn - 300 s, then fetched again; force always refetches."""
    state, _ = fake
    clock = FakeClock()
    api = make_api(clock=clock)
    assert await api.access_token() == "tok-1"
    clock.now += 7200 - 300 - 1
    assert await api.access_token() == "tok-1"
    assert state.count("/v1.0/oauth2/accessToken") == 1
    clock.now += 1
    assert await api.access_token() == "tok-2"
    assert state.count("/v1.0/oauth2/accessToken") == 2
    assert await api.access_token(force=True) == "tok-3"
    assert await api.access_token() == "tok-3"
    assert state.count("/v1.0/oauth2/accessToken") == 3


async def test_access_token_short_lifetime_uses_half_margin(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """A token living less than 600 s is refreshed after half its lifetime."""
    state, _ = fake
    state.token_replies = [(200, {"accessToken": "short", "expireIn": 100})]
    clock = FakeClock()
    api = make_api(clock=clock)
    assert await api.access_token() == "short"
    clock.now += 49
    assert await api.access_token() == "short"
    clock.now += 1
    assert await api.access_token() == "tok-1"


async def test_access_token_concurrent_callers_share_one_fetch(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """Ten concurrent callers cause exactly one token request."""
    state, _ = fake
    state.gate = asyncio.Event()
    api = make_api()
    tasks = [asyncio.create_task(api.access_token()) for _ in range(10)]
    await _wait_for(lambda: state.count("/v1.0/oauth2/accessToken") >= 1)
    for _ in range(5):
        await asyncio.sleep(0)
    state.gate.set()
    assert await asyncio.gather(*tasks) == ["tok-1"] * 10
    assert state.count("/v1.0/oauth2/accessToken") == 1


async def test_access_token_concurrent_forced_refreshes_share_one_fetch(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """Callers forcing a refresh of the same stale token together cause one request."""
    state, _ = fake
    api = make_api()
    assert await api.access_token() == "tok-1"
    state.gate = asyncio.Event()
    tasks = [asyncio.create_task(api.access_token(force=True)) for _ in range(5)]
    await _wait_for(lambda: state.count("/v1.0/oauth2/accessToken") >= 2)
    for _ in range(5):
        await asyncio.sleep(0)
    state.gate.set()
    assert await asyncio.gather(*tasks) == ["tok-2"] * 5
    assert state.count("/v1.0/oauth2/accessToken") == 2


async def test_access_token_bad_credentials(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """400 invalidClientIdOrSecret raises a non-retryable AuthError without the secret."""
    state, _ = fake
    state.token_replies = [
        (400, {"requestid": "r", "code": "invalidClientIdOrSecret", "message": "无效的clientId"})
    ]
    with pytest.raises(DingTalkInvalidCredentials) as info:
        await make_api().access_token()
    assert isinstance(info.value, AuthError)
    assert info.value.retryable is False
    assert info.value.platform == "dt"
    _assert_no_secret(info.value)


@pytest.mark.parametrize(
    "reply",
    [
        (200, {"accessToken": "", "expireIn": 7200}),
        (200, {"accessToken": "t", "expireIn": 0}),
        (200, {"accessToken": "t", "expireIn": True}),
        (200, {"accessToken": "t"}),
        (200, b"<html>"),
    ],
)
async def test_access_token_malformed_answer(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI], reply: Reply
) -> None:
    """A 200 answer without a usable token raises PlatformAPIError and caches nothing."""
    state, _ = fake
    state.token_replies = [reply]
    api = make_api()
    with pytest.raises(PlatformAPIError, match="lacks"):
        await api.access_token()
    assert await api.access_token() == "tok-1"


async def test_access_token_server_error_is_retryable(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """A 500 from the token endpoint raises a retryable error."""
    state, _ = fake
    state.token_replies = [(500, {"code": "unknownError", "message": "x"})]
    with pytest.raises(DingTalkServerError) as info:
        await make_api().access_token()
    assert info.value.retryable is True


# -- open connection -------------------------------------------------------------------------


async def test_open_connection_success(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """open_connection POSTs credentials and subscriptions and returns (endpoint, ticket)."""
    state, _ = fake
    api = make_api(user_agent="imrelay/9")
    assert await api.open_connection(local_ip="10.1.2.3") == ("ws://127.0.0.1:1/connect", "t-1")
    path, headers, body = state.requests[0]
    assert path == "/v1.0/gateway/connections/open"
    assert headers["Accept"] == "application/json"
    assert headers["Content-Type"] == "application/json"
    assert body == {
        "clientId": APP_KEY,
        "clientSecret": APP_SECRET,
        "subscriptions": [{"type": "CALLBACK", "topic": "/v1.0/im/bot/messages/get"}],
        "ua": "imrelay/9",
        "localIp": "10.1.2.3",
    }


async def test_open_connection_bad_credentials(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """A 400 invalidClientIdOrSecret from the gateway raises a non-retryable AuthError."""
    state, _ = fake
    state.open_reply = (400, {"code": "invalidClientIdOrSecret", "message": "bad"})
    with pytest.raises(AuthError) as info:
        await make_api().open_connection()
    assert info.value.retryable is False
    assert info.value.platform == "dt"
    _assert_no_secret(info.value)


async def test_open_connection_server_error_is_retryable(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """A 500 from the gateway raises a retryable PlatformAPIError."""
    state, _ = fake
    state.open_reply = (500, b"oops")
    with pytest.raises(PlatformAPIError) as info:
        await make_api().open_connection()
    assert not isinstance(info.value, AuthError)
    assert info.value.retryable is True
    assert info.value.status == 500


async def test_open_connection_refused_is_retryable(http: aiohttp.ClientSession) -> None:
    """A refused TCP connection becomes a retryable PlatformAPIError."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = DingTalkAPI(
        http,
        platform="dt",
        app_key=APP_KEY,
        app_secret=APP_SECRET,
        api_base=f"http://127.0.0.1:{port}",
        timeout_s=2.0,
    )
    with pytest.raises(PlatformAPIError) as info:
        await api.open_connection()
    assert info.value.retryable is True
    assert "open-connection request failed" in str(info.value)
    _assert_no_secret(info.value)


async def test_open_connection_timeout_is_retryable(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """A gateway slower than the timeout raises a retryable PlatformAPIError."""
    state, _ = fake
    state.gate = asyncio.Event()
    with pytest.raises(PlatformAPIError, match="timed out") as info:
        await make_api(timeout_s=0.2).open_connection()
    assert info.value.retryable is True


# -- session webhook -------------------------------------------------------------------------


async def test_send_session_webhook_ok(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """A successful send POSTs the JSON body with Content-Type application/json."""
    state, base = fake
    body = build_webhook_body("sum=3", at_user_ids=["staff01"])
    await make_api().send_session_webhook(f"{base}/robot/sendBySession?session=abc", body)
    path, headers, received = state.requests[0]
    assert path == "/robot/sendBySession"
    assert headers["Content-Type"] == "application/json"
    assert received == body


async def test_send_session_webhook_session_expired(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """HTTP 200 with errcode 300001 raises a non-retryable DingTalkSessionExpired."""
    state, base = fake
    state.webhook_reply = (200, {"errcode": 300001, "errmsg": "session 不存在"})
    url = f"{base}/robot/sendBySession?session=secretsession"
    with pytest.raises(DingTalkSessionExpired) as info:
        await make_api().send_session_webhook(url, build_webhook_body("x"))
    assert info.value.errcode == 300001
    assert info.value.retryable is False
    assert info.value.status == 200
    _assert_no_secret(info.value, "secretsession")


async def test_send_session_webhook_unusable_url_names_no_session(
    make_api: Callable[..., DingTalkAPI],
) -> None:
    """A sessionWebhook URL the client refuses fails at once, and neither the error nor its
    cause chain repeats the session carried in the query."""
    with pytest.raises(PlatformAPIError) as info:
        await make_api().send_session_webhook(
            "http://127.0.0.1:99999/robot/sendBySession?session=secretsession", {}
        )
    assert info.value.retryable is False
    assert "refused" in str(info.value)
    _assert_no_secret(info.value, "secretsession")
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "http:robot", " http://127.0.0.1/", ""]
)
async def test_send_session_webhook_not_http_is_refused(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI], url: str
) -> None:
    """A sessionWebhook that is not an absolute http(s) URL is refused before any request."""
    state, _ = fake
    with pytest.raises(PlatformAPIError, match="not an http") as info:
        await make_api().send_session_webhook(url, {})
    assert info.value.retryable is False
    assert state.requests == []


async def test_send_session_webhook_scheme_is_case_insensitive(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """``HTTP://`` is an http URL (schemes are case-insensitive)."""
    state, base = fake
    await make_api().send_session_webhook("HTTP" + base[4:] + "/robot/sendBySession?s=1", {})
    assert len(state.requests) == 1


@pytest.mark.parametrize("errcode", [130101, 660026, 410100])
async def test_send_session_webhook_throttled(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI], errcode: int
) -> None:
    """Throttling errcodes raise RateLimited with a 60 s retry_after."""
    state, base = fake
    state.webhook_reply = (200, {"errcode": errcode, "errmsg": "send too fast"})
    with pytest.raises(RateLimited) as info:
        await make_api().send_session_webhook(f"{base}/robot/sendBySession?s=1", {})
    assert isinstance(info.value, DingTalkWebhookThrottled)
    assert info.value.retry_after == 60.0
    assert info.value.retryable is True


async def test_send_session_webhook_timeout_is_retryable(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """A webhook slower than a 0.2 s timeout raises a retryable error without the URL."""
    state, base = fake
    state.gate = asyncio.Event()
    url = f"{base}/robot/sendBySession?session=secretsession"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PlatformAPIError, match="timed out") as info:
        await make_api(timeout_s=0.2).send_session_webhook(url, build_webhook_body("x"))
    assert loop.time() - started < 2.0
    assert info.value.retryable is True
    _assert_no_secret(info.value, "secretsession")


async def test_send_session_webhook_server_error_is_retryable(
    fake: tuple[FakeDingTalk, str], make_api: Callable[..., DingTalkAPI]
) -> None:
    """A 502 without an errcode raises a retryable UnknownDingTalkError."""
    state, base = fake
    state.webhook_reply = (502, b"bad gateway")
    with pytest.raises(UnknownDingTalkError) as info:
        await make_api().send_session_webhook(f"{base}/robot/sendBySession", {})
    assert info.value.retryable is True


async def test_send_session_webhook_rejects_non_http_url(
    make_api: Callable[..., DingTalkAPI],
) -> None:
    """A sessionWebhook that is not an http(s) URL is refused before any request."""
    with pytest.raises(PlatformAPIError, match="not an http"):
        await make_api().send_session_webhook("file:///etc/passwd", {})


def test_dingtalk_api_repr_hides_secret(http: aiohttp.ClientSession) -> None:
    """The client's repr shows the platform and app key but not the secret."""
    api = DingTalkAPI(http, platform="dt", app_key=APP_KEY, app_secret=APP_SECRET)
    assert APP_SECRET not in repr(api)
    assert APP_KEY in repr(api)


# -- webhook bodies --------------------------------------------------------------------------


def test_build_webhook_body_text() -> None:
    """Plain text becomes a text message with an empty, non-@all at block."""
    assert build_webhook_body("hello") == {
        "msgtype": "text",
        "text": {"content": "hello"},
        "at": {"atUserIds": [], "isAtAll": False},
    }


def test_build_webhook_body_prefixes_missing_mentions() -> None:
    """Each mentioned id not already written as @id is put in front of the text, once."""
    body = build_webhook_body("hi @u2 there", at_user_ids=["u1", "u2", "u1", "u3"])
    assert body["text"]["content"] == "@u1 @u3 hi @u2 there"
    assert body["at"] == {"atUserIds": ["u1", "u2", "u3"], "isAtAll": False}


def test_build_webhook_body_markdown() -> None:
    """Markdown uses the given title, or the first line without markers, cut to 20 chars."""
    body = build_webhook_body("**md** body", markdown=True, title="T", at_user_ids=["s1"])
    assert body == {
        "msgtype": "markdown",
        "markdown": {"title": "T", "text": "@s1 **md** body"},
        "at": {"atUserIds": ["s1"], "isAtAll": False},
    }
    long = build_webhook_body("\n# A fairly long heading line here\nbody", markdown=True)
    assert long["markdown"]["title"] == "A fairly long headin"
    assert build_webhook_body("  \n", markdown=True)["markdown"]["title"] == "message"


@pytest.mark.parametrize(
    ("reply_to", "now_ms", "expired"),
    [
        ({"expires_at_ms": 1_000_000}, 900_000, False),
        ({"expires_at_ms": 1_000_000}, 940_000, True),
        ({"expires_at_ms": 1_000_000}, 939_999, False),
        ({"expires_at_ms": 1_000_000}, 2_000_000, True),
        ({"expires_at_ms": 0}, 2_000_000, False),
        ({}, 2_000_000, False),
        ({"expires_at_ms": "1000"}, 2_000_000, False),
        ({"expires_at_ms": True}, 2_000_000, False),
    ],
)
def test_is_session_webhook_expired(reply_to: dict[str, Any], now_ms: int, expired: bool) -> None:
    """Expired or expiring within the 60 s margin is expired; an unknown expiry is not."""
    assert is_session_webhook_expired(reply_to, now_ms) is expired


def test_is_session_webhook_expired_custom_margin() -> None:
    """The margin is configurable."""
    assert is_session_webhook_expired({"expires_at_ms": 1000}, 900, margin_ms=0) is False
    assert is_session_webhook_expired({"expires_at_ms": 1000}, 900, margin_ms=100) is True


# -- errcode registry ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "cls", "retryable"),
    [
        (400, {"code": "invalidClientIdOrSecret"}, DingTalkInvalidCredentials, False),
        (400, {"code": "InvalidAuthentication"}, DingTalkTokenInvalid, False),
        (401, {"code": "InvalidAuthentication"}, DingTalkTokenInvalid, False),
        (400, {"code": "AuthenticationFailed.MissingParameter"}, DingTalkMissingToken, False),
        (403, {"code": "Forbidden.AccessDenied.QpsLimitForApi"}, DingTalkQpsLimited, True),
        (400, {"code": "invalidParameter.robotCode.auth"}, DingTalkRequestRejected, False),
        (400, {"code": "group.disbanded"}, DingTalkRequestRejected, False),
        (500, {"code": "unknownError"}, DingTalkServerError, True),
        (504, None, UnknownDingTalkError, True),
        (400, {"code": "brandNewCode"}, UnknownDingTalkError, False),
        (200, {"errcode": 300001, "errmsg": "session 不存在"}, DingTalkSessionExpired, False),
        (200, {"errcode": "300001"}, DingTalkSessionExpired, False),
        (200, {"errcode": 43004}, DingTalkRequestRejected, False),
        (200, {"errcode": 400105}, DingTalkRequestRejected, False),
        (200, {"errcode": 310000}, DingTalkRequestRejected, False),
        (200, {"errcode": 40014}, DingTalkTokenInvalid, False),
        (200, {"errcode": 88, "sub_code": "40014"}, DingTalkTokenInvalid, False),
        (200, {"errcode": 88}, UnknownDingTalkError, False),
        (200, {"errcode": 88, "sub_code": "99"}, UnknownDingTalkError, False),
        (400, {"errcode": [1], "code": "group.disbanded"}, DingTalkRequestRejected, False),
        (200, {"errcode": 40096}, DingTalkInvalidCredentials, False),
        (200, {"errcode": 90018}, DingTalkQpsLimited, True),
        (200, {"errcode": 123456}, UnknownDingTalkError, False),
        (500, {"errcode": 400105}, DingTalkRequestRejected, True),
    ],
)
def test_error_from_response_maps_codes(
    status: int, body: dict[str, Any] | None, cls: type[PlatformAPIError], retryable: bool
) -> None:
    """Each documented code maps to its class and retry flag; unknown codes fall back."""
    error = error_from_response(status, body, platform="dt")
    assert type(error) is cls
    assert error is not None
    assert error.retryable is retryable
    assert error.status == status
    assert error.platform == "dt"
    assert str(error).startswith("dingtalk api error")


def test_error_from_response_rate_limits() -> None:
    """QPS limits wait 1 s, per-minute and webhook limits 60 s, a bare 429 1 s."""
    qps = error_from_response(
        403, {"code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"}, platform=""
    )
    minute = error_from_response(200, {"errcode": 90006}, platform="")
    hook = error_from_response(200, {"errcode": 660026}, platform="")
    bare = error_from_response(429, None, platform="")
    assert isinstance(qps, RateLimited)
    assert qps.retry_after == 1.0
    assert isinstance(minute, RateLimited)
    assert minute.retry_after == 60.0
    assert isinstance(hook, RateLimited)
    assert hook.retry_after == 60.0
    assert isinstance(bare, RateLimited)
    assert bare.retry_after == 1.0


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, None),
        (200, {}),
        (200, {"errcode": 0, "errmsg": "ok"}),
        (200, {"errcode": "0"}),
        (200, {"accessToken": "t", "expireIn": 7200}),
        (200, {"success": True, "result": True}),
        (204, None),
    ],
)
def test_error_from_response_success(status: int, body: dict[str, Any] | None) -> None:
    """2xx answers without a non-zero errcode are successes."""
    assert error_from_response(status, body, platform="dt") is None


def test_error_from_response_message_is_bounded() -> None:
    """The platform's message is included but cut to 200 characters."""
    error = error_from_response(400, {"code": "x", "message": "m" * 1000}, platform="")
    assert error is not None
    assert "m" * 200 in str(error)
    assert "m" * 201 not in str(error)


def test_register_rejects_duplicate_codes() -> None:
    """Registering a code twice is a programming error."""
    assert lookup(300001) is not None
    with pytest.raises(ValueError, match="registered twice"):
        register(300001)(DingTalkSessionExpired)
