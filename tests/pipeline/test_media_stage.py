"""Tests for the media stage (imrelay.pipeline.media) and the kind stage's media rules."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import pytest

from imrelay.errors import PlatformAPIError
from imrelay.message import Attachment, InboundMessage
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.pipeline.filter import KindStage
from imrelay.pipeline.media import MediaStage, build_data_url, has_pictures, sniff_image_type
from imrelay.pipeline.model import build_prompt
from imrelay.sim.dingtalk_media import build_png

PNG = build_png(3, 1, (0, 128, 255))
JPEG = b"\xff\xd8\xff\xe0" + bytes(16)
GIF = b"GIF89a" + bytes(16)
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8)
NOTICE = "could not read your picture"


def image(code: str) -> Attachment:
    return Attachment("image", code)


class FakeFetch:
    """Serves bytes per download code; raises the queued errors first."""

    def __init__(self, media: dict[str, bytes] | None = None) -> None:
        self.media = media or {}
        self.errors: list[BaseException] = []
        self.calls: list[str] = []

    async def __call__(self, message: InboundMessage, attachment: Attachment) -> bytes:
        self.calls.append(attachment.download_code)
        if self.errors:
            raise self.errors.pop(0)
        return self.media[attachment.download_code]


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def stage(fetch: Any, **kwargs: Any) -> MediaStage:
    kwargs.setdefault("notice", NOTICE)
    kwargs.setdefault("unsupported_notice", "text only")
    return MediaStage(fetch, **kwargs)


# -- helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (PNG, "image/png"),
        (JPEG, "image/jpeg"),
        (b"GIF87a" + bytes(4), "image/gif"),
        (GIF, "image/gif"),
        (WEBP, "image/webp"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
        (b"RIFF", None),
        (b"BM" + bytes(20), None),
        (b"", None),
    ],
)
def test_sniff_image_type_by_magic_bytes(data: bytes, mime: str | None) -> None:
    """PNG, JPEG, GIF and WebP are recognised by their first bytes; anything else is not."""
    assert sniff_image_type(data) == mime


def test_build_data_url_is_base64() -> None:
    """A data URL holds the MIME type and the bytes in base64."""
    assert build_data_url(b"\x00\xff", "image/gif") == "data:image/gif;base64,AP8="


def test_has_pictures_looks_at_image_attachments(make_message: Callable[..., Any]) -> None:
    """Only image attachments count as pictures."""
    assert has_pictures(make_message(attachments=(image("c"),)))
    assert not has_pictures(make_message(attachments=(Attachment("file", "c", "a.zip"),)))


# -- MediaStage: pictures --------------------------------------------------------------------


async def test_media_picture_becomes_image_part(make_ctx: Callable[..., Any]) -> None:
    """A picture is downloaded and sent as a data URL to the model routing picked for it."""
    fetch = FakeFetch({"c1": PNG})
    ctx = make_ctx(kind="image", text="", attachments=(image("c1"),))
    ctx.model_name, ctx.route_rule = "vision", "by_kind.image"
    assert await stage(fetch)(ctx) is ctx
    assert ctx.user_content == [{"type": "image_url", "image_url": {"url": data_url(PNG)}}]
    assert ctx.model_name == "vision"
    assert fetch.calls == ["c1"]
    assert build_prompt(ctx, None)[-1] == {"role": "user", "content": ctx.user_content}


async def test_media_picture_with_text_puts_text_first(make_ctx: Callable[..., Any]) -> None:
    """A picture message's text (if any) comes before the picture."""
    ctx = make_ctx(kind="image", text="what is this?", attachments=(image("c1"),))
    await stage(FakeFetch({"c1": JPEG}))(ctx)
    assert ctx.user_content == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": data_url(JPEG, "image/jpeg")}},
    ]


async def test_media_rich_text_with_pictures_gets_image_parts(
    make_ctx: Callable[..., Any],
) -> None:
    """Rich text with pictures (routed as ``image``) is sent as text and image parts; the
    stage keeps the model routing picked."""
    fetch = FakeFetch({"a": PNG, "b": GIF})
    ctx = make_ctx(kind="rich", text="look", attachments=(image("a"), image("b")))
    ctx.model_name, ctx.route_rule = "vision", "rule pictures"
    await stage(fetch)(ctx)
    assert ctx.model_name == "vision"
    assert ctx.user_content == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": data_url(PNG)}},
        {"type": "image_url", "image_url": {"url": data_url(GIF, "image/gif")}},
    ]


