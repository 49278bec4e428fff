"""Hot reload on a gateway in this process: what is kept until the next start, and the models a
reload retires are closed even when the gateway stops before their grace period ends."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from _support import gateway_settings, wait_for
from imrelay.app import Gateway
from imrelay.models.openai_compat import OpenAICompatBackend
from imrelay.models.pool import ModelPool
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator


async def test_reload_keeps_restart_only_settings_and_closes_retired_models_at_stop(
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Worker limits and the audit file changed in the file are reported and kept; the
    other changes apply; unchanged rate limits keep their buckets; the replaced model backend
    is closed by stop() although its grace period (pipeline.drain_timeout_s) has not run out."""
    db = tmp_path / "imrelay.db"
    limits = {"enabled": True, "per_user": {"per_minute": 600, "burst": 100}}
    first = gateway_settings(
        dingtalk_sim,
        model_sim,
        db,
        pipeline__drain_timeout_s=600,
        pipeline__loop_lag_target_ms=2,
        security__rate_limit=limits,
    )
    changed = gateway_settings(
        dingtalk_sim,
        model_sim,
        db,
        security__rate_limit=limits,
        pipeline__drain_timeout_s=600,
        pipeline__max_concurrency=3,
        pipeline__max_attempts=9,
        pipeline__loop_lag_target_ms=0,
        pipeline__help_text="help v2",
        security__audit__url=f"sqlite:///{tmp_path / 'other-audit.db'}",
    )
    gateway = Gateway(first, registry=CollectorRegistry(), reloader=lambda: changed)
    await gateway.start()
    try:
        await wait_for(lambda: dingtalk_sim.active_connections() >= 1, what="stream")
        ids = await dingtalk_sim.send_message("hello")
        await wait_for(lambda: bool(dingtalk_sim.replies(ids["msg_id"])), what="an answer")
        [pool] = gateway.models.values()
        assert isinstance(pool, ModelPool)
        [old] = [replica.backend for replica in pool.replicas]
        assert isinstance(old, OpenAICompatBackend)
        assert old._http is not None  # it made a call, so it holds a connection pool
        [limiter] = [st for st in gateway.worker.runner.stages if st.name == "rate_limit"]
        with caplog.at_level(logging.WARNING, logger="imrelay.app"):
            answer = await gateway.reload()
        assert answer == (
            "configuration reloaded (security.audit, pipeline.max_concurrency,"
            " pipeline.max_attempts, pipeline.loop_lag_target_ms at the next start)"
        )
        assert gateway.worker.limit.lag_target_s == first.pipeline.loop_lag_target_ms / 1000 > 0
        s = gateway.settings
        assert (s.pipeline.max_concurrency, s.pipeline.max_attempts) == (
            first.pipeline.max_concurrency,
            first.pipeline.max_attempts,
        )
        assert s.security.audit == first.security.audit
        assert s.pipeline.help_text == "help v2"
        assert gateway.models["default"] is not pool
        # the rate limits did not change: the same stage, so the users' buckets, stays
        assert [st for st in gateway.worker.runner.stages if st.name == "rate_limit"] == [limiter]
    finally:
        await gateway.stop()
    assert old._http is None  # closed by stop(), not left to the 600 s grace period
