"""Model backends: the protocol, the OpenAI-compatible client, the echo model, and a factory."""

from __future__ import annotations

from imrelay.config import EchoModelSettings, ModelSettings, OpenAIModelSettings
from imrelay.models.base import ChatMessage, Generation, ModelBackend
from imrelay.models.echo import EchoBackend
from imrelay.models.openai_compat import OpenAICompatBackend

__all__ = [
    "ChatMessage",
    "EchoBackend",
    "Generation",
    "ModelBackend",
    "OpenAICompatBackend",
    "build_model",
]


def build_model(name: str, settings: ModelSettings) -> ModelBackend:
    """Build the backend a model's settings describe, chosen by ``settings.type``.

    Args:
        name: the configured model name.
        settings: that model's settings.

    Returns:
        An :class:`OpenAICompatBackend` for ``type: openai``, an :class:`EchoBackend` for
        ``type: echo``. The caller closes it with ``aclose()``.

    Raises:
        TypeError: the settings are of no known model type.
    """
    if isinstance(settings, OpenAIModelSettings):
        return OpenAICompatBackend(name, settings)
    if isinstance(settings, EchoModelSettings):
        return EchoBackend(name, settings)
    raise TypeError(f"unknown model settings type: {type(settings).__name__}")
