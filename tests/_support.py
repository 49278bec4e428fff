"""Helpers shared by tests (imported as ``_support``; conftest.py names are ambiguous)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from imrelay.app import Gateway
from imrelay.config import Settings
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator

#: Multiply every timeout in tests by this on a slow machine.
TIMEOUT_FACTOR = float(os.environ.get("IMRELAY_TESTS_TIMEOUT_FACTOR", "1"))


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll ``predicate`` every 10 ms until it is true, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def gateway_settings(
    dingtalk: DingTalkSimulator, model: ModelSimulator, db: Path, **overrides: Any
) -> Settings:
    """Settings for a gateway wired to the two simulators, with fast reconnects."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"url": f"sqlite:///{db}", "commit_interval_ms": 1},
        "platforms": {
            "dingtalk": {
                "type": "dingtalk",
                "mode": "stream",
                "app_key": dingtalk.app_key,
                "app_secret": dingtalk.app_secret,
                "api_base": dingtalk.base_url,
                "heartbeat_s": 1.0,
                "pong_timeout_s": 0.5,
                "open_timeout_s": 2.0,
                "backoff_initial_s": 0.05,
                "backoff_max_s": 0.3,
                "healthy_after_s": 1.0,
                "rate_limit": {"per_conversation_per_minute": 100000, "app_qps": 1000},
            }
        },
        "models": {
            "default": {
                "type": "openai",
                "base_url": model.base_url,
                "model": "sim-model",
                "timeout_s": 5,
            }
        },
        "routing": {"default": "default"},
        "pipeline": {"drain_timeout_s": 5},
        # Inbound rate limits are exercised by their own tests; here they would only slow
        # the floods some tests send from one user.
        "security": {
            "audit": {"url": f"sqlite:///{db.parent / (db.stem + '-audit.db')}"},
            "rate_limit": {"enabled": False},
        },
    }
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return Settings.model_validate(data)


GatewayFactory = Callable[..., Awaitable[Gateway]]
