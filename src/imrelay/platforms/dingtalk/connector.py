"""The DingTalk platform: Stream ingress plus replies through the sessionWebhook."""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp

from imrelay.config import DingTalkSettings
from imrelay.errors import ConfigError, PlatformAPIError
from imrelay.message import InboundMessage, OutboundReply
from imrelay.observability.metrics import Metrics
from imrelay.platforms.base import IngressKind, Intake
from imrelay.platforms.dingtalk.api import (
    DingTalkAPI,
    build_webhook_body,
    is_session_webhook_expired,
)
from imrelay.platforms.dingtalk.stream import DingTalkStream

__all__ = ["DingTalkConnector"]


class DingTalkConnector:
    """One configured DingTalk app bot (implements :class:`~imrelay.platforms.base.Platform`)."""

    def __init__(
        self,
        name: str,
        settings: DingTalkSettings,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.mode != "stream":
            raise ConfigError(
                f"platforms.{name}.mode",
                "webhook mode is not available yet; use mode: stream",
            )
        self.name = name
        self.ingress: IngressKind = settings.mode
        self.settings = settings
        self.wall_clock = wall_clock
        self.api = DingTalkAPI(
            http,
            platform=name,
            app_key=settings.app_key,
            app_secret=settings.app_secret.get_secret_value(),
            api_base=settings.api_base,
            timeout_s=settings.http_timeout_s,
            clock=wall_clock,
        )
        self.stream = DingTalkStream(name, settings, self.api, http, metrics)

    @property
    def ready(self) -> bool:
        return self.stream.connected

    @property
    def not_ready_reason(self) -> str:
        return "" if self.stream.connected else self.stream.not_ready_reason

    async def run(self, intake: Intake) -> None:
        await self.stream.run(intake)

    async def send(self, message: InboundMessage, reply: OutboundReply) -> None:
        """Reply through the message's sessionWebhook (protocols/dingtalk.md §2.1).

        Raises:
            PlatformAPIError: the webhook expired (not retryable until OpenAPI sends exist),
                or DingTalk refused the reply.
        """
        reply_to = message.reply_to
        url = str(reply_to.get("session_webhook") or "")
        if not url:
            raise PlatformAPIError(
                "message has no session webhook", platform=self.name, errcode="no_session"
            )
        if is_session_webhook_expired(reply_to, int(self.wall_clock() * 1000)):
            raise PlatformAPIError(
                "session webhook expired; the reply cannot be delivered",
                platform=self.name,
                errcode="session_expired",
            )
        staff_id = str(reply_to.get("sender_staff_id") or "")
        at = [staff_id] if reply.mention_sender and staff_id else []
        body = build_webhook_body(
            reply.text, markdown=reply.markdown, title=reply.title, at_user_ids=at
        )
        await self.api.send_session_webhook(url, body)

    async def probe(self) -> str:
        await self.api.access_token(force=True)
        return "credentials accepted (access token issued)"

    async def aclose(self) -> None:
        await self.stream.aclose()
