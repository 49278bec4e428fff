"""Model faults end to end: a failing primary with a healthy fallback, replicas, apologies."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from _support import gateway_settings, wait_for
from imrelay.app import Gateway
from imrelay.config import Settings
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator


def two_model_settings(
    dt: DingTalkSimulator, primary: ModelSimulator, backup: ModelSimulator, db: Path, **primary_kw
) -> Settings:
    data = gateway_settings(dt, primary, db).model_dump(mode="python")
    data["platforms"]["dingtalk"]["app_secret"] = dt.app_secret
    data["models"] = {
        "default": {
            "type": "openai",
            "base_url": primary.base_url,
            "model": "sim-model",
            "timeout_s": 5,
            **primary_kw,
        },
        "backup": {"type": "openai", "base_url": backup.base_url, "model": "sim-model"},
    }
    data["routing"] = {"default": "default", "fallback": {"default": ["backup"]}}
    return Settings.model_validate(data)


def answers(sim: DingTalkSimulator) -> list[str]:
    texts = []
    for reply in sim.replies():
        body = reply["body"]
        texts.append(
            body["markdown"]["text"] if body["msgtype"] == "markdown" else body["text"]["content"]
        )
    return texts


async def test_failing_primary_with_healthy_fallback_answers_everything(
    dingtalk_sim: DingTalkSimulator, tmp_path: Path
) -> None:
    """With 30 % of the primary's calls failing, every message still gets a model answer."""
    async with (
        ModelSimulator(error_rate=0.3, seed=7) as primary,
        ModelSimulator() as backup,
    ):
        settings = two_model_settings(dingtalk_sim, primary, backup, tmp_path / "m.db", retries=0)
        gw = Gateway(settings, registry=CollectorRegistry())
        await gw.start()
        try:
            await wait_for(lambda: dingtalk_sim.active_connections() == 1)
            for i in range(100):
                await dingtalk_sim.send_message(f"q{i}", conversation_id=f"cidF{i % 10}")
            await wait_for(lambda: len(dingtalk_sim.replies()) >= 100, timeout=30)
            texts = answers(dingtalk_sim)
            assert len(texts) == 100
            assert all(t.startswith("echo: q") for t in texts), [
                t for t in texts if not t.startswith("echo: q")
            ]
            assert len(backup.requests) > 10  # the fallback really carried traffic
            reg = gw.metrics.registry
            ok = reg.get_sample_value(
                "imrelay_model_requests_total", {"model": "default", "outcome": "ok"}
            )
            assert ok == 100.0
            fell = reg.get_sample_value(
                "imrelay_model_fallbacks_total", {"model": "default", "to": "backup"}
            )
            assert fell is not None
            assert fell == len(backup.requests)
        finally:
            await gw.stop()


async def test_replicas_share_load_and_a_dead_one_is_skipped(
    dingtalk_sim: DingTalkSimulator, tmp_path: Path
) -> None:
    """A model with two endpoints: one refuses connections, every message is still answered."""
    async with ModelSimulator() as alive:
        dead_url = "http://127.0.0.1:9/v1"  # discard port: nothing listens
        settings = two_model_settings(
            dingtalk_sim, alive, alive, tmp_path / "r.db",
            endpoints=[dead_url], retries=2, retry_backoff_s=0.01, breaker_failures=1,
        )  # fmt: skip
        data = settings.model_dump(mode="python")
        data["platforms"]["dingtalk"]["app_secret"] = dingtalk_sim.app_secret
        data["routing"] = {"default": "default"}
        gw = Gateway(Settings.model_validate(data), registry=CollectorRegistry())
        await gw.start()
        try:
            await wait_for(lambda: dingtalk_sim.active_connections() == 1)
            for i in range(20):
                await dingtalk_sim.send_message(f"r{i}", conversation_id=f"cidR{i % 5}")
            await wait_for(lambda: len(dingtalk_sim.replies()) >= 20, timeout=20)
            assert all(t.startswith("echo: r") for t in answers(dingtalk_sim))
            assert len(alive.requests) == 20
        finally:
            await gw.stop()


async def test_all_models_failing_sends_the_apology(
    dingtalk_sim: DingTalkSimulator, tmp_path: Path
) -> None:
    """When the primary and its fallback both fail, the user gets the configured apology."""
    async with ModelSimulator() as primary, ModelSimulator() as backup:
        primary.set_behaviour(status=503)
        backup.set_behaviour(status=500)
        settings = two_model_settings(dingtalk_sim, primary, backup, tmp_path / "a.db", retries=1)
        gw = Gateway(settings, registry=CollectorRegistry())
        await gw.start()
        try:
            await wait_for(lambda: dingtalk_sim.active_connections() == 1)
            await dingtalk_sim.send_message("anyone there?")
            await wait_for(lambda: len(dingtalk_sim.replies()) == 1, timeout=15)
            assert answers(dingtalk_sim) == [settings.pipeline.failure_notice]
            reg = gw.metrics.registry
            # The apology goes out before the message's final state is recorded.
            await wait_for(
                lambda: (
                    reg.get_sample_value(
                        "imrelay_messages_failed_total",
                        {"platform": "dingtalk", "reason": "model_error"},
                    )
                    == 1.0
                ),
                what="the failure to be recorded",
            )
        finally:
            await gw.stop()
