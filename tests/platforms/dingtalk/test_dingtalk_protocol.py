"""Tier 1 tests of the sans-I/O DingTalk Stream protocol (protocol doc §1)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imrelay.errors import AuthError, PlatformAPIError, ProtocolError, RateLimited
from imrelay.platforms.dingtalk.protocol import (
    DEFAULT_SUBSCRIPTIONS,
    MAX_FRAME_BYTES,
    TOPIC_BOT_MESSAGE,
    TOPIC_DISCONNECT,
    TOPIC_PING,
    Frame,
    build_ack,
    build_open_request,
    build_ping_ack,
    build_ws_url,
    parse_frame,
    parse_open_response,
)

BOT_DATA = {"conversationId": "cidAsXSBLnA==", "msgtype": "text", "text": {"content": " hi"}}

CALLBACK_FRAME = {
    "specVersion": "1.0",
    "type": "CALLBACK",
    "headers": {
        "appId": "1305d5f5-0000",
        "connectionId": "2f9c95bd-fe85-11f0",
        "contentType": "application/json",
        "messageId": "212ca9d7_974_1898c159aa6_1783b",
        "time": "1690362102194",
        "topic": "/v1.0/im/bot/messages/get",
    },
    "data": json.dumps(BOT_DATA),
}
PING_FRAME = {
    "type": "SYSTEM",
    "headers": {"topic": "ping", "messageId": "ping-mid-1", "contentType": "application/json"},
    "data": '{"opaque":"op-123"}',
}
DISCONNECT_FRAME = {
    "type": "SYSTEM",
    "headers": {"topic": "disconnect", "contentType": "application/json"},
    "data": '{"reason":"connection is expired"}',
}
EVENT_FRAME = {
    "specVersion": "1.0",
    "type": "EVENT",
    "headers": {
        "topic": "*",
        "messageId": "ev-1",
        "contentType": "application/json",
        "time": "1690362102194",
        "eventType": "user_add_org",
        "eventId": "e1",
        "eventCorpId": "ding9f",
        "eventBornTime": "1690362102000",
        "eventUnifiedAppId": "u1",
    },
    "data": '{"userId": ["u1"]}',
}


def test_parse_frame_callback_bot_message() -> None:
    """A §1.3 CALLBACK frame parses into its type, topic, messageId, headers and raw data."""
    frame = parse_frame(json.dumps(CALLBACK_FRAME))
    assert frame.type == "CALLBACK"
    assert frame.topic == TOPIC_BOT_MESSAGE
    assert frame.message_id == "212ca9d7_974_1898c159aa6_1783b"
    assert frame.headers["time"] == "1690362102194"
    assert frame.headers["appId"] == "1305d5f5-0000"
    assert frame.data == CALLBACK_FRAME["data"]
    assert frame.data_json() == BOT_DATA


def test_parse_frame_accepts_bytes() -> None:
    """A frame given as UTF-8 bytes parses like the same text."""
    raw = json.dumps(CALLBACK_FRAME, ensure_ascii=False).encode()
    assert parse_frame(raw) == parse_frame(json.dumps(CALLBACK_FRAME))


def test_parse_frame_system_ping() -> None:
    """A ping without specVersion parses with its topic taken from the headers."""
    frame = parse_frame(json.dumps(PING_FRAME))
    assert (frame.type, frame.topic, frame.message_id) == ("SYSTEM", TOPIC_PING, "ping-mid-1")
    assert frame.data_json() == {"opaque": "op-123"}


def test_parse_frame_disconnect_without_message_id() -> None:
    """The doc's disconnect sample has no messageId and still parses, with message_id ''."""
    frame = parse_frame(json.dumps(DISCONNECT_FRAME))
    assert (frame.type, frame.topic, frame.message_id) == ("SYSTEM", TOPIC_DISCONNECT, "")
    assert frame.data_json() == {"reason": "connection is expired"}


def test_parse_frame_event_headers() -> None:
    """An EVENT frame keeps its event headers as strings."""
    frame = parse_frame(json.dumps(EVENT_FRAME))
    assert frame.type == "EVENT"
    assert frame.topic == "*"
    assert frame.headers["eventBornTime"] == "1690362102000"
    assert frame.headers["eventType"] == "user_add_org"


