"""Splitting a long answer into reply parts that each fit a platform's message limit.

Theory of operation: the text is read as lines, and fenced code blocks (a line of three or
more backticks or tildes, optionally indented, closed by a line of at least as many of the same
character) are found the way CommonMark finds them. Each part is then filled greedily from where
the previous one ended, and ends at the furthest cut that still fits, preferring, in order:

1. a paragraph boundary outside code (next to a blank line, or just before a code block or just
   after one);
2. any line boundary outside code;
3. a line boundary inside a code block, which happens only when a part *starts* with a code
   block that is longer than a whole part (any shorter block moves whole to the next part). The
   part then ends with a closing fence line, and the next part begins with the block's opening
   line again (same indentation and info string), so every part is valid markdown on its own;
4. a hard cut inside a line (a line longer than a whole part; after a space or a CJK punctuation
   mark when one is in the second half of the window).

Whitespace at a cut (blank lines, trailing spaces) is dropped. When the text is split, each part
starts with its number on a line of its own, ``(2/5)`` followed by a blank line, so it never
disturbs a heading or a fence on the part's first line. ``max_chars`` bounds every part, number
and added fences included.

A fence line longer than a quarter of the space in a part is not treated as a fence (repeating
it in every part would not fit); such lines are vanishingly rare in model output.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Final

__all__ = ["MIN_MAX_CHARS", "PartPlan", "plan_parts", "split_text"]

MIN_MAX_CHARS: Final = 64
"""The smallest ``max_chars`` accepted: room for a number, a repeated fence and some text."""

_FENCE = re.compile(r"([ \t]*)(`{3,}|~{3,})(.*)")
_BREAK_AFTER: Final = frozenset("。！？；，、")
_TEXT, _OPEN, _CODE, _CLOSE = range(4)
_PARAGRAPH, _LINE, _CODE_LINE = 3, 2, 1


@dataclass(frozen=True, slots=True)
class PartPlan:
    """One part of a split text: a slice of the original plus what was added around it.

    Attributes:
        start: where the part's slice of the original text starts.
        end: where it ends (exclusive).
        prefix: the numbering put in front (``"(2/5)\\n\\n"``), empty when not split.
        reopen: a fence line put before the slice (a code block continues from the previous
            part), or empty.
        close: a fence line put after the slice (the code block continues in the next part), or
            empty.
    """

    start: int
    end: int
    prefix: str = ""
    reopen: str = ""
    close: str = ""

    def render(self, text: str) -> str:
        """The part as sent, given the original ``text``."""
        head = f"{self.reopen}\n" if self.reopen else ""
        tail = f"\n{self.close}" if self.close else ""
        return f"{self.prefix}{head}{text[self.start : self.end]}{tail}"


@dataclass(frozen=True, slots=True)
class _Fence:
    opening: str  # the opening line as written (without its line break)
    closing: str  # indentation + fence characters


_MIDFENCE = _Fence("", "")  # marks a position inside a fence line, where no cut is allowed


class _Doc:
    """The text's lines, their roles, and the lengths of candidate parts."""

    def __init__(self, text: str, max_fence: int) -> None:
        self.text = text
        self.size = len(text)
        self.starts: list[int] = []
        self.roles: list[int] = []
        self.fences: list[_Fence | None] = []
        self.blank: list[bool] = []
        self._read_lines(max_fence)
        # rstrip[i]: where text[:i] ends once trailing whitespace is removed
        self.rstrip = [0] * (self.size + 1)
        for i, ch in enumerate(text, 1):
            self.rstrip[i] = self.rstrip[i - 1] if ch.isspace() else i
        self.cuts: list[tuple[int, int]] = self._line_cuts()
        self.cut_positions = [pos for pos, _ in self.cuts]

    def _read_lines(self, max_fence: int) -> None:
        pos = 0
        fence: _Fence | None = None
        fence_char, fence_len = "", 0
        for raw in self.text.split("\n"):
            line = raw.rstrip()
            match = _FENCE.fullmatch(line) if len(line) <= max_fence else None
            role = _TEXT if fence is None else _CODE
            if match is not None:
                indent, marks, info = match.groups()
                if fence is None and not (marks[0] == "`" and "`" in info):
                    fence = _Fence(line, indent + marks)
                    fence_char, fence_len = marks[0], len(marks)
                    role = _OPEN
                elif (
                    fence is not None
                    and marks[0] == fence_char
                    and len(marks) >= fence_len
                    and not info.strip()
                ):
                    role = _CLOSE
            self.starts.append(pos)
            self.roles.append(role)
            self.fences.append(fence)
            self.blank.append(role in (_TEXT, _CODE) and not line)
            if role == _CLOSE:
                fence = None
            pos += len(raw) + 1

    def _line_cuts(self) -> list[tuple[int, int]]:
        """Every line start where a part may end, with its rank."""
        cuts: list[tuple[int, int]] = []
        roles, blank = self.roles, self.blank
        for i in range(1, len(self.starts)):
            pos = self.starts[i]
            if pos >= self.size:
                break
            role, before = roles[i], roles[i - 1]
            if role in (_TEXT, _OPEN):
                paragraph = (
                    blank[i]
                    or role == _OPEN
                    or before == _CLOSE
                    or (before == _TEXT and blank[i - 1])
                )
                cuts.append((pos, _PARAGRAPH if paragraph else _LINE))
            elif role == _CODE and before != _OPEN:
                cuts.append((pos, _CODE_LINE))
        return cuts

    def fence_at(self, pos: int) -> _Fence | None:
        """The code block a cut at ``pos`` is inside, ``None`` outside, or ``_MIDFENCE``."""
        i = bisect_right(self.starts, pos) - 1
        role = self.roles[i]
        if pos == self.starts[i]:
            return self.fences[i] if role in (_CODE, _CLOSE) else None
        if role == _CODE:
            return self.fences[i]
        return _MIDFENCE if role in (_OPEN, _CLOSE) else None

    def content_start(self, start: int) -> int:
        """Where a part beginning at ``start`` really starts: leading blank lines dropped."""
        i = bisect_right(self.starts, start) - 1
        if self.starts[i] != start:
            return start
        while i < len(self.starts) and self.blank[i]:
            i += 1
        return self.starts[i] if i < len(self.starts) else self.size

    def plan(self, start: int, end: int) -> PartPlan:
        """The part from ``start`` to ``end`` (cut positions), whitespace at both ends dropped."""
        begin = self.content_start(start)
        stop = max(self.rstrip[end], begin)
        opened = self.fence_at(start)
        closed = self.fence_at(end) if end < self.size else None
        return PartPlan(
            begin,
            stop,
            reopen=opened.opening if opened else "",
            close=closed.closing if closed else "",
        )

    def length(self, start: int, end: int) -> int:
        """How long the part from ``start`` to ``end`` is once rendered (without a number)."""
        part = self.plan(start, end)
        extra = (len(part.reopen) + 1 if part.reopen else 0) + (
            len(part.close) + 1 if part.close else 0
        )
        return part.end - part.start + extra

    def best_cut(self, start: int, budget: int) -> int:
        """The end of the part beginning at ``start`` (see the module docstring)."""
        begin = self.content_start(start)
        best: dict[int, int] = {}
        for j in range(bisect_right(self.cut_positions, start), len(self.cuts)):
            pos, rank = self.cuts[j]
            if self.rstrip[pos] - begin > budget:  # no later cut can fit either
                break
            if self.length(start, pos) <= budget:
                for r in range(_CODE_LINE, rank + 1):
                    best[r] = pos
        for rank in (_PARAGRAPH, _LINE, _CODE_LINE):
            if rank in best:
                return best[rank]
        return self.hard_cut(start, begin, budget)

    def hard_cut(self, start: int, begin: int, budget: int) -> int:
        """The furthest position inside a line where the part still fits."""
        end = min(self.size - 1, begin + budget)
        while end > start + 1 and (
            self.fence_at(end) is _MIDFENCE or self.length(start, end) > budget
        ):
            end -= 1
        floor = begin + (end - begin) // 2
        for pos in range(end - 1, max(floor, start), -1):
            ch = self.text[pos]
            if (
                (ch.isspace() or ch in _BREAK_AFTER)
                and self.fence_at(pos + 1) is not _MIDFENCE
                and self.length(start, pos + 1) <= budget
            ):
                return pos + 1
        return end


