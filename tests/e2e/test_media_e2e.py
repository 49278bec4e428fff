"""The gateway end to end with media and long answers.

Pictures reach the vision route (``routing.by_kind.image``) as OpenAI image parts; a long answer
arrives split at the platform's ``reply.max_chars``, numbered, in order, with balanced fences.
The DingTalk simulator here runs with :class:`MediaExtension` installed explicitly (this module
overrides the ``dingtalk_sim`` fixture), so real media stand behind its download codes.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from _support import GatewayFactory, wait_for
from imrelay.app import Gateway
from imrelay.models.echo import build_echo_answer
from imrelay.pipeline.split import plan_parts
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.dingtalk_media import MediaExtension, build_png
from imrelay.sim.model import ModelSimulator
from imrelay.stores.base import MessageState

VISION_PROMPT = "You can see pictures."
FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")


@pytest.fixture
def media_ext() -> MediaExtension:
    """The simulator's media extension (to queue pictures for the next message)."""
    return MediaExtension()


@pytest.fixture
async def dingtalk_sim(media_ext: MediaExtension) -> AsyncIterator[DingTalkSimulator]:
    """A DingTalk simulator with the media extension, on an ephemeral loopback port."""
    sim = DingTalkSimulator(
        ping_interval_s=5.0, disconnect_close_after_s=0.5, extensions=[media_ext]
    )
    await sim.start()
    try:
        yield sim
    finally:
        await sim.aclose()


def vision_overrides(model_sim: ModelSimulator, **more: Any) -> dict[str, Any]:
    """Settings overrides adding a ``vision`` model (same simulator) as the image route."""
    return {
        "models__vision": {
            "type": "openai",
            "base_url": model_sim.base_url,
            "model": "sim-model",
            "timeout_s": 5,
            "system_prompt": VISION_PROMPT,
        },
        "routing__by_kind": {"image": "vision", "file": "default"},
        **more,
    }


async def start(factory: GatewayFactory, sim: DingTalkSimulator, **overrides: Any) -> Gateway:
    gateway = await factory(**overrides)
    await wait_for(lambda: sim.active_connections() >= 1, what="stream connection")
    return gateway


def reply_text(reply: dict[str, Any]) -> str:
    body = reply["body"]
    if body["msgtype"] == "markdown":
        return str(body["markdown"]["text"])
    return str(body["text"]["content"])


async def replies_for(sim: DingTalkSimulator, msg_id: str, count: int = 1) -> list[dict]:
    await wait_for(lambda: len(sim.replies(msg_id)) >= count, what=f"{count} replies")
    return sim.replies(msg_id)


async def settled(gateway: Gateway, msg_id: str, state: MessageState) -> None:
    async def check() -> bool:
        record = await gateway.store.get("dingtalk", msg_id)
        return record is not None and record.state is state

    await wait_for(check, what=f"message {state.value}")


def user_content(request: dict[str, Any]) -> Any:
    return request["messages"][-1]["content"]


async def test_picture_reaches_vision_route_as_image_part(
    gateway_factory: GatewayFactory,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
    media_ext: MediaExtension,
) -> None:
    """A picture goes to the image route as a base64 PNG data URL of the very bytes sent."""
    gateway = await start(gateway_factory, dingtalk_sim, **vision_overrides(model_sim))
    png = build_png(4, 3, (0, 200, 100))
    media_ext.attach_next(png)
    ids = await dingtalk_sim.send_message(msgtype="picture")
    (reply,) = await replies_for(dingtalk_sim, ids["msg_id"])
    assert "images: 1" in reply_text(reply)
    (request,) = model_sim.requests
    assert request["messages"][0] == {"role": "system", "content": VISION_PROMPT}
    (part,) = user_content(request)
    assert part["type"] == "image_url"
    url = part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.removeprefix("data:image/png;base64,")) == png
    assert media_ext.fetches == 1
    await settled(gateway, ids["msg_id"], MessageState.REPLIED)


async def test_picture_follows_a_rule_naming_image(
    gateway_factory: GatewayFactory,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
) -> None:
    """Without ``by_kind.image``, a rule with ``match.kind: image`` routes pictures (its
    system prompt applies); a picture that rule does not match gets the unsupported notice."""
    overrides = vision_overrides(model_sim)
    overrides["routing__by_kind"] = {}
    overrides["routing__rules"] = [
        {
            "name": "pictures-from-staff-1",
            "match": {"kind": "image", "user": "staff-1"},
            "model": "vision",
            "system_prompt": "Describe the picture.",
        }
    ]
    gateway = await start(gateway_factory, dingtalk_sim, **overrides)
    ids = await dingtalk_sim.send_message(msgtype="picture", sender_id="staff-1")
    (reply,) = await replies_for(dingtalk_sim, ids["msg_id"])
    assert "images: 1" in reply_text(reply)
    (request,) = model_sim.requests
    assert request["messages"][0] == {"role": "system", "content": "Describe the picture."}
    other = await dingtalk_sim.send_message(msgtype="picture", sender_id="staff-2")
    (notice,) = await replies_for(dingtalk_sim, other["msg_id"])
    assert reply_text(notice) == gateway.settings.pipeline.unsupported_notice
    assert len(model_sim.requests) == 1


