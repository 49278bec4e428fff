"""Removing a model's reasoning blocks (``<think>…</think>``) from its answer.

Reasoning models (DeepSeek-R1 and its distills, QwQ, Qwen3 in thinking mode, …) put their
chain of thought in a ``<think>`` block before the answer. The user should see the answer only,
and the conversation's stored context should not carry the reasoning into later prompts (it
costs tokens, and the models are trained without it in their history).

What :func:`strip_think` removes (tag names ``think``, ``thinking``, ``thought`` and
``reasoning``, in any letter case, with or without attributes):

1. leading blocks: ``<think>…</think>`` at the start of the answer (after whitespace), one or
   more;
2. an unclosed leading block: ``<think>…`` with no closing tag (the model was cut off while
   reasoning): everything, so the answer is empty;
3. a leading block whose opening tag is missing: ``…</think>answer`` (DeepSeek-R1's chat
   template puts ``<think>`` in the prompt, so the output starts inside the block) when the
   closing tag is the first reasoning tag of the answer and no code fence comes before it;
4. complete blocks elsewhere in the answer, except inside fenced code blocks (an answer about
   HTML or prompts may show such tags as code).

With ``partial=True`` (a streamed answer shown while it is generated), an unclosed block
anywhere outside code hides everything from its opening tag on, and an answer that so far is
only the beginning of an opening tag (``<thi``) shows nothing yet.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["REASONING_TAGS", "strip_think"]

REASONING_TAGS: Final = ("think", "thinking", "thought", "reasoning")

_NAMES: Final = "|".join(REASONING_TAGS)
_OPEN: Final = re.compile(rf"<\s*({_NAMES})(?:\s[^<>]*)?>", re.IGNORECASE)
_ANY_TAG: Final = re.compile(rf"<\s*(/?)\s*({_NAMES})(?:\s[^<>]*)?>", re.IGNORECASE)
_FENCE: Final = re.compile(r"^[ \t]*(```|~~~)", re.MULTILINE)


def _close(name: str) -> re.Pattern[str]:
    return re.compile(rf"<\s*/\s*{re.escape(name)}\s*>", re.IGNORECASE)


def _is_tag_prefix(text: str) -> bool:
    """Whether ``text`` (non-empty) could still grow into an opening reasoning tag."""
    candidate = text.lower().replace(" ", "")
    return any(f"<{name}>".startswith(candidate) for name in REASONING_TAGS) or bool(
        _OPEN.match(text + ">")
    )


def _strip_leading(text: str, partial: bool) -> str:
    """``text`` without its leading blocks (unchanged, whitespace included, if it has none)."""
    rest = text.lstrip()
    removed = False
    while True:
        opening = _OPEN.match(rest)
        if opening is None:
            break
        closing = _close(opening.group(1)).search(rest, opening.end())
        if closing is None:
            return ""  # still reasoning (streaming) or cut off while reasoning
        rest = rest[closing.end() :].lstrip()
        removed = True
    if partial and rest and _is_tag_prefix(rest):
        return ""
    first = _ANY_TAG.search(rest)
    if first is not None and first.group(1) == "/" and not _FENCE.search(rest, 0, first.start()):
        rest = rest[first.end() :].lstrip()
        removed = True
    return rest if removed else text


def _strip_inner(text: str, partial: bool) -> str:
    """Remove complete blocks outside fenced code; with ``partial``, cut at an open block."""
    out: list[str] = []
    pos = 0
    in_fence = False
    fence_marker = ""
    for fence in _FENCE.finditer(text):
        if not in_fence:
            prose, cut = _strip_prose(text[pos : fence.start()], partial)
            out.append(prose)
            if cut:
                return "".join(out)
            out.append(text[fence.start() : fence.end()])
            in_fence, fence_marker = True, fence.group(1)
        else:
            out.append(text[pos : fence.end()])
            if fence.group(1) == fence_marker:
                in_fence = False
        pos = fence.end()
    if in_fence:
        out.append(text[pos:])
    else:
        prose, _ = _strip_prose(text[pos:], partial)
        out.append(prose)
    return "".join(out)


def _strip_prose(segment: str, partial: bool) -> tuple[str, bool]:
    """``segment`` without complete blocks, and whether it was cut at an unclosed one."""
    out: list[str] = []
    pos = 0
    while True:
        opening = _OPEN.search(segment, pos)
        if opening is None:
            out.append(segment[pos:])
            return "".join(out), False
        closing = _close(opening.group(1)).search(segment, opening.end())
        if closing is None:
            if partial:
                out.append(segment[pos : opening.start()])
                return "".join(out), True
            out.append(segment[pos:])
            return "".join(out), False
        out.append(segment[pos : opening.start()])
        pos = closing.end()


def strip_think(text: str, *, partial: bool = False) -> str:
    """``text`` without reasoning blocks (see the module docstring).

    Args:
        text: a model's answer (or, with ``partial``, the part of it generated so far).
        partial: the answer is still being generated.

    Returns:
        The answer as the user should see it; ``text`` itself when it holds no reasoning tag.
    """
    if "<" not in text:
        return text
    if not partial and _ANY_TAG.search(text) is None:
        return text
    return _strip_inner(_strip_leading(text, partial), partial)
