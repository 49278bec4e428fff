"""Tests for splitting long answers (imrelay.pipeline.split) and the format stage using it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imrelay.message import OutboundReply
from imrelay.pipeline.format import FormatStage
from imrelay.pipeline.split import MIN_MAX_CHARS, PartPlan, plan_parts, split_text

NUMBER = re.compile(r"\((\d+)/(\d+)\)\n\n")
FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")


def open_fence_at_end(text: str) -> str | None:
    """The fence still open at the end of ``text`` (CommonMark rules, any indentation)."""
    opened: str | None = None
    for line in text.split("\n"):
        match = FENCE.fullmatch(line.rstrip())
        if match is None:
            continue
        marks, info = match.groups()
        if opened is None:
            if not (marks[0] == "`" and "`" in info):
                opened = marks
        elif marks[0] == opened[0] and len(marks) >= len(opened) and not info.strip():
            opened = None
    return opened


def strip_number(part: str, index: int, total: int) -> str:
    """``part`` without its ``(index/total)`` line; fails if the number is wrong."""
    match = NUMBER.match(part)
    assert match is not None, f"part {index} has no number: {part[:20]!r}"
    assert (int(match[1]), int(match[2])) == (index, total)
    return part[match.end() :]


def check_split(text: str, max_chars: int) -> list[PartPlan]:
    """Assert every documented property of splitting ``text``; return the plan."""
    plans = plan_parts(text, max_chars)
    parts = split_text(text, max_chars)
    assert parts == [p.render(text) for p in plans]
    assert all(len(p) <= max_chars for p in parts)
    if len(text) <= max_chars:
        assert parts == [text]
        return plans
    total = len(parts)
    position = 0
    for index, (part, plan) in enumerate(zip(parts, plans, strict=True), 1):
        body = strip_number(part, index, total) if total > 1 else part
        if plan.reopen:
            assert body.startswith(plan.reopen + "\n")
            assert FENCE.fullmatch(plan.reopen.rstrip())
            body = body[len(plan.reopen) + 1 :]
        if plan.close:
            assert body.endswith("\n" + plan.close)
            assert FENCE.fullmatch(plan.close)
            body = body[: -len(plan.close) - 1]
        assert body == text[plan.start : plan.end]
        assert body.strip(), "an empty part was produced"
        assert text[position : plan.start].strip() == "", "non-whitespace text was lost"
        position = plan.end
    assert text[position:].strip() == ""
    return plans


def check_fences(text: str, parts: list[str]) -> None:
    """Every part's fences are balanced, except where the text itself leaves one open."""
    for i, part in enumerate(parts):
        if i == len(parts) - 1 and open_fence_at_end(text) is not None:
            continue
        assert open_fence_at_end(part) is None, f"part {i + 1} leaves a code fence open"


def code_block(lines: int, *, info: str = "python", fence: str = "```", width: int = 30) -> str:
    body = "\n".join(f"value_{i} = {i:0{width - 12}d}" for i in range(lines))
    return f"{fence}{info}\n{body}\n{fence}"


# -- split_text ---------------------------------------------------------------------------


def test_split_short_text_unchanged() -> None:
    """A text within the limit is one part, unchanged and unnumbered (whitespace included)."""
    assert split_text("  hello\n\n", 100) == ["  hello\n\n"]


def test_split_exactly_at_limit_is_one_part() -> None:
    """A text of exactly ``max_chars`` characters is not split; one more character splits it."""
    text = "x" * 100
    assert split_text(text, 100) == [text]
    parts = split_text(text + "y", 100)
    assert len(parts) == 2
    check_split(text + "y", 100)


def test_split_paragraph_boundaries_preferred() -> None:
    """Parts end at blank lines when one fits, even when a line boundary would fit more."""
    paragraphs = [("word " * 12).strip() for _ in range(6)]
    text = "\n\n".join(paragraphs)
    parts = split_text(text, 160)
    assert len(parts) > 1
    for i, part in enumerate(parts, 1):
        body = strip_number(part, i, len(parts))
        assert all(chunk in paragraphs for chunk in body.split("\n\n"))
    check_split(text, 160)


def test_split_line_boundaries_when_no_paragraph_fits() -> None:
    """A paragraph longer than a part is cut between its lines, never inside one."""
    lines = [f"line {i:03d} of a long paragraph" for i in range(20)]
    text = "\n".join(lines)
    parts = split_text(text, 150)
    assert len(parts) > 1
    for i, part in enumerate(parts, 1):
        assert all(line in lines for line in strip_number(part, i, len(parts)).split("\n"))
    check_split(text, 150)


def test_split_hard_cut_prefers_spaces() -> None:
    """A single line longer than a part is cut after a space when there is one."""
    text = " ".join(f"w{i:04d}" for i in range(100))
    parts = split_text(text, 100)
    for i, part in enumerate(parts, 1):
        words = strip_number(part, i, len(parts)).split(" ")
        assert all(re.fullmatch(r"w\d{4}", w) for w in words), words
    check_split(text, 100)


