"""Downloading the media of an inbound DingTalk message (protocol doc §2.4).

Two steps: ``POST /v1.0/robot/messageFiles/download`` with the message's ``downloadCode`` and
the ``robotCode`` (token-guarded, through :meth:`DingTalkAPI.call`) answers a temporary
``downloadUrl``; a plain ``GET`` of that URL (no DingTalk credentials) returns the bytes. The
URL is itself a credential: it never appears in logs or exception messages, and exceptions
raised while fetching it are not chained (their text may hold it).

The body is read in chunks and counted, so a file above ``max_bytes`` is refused without being
held in memory, whether or not its ``Content-Length`` announced the size.
"""

from __future__ import annotations

import logging
from typing import Final
from urllib.parse import urlsplit

import aiohttp

from imrelay.errors import PlatformAPIError
from imrelay.platforms.dingtalk.api import DingTalkAPI

__all__ = ["DOWNLOAD_PATH", "MIN_DOWNLOAD_RATE", "fetch_media"]

logger = logging.getLogger(__name__)

DOWNLOAD_PATH: Final = "/v1.0/robot/messageFiles/download"
MIN_DOWNLOAD_RATE: Final = 256 * 1024
"""Bytes per second a download may not fall below on average (sets its total timeout)."""
_CHUNK: Final = 64 * 1024


async def fetch_media(
    api: DingTalkAPI,
    http: aiohttp.ClientSession,
    *,
    robot_code: str,
    download_code: str,
    max_bytes: int,
    timeout_s: float,
) -> bytes:
    """Download one media item of an inbound message (§2.4).

    Args:
        api: the app's API client (token and errors of the first step).
        http: the app's shared session, for the download itself (not closed here).
        robot_code: the bot's ``robotCode`` (the app key of an enterprise-internal app).
        download_code: the message's ``downloadCode``.
        max_bytes: the largest download accepted.
        timeout_s: the connect and read (between two chunks) timeout of the download; the
            whole download may take ``timeout_s + max_bytes / MIN_DOWNLOAD_RATE`` seconds.

    Returns:
        The bytes.

    Raises:
        PlatformAPIError: DingTalk refused the download code (see
            :meth:`DingTalkAPI.call`), its answer had no usable ``downloadUrl``, the download
            answered an error status, or the file is larger than ``max_bytes`` (not
            retryable); network failures, timeouts, 429 and 5xx are ``retryable``.
    """
    answer = await api.call(
        "POST",
        DOWNLOAD_PATH,
        {"downloadCode": download_code, "robotCode": robot_code},
        what="media download-url request",
    )
    url = answer.get("downloadUrl")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise PlatformAPIError(
            "media download-url answer lacks an http(s) downloadUrl", platform=api.platform
        )
    data = await _download(http, url, max_bytes, timeout_s, api.platform)
    logger.debug("media downloaded (%d bytes)", len(data))
    return data


async def _download(
    http: aiohttp.ClientSession, url: str, max_bytes: int, timeout_s: float, platform: str
) -> bytes:
    timeout = aiohttp.ClientTimeout(
        total=timeout_s + max_bytes / MIN_DOWNLOAD_RATE,
        connect=timeout_s,
        sock_connect=timeout_s,
        sock_read=timeout_s,
    )
    too_large = f"media is larger than the {max_bytes}-byte limit"
    try:
        async with http.get(url, timeout=timeout) as resp:
            if resp.status != 200:
                raise PlatformAPIError(
                    f"media download answered http {resp.status}",
                    platform=platform,
                    status=resp.status,
                    retryable=resp.status == 429 or resp.status >= 500,
                )
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise PlatformAPIError(too_large, platform=platform, status=resp.status)
            data = bytearray()
            async for chunk in resp.content.iter_chunked(_CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise PlatformAPIError(too_large, platform=platform, status=resp.status)
            return bytes(data)
    # Not chained (``from None``): the text of aiohttp's exceptions may hold the URL.
    except TimeoutError:
        raise PlatformAPIError(
            "media download timed out", platform=platform, retryable=True
        ) from None
    except aiohttp.ClientError as exc:
        raise PlatformAPIError(
            f"media download failed: {type(exc).__name__}", platform=platform, retryable=True
        ) from None
