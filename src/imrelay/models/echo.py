"""A model that answers with what it was sent: for trying imrelay without a model server.

The answer reads ``echo: <last user text> (turns: N)``, where N counts the messages that are not
system prompts, so a person can see at a glance what the gateway sent (history included). When
the last user message carries images, ``, images: K`` is added inside the parentheses. The model
simulator (:mod:`imrelay.sim.model`) answers with exactly the same text via
:func:`build_echo_answer`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from imrelay.config import EchoModelSettings
from imrelay.models.base import ChatMessage, Generation

__all__ = ["EchoBackend", "build_echo_answer", "extract_content_text"]

_SYSTEM_ROLES = frozenset({"system", "developer"})


def extract_content_text(content: Any) -> tuple[str, int]:
    """Read the text and count the images of an OpenAI message ``content``.

    Args:
        content: a string, a list of content parts (``{"type": "text", "text": ...}``,
            ``{"type": "image_url", ...}``, …) or ``None``.

    Returns:
        The text parts joined by a space, and the number of image parts.
    """
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    texts: list[str] = []
    images = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                images += 1
    return " ".join(texts), images


def build_echo_answer(messages: Sequence[Mapping[str, Any]]) -> str:
    """Build the echo answer for a list of chat messages.

    Args:
        messages: OpenAI-shaped chat messages (``role`` and ``content``).

    Returns:
        ``echo: <last user text> (turns: N)``, with ``, images: K`` added when the last user
        message holds K > 0 images.
    """
    turns = sum(1 for m in messages if m.get("role") not in _SYSTEM_ROLES)
    text, images = "", 0
    for message in reversed(messages):
        if message.get("role") == "user":
            text, images = extract_content_text(message.get("content"))
            break
    suffix = f"turns: {turns}, images: {images}" if images else f"turns: {turns}"
    return f"echo: {text} ({suffix})"


class EchoBackend:
    """A :class:`~imrelay.models.base.ModelBackend` that echoes the last user message.

    Args:
        name: the configured model name.
        settings: the model's settings; ``latency_ms`` is waited before answering.
        sleep: the coroutine used to wait (injected by tests).
        clock: a monotonic clock in seconds, for the timings in :class:`Generation`.
    """

    def __init__(
        self,
        name: str,
        settings: EchoModelSettings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.settings = settings
        self._sleep = sleep
        self._clock = clock

    async def generate(
        self, messages: Sequence[ChatMessage], result: Generation
    ) -> AsyncIterator[str]:
        """Wait ``latency_ms``, then yield the whole echo answer once.

        Args:
            messages: the chat messages.
            result: filled with the text, timings and word counts as token counts.

        Yields:
            The answer, in one piece.
        """
        started = self._clock()
        delay = self.settings.latency_ms / 1000.0
        if delay > 0:
            await self._sleep(delay)
        text = build_echo_answer(messages)
        result.text = text
        result.first_token_s = self._clock() - started
        result.prompt_tokens = sum(
            len(extract_content_text(m.get("content"))[0].split()) for m in messages
        )
        result.completion_tokens = len(text.split())
        result.model_time_s = delay
        result.total_s = result.first_token_s
        yield text
        result.total_s = self._clock() - started

    async def probe(self) -> str:
        """Describe the backend; there is nothing to reach."""
        return "echo model (no endpoint)"

    async def aclose(self) -> None:
        """Nothing to release."""