def test_split_cjk_text_without_spaces() -> None:
    """CJK text is cut after its punctuation, or hard when a run has none."""
    sentence = "这是一个很长的中文句子，用来测试拆分。"
    text = sentence * 40
    parts = split_text(text, 120)
    assert len(parts) > 1
    for i, part in enumerate(parts[:-1], 1):
        assert strip_number(part, i, len(parts))[-1] in "，。"
    check_split(text, 120)
    solid = "字" * 500
    assert "".join(strip_number(p, i, 5) for i, p in enumerate(split_text(solid, 120), 1))
    check_split(solid, 120)


def test_split_numbering_format_and_digits() -> None:
    """Parts are numbered ``(i/n)`` on their own line; two-digit totals still fit."""
    text = "\n\n".join(f"paragraph {i:02d} " + "x" * 50 for i in range(40))
    parts = split_text(text, 80)
    assert len(parts) >= 10
    assert parts[0].startswith(f"(1/{len(parts)})\n\n")
    assert parts[-1].startswith(f"({len(parts)}/{len(parts)})\n\n")
    check_split(text, 80)


def test_split_code_block_moves_whole_to_next_part() -> None:
    """A code block that fits in a part is never cut: it starts the next part instead."""
    block = code_block(5)
    text = "intro " * 20 + "\n\n" + block + "\n\nafter"
    parts = split_text(text, 250)
    assert len(parts) == 2
    assert block in parts[1]
    check_fences(text, parts)
    check_split(text, 250)


def test_split_long_code_block_closed_and_reopened() -> None:
    """A block longer than a part is closed at each cut and reopened with its info string."""
    block = code_block(40, info="python title='a.py'")
    text = "Here is the code:\n\n" + block + "\n\nDone."
    plans = check_split(text, 300)
    parts = split_text(text, 300)
    assert len(parts) > 3
    check_fences(text, parts)
    inside = [p for p in plans if p.reopen]
    assert inside
    assert all(p.reopen == "```python title='a.py'" for p in inside)
    assert all(p.close == "```" for p in plans if p.close)
    assert parts[0].endswith("Here is the code:")  # the block starts a part of its own


def test_split_tilde_and_long_fences_keep_their_marks() -> None:
    """A ``~~~~`` block is closed with ``~~~~``; a ``` line inside it is just code."""
    body = "\n".join(["```not a fence here", *(f"row {i:03d} " + "." * 20 for i in range(30))])
    text = f"  ~~~~text\n{body}\n  ~~~~"
    plans = check_split(text, 200)
    assert [p.close for p in plans[:-1]] == ["  ~~~~"] * (len(plans) - 1)
    assert all(p.reopen == "  ~~~~text" for p in plans[1:])
    check_fences(text, split_text(text, 200))


def test_split_code_line_longer_than_a_part() -> None:
    """A single code line longer than a part is hard-cut, each piece in its own fences."""
    text = "```\n" + "x" * 500 + "\n```"
    parts = split_text(text, 100)
    check_fences(text, parts)
    check_split(text, 100)
    assert all("```\n" in p for p in parts)


def test_split_unclosed_fence_stays_faithful() -> None:
    """A text ending inside a code block: earlier parts are closed, the last is left as is."""
    text = "```js\n" + "\n".join(f"let v{i} = {i};" for i in range(60))
    plans = check_split(text, 150)
    assert plans[-1].close == ""
    assert all(p.close == "```" for p in plans[:-1])
    check_fences(text, split_text(text, 150))


def test_split_whitespace_between_parts_dropped() -> None:
    """Blank lines at a cut do not start or end a part."""
    text = ("a" * 50 + "\n\n\n\n") * 6
    for i, part in enumerate(parts := split_text(text, 80), 1):
        body = strip_number(part, i, len(parts))
        assert body == body.strip()
    check_split(text, 80)


def test_split_only_whitespace_is_one_empty_part() -> None:
    """A text of only whitespace longer than the limit becomes a single empty part."""
    assert split_text(" \n" * 100, 64) == [""]


def test_split_single_part_after_trimming_is_unnumbered() -> None:
    """A text over the limit only by trailing whitespace is one trimmed, unnumbered part."""
    assert split_text("hello" + " " * 100, 64) == ["hello"]


def test_split_refuses_tiny_limits() -> None:
    """``max_chars`` below the minimum is an error."""
    with pytest.raises(ValueError, match="at least"):
        split_text("x", MIN_MAX_CHARS - 1)


def test_split_fence_line_too_long_is_text() -> None:
    """A fence line longer than a quarter of a part is not repeated (treated as text)."""
    info = "i" * 40
    text = f"```{info}\n" + "\n".join("code line" for _ in range(30)) + "\n```"
    plans = check_split(text, 100)
    assert all(not p.reopen for p in plans)


