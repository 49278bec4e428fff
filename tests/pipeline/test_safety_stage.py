"""The safety stages: words and PII on the user's message, words and restore on the answer."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from imrelay.message import Attachment, OutboundReply
from imrelay.observability.metrics import Metrics
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.pipeline.format import FormatStage
from imrelay.pipeline.safety import (
    BLOCKED,
    InboundSafetyStage,
    MemoryVaultStore,
    OutboundSafetyStage,
    build_safety_stages,
    vault_key,
)
from imrelay.security.pii import PIIMasker, PIISettings
from imrelay.security.words import CategoryAction, WordFilter, WordsSettings

ContextFactory = Callable[..., TurnContext]
SampleReader = Callable[..., float]

TERMS = "[politics]\n敏感词\n[abuse]\n傻瓜\n[watch]\n比特币\n"
PHONE = "13812345678"
PLATFORM = "dingtalk"


@pytest.fixture
def words(tmp_path: Path) -> WordFilter:
    """politics: block / withhold; abuse: mask / mask; watch: flag / mask."""
    path = tmp_path / "terms.txt"
    path.write_text(TERMS, encoding="utf-8")
    return WordFilter(
        WordsSettings(
            files=[path],
            categories={
                "abuse": CategoryAction(inbound="mask", outbound="mask"),
                "watch": CategoryAction(inbound="flag", outbound="mask"),
            },
            block_notice="blocked!",
            withhold_notice="withheld!",
        )
    )


@pytest.fixture
def pii() -> PIIMasker:
    """Irreversible masking of every type."""
    return PIIMasker(PIISettings())


@pytest.fixture
def reversible() -> PIIMasker:
    """Reversible masking of every type."""
    return PIIMasker(PIISettings(reversible=True))


def reply(text: str, **fields: object) -> OutboundReply:
    """A formatted reply part."""
    return OutboundReply(text=text, **fields)  # type: ignore[arg-type]


# -- inbound ----------------------------------------------------------------------------------


async def test_safety_blocks_message_with_block_category(
    words: WordFilter, pii: PIIMasker, metrics: Metrics, make_ctx: ContextFactory,
    sample: SampleReader, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A disguised blocked term stops the message with the block notice and counts the match."""
    stage = InboundSafetyStage(words, pii, metrics=metrics)
    ctx = make_ctx(text="这是敏 感\u200b词，电话13812345678")
    with caplog.at_level(logging.WARNING, logger="tests.pipeline"):
        outcome = await stage(ctx)
    assert outcome == Drop(BLOCKED, notice="blocked!")
    assert "politics" in caplog.text
    assert "敏" not in caplog.text
    labels = {"category": "politics", "direction": "inbound", "action": "block"}
    assert sample("imrelay_sensitive_matches_total", **labels) == 1


async def test_safety_masks_words_and_pii_into_the_message(
    words: WordFilter, pii: PIIMasker, metrics: Metrics, make_ctx: ContextFactory,
    sample: SampleReader,
) -> None:  # fmt: skip
    """Mask categories and personal data are replaced; the message copy carries the result."""
    stage = InboundSafetyStage(words, pii, metrics=metrics)
    ctx = make_ctx(text=f"你个傻 瓜，电话{PHONE}，邮箱a@b.cn")
    original = ctx.message
    outcome = await stage(ctx)
    assert outcome is ctx
    assert ctx.message.text == "你个＊＊＊，电话[PHONE]，邮箱[EMAIL]"
    assert ctx.message == dataclasses.replace(original, text=ctx.message.text)
    assert original.text.endswith("a@b.cn")  # the inbound message itself is untouched
    assert ctx.user_content is None
    assert ctx.text_masked  # the audit record hashes it as it is
    assert sample("imrelay_pii_masked_total", type="mobile") == 1
    assert sample("imrelay_pii_masked_total", type="email") == 1
    assert (
        sample(
            "imrelay_sensitive_matches_total", category="abuse", direction="inbound", action="mask"
        )
        == 1
    )


