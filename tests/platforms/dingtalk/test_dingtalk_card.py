"""Tests of the DingTalk AI card stream, against the simulator's card extension and fakes."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from _support import wait_for
from imrelay.config import DingTalkReplySettings
from imrelay.errors import AuthError, PlatformAPIError
from imrelay.message import Conversation, InboundMessage, Sender
from imrelay.observability.metrics import Metrics
from imrelay.platforms.dingtalk.api import DingTalkAPI
from imrelay.platforms.dingtalk.card import (
    CREATE_AND_DELIVER_PATH,
    INSTANCES_PATH,
    STREAMING_MAX_BYTES,
    STREAMING_PATH,
    DingTalkCardStream,
    build_card_data,
    build_create_request,
    build_out_track_id,
    start_card,
)
from imrelay.platforms.dingtalk.errors import DingTalkQpsLimited, DingTalkRequestRejected
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.dingtalk_cards import CardExtension

PLATFORM = "dingtalk"
GROUP = "cidCardGroup01=="
CARD_LOGGER = "imrelay.platforms.dingtalk.card"


def _message(
    message_id: str = "msgCard1", *, group: bool = True, staff_id: str | None = "zhangsan"
) -> InboundMessage:
    """A message to answer: a group message by default, 1:1 with ``group=False``."""
    reply_to: dict[str, Any] = {"conversation_type": "2" if group else "1"}
    if staff_id is not None:
        reply_to["sender_staff_id"] = staff_id
    return InboundMessage(
        platform=PLATFORM,
        message_id=message_id,
        conversation=Conversation(
            id=GROUP if group else "cidDirect==", kind="group" if group else "direct"
        ),
        sender=Sender(id=staff_id or "$:LWCP_v1:$x", name="张三"),
        kind="text",
        text="question",
        received_at=0.0,
        reply_to=reply_to,
    )


def _reply(interval_ms: float = 50.0) -> DingTalkReplySettings:
    return DingTalkReplySettings(stream="card", card_update_interval_ms=interval_ms)


@pytest.fixture
async def cards() -> AsyncIterator[tuple[DingTalkSimulator, CardExtension]]:
    """A simulator with only the card extension."""
    ext = CardExtension()
    async with DingTalkSimulator(extensions=[ext]) as sim:
        yield sim, ext


@pytest.fixture
async def api(cards: tuple[DingTalkSimulator, CardExtension]) -> AsyncIterator[DingTalkAPI]:
    """A REST client for the simulator."""
    sim, _ = cards
    async with aiohttp.ClientSession() as http:
        yield DingTalkAPI(
            http,
            platform=PLATFORM,
            app_key=sim.app_key,
            app_secret=sim.app_secret,
            api_base=sim.base_url,
            timeout_s=5.0,
        )


def _texts(ext: CardExtension, out_track_id: str) -> list[str]:
    return [u["text"] for u in ext.updates.get(out_track_id, [])]


# -- pure helpers ------------------------------------------------------------------------


def test_build_out_track_id_stable_unique_and_short() -> None:
    """The same message always maps to the same id of at most 64 chars; others differ."""
    first = build_out_track_id("dingtalk", "msgA==")
    assert first == build_out_track_id("dingtalk", "msgA==")
    assert len(first) <= 64
    assert first.startswith("imrelay-")
    assert first != build_out_track_id("dingtalk", "msgB==")
    assert first != build_out_track_id("dingtalk-2", "msgA==")
    assert len(build_out_track_id("p" * 500, "m" * 500)) <= 64


def test_build_card_data_all_strings() -> None:
    """Every cardParamMap value is a string; the status is optional."""
    data = build_card_data("hi", "2")
    assert all(isinstance(v, str) for v in data.values())
    assert data["flowStatus"] == "2"
    assert data["msgContent"] == "hi"
    assert json.loads(data["sys_full_json_obj"])["order"][1] == "msgContent"
    assert "flowStatus" not in build_card_data("hi")


def test_build_create_request_group() -> None:
    """A group card goes to IM_GROUP.<conversationId> with the robot code and an @sender."""
    body = build_create_request(
        _message(), template_id="tpl.schema", out_track_id="otid", robot_code="robot"
    )
    assert body is not None
    assert body["cardTemplateId"] == "tpl.schema"
    assert body["outTrackId"] == "otid"
    assert body["callbackType"] == "STREAM"
    assert body["openSpaceId"] == f"dtv1.card//IM_GROUP.{GROUP}"
    assert body["imGroupOpenDeliverModel"] == {
        "robotCode": "robot",
        "atUserIds": {"zhangsan": "张三"},
    }
    assert "imRobotOpenDeliverModel" not in body
    params = body["cardData"]["cardParamMap"]
    assert params["flowStatus"] == "1"
    assert all(isinstance(v, str) for v in params.values())


def test_build_create_request_direct() -> None:
    """A 1:1 card goes to IM_ROBOT.<staffId> with spaceType IM_ROBOT and the robot code."""
    body = build_create_request(
        _message(group=False), template_id="t", out_track_id="o", robot_code="robot"
    )
    assert body is not None
    assert body["openSpaceId"] == "dtv1.card//IM_ROBOT.zhangsan"
    assert body["imRobotOpenDeliverModel"] == {"spaceType": "IM_ROBOT", "robotCode": "robot"}
    assert "imGroupOpenDeliverModel" not in body


def test_build_create_request_without_staff_id() -> None:
    """No staffId: no 1:1 card (None); a group card without the @mention."""
    direct = _message(group=False, staff_id="")
    assert build_create_request(direct, template_id="t", out_track_id="o", robot_code="r") is None
    group = build_create_request(
        _message(staff_id=""), template_id="t", out_track_id="o", robot_code="r"
    )
    assert group is not None
    assert group["imGroupOpenDeliverModel"] == {"robotCode": "r"}


def test_build_create_request_falls_back_to_sender_id() -> None:
    """A message whose reply_to has no staffId entry at all uses the sender id."""
    message = dataclasses.replace(_message(group=False), sender=Sender(id="staff-9"), reply_to={})
    body = build_create_request(message, template_id="t", out_track_id="o", robot_code="r")
    assert body is not None
    assert body["openSpaceId"] == "dtv1.card//IM_ROBOT.staff-9"


# -- against the simulator ---------------------------------------------------------------


async def _start(api: DingTalkAPI, sim: DingTalkSimulator, **kw: Any) -> DingTalkCardStream:
    message = kw.pop("message", None) or _message()
    stream = await start_card(
        api, message, kw.pop("reply", None) or _reply(), robot_code=sim.app_key, **kw
    )
    assert stream is not None
    return stream


async def test_start_card_group_creates_and_delivers(
    cards: tuple[DingTalkSimulator, CardExtension], api: DingTalkAPI
) -> None:
    """The card is created with the template, delivered to the group and processing."""
    sim, ext = cards
    stream = await _start(api, sim)
    assert stream.out_track_id == build_out_track_id(PLATFORM, "msgCard1")
    card = ext.cards[stream.out_track_id]
    assert card["conversation_id"] == GROUP
    assert card["space"] == f"dtv1.card//IM_GROUP.{GROUP}"
    assert card["template_id"] == _reply().card_template_id
    assert card["status"] == "processing"
    assert card["text"] == ""
    assert ext.cards_in(GROUP)[0]["out_track_id"] == stream.out_track_id


async def test_start_card_direct_delivers_to_robot_chat(
    cards: tuple[DingTalkSimulator, CardExtension], api: DingTalkAPI
) -> None:
    """A 1:1 card lands in the sender's chat with the bot."""
    sim, ext = cards
    stream = await _start(api, sim, message=_message("msgDirect", group=False))
    card = ext.cards[stream.out_track_id]
    assert card["conversation_id"] == sim.direct_conversation_id("zhangsan")
    assert card["space"] == "dtv1.card//IM_ROBOT.zhangsan"


