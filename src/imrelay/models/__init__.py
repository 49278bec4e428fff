"""Model backends: the protocol, the OpenAI-compatible client, local models, the echo model, and
a factory."""

from __future__ import annotations

from imrelay.config import (
    EchoModelSettings,
    LocalModelSettings,
    ModelSettings,
    OpenAIModelSettings,
)
from imrelay.models.base import ChatMessage, Generation, ModelBackend
from imrelay.models.echo import EchoBackend
from imrelay.models.local import LocalBackend
from imrelay.models.openai_compat import OpenAICompatBackend
from imrelay.models.pool import FallbackChain, ModelPool

__all__ = [
    "ChatMessage",
    "EchoBackend",
    "FallbackChain",
    "Generation",
    "LocalBackend",
    "ModelBackend",
    "ModelPool",
    "OpenAICompatBackend",
    "build_model",
]


def build_model(name: str, settings: ModelSettings) -> ModelBackend:
    """Build the backend a model's settings describe, chosen by ``settings.type``.

    Args:
        name: the configured model name.
        settings: that model's settings.

    Returns:
        For ``type: openai``, a :class:`ModelPool` over one :class:`OpenAICompatBackend` per
        endpoint (retries, first-token timeout, circuit breakers); a :class:`LocalBackend` for
        ``type: local`` (the model loads on first use); an :class:`EchoBackend` for
        ``type: echo``. The caller closes it with ``aclose()``.

    Raises:
        TypeError: the settings are of no known model type.
    """
    if isinstance(settings, OpenAIModelSettings):
        replicas = [
            OpenAICompatBackend(name, settings.model_copy(update={"base_url": url}))
            for url in settings.urls
        ]
        return ModelPool(
            name,
            replicas,
            retries=settings.retries,
            backoff_s=settings.retry_backoff_s,
            first_token_timeout_s=settings.first_token_timeout_s,
            breaker_failures=settings.breaker_failures,
            breaker_reset_s=settings.breaker_reset_s,
        )
    if isinstance(settings, LocalModelSettings):
        return LocalBackend(name, settings)
    if isinstance(settings, EchoModelSettings):
        return EchoBackend(name, settings)
    raise TypeError(f"unknown model settings type: {type(settings).__name__}")
