"""Fault injection: the gateway as a subprocess, killed, cut off and starved, loses nothing.

Each scenario drives a real ``imrelay run`` process through the simulators over loopback and
checks the delivery promise: no message lost, none answered twice (except a reply in flight at
a SIGKILL, at most the in-flight window), each conversation answered in order. The suite ends
with one line: ``faults: N scenarios, M messages, lost 0, doubled D, reordered 0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from _faults import (
    GatewayProcess,
    Load,
    drive,
    during,
    free_port,
    gateway_config,
    openai_model,
    reply_text,
    report,
    scale,
    settle,
)

from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator

pytestmark = pytest.mark.timeout(240)

MAX_CONCURRENCY = 16
APOLOGY = "Sorry, something went wrong while answering. Please try again later."


@pytest.fixture
async def sim() -> AsyncIterator[DingTalkSimulator]:
    """A DingTalk simulator that redelivers what was not ACKed within a second, like DingTalk."""
    async with DingTalkSimulator(
        redeliver_after_s=1.0, ping_interval_s=5.0, disconnect_close_after_s=1.0
    ) as s:
        yield s


@pytest.fixture
async def model() -> AsyncIterator[ModelSimulator]:
    """A healthy model simulator with a little latency."""
    async with ModelSimulator(latency_ms=5) as m:
        yield m


def n(count: int) -> int:
    return max(1, int(count * scale()))


async def test_faults_sigkill_at_random_points_loses_nothing(
    sim: DingTalkSimulator, model: ModelSimulator, tmp_path: Path
) -> None:
    """Three SIGKILLs at random moments during a load: all answered, in order, none lost."""
    port = free_port()
    config = gateway_config(
        sim, {"default": openai_model(model)}, tmp_path, port=port,
        pipeline={"max_concurrency": MAX_CONCURRENCY},
    )  # fmt: skip
    gw = GatewayProcess(config, port, tmp_path / "gw.log")
    await gw.start()
    rng = random.Random(2026)

    async def kill_and_restart() -> None:
        gw.kill9()
        await gw.restart_after_kill()

    try:
        load = await during(
            drive(sim, conversations=n(30), per_conversation=10, rate=120),
            *((rng.uniform(0.3, 0.9), kill_and_restart) for _ in range(3)),
        )
        outcome = await settle(sim, load, timeout=90)
    finally:
        await gw.stop()
    report(outcome.line("sigkill"))
    assert gw.kills == 3
    assert outcome.lost == []
    assert outcome.wrong == []
    assert outcome.reordered == 0
    assert outcome.doubled <= gw.kills * MAX_CONCURRENCY


async def test_faults_network_cuts_lose_nothing(
    sim: DingTalkSimulator, model: ModelSimulator, tmp_path: Path
) -> None:
    """Disconnect notice, abrupt drop, a silent connection and refused reconnects mid-load."""
    port = free_port()
    config = gateway_config(sim, {"default": openai_model(model)}, tmp_path, port=port)
    gw = GatewayProcess(config, port, tmp_path / "gw.log")
    await gw.start()

    async def fault(spec: dict[str, object]) -> None:
        await sim.fault(spec)

    try:
        load = await during(
            drive(sim, conversations=n(20), per_conversation=15, rate=100),
            (0.4, lambda: fault({"disconnect": True})),
            (0.4, lambda: fault({"drop": True})),
            (0.4, lambda: fault({"silence_s": 1.5})),
            (2.0, lambda: fault({"refuse_s": 1.0})),
            (0.05, lambda: fault({"drop": True})),
        )
        outcome = await settle(sim, load, timeout=60)
    finally:
        await gw.stop()
    report(outcome.line("network"))
    assert sim.connections_opened >= 4
    assert outcome.lost == []
    assert outcome.wrong == []
    assert outcome.doubled == 0
    assert outcome.reordered == 0


async def test_faults_model_errors_with_fallback_keep_success_above_999(
    sim: DingTalkSimulator, tmp_path: Path
) -> None:
    """30 % of the primary model's calls fail; with a healthy fallback ≥ 99.9 % succeed."""
    async with ModelSimulator(error_rate=0.3, seed=11) as primary, ModelSimulator() as backup:
        port = free_port()
        config = gateway_config(
            sim,
            {"default": openai_model(primary, retries=0), "backup": openai_model(backup)},
            tmp_path, port=port,
            routing={"default": "default", "fallback": {"default": ["backup"]}},
        )  # fmt: skip
        gw = GatewayProcess(config, port, tmp_path / "gw.log")
        await gw.start()
        try:
            load = await drive(sim, conversations=n(50), per_conversation=20, rate=400)
            outcome = await settle(sim, load, timeout=90, apology=APOLOGY)
        finally:
            await gw.stop()
    report(outcome.line("model-errors"))
    success = 1 - (outcome.apologies + len(outcome.lost)) / outcome.messages
    report(f"model-errors: success rate {success:.4%} over {outcome.messages} messages")
    assert outcome.messages >= n(1000)
    assert success >= 0.999
    assert outcome.wrong == []
    assert outcome.doubled == 0
    assert outcome.reordered == 0


