"""DingTalk REST calls on an injected HTTP client.

The gateway passes its :class:`~imrelay.http.HTTPClient` (``client``): every reply costs one
call here, and that client's per-request cost is a third of aiohttp's. Without one, the calls
go through the given :class:`aiohttp.ClientSession`.

Covers what the Stream connector needs: opening a Stream connection (protocol doc §1.1), the
app access token (§2.2) and replies through a message's ``sessionWebhook`` (§2.1). Every call
has an explicit timeout; network failures and timeouts become retryable
:class:`~imrelay.errors.PlatformAPIError`; error answers are decoded by
:func:`~imrelay.platforms.dingtalk.errors.error_from_response`. Neither the app secret, the
access token nor the sessionWebhook URL (its ``session`` parameter is a credential) appears in
logs or exception messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import aiohttp

from imrelay import __version__, _json
from imrelay.errors import PlatformAPIError, RateLimited
from imrelay.http import HTTPClient, HTTPConnectError, HTTPError
from imrelay.platforms.dingtalk.errors import DingTalkTokenInvalid, error_from_response
from imrelay.platforms.dingtalk.protocol import (
    DEFAULT_SUBSCRIPTIONS,
    build_open_request,
    parse_open_response,
)

__all__ = [
    "DingTalkAPI",
    "build_webhook_body",
    "is_session_webhook_expired",
    "markdown_title",
]

logger = logging.getLogger(__name__)

OPEN_CONNECTION_PATH: Final = "/v1.0/gateway/connections/open"
ACCESS_TOKEN_PATH: Final = "/v1.0/oauth2/accessToken"
# Refresh the token this long before DingTalk says it expires (the official SDK uses 5 min).
TOKEN_REFRESH_MARGIN_S: Final = 300.0
_TITLE_MAX_CHARS: Final = 20


class DingTalkAPI:
    """Client for the DingTalk REST endpoints one bot needs.

    Args:
        http: an aiohttp session (not closed here), used when no ``client`` is given.
        platform: the configured platform name, stored on errors.
        app_key: the app key (= clientId).
        app_secret: the app secret (= clientSecret).
        api_base: the new-API base URL; a simulator's URL in tests.
        timeout_s: the limit for each call, connect and read included.
        clock: returns epoch seconds; drives the token cache.
        user_agent: sent as ``User-Agent`` and as the open-connection ``ua``.
        client: the gateway's HTTP client (not closed here); preferred over ``http``.
        admit: awaited before every token-guarded call (:meth:`call`): DingTalk's per-app QPS
            limit covers its whole OpenAPI (sends, AI cards, media), so the app's limiter
            belongs here rather than on one kind of call.
        throttled: told of every ``RateLimited`` a token-guarded call answered (the limiter
            takes the penalty).
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        platform: str,
        app_key: str,
        app_secret: str,
        api_base: str = "https://api.dingtalk.com",
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        user_agent: str = f"imrelay/{__version__}",
        client: HTTPClient | None = None,
        admit: Callable[[], Awaitable[None]] | None = None,
        throttled: Callable[[RateLimited], None] | None = None,
    ) -> None:
        self._http = http
        self._client = client
        self._admit = admit
        self._throttled = throttled
        self.platform = platform
        self.app_key = app_key
        self._app_secret = app_secret
        self.api_base = api_base.rstrip("/")
        self.timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s
        )
        self._clock = clock
        self.user_agent = user_agent
        self._token = ""  # nosec B105  # no access token fetched yet
        self._token_valid_until = 0.0
        self._token_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"DingTalkAPI(platform={self.platform!r}, app_key={self.app_key!r})"

    async def _post(
        self, url: str, body: Mapping[str, Any], what: str
    ) -> tuple[int, bytes, dict[str, Any] | None]:
        """POST JSON; return status, raw body and the body's JSON object (``None`` if not one).

        ``what`` names the call in errors; the URL is left out as it may hold a credential.
        """
        return await self._request("POST", url, body, what)

    async def _request(
        self,
        method: str,
        url: str,
        body: Mapping[str, Any] | None,
        what: str,
        extra_headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes, dict[str, Any] | None]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": self.user_agent,
            **(extra_headers or {}),
        }
        data = _json.dumpb(body) if body is not None else None
        try:
            if self._client is not None:
                async with asyncio.timeout(self.timeout_s):
                    async with await self._client.request(
                        method, url, body=data, headers=headers
                    ) as answer:
                        raw = await answer.read()
                        status = answer.status
            else:
                async with self._http.request(
                    method, url, data=data, headers=headers, timeout=self._timeout
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
        except ValueError as exc:  # the client refused the URL or a header before any socket
            # imrelay.http's texts show no query; aiohttp's InvalidURL repeats the whole URL
            why = type(exc).__name__ if isinstance(exc, aiohttp.ClientError) else str(exc)
            raise PlatformAPIError(
                f"{what} refused: {why}", platform=self.platform, retryable=False
            ) from None
        except TimeoutError as exc:
            raise PlatformAPIError(
                f"{what} timed out after {self.timeout_s:g} s",
                platform=self.platform,
                retryable=True,
            ) from exc
        except (aiohttp.ClientError, HTTPError) as exc:
            # imrelay.http's connect errors name host, port and a proxy's answer (never a
            # query or a credential); other texts may repeat the URL, so only their type
            why = str(exc) if isinstance(exc, HTTPConnectError) else type(exc).__name__
            raise PlatformAPIError(
                f"{what} failed: {why}", platform=self.platform, retryable=True
            ) from exc
        try:
            parsed: Any = _json.loads(raw)
        except (ValueError, RecursionError):
            parsed = None
        logger.debug("%s answered http %d (%d bytes)", what, status, len(raw))
        return status, raw, parsed if isinstance(parsed, dict) else None

    async def open_connection(
        self,
        *,
        subscriptions: Sequence[Mapping[str, str]] = DEFAULT_SUBSCRIPTIONS,
        local_ip: str = "127.0.0.1",
    ) -> tuple[str, str]:
        """Ask the gateway for a Stream endpoint and a single-use ticket (§1.1).

        Returns:
            ``(endpoint, ticket)``; the ticket is valid for 90 s and must not be reused.

        Raises:
            AuthError: the app key/secret were refused.
            PlatformAPIError: any other failure (``retryable`` for network errors, timeouts,
                5xx and throttling).
        """
        body = build_open_request(
            self.app_key,
            self._app_secret,
            ua=self.user_agent,
            local_ip=local_ip,
            subscriptions=subscriptions,
        )
        status, raw, _ = await self._post(
            self.api_base + OPEN_CONNECTION_PATH, body, "open-connection request"
        )
        return parse_open_response(status, raw, platform=self.platform)

    async def access_token(self, *, force: bool = False) -> str:
        """Return the app access token, fetching it when missing, expiring or forced (§2.2).

        The token is cached until ``expireIn - 300`` s after it was fetched. Concurrent callers
        share one fetch; a forced refresh is skipped when another caller replaced the token
        while this one waited (so a burst of ``InvalidAuthentication`` costs one fetch).

        Args:
            force: fetch a new token even if the cached one looks valid (after the platform
                answered ``InvalidAuthentication``).

        Raises:
            AuthError: the app key/secret were refused.
            PlatformAPIError: any other failure.
        """
        seen = self._token
        async with self._token_lock:
            now = self._clock()
            fresh = bool(self._token) and now < self._token_valid_until
            if fresh and (not force or self._token != seen):
                return self._token
            token, expire_in = await self._fetch_token()
            margin = min(TOKEN_REFRESH_MARGIN_S, expire_in / 2)
            self._token = token
            self._token_valid_until = self._clock() + expire_in - margin
            logger.debug("access token refreshed, valid for %d s", expire_in)
            return token

    async def _fetch_token(self) -> tuple[str, float]:
        status, _, parsed = await self._post(
            self.api_base + ACCESS_TOKEN_PATH,
            {"appKey": self.app_key, "appSecret": self._app_secret},
            "access-token request",
        )
        error = error_from_response(status, parsed, platform=self.platform)
        if error is not None:
            raise error
        token = parsed.get("accessToken") if parsed else None
        expire_in = parsed.get("expireIn") if parsed else None
        if (
            not isinstance(token, str)
            or not token
            or isinstance(expire_in, bool)
            or not isinstance(expire_in, int | float)
            or not expire_in > 0
        ):
            raise PlatformAPIError(
                "access-token response lacks accessToken or expireIn",
                platform=self.platform,
                status=status,
            )
        return token, float(expire_in)

    async def call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, what: str = ""
    ) -> dict[str, Any]:
        """Call a token-guarded new-API endpoint and return its JSON object (§2.2, §4).

        The access token goes in the ``x-acs-dingtalk-access-token`` header. When DingTalk
        answers ``InvalidAuthentication`` (the token expired or was revoked early), the token
        is refreshed once and the call repeated once.

        Args:
            method: ``GET``, ``POST`` or ``PUT``.
            path: the path below ``api_base``, e.g. ``/v1.0/robot/groupMessages/send``.
            body: the JSON body, if any.
            what: how the call is named in errors (default: the path).

        Raises:
            AuthError: the app credentials were refused, or the token twice.
            RateLimited: throttled (``retry_after`` says how long to wait).
            PlatformAPIError: any other failure (``retryable`` for network errors, timeouts
                and 5xx).
        """
        name = what or path
        for attempt in (1, 2):
            token = await self.access_token(force=attempt == 2)
            if self._admit is not None:
                await self._admit()
            status, _, parsed = await self._request(
                method,
                self.api_base + path,
                body,
                name,
                {"x-acs-dingtalk-access-token": token},
            )
            error = error_from_response(status, parsed, platform=self.platform)
            if error is None:
                return parsed or {}
            if attempt == 1 and isinstance(error, DingTalkTokenInvalid):
                logger.info("%s: access token refused; refreshing it once", name)
                continue
            if isinstance(error, RateLimited) and self._throttled is not None:
                self._throttled(error)
            raise error
        raise AssertionError("unreachable")  # pragma: no cover

    async def send_session_webhook(self, url: str, body: Mapping[str, Any]) -> None:
        """POST a message to a sessionWebhook (§2.1).

        DingTalk reports errors with HTTP 200 and a non-zero ``errcode``; those raise too.

        Args:
            url: the message's ``sessionWebhook``.
            body: a webhook message, e.g. from :func:`build_webhook_body`.

        Raises:
            DingTalkSessionExpired: the session expired (errcode 300001).
            RateLimited: throttled (``retry_after`` says how long to wait).
            PlatformAPIError: any other failure (``retryable`` for network errors, timeouts
                and 5xx).
        """
        if not url[:8].lower().startswith(("http://", "https://")):  # urlsplit costs 3 µs
            raise PlatformAPIError("session webhook is not an http(s) url", platform=self.platform)
        status, _, parsed = await self._post(url, body, "session-webhook send")
        error = error_from_response(status, parsed, platform=self.platform)
        if error is not None:
            raise error


