"""Sensitive words: term lists from files, matched in disguise with an Aho-Corasick automaton.

Theory of operation: every term and every scanned text are folded the same way (:func:`normalize`):
compatibility decomposition (NFKD, which includes NFKC's folding: full-width ``ｂａｄ`` is ``bad``,
``①`` is ``1``), case folding, then everything that is not a letter or a number is dropped:
spaces, punctuation, symbols, combining marks (so accents fold), zero-width and other format
characters. So ``敏 感 词``, ``敏\u200b感词``, ``B-A-D`` and ``ｂａｄ`` all read as the term.

A clean message costs one fold of the whole string (C-level ``unicodedata``, ``casefold`` and one
regex substitution) and one automaton pass. Only when something matched is the text folded again
character by character to map folded positions back to the original, so matches are spans of the
ORIGINAL text, separators included, and a mask covers exactly what the user wrote.

Terms made only of ASCII letters and digits must stand alone in the original text (no ASCII
letter or digit right before or after), so ``ass`` does not match ``class``; and they match
across visible separators only when spelled out one character at a time (``b a d``, ``b.a.d``),
so ``is a`` does not match ``isa``. Terms in other scripts (Chinese) match anywhere, as Chinese
has no spaces between words.

Files (UTF-8, one term per line): blank lines and lines starting with ``#`` are skipped; a line
``[name]`` starts category ``name``; terms before the first header belong to the category named
after the file (``politics.txt`` → ``politics``). A term therefore cannot start with ``#`` nor be
written in brackets. Files are re-read when their modification time or size changes, checked at
most every ``reload_interval_s`` seconds during a scan (no thread); a file that cannot be read on
reload is logged and the previous lists stay in force.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import os
import re
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ahocorasick
from pydantic import BaseModel, ConfigDict, Field

from imrelay.errors import ConfigError

__all__ = [
    "CategoryAction",
    "InboundAction",
    "Match",
    "OutboundAction",
    "WordFilter",
    "WordsSettings",
    "load_terms",
    "normalize",
]

logger = logging.getLogger(__name__)

InboundAction = Literal["block", "mask", "flag"]
OutboundAction = Literal["mask", "withhold"]

# After NFKD and case folding, everything but letters and numbers goes (``\W`` and ``_``).
_DROP = re.compile(r"[\W_]+")
# Dropped characters that do not separate words (zero-width, soft hyphen, combining marks).
_INVISIBLE = frozenset({"Cf", "Mn", "Me"})


class CategoryAction(BaseModel):
    """What happens when a term of one category is found.

    Attributes:
        inbound: for a user's message: ``block`` (answer with the block notice, no model call),
            ``mask`` (replace the term with mask characters), ``flag`` (continue, log, count).
        outbound: for the model's answer: ``mask`` or ``withhold`` (send the withhold notice).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    inbound: InboundAction = "block"
    outbound: OutboundAction = "withhold"


