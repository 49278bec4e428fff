"""Tests of the DingTalk simulator's AI card endpoints (imrelay.sim.dingtalk_cards)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.dingtalk_cards import (
    CREATE_AND_DELIVER_PATH,
    CREATE_PATH,
    DELIVER_PATH,
    STREAMING_PATH,
    CardExtension,
)
from imrelay.sim.dingtalk_page import render_page

GROUP = "cidSimCards=="
SPACE = "dtv1.card//IM_GROUP."

Call = Callable[..., Awaitable[tuple[int, Any]]]


@pytest.fixture
async def sim() -> AsyncIterator[DingTalkSimulator]:
    """A simulator with only the card extension (streaming cap 20/s)."""
    async with DingTalkSimulator(extensions=[CardExtension()]) as s:
        yield s


@pytest.fixture
def ext(sim: DingTalkSimulator) -> CardExtension:
    """The installed card extension."""
    (extension,) = sim.extensions
    assert isinstance(extension, CardExtension)
    return extension


@pytest.fixture
async def call(sim: DingTalkSimulator) -> AsyncIterator[Call]:
    """``call(method, path, body, token=True)`` → ``(status, json)``."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            sim.base_url + "/v1.0/oauth2/accessToken",
            json={"appKey": sim.app_key, "appSecret": sim.app_secret},
        ) as resp:
            token = (await resp.json())["accessToken"]

        async def do(method: str, path: str, body: Any = None, *, token_ok: bool = True) -> Any:
            headers = {"x-acs-dingtalk-access-token": token} if token_ok else {}
            kwargs: dict[str, Any] = {"headers": headers}
            if isinstance(body, bytes):
                kwargs["data"] = body
            elif body is not None:
                kwargs["json"] = body
            async with http.request(method, sim.base_url + path, **kwargs) as resp:
                return resp.status, await resp.json()

        yield do


def _create(otid: str = "card-1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "cardTemplateId": "tpl.schema",
        "outTrackId": otid,
        "cardData": {"cardParamMap": {"flowStatus": "1", "msgContent": ""}},
        "callbackType": "STREAM",
    }
    body.update(over)
    return body


def _group_deliver(sim: DingTalkSimulator, otid: str = "card-1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "outTrackId": otid,
        "userIdType": 1,
        "openSpaceId": f"dtv1.card//IM_GROUP.{GROUP}",
        "imGroupOpenDeliverModel": {"robotCode": sim.app_key, "atUserIds": {"u1": "Nick"}},
    }
    body.update(over)
    return body


def _stream(otid: str = "card-1", guid: str = "g-1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "outTrackId": otid,
        "guid": guid,
        "key": "msgContent",
        "content": "hello",
        "isFull": True,
        "isFinalize": False,
        "isError": False,
    }
    body.update(over)
    return body


async def _delivered(call: Call, sim: DingTalkSimulator, otid: str = "card-1") -> None:
    status, _ = await call(
        "POST", CREATE_AND_DELIVER_PATH, {**_create(otid), **_group_deliver(sim, otid)}
    )
    assert status == 200


async def test_cards_create_and_deliver_answers_deliver_results(
    call: Call, sim: DingTalkSimulator, ext: CardExtension
) -> None:
    """createAndDeliver binds the card to the group and lists a successful delivery."""
    status, body = await call(
        "POST", CREATE_AND_DELIVER_PATH, {**_create(), **_group_deliver(sim)}
    )
    assert status == 200
    assert body["success"] is True
    assert body["result"]["outTrackId"] == "card-1"
    (result,) = body["result"]["deliverResults"]
    assert (result["success"], result["spaceType"], result["spaceId"]) == (True, "IM_GROUP", GROUP)
    card = ext.cards["card-1"]
    assert (card["conversation_id"], card["status"]) == (GROUP, "processing")