async def test_card_updates_ordered_spaced_and_final(
    cards: tuple[DingTalkSimulator, CardExtension], api: DingTalkAPI
) -> None:
    """Fast updates arrive in order, coalesced, at most one per interval; finish shows all."""
    sim, ext = cards
    interval = 0.1
    stream = await _start(api, sim, reply=_reply(interval * 1000))
    text = ""
    for i in range(50):
        text += f"word{i} "
        await stream.update(text)
        await asyncio.sleep(0.01)
    final = text + "end."
    await stream.finish(final)
    updates = ext.updates[stream.out_track_id]
    texts = [u["text"] for u in updates]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert texts[-1] == final
    assert 3 <= len(texts) < 50
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(updates)]
    assert min(gaps) >= interval - 0.002
    assert [u["api"] for u in updates[:2]] == ["instance", "streaming"]
    assert updates[0]["status"] == "inputing"
    assert updates[-1]["status"] == "finished"
    card = ext.cards[stream.out_track_id]
    assert (card["status"], card["text"]) == ("finished", final)
    (mirror,) = [r for r in sim.replies() if r["msgtype"] == "card"]
    assert mirror["conversation_id"] == GROUP
    assert mirror["body"]["card"]["text"] == final
    await stream.update("after the end")
    await asyncio.sleep(0.02)
    assert len(ext.updates[stream.out_track_id]) == len(updates)


