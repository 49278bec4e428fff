"""A fuzz run over every parser of outside input, at high example counts and bounded in time.

Each parser must accept its input or reject it with its own clear error, never another
exception. The per-parser property tests run a few hundred examples each; this run repeats the
properties at ``IMRELAY_FUZZ_EXAMPLES`` examples (default 1,000) per parser, on inputs built
both at random and by mutating valid samples; the whole run takes well under a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imrelay.config import parse_settings
from imrelay.errors import ConfigError, ProtocolError, SignatureError
from imrelay.message import InboundMessage
from imrelay.platforms.dingtalk.crypto import DingTalkCallbackCrypto, verify_webhook_signature
from imrelay.platforms.dingtalk.events import parse_bot_message
from imrelay.platforms.dingtalk.protocol import parse_frame, parse_open_response

EXAMPLES = int(os.environ.get("IMRELAY_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=25,
)

VALID_FRAME = {
    "specVersion": "1.0",
    "type": "CALLBACK",
    "headers": {"topic": "/v1.0/im/bot/messages/get", "messageId": "m1",
                "contentType": "application/json", "time": "1690362102194"},
    "data": json.dumps({"msgId": "msg1", "conversationId": "cid1", "conversationType": "1",
                        "senderStaffId": "u1", "msgtype": "text", "text": {"content": "hi"}}),
}  # fmt: skip
VALID_MESSAGE = json.loads(VALID_FRAME["data"])  # type: ignore[arg-type]


def mutated(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` with random keys replaced, removed or added."""
    return st.builds(
        lambda repl, drop, extra: {
            **{k: v for k, v in base.items() if k not in drop},
            **repl,
            **extra,
        },
        st.dictionaries(st.sampled_from(sorted(base)), json_values, max_size=3),
        st.sets(st.sampled_from(sorted(base)), max_size=2),
        st.dictionaries(st.text(max_size=8), json_values, max_size=2),
    )


@FUZZ
@given(st.binary(max_size=600) | st.text(max_size=600) | json_values.map(json.dumps)
       | mutated(VALID_FRAME).map(json.dumps))  # fmt: skip
def test_fuzz_parse_frame(raw: bytes | str) -> None:
    """Stream frames: a Frame or ProtocolError."""
    try:
        frame = parse_frame(raw)
    except ProtocolError:
        return
    with contextlib.suppress(ProtocolError):
        frame.data_json()


@FUZZ
@given(json_values | mutated(VALID_MESSAGE))
def test_fuzz_parse_bot_message(data: Any) -> None:
    """Bot message payloads (Stream and webhook): an InboundMessage or ProtocolError."""
    if not isinstance(data, dict):
        data = {"value": data}
    try:
        message = parse_bot_message(data, platform="dt", received_at=0.0)
    except ProtocolError:
        return
    assert InboundMessage.from_dict(message.to_dict()) == message


@FUZZ
@given(
    st.integers(100, 599),
    st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_fuzz_parse_open_response(status: int, body: bytes) -> None:
    """Open-connection answers: (endpoint, ticket) or a platform error."""
    from imrelay.errors import PlatformAPIError

    with contextlib.suppress(PlatformAPIError):
        parse_open_response(status, body)


CRYPTO = DingTalkCallbackCrypto("123456", "1234567890123456789012345678901234567890123", "ding1")


@FUZZ
@given(st.text(max_size=60), st.text(max_size=20), st.text(max_size=20), st.text(max_size=200))
def test_fuzz_encrypted_callback(signature: str, timestamp: str, nonce: str, encrypt: str) -> None:
    """Encrypted event envelopes: a dict, SignatureError or ProtocolError."""
    with contextlib.suppress(SignatureError, ProtocolError):
        CRYPTO.decrypt(signature, timestamp, nonce, encrypt)
    # and with a valid signature over the random envelope, so decryption itself is fuzzed
    with contextlib.suppress(SignatureError, ProtocolError):
        CRYPTO.decrypt(CRYPTO.signature(timestamp, nonce, encrypt), timestamp, nonce, encrypt)


@FUZZ
@given(st.none() | st.text(max_size=20), st.none() | st.text(max_size=60))
def test_fuzz_webhook_signature_headers(timestamp: str | None, sign: str | None) -> None:
    """Webhook timestamp/sign headers: accepted or SignatureError."""
    with contextlib.suppress(SignatureError):
        verify_webhook_signature(timestamp, sign, "secret", now_ms=0, window_s=3600)


@FUZZ
@given(json_values)
def test_fuzz_parse_settings(data: Any) -> None:
    """Configuration documents: Settings or ConfigError."""
    if not isinstance(data, dict):
        data = {"server": data}
    with contextlib.suppress(ConfigError):
        parse_settings(data, environ={})


@FUZZ
@given(json_values)
def test_fuzz_inbox_record(data: Any) -> None:
    """Inbox records read back from the store: an InboundMessage or ValueError."""
    if not isinstance(data, dict):
        data = {"message_id": data}
    with contextlib.suppress(ValueError):
        InboundMessage.from_dict(data)
