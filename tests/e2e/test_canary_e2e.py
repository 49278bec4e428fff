"""Routing end to end: a canary's share and its automatic rollback; context by tokens."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from _support import GatewayFactory, gateway_settings, wait_for
from imrelay.app import Gateway
from imrelay.config import Settings
from imrelay.routing.canary import canary_bucket
from imrelay.security.audit import read_sqlite
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator

CONVERSATIONS = 200
PERCENT = 10


def reply_texts(sim: DingTalkSimulator) -> list[str]:
    """The visible text of every recorded reply."""
    out = []
    for reply in sim.replies():
        body = reply["body"]
        out.append(
            body["markdown"]["text"] if body["msgtype"] == "markdown" else body["text"]["content"]
        )
    return out


def canary_settings(
    dt: DingTalkSimulator, base: ModelSimulator, cand: ModelSimulator, tmp_path: Path
) -> Settings:
    """Two models; one rule with a 10 % canary evaluated every 0.3 s; audit in tmp_path."""
    data: dict[str, Any] = gateway_settings(dt, base, tmp_path / "c.db").model_dump(mode="python")
    data["platforms"]["dingtalk"]["app_secret"] = dt.app_secret
    data["security"]["audit"]["url"] = f"sqlite:///{tmp_path / 'audit.db'}"
    data["security"]["audit"].pop("hmac_key", None)
    data["models"] = {
        "base": {"type": "openai", "base_url": base.base_url, "model": "sim-model", "retries": 0},
        "cand": {"type": "openai", "base_url": cand.base_url, "model": "sim-model", "retries": 0},
    }
    data["routing"] = {
        "default": "base",
        "fallback": {"cand": ["base"]},  # users are answered even while the candidate fails
        "rules": [
            {
                "name": "next",
                "model": "base",
                "canary": {
                    "model": "cand",
                    "percent": PERCENT,
                    "min_requests": 5,
                    "window_s": 0.3,
                    "max_error_rate_delta": 0.2,
                    "max_latency_ratio": 100,  # this test is about errors, not jitter
                },
            }
        ],
    }
    return Settings.model_validate(data)


async def test_canary_share_then_automatic_rollback(
    dingtalk_sim: DingTalkSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """10 % of conversations reach the candidate; once it fails it is rolled back for good."""
    caplog.set_level(logging.WARNING, logger="imrelay.routing.canary")
    async with ModelSimulator() as base, ModelSimulator() as cand:
        gw = Gateway(
            canary_settings(dingtalk_sim, base, cand, tmp_path), registry=CollectorRegistry()
        )
        await gw.start()
        try:
            await wait_for(lambda: dingtalk_sim.active_connections() == 1)
            ids = [f"cidCanary{i:03d}" for i in range(CONVERSATIONS)]
            inside = [c for c in ids if canary_bucket("next", "dingtalk", c) < PERCENT]
            for cid in ids:
                await dingtalk_sim.send_message(f"q {cid}", conversation_id=cid)
            await wait_for(lambda: len(dingtalk_sim.replies()) >= CONVERSATIONS, timeout=60)
            # The candidate got exactly the conversations in its buckets: about 10 %.
            assert len(cand.requests) == len(inside)
            sigma = math.sqrt(CONVERSATIONS * 0.1 * 0.9)
            assert abs(len(inside) - CONVERSATIONS * PERCENT / 100) <= 4 * sigma, len(inside)
            assert len(base.requests) == CONVERSATIONS - len(inside)
            assert all(t.startswith("echo: q cidCanary") for t in reply_texts(dingtalk_sim))
            assert gw.canary_book.status("next", "cand") == "active"

            # The candidate starts failing: the canary's conversations keep being answered
            # (fallback to the baseline) until the evaluator rolls the candidate back.
            cand.set_behaviour(status=500)
            failing_before = len(cand.requests)
            sent = CONVERSATIONS
            for round_ in range(12):  # bounded: a few windows' worth of failing requests
                if gw.canary_book.status("next", "cand") == "rolled_back":
                    break
                for cid in inside[:5]:
                    await dingtalk_sim.send_message(f"again {round_} {cid}", conversation_id=cid)
                sent += 5
                await wait_for(lambda n=sent: len(dingtalk_sim.replies()) >= n, timeout=30)
            await wait_for(
                lambda: gw.canary_book.status("next", "cand") == "rolled_back",
                timeout=5,
                what="automatic rollback",
            )
            assert len(cand.requests) - failing_before >= 5  # it decided on enough requests
            assert all(t.startswith("echo: ") for t in reply_texts(dingtalk_sim))

            # From now on every conversation is on the baseline.
            frozen = len(cand.requests)
            for cid in inside:
                await dingtalk_sim.send_message(f"after {cid}", conversation_id=cid)
                sent += 1
            await wait_for(lambda: len(dingtalk_sim.replies()) >= sent, timeout=30)
            assert len(cand.requests) == frozen
            reg = gw.metrics.registry
            after = reg.get_sample_value(
                "imrelay_route_decisions_total",
                {"model": "base", "rule": "rule next", "canary": "baseline"},
            )
            assert after is not None
            assert after >= CONVERSATIONS - len(inside) + len(inside)

            # The decision is persisted, logged and audited.
            state = json.loads((tmp_path / "c.db.canary.json").read_text(encoding="utf-8"))
            decision = state["rules"]["next"]
            assert (decision["status"], decision["candidate"], decision["by"]) == (
                "rolled_back",
                "cand",
                "imrelay",
            )
            assert "error rate" in decision["reason"]
            logged = [
                r for r in caplog.records if getattr(r, "event.action", "") == "canary_rollback"
            ]
            assert len(logged) == 1
            assert logged[0].levelno == logging.WARNING
        finally:
            await gw.stop()
        audited = [
            json.loads(r["fields"])
            for r in read_sqlite(tmp_path / "audit.db")
            if r["kind"] == "admin"
        ]
        assert [(a["action"], a["args"], a["sender"]) for a in audited] == [
            ("canary_rollback", "next", "imrelay")
        ]

        # A restart keeps the candidate rolled back.
        gw = Gateway(
            canary_settings(dingtalk_sim, base, cand, tmp_path), registry=CollectorRegistry()
        )
        await gw.start()
        try:
            await wait_for(lambda: dingtalk_sim.active_connections() >= 1)
            assert gw.canary_book.status("next", "cand") == "rolled_back"
            await dingtalk_sim.send_message("after restart", conversation_id=inside[0])
            await wait_for(lambda: len(dingtalk_sim.replies()) >= sent + 1, timeout=30)
            assert len(cand.requests) == frozen
        finally:
            await gw.stop()


# -- context: survives a restart, trimmed by the model's tokenizer -------------------------------

WORD = "internationalization"


def save_word_tokenizer(directory: Path) -> Path:
    """A tokenizer counting one token per word or punctuation mark (WORD is in its vocabulary)."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    tokenizer.train_from_iterator([f"echo {WORD} turns"], trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


