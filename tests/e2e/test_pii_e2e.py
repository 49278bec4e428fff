"""Safety end to end: DingTalk simulator → gateway with the safety stages → model simulator.

The stages come from the ``security`` settings, as a user configures them; each test also checks
their place in the pipeline (after ``kind``; the outbound one after ``format``).
"""

from __future__ import annotations

import json
from pathlib import Path

from _support import GatewayFactory, wait_for
from imrelay.app import Gateway
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator

CORPUS = Path(__file__).parent.parent / "security" / "pii_corpus.jsonl"
GUARDED = {"mobile", "id_card", "bank_card"}
_FULL_WIDTH = str.maketrans("０１２３４５６７８９", "0123456789")


def check_order(gateway: Gateway) -> None:
    """The safety stages sit where they must: inbound after kind, outbound on the whole answer
    before it is split into parts (DESIGN §1: generate → post-safety → format)."""
    names = [stage.name for stage in gateway.worker.runner.stages]
    order = ["kind", "safety", "context", "generate", "post_safety", "format", "send"]
    assert [n for n in names if n in order] == order, names


def reply_text(reply: dict) -> str:
    """The visible text of a recorded sessionWebhook reply."""
    body = reply["body"]
    if body["msgtype"] == "markdown":
        return str(body["markdown"]["text"])
    return str(body["text"]["content"])


def raw_forms(value: str) -> set[str]:
    """The value as written, and its bare digits (the last 11 for a mobile with +86)."""
    digits = "".join(ch for ch in value.translate(_FULL_WIDTH) if ch.isdigit() or ch in "Xx")
    return {value, digits, digits[-11:] if len(digits) > 11 else digits}


def guarded_messages() -> list[tuple[str, list[str]]]:
    """Corpus messages holding a phone, ID or card number, with those values."""
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line]
    return [
        (row["text"], [e["value"] for e in row["entities"] if e["type"] in GUARDED])
        for row in rows
        if any(e["type"] in GUARDED for e in row["entities"])
    ]


async def test_pii_e2e_model_never_sees_a_phone_id_or_card(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """Corpus messages with a phone, ID or card number reach the model masked, history too."""
    gateway = await gateway_factory(
        platforms__dingtalk__rate_limit={"app_qps": 1000, "per_conversation_per_minute": 1000}
    )
    await wait_for(lambda: dingtalk_sim.active_connections() >= 1, what="stream connection")
    check_order(gateway)
    messages = guarded_messages()
    assert len(messages) >= 100
    for i, (text, _) in enumerate(messages):
        await dingtalk_sim.send_message(text, sender_id=f"user{i % 6}")
    await wait_for(
        lambda: len(dingtalk_sim.replies()) >= len(messages), timeout=30, what="every reply"
    )
    assert len(model_sim.requests) == len(messages)
    sent = json.dumps(model_sim.requests, ensure_ascii=False)
    raw = {form for _, values in messages for value in values for form in raw_forms(value)}
    assert sorted(form for form in raw if form in sent) == []
    # history went to the model as well, and it was masked
    assert max(len(r["messages"]) for r in model_sim.requests) > 2
    for label in ("[PHONE]", "[ID]", "[CARD]"):
        assert label in sent
    assert "[PHONE]" in "".join(reply_text(r) for r in dingtalk_sim.replies())
    stored = await gateway.store.load(
        "dingtalk:" + dingtalk_sim.replies()[0]["conversation_id"], 0
    )
    assert stored
    assert [t.content for t in stored if any(form in t.content for form in raw)] == []


async def test_pii_e2e_reversible_restores_for_the_asker_only(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """The model sees placeholders, the asker sees the value, and history keeps placeholders."""
    gateway = await gateway_factory(security__pii={"reversible": True})
    await wait_for(lambda: dingtalk_sim.active_connections() >= 1, what="stream connection")
    check_order(gateway)
    phone = "13912345678"
    first = await dingtalk_sim.send_message(f"记一下我的手机 {phone}", sender_id="alice")
    (reply,) = await _replies(dingtalk_sim, first["msg_id"])
    assert phone in reply_text(reply)
    assert model_sim.requests[0]["messages"][-1]["content"] == "记一下我的手机 <PHONE_1>"
    second = await dingtalk_sim.send_message("我的号码是多少？", sender_id="alice")
    await _replies(dingtalk_sim, second["msg_id"])
    history = json.dumps(model_sim.requests[1]["messages"], ensure_ascii=False)
    assert "<PHONE_1>" in history
    assert phone not in json.dumps(model_sim.requests, ensure_ascii=False)
    third = await dingtalk_sim.send_message("<PHONE_1> 是谁？", sender_id="bob")
    (other,) = await _replies(dingtalk_sim, third["msg_id"])
    assert phone not in reply_text(other)


async def test_pii_e2e_disguised_word_is_blocked_before_the_model(
    gateway_factory: GatewayFactory,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
    tmp_path: Path,
) -> None:
    """A blocked term written with spaces and full-width letters gets the notice, no model call."""
    terms = tmp_path / "politics.txt"
    terms.write_text("敏感词\nforbidden\n", encoding="utf-8")
    gateway = await gateway_factory(
        security__words={"files": [str(terms)], "block_notice": "不能回答这个问题"}
    )
    await wait_for(lambda: dingtalk_sim.active_connections() >= 1, what="stream connection")
    check_order(gateway)
    for text in ("这是敏 感\u200b词吗", "ｆｏｒｂｉｄｄｅｎ topic"):
        ids = await dingtalk_sim.send_message(text)
        (reply,) = await _replies(dingtalk_sim, ids["msg_id"])
        assert reply_text(reply) == "不能回答这个问题"
    assert model_sim.requests == []


async def _replies(sim: DingTalkSimulator, msg_id: str) -> list[dict]:
    await wait_for(lambda: len(sim.replies(msg_id)) >= 1, what=f"reply to {msg_id}")
    return sim.replies(msg_id)
