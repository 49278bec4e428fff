"""A local model end to end: DingTalk simulator → gateway → in-process transformers → reply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from _support import GatewayFactory, wait_for
from imrelay.config import LocalModelSettings
from imrelay.models.base import Generation
from imrelay.models.local import LocalBackend
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.local_model import build_tiny_model

QUESTION = "hello local model, 你好"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny random-weight model with a chat template; the hub is never asked for anything."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield build_tiny_model(tmp_path_factory.mktemp("e2e-tiny-model"))


def reply_text(reply: dict[str, object]) -> str:
    """The visible text of a recorded sessionWebhook reply."""
    body = reply["body"]
    assert isinstance(body, dict)
    if body["msgtype"] == "markdown":
        return str(body["markdown"]["text"])
    return str(body["text"]["content"])


async def expected_answer(model_dir: Path) -> str:
    """What the model answers to QUESTION as a conversation's first message (greedy)."""
    settings = LocalModelSettings(
        type="local", model_path=str(model_dir), max_tokens=8, temperature=0
    )
    backend = LocalBackend("expected", settings)
    try:
        result = Generation()
        async for _ in backend.generate([{"role": "user", "content": QUESTION}], result):
            pass
    finally:
        await backend.aclose()
    return result.text


async def test_local_model_answers_through_the_full_pipeline(
    gateway_factory: GatewayFactory, dingtalk_sim: DingTalkSimulator, tiny_model: Path
) -> None:
    """A DingTalk message is answered by the in-process model, and model metrics count it."""
    model = {"type": "local", "model_path": str(tiny_model), "max_tokens": 8, "temperature": 0}
    gateway = await gateway_factory(models={"default": model})
    await wait_for(lambda: dingtalk_sim.active_connections() >= 1, what="stream connection")
    ids = await dingtalk_sim.send_message(QUESTION, conversation_type="1")
    await wait_for(lambda: len(dingtalk_sim.replies(ids["msg_id"])) >= 1, what="a reply")
    (reply,) = dingtalk_sim.replies(ids["msg_id"])
    expected = await expected_answer(tiny_model)
    assert expected.strip()
    assert expected.strip() in reply_text(reply)
    registry = gateway.metrics.registry
    ok = registry.get_sample_value(
        "imrelay_model_requests_total", {"model": "default", "outcome": "ok"}
    )
    assert ok == 1.0
    completion = registry.get_sample_value(
        "imrelay_model_tokens_total", {"model": "default", "direction": "completion"}
    )
    assert completion == 8.0
    prompt = registry.get_sample_value(
        "imrelay_model_tokens_total", {"model": "default", "direction": "prompt"}
    )
    assert prompt is not None
    assert prompt > 0