async def test_rich_text_keeps_text_and_picture(
    gateway_factory: GatewayFactory,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
) -> None:
    """Rich text reaches the vision route with its text, then its picture."""
    await start(gateway_factory, dingtalk_sim, **vision_overrides(model_sim))
    ids = await dingtalk_sim.send_message("这张图里有什么？", msgtype="richText")
    (reply,) = await replies_for(dingtalk_sim, ids["msg_id"])
    assert "echo: 这张图里有什么？ (turns: 1, images: 1)" in reply_text(reply)
    text, picture = user_content(model_sim.requests[0])
    assert text == {"type": "text", "text": "这张图里有什么？"}
    assert picture["image_url"]["url"].startswith("data:image/png;base64,iVBOR")


async def test_oversize_picture_fails_with_notice(
    gateway_factory: GatewayFactory,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
    media_ext: MediaExtension,
) -> None:
    """A picture above ``media_max_bytes`` is not sent to a model; the user gets the notice."""
    gateway = await start(
        gateway_factory,
        dingtalk_sim,
        **vision_overrides(model_sim, platforms__dingtalk__media_max_bytes=1024),
    )
    media_ext.attach_next(b"\x89PNG\r\n\x1a\n" + bytes(4096))
    ids = await dingtalk_sim.send_message(msgtype="picture")
    (reply,) = await replies_for(dingtalk_sim, ids["msg_id"])
    assert reply_text(reply) == gateway.settings.pipeline.failure_notice
    assert model_sim.requests == []
    await settled(gateway, ids["msg_id"], MessageState.FAILED)


async def test_audio_recognition_and_routed_file(
    gateway_factory: GatewayFactory,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
) -> None:
    """Audio is answered from its recognition text; a routed file reaches its model as a note."""
    await start(gateway_factory, dingtalk_sim, **vision_overrides(model_sim))
    audio = await dingtalk_sim.send_message("明天开会吗", msgtype="audio")
    (reply,) = await replies_for(dingtalk_sim, audio["msg_id"])
    assert "echo: 明天开会吗" in reply_text(reply)
    file = await dingtalk_sim.send_message("报告.pdf", msgtype="file")
    (reply,) = await replies_for(dingtalk_sim, file["msg_id"])
    assert "echo: [file: 报告.pdf]" in reply_text(reply)
    video = await dingtalk_sim.send_message(msgtype="video")
    (reply,) = await replies_for(dingtalk_sim, video["msg_id"])
    assert reply_text(reply) == "Sorry, I can only read text messages for now."
    assert len(model_sim.requests) == 2


def long_message(total: int) -> str:
    """Markdown with sections and code blocks (one longer than a part), ``total`` chars long."""
    sections = []
    for i in range(200):
        sections.append(f"## 第 {i} 节 Section {i}\n\n" + "说明文字 explanation text. " * 9)
        lines = 120 if i == 3 else 6
        code = "\n".join(f"    result_{j} = compute({i}, {j})  # step {j}" for j in range(lines))
        sections.append(f"```python\ndef section_{i}():\n{code}\n```")
    text = "\n\n".join(sections)
    cut = text[:total].rstrip()
    return cut + "x" * (total - len(cut))


def open_fence(text: str) -> str | None:
    opened: str | None = None
    for line in text.split("\n"):
        match = FENCE.fullmatch(line.rstrip())
        if match is None:
            continue
        marks, info = match.groups()
        if opened is None:
            opened = marks
        elif marks[0] == opened[0] and len(marks) >= len(opened) and not info.strip():
            opened = None
    return opened


async def test_long_answer_arrives_split_numbered_in_order(
    gateway_factory: GatewayFactory,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
) -> None:
    """A 20,000-character answer with code arrives in numbered parts that rebuild it."""
    overhead = len(build_echo_answer([{"role": "user", "content": ""}]))
    text = long_message(20_000 - overhead)
    answer = build_echo_answer([{"role": "user", "content": text}])
    assert len(answer) == 20_000
    assert open_fence(answer) is None
    gateway = await start(
        gateway_factory,
        dingtalk_sim,
        models__default__max_tokens=100_000,
        platforms__dingtalk__reply__max_chars=2000,
        platforms__dingtalk__rate_limit__per_conversation_per_minute=200,
    )
    ids = await dingtalk_sim.send_message(text)
    plans = plan_parts(answer, 2000)
    total = len(plans)
    assert total >= 10
    await settled(gateway, ids["msg_id"], MessageState.REPLIED)  # every part went out
    replies = dingtalk_sim.replies(ids["msg_id"])
    assert len(replies) == total
    texts = [reply_text(r) for r in sorted(replies, key=lambda r: r["seq"])]
    assert any(p.reopen for p in plans), "the long code block was not cut: test too weak"
    bodies = []
    for index, (part, plan) in enumerate(zip(texts, plans, strict=True), 1):
        assert len(part) <= 2000
        assert part.startswith(f"({index}/{total})\n\n")
        assert open_fence(part) is None, f"part {index} leaves a code fence open"
        body = part.removeprefix(f"({index}/{total})\n\n")
        if plan.reopen:
            body = body.removeprefix(plan.reopen + "\n")
        if plan.close:
            body = body.removesuffix("\n" + plan.close)
        bodies.append(body)
    rebuilt = ""
    for body, plan in zip(bodies, plans, strict=True):
        gap = answer[len(rebuilt) : plan.start]
        assert gap.strip() == ""
        rebuilt += gap + body
    assert rebuilt == answer
    assert "".join(answer.split()) == "".join("".join(bodies).split())
