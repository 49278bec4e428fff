"""DingTalk AI cards: an answer shown while the model writes it (protocols/dingtalk.md §2.5, §2.6).

Theory of operation
-------------------
:func:`start_card` creates and delivers one AI card per answered message with
``POST /v1.0/card/instances/createAndDeliver``: the configured template, ``flowStatus`` ``"1"``
(processing), ``callbackType`` ``"STREAM"``, delivered to ``dtv1.card//IM_GROUP.<conversationId>``
(groups, robotCode = the app key, the sender @-mentioned) or ``dtv1.card//IM_ROBOT.<staffId>``
(1:1). Every ``cardParamMap`` value is a string. It returns a :class:`DingTalkCardStream`, or
``None`` when DingTalk refuses cards (template unpublished, missing permission, a failed
delivery, no staffId to deliver to): the caller then answers with ordinary messages. Retryable
failures are tried again for a few seconds before giving up the same way.

The card's ``outTrackId`` is derived from the platform name and the message id (see
:func:`build_out_track_id`), so it is the same every time the same message is answered. When a
crash cut off an answer after its card was created, the resumed message tries to create the
same card again; if DingTalk refuses that, an update of the existing instance is tried, and
when it succeeds the new answer streams into the card the user already has instead of a second
card appearing (when the card never existed, that update fails too and the message falls back
to plain replies).

Updates follow the official SDK's ``AIMarkdownCardInstance`` (§2.6):

* :meth:`~DingTalkCardStream.update` only records the latest full text and returns. One writer
  task sends it; texts that arrive while it waits are coalesced (the newest wins). Writes never
  overlap, and each starts at least ``reply.card_update_interval_ms`` after the previous one
  *ended*, so DingTalk never sees two writes of one card closer than the interval.
* The first write is ``PUT /v1.0/card/instances`` with ``flowStatus`` ``"2"`` (inputing) and
  the text, as the SDK does; later ones are ``PUT /v1.0/card/streaming`` with
  ``key=msgContent``, the full text, ``isFull=true``, ``isFinalize=false``.
* The streaming endpoint is documented for at most 1 KB per call, so once the text grows beyond
  :data:`STREAMING_MAX_BYTES` (UTF-8) the writer switches to ``PUT /v1.0/card/instances``
  updating only ``msgContent`` (the SDK's "pseudo-typewriter" update, which has no such note).
  Long answers keep growing, just through the other endpoint; the card is never cut.
* ``403 Forbidden.AccessDenied.QpsLimit…`` pushes the next write back (at least 1 s, doubling
  while it repeats) and counts ``imrelay_platform_throttled_total{scope="platform"}``; the
  latest text is kept and sent afterwards. Other retryable errors back off the same way. A
  permanent error stops intermediate updates (the final write is still tried).
* :meth:`~DingTalkCardStream.finish` sends ``PUT /v1.0/card/instances`` with ``flowStatus``
  ``"3"`` (finished) and the full data, as the SDK's ``ai_finish`` does (the SDK never sends
  ``isFinalize``; neither does this), retrying retryable errors until ``finish_timeout_s``, and
  returns only once DingTalk accepted it. :meth:`~DingTalkCardStream.fail` does the same with
  ``flowStatus`` ``"5"`` (failed) and the notice as the card's text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableSet
from typing import Any, Final

from imrelay.config import DingTalkReplySettings
from imrelay.errors import PlatformAPIError, RateLimited
from imrelay.message import InboundMessage
from imrelay.observability.metrics import Metrics
from imrelay.platforms.dingtalk.api import DingTalkAPI

__all__ = [
    "CONTENT_KEY",
    "CREATE_AND_DELIVER_PATH",
    "FLOW_FAILED",
    "FLOW_FINISHED",
    "FLOW_INPUTING",
    "FLOW_PROCESSING",
    "INSTANCES_PATH",
    "STREAMING_MAX_BYTES",
    "STREAMING_PATH",
    "DingTalkCardStream",
    "build_card_data",
    "build_create_request",
    "build_out_track_id",
    "start_card",
]

logger = logging.getLogger(__name__)

CREATE_AND_DELIVER_PATH: Final = "/v1.0/card/instances/createAndDeliver"
INSTANCES_PATH: Final = "/v1.0/card/instances"
STREAMING_PATH: Final = "/v1.0/card/streaming"
#: The template variable the answer goes into (the public AI card template's markdown).
CONTENT_KEY: Final = "msgContent"
#: The streaming endpoint's documented per-call limit; longer texts use the instance update.
STREAMING_MAX_BYTES: Final = 1024
FLOW_PROCESSING: Final = "1"
FLOW_INPUTING: Final = "2"
FLOW_FINISHED: Final = "3"
FLOW_FAILED: Final = "5"
# The SDK's default block order for the public AI card template.
_ORDER: Final = (
    "msgTitle",
    "msgContent",
    "staticMsgContent",
    "msgTextList",
    "msgImages",
    "msgSlider",
    "msgButtons",
)
_OUT_TRACK_PREFIX: Final = "imrelay-"
_MAX_OUT_TRACK_CHARS: Final = 64
_CREATE_ATTEMPTS: Final = 3
_BACKOFF_S: Final = 0.5
_MAX_BACKOFF_S: Final = 10.0


def build_out_track_id(platform: str, message_id: str) -> str:
    """The card id for the answer to one message: stable, unique, 64 characters.

    ``imrelay-`` and 56 hex digits of SHA-256 over the platform name and message id. The same
    message always gets the same id, so a resumed answer finds the card it already has.
    """
    digest = hashlib.sha256(f"{platform}\n{message_id}".encode()).hexdigest()
    return (_OUT_TRACK_PREFIX + digest)[:_MAX_OUT_TRACK_CHARS]


def build_card_data(text: str, flow_status: str | None = None) -> dict[str, str]:
    """The ``cardParamMap`` of an AI card showing ``text`` (every value a string, §2.5).

    Args:
        text: the markdown shown in the card.
        flow_status: ``"1"`` processing, ``"2"`` inputing, ``"3"`` finished, ``"5"`` failed;
            ``None`` leaves the status out.
    """
    data = {
        CONTENT_KEY: text,
        "staticMsgContent": "",
        "sys_full_json_obj": json.dumps({"order": list(_ORDER)}),
    }
    if flow_status is not None:
        data["flowStatus"] = flow_status
    return data


def _staff_id(message: InboundMessage) -> str:
    """The sender's staffId: ``reply_to["sender_staff_id"]`` when the parser set it."""
    if "sender_staff_id" in message.reply_to:
        return str(message.reply_to.get("sender_staff_id") or "")
    return message.sender.id


