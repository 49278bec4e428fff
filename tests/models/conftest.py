"""Fixtures for the model backend tests: a model simulator, a dead port, a backend factory."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import SecretStr

from imrelay.config import OpenAIModelSettings
from imrelay.models.openai_compat import OpenAICompatBackend
from imrelay.sim.model import ModelSimulator

API_KEY = "sk-imrelay-test-0123456789abcdef"

BackendFactory = Callable[..., OpenAICompatBackend]


@pytest.fixture
async def openai_sim() -> AsyncIterator[ModelSimulator]:
    """A model simulator on an ephemeral loopback port."""
    async with ModelSimulator() as sim:
        yield sim


@pytest.fixture
def api_key() -> str:
    """The API key every test backend is configured with."""
    return API_KEY


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def openai_settings(base_url: str, **overrides: Any) -> OpenAIModelSettings:
    """Settings for the simulator's model, with a test API key and a short timeout."""
    data: dict[str, Any] = {
        "type": "openai",
        "base_url": base_url,
        "model": "sim-model",
        "api_key": SecretStr(API_KEY),
        "timeout_s": 5.0,
    }
    data.update(overrides)
    return OpenAIModelSettings(**data)


@pytest.fixture
async def make_backend(openai_sim: ModelSimulator) -> AsyncIterator[BackendFactory]:
    """Build backends (against the simulator unless ``base_url`` is given); closed at the end."""
    built: list[OpenAICompatBackend] = []

    def make(**overrides: Any) -> OpenAICompatBackend:
        overrides.setdefault("base_url", openai_sim.base_url)
        backend = OpenAICompatBackend("default", openai_settings(**overrides))
        built.append(backend)
        return backend

    yield make
    for backend in built:
        await backend.aclose()