async def test_cards_create_then_deliver_separately(
    call: Call, sim: DingTalkSimulator, ext: CardExtension
) -> None:
    """A created card has no conversation until it is delivered (here 1:1, IM_ROBOT)."""
    status, body = await call("POST", CREATE_PATH, _create())
    assert (status, body["result"]) == (200, "card-1")
    assert ext.cards["card-1"]["conversation_id"] == ""
    deliver = {
        "outTrackId": "card-1",
        "openSpaceId": "dtv1.card//IM_ROBOT.lisi",
        "imRobotOpenDeliverModel": {"spaceType": "IM_ROBOT"},
    }
    status, body = await call("POST", DELIVER_PATH, deliver)
    assert status == 200
    assert body["result"][0]["spaceType"] == "IM_ROBOT"
    assert ext.cards["card-1"]["conversation_id"] == sim.direct_conversation_id("lisi")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (_create(cardTemplateId=""), "invalidParameter.cardTemplateId"),
        (_create("x" * 65), "invalidParameter.outTrackId"),
        (_create(""), "invalidParameter.outTrackId"),
        (_create(callbackType="PUSH"), "invalidParameter.callbackType"),
        (_create(cardData={"cardParamMap": {"flowStatus": 1}}), "invalidParameter.cardParamMap"),
        (_create(cardData={"cardParamMap": {"ok": True}}), "invalidParameter.cardParamMap"),
        (_create(cardData=None), "invalidParameter.cardData"),
        (_create(cardData={"cardParamMap": []}), "invalidParameter.cardData"),
    ],
    ids=["template", "long-id", "empty-id", "callback", "number", "bool", "no-data", "list"],
)
async def test_cards_create_rejects_bad_bodies(
    call: Call, ext: CardExtension, body: dict[str, Any], code: str
) -> None:
    """A bad template, id, callback type or non-string card parameter is refused with 400."""
    status, answer = await call("POST", CREATE_PATH, body)
    assert (status, answer["code"]) == (400, code)
    assert ext.cards == {}


async def test_cards_create_twice_and_refused_fault(
    call: Call, sim: DingTalkSimulator, ext: CardExtension
) -> None:
    """An outTrackId is used once; cards_refused answers param.templateUnpublished."""
    assert (await call("POST", CREATE_PATH, _create()))[0] == 200
    status, answer = await call("POST", CREATE_PATH, _create())
    assert (status, answer["code"]) == (400, "param.outTrackIdExisted")
    await sim.fault({"cards_refused": True})
    status, answer = await call("POST", CREATE_AND_DELIVER_PATH, _create("card-2"))
    assert (status, answer["code"]) == (400, "param.templateUnpublished")
    assert sim.state()["cards"]["refused"] is True


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", CREATE_PATH),
        ("POST", DELIVER_PATH),
        ("POST", CREATE_AND_DELIVER_PATH),
        ("PUT", CREATE_PATH),
        ("PUT", STREAMING_PATH),
    ],
)
async def test_cards_require_token_and_json(call: Call, method: str, path: str) -> None:
    """Calls without the token, or with a body that is not a JSON object, are refused."""
    status, answer = await call(method, path, _create(), token_ok=False)
    assert (status, answer["code"]) == (400, "AuthenticationFailed.MissingParameter")
    status, answer = await call(method, path, b"not json")
    assert (status, answer["code"]) == (400, "invalidParameter")


async def test_cards_create_and_deliver_bad_space_stores_nothing(
    call: Call, sim: DingTalkSimulator, ext: CardExtension
) -> None:
    """A createAndDeliver whose delivery is invalid creates no card."""
    body = {**_create(), **_group_deliver(sim, openSpaceId="dtv1.card//ONE_BOX.x")}
    status, answer = await call("POST", CREATE_AND_DELIVER_PATH, body)
    assert (status, answer["code"]) == (400, "invalidParameter.openSpaceId")
    assert ext.cards == {}


@pytest.mark.parametrize(
    ("over", "code"),
    [
        ({"openSpaceId": "IM_GROUP.cid"}, "invalidParameter.openSpaceId"),
        ({"openSpaceId": "dtv1.card//IM_GROUP."}, "invalidParameter.openSpaceId"),
        ({"openSpaceId": f"{SPACE}a;{SPACE}b"}, "invalidParameter.openSpaceId"),
        ({"openSpaceId": "dtv1.card//ONE_BOX.cid"}, "invalidParameter.openSpaceId"),
        ({"imGroupOpenDeliverModel": {"robotCode": "other"}}, "invalidParameter.robotCode.auth"),
        ({"imGroupOpenDeliverModel": None}, "invalidParameter.robotCode.auth"),
        ({"outTrackId": "nope"}, "param.cardNotExist"),
    ],
    ids=["prefix", "empty-id", "two-spaces", "space-type", "robot", "no-model", "unknown"],
)  # fmt: skip
async def test_cards_deliver_rejects_bad_group_delivery(
    call: Call, sim: DingTalkSimulator, over: dict[str, Any], code: str
) -> None:
    """A bad open space, robot code or unknown card is refused with 400."""
    await call("POST", CREATE_PATH, _create())
    status, answer = await call("POST", DELIVER_PATH, _group_deliver(sim, **over))
    assert (status, answer["code"]) == (400, code)


