"""The state one message carries through the pipeline, and the stage protocol.

A stage is ``async def __call__(ctx) -> TurnContext | Drop``: it returns the (possibly updated)
context to continue, or a :class:`Drop` to stop. A ``Drop`` may carry a ``notice`` that is sent
to the user instead of a model answer; ``failed`` marks the message ``failed`` instead of
``dropped``. Stages do not raise for control flow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from imrelay.message import InboundMessage, OutboundReply
from imrelay.models.base import ChatMessage, Generation
from imrelay.stores.base import ContextTurn

__all__ = ["Drop", "Stage", "TurnContext"]


@dataclass(frozen=True, slots=True)
class Drop:
    """Stop processing a message.

    Attributes:
        reason: a short closed-set word for metrics (``not_mentioned``, ``unsupported_kind``, …).
        notice: text to send to the user instead of an answer, if any.
        failed: the message failed (rather than was deliberately not answered).
    """

    reason: str
    notice: str | None = None
    failed: bool = False


@dataclass(slots=True)
class TurnContext:
    """Everything known about one message while it is processed."""

    message: InboundMessage
    log: logging.LoggerAdapter[logging.Logger]
    context_key: str = ""
    history: list[ContextTurn] = field(default_factory=list)
    model_name: str = ""
    prompt: list[ChatMessage] = field(default_factory=list)
    generation: Generation | None = None
    answer: str = ""
    shown_answer: str | None = None  # what the asker sees, when it differs (PII restored)
    replies: list[OutboundReply] = field(default_factory=list)
    remember: bool = True  # whether the exchange goes into the conversation's history
    resumed: bool = False  # picked up again after a restart: some parts may have gone out
    sent_parts: int = 0  # reply parts this run delivered (parts skipped as sent before: not)
    user_content: Any = None  # OpenAI content parts for the message (text + images); None: text
    streamed: bool = False  # the answer was delivered while it was generated (e.g. an AI card)
    route_reason: str = ""  # why the route stage picked ``model_name`` (for logs)
    route_rule: str = ""  # the routing step that decided (``rule x``, ``by_kind.image``, …)
    system_prompt: str | None = None  # the routing rule's system prompt; None: the model's
    text_masked: bool = False  # the safety stage masked personal data in ``message.text``


class Stage(Protocol):
    """One step of the pipeline."""

    name: str

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        """Process ``ctx``; return it to continue or a :class:`Drop` to stop."""
        ...