def test_parse_frame_coerces_scalar_header_values() -> None:
    """Numeric, boolean and null header values become strings."""
    raw = dict(PING_FRAME, headers={**PING_FRAME["headers"], "time": 1690362102194, "x": True})
    raw["headers"]["y"] = None
    raw["headers"]["z"] = 1.5
    frame = parse_frame(json.dumps(raw))
    assert frame.headers["time"] == "1690362102194"
    assert frame.headers["x"] == "true"
    assert frame.headers["y"] == ""
    assert frame.headers["z"] == "1.5"


def test_parse_frame_missing_data_is_empty() -> None:
    """A frame without data (or with null data) has data '' which decodes to {}."""
    for data in ({}, {"data": None}):
        raw = {k: v for k, v in PING_FRAME.items() if k != "data"} | data
        frame = parse_frame(json.dumps(raw))
        assert frame.data == ""
        assert frame.data_json() == {}


def test_parse_frame_is_hashable_and_immutable() -> None:
    """Frames can be hashed and their headers cannot be modified."""
    frame = parse_frame(json.dumps(PING_FRAME))
    assert isinstance(hash(frame), int)
    with pytest.raises(TypeError):
        frame.headers["topic"] = "x"  # type: ignore[index]


def test_parse_frame_sets_platform_on_errors() -> None:
    """Errors carry the platform name given by the caller."""
    with pytest.raises(ProtocolError) as info:
        parse_frame("nope", platform="dt")
    assert info.value.platform == "dt"


def _mutated(**changes: Any) -> str:
    raw: dict[str, Any] = json.loads(json.dumps(CALLBACK_FRAME))
    for key, value in changes.items():
        if key.startswith("h_"):
            if value is ...:
                raw["headers"].pop(key[2:], None)
            else:
                raw["headers"][key[2:]] = value
        elif value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    return json.dumps(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "not valid json"),
        ("{", "not valid json"),
        (b"\xff\xfe", "not utf-8"),
        ("[]", "not a json object"),
        ('"x"', "not a json object"),
        ("[" * 100_000 + "]" * 100_000, "not valid json"),
        (_mutated(type="PUSH"), "type"),
        (_mutated(type=None), "type"),
        (_mutated(type=...), "type"),
        (_mutated(headers=...), "headers"),
        (_mutated(headers=[]), "headers"),
        (_mutated(h_topic=...), "topic"),
        (_mutated(h_topic=""), "topic"),
        (_mutated(h_topic=5), "topic"),
        (_mutated(h_messageId=...), "message id"),
        (_mutated(h_messageId=""), "message id"),
        (_mutated(h_messageId=12), "message id"),
        (_mutated(h_extra={"a": 1}), "not a scalar"),
        (_mutated(h_extra=[1]), "not a scalar"),
        (_mutated(data={"a": 1}), "data is not a string"),
        (_mutated(data=5), "data is not a string"),
    ],
)
def test_parse_frame_rejects_malformed(raw: str | bytes, reason: str) -> None:
    """Malformed frames raise ProtocolError with a lowercase reason."""
    with pytest.raises(ProtocolError) as info:
        parse_frame(raw)
    message = str(info.value)
    assert message == message.lower()
    assert reason.lower() in message


def test_parse_frame_ping_requires_message_id() -> None:
    """Only disconnect may omit messageId; a ping without one is rejected."""
    raw = {**PING_FRAME, "headers": {"topic": "ping"}}
    with pytest.raises(ProtocolError, match="message id"):
        parse_frame(json.dumps(raw))