def _plan(text: str, budget: int) -> list[PartPlan]:
    doc = _Doc(text, max_fence=budget // 4)
    parts: list[PartPlan] = []
    start = 0
    while start < doc.size:
        end = doc.size if doc.length(start, doc.size) <= budget else doc.best_cut(start, budget)
        part = doc.plan(start, end)
        if part.end > part.start:
            parts.append(part)
        start = end
    return parts


def plan_parts(text: str, max_chars: int) -> list[PartPlan]:
    """Plan how ``text`` is split into parts of at most ``max_chars`` characters.

    Args:
        text: the answer (markdown or plain text).
        max_chars: the platform's limit per message, numbering and added fences included.

    Returns:
        The parts in order. A text that fits is one part holding it unchanged; a text that is
        all whitespace is one empty part.

    Raises:
        ValueError: ``max_chars`` is below :data:`MIN_MAX_CHARS`.
    """
    if max_chars < MIN_MAX_CHARS:
        raise ValueError(f"max_chars must be at least {MIN_MAX_CHARS}")
    if len(text) <= max_chars:
        return [PartPlan(0, len(text))]
    digits = 1
    while True:
        budget = max_chars - len(_number(10**digits - 1, 10**digits - 1))
        parts = _plan(text, budget)
        if len(str(len(parts))) <= digits:
            break
        digits = len(str(len(parts)))
    if len(parts) <= 1:
        return parts or [PartPlan(0, 0)]
    total = len(parts)
    return [
        PartPlan(p.start, p.end, _number(i, total), p.reopen, p.close)
        for i, p in enumerate(parts, 1)
    ]


def _number(index: int, total: int) -> str:
    return f"({index}/{total})\n\n"


def split_text(text: str, max_chars: int) -> list[str]:
    """Split ``text`` into numbered parts of at most ``max_chars`` characters each.

    See the module docstring for where cuts go and how code blocks are kept valid.

    Args:
        text: the answer (markdown or plain text).
        max_chars: the platform's limit per message, numbering and added fences included.

    Returns:
        ``[text]`` when it fits; otherwise the parts, each starting with ``(i/n)`` and a blank
        line.

    Raises:
        ValueError: ``max_chars`` is below :data:`MIN_MAX_CHARS`.
    """
    return [part.render(text) for part in plan_parts(text, max_chars)]