async def test_cards_deliver_checks_mentions_and_robot_space(
    call: Call, sim: DingTalkSimulator
) -> None:
    """atUserIds must map ids to names; IM_ROBOT needs its deliver model and robot code."""
    await call("POST", CREATE_PATH, _create())
    model = {"robotCode": sim.app_key, "atUserIds": ["u1"]}
    status, answer = await call(
        "POST", DELIVER_PATH, _group_deliver(sim, imGroupOpenDeliverModel=model)
    )
    assert (status, answer["code"]) == (400, "invalidParameter.atUserIds")
    robot = {"outTrackId": "card-1", "openSpaceId": "dtv1.card//IM_ROBOT.lisi"}
    status, answer = await call("POST", DELIVER_PATH, robot)
    assert (status, answer["code"]) == (400, "invalidParameter.spaceType")
    wrong = {**robot, "imRobotOpenDeliverModel": {"spaceType": "IM_ROBOT", "robotCode": "x"}}
    status, answer = await call("POST", DELIVER_PATH, wrong)
    assert (status, answer["code"]) == (400, "invalidParameter.robotCode.auth")


async def test_cards_instance_update_merges_by_key_or_replaces(
    call: Call, sim: DingTalkSimulator, ext: CardExtension
) -> None:
    """updateCardDataByKey merges parameters; without it the map is replaced."""
    await _delivered(call, sim)
    merge = {
        "outTrackId": "card-1",
        "cardData": {"cardParamMap": {"flowStatus": "2", "msgContent": "hi"}},
        "cardUpdateOptions": {"updateCardDataByKey": True},
    }
    assert (await call("PUT", CREATE_PATH, merge))[0] == 200
    assert ext.cards["card-1"]["params"] == {"flowStatus": "2", "msgContent": "hi"}
    replace = {"outTrackId": "card-1", "cardData": {"cardParamMap": {"msgContent": "only"}}}
    assert (await call("PUT", CREATE_PATH, replace))[0] == 200
    card = ext.cards["card-1"]
    assert card["params"] == {"msgContent": "only"}
    assert (card["status"], card["text"]) == ("inputing", "only")
    assert [u["keys"] for u in ext.updates["card-1"]] == [
        ["flowStatus", "msgContent"],
        ["msgContent"],
    ]
    bad = {"outTrackId": "card-1", "cardData": {"cardParamMap": {"n": 3}}}
    status, answer = await call("PUT", CREATE_PATH, bad)
    assert (status, answer["code"]) == (400, "invalidParameter.cardParamMap")
    status, answer = await call("PUT", CREATE_PATH, {**replace, "outTrackId": "missing"})
    assert (status, answer["code"]) == (400, "param.cardNotExist")


async def test_cards_streaming_full_append_guid_and_final_states(
    call: Call, sim: DingTalkSimulator, ext: CardExtension
) -> None:
    """Full and append updates apply once per guid; isFinalize finishes and is mirrored."""
    await _delivered(call, sim)
    assert (await call("PUT", STREAMING_PATH, _stream(content="hel")))[0] == 200
    await call("PUT", STREAMING_PATH, _stream(guid="g-2", content="lo", isFull=False))
    await call("PUT", STREAMING_PATH, _stream(guid="g-2", content="lo", isFull=False))
    assert ext.cards["card-1"]["text"] == "hello"
    assert len(ext.updates["card-1"]) == 2
    assert sim.replies() == []
    await call("PUT", STREAMING_PATH, _stream(guid="g-3", content="hello!", isFinalize=True))
    assert ext.cards["card-1"]["status"] == "finished"
    (mirror,) = sim.replies()
    assert mirror["msgtype"] == "card"
    assert (mirror["msg_id"], mirror["conversation_id"]) == (None, GROUP)
    assert mirror["body"]["card"] == {
        "outTrackId": "card-1",
        "status": "finished",
        "text": "hello!",
    }
    await call("PUT", STREAMING_PATH, _stream(guid="g-4", content="oops", isError=True))
    assert ext.cards["card-1"]["status"] == "failed"
    assert len(sim.replies()) == 2


