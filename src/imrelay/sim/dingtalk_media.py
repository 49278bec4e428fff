"""Media downloads for the DingTalk simulator (protocol doc §2.4, §6 item 11).

Theory of operation: the extension keeps media items (bytes and a content type) under
download codes. ``POST /v1.0/robot/messageFiles/download`` checks the access token
(:meth:`DingTalkSimulator.check_token`), that ``robotCode`` is the app key and that the
``downloadCode`` is known, and answers ``{"downloadUrl": "http://…/_sim/media/<random>"}`` on the
origin the request came to (or ``url_base``). That URL needs no credentials, like DingTalk's
temporary URLs, and works for ``url_ttl_s`` seconds of the simulator's clock.

Every picture, rich-text picture, audio, video and file message the simulator builds gets a
download code from this extension (it installs :attr:`DingTalkSimulator.media_code_factory`):
the next item queued with :meth:`MediaExtension.attach_next` (``POST /_sim/media?next=1``), or
else a default item: a small PNG for pictures, a few placeholder bytes for the other kinds.

Control API: ``POST /_sim/media`` (the body is the item, its ``Content-Type`` the type;
``?next=1`` queues it for the next media message) answers ``{"download_code": …}``.

Error answers, shaped like the new API's (§4): a token problem as
:meth:`DingTalkSimulator.check_token` answers it; a body that is not a JSON object with string
``downloadCode`` and ``robotCode`` → 400 ``MissingParameter``; another robot's code → 400
``invalidParameter.robotCode.auth``; an unknown download code → 400
``invalidParameter.downloadCode`` (the real code is not documented); an unknown or expired
media URL → 404.
"""

from __future__ import annotations

import secrets
import struct
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from imrelay.sim._common import (
    BoundedDict,
    api_error,
    json_response,
    read_json_object,
)

if TYPE_CHECKING:
    from imrelay.sim.dingtalk import DingTalkSimulator

__all__ = ["DOWNLOAD_PATH", "MediaExtension", "build_png"]

DOWNLOAD_PATH: Final = "/v1.0/robot/messageFiles/download"
_MEDIA_PREFIX: Final = "/_sim/media/"
_DEFAULT_TYPES: Final[Mapping[str, str]] = {
    "picture": "image/png",
    "richText": "image/png",
    "audio": "audio/amr",
    "video": "video/mp4",
    "file": "text/plain",
}


