"""EchoBackend and the shared echo answer."""

from __future__ import annotations

import pytest

from imrelay.config import EchoModelSettings
from imrelay.models import EchoBackend, build_model
from imrelay.models.base import ChatMessage, Generation
from imrelay.models.echo import build_echo_answer, extract_content_text


def test_build_echo_answer_counts_turns_without_system():
    """The answer quotes the last user text and counts the non-system messages."""
    messages: list[ChatMessage] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "echo: one (turns: 1)"},
        {"role": "user", "content": "two"},
    ]
    assert build_echo_answer(messages) == "echo: two (turns: 3)"


def test_build_echo_answer_counts_images():
    """Text parts are joined and image parts of the last user message are counted."""
    content = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}},
        {"type": "text", "text": "here"},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/b.png"}},
    ]
    assert build_echo_answer([{"role": "user", "content": content}]) == (
        "echo: look here (turns: 1, images: 2)"
    )


def test_build_echo_answer_without_user_message():
    """With no user message the quoted text is empty."""
    assert build_echo_answer([{"role": "system", "content": "x"}]) == "echo:  (turns: 0)"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, ("", 0)),
        ("plain", ("plain", 0)),
        ([{"type": "text", "text": "a"}, "junk", {"type": "input_audio"}], ("a", 0)),
        ({"unexpected": "shape"}, ("", 0)),
    ],
)
def test_extract_content_text_shapes(content: object, expected: tuple[str, int]):
    """Every content shape yields text and an image count without raising."""
    assert extract_content_text(content) == expected


async def test_echo_backend_answers_after_latency():
    """The backend waits ``latency_ms`` with the injected sleep, then yields the answer once."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    ticks = iter([10.0, 10.25, 10.5])
    backend = EchoBackend(
        "echo",
        EchoModelSettings(type="echo", latency_ms=250),
        sleep=sleep,
        clock=lambda: next(ticks),
    )
    result = Generation()
    deltas = [d async for d in backend.generate([{"role": "user", "content": "hi you"}], result)]
    assert slept == [0.25]
    assert deltas == ["echo: hi you (turns: 1)"]
    assert result.text == deltas[0]
    assert result.first_token_s == 0.25
    assert result.total_s == 0.5
    assert result.model_time_s == 0.25
    assert result.prompt_tokens == 2
    assert result.completion_tokens == 5


async def test_echo_backend_skips_sleep_without_latency():
    """With no latency the backend does not sleep at all."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    backend = EchoBackend("echo", EchoModelSettings(type="echo"), sleep=sleep)
    result = Generation()
    async for _ in backend.generate([{"role": "user", "content": "x"}], result):
        pass
    assert slept == []
    assert result.text == "echo: x (turns: 1)"


async def test_echo_backend_probe_and_close():
    """probe() says there is no endpoint; aclose() is harmless."""
    backend = EchoBackend("echo", EchoModelSettings(type="echo"))
    assert await backend.probe() == "echo model (no endpoint)"
    await backend.aclose()


def test_build_model_builds_echo_backend():
    """build_model returns an EchoBackend for ``type: echo`` and rejects other objects."""
    backend = build_model("try", EchoModelSettings(type="echo"))
    assert isinstance(backend, EchoBackend)
    assert backend.name == "try"
    with pytest.raises(TypeError, match="unknown model settings type"):
        build_model("bad", object())  # type: ignore[arg-type]
