"""Fixtures shared by the store tests: a settable clock and a message factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from imrelay.message import Conversation, InboundMessage, Sender

__all__ = ["FakeClock", "MessageFactory"]

MessageFactory = Callable[..., InboundMessage]


class FakeClock:
    """An epoch clock that moves only when told to."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at a fixed epoch."""
    return FakeClock()


@pytest.fixture
def make_message() -> MessageFactory:
    """Build an InboundMessage; keyword arguments override the defaults."""

    def factory(message_id: str = "m1", **overrides: Any) -> InboundMessage:
        fields: dict[str, Any] = {
            "platform": "dingtalk",
            "message_id": message_id,
            "conversation": Conversation(id="cid-1", kind="group", title="研发群"),
            "sender": Sender(id="staff-1", name="张三"),
            "kind": "text",
            "text": f"hello {message_id}",
            "received_at": 1_700_000_000.0,
            "mentions_bot": True,
            "reply_to": {"session_webhook": "https://example.invalid/hook", "expires_at_ms": 1},
            "raw": {"msgId": message_id},
        }
        fields.update(overrides)
        return InboundMessage(**fields)

    return factory