async def test_faults_model_hangs_and_slowness_are_bounded(
    sim: DingTalkSimulator, tmp_path: Path
) -> None:
    """A hanging primary is cut off by its first-token timeout and the fallback answers."""
    async with ModelSimulator() as primary, ModelSimulator(latency_ms=300) as slow_backup:
        primary.set_behaviour(hang=True)
        port = free_port()
        config = gateway_config(
            sim,
            {
                "default": openai_model(primary, retries=0, first_token_timeout_s=0.3),
                "backup": openai_model(slow_backup),
            },
            tmp_path, port=port,
            routing={"default": "default", "fallback": {"default": ["backup"]}},
        )  # fmt: skip
        gw = GatewayProcess(config, port, tmp_path / "gw.log")
        await gw.start()
        try:
            load = await drive(sim, conversations=n(10), per_conversation=3, rate=40)
            outcome = await settle(sim, load, timeout=60, apology=APOLOGY)
        finally:
            await gw.stop()
    report(outcome.line("model-hang"))
    assert outcome.lost == []
    assert outcome.apologies == 0
    assert outcome.wrong == []


async def test_faults_overload_applies_backpressure_with_flat_memory(
    sim: DingTalkSimulator, tmp_path: Path
) -> None:
    """A burst far beyond capacity: intake pauses, memory stays flat, everything is answered."""
    async with ModelSimulator(latency_ms=20) as model:
        port = free_port()
        config = gateway_config(
            sim, {"default": openai_model(model)}, tmp_path, port=port,
            pipeline={"max_concurrency": 8, "max_pending": 100},
        )  # fmt: skip
        gw = GatewayProcess(config, port, tmp_path / "gw.log")
        await gw.start()
        total = n(1500)
        try:
            sent: dict[str, list[str]] = {}
            texts: dict[str, str] = {}
            for i in range(total):
                cid = f"cidBurst{i % 300}"
                text = f"burst {i}"
                ids = await sim.send_message(text, conversation_id=cid, sender_id=f"u{i % 300}")
                sent.setdefault(cid, []).append(ids["msg_id"])
                texts[ids["msg_id"]] = text
            samples: list[int] = []
            while len({r["msg_id"] for r in sim.replies()}) < total and len(samples) < 600:
                samples.append(gw.rss_bytes())
                await asyncio.sleep(0.1)
            outcome = await settle(sim, Load(sent, texts), timeout=60)
        finally:
            await gw.stop()
    report(outcome.line("overload"))
    quarter = max(1, len(samples) // 4)
    growth = max(samples[quarter:]) - samples[quarter - 1]
    report(
        f"overload: RSS {samples[0] / 2**20:.1f} → {max(samples) / 2**20:.1f} MiB, "
        f"growth after the first quarter {growth / 2**20:.1f} MiB over {len(samples)} samples"
    )
    assert outcome.lost == []
    assert outcome.doubled == 0
    assert growth < 30 * 2**20


async def test_faults_sigterm_drains_in_flight_work(
    sim: DingTalkSimulator, tmp_path: Path
) -> None:
    """SIGTERM lets in-flight answers finish; past the deadline the rest waits for a restart."""
    async with ModelSimulator(latency_ms=400) as model:
        port = free_port()
        config = gateway_config(
            sim, {"default": openai_model(model)}, tmp_path, port=port,
            pipeline={"max_concurrency": 4, "drain_timeout_s": 3},
        )  # fmt: skip
        gw = GatewayProcess(config, port, tmp_path / "gw.log")
        await gw.start()
        # Four conversations are in flight when SIGTERM comes: they finish within the deadline.
        load = Load()
        for c in range(4):
            ids = await sim.send_message(f"drain c{c}", conversation_id=f"cidDrain{c}")
            load.sent[f"cidDrain{c}"] = [ids["msg_id"]]
            load.texts[ids["msg_id"]] = f"drain c{c}"
        while len(model.requests) < 4:
            await asyncio.sleep(0.01)
        assert await gw.stop() == 0
        assert {r["msg_id"] for r in sim.replies()} >= {m[0] for m in load.sent.values()}
        # Twelve messages queued in one conversation cannot all finish in a 1 s drain: what is
        # left stays in the inbox and is answered, in order, after the next start.
        config.write_text(
            config.read_text().replace('"drain_timeout_s": 3', '"drain_timeout_s": 1')
        )
        await gw.start()
        queued = Load()
        queued.sent["cidDrainQ"] = []
        for k in range(12):
            ids = await sim.send_message(f"queued k{k}", conversation_id="cidDrainQ")
            queued.sent["cidDrainQ"].append(ids["msg_id"])
            queued.texts[ids["msg_id"]] = f"queued k{k}"
        await asyncio.sleep(0.6)
        assert await gw.stop() == 0
        answered_before_restart = len({r["msg_id"] for r in sim.replies()} & set(queued.texts))
        assert answered_before_restart < 12
        await gw.start()
        try:
            outcome = await settle(sim, queued, timeout=30)
        finally:
            await gw.stop()
    report(outcome.line("sigterm-drain") + f", {answered_before_restart} answered before restart")
    assert outcome.lost == []
    assert outcome.doubled == 0
    assert outcome.reordered == 0


async def test_faults_message_that_kills_every_start_is_given_up(
    sim: DingTalkSimulator, tmp_path: Path
) -> None:
    """A message whose processing takes the gateway down (SIGKILL each time it reaches the
    model) is started ``max_attempts`` times; the next start marks it failed instead of dying
    on it again, sends nothing for it, and its conversation goes on."""

    def poison_calls(model: ModelSimulator) -> int:  # requests answering it (not its history)
        return sum("poison pill" in json.dumps(r["messages"][-1]) for r in model.requests)

    async def wait(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    async with ModelSimulator(latency_ms=1500) as model:
        port = free_port()
        config = gateway_config(
            sim, {"default": openai_model(model)}, tmp_path, port=port,
            pipeline={"max_attempts": 3},
        )  # fmt: skip
        gw = GatewayProcess(config, port, tmp_path / "gw.log")
        await gw.start()
        try:
            poison = await sim.send_message("poison pill", conversation_id="cidPoison")
            for attempt in (1, 2, 3):
                await wait(lambda n=attempt: poison_calls(model) == n, f"model call {attempt}")
                gw.kill9()
                await gw.restart_after_kill()
            after = await sim.send_message("after the pill", conversation_id="cidPoison")
            await wait(lambda: bool(sim.replies(after["msg_id"])), "the next message's answer")
        finally:
            await gw.stop()
    assert poison_calls(model) == 3
    assert sim.replies(poison["msg_id"]) == []
    assert "echo: after the pill" in reply_text(sim.replies(after["msg_id"])[0])
    assert "started 3 times without finishing" in (tmp_path / "gw.log").read_text()
    with contextlib.closing(sqlite3.connect(tmp_path / "faults.db")) as db:
        row = db.execute(
            "SELECT state, reason, attempts FROM messages WHERE message_id = ?",
            (poison["msg_id"],),
        ).fetchone()
    assert row == ("failed", "max_attempts", 3)
