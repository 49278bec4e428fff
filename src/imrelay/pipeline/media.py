"""The media stage: pictures become OpenAI image content parts; files and videos a short note.

Theory of operation: the stage runs after ``route``, on messages the kind stage let through.

* A picture (``image``), or a ``rich`` message holding pictures, goes to the model routing
  picked for kind ``image`` (a rule naming ``image``, else ``by_kind.image``; see
  :mod:`imrelay.routing.rules`). Routed to ``default`` instead, no model takes it: it gets the
  unsupported notice. Its pictures (at most ``max_images``; later ones are left out) are
  downloaded through the platform's ``fetch`` and put in
  :attr:`~imrelay.pipeline.context.TurnContext.user_content` as base64 ``data:`` URLs, in
  message order, between the message's text parts::

      [{"type": "text", "text": "what is this?"},
       {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR…"}}]

  A ``rich`` message keeps its text and pictures interleaved when the platform lists its text
  segments as ``text`` attachments in order; otherwise the text comes first, then the pictures.
  A retryable download failure is tried again ``retries`` times; a failed download, or bytes
  that are not PNG, JPEG, GIF or WebP, end the message as ``failed`` with ``notice``.
* A ``file`` or ``video`` routed by its kind reaches that model as a note naming what was
  sent (``[file: report.pdf]``, ``[video]``): imrelay does not download or convert them, and the
  model should not pretend to have seen them.
* Anything else passes unchanged.

The history keeps only the message's text, never the pictures.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from imrelay.errors import PlatformAPIError
from imrelay.message import Attachment, InboundMessage
from imrelay.pipeline.context import Drop, TurnContext

__all__ = ["Fetch", "MediaStage", "build_data_url", "has_pictures", "sniff_image_type"]

Fetch = Callable[[InboundMessage, Attachment], Awaitable[bytes]]
"""Downloads one attachment of a message (e.g. ``DingTalkConnector.fetch_media``)."""

_SIGNATURES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff_image_type(data: bytes) -> str | None:
    """The MIME type of a PNG, JPEG, GIF or WebP image, by its magic bytes; else ``None``."""
    for magic, mime in _SIGNATURES:
        if data.startswith(magic):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def build_data_url(data: bytes, mime: str) -> str:
    """A ``data:`` URL holding ``data`` in base64."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def has_pictures(message: InboundMessage) -> bool:
    """Whether ``message`` carries at least one picture attachment."""
    return any(a.kind == "image" for a in message.attachments)


def _describe(message: InboundMessage) -> str:
    """The note a model gets for a file or video it cannot see."""
    names = [a.name for a in message.attachments if a.name]
    note = f"[{message.kind}: {names[0]}]" if names else f"[{message.kind}]"
    return f"{note}\n{message.text}" if message.text else note


class MediaStage:
    """Download pictures for the vision route; describe files and videos (see the module).

    Args:
        fetch: the download function, or one per platform name (a platform missing from the
            mapping cannot download: its pictures fail with ``notice``).
        notice: sent when pictures cannot be downloaded or read.
        unsupported_notice: sent for a picture, file or video that routing gave to
            ``default`` (no model that takes it matched).
        max_images: the most pictures sent with one message.
        retries: how many more times a retryable download failure is tried.
        backoff_s: the wait before the first retry (doubled for each further one).
        sleep: waits between retries (injected by tests).
    """

    name = "media"

    def __init__(
        self,
        fetch: Fetch | Mapping[str, Fetch],
        *,
        notice: str,
        unsupported_notice: str = "",
        max_images: int = 4,
        retries: int = 1,
        backoff_s: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_images < 1:
            raise ValueError("max_images must be at least 1")
        self.fetch = fetch
        self.notice = notice
        self.unsupported_notice = unsupported_notice
        self.max_images = max_images
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep

    def _fetcher(self, platform: str) -> Fetch | None:
        if isinstance(self.fetch, Mapping):
            return self.fetch.get(platform)
        return self.fetch

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        msg = ctx.message
        pictures = [a for a in msg.attachments if a.kind == "image"]
        if msg.kind not in ("file", "video", "image") and not (msg.kind == "rich" and pictures):
            return ctx  # text (a rich message without pictures is text)
        if ctx.route_rule == "default":  # no rule or by_kind names this kind
            return Drop("unsupported_kind", notice=self.unsupported_notice)
        if msg.kind in ("file", "video"):
            ctx.user_content = _describe(msg)
            return ctx
        if not pictures:
            ctx.log.warning("picture message without a download code")
            return Drop("media_missing", notice=self.notice, failed=True)
        fetch = self._fetcher(msg.platform)
        if fetch is None:
            ctx.log.warning("platform %s cannot download media", msg.platform)
            return Drop("media_unsupported", notice=self.notice, failed=True)
        shown = pictures[: self.max_images]
        results = await asyncio.gather(
            *(self._download(fetch, msg, a) for a in shown), return_exceptions=True
        )
        urls: list[str] = []
        for result in results:
            if isinstance(result, PlatformAPIError):
                ctx.log.warning("picture download failed: %s", result)
                return Drop("media_failed", notice=self.notice, failed=True)
            if isinstance(result, BaseException):
                raise result
            mime = sniff_image_type(result)
            if mime is None:
                ctx.log.warning("picture is not png, jpeg, gif or webp (%d bytes)", len(result))
                return Drop("media_format", notice=self.notice, failed=True)
            urls.append(build_data_url(result, mime))
        ctx.log.debug("%d picture(s) attached, %d left out", len(urls), len(pictures) - len(urls))
        ctx.user_content = _content_parts(msg, urls)
        return ctx

    async def _download(self, fetch: Fetch, msg: InboundMessage, attachment: Attachment) -> bytes:
        attempt = 0
        while True:
            try:
                return await fetch(msg, attachment)
            except PlatformAPIError as exc:
                if not exc.retryable or attempt >= self.retries:
                    raise
                await self.sleep(self.backoff_s * 2**attempt)
                attempt += 1


def _content_parts(msg: InboundMessage, urls: Sequence[str]) -> list[dict[str, Any]]:
    """Text and image parts in message order; pictures beyond ``urls`` are left out."""
    segments: Sequence[Attachment] = msg.attachments
    if not any(a.kind == "text" for a in segments):  # no interleaving known: text first
        segments = (Attachment("text", "", text=msg.text), *segments)
    parts: list[dict[str, Any]] = []
    pictures = iter(urls)
    for segment in segments:
        if segment.kind == "text" and segment.text:
            parts.append({"type": "text", "text": segment.text})
        elif segment.kind == "image":
            url = next(pictures, None)
            if url is not None:
                parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts
