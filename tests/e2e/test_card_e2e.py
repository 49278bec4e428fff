"""The gateway end to end with streamed answers (``reply.stream: card``): AI cards that grow.

DingTalk simulator (with the card extension) → Stream → pipeline → a model simulator that
streams slowly → AI card updates; and the plain-reply fallback when cards are refused.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from _support import GatewayFactory, wait_for
from imrelay.app import Gateway
from imrelay.models.echo import build_echo_answer
from imrelay.platforms.dingtalk.card import build_out_track_id
from imrelay.sim.dingtalk import DingTalkSimulator, default_extensions
from imrelay.sim.dingtalk_cards import CardExtension
from imrelay.sim.model import ModelSimulator
from imrelay.stores.base import MessageState

INTERVAL_S = 0.1
# Server-side arrival times of two writes the client spaced by the interval may differ by
# a little less only through clock granularity.
SLACK_S = 0.002
QUESTION = " ".join(f"word{i}" for i in range(30))


@pytest.fixture
async def dingtalk_sim() -> AsyncIterator[DingTalkSimulator]:
    """The suite's simulator, with the card extension whether or not it ships by default."""
    extensions = default_extensions()
    if not any(isinstance(ext, CardExtension) for ext in extensions):
        extensions.append(CardExtension())
    sim = DingTalkSimulator(
        ping_interval_s=5.0, disconnect_close_after_s=0.5, extensions=extensions
    )
    await sim.start()
    try:
        yield sim
    finally:
        await sim.aclose()


def _cards(sim: DingTalkSimulator) -> CardExtension:
    (ext,) = [e for e in sim.extensions if isinstance(e, CardExtension)]
    return ext


async def _card_gateway(factory: GatewayFactory, sim: DingTalkSimulator, **reply: Any) -> Gateway:
    settings = {"stream": "card", "card_update_interval_ms": INTERVAL_S * 1000, **reply}
    gateway = await factory(platforms__dingtalk__reply=settings)
    await wait_for(lambda: sim.active_connections() >= 1, what="stream connection")
    return gateway


async def _state(gateway: Gateway, msg_id: str, state: MessageState) -> bool:
    record = await gateway.store.get("dingtalk", msg_id)
    return record is not None and record.state is state


def _plain_replies(sim: DingTalkSimulator, msg_id: str) -> list[dict[str, Any]]:
    return [r for r in sim.replies(msg_id) if r["msgtype"] != "card"]


async def test_card_streams_model_answer_in_order_within_rate(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """A slow streamed answer grows in one card: ordered, spaced, final text = model output."""
    gateway = await _card_gateway(gateway_factory, dingtalk_sim)
    model_sim.set_behaviour(tokens_per_s=40)
    ext = _cards(dingtalk_sim)
    ids = await dingtalk_sim.send_message(QUESTION, conversation_type="1", sender_id="lisi")
    otid = build_out_track_id("dingtalk", ids["msg_id"])
    await wait_for(
        lambda: ext.cards.get(otid, {}).get("status") == "finished", what="finished card"
    )
    await wait_for(lambda: _state(gateway, ids["msg_id"], MessageState.REPLIED), what="replied")
    expected = build_echo_answer(model_sim.requests[0]["messages"])
    updates = ext.updates[otid]
    texts = [u["text"] for u in updates]
    assert texts[-1] == expected
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert len(texts) >= 4  # it did grow
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(updates)]
    assert min(gaps) >= INTERVAL_S - SLACK_S
    conversation = dingtalk_sim.direct_conversation_id("lisi")
    assert [c["out_track_id"] for c in ext.cards_in(conversation)] == [otid]
    assert ext.cards[otid]["text"] == expected
    assert _plain_replies(dingtalk_sim, ids["msg_id"]) == []
    assert [r["msgtype"] for r in dingtalk_sim.replies()] == ["card"]
    assert await gateway.store.was_sent("dingtalk", ids["msg_id"], 0)


async def test_card_in_group_and_context_kept(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """Group answers stream into one card each; the streamed exchange joins the context."""
    await _card_gateway(gateway_factory, dingtalk_sim)
    ext = _cards(dingtalk_sim)
    group = "cidCardE2E=="
    first = await dingtalk_sim.send_message("one", conversation_type="2", conversation_id=group)
    second = await dingtalk_sim.send_message("two", conversation_type="2", conversation_id=group)
    for ids in (first, second):
        otid = build_out_track_id("dingtalk", ids["msg_id"])
        await wait_for(lambda otid=otid: ext.cards.get(otid, {}).get("status") == "finished")
    texts = [c["text"] for c in ext.cards_in(group)]
    assert texts == ["echo: one (turns: 1)", "echo: two (turns: 3)"]
    assert [r for r in dingtalk_sim.replies() if r["msgtype"] != "card"] == []


async def test_card_refused_falls_back_to_plain_reply(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """When DingTalk refuses cards, the answer arrives as one ordinary reply."""
    gateway = await _card_gateway(gateway_factory, dingtalk_sim)
    await dingtalk_sim.fault({"cards_refused": True})
    ids = await dingtalk_sim.send_message("no cards here")
    await wait_for(lambda: len(dingtalk_sim.replies(ids["msg_id"])) >= 1, what="plain reply")
    await wait_for(lambda: _state(gateway, ids["msg_id"], MessageState.REPLIED), what="replied")
    (reply,) = dingtalk_sim.replies(ids["msg_id"])
    assert reply["msgtype"] in ("markdown", "text")
    assert "echo: no cards here" in str(reply["body"])
    assert _cards(dingtalk_sim).cards == {}


async def test_card_model_failure_shows_failed_card_only(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """A failing model turns the card to its failed state with the notice, and nothing else."""
    gateway = await _card_gateway(gateway_factory, dingtalk_sim)
    model_sim.set_behaviour(status=500)
    ids = await dingtalk_sim.send_message("will fail")
    otid = build_out_track_id("dingtalk", ids["msg_id"])
    ext = _cards(dingtalk_sim)
    await wait_for(lambda: ext.cards.get(otid, {}).get("status") == "failed", what="failed card")
    await wait_for(lambda: _state(gateway, ids["msg_id"], MessageState.FAILED), what="failed")
    assert ext.cards[otid]["text"] == gateway.settings.pipeline.failure_notice
    assert _plain_replies(dingtalk_sim, ids["msg_id"]) == []