def build_create_request(
    message: InboundMessage, *, template_id: str, out_track_id: str, robot_code: str
) -> dict[str, Any] | None:
    """The ``createAndDeliver`` body for a card answering ``message`` (§2.5, §2.6).

    Returns:
        The body, or ``None`` for a 1:1 message without a staffId (an external user), which
        no card can be delivered to.
    """
    staff_id = _staff_id(message)
    body: dict[str, Any] = {
        "cardTemplateId": template_id,
        "outTrackId": out_track_id,
        "cardData": {"cardParamMap": build_card_data("", FLOW_PROCESSING)},
        "callbackType": "STREAM",
        "imGroupOpenSpaceModel": {"supportForward": True},
        "imRobotOpenSpaceModel": {"supportForward": True},
        "userIdType": 1,
    }
    if message.conversation.kind == "group":
        deliver: dict[str, Any] = {"robotCode": robot_code}
        if staff_id:
            deliver["atUserIds"] = {staff_id: message.sender.name or staff_id}
        body["openSpaceId"] = f"dtv1.card//IM_GROUP.{message.conversation.id}"
        body["imGroupOpenDeliverModel"] = deliver
        return body
    if not staff_id:
        return None
    body["openSpaceId"] = f"dtv1.card//IM_ROBOT.{staff_id}"
    body["imRobotOpenDeliverModel"] = {"spaceType": "IM_ROBOT", "robotCode": robot_code}
    return body


def _failed_delivery(answer: dict[str, Any]) -> str | None:
    """The error of the first failed delivery in a createAndDeliver answer, if any."""
    result = answer.get("result")
    results = result.get("deliverResults") if isinstance(result, dict) else None
    for item in results if isinstance(results, list) else ():
        if isinstance(item, dict) and item.get("success") is False:
            return str(item.get("errorMsg") or "delivery failed")[:200]
    return None


def _backoff(attempt: int, exc: PlatformAPIError) -> float:
    """Seconds to wait after the ``attempt``-th consecutive failure (1-based)."""
    # §2.6: back off at least one second on QpsLimit, doubling while it repeats; a longer
    # retry_after (per-minute quotas) is honoured.
    doubled = float(2 ** max(attempt - 1, 0))
    if isinstance(exc, RateLimited):
        return max(min(doubled, _MAX_BACKOFF_S), exc.retry_after, 1.0)
    return min(_BACKOFF_S * doubled, _MAX_BACKOFF_S)


def _report(reported: MutableSet[str] | None, key: str, text: str, *args: object) -> None:
    """Log a refusal at WARNING the first time per ``key`` (always, without ``reported``)."""
    if reported is None or key not in reported:
        if reported is not None:
            reported.add(key)
        logger.warning(text, *args)
    else:
        logger.debug(text, *args)


