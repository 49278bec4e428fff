"""The DingTalk platform: Stream ingress plus replies through the sessionWebhook."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from imrelay.config import DingTalkSettings
from imrelay.errors import RateLimited
from imrelay.http import HTTPClient
from imrelay.message import Attachment, InboundMessage, OutboundReply
from imrelay.observability.metrics import Metrics
from imrelay.platforms._ratelimit import BucketSet, TokenBucket, bucket_params
from imrelay.platforms.base import IngressKind, Intake, ReplyStream
from imrelay.platforms.dingtalk.api import (
    DingTalkAPI,
    build_webhook_body,
    is_session_webhook_expired,
)
from imrelay.platforms.dingtalk.card import start_card
from imrelay.platforms.dingtalk.errors import DingTalkRequestRejected, DingTalkSessionExpired
from imrelay.platforms.dingtalk.media import fetch_media
from imrelay.platforms.dingtalk.openapi import (
    FLOW_CONTROLLED_ERRCODE,
    send_to_group,
    send_to_user,
)
from imrelay.platforms.dingtalk.stream import DingTalkStream
from imrelay.platforms.dingtalk.webhook import DingTalkWebhook

__all__ = ["DingTalkConnector"]

logger = logging.getLogger(__name__)


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
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        throttle_wait_s: float = 60.0,
        max_conversations: int = 10_000,
        client: HTTPClient | None = None,
    ) -> None:
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
            client=client,
            # the app's QPS limit covers every OpenAPI call (sends, cards, media)
            admit=lambda: self._take(self._app_bucket, "app"),
            throttled=lambda exc: self._app_bucket.penalize(exc.retry_after),
        )
        self.http = http
        self.stream = DingTalkStream(name, settings, self.api, http, metrics)
        self.webhook: DingTalkWebhook | None = None
        self._card_refusals: set[str] = set()  # a refused card template warns once
        self._init_send_path(metrics, monotonic, sleep, throttle_wait_s, max_conversations)

    @property
    def ready(self) -> bool:
        if self.ingress == "webhook":
            return self.webhook is not None
        return self.stream.connected

    @property
    def not_ready_reason(self) -> str:
        if self.ready:
            return ""
        if self.ingress == "webhook":
            return "webhook intake not started"
        return self.stream.not_ready_reason

    async def run(self, intake: Intake) -> None:
        if self.ingress == "stream":
            await self.stream.run(intake)
            return
        self.webhook = DingTalkWebhook(
            self.name,
            self.settings,
            intake,
            self._metrics,
            clock=self.wall_clock,
            has_capacity=intake.has_capacity,
        )
        try:
            await asyncio.Event().wait()  # requests arrive through handle_webhook
        finally:
            self.webhook = None

    async def handle_webhook(self, request: web.Request) -> web.StreamResponse:
        """``POST /webhooks/<name>``: a signed bot message or an encrypted event callback."""
        if self.webhook is None:
            return web.json_response(
                {"error": "not ready"}, status=503, headers={"Retry-After": "1"}
            )
        return await self.webhook.handle(request)

    async def open_stream(self, message: InboundMessage) -> ReplyStream | None:
        """An AI card that shows the answer as it is generated (``reply.stream: card``)."""
        if self.settings.reply.stream != "card":
            return None
        return await start_card(
            self.api,
            message,
            self.settings.reply,
            robot_code=self.settings.effective_robot_code,
            metrics=self._metrics,
            reported=self._card_refusals,
        )

    async def fetch_media(self, message: InboundMessage, attachment: Attachment) -> bytes:
        """Download a picture or file of ``message`` (within ``media_max_bytes``)."""
        return await fetch_media(
            self.api,
            self.http,
            robot_code=self.settings.effective_robot_code,
            download_code=attachment.download_code,
            max_bytes=self.settings.media_max_bytes,
            timeout_s=self.settings.http_timeout_s,
        )

    # -- send path (replies: sessionWebhook or OpenAPI, within rate limits) ---------------
    #
    # Theory of operation: every reply part first takes a token from its conversation's bucket
    # (at most ``rate_limit.per_conversation_per_minute`` (P) in any minute: bursts of P/2, then
    # P/2 per minute; see ``bucket_params``). Every OpenAPI call (a send, an AI-card write, a
    # media download URL) takes one from the app's bucket (at most ``rate_limit.app_qps`` (Q)
    # in any second: one at once, then Q-1 per second), in ``DingTalkAPI.call``: DingTalk's
    # per-app QPS limit is on its whole OpenAPI. sessionWebhook posts are limited per robot and
    # conversation, which the conversation bucket covers.
    # A wait on either counts
    # ``imrelay_platform_throttled_total{scope="conversation"|"app"}``.
    #
    # The channel: the message's sessionWebhook while it is present, not about to expire, the
    # message is younger than ``reply.openapi_after_s`` and the conversation's webhook was not
    # throttled lately; otherwise the OpenAPI (group: ``groupMessages/send`` to the
    # conversation; 1:1: ``oToMessages/batchSend`` to the sender's staffId). The OpenAPI
    # cannot @-mention, so a group reply sent through it loses the mention. A webhook that
    # answers 300001 (expired) or a throttling code hands the same part to the OpenAPI at once.
    # A 1:1 sender without a staffId (an external user) is reachable by the webhook only: it is
    # used until it expires whatever the message's age, and when throttled the part waits on it
    # (the conversation's bucket takes the penalty) instead of failing on the OpenAPI.
    #
    # Throttling by DingTalk (``RateLimited``: 403 QpsLimit, flowControlledStaffIdList, webhook
    # 130101/660026/410100) counts ``scope="platform"`` and penalizes the bucket it concerns
    # (the app's; the conversation's for flow control; for the webhook, the conversation stops
    # using its webhook for ``retry_after``). The part then waits in the buckets and is tried
    # again, so a throttled reply waits instead of failing; only after ``throttle_wait_s`` of
    # such waiting is the ``RateLimited`` raised to the caller (the pipeline's ReplySender
    # retries it with backoff).

    def _init_send_path(
        self,
        metrics: Metrics,
        monotonic: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        throttle_wait_s: float,
        max_conversations: int,
    ) -> None:
        """Build the rate-limit state of the send path.

        Args:
            metrics: where ``platform_throttled`` is counted.
            monotonic: the clock of the token buckets and webhook-throttle marks.
            sleep: how the buckets wait.
            throttle_wait_s: how long one part may wait out DingTalk's throttling before
                ``RateLimited`` is raised to the caller.
            max_conversations: how many conversations keep a bucket and a throttle mark.
        """
        limits = self.settings.rate_limit
        # A conversation may burst half its per-minute limit (a reply split into parts goes
        # out at once); the app needs throughput more than bursts.
        per_minute = limits.per_conversation_per_minute
        conv_rate, conv_burst = bucket_params(per_minute, 60.0, burst=per_minute // 2)
        app_rate, app_burst = bucket_params(limits.app_qps, 1.0, burst=1)
        self._metrics = metrics
        self._monotonic = monotonic
        self._throttle_wait_s = throttle_wait_s
        self._conversation_buckets = BucketSet(
            lambda: TokenBucket(conv_rate, conv_burst, clock=monotonic, sleep=sleep),
            max_keys=max_conversations,
        )
        self._app_bucket = TokenBucket(app_rate, app_burst, clock=monotonic, sleep=sleep)
        # conversation id -> monotonic time until which its sessionWebhooks are not used
        self._webhook_blocked: OrderedDict[str, float] = OrderedDict()
        self._max_conversations = max_conversations

    async def send(self, message: InboundMessage, reply: OutboundReply) -> None:
        """Send one reply part within the rate limits, by sessionWebhook or OpenAPI.

        See the "send path" comment above for the channel choice and the throttling rules
        (protocols/dingtalk.md §2.1, §2.3, §4).

        Raises:
            RateLimited: DingTalk kept throttling the part for ``throttle_wait_s`` seconds.
            PlatformAPIError: DingTalk refused the part (``retryable`` says whether to retry),
                e.g. a 1:1 reply needing the OpenAPI when the sender has no staffId.
        """
        conversation = self._conversation_buckets.get(message.conversation.id)
        await self._take(conversation, "conversation")
        started = self._monotonic()
        while True:
            try:
                await self._deliver(message, reply, conversation)
                return
            except RateLimited as exc:
                waited = self._monotonic() - started
                if waited + exc.retry_after > self._throttle_wait_s:
                    raise
                logger.debug("%s: reply throttled by dingtalk; waiting to retry", self.name)
            if conversation.blocked_until > self._monotonic():
                await self._take(conversation, "conversation")

    async def _take(self, bucket: TokenBucket, scope: str) -> None:
        """Wait for a token of ``bucket``; count the wait as throttling in ``scope``."""
        if await bucket.acquire() > 0:
            self._metrics.platform_throttled.labels(self.name, scope).inc()

    def _throttled_by_platform(self) -> None:
        self._metrics.platform_throttled.labels(self.name, "platform").inc()

    @staticmethod
    def _openapi_reaches(message: InboundMessage) -> bool:
        """Whether the OpenAPI can answer ``message``: a group, or a sender with a staffId
        (an external user of a 1:1 chat has none, and only the sessionWebhook reaches them)."""
        return message.conversation.kind == "group" or bool(
            message.reply_to.get("sender_staff_id")
        )

    def _webhook_usable(self, message: InboundMessage) -> bool:
        reply_to = message.reply_to
        if not reply_to.get("session_webhook"):
            return False
        if is_session_webhook_expired(reply_to, int(self.wall_clock() * 1000)):
            return False
        if not self._openapi_reaches(message):
            return True  # the only way: neither its age nor a throttle mark moves it elsewhere
        if self.wall_clock() - message.received_at >= self.settings.reply.openapi_after_s:
            return False
        key = message.conversation.id
        blocked_until = self._webhook_blocked.get(key)
        if blocked_until is None:
            return True
        if blocked_until > self._monotonic():
            return False
        del self._webhook_blocked[key]
        return True

    def _block_webhook(self, conversation_id: str, seconds: float) -> None:
        self._webhook_blocked[conversation_id] = self._monotonic() + seconds
        self._webhook_blocked.move_to_end(conversation_id)
        while len(self._webhook_blocked) > self._max_conversations:
            self._webhook_blocked.popitem(last=False)

    async def _deliver(
        self, message: InboundMessage, reply: OutboundReply, conversation: TokenBucket
    ) -> None:
        """One try: the sessionWebhook if usable, else (or if it refuses) the OpenAPI."""
        if self._webhook_usable(message):
            try:
                await self._send_webhook(message, reply)
                return
            except DingTalkSessionExpired:
                logger.debug("%s: session webhook expired; replying via openapi", self.name)
            except RateLimited as exc:
                self._throttled_by_platform()
                if not self._openapi_reaches(message):  # wait it out on the same webhook
                    conversation.penalize(exc.retry_after)
                    raise
                self._block_webhook(message.conversation.id, exc.retry_after)
                logger.debug("%s: session webhook throttled; replying via openapi", self.name)
        try:  # the app bucket is taken, and penalized, by every OpenAPI call (self.api)
            await self._send_openapi(message, reply)
        except RateLimited as exc:
            self._throttled_by_platform()
            if exc.errcode == FLOW_CONTROLLED_ERRCODE:  # this user, not the app
                conversation.penalize(exc.retry_after)
            raise

    async def _send_webhook(self, message: InboundMessage, reply: OutboundReply) -> None:
        reply_to = message.reply_to
        staff_id = str(reply_to.get("sender_staff_id") or "")
        at = [staff_id] if reply.mention_sender and staff_id else []
        body = build_webhook_body(
            reply.text, markdown=reply.markdown, title=reply.title, at_user_ids=at
        )
        await self.api.send_session_webhook(str(reply_to["session_webhook"]), body)

    async def _send_openapi(self, message: InboundMessage, reply: OutboundReply) -> None:
        robot_code = self.settings.effective_robot_code
        if message.conversation.kind == "group":
            # The OpenAPI cannot @-mention: reply.mention_sender is lost on this channel.
            await send_to_group(
                self.api,
                robot_code,
                message.conversation.id,
                reply.text,
                reply.markdown,
                reply.title,
            )
            return
        staff_id = str(message.reply_to.get("sender_staff_id") or "")
        if not staff_id:
            raise DingTalkRequestRejected(
                "sender has no staff id; a 1:1 reply without session webhook is impossible",
                platform=self.name,
                errcode="no_staff_id",
            )
        await send_to_user(self.api, robot_code, staff_id, reply.text, reply.markdown, reply.title)

    async def probe(self) -> str:
        await self.api.access_token(force=True)
        return "credentials accepted (access token issued)"

    async def aclose(self) -> None:
        await self.stream.aclose()