def test_split_twenty_thousand_characters_with_code() -> None:
    """A 20,000-character markdown answer splits in order with balanced fences."""
    chunks = []
    for i in range(40):
        chunks.append(f"## Section {i}\n\n" + "Some explanation. " * 12)
        chunks.append(code_block(8 if i % 7 else 60, info="python"))
    text = "\n\n".join(chunks)[:20_000]
    parts = split_text(text, 2000)
    check_split(text, 2000)
    check_fences(text, parts)


# -- properties -----------------------------------------------------------------------------

PIECES = st.sampled_from(
    ["\n", "\n\n", " ", "  ", "```", "```py", "~~~", "\t", "中文", "。", "word", "x" * 30, "\r\n"]
)
ANY_TEXT = st.lists(st.one_of(PIECES, st.text(max_size=40)), max_size=60).map("".join)

WORDS = st.lists(
    st.sampled_from(["alpha", "beta", "数据", "模型。", "x" * 25, "**bold**", "`code`"]),
    min_size=1,
    max_size=25,
).map(" ".join)
PARAGRAPH = st.lists(WORDS, min_size=1, max_size=4).map("\n".join)
CODE_LINE = st.text(
    alphabet=st.characters(blacklist_characters="`~\n\r", blacklist_categories=("Cs",)),
    max_size=90,
)
CODE = st.builds(
    lambda fence, info, lines, indent: (
        f"{indent}{fence}{info}\n" + "\n".join(lines) + f"\n{indent}{fence}"
    ),
    st.sampled_from(["```", "~~~", "````"]),
    st.sampled_from(["", "python", "json", "js x=1"]),
    st.lists(CODE_LINE, max_size=40),
    st.sampled_from(["", "  "]),
)
MARKDOWN = st.lists(st.one_of(PARAGRAPH, CODE), min_size=1, max_size=12).map(
    lambda blocks: "\n\n".join(blocks)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=ANY_TEXT, max_chars=st.integers(MIN_MAX_CHARS, 300))
def test_split_property_any_text(text: str, max_chars: int) -> None:
    """For any text: parts fit, are numbered, and rebuild the text up to whitespace at cuts."""
    check_split(text, max_chars)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=MARKDOWN, max_chars=st.integers(MIN_MAX_CHARS, 400))
def test_split_property_markdown_fences_balanced(text: str, max_chars: int) -> None:
    """For markdown with code blocks: every part also has balanced fences."""
    check_split(text, max_chars)
    check_fences(text, split_text(text, max_chars))


# -- FormatStage ----------------------------------------------------------------------------


async def test_format_splits_long_answer_into_numbered_parts(
    make_ctx: Callable[..., Any],
) -> None:
    """An answer over the platform limit becomes numbered parts; only part 0 @-mentions."""
    ctx = make_ctx()
    ctx.answer = "\n\n".join(f"# Title {i}\n" + "text " * 30 for i in range(6))
    stage = FormatStage(markdown={"dingtalk": True}, max_chars={"dingtalk": 300})
    assert await stage(ctx) is ctx
    total = len(ctx.replies)
    assert total > 1
    assert [r.part for r in ctx.replies] == list(range(total))
    assert [r.mention_sender for r in ctx.replies] == [True] + [False] * (total - 1)
    assert [r.title for r in ctx.replies] == [
        f"Title 0 ({i}/{total})" for i in range(1, total + 1)
    ]
    assert [r.text for r in ctx.replies] == split_text(ctx.answer.strip(), 300)
    assert all(r.markdown for r in ctx.replies)


async def test_format_split_plain_text_has_no_title(make_ctx: Callable[..., Any]) -> None:
    """Plain-text parts carry no title, and a direct chat mentions nobody."""
    ctx = make_ctx(conv_kind="direct")
    ctx.answer = "word " * 100
    await FormatStage(markdown={"dingtalk": False}, max_chars={"dingtalk": 200})(ctx)
    assert len(ctx.replies) > 1
    assert {(r.title, r.mention_sender, r.markdown) for r in ctx.replies} == {("", False, False)}


async def test_format_within_limit_is_one_part(make_ctx: Callable[..., Any]) -> None:
    """An answer within the limit is one unnumbered part (the limit is per platform)."""
    ctx = make_ctx()
    ctx.answer = "short answer"
    await FormatStage(markdown={}, max_chars={"dingtalk": 200, "other": 64})(ctx)
    assert ctx.replies == [
        OutboundReply(
            text="short answer", markdown=True, title="short answer", mention_sender=True
        )
    ]


async def test_format_platform_without_limit_is_not_split(make_ctx: Callable[..., Any]) -> None:
    """A platform missing from ``max_chars`` gets the whole answer in one part."""
    ctx = make_ctx()
    ctx.answer = "y" * 5000
    await FormatStage(markdown={}, max_chars={"other": 100})(ctx)
    assert [r.text for r in ctx.replies] == ["y" * 5000]
