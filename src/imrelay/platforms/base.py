"""What a platform connector provides, and what it is given.

Theory of operation: a connector's :meth:`Platform.run` keeps its ingress alive (a long
connection, or nothing for webhook mode, whose requests arrive through the app's HTTP server).
For every message it builds an :class:`~imrelay.message.InboundMessage` and calls
:meth:`Intake.offer`, which reserves the message's place in its conversation's order at once and
returns an awaitable that resolves after the inbox commit (``True``: new, ``False``: duplicate).
Only then does the connector ACK. Before reading the next frame it awaits
:meth:`Intake.wait_capacity`, so a full worker stops intake (backpressure).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Literal, Protocol

from aiohttp import web

from imrelay.message import Attachment, InboundMessage, OutboundReply

__all__ = ["IngressKind", "Intake", "Platform"]

IngressKind = Literal["stream", "webhook"]


class Intake(Protocol):
    """Where connectors hand messages over."""

    def offer(self, message: InboundMessage) -> Awaitable[bool]:
        """Reserve ``message``'s place in order and commit it; resolves to ``True`` if new."""
        ...

    async def wait_capacity(self) -> None:
        """Return once the worker can take another message."""
        ...

    def has_capacity(self) -> bool:
        """Whether another message can be taken now (webhooks answer 503 when not)."""
        ...


class Platform(Protocol):
    """One configured platform connection."""

    name: str
    ingress: IngressKind

    @property
    def ready(self) -> bool:
        """Whether the ingress is up (for ``/readyz``)."""
        ...

    @property
    def not_ready_reason(self) -> str:
        """Why the ingress is not up; empty when it is."""
        ...

    async def run(self, intake: Intake) -> None:
        """Keep the ingress alive until cancelled."""
        ...

    async def send(self, message: InboundMessage, reply: OutboundReply) -> None:
        """Send one reply part to the conversation ``message`` came from.

        Raises:
            PlatformAPIError: the platform refused it (``retryable`` says whether to retry).
        """
        ...

    async def probe(self) -> str:
        """Check the credentials (e.g. fetch an access token); return a short description."""
        ...

    async def handle_webhook(self, request: web.Request) -> web.StreamResponse:
        """Answer one platform callback (``POST /webhooks/<name>``) in webhook mode."""
        ...

    async def aclose(self) -> None:
        """Close connections; stop intake."""
        ...


class ReplyStream(Protocol):
    """An answer shown while it is generated (a DingTalk AI card, a Slack message edited…).

    ``update`` is called with the whole text so far after a model delta and must return at
    once (implementations coalesce updates to respect the platform's rate limits); ``finish``
    shows the final text and returns once the platform accepted it; ``fail`` marks the answer
    as failed. While ``behind`` is true an update would only replace one not shown yet, so the
    caller skips building it (building the text an answer may show costs time in proportion to
    the answer: once per push, not once per token).
    """

    @property
    def behind(self) -> bool:
        """Whether an earlier update is still waiting to be shown (or nothing more will be)."""
        ...

    async def update(self, text: str) -> None:
        """Show ``text`` (the whole answer so far) soon."""
        ...

    async def finish(self, text: str) -> None:
        """Show the final ``text``; raises PlatformAPIError if it could not be shown."""
        ...

    async def fail(self, notice: str) -> None:
        """Mark the answer failed, showing ``notice``."""
        ...


class StreamingPlatform(Protocol):
    """A platform that can show an answer while it is generated."""

    async def open_stream(self, message: InboundMessage) -> ReplyStream | None:
        """Start a streamed answer to ``message``; ``None`` when streaming is off or refused.

        A ``None`` return means: send the answer as ordinary reply parts instead.
        """
        ...


class MediaPlatform(Protocol):
    """A platform whose messages carry downloadable media."""

    async def fetch_media(self, message: InboundMessage, attachment: Attachment) -> bytes:
        """Download one attachment of ``message``.

        Raises:
            PlatformAPIError: the download failed or exceeded the configured size cap.
        """
        ...