def build_png(width: int = 2, height: int = 2, rgb: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    """A valid PNG of one colour (8-bit RGB, no filter), built without any image library.

    Raises:
        ValueError: a size is not positive or a colour component is outside 0..255.
    """
    if width < 1 or height < 1:
        raise ValueError("width and height must be positive")
    if any(not 0 <= c <= 255 for c in rgb):
        raise ValueError("colour components must be between 0 and 255")

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + bytes(rgb) * width  # filter type 0, then the pixels
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


_DEFAULT_BYTES: Final[Mapping[str, bytes]] = {
    "image/png": build_png(),
    "audio/amr": b"#!AMR\n" + bytes(32),
    "video/mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(12),
    "text/plain": "模拟文件 simulated file\n".encode(),
}


@dataclass(frozen=True, slots=True)
class _Media:
    data: bytes
    content_type: str


class MediaExtension:
    """Serves ``messageFiles/download`` and the temporary URLs it hands out.

    Args:
        url_ttl_s: how long a ``downloadUrl`` works (simulator clock).
        url_base: the origin put in ``downloadUrl``s (e.g. a public URL, or a dead port in a
            test); default: the origin the download request came to.
        max_items: how many media items and URLs are remembered (oldest forgotten first).

    Attributes:
        downloads: ``downloadUrl``s handed out.
        fetches: successful GETs of those URLs.
    """

    name = "media"
    fault_keys: frozenset[str] = frozenset()

    def __init__(
        self, *, url_ttl_s: float = 3600.0, url_base: str | None = None, max_items: int = 10_000
    ) -> None:
        if url_ttl_s <= 0:
            raise ValueError("url_ttl_s must be positive")
        self.url_ttl_s = url_ttl_s
        self.url_base = url_base.rstrip("/") if url_base else None
        self._items: BoundedDict[str, _Media] = BoundedDict(max_items)
        self._urls: BoundedDict[str, tuple[str, float]] = BoundedDict(max_items)
        self._next: deque[str] = deque()
        self._sim: DingTalkSimulator | None = None
        self.downloads = 0
        self.fetches = 0

    # ------------------------------------------------------------------ SimExtension

    def install(self, sim: DingTalkSimulator, app: web.Application) -> None:
        """Add the download routes and make the simulator's media messages use this store."""
        self._sim = sim
        sim.media_code_factory = self.code_for
        app.router.add_post(DOWNLOAD_PATH, self._handle_download)
        app.router.add_get(_MEDIA_PREFIX + "{token}", self._handle_get)
        app.router.add_post("/_sim/media", self._handle_add)

    async def fault(self, spec: Mapping[str, Any]) -> None:
        """No faults of its own: any key is an error.

        Raises:
            ValueError: always, naming the keys.
        """
        raise ValueError(f"media extension has no faults: {', '.join(sorted(spec))}")

    def state(self) -> dict[str, Any]:
        """Counters for ``GET /_sim/state``."""
        return {
            "items": len(self._items),
            "queued": len(self._next),
            "downloads": self.downloads,
            "fetches": self.fetches,
        }

    async def aclose(self) -> None:
        """Nothing runs in the background; forget the queue."""
        self._next.clear()

    # ------------------------------------------------------------------ Python control API

    def add_media(self, data: bytes, content_type: str = "image/png") -> str:
        """Store a media item; return its download code."""
        code = "sim" + secrets.token_urlsafe(24)
        self._items[code] = _Media(bytes(data), content_type)
        return code

    def attach_next(self, data: bytes, content_type: str = "image/png") -> str:
        """Store a media item for the next media message the simulator builds; return its code."""
        code = self.add_media(data, content_type)
        self._next.append(code)
        return code

    def code_for(self, msgtype: str) -> str:
        """The download code for a new media message of ``msgtype`` (see the module)."""
        while self._next:
            code = self._next.popleft()
            if code in self._items:
                return code
        content_type = _DEFAULT_TYPES.get(msgtype, "application/octet-stream")
        return self.add_media(_DEFAULT_BYTES.get(content_type, b"\x00"), content_type)

    def media(self, code: str) -> bytes | None:
        """The bytes stored under ``code``, if any."""
        item = self._items.get(code)
        return item.data if item else None

    # ------------------------------------------------------------------ HTTP

    @property
    def sim(self) -> DingTalkSimulator:
        """The simulator this extension is installed in.

        Raises:
            RuntimeError: :meth:`install` was not called yet.
        """
        if self._sim is None:
            raise RuntimeError("media extension is not installed in a simulator")
        return self._sim

    async def _handle_download(self, request: web.Request) -> web.Response:
        refused = self.sim.check_token(request)
        if refused is not None:
            return refused
        body = await read_json_object(request)
        code = body.get("downloadCode") if body else None
        robot = body.get("robotCode") if body else None
        if not isinstance(code, str) or not isinstance(robot, str) or not code or not robot:
            return api_error(400, "MissingParameter", "缺少参数 downloadCode 或 robotCode")
        if robot != self.sim.app_key:
            return api_error(400, "invalidParameter.robotCode.auth", "robotCode 无权限")
        if code not in self._items:
            return api_error(400, "invalidParameter.downloadCode", "downloadCode 无效")
        token = secrets.token_urlsafe(24)
        self._urls[token] = (code, self.sim.clock() + self.url_ttl_s)
        self.downloads += 1
        base = self.url_base or str(request.url.origin())
        return json_response({"downloadUrl": f"{base}{_MEDIA_PREFIX}{token}"})

    async def _handle_get(self, request: web.Request) -> web.Response:
        entry = self._urls.get(request.match_info["token"])
        item = self._items.get(entry[0]) if entry else None
        if entry is None or item is None or entry[1] <= self.sim.clock():
            return web.Response(status=404, text="not found")
        self.fetches += 1
        return web.Response(body=item.data, content_type=item.content_type)

    async def _handle_add(self, request: web.Request) -> web.Response:
        data = await request.read()
        if not data:
            return json_response({"error": "the body must hold the media item"}, status=400)
        queue = request.query.get("next", "") in ("1", "true")
        add = self.attach_next if queue else self.add_media
        code = add(data, request.content_type or "application/octet-stream")
        return json_response({"download_code": code})
