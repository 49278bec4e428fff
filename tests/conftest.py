"""Fixtures shared by the whole suite: simulators on 127.0.0.1 and a gateway wired to them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from _support import GatewayFactory, gateway_settings, wait_for
from imrelay.app import Gateway
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator


@pytest.fixture
async def dingtalk_sim() -> AsyncIterator[DingTalkSimulator]:
    """A DingTalk simulator on an ephemeral loopback port."""
    sim = DingTalkSimulator(ping_interval_s=5.0, disconnect_close_after_s=0.5)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.aclose()


@pytest.fixture
async def model_sim() -> AsyncIterator[ModelSimulator]:
    """An OpenAI-compatible model simulator on an ephemeral loopback port."""
    sim = ModelSimulator()
    await sim.start()
    try:
        yield sim
    finally:
        await sim.aclose()


@pytest.fixture
async def gateway_factory(
    dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator, tmp_path: Path
) -> AsyncIterator[GatewayFactory]:
    """Start gateways wired to the simulators (same database each time); stopped at the end.

    Keyword arguments override settings with ``section__key=value``.
    """
    started: list[Gateway] = []

    async def start(**overrides: Any) -> Gateway:
        settings = gateway_settings(dingtalk_sim, model_sim, tmp_path / "imrelay.db", **overrides)
        gateway = Gateway(settings, registry=CollectorRegistry())
        await gateway.start()
        started.append(gateway)
        return gateway

    try:
        yield start
    finally:
        for gateway in reversed(started):
            if not getattr(gateway, "_stopped", False):
                await gateway.stop()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator) -> Gateway:
    """A started gateway whose stream connection is up."""
    gw = await gateway_factory()
    await wait_for(lambda: dingtalk_sim.active_connections() >= 1, what="stream connection")
    return gw