class WordsSettings(BaseModel):
    """``security.words``: term files, per-category actions and the notices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    files: list[Path] = Field(default_factory=list)
    categories: dict[str, CategoryAction] = Field(default_factory=dict)
    default: CategoryAction = Field(default_factory=CategoryAction)
    block_notice: str = "Sorry, I can't help with this message."
    withhold_notice: str = "Sorry, I can't share that answer."
    # full-width: an ASCII * would read as emphasis in markdown replies
    mask_char: str = Field("＊", min_length=1, max_length=1)
    reload_interval_s: float = Field(5.0, ge=0)


@dataclass(frozen=True, slots=True)
class Match:
    """One term found in a text; ``start``/``end`` index the original text."""

    category: str
    term: str
    start: int
    end: int


def _fold_text(text: str) -> str:
    return _DROP.sub("", unicodedata.normalize("NFKD", text).casefold())


# The automaton runs over the hex digits of the UTF-16 code units (four per unit), not over the
# characters: pyahocorasick finds a node's child by a linear search, and a root with thousands of
# distinct first characters (any large Chinese list) costs milliseconds per message; sixteen
# children per node at most keeps a scan near-linear in the text whatever the list.
_UNIT = 4


def _encode(folded: str) -> str:
    return folded.encode("utf-16-be").hex()


def _char_index(folded: str, encoded_length: int) -> list[int] | None:
    """Code unit → index in ``folded``; ``None`` when they coincide (no astral characters)."""
    if encoded_length == _UNIT * len(folded):
        return None
    index: list[int] = []
    for i, ch in enumerate(folded):
        index.extend([i] * (2 if ord(ch) > 0xFFFF else 1))
    return index


# Character → its fold. Bounded: a flood of distinct code points must not grow it forever.
_fold_char = functools.lru_cache(maxsize=1 << 16)(_fold_text)


def normalize(text: str) -> tuple[str, list[int]]:
    """Fold ``text`` for matching (see the module docstring).

    Returns:
        The folded text, and for each of its characters the index of the original character it
        came from.
    """
    return "".join(map(_fold_char, text)), _index_map(text)


def _index_map(text: str) -> list[int]:
    lengths = list(map(len, map(_fold_char, text)))
    if max(lengths, default=0) <= 1:  # the common case, at C speed
        return list(itertools.compress(range(len(text)), lengths))
    return list(itertools.chain.from_iterable(map(itertools.repeat, range(len(text)), lengths)))


def _is_ascii_alnum(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def _stands_alone(text: str, start: int, stop: int) -> bool:
    """No ASCII letter or digit touches the span ``text[start:stop]`` on either side."""
    before = _fold_char(text[start - 1]) if start > 0 else ""
    after = _fold_char(text[stop]) if stop < len(text) else ""
    return not (before and _is_ascii_alnum(before[-1])) and not (
        after and _is_ascii_alnum(after[0])
    )


def _one_word(text: str, start: int, stop: int) -> bool:
    """The span is one word, or a word spelled out one character at a time (``b a d``).

    Invisible characters (zero-width, combining) do not split words; visible separators do. This
    keeps ``is a`` from matching a term ``isa``.
    """
    pieces: list[int] = [0]
    for ch in text[start:stop]:
        if _fold_char(ch):
            pieces[-1] += 1
        elif unicodedata.category(ch) not in _INVISIBLE and pieces[-1]:
            pieces.append(0)
    words = [n for n in pieces if n]
    return len(words) == 1 or max(words) == 1


def load_terms(path: Path) -> dict[str, list[str]]:
    """Read one term file into ``{category: [term, …]}`` (see the module docstring).

    Raises:
        OSError: the file cannot be read.
        UnicodeDecodeError: the file is not UTF-8.
    """
    terms: dict[str, list[str]] = {}
    category = path.stem
    for raw in path.read_text(encoding="utf-8-sig").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]") and len(line) > 2:
            category = line[1:-1].strip()
            continue
        terms.setdefault(category, []).append(line)
    return terms


_Entry = tuple[int, tuple[tuple[str, str], ...], bool]  # folded length, (category, term)s, latin


class WordFilter:
    """Finds and masks the terms of the configured files.

    Args:
        settings: the ``security.words`` section.
        clock: monotonic seconds, for the reload check.

    Raises:
        ConfigError: a configured file cannot be read at start.
    """

    def __init__(
        self, settings: WordsSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._automaton: ahocorasick.Automaton | None = None
        self._count = 0
        self._signature = self._stat()
        self._checked = clock()
        try:
            self._build()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read term file: {exc}", key="security.words.files") from exc

    @property
    def term_count(self) -> int:
        """How many distinct folded terms are loaded."""
        return self._count

    def action(self, category: str) -> CategoryAction:
        """The actions configured for ``category`` (the default ones if it is not configured)."""
        return self.settings.categories.get(category, self.settings.default)

    def _stat(self) -> tuple[tuple[int, int] | None, ...]:
        signature: list[tuple[int, int] | None] = []
        for path in self.settings.files:
            try:
                st = os.stat(path)
            except OSError:
                signature.append(None)
            else:
                signature.append((st.st_mtime_ns, st.st_size))
        return tuple(signature)

    def _build(self) -> None:
        entries: dict[str, list[tuple[str, str]]] = {}
        for path in self.settings.files:
            for category, terms in load_terms(path).items():
                for term in terms:
                    key = _fold_text(term)
                    if key and (category, term) not in entries.get(key, ()):
                        entries.setdefault(key, []).append((category, term))
        automaton: ahocorasick.Automaton | None = None
        if entries:
            automaton = ahocorasick.Automaton()
            for key, found in entries.items():
                latin = all(_is_ascii_alnum(ch) for ch in key)
                encoded = _encode(key)
                automaton.add_word(encoded, (len(encoded), tuple(found), latin))
            automaton.make_automaton()
        self._automaton = automaton
        self._count = len(entries)

    def reload(self) -> bool:
        """Re-read the files now. Returns False (and keeps the old lists) if one cannot be read."""
        self._signature = self._stat()
        try:
            self._build()
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("sensitive word lists not reloaded, keeping the old ones: %s", exc)
            return False
        logger.info("sensitive word lists reloaded: %d terms", self._count)
        return True

    def _maybe_reload(self) -> None:
        now = self.clock()
        if now - self._checked < self.settings.reload_interval_s:
            return
        self._checked = now
        if self._stat() != self._signature:
            self.reload()

    def scan(self, text: str) -> list[Match]:
        """Every term occurrence in ``text``, in order of where it ends."""
        self._maybe_reload()
        automaton = self._automaton
        if automaton is None:
            return []
        folded = _fold_text(text)
        encoded = _encode(folded)
        hits: list[tuple[int, _Entry]] = list(automaton.iter(encoded))
        if not hits:  # the common case ends here
            return []
        chars = _char_index(folded, len(encoded))
        # Folded length after each original character: folded index k came from original
        # character bisect_right(ends, k).
        ends = list(itertools.accumulate(map(len, map(_fold_char, text))))
        found: list[Match] = []
        for last, (length, owners, latin) in hits:
            if (last + 1) % _UNIT:  # a match straddling code units is not a match
                continue
            first, stop_unit = (last + 1 - length) // _UNIT, (last + 1) // _UNIT
            if chars is not None:
                first, stop_unit = chars[first], chars[stop_unit - 1] + 1
            start = bisect.bisect_right(ends, first)
            stop = bisect.bisect_right(ends, stop_unit - 1) + 1
            if latin and not (_stands_alone(text, start, stop) and _one_word(text, start, stop)):
                continue
            found.extend(Match(category, term, start, stop) for category, term in owners)
        return found

    def mask(self, text: str, matches: list[Match]) -> str:
        """``text`` with every matched span replaced by mask characters of the same length."""
        if not matches:
            return text
        spans = sorted((m.start, m.end) for m in matches)
        out: list[str] = []
        pos = 0
        for start, end in spans:
            start = max(start, pos)
            if end <= start:
                continue
            out.append(text[pos:start])
            out.append(self.settings.mask_char * (end - start))
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def categories_of(self, matches: list[Match]) -> Mapping[str, CategoryAction]:
        """The distinct categories of ``matches`` with their actions, in first-seen order."""
        return {m.category: self.action(m.category) for m in matches}