class _GateClock:
    """A clock whose sleeps wait until :meth:`release`, which then advances the time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self.pending: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.sleeps.append(seconds)
        self.pending.append((seconds, future))
        await future

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for seconds, future in pending:
            self.now += seconds
            future.set_result(None)


async def test_card_coalesces_with_injected_clock(
    cards: tuple[DingTalkSimulator, CardExtension], api: DingTalkAPI
) -> None:
    """Texts arriving within one interval are coalesced: only the newest is sent."""
    sim, ext = cards
    clock = _GateClock()
    stream = await _start(api, sim, reply=_reply(300), clock=clock, sleep=clock.sleep)
    otid = stream.out_track_id
    for text in ("a", "ab", "abc"):
        await stream.update(text)
    await wait_for(lambda: bool(clock.pending), what="writer waiting for the interval")
    assert clock.sleeps == [pytest.approx(0.3)]
    assert _texts(ext, otid) == []
    clock.release()
    await wait_for(lambda: stream.shown == "abc", what="first write")
    assert _texts(ext, otid) == ["abc"]
    for text in ("abcd", "abcde"):
        await stream.update(text)
    await wait_for(lambda: bool(clock.pending), what="writer waiting again")
    assert clock.sleeps[-1] == pytest.approx(0.3)
    clock.release()
    await wait_for(lambda: stream.shown == "abcde", what="second write")
    finishing = asyncio.create_task(stream.finish("abcdef"))
    await wait_for(lambda: bool(clock.pending), what="finish waiting for the interval")
    clock.release()
    await finishing
    assert _texts(ext, otid) == ["abc", "abcde", "abcdef"]
    assert [u["api"] for u in ext.updates[otid]] == ["instance", "streaming", "instance"]
    assert clock.sleeps == [pytest.approx(0.3)] * 3
    assert stream.writes == 3


async def test_card_is_behind_while_an_update_waits_and_after_the_end(
    cards: tuple[DingTalkSimulator, CardExtension], api: DingTalkAPI
) -> None:
    """``behind`` is true from an update until it is shown, and once the card is finished (the
    pipeline builds no text for it then)."""
    sim, _ = cards
    clock = _GateClock()
    stream = await _start(api, sim, reply=_reply(300), clock=clock, sleep=clock.sleep)
    assert stream.behind is False
    await stream.update("a")
    assert stream.behind is True
    await wait_for(lambda: bool(clock.pending), what="writer waiting for the interval")
    clock.release()
    await wait_for(lambda: stream.shown == "a", what="the write")
    assert stream.behind is False
    finishing = asyncio.create_task(stream.finish("ab"))
    await wait_for(lambda: bool(clock.pending), what="finish waiting for the interval")
    assert stream.behind is True
    clock.release()
    await finishing
    assert stream.behind is True


async def test_card_fail_shows_notice(
    cards: tuple[DingTalkSimulator, CardExtension], api: DingTalkAPI
) -> None:
    """fail() moves the card to the failed state with the notice as its text."""
    sim, ext = cards
    stream = await _start(api, sim)
    await stream.update("half an ans")
    await wait_for(lambda: stream.shown == "half an ans")
    await stream.fail("sorry, the model failed")
    card = ext.cards[stream.out_track_id]
    assert (card["status"], card["text"]) == ("failed", "sorry, the model failed")
    assert card["params"]["flowStatus"] == "5"
    (mirror,) = [r for r in sim.replies() if r["msgtype"] == "card"]
    assert mirror["body"]["card"]["status"] == "failed"


async def test_card_qps_limit_backs_off_and_keeps_latest(
    cards: tuple[DingTalkSimulator, CardExtension], api: DingTalkAPI
) -> None:
    """A 403 QpsLimit delays the next write by at least 1 s and then sends the newest text."""
    sim, ext = cards
    await sim.fault({"card_qps": 1})
    metrics = Metrics(CollectorRegistry(), process=False)
    stream = await _start(api, sim, metrics=metrics)
    for text in ("a", "ab"):
        await stream.update(text)
        await wait_for(lambda text=text: stream.shown == text, what=text)
    await stream.update("abc")
    await wait_for(lambda: ext.qps_rejections >= 1, what="a throttled write")
    await stream.update("abcd")
    await wait_for(lambda: stream.shown == "abcd", timeout=5, what="write after backoff")
    streamed = [u for u in ext.updates[stream.out_track_id] if u["api"] == "streaming"]
    assert [u["text"] for u in streamed] == ["ab", "abcd"]
    assert streamed[1]["t"] - streamed[0]["t"] >= 1.0
    throttled = metrics.registry.get_sample_value(
        "imrelay_platform_throttled_total", {"platform": PLATFORM, "scope": "platform"}
    )
    assert throttled == ext.qps_rejections
    await stream.finish("abcde")
    assert ext.cards[stream.out_track_id]["text"] == "abcde"


async def test_start_card_refused_returns_none_and_warns_once(
    cards: tuple[DingTalkSimulator, CardExtension],
    api: DingTalkAPI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unpublished template gives None (plain replies); the refusal is warned about once."""
    sim, ext = cards
    await sim.fault({"cards_refused": True})
    reported: set[str] = set()
    with caplog.at_level(logging.DEBUG, logger=CARD_LOGGER):
        for message_id in ("m1", "m2"):
            result = await start_card(
                api, _message(message_id), _reply(), robot_code=sim.app_key, reported=reported
            )
            assert result is None
    warnings = [
        r for r in caplog.records if r.name == CARD_LOGGER and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert "param.templateUnpublished" in warnings[0].getMessage()
    assert reported == {"param.templateUnpublished"}
    assert ext.cards == {}
    await sim.fault({"cards_refused": False})
    assert await start_card(api, _message("m3"), _reply(), robot_code=sim.app_key) is not None


async def test_start_card_again_reuses_existing_card(
    cards: tuple[DingTalkSimulator, CardExtension], api: DingTalkAPI
) -> None:
    """Answering the same message again (after a crash) continues the card it already has."""
    sim, ext = cards
    first = await _start(api, sim)
    await first.update("partial answ")
    await wait_for(lambda: first.shown == "partial answ")
    second = await _start(api, sim)
    assert second.out_track_id == first.out_track_id
    await second.update("the whole")
    await second.finish("the whole answer")
    assert len(ext.cards) == 1
    card = ext.cards[second.out_track_id]
    assert (card["status"], card["text"]) == ("finished", "the whole answer")
    statuses = [u["status"] for u in ext.updates[second.out_track_id]]
    assert statuses[0] == "inputing"
    assert "processing" in statuses[1:]


async def test_card_long_text_uses_instance_update(
    cards: tuple[DingTalkSimulator, CardExtension], api: DingTalkAPI
) -> None:
    """Beyond 1 KB (UTF-8) the text grows through the instance update, not the streaming API."""
    sim, ext = cards
    stream = await _start(api, sim)
    short = "开始"
    long = "长" * (STREAMING_MAX_BYTES // 3 + 1)  # 3 bytes each: just over the limit
    for text in (short, short + "。", long):
        await stream.update(text)
        await wait_for(lambda text=text: stream.shown == text, what="write")
    apis = [u["api"] for u in ext.updates[stream.out_track_id]]
    assert apis == ["instance", "streaming", "instance"]
    assert ext.cards[stream.out_track_id]["text"] == long


# -- against a scripted API (retry paths) ------------------------------------------------


class _FakeAPI:
    """Stands in for DingTalkAPI.call: scripted answers per path, every call recorded."""

    platform = PLATFORM

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.answers: dict[str, list[Any]] = {}

    def script(self, path: str, *answers: Any) -> None:
        self.answers.setdefault(path, []).extend(answers)

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.calls]

    async def call(
        self, method: str, path: str, body: Any = None, *, what: str = ""
    ) -> dict[str, Any]:
        self.calls.append((method, path, body))
        queue = self.answers.get(path)
        answer = queue.pop(0) if queue else {"success": True, "result": True}
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)