async def test_media_rich_text_keeps_interleaving(make_ctx: Callable[..., Any]) -> None:
    """When text segments are listed as attachments, text and pictures keep their order."""
    attachments = (
        Attachment("text", "", text="first"),
        image("a"),
        Attachment("text", "", text="second"),
        Attachment("text", "", text=""),
        image("b"),
    )
    ctx = make_ctx(kind="rich", text="first\nsecond", attachments=attachments)
    await stage(FakeFetch({"a": PNG, "b": WEBP}))(ctx)
    assert ctx.user_content == [
        {"type": "text", "text": "first"},
        {"type": "image_url", "image_url": {"url": data_url(PNG)}},
        {"type": "text", "text": "second"},
        {"type": "image_url", "image_url": {"url": data_url(WEBP, "image/webp")}},
    ]


async def test_media_rich_text_without_pictures_unchanged(make_ctx: Callable[..., Any]) -> None:
    """Rich text without pictures is left to the text model as it is."""
    ctx = make_ctx(kind="rich", text="just words")
    ctx.model_name = "default"
    fetch = FakeFetch()
    assert await stage(fetch)(ctx) is ctx
    assert ctx.user_content is None
    assert ctx.model_name == "default"
    assert fetch.calls == []


async def test_media_at_most_max_images(make_ctx: Callable[..., Any]) -> None:
    """Pictures beyond ``max_images`` are neither downloaded nor sent."""
    codes = [f"c{i}" for i in range(5)]
    fetch = FakeFetch(dict.fromkeys(codes, PNG))
    ctx = make_ctx(kind="rich", text="many", attachments=tuple(image(c) for c in codes))
    await stage(fetch, max_images=2)(ctx)
    assert sorted(fetch.calls) == ["c0", "c1"]
    assert [p["type"] for p in ctx.user_content] == ["text", "image_url", "image_url"]


async def test_media_downloads_concurrently(make_ctx: Callable[..., Any]) -> None:
    """Several pictures download at the same time, and keep their order in the content."""
    started = asyncio.Event()
    running = 0

    async def fetch(message: InboundMessage, attachment: Attachment) -> bytes:
        nonlocal running
        running += 1
        if running == 2:
            started.set()
        await asyncio.wait_for(started.wait(), 1.0)
        return PNG if attachment.download_code == "a" else JPEG

    ctx = make_ctx(kind="image", text="", attachments=(image("a"), image("b")))
    await stage(fetch)(ctx)
    assert [p["image_url"]["url"][:15] for p in ctx.user_content] == [
        "data:image/png;",
        "data:image/jpeg",
    ]


async def test_media_per_platform_fetch(make_ctx: Callable[..., Any]) -> None:
    """With a mapping, each platform's own fetch is used; a missing one fails with the notice."""
    ours = FakeFetch({"c": PNG})
    ctx = make_ctx(kind="image", text="", attachments=(image("c"),))
    await stage({"dingtalk": ours, "other": FakeFetch()})(ctx)
    assert ours.calls == ["c"]
    ctx = make_ctx(kind="image", text="", attachments=(image("c"),))
    result = await stage({"other": FakeFetch()})(ctx)
    assert result == Drop("media_unsupported", notice=NOTICE, failed=True)


async def test_media_retries_retryable_failure(make_ctx: Callable[..., Any]) -> None:
    """A retryable download failure is tried again after the backoff."""
    fetch = FakeFetch({"c": PNG})
    fetch.errors = [PlatformAPIError("network", retryable=True)] * 2
    sleeps = Sleeps()
    ctx = make_ctx(kind="image", text="", attachments=(image("c"),))
    result = await stage(fetch, retries=2, backoff_s=0.25, sleep=sleeps)(ctx)
    assert result is ctx
    assert fetch.calls == ["c"] * 3
    assert sleeps.delays == [0.25, 0.5]


async def test_media_failure_is_failed_drop_with_notice(make_ctx: Callable[..., Any]) -> None:
    """Retries used up, or a permanent failure: the message fails with the notice."""
    fetch = FakeFetch({"c": PNG})
    fetch.errors = [PlatformAPIError("network", retryable=True)] * 2
    ctx = make_ctx(kind="image", text="", attachments=(image("c"),))
    result = await stage(fetch, retries=1, sleep=Sleeps())(ctx)
    assert result == Drop("media_failed", notice=NOTICE, failed=True)
    assert ctx.user_content is None
    fetch = FakeFetch({"c": PNG})
    fetch.errors = [PlatformAPIError("too large", retryable=False)]
    sleeps = Sleeps()
    result = await stage(fetch, sleep=sleeps)(make_ctx(kind="image", attachments=(image("c"),)))
    assert result == Drop("media_failed", notice=NOTICE, failed=True)
    assert fetch.calls == ["c"]
    assert sleeps.delays == []


async def test_media_unknown_format_fails(make_ctx: Callable[..., Any]) -> None:
    """Bytes that are not a known image format fail the message with the notice."""
    ctx = make_ctx(kind="image", text="", attachments=(image("c"),))
    result = await stage(FakeFetch({"c": b"%PDF-1.7"}))(ctx)
    assert result == Drop("media_format", notice=NOTICE, failed=True)