def test_parse_frame_rejects_oversized_frames() -> None:
    """Frames over MAX_FRAME_BYTES are rejected as text and as bytes, even when valid json."""
    big = json.dumps({**PING_FRAME, "data": json.dumps({"opaque": "x" * MAX_FRAME_BYTES})})
    with pytest.raises(ProtocolError, match="larger"):
        parse_frame(big)
    with pytest.raises(ProtocolError, match="larger"):
        parse_frame(big.encode())
    # multi-byte characters count by their utf-8 size, not by characters
    wide = json.dumps({**PING_FRAME, "data": "é" * (MAX_FRAME_BYTES // 2)}, ensure_ascii=False)
    assert len(wide) < MAX_FRAME_BYTES
    with pytest.raises(ProtocolError, match="larger"):
        parse_frame(wide)


def test_parse_frame_accepts_frame_just_under_limit() -> None:
    """A frame at the size limit is accepted."""
    frame_obj = {**PING_FRAME, "data": ""}
    overhead = len(json.dumps(frame_obj).encode())
    raw = json.dumps({**frame_obj, "data": "a" * (MAX_FRAME_BYTES - overhead)})
    assert len(raw.encode()) == MAX_FRAME_BYTES
    assert parse_frame(raw).type == "SYSTEM"


@pytest.mark.parametrize("data", ["[1]", '"s"', "{", "null"])
def test_frame_data_json_rejects_non_objects(data: str) -> None:
    """data_json raises ProtocolError unless data holds a JSON object."""
    frame = Frame(type="CALLBACK", topic="t", message_id="m", headers={}, data=data)
    with pytest.raises(ProtocolError):
        frame.data_json()


def test_build_ack_matches_observed_shape() -> None:
    """build_ack produces exactly the ACK texts observed from the official SDK (§1.4)."""
    assert build_ack("ev-1", {"userId": ["u1"]}) == (
        '{"code": 200, "headers": {"contentType": "application/json", "messageId": "ev-1"}, '
        '"message": "OK", "data": "{\\"userId\\": [\\"u1\\"]}"}'
    )
    assert build_ack("cb-mid-1", {"response": "OK"}, message="") == (
        '{"code": 200, "headers": {"contentType": "application/json", "messageId": "cb-mid-1"}, '
        '"message": "", "data": "{\\"response\\": \\"OK\\"}"}'
    )


def test_build_ack_defaults_and_codes() -> None:
    """Without data the ACK carries '{}'; code and message are passed through."""
    ack = json.loads(build_ack("m1", code=404, message="not handled"))
    assert ack == {
        "code": 404,
        "headers": {"contentType": "application/json", "messageId": "m1"},
        "message": "not handled",
        "data": "{}",
    }
    assert json.loads(json.loads(build_ack("m2", {"response": None}))["data"]) == {
        "response": None
    }


def test_build_ping_ack_echoes_data_verbatim() -> None:
    """The ping ACK echoes the ping's data text byte for byte (§1.5)."""
    frame = parse_frame(json.dumps({**PING_FRAME, "data": '{"opaque": "op-123"}'}))
    assert build_ping_ack(frame) == (
        '{"code": 200, "headers": {"contentType": "application/json", "messageId": "ping-mid-1"}, '
        '"message": "OK", "data": "{\\"opaque\\": \\"op-123\\"}"}'
    )
    odd = parse_frame(json.dumps({**PING_FRAME, "data": '{ "opaque":"a b" }'}))
    assert json.loads(build_ping_ack(odd))["data"] == '{ "opaque":"a b" }'
    empty = parse_frame(json.dumps({**PING_FRAME, "data": ""}))
    assert json.loads(build_ping_ack(empty))["data"] == "{}"


def test_build_open_request_shape() -> None:
    """The open-connection body holds exactly the five fields the gateway expects (§1.1)."""
    body = build_open_request("dingkey", "s3cret", ua="imrelay/0.1.0", local_ip="10.0.0.5")
    assert body == {
        "clientId": "dingkey",
        "clientSecret": "s3cret",
        "subscriptions": [{"type": "CALLBACK", "topic": "/v1.0/im/bot/messages/get"}],
        "ua": "imrelay/0.1.0",
        "localIp": "10.0.0.5",
    }
    assert DEFAULT_SUBSCRIPTIONS == ({"type": "CALLBACK", "topic": TOPIC_BOT_MESSAGE},)
    custom = build_open_request("k", "s", ua="u", subscriptions=[{"type": "EVENT", "topic": "*"}])
    assert custom["subscriptions"] == [{"type": "EVENT", "topic": "*"}]
    assert custom["localIp"] == "127.0.0.1"


def test_parse_open_response_success() -> None:
    """A 200 answer yields (endpoint, ticket)."""
    body = b'{"endpoint": "wss://wss-open-connection.dingtalk.com:443/connect", "ticket": "t-1"}'
    assert parse_open_response(200, body) == (
        "wss://wss-open-connection.dingtalk.com:443/connect",
        "t-1",
    )


def test_parse_open_response_bad_credentials() -> None:
    """400 invalidClientIdOrSecret raises a non-retryable AuthError."""
    body = json.dumps(
        {
            "requestid": "r",
            "code": "invalidClientIdOrSecret",
            "message": "无效的clientId或者clientSecret",
        }
    ).encode()
    with pytest.raises(AuthError) as info:
        parse_open_response(400, body, platform="dt")
    assert info.value.retryable is False
    assert info.value.errcode == "invalidClientIdOrSecret"
    assert info.value.status == 400
    assert info.value.platform == "dt"


def test_parse_open_response_unauthorized_is_auth_error() -> None:
    """A bare 401 is treated as refused credentials."""
    with pytest.raises(AuthError):
        parse_open_response(401, b"")


@pytest.mark.parametrize(
    ("status", "body", "retryable"),
    [
        (500, b'{"code": "unknownError", "message": "boom"}', True),
        (502, b"<html>bad gateway</html>", True),
        (504, b"", True),
        (429, b"", True),
        (400, b'{"code": "somethingElse"}', False),
        (404, b"not found", False),
        (204, b"", False),
        (200, b"<xml/>", False),
        (200, b'{"endpoint": "", "ticket": "t"}', False),
        (200, b'{"endpoint": "wss://x", "ticket": 5}', False),
        (200, b"[]", False),
    ],
)
def test_parse_open_response_errors(status: int, body: bytes, retryable: bool) -> None:
    """Other answers raise PlatformAPIError, retryable only for 5xx and 429."""
    with pytest.raises(PlatformAPIError) as info:
        parse_open_response(status, body)
    assert not isinstance(info.value, AuthError)
    assert info.value.retryable is retryable
    assert str(info.value) == str(info.value).lower() or "http" in str(info.value)


def test_parse_open_response_throttled() -> None:
    """A 403 QPS limit raises RateLimited."""
    body = b'{"code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi", "message": "m"}'
    with pytest.raises(RateLimited) as info:
        parse_open_response(403, body)
    assert info.value.retry_after == 1.0


@pytest.mark.parametrize(
    ("endpoint", "ticket", "url"),
    [
        ("wss://h:443/connect", "abc", "wss://h:443/connect?ticket=abc"),
        ("wss://h/connect", "a b+c/=", "wss://h/connect?ticket=a+b%2Bc%2F%3D"),
        ("ws://127.0.0.1:8/connect?x=1", "t", "ws://127.0.0.1:8/connect?x=1&ticket=t"),
        ("ws://h/c?", "t", "ws://h/c?ticket=t"),
    ],
)
def test_build_ws_url(endpoint: str, ticket: str, url: str) -> None:
    """The ticket is quote_plus-encoded and joined with ? or & as needed (§1.2)."""
    assert build_ws_url(endpoint, ticket) == url


# -- properties -------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_frameish = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["SYSTEM", "EVENT", "CALLBACK", "PUSH"]) | _scalars,
        "headers": st.fixed_dictionaries(
            {},
            optional={
                "topic": st.sampled_from(["ping", "disconnect", TOPIC_BOT_MESSAGE]) | _scalars,
                "messageId": st.text(max_size=6) | _scalars,
                "time": _scalars,
                "extra": _json,
            },
        )
        | _json,
        "data": st.text(max_size=16) | _json,
        "specVersion": _json,
    },
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=256)
    | st.text(max_size=256)
    | _json.map(json.dumps)
    | _frameish.map(json.dumps)
    | _frameish.map(lambda o: json.dumps(o).encode())
)
def test_parse_frame_property_frame_or_protocol_error(raw: str | bytes) -> None:
    """For any input, parse_frame returns a Frame or raises ProtocolError — nothing else."""
    try:
        frame = parse_frame(raw)
    except ProtocolError as exc:
        message = str(exc)
    else:
        message = ""
    if message:
        assert message == message.lower()
        return
    assert frame.type in ("SYSTEM", "EVENT", "CALLBACK")
    assert isinstance(frame.message_id, str)
    assert all(isinstance(v, str) for v in frame.headers.values())
    with contextlib.suppress(ProtocolError):
        assert isinstance(frame.data_json(), dict)
    ack = json.loads(build_ping_ack(frame))
    assert ack["headers"]["messageId"] == frame.message_id
