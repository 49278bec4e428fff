"""The model backend protocol.

Theory of operation: the pipeline builds a list of chat messages (OpenAI shape) and calls
:meth:`ModelBackend.generate`, which yields text deltas as they arrive (a non-streaming backend
yields once) and finally returns usage through :class:`Generation`. Errors are translated to
:class:`~imrelay.errors.ModelError` subclasses at this edge. :data:`REQUEST_ID` carries the id of
the request being served to the backends, which pass it on to their endpoint when they can.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

__all__ = ["REQUEST_ID", "ChatMessage", "Generation", "ModelBackend"]

REQUEST_ID: ContextVar[str | None] = ContextVar("imrelay_request_id", default=None)
"""The id of the request being served, set by the caller around ``generate()``/``probe()``.

HTTP backends send it as ``x-request-id``, so the endpoint's logs can be matched with
imrelay's. ``None`` (the default) sends nothing.
"""


class ChatMessage(TypedDict):
    """One OpenAI-style chat message. ``content`` is a string or a list of content parts."""

    role: str
    content: Any


@dataclass(slots=True)
class Generation:
    """Filled in by a backend while it generates; read by the caller after the stream ends."""

    text: str = ""
    first_token_s: float | None = None
    total_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model_time_s: float | None = None  # reported by the model server itself, when it does
    extra: dict[str, Any] = field(default_factory=dict)


class ModelBackend(Protocol):
    """Something that answers chat messages."""

    name: str

    def generate(self, messages: Sequence[ChatMessage], result: Generation) -> AsyncIterator[str]:
        """Yield text deltas; fill ``result`` (text, timings, usage) as it goes."""
        ...

    async def probe(self) -> str:
        """Check the endpoint is reachable (e.g. GET /models); return a short description.

        Raises:
            ModelError: the endpoint is unreachable or refused the credentials.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