async def test_media_picture_without_code_fails(make_ctx: Callable[..., Any]) -> None:
    """A picture message that carries no download code fails with the notice."""
    result = await stage(FakeFetch())(make_ctx(kind="image", text=""))
    assert result == Drop("media_missing", notice=NOTICE, failed=True)


async def test_media_unexpected_error_propagates(make_ctx: Callable[..., Any]) -> None:
    """An exception that is not a platform error is not turned into a notice."""
    fetch = FakeFetch({"c": PNG})
    fetch.errors = [RuntimeError("bug")]
    ctx = make_ctx(kind="image", text="", attachments=(image("c"),))
    with pytest.raises(RuntimeError, match="bug"):
        await stage(fetch)(ctx)


@pytest.mark.parametrize("kind", ["image", "rich", "file", "video"])
async def test_media_routed_to_default_gets_the_unsupported_notice(
    make_ctx: Callable[..., Any], kind: str
) -> None:
    """A picture, file or video that routing gave to ``default`` (no rule or ``by_kind`` for
    its kind matched) gets the unsupported notice; nothing is downloaded."""
    fetch = FakeFetch({"c": PNG})
    ctx = make_ctx(
        kind=kind, text="", attachments=(Attachment(kind.replace("rich", "image"), "c"),)
    )
    ctx.route_rule = "default"
    assert await stage(fetch)(ctx) == Drop("unsupported_kind", notice="text only")
    assert ctx.user_content is None
    assert fetch.calls == []


async def test_media_text_messages_untouched(make_ctx: Callable[..., Any]) -> None:
    """Text and audio messages pass without content parts."""
    for kind in ("text", "audio"):
        ctx = make_ctx(kind=kind, text="hi")
        assert await stage(FakeFetch())(ctx) is ctx
        assert ctx.user_content is None


def test_media_rejects_zero_max_images() -> None:
    """``max_images`` must allow at least one picture."""
    with pytest.raises(ValueError, match="max_images"):
        MediaStage(FakeFetch(), notice="", max_images=0)


# -- MediaStage: files and videos ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "attachments", "text", "note"),
    [
        ("file", (Attachment("file", "c", "报告.pdf"),), "", "[file: 报告.pdf]"),
        ("file", (Attachment("file", "c"),), "", "[file]"),
        ("video", (Attachment("video", "c"),), "", "[video]"),
        ("video", (), "caption", "[video]\ncaption"),
    ],
)
async def test_media_routed_file_or_video_becomes_note(
    make_ctx: Callable[..., Any],
    kind: str,
    attachments: tuple[Attachment, ...],
    text: str,
    note: str,
) -> None:
    """A routed file or video reaches its model as a note naming it, without a download."""
    fetch = FakeFetch()
    ctx = make_ctx(kind=kind, text=text, attachments=attachments)
    ctx.route_rule = f"by_kind.{kind}"
    assert await stage(fetch)(ctx) is ctx
    assert ctx.user_content == note
    assert fetch.calls == []


# -- KindStage -------------------------------------------------------------------------------


def kind_stage(routes: dict[str, str] | None = None) -> KindStage:
    return KindStage(unsupported_notice="text only", routes=routes)


UNSUPPORTED = Drop("unsupported_kind", notice="text only")


@pytest.mark.parametrize(
    ("fields", "routes", "passes"),
    [
        ({"kind": "image", "text": ""}, {"image": "v"}, True),
        ({"kind": "image", "text": ""}, {"rich": "v"}, False),
        ({"kind": "image", "text": ""}, None, False),
        ({"kind": "rich", "attachments": (image("c"),)}, {"image": "v"}, True),
        ({"kind": "rich", "attachments": (image("c"),)}, {"rich": "v"}, False),
        ({"kind": "rich", "text": "words only"}, None, True),
        ({"kind": "audio", "text": "recognised speech"}, None, True),
        ({"kind": "audio", "text": " "}, {"audio": "a"}, False),
        ({"kind": "file", "text": ""}, {"file": "f"}, True),
        ({"kind": "file", "text": ""}, {"image": "v"}, False),
        ({"kind": "video", "text": ""}, {"video": "f"}, True),
        ({"kind": "video", "text": ""}, None, False),
        ({"kind": "unsupported", "text": ""}, {"image": "v", "file": "f"}, False),
    ],
)
async def test_kind_routes_decide_media(
    make_ctx: Callable[..., Any], fields: dict[str, Any], routes: Any, passes: bool
) -> None:
    """Media kinds pass when a route can take them; audio when it was recognised."""
    ctx: TurnContext = make_ctx(**fields)
    result = await kind_stage(routes)(ctx)
    assert result is ctx if passes else result == UNSUPPORTED


async def test_kind_empty_rich_text_dropped_silently(make_ctx: Callable[..., Any]) -> None:
    """Rich text without pictures and without text is dropped with no notice."""
    assert await kind_stage()(make_ctx(kind="rich", text="  ")) == Drop("empty")