async def test_safety_flags_without_changing_the_text(
    words: WordFilter, metrics: Metrics, make_ctx: ContextFactory, sample: SampleReader,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A flag category lets the message through unchanged, with a warning and a count."""
    stage = InboundSafetyStage(words, None, metrics=metrics)
    ctx = make_ctx(text="比特币怎么买")
    original = ctx.message
    with caplog.at_level(logging.WARNING, logger="tests.pipeline"):
        assert await stage(ctx) is ctx
    assert ctx.message is original
    assert not ctx.text_masked  # words only: personal data still to be masked
    assert "flagged: watch" in caplog.text
    assert (
        sample(
            "imrelay_sensitive_matches_total", category="watch", direction="inbound", action="flag"
        )
        == 1
    )


async def test_safety_clean_message_passes_untouched(
    words: WordFilter, pii: PIIMasker, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """Nothing found: the same message object goes on."""
    stage = InboundSafetyStage(words, pii, metrics=metrics)
    ctx = make_ctx(text="今天天气怎么样")
    original = ctx.message
    assert await stage(ctx) is ctx
    assert ctx.message is original
    assert ctx.text_masked  # searched for personal data: nothing to mask again


async def test_safety_without_words_or_pii_is_a_no_op(
    metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """With neither filter (or PII disabled), the stage passes everything through."""
    off = PIIMasker(PIISettings(enabled=False))
    stage = InboundSafetyStage(None, off, metrics=metrics)
    assert stage.pii is None
    ctx = make_ctx(text=f"敏感词 {PHONE}")
    original = ctx.message
    assert await stage(ctx) is ctx
    assert ctx.message is original
    assert not ctx.text_masked


async def test_safety_masks_attachment_texts_and_user_content(
    pii: PIIMasker, words: WordFilter, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """Speech recognition of attachments and text parts of the model content are masked too."""
    stage = InboundSafetyStage(words, pii, metrics=metrics)
    audio = Attachment(kind="audio", download_code="dc1", text=f"我的号码是{PHONE}")
    image = Attachment(kind="image", download_code="dc2")
    ctx = make_ctx(kind="audio", text="", attachments=(audio, image))
    image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    ctx.user_content = [
        {"type": "text", "text": f"傻瓜 {PHONE}"},
        image_part,
        {"type": "text", "text": "no pii"},
        {"type": "text", "text": 7},
    ]
    assert await stage(ctx) is ctx
    assert [a.text for a in ctx.message.attachments] == ["我的号码是[PHONE]", ""]
    assert ctx.message.attachments[1] == image
    assert ctx.user_content == [
        {"type": "text", "text": "＊＊ [PHONE]"},
        image_part,
        {"type": "text", "text": "no pii"},
        {"type": "text", "text": 7},
    ]


async def test_safety_rich_text_segments_masked_but_counted_once(
    pii: PIIMasker,
    words: WordFilter,
    metrics: Metrics,
    make_ctx: ContextFactory,
    sample: SampleReader,
) -> None:
    """A rich-text message with a picture repeats its text items as ``text`` attachments (for
    the media stage's order): both copies are masked, each finding is counted once."""
    text = f"傻瓜 {PHONE}"
    segments = (
        Attachment(kind="text", download_code="", text=text),
        Attachment(kind="image", download_code="dc1"),
    )
    ctx = make_ctx(kind="rich", text=text, attachments=segments)
    stage = InboundSafetyStage(words, pii, metrics=metrics)
    assert await stage(ctx) is ctx
    assert ctx.message.text == "＊＊ [PHONE]"
    assert ctx.message.attachments[0].text == "＊＊ [PHONE]"
    assert sample("imrelay_pii_masked_total", type="mobile") == 1
    assert (
        sample(
            "imrelay_sensitive_matches_total", category="abuse", direction="inbound", action="mask"
        )
        == 1
    )


async def test_safety_masks_string_user_content(
    pii: PIIMasker, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """A plain-string model content is masked as a whole."""
    stage = InboundSafetyStage(None, pii, metrics=metrics)
    ctx = make_ctx(text="hi")
    ctx.user_content = f"call {PHONE}"
    await stage(ctx)
    assert ctx.user_content == "call [PHONE]"


async def test_safety_blocks_on_a_term_in_user_content(
    words: WordFilter, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """A blocked term anywhere the model would read it blocks the message."""
    stage = InboundSafetyStage(words, None, metrics=metrics)
    ctx = make_ctx(text="看图")
    ctx.user_content = [{"type": "text", "text": "敏感词"}]
    outcome = await stage(ctx)
    assert isinstance(outcome, Drop)
    assert outcome.reason == BLOCKED


async def test_safety_ignores_unknown_user_content(
    pii: PIIMasker, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """Content that is neither a string nor a list of parts is left alone."""
    stage = InboundSafetyStage(None, pii, metrics=metrics)
    ctx = make_ctx(text=PHONE)
    ctx.user_content = {"unexpected": PHONE}
    await stage(ctx)
    assert ctx.user_content == {"unexpected": PHONE}
    assert ctx.message.text == "[PHONE]"


async def test_safety_reversible_saves_the_vault_once_per_change(
    reversible: PIIMasker, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """New values are saved to the sender's vault; a message adding none does not save."""
    vaults = CountingVaults()
    stage = InboundSafetyStage(None, reversible, metrics=metrics, vaults=vaults)
    ctx = make_ctx(text=f"电话{PHONE}")
    await stage(ctx)
    assert ctx.message.text == "电话<PHONE_1>"
    key = vault_key(ctx.message)
    assert key == "dingtalk:cid-1:staff-1"
    assert await vaults.load_vault(key) == {"<PHONE_1>": PHONE}
    assert vaults.saves == 1
    again = make_ctx("m2", text=f"还是{PHONE}")
    await stage(again)
    assert again.message.text == "还是<PHONE_1>"
    assert vaults.saves == 1


def test_safety_reversible_needs_a_vault_store(reversible: PIIMasker, metrics: Metrics) -> None:
    """Reversible masking without a vault store is a wiring error."""
    with pytest.raises(ValueError, match="vault"):
        InboundSafetyStage(None, reversible, metrics=metrics)
    with pytest.raises(ValueError, match="vault"):
        OutboundSafetyStage(None, reversible, metrics=metrics)


# -- outbound ---------------------------------------------------------------------------------


async def test_post_safety_withholds_answer(
    words: WordFilter, metrics: Metrics, make_ctx: ContextFactory, sample: SampleReader,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A withhold category replaces the whole answer (formatted into parts afterwards) with
    the notice."""
    stage = OutboundSafetyStage(words, None, metrics=metrics)
    ctx = make_ctx()
    ctx.answer = "关于敏感词的详细说明"
    with caplog.at_level(logging.WARNING, logger="tests.pipeline"):
        assert await stage(ctx) is ctx
    assert "answer withheld" in caplog.text
    assert ctx.answer == "withheld!"
    await FormatStage(markdown={PLATFORM: True})(ctx)
    assert ctx.replies == [
        reply("withheld!", markdown=True, title="withheld!", mention_sender=True)
    ]
    assert sample(
        "imrelay_sensitive_matches_total",
        category="politics", direction="outbound", action="withhold",
    ) == 1  # fmt: skip


async def test_post_safety_withhold_before_format_sets_only_the_answer(
    words: WordFilter, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """Without reply parts yet, the notice becomes the answer the format stage will use."""
    stage = OutboundSafetyStage(words, None, metrics=metrics)
    ctx = make_ctx()
    ctx.answer = "敏感词"
    await stage(ctx)
    assert ctx.answer == "withheld!"
    assert ctx.replies == []


async def test_post_safety_masks_answer_before_it_is_split(
    words: WordFilter, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """Mask categories are masked in the whole answer, so a term a split would cut in two
    (here across a paragraph break, which the word scan ignores) is masked all the same;
    the parts and their title come from the masked answer."""
    stage = OutboundSafetyStage(words, None, metrics=metrics)
    ctx = make_ctx()
    ctx.answer = "傻瓜才买比特\n\n币。结束"
    await stage(ctx)
    assert ctx.answer == "＊＊才买＊＊＊＊＊。结束"  # the break inside the term is masked too
    await FormatStage(markdown={PLATFORM: True}, max_chars={PLATFORM: 200})(ctx)
    assert [r.text for r in ctx.replies] == ["＊＊才买＊＊＊＊＊。结束"]


async def test_post_safety_clean_answer_untouched(
    words: WordFilter, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """An answer without terms keeps its parts as they are."""
    stage = OutboundSafetyStage(words, None, metrics=metrics)
    ctx = make_ctx()
    ctx.answer = "你好"
    parts = [reply("你好")]
    ctx.replies = parts
    await stage(ctx)
    assert ctx.replies is parts


async def test_post_safety_restores_values_for_the_same_sender_only(
    reversible: PIIMasker, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """The asker sees their values; the answer kept for history keeps the placeholders."""
    inbound, outbound = build_safety_stages(None, reversible, metrics=metrics)
    ctx = make_ctx(text=f"记住我的电话{PHONE}")
    await inbound(ctx)
    ctx.answer = "好的，已记住 <PHONE_1>。"
    await outbound(ctx)
    assert ctx.shown_answer == f"好的，已记住 {PHONE}。"
    assert ctx.answer == "好的，已记住 <PHONE_1>。"
    await FormatStage(markdown={PLATFORM: False})(ctx)
    assert [r.text for r in ctx.replies] == [f"好的，已记住 {PHONE}。"]
    other = make_ctx("m2", sender_id="staff-2")
    other.answer = "他的电话是 <PHONE_1>"
    await outbound(other)
    assert other.shown_answer is None


async def test_post_safety_without_replies_or_restore_does_nothing(
    reversible: PIIMasker, pii: PIIMasker, metrics: Metrics, make_ctx: ContextFactory
) -> None:
    """No parts to restore into, or irreversible masking: the context is returned as is."""
    _, outbound = build_safety_stages(None, reversible, metrics=metrics)
    ctx = make_ctx()
    ctx.answer = "<PHONE_1>"
    assert await outbound(ctx) is ctx
    assert ctx.replies == []
    plain = OutboundSafetyStage(None, pii, metrics=metrics, vaults=MemoryVaultStore())
    assert plain.vaults is None
    ctx.replies = [reply("<PHONE_1>")]
    await plain(ctx)
    assert ctx.replies == [reply("<PHONE_1>")]


async def test_post_safety_view_of_a_streamed_snapshot(
    words: WordFilter, reversible: PIIMasker, metrics: Metrics, make_ctx: ContextFactory,
    sample: SampleReader,
) -> None:  # fmt: skip
    """A snapshot is withheld, masked and restored like a whole answer, without counting."""
    inbound, outbound = build_safety_stages(words, reversible, metrics=metrics)
    ctx = make_ctx(text=f"号码{PHONE}")
    await inbound(ctx)
    assert await outbound.view(ctx, "傻瓜，<PHONE_1> 和 <PHO") == f"＊＊，{PHONE} 和 <PHO"
    assert await outbound.view(ctx, "谈谈敏感词") == "withheld!"
    plain = OutboundSafetyStage(None, None, metrics=metrics)
    assert await plain.view(ctx, "<PHONE_1> 傻瓜") == "<PHONE_1> 傻瓜"
    assert (
        sample(
            "imrelay_sensitive_matches_total",
            category="abuse",
            direction="outbound",
            action="mask",
        )
        == 0
    )


def test_build_safety_stages_share_one_vault_store(
    reversible: PIIMasker, pii: PIIMasker, metrics: Metrics
) -> None:
    """Both stages get the same store; irreversible masking needs none."""
    inbound, outbound = build_safety_stages(None, reversible, metrics=metrics)
    assert inbound.vaults is not None
    assert inbound.vaults is outbound.vaults
    given = MemoryVaultStore()
    inbound, outbound = build_safety_stages(None, reversible, metrics=metrics, vaults=given)
    assert inbound.vaults is given
    assert outbound.vaults is given
    inbound, outbound = build_safety_stages(None, pii, metrics=metrics)
    assert inbound.vaults is None
    assert outbound.vaults is None
    assert (inbound.name, outbound.name) == ("safety", "post_safety")


# -- vault store ------------------------------------------------------------------------------


class CountingVaults(MemoryVaultStore):
    """A memory vault store that counts saves."""

    def __init__(self) -> None:
        super().__init__()
        self.saves = 0

    async def save_vault(self, key: str, vault: dict[str, str]) -> None:
        self.saves += 1
        await super().save_vault(key, vault)


async def test_memory_vaults_copy_expire_and_evict() -> None:
    """Loads are copies; a vault expires ttl after its last save; the oldest key is evicted."""
    now = [0.0]
    store = MemoryVaultStore(ttl_s=10, max_keys=2, clock=lambda: now[0])
    assert await store.load_vault("a") == {}
    await store.save_vault("a", {"<PHONE_1>": "1"})
    loaded = await store.load_vault("a")
    loaded["<PHONE_2>"] = "2"
    assert await store.load_vault("a") == {"<PHONE_1>": "1"}
    now[0] = 11
    assert await store.load_vault("a") == {}
    await store.save_vault("a", {"x": "1"})
    await store.save_vault("b", {"x": "2"})
    await store.save_vault("a", {"x": "3"})
    await store.save_vault("c", {"x": "4"})
    assert await store.load_vault("b") == {}
    assert await store.load_vault("a") == {"x": "3"}
    assert await store.load_vault("c") == {"x": "4"}