async def start_card(
    api: DingTalkAPI,
    message: InboundMessage,
    reply: DingTalkReplySettings,
    *,
    robot_code: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    metrics: Metrics | None = None,
    reported: MutableSet[str] | None = None,
    create_timeout_s: float = 5.0,
    finish_timeout_s: float = 30.0,
) -> DingTalkCardStream | None:
    """Create and deliver the AI card answering ``message`` (see the module docstring).

    Args:
        api: the app's REST client.
        message: the message being answered.
        reply: the platform's reply settings (template id, update interval).
        robot_code: the robot code (the app key for enterprise-internal apps).
        clock: monotonic seconds; spaces the card's writes.
        sleep: how to wait (injected in tests).
        metrics: where throttling is counted, if anywhere.
        reported: refusal codes already logged at WARNING; later refusals with the same code
            log at DEBUG (the connector keeps one set, so a refused template warns once).
        create_timeout_s: how long retryable create failures are retried.
        finish_timeout_s: how long :meth:`DingTalkCardStream.finish` and ``fail`` retry.

    Returns:
        The stream, or ``None`` when the answer must go out as plain messages.
    """
    out_track_id = build_out_track_id(message.platform, message.message_id)
    body = build_create_request(
        message,
        template_id=reply.card_template_id,
        out_track_id=out_track_id,
        robot_code=robot_code,
    )
    if body is None:
        logger.debug("no card for a 1:1 message without a staffId; answering with messages")
        return None
    stream = DingTalkCardStream(
        api,
        out_track_id,
        interval_s=reply.card_update_interval_ms / 1000.0,
        clock=clock,
        sleep=sleep,
        metrics=metrics,
        finish_timeout_s=finish_timeout_s,
    )
    deadline = clock() + create_timeout_s
    attempt = 0
    while True:
        attempt += 1
        try:
            answer = await api.call("POST", CREATE_AND_DELIVER_PATH, body, what="card create")
        except PlatformAPIError as exc:
            if exc.retryable:
                delay = _backoff(attempt, exc)
                stream.count_throttle(exc)
                if attempt < _CREATE_ATTEMPTS and clock() + delay <= deadline:
                    logger.debug("card create failed (%s); retrying in %.2f s", exc, delay)
                    await sleep(delay)
                    continue
                _report(reported, "retryable", "ai card not created (%s); replying without", exc)
                return None
            if await stream.reuse():
                logger.info("card create refused (%s); continuing the existing card", exc)
                return stream
            key = str(exc.errcode if exc.errcode is not None else type(exc).__name__)
            _report(reported, key, "dingtalk refused the ai card (%s); replying without it", exc)
            return None
        problem = _failed_delivery(answer)
        if problem is not None:
            _report(reported, "delivery", "ai card not delivered (%s); replying without", problem)
            return None
        logger.debug("card %s created and delivered", out_track_id)
        stream.wrote()
        return stream