class _Clock:
    """A clock whose sleeps return at once, advancing it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _retryable(text: str = "server error") -> PlatformAPIError:
    return PlatformAPIError(text, platform=PLATFORM, status=500, retryable=True)


def _rejected(code: str = "param.templateUnpublished") -> PlatformAPIError:
    return DingTalkRequestRejected(f"rejected {code}", platform=PLATFORM, errcode=code)


async def _fake_start(api: _FakeAPI, clock: _Clock, **kw: Any) -> DingTalkCardStream | None:
    message = kw.pop("message", None) or _message()
    return await start_card(
        api,  # type: ignore[arg-type]
        message,
        _reply(100),
        robot_code="robot",
        clock=clock,
        sleep=clock.sleep,
        **kw,
    )


async def test_start_card_sends_create_and_deliver_body() -> None:
    """One createAndDeliver call carries exactly the body build_create_request makes."""
    api, clock = _FakeAPI(), _Clock()
    stream = await _fake_start(api, clock)
    assert stream is not None
    ((method, path, body),) = api.calls
    assert (method, path) == ("POST", CREATE_AND_DELIVER_PATH)
    expected = build_create_request(
        _message(),
        template_id=_reply().card_template_id,
        out_track_id=stream.out_track_id,
        robot_code="robot",
    )
    assert body == expected


async def test_start_card_retries_retryable_errors() -> None:
    """5xx and throttling on create are retried with backoff (≥ 1 s when throttled)."""
    api, clock = _FakeAPI(), _Clock()
    metrics = Metrics(CollectorRegistry(), process=False)
    api.script(
        CREATE_AND_DELIVER_PATH,
        _retryable(),
        DingTalkQpsLimited("qps", retry_after=1.0, platform=PLATFORM),
        {"success": True, "result": {"deliverResults": [{"success": True}]}},
    )
    stream = await _fake_start(api, clock, metrics=metrics)
    assert stream is not None
    assert clock.sleeps == [0.5, 2.0]
    assert api.paths() == [CREATE_AND_DELIVER_PATH] * 3
    throttled = metrics.registry.get_sample_value(
        "imrelay_platform_throttled_total", {"platform": PLATFORM, "scope": "platform"}
    )
    assert throttled == 1


@pytest.mark.parametrize(
    ("errors", "calls"),
    [
        ([_retryable(), _retryable(), _retryable()], 3),
        ([DingTalkQpsLimited("quota", retry_after=60.0, platform=PLATFORM)], 1),
    ],
    ids=["attempts", "deadline"],
)
async def test_start_card_gives_up_on_persistent_retryable_errors(
    errors: list[Exception], calls: int, caplog: pytest.LogCaptureFixture
) -> None:
    """After three attempts, or when the wait would pass the deadline, no card (None)."""
    api, clock = _FakeAPI(), _Clock()
    api.script(CREATE_AND_DELIVER_PATH, *errors)
    with caplog.at_level(logging.WARNING, logger=CARD_LOGGER):
        assert await _fake_start(api, clock) is None
    assert api.paths() == [CREATE_AND_DELIVER_PATH] * calls
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


@pytest.mark.parametrize(
    "error",
    [_rejected(), AuthError("no card permission", platform=PLATFORM, errcode=None)],
    ids=["rejected", "auth"],
)
async def test_start_card_refused_tries_reuse_then_none(error: Exception) -> None:
    """A refused create is followed by one update attempt; when that fails too: None."""
    api, clock = _FakeAPI(), _Clock()
    api.script(CREATE_AND_DELIVER_PATH, error)
    api.script(INSTANCES_PATH, _rejected("param.cardNotExist"))
    assert await _fake_start(api, clock) is None
    assert api.paths() == [CREATE_AND_DELIVER_PATH, INSTANCES_PATH]


async def test_start_card_failed_delivery_returns_none() -> None:
    """A createAndDeliver whose delivery failed gives None (plain replies)."""
    api, clock = _FakeAPI(), _Clock()
    failed = {"success": False, "spaceType": "IM_GROUP", "errorMsg": "robot not in group"}
    api.script(CREATE_AND_DELIVER_PATH, {"success": True, "result": {"deliverResults": [failed]}})
    assert await _fake_start(api, clock) is None


async def test_start_card_direct_without_staff_id_makes_no_call() -> None:
    """A 1:1 message from a user without a staffId gets no card and costs no call."""
    api, clock = _FakeAPI(), _Clock()
    assert await _fake_start(api, clock, message=_message(group=False, staff_id="")) is None
    assert api.calls == []


async def _fake_stream(api: _FakeAPI, clock: _Clock, **kw: Any) -> DingTalkCardStream:
    stream = await _fake_start(api, clock, **kw)
    assert stream is not None
    api.calls.clear()
    return stream


async def test_card_finish_retries_then_succeeds() -> None:
    """A retryable failure of the final write is retried after a backoff."""
    api, clock = _FakeAPI(), _Clock()
    stream = await _fake_stream(api, clock)
    api.script(INSTANCES_PATH, _retryable())
    await stream.finish("done")
    assert api.paths() == [INSTANCES_PATH, INSTANCES_PATH]
    body = api.calls[-1][2]
    assert body["cardData"]["cardParamMap"]["flowStatus"] == "3"
    assert body["cardData"]["cardParamMap"]["msgContent"] == "done"
    assert stream.shown == "done"


@pytest.mark.parametrize("method", ["finish", "fail"])
async def test_card_final_write_permanent_error_raises(method: str) -> None:
    """A permanent error of the final write raises PlatformAPIError at once."""
    api, clock = _FakeAPI(), _Clock()
    stream = await _fake_stream(api, clock)
    api.script(INSTANCES_PATH, _rejected("param.cardNotExist"))
    with pytest.raises(PlatformAPIError):
        await getattr(stream, method)("text")
    assert len(api.calls) == 1


async def test_card_final_write_gives_up_at_deadline() -> None:
    """Retryable failures of the final write stop once the finish deadline would pass."""
    api, clock = _FakeAPI(), _Clock()
    stream = await _fake_stream(api, clock, finish_timeout_s=5.0)
    api.script(INSTANCES_PATH, *[_retryable() for _ in range(20)])
    started = clock()
    with pytest.raises(PlatformAPIError):
        await stream.finish("text")
    assert 1 < len(api.calls) < 20
    assert clock() - started <= 5.0 + 0.5


async def test_card_update_permanent_error_stops_updates() -> None:
    """After a permanent update error no more updates are sent; finish is still tried."""
    api, clock = _FakeAPI(), _Clock()
    stream = await _fake_stream(api, clock)
    api.script(INSTANCES_PATH, _rejected("param.cardNotExist"))
    await stream.update("a")
    await wait_for(lambda: len(api.calls) == 1)
    await stream.update("ab")
    await asyncio.sleep(0.01)
    assert len(api.calls) == 1
    await stream.finish("abc")
    assert api.paths() == [INSTANCES_PATH, INSTANCES_PATH]


async def test_card_update_retryable_error_retries_latest_text() -> None:
    """A retryable update failure is retried after a backoff, with the newest text."""
    api, clock = _FakeAPI(), _Clock()
    stream = await _fake_stream(api, clock)
    api.script(INSTANCES_PATH, _retryable())
    await stream.update("a")
    await wait_for(lambda: stream.shown == "a")
    assert api.paths() == [INSTANCES_PATH, INSTANCES_PATH]
    assert clock.sleeps[-1] >= 0.5
    api.script(STREAMING_PATH, DingTalkQpsLimited("qps", retry_after=1.0, platform=PLATFORM))
    await stream.update("ab")
    await wait_for(lambda: stream.shown == "ab")
    assert api.paths()[-2:] == [STREAMING_PATH, STREAMING_PATH]
    assert clock.sleeps[-1] >= 1.0
    assert api.calls[-1][2]["content"] == "ab"
    assert api.calls[-1][2]["isFull"] is True
    assert api.calls[-1][2]["isFinalize"] is False


async def test_card_writer_unexpected_error_stops_updates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected error in the writer task is logged and ends intermediate updates."""
    api, clock = _FakeAPI(), _Clock()
    stream = await _fake_stream(api, clock)
    api.script(INSTANCES_PATH, RuntimeError("session is closed"))
    with caplog.at_level(logging.WARNING, logger=CARD_LOGGER):
        await stream.update("a")
        await wait_for(lambda: any("writer stopped" in r.getMessage() for r in caplog.records))
    await stream.update("ab")
    await asyncio.sleep(0.01)
    assert len(api.calls) == 1
    assert stream.shown == ""


async def test_card_finish_after_the_interval_does_not_wait() -> None:
    """When the interval has already passed, the final write goes out without sleeping."""
    api, clock = _FakeAPI(), _Clock()
    stream = await _fake_stream(api, clock)
    clock.now += 10.0
    await stream.fail("the notice")
    assert clock.sleeps == []
    params = api.calls[-1][2]["cardData"]["cardParamMap"]
    assert (params["flowStatus"], params["msgContent"]) == ("5", "the notice")


def test_card_stream_repr_names_only_the_card() -> None:
    """The repr shows the card id and nothing secret."""
    stream = DingTalkCardStream(_FakeAPI(), "otid-1", interval_s=0.3)  # type: ignore[arg-type]
    assert repr(stream) == "DingTalkCardStream(out_track_id='otid-1')"
