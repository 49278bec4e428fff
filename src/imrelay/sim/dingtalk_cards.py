"""AI card endpoints for the DingTalk simulator (protocols/dingtalk.md §2.5, §2.6, §6.11).

Theory of operation: :class:`CardExtension` adds the card platform to a
:class:`~imrelay.sim.dingtalk.DingTalkSimulator`:

* ``POST /v1.0/card/instances`` — create ``{cardTemplateId, outTrackId (≤ 64 chars),
  cardData: {cardParamMap}, callbackType: STREAM|HTTP, …}``;
* ``POST /v1.0/card/instances/deliver`` — deliver ``{outTrackId, openSpaceId,
  imGroupOpenDeliverModel: {robotCode, atUserIds?} | imRobotOpenDeliverModel: {spaceType:
  "IM_ROBOT", robotCode?}}`` where ``openSpaceId`` is ``dtv1.card//IM_GROUP.<conversationId>``
  or ``dtv1.card//IM_ROBOT.<userId>``;
* ``POST /v1.0/card/instances/createAndDeliver`` — both at once; the answer lists
  ``deliverResults``;
* ``PUT /v1.0/card/instances`` — update ``cardParamMap`` (merged with
  ``cardUpdateOptions.updateCardDataByKey``, replaced otherwise);
* ``PUT /v1.0/card/streaming`` — ``{outTrackId, guid, key, content, isFull, isFinalize,
  isError}``: replaces (``isFull``) or extends the variable; a repeated ``guid`` is accepted
  and ignored (it is the idempotency key).

Every call needs the access token (``sim.check_token``); every ``cardParamMap`` value must be a
string (400 ``invalidParameter.cardParamMap``); updating a card that was never created answers
400 ``param.cardNotExist`` and creating an ``outTrackId`` twice 400 ``param.outTrackIdExisted``
(the real codes for these two are undocumented; the names are the simulator's). The streaming
endpoint accepts at most ``streaming_qps`` calls per app in any second (default 20, §2.6);
beyond that it answers 403 ``Forbidden.AccessDenied.QpsLimitForAppkeyAndApi`` (only accepted
calls count, so a client that backs off gets through).

What is recorded: :attr:`CardExtension.cards` (``outTrackId`` → ``{out_track_id,
conversation_id, msg_id, status, text, params, template_id, created_at, updated_at, version}``,
``status`` one of ``processing`` ``inputing`` ``executing`` ``finished`` ``failed``, ``text``
the ``msgContent`` variable) and :attr:`CardExtension.updates` (``outTrackId`` → every accepted
update in order: ``{api, text, status, at, t, …}`` with ``at`` the simulator clock and ``t``
the event loop's monotonic time). When a card reaches ``finished`` or ``failed`` its text is
mirrored with ``sim.record_reply(None, conversation_id, "card", {...})`` so ``/_sim/replies``
shows it (the card API does not name the message answered, so ``msg_id`` is ``None``).
``GET /_sim/cards?after=<version>`` lists the cards changed since a version (the chat page polls
it to show cards growing) and ``GET /_sim/cards/{outTrackId}`` one card with its updates.

Faults (``sim.fault(...)`` / ``POST /_sim/faults``):

* ``{"cards_refused": true}`` — creating a card answers 400 ``param.templateUnpublished``
  (``false`` undoes it).
* ``{"card_qps": N}`` — set the streaming QPS cap (a positive number).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Mapping
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

__all__ = [
    "CARD_STATUSES",
    "CREATE_AND_DELIVER_PATH",
    "CREATE_PATH",
    "DELIVER_PATH",
    "STREAMING_PATH",
    "CardExtension",
]

CREATE_PATH: Final = "/v1.0/card/instances"
DELIVER_PATH: Final = "/v1.0/card/instances/deliver"
CREATE_AND_DELIVER_PATH: Final = "/v1.0/card/instances/createAndDeliver"
STREAMING_PATH: Final = "/v1.0/card/streaming"
#: ``flowStatus`` values of the AI card template and their names (§2.6).
CARD_STATUSES: Final[Mapping[str, str]] = {
    "1": "processing",
    "2": "inputing",
    "3": "finished",
    "4": "executing",
    "5": "failed",
}
_FINAL: Final = frozenset({"finished", "failed"})
_CONTENT_KEY: Final = "msgContent"
_SPACE_PREFIX: Final = "dtv1.card//"
_MAX_OUT_TRACK_CHARS: Final = 64
_QPS_LIMITED: Final = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"


def _bad(code: str, message: str) -> web.Response:
    return api_error(400, code, message)


def _is_str(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _card_params(body: Mapping[str, Any]) -> dict[str, str] | web.Response:
    """``body.cardData.cardParamMap``, or the 400 answer when it is malformed."""
    data = body.get("cardData")
    params = data.get("cardParamMap") if isinstance(data, dict) else None
    if not isinstance(params, dict):
        return _bad("invalidParameter.cardData", "cardData.cardParamMap must be an object")
    for key, value in params.items():
        if not isinstance(value, str):
            return _bad(
                "invalidParameter.cardParamMap",
                f"cardParamMap value of {key!r} must be a string",
            )
    return dict(params)


class CardExtension:
    """The card platform part of the DingTalk simulator (see the module docstring).

    Args:
        streaming_qps: accepted ``PUT /v1.0/card/streaming`` calls per second for the app.
        max_records: how many cards (with their updates) are remembered.
    """

    name = "cards"
    fault_keys: frozenset[str] = frozenset({"cards_refused", "card_qps"})

    def __init__(self, *, streaming_qps: float = 20.0, max_records: int = 100_000) -> None:
        if not streaming_qps > 0:
            raise ValueError("streaming_qps must be positive")
        self.streaming_qps = streaming_qps
        self.cards: BoundedDict[str, dict[str, Any]] = BoundedDict(max_records)
        self.updates: BoundedDict[str, list[dict[str, Any]]] = BoundedDict(max_records)
        self.refused = False
        self.qps_rejections = 0
        self._guids: BoundedDict[str, None] = BoundedDict(max_records)
        self._streaming_times: deque[float] = deque()
        self._version = 0
        self._sim: DingTalkSimulator | None = None

    @property
    def sim(self) -> DingTalkSimulator:
        """The simulator this extension is installed in."""
        if self._sim is None:
            raise RuntimeError("card extension is not installed")
        return self._sim

    # -- SimExtension ----------------------------------------------------------------------

    def install(self, sim: DingTalkSimulator, app: web.Application) -> None:
        """Add the card routes and the ``/_sim/cards`` control routes."""
        self._sim = sim
        app.router.add_post(CREATE_PATH, self._handle_create)
        app.router.add_post(DELIVER_PATH, self._handle_deliver)
        app.router.add_post(CREATE_AND_DELIVER_PATH, self._handle_create_and_deliver)
        app.router.add_put(CREATE_PATH, self._handle_update)
        app.router.add_put(STREAMING_PATH, self._handle_streaming)
        app.router.add_get("/_sim/cards", self._handle_list)
        app.router.add_get("/_sim/cards/{out_track_id}", self._handle_one)

    async def fault(self, spec: Mapping[str, Any]) -> None:
        """Apply ``cards_refused`` and ``card_qps`` (see the module docstring).

        Raises:
            ValueError: a value of the wrong type.
        """
        if "cards_refused" in spec and not isinstance(spec["cards_refused"], bool):
            raise ValueError("cards_refused must be a boolean")
        if "card_qps" in spec:
            qps = spec["card_qps"]
            if (
                isinstance(qps, bool)
                or not isinstance(qps, int | float)
                or not math.isfinite(qps)
                or qps <= 0
            ):
                raise ValueError("card_qps must be a positive number")
            self.streaming_qps = float(qps)
        if "cards_refused" in spec:
            self.refused = spec["cards_refused"]

    def state(self) -> dict[str, Any]:
        """Counters for ``GET /_sim/state``."""
        return {
            "cards": len(self.cards),
            "updates": sum(len(u) for u in self.updates.values()),
            "refused": self.refused,
            "streaming_qps": self.streaming_qps,
            "qps_rejections": self.qps_rejections,
        }

    async def aclose(self) -> None:
        """Nothing to release."""

    # -- helpers for tests -----------------------------------------------------------------

    def cards_in(self, conversation_id: str) -> list[dict[str, Any]]:
        """The cards delivered to one conversation, oldest first."""
        return [dict(c) for c in self.cards.values() if c["conversation_id"] == conversation_id]

    # -- internals -------------------------------------------------------------------------

    def _touch(self, card: dict[str, Any]) -> None:
        self._version += 1
        card["version"] = self._version
        card["updated_at"] = self.sim.clock()

    def _record_update(self, card: dict[str, Any], api: str, **extra: Any) -> None:
        previous = card["status"]
        status = CARD_STATUSES.get(card["params"].get("flowStatus", ""), previous)
        if extra.get("finalize"):
            status = "finished"
        if extra.get("error"):
            status = "failed"
        card["status"] = status
        card["text"] = card["params"].get(_CONTENT_KEY, "")
        self._touch(card)
        self.updates.setdefault(card["out_track_id"], []).append(
            {
                "api": api,
                "text": card["text"],
                "status": status,
                "at": self.sim.clock(),
                "t": asyncio.get_running_loop().time(),
                **extra,
            }
        )
        if status in _FINAL and previous != status and card["conversation_id"]:
            self.sim.record_reply(
                card["msg_id"],
                card["conversation_id"],
                "card",
                {
                    "msgtype": "card",
                    "card": {
                        "outTrackId": card["out_track_id"],
                        "status": status,
                        "text": card["text"],
                    },
                },
            )

    async def _read(self, request: web.Request) -> dict[str, Any] | web.Response:
        denied = self.sim.check_token(request)
        if denied is not None:
            return denied
        body = await read_json_object(request)
        if body is None:
            return _bad("invalidParameter", "body must be a json object")
        return body

    def _create(self, body: Mapping[str, Any]) -> dict[str, Any] | web.Response:
        if self.refused:
            return _bad("param.templateUnpublished", "卡片模板未发布")
        template = body.get("cardTemplateId")
        out_track_id = body.get("outTrackId")
        if not _is_str(template):
            return _bad("invalidParameter.cardTemplateId", "cardTemplateId is required")
        if not isinstance(out_track_id, str) or not 0 < len(out_track_id) <= _MAX_OUT_TRACK_CHARS:
            return _bad("invalidParameter.outTrackId", "outTrackId must be 1 to 64 characters")
        if out_track_id in self.cards:
            return _bad("param.outTrackIdExisted", "outTrackId already used")
        if body.get("callbackType", "STREAM") not in ("STREAM", "HTTP"):
            return _bad("invalidParameter.callbackType", "callbackType must be STREAM or HTTP")
        params = _card_params(body)
        if isinstance(params, web.Response):
            return params
        now = self.sim.clock()
        card: dict[str, Any] = {
            "out_track_id": out_track_id,
            "template_id": template,
            "conversation_id": "",
            "msg_id": None,
            "space": "",
            "params": params,
            "status": CARD_STATUSES.get(params.get("flowStatus", ""), "processing"),
            "text": params.get(_CONTENT_KEY, ""),
            "created_at": now,
            "updated_at": now,
            "version": 0,
        }
        return card

    def _deliver(self, card: dict[str, Any], body: Mapping[str, Any]) -> web.Response | None:
        """Check a deliver model and bind the card to its conversation; an error or ``None``."""
        space = body.get("openSpaceId")
        if not isinstance(space, str) or not space.startswith(_SPACE_PREFIX):
            return _bad("invalidParameter.openSpaceId", "openSpaceId must be dtv1.card//…")
        kind, _, space_id = space[len(_SPACE_PREFIX) :].partition(".")
        if ";" in space or not space_id:
            return _bad("invalidParameter.openSpaceId", "one IM_GROUP or IM_ROBOT space")
        if kind == "IM_GROUP":
            model = body.get("imGroupOpenDeliverModel")
            if not isinstance(model, dict) or model.get("robotCode") != self.sim.app_key:
                return _bad("invalidParameter.robotCode.auth", "robotCode is not this app")
            at = model.get("atUserIds")
            if at is not None and not (
                isinstance(at, dict) and all(_is_str(k) and _is_str(v) for k, v in at.items())
            ):
                return _bad("invalidParameter.atUserIds", "atUserIds must map ids to names")
            conversation_id = space_id
        elif kind == "IM_ROBOT":
            model = body.get("imRobotOpenDeliverModel")
            if not isinstance(model, dict) or model.get("spaceType") != "IM_ROBOT":
                return _bad("invalidParameter.spaceType", "imRobotOpenDeliverModel needed")
            if model.get("robotCode", self.sim.app_key) != self.sim.app_key:
                return _bad("invalidParameter.robotCode.auth", "robotCode is not this app")
            conversation_id = self.sim.direct_conversation_id(space_id)
        else:
            return _bad("invalidParameter.openSpaceId", f"unsupported space type {kind!r}")
        card["space"] = space
        card["conversation_id"] = conversation_id
        self._touch(card)
        return None

    def _card(self, body: Mapping[str, Any]) -> dict[str, Any] | web.Response:
        out_track_id = body.get("outTrackId")
        card = self.cards.get(out_track_id) if isinstance(out_track_id, str) else None
        if card is None:
            return _bad("param.cardNotExist", "card instance does not exist")
        return card

    # -- handlers --------------------------------------------------------------------------

    async def _handle_create(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        card = self._create(body)
        if isinstance(card, web.Response):
            return card
        self.cards[card["out_track_id"]] = card
        self._touch(card)
        return json_response({"success": True, "result": card["out_track_id"]})

    async def _handle_deliver(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        card = self._card(body)
        if isinstance(card, web.Response):
            return card
        problem = self._deliver(card, body)
        if problem is not None:
            return problem
        return json_response({"success": True, "result": self._deliver_results(card)})

    async def _handle_create_and_deliver(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        card = self._create(body)
        if isinstance(card, web.Response):
            return card
        problem = self._deliver(card, body)
        if problem is not None:
            return problem
        self.cards[card["out_track_id"]] = card
        result = {
            "outTrackId": card["out_track_id"],
            "deliverResults": self._deliver_results(card),
        }
        return json_response({"success": True, "result": result})

    @staticmethod
    def _deliver_results(card: Mapping[str, Any]) -> list[dict[str, Any]]:
        kind, _, space_id = card["space"][len(_SPACE_PREFIX) :].partition(".")
        return [
            {
                "success": True,
                "spaceType": kind,
                "spaceId": space_id,
                "carrierId": f"carrier-{card['out_track_id'][-12:]}",
                "errorMsg": "",
            }
        ]

    async def _handle_update(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        card = self._card(body)
        if isinstance(card, web.Response):
            return card
        params = _card_params(body)
        if isinstance(params, web.Response):
            return params
        options = body.get("cardUpdateOptions")
        by_key = isinstance(options, dict) and options.get("updateCardDataByKey") is True
        card["params"] = {**card["params"], **params} if by_key else params
        self._record_update(card, "instance", keys=sorted(params))
        return json_response({"success": True, "result": True})

    async def _handle_streaming(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        now = asyncio.get_running_loop().time()
        times = self._streaming_times
        while times and times[0] <= now - 1.0:
            times.popleft()
        if len(times) >= self.streaming_qps:
            self.qps_rejections += 1
            return api_error(403, _QPS_LIMITED, "请求过于频繁，限制将在 1 秒后结束")
        card = self._card(body)
        if isinstance(card, web.Response):
            return card
        guid, key, content = body.get("guid"), body.get("key"), body.get("content")
        if not (isinstance(guid, str) and guid and _is_str(key) and isinstance(content, str)):
            return _bad("invalidParameter", "guid, key and content are required strings")
        flags = {name: body.get(name, False) for name in ("isFull", "isFinalize", "isError")}
        if not all(isinstance(v, bool) for v in flags.values()):
            return _bad("invalidParameter", "isFull, isFinalize and isError must be booleans")
        times.append(now)
        if guid in self._guids:  # a retried call: already applied
            return json_response({"success": True, "result": True})
        self._guids[guid] = None
        old = card["params"].get(key, "")
        card["params"][key] = content if flags["isFull"] else old + content
        self._record_update(
            card,
            "streaming",
            key=key,
            full=flags["isFull"],
            finalize=flags["isFinalize"],
            error=flags["isError"],
        )
        return json_response({"success": True, "result": True})

    async def _handle_list(self, request: web.Request) -> web.Response:
        raw = request.query.get("after", "0")
        if not raw.isdigit():
            return json_response({"error": "after must be a non-negative integer"}, status=400)
        after = int(raw)
        cid = request.query.get("conversation_id")
        found = [
            {k: v for k, v in card.items() if k != "params"}
            for card in self.cards.values()
            if card["version"] > after and (cid is None or card["conversation_id"] == cid)
        ]
        return json_response({"cards": found, "version": self._version})

    async def _handle_one(self, request: web.Request) -> web.Response:
        out_track_id = request.match_info["out_track_id"]
        card = self.cards.get(out_track_id)
        if card is None:
            return json_response({"error": "no such card"}, status=404)
        return json_response({"card": card, "updates": self.updates.get(out_track_id, [])})
