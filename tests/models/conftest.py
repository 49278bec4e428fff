"""Fixtures for the model backend tests: a model simulator, a dead port, a backend factory, and
tiny local models (random weights, a tokenizer trained on the spot) built once per session."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from imrelay.config import OpenAIModelSettings
from imrelay.models.openai_compat import OpenAICompatBackend
from imrelay.sim.local_model import build_tiny_model
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


@pytest.fixture(scope="session")
def hf_offline() -> Iterator[None]:
    """Hugging Face libraries told not to reach their hub for the whole session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, hf_offline: None) -> Path:
    """A tiny random-weight GPT-2 with a chat template, built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory: pytest.TempPathFactory, hf_offline: None) -> Path:
    """The tiny model again, with a tokenizer that has no chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain-model"), chat_template=False)