def markdown_title(text: str) -> str:
    """The first non-blank line of ``text`` without markdown markers, at most 20 chars: the
    title DingTalk shows for a markdown message (in the chat list and notifications)."""
    for line in text.splitlines():
        line = line.strip().lstrip("#>*-+ \t").strip()
        if line:
            return line[:_TITLE_MAX_CHARS]
    return "message"


def build_webhook_body(
    text: str, *, markdown: bool = False, title: str = "", at_user_ids: Sequence[str] = ()
) -> dict[str, Any]:
    """Build a sessionWebhook message (§2.1).

    A mention only renders when the text contains ``@<userId>``, so ``@<id> `` is put in front
    of the text for every id it does not already mention.

    Args:
        text: the message body (markdown when ``markdown``).
        markdown: send a markdown message rather than plain text.
        title: the markdown title shown in chat lists (default: the first line, ≤ 20 chars).
        at_user_ids: staff ids to @-mention.

    Returns:
        The JSON body.
    """
    ids = list(dict.fromkeys(uid for uid in at_user_ids if uid))
    missing = [uid for uid in ids if f"@{uid}" not in text]
    content = "".join(f"@{uid} " for uid in missing) + text
    at = {"atUserIds": ids, "isAtAll": False}
    if markdown:
        return {
            "msgtype": "markdown",
            "markdown": {"title": title or markdown_title(text), "text": content},
            "at": at,
        }
    return {"msgtype": "text", "text": {"content": content}, "at": at}


def is_session_webhook_expired(
    reply_to: Mapping[str, Any], now_ms: int, *, margin_ms: int = 60_000
) -> bool:
    """Whether a message's sessionWebhook has expired or will within ``margin_ms``.

    Args:
        reply_to: the message's ``reply_to`` (``expires_at_ms``: epoch ms, 0 when unknown).
        now_ms: the current time in epoch ms.
        margin_ms: how long before the expiry to stop trusting the webhook.

    Returns:
        ``True`` when expired or expiring soon; ``False`` when the expiry is unknown.
    """
    expires = reply_to.get("expires_at_ms", 0)
    if isinstance(expires, bool) or not isinstance(expires, int | float) or expires <= 0:
        return False
    return now_ms + margin_ms >= expires
