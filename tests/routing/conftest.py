"""Fixtures for the routing tests: messages and settings built from plain data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from imrelay.config import RoutingSettings, Settings
from imrelay.message import Conversation, InboundMessage, Sender

MessageFactory = Callable[..., InboundMessage]
SettingsFactory = Callable[..., Settings]

MODELS = ("qwen", "qwen-next", "coder", "vision", "finance", "backup")


@pytest.fixture
def make_message() -> MessageFactory:
    """Build an InboundMessage: a direct text by default; keywords override."""

    def factory(text: str = "hello", **overrides: Any) -> InboundMessage:
        conv_kind = overrides.pop("conv_kind", "direct")
        conv_id = overrides.pop("conv_id", "cid-1")
        sender_id = overrides.pop("sender_id", "staff-1")
        fields: dict[str, Any] = {
            "platform": "dingtalk",
            "message_id": "m1",
            "conversation": Conversation(id=conv_id, kind=conv_kind),
            "sender": Sender(id=sender_id),
            "kind": "text",
            "text": text,
            "received_at": 1_700_000_000.0,
        }
        fields.update(overrides)
        return InboundMessage(**fields)

    return factory


@pytest.fixture
def make_settings() -> SettingsFactory:
    """Settings with echo models named in MODELS; ``routing`` is the routing section."""

    def factory(**routing: Any) -> Settings:
        routing.setdefault("default", "qwen")
        return Settings.model_validate(
            {"models": {name: {"type": "echo"} for name in MODELS}, "routing": routing}
        )

    return factory


@pytest.fixture
def make_routing(make_settings: SettingsFactory) -> Callable[..., RoutingSettings]:
    """Validated routing settings (the whole file validated, so model names are checked)."""

    def factory(**routing: Any) -> RoutingSettings:
        return make_settings(**routing).routing

    return factory