@pytest.mark.parametrize(
    "over",
    [{"guid": ""}, {"key": ""}, {"content": 5}, {"isFull": "yes"}],
    ids=["guid", "key", "content", "flag"],
)
async def test_cards_streaming_rejects_bad_fields(
    call: Call, sim: DingTalkSimulator, over: dict[str, Any]
) -> None:
    """Missing strings or non-boolean flags are refused with 400."""
    await _delivered(call, sim)
    status, answer = await call("PUT", STREAMING_PATH, _stream(**over))
    assert (status, answer["code"]) == (400, "invalidParameter")


async def test_cards_streaming_unknown_card_and_undelivered_final_state(
    call: Call, ext: CardExtension, sim: DingTalkSimulator
) -> None:
    """Streaming to an unknown card is refused; finishing an undelivered card mirrors nothing."""
    status, answer = await call("PUT", STREAMING_PATH, _stream("nope"))
    assert (status, answer["code"]) == (400, "param.cardNotExist")
    await call("POST", CREATE_PATH, _create())
    await call("PUT", STREAMING_PATH, _stream(isFinalize=True))
    assert ext.cards["card-1"]["status"] == "finished"
    assert sim.replies() == []


async def test_cards_streaming_qps_cap(
    call: Call, sim: DingTalkSimulator, ext: CardExtension
) -> None:
    """Beyond card_qps accepted streaming calls in a second: 403 QpsLimitForAppkeyAndApi."""
    await _delivered(call, sim)
    await sim.fault({"card_qps": 2})
    for n in range(2):
        assert (await call("PUT", STREAMING_PATH, _stream(guid=f"g{n}")))[0] == 200
    status, answer = await call("PUT", STREAMING_PATH, _stream(guid="g9"))
    assert (status, answer["code"]) == (403, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi")
    assert ext.qps_rejections == 1
    assert sim.state()["cards"]["qps_rejections"] == 1
    assert len(ext.updates["card-1"]) == 2


@pytest.mark.parametrize(
    "spec",
    [{"cards_refused": "yes"}, {"card_qps": 0}, {"card_qps": True}, {"card_qps": float("inf")}],
    ids=["refused", "zero", "bool", "inf"],
)
async def test_cards_faults_validate(sim: DingTalkSimulator, spec: dict[str, Any]) -> None:
    """Bad fault values raise ValueError."""
    with pytest.raises(ValueError, match="must be"):
        await sim.fault(spec)


async def test_cards_control_routes(call: Call, sim: DingTalkSimulator) -> None:
    """/_sim/cards lists cards changed after a version; /_sim/cards/{id} shows one with updates."""
    await _delivered(call, sim, "card-1")
    _, listed = await call("GET", "/_sim/cards")
    assert [c["out_track_id"] for c in listed["cards"]] == ["card-1"]
    assert "params" not in listed["cards"][0]
    version = listed["version"]
    _, empty = await call("GET", f"/_sim/cards?after={version}")
    assert empty["cards"] == []
    await call("PUT", STREAMING_PATH, _stream())
    _, changed = await call("GET", f"/_sim/cards?after={version}&conversation_id={GROUP}")
    assert [c["text"] for c in changed["cards"]] == ["hello"]
    _, other = await call("GET", "/_sim/cards?conversation_id=cidOther")
    assert other["cards"] == []
    status, _ = await call("GET", "/_sim/cards?after=x")
    assert status == 400
    status, one = await call("GET", "/_sim/cards/card-1")
    assert status == 200
    assert [u["text"] for u in one["updates"]] == ["hello"]
    status, _ = await call("GET", "/_sim/cards/none")
    assert status == 404


async def test_cards_extension_needs_install_and_positive_qps() -> None:
    """An extension not installed has no simulator; a non-positive QPS cap is refused."""
    ext = CardExtension()
    with pytest.raises(RuntimeError):
        _ = ext.sim
    with pytest.raises(ValueError, match="streaming_qps"):
        CardExtension(streaming_qps=0)
    assert ext.state()["cards"] == 0
    await ext.aclose()


def test_cards_page_polls_cards() -> None:
    """The chat page polls /_sim/cards and renders card states."""
    page = render_page({"users": [], "groups": []})
    assert "/_sim/cards?after=" in page
    assert "AI card · " in page
    assert 'r.msgtype === "card"' in page