async def test_context_survives_restart_and_is_trimmed_by_the_tokenizer(
    gateway_factory: GatewayFactory,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
    tmp_path: Path,
) -> None:
    """History comes back after a restart and keeps what fits by the model's own tokenizer."""
    # By the tokenizer a question costs 3 + 4 tokens and an answer
    # "echo: W W W (turns: N)" 10 + 4: the message and two exchanges fit 49 exactly.
    # By the estimate (about 16 and 21 tokens) not even one exchange would fit.
    model_dir = save_word_tokenizer(tmp_path / "model")
    options = {"context__tokenizer": str(model_dir), "context__max_tokens": 49}
    question = " ".join([WORD] * 3)
    gw = await gateway_factory(**options)
    await wait_for(lambda: dingtalk_sim.active_connections() >= 1)
    for n in range(3):
        await dingtalk_sim.send_message(f"{question}", conversation_id="cidTok")
        await wait_for(lambda n=n: len(dingtalk_sim.replies()) >= n + 1)
    assert [t.rsplit("(", 1)[1] for t in reply_texts(dingtalk_sim)] == [
        "turns: 1)",
        "turns: 3)",
        "turns: 5)",
    ]
    await gw.stop()
    await wait_for(lambda: dingtalk_sim.active_connections() == 0)

    await gateway_factory(**options)
    await wait_for(lambda: dingtalk_sim.active_connections() >= 1)
    await dingtalk_sim.send_message(f"{question}", conversation_id="cidTok")
    await wait_for(lambda: len(dingtalk_sim.replies()) >= 4)
    assert reply_texts(dingtalk_sim)[-1].endswith("(turns: 5)")  # two exchanges survived
    prompt = model_sim.requests[-1]["messages"]
    assert [m["role"] for m in prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert prompt[1]["content"].endswith("(turns: 3)")  # the oldest exchange was trimmed


async def test_reasoning_blocks_are_not_sent_or_stored(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """An answer's <think> block is removed before it is sent and before it is remembered."""
    await dingtalk_sim.send_message("<think>secret plan</think>hello", conversation_id="cidThink")
    await wait_for(lambda: len(dingtalk_sim.replies()) >= 1)
    (text,) = reply_texts(dingtalk_sim)
    assert "secret plan" not in text
    assert text.startswith("echo: ")
    assert text.endswith("hello (turns: 1)")
    await wait_for(lambda: _stored(gateway, "dingtalk:cidThink"), what="stored exchange")
    turns = await gateway.store.load("dingtalk:cidThink", since=0)
    assert "secret plan" not in turns[-1].content


async def _stored(gateway: Gateway, key: str) -> bool:
    return len(await gateway.store.load(key, since=0)) == 2