class DingTalkCardStream:
    """One AI card being filled (implements :class:`~imrelay.platforms.base.ReplyStream`).

    Made by :func:`start_card` after the card was created; see the module docstring.

    Args:
        api: the app's REST client.
        out_track_id: the card instance id.
        interval_s: the least time between the end of one write and the start of the next.
        clock: monotonic seconds.
        sleep: how to wait.
        metrics: where throttling is counted, if anywhere.
        finish_timeout_s: how long the final write is retried.
    """

    def __init__(
        self,
        api: DingTalkAPI,
        out_track_id: str,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
        finish_timeout_s: float = 30.0,
    ) -> None:
        self.api = api
        self.out_track_id = out_track_id
        self.interval_s = interval_s
        self._clock = clock
        self._sleep = sleep
        self._metrics = metrics
        self.finish_timeout_s = finish_timeout_s
        self._latest = ""
        self._shown = ""
        self._inputing = False
        self._closed = False
        self._broken = False
        self._failures = 0
        self._next_at = clock() + interval_s  # the create (or reuse) call wrote first
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.writes = 0  # accepted writes (tests and debugging)

    def __repr__(self) -> str:
        return f"DingTalkCardStream(out_track_id={self.out_track_id!r})"

    @property
    def shown(self) -> str:
        """The last text DingTalk accepted for the card."""
        return self._shown

    # -- ReplyStream ------------------------------------------------------------------------

    @property
    def behind(self) -> bool:
        """An update is waiting for its turn, or the card takes no more updates."""
        return self._closed or self._broken or self._latest != self._shown

    async def update(self, text: str) -> None:
        """Record ``text`` (the whole answer so far); the writer sends it soon."""
        if self._closed:
            return
        self._latest = text
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write_loop(), name="dingtalk-card-writer")

    async def finish(self, text: str) -> None:
        """Show the final ``text`` and mark the card finished.

        Raises:
            PlatformAPIError: DingTalk did not accept it within ``finish_timeout_s``.
        """
        body = self._instance_body(build_card_data(text, FLOW_FINISHED))
        await self._close_with(body, text)

    async def fail(self, notice: str) -> None:
        """Mark the card failed, showing ``notice`` as its text.

        Raises:
            PlatformAPIError: DingTalk did not accept it within ``finish_timeout_s``.
        """
        body = self._instance_body(build_card_data(notice, FLOW_FAILED))
        await self._close_with(body, notice)

    # -- internals -------------------------------------------------------------------------

    def count_throttle(self, exc: PlatformAPIError) -> None:
        """Count a throttling answer in ``imrelay_platform_throttled_total``."""
        if isinstance(exc, RateLimited) and self._metrics is not None:
            self._metrics.platform_throttled.labels(self.api.platform, "platform").inc()

    async def reuse(self) -> bool:
        """Put an existing card back to processing; whether DingTalk accepted that."""
        body = self._instance_body(build_card_data("", FLOW_PROCESSING))
        try:
            await self.api.call("PUT", INSTANCES_PATH, body, what="card update")
        except PlatformAPIError:
            return False
        self.wrote()
        return True

    def wrote(self) -> None:
        """Note a write accepted just now: the next may start ``interval_s`` from now."""
        self._failures = 0
        self._next_at = self._clock() + self.interval_s

    def _instance_body(self, params: dict[str, str]) -> dict[str, Any]:
        return {
            "outTrackId": self.out_track_id,
            "cardData": {"cardParamMap": params},
            "cardUpdateOptions": {"updateCardDataByKey": True},
        }

    def _progress_call(self, text: str) -> tuple[str, dict[str, Any]]:
        """The path and body of an intermediate write of ``text``."""
        if not self._inputing:
            return INSTANCES_PATH, self._instance_body(build_card_data(text, FLOW_INPUTING))
        if len(text.encode()) > STREAMING_MAX_BYTES:
            return INSTANCES_PATH, self._instance_body({CONTENT_KEY: text})
        body = {
            "outTrackId": self.out_track_id,
            "guid": str(uuid.uuid4()),
            "key": CONTENT_KEY,
            "content": text,
            "isFull": True,
            "isFinalize": False,
            "isError": False,
        }
        return STREAMING_PATH, body

    async def _write(self, path: str, body: dict[str, Any], what: str) -> None:
        """One write; afterwards the next may start ``interval_s`` later (or after a backoff)."""
        try:
            await self.api.call("PUT", path, body, what=what)
        except PlatformAPIError as exc:
            self._failures += 1
            self.count_throttle(exc)
            backoff = _backoff(self._failures, exc) if exc.retryable else 0.0
            self._next_at = self._clock() + max(self.interval_s, backoff)
            raise
        self.writes += 1
        self.wrote()

    def _wanted(self) -> bool:
        """Whether the writer has something to send (not closed, not broken, text changed)."""
        return not (self._closed or self._broken) and self._latest != self._shown

    async def _write_loop(self) -> None:
        """The writer task: :meth:`_write_pending`, with any unexpected error logged."""
        try:
            await self._write_pending()
        except Exception as exc:  # a task boundary (e.g. the HTTP session closed at shutdown)
            self._broken = True
            logger.warning("card writer stopped: %r", exc)

    async def _write_pending(self) -> None:
        """Send the latest text whenever the interval allows, until it is shown or closed."""
        while self._wanted():
            wait = self._next_at - self._clock()
            if wait > 0:
                await self._sleep(wait)
                continue
            # finish() and fail() set _closed before they take the lock, and nothing between
            # the check above and taking the lock suspends: no update follows the final write.
            async with self._lock:
                text = self._latest
                path, body = self._progress_call(text)
                try:
                    await self._write(path, body, "card update")
                except PlatformAPIError as exc:
                    if not exc.retryable:
                        self._broken = True
                        logger.warning("card updates stopped: %s", exc)
                    else:
                        logger.debug("card update failed (%s); trying again later", exc)
                    continue
                self._inputing = True
                self._shown = text

    async def _close_with(self, body: dict[str, Any], text: str) -> None:
        """Stop the writer, then send the final ``body`` (retrying until the deadline)."""
        self._closed = True
        deadline = self._clock() + self.finish_timeout_s
        async with self._lock:
            while True:
                wait = self._next_at - self._clock()
                if wait > 0:
                    await self._sleep(wait)
                try:
                    await self._write(INSTANCES_PATH, body, "card finish")
                except PlatformAPIError as exc:
                    if not exc.retryable or self._next_at > deadline:
                        raise
                    logger.debug("final card write failed (%s); retrying", exc)
                    continue
                self._shown = text
                return
