"""Counting tokens for the context budget: a model's own tokenizer, or a documented estimate.

Theory of operation: the context stage keeps the newest turns that fit ``context.max_tokens``,
counting each turn with a :class:`TokenCounter`.

- :class:`TokenizerCounter` loads a Hugging Face ``tokenizer.json`` (the file, or a model
  directory holding it) with the ``tokenizers`` library. Loading is from disk only: nothing
  is downloaded. The library is an optional dependency, imported when a tokenizer is
  configured; without it :func:`load_token_counter` raises a :class:`~imrelay.errors.ConfigError`
  naming the key and the package to install.
- :class:`EstimateCounter` is used otherwise: each CJK character (ideographs, kana, hangul,
  CJK and full-width punctuation) counts as one token, and the other characters as one token
  per four, rounded up. Real BPE tokenizers of Chinese-capable models (Qwen, DeepSeek, GLM)
  spend about 0.6–1.5 tokens per Chinese character and about 4 characters per token of
  English, so the estimate is close for English and errs on the long side for Chinese.

Special tokens are not counted (``add_special_tokens=False``); the chat template's cost of a
turn is the caller's fixed per-turn overhead. A tokenizer is tried on a short text when it is
loaded; should it still fail on some text later, that text is estimated (logged once).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

from imrelay.errors import ConfigError

__all__ = [
    "EstimateCounter",
    "TokenCounter",
    "TokenizerCounter",
    "estimate_tokens",
    "is_cjk",
    "load_token_counter",
]

_TOKENIZER_FILE: Final = "tokenizer.json"
_PROBE: Final = "Hello, 世界 123"  # encoded once at load: a tokenizer that cannot is refused
_KEY: Final = "context.tokenizer"

logger = logging.getLogger(__name__)


@runtime_checkable
class TokenCounter(Protocol):
    """Counts the tokens of a text."""

    @property
    def name(self) -> str:
        """What counts: ``estimate`` or ``tokenizer:<path>`` (for logs and ``route explain``)."""
        ...

    def count(self, text: str) -> int:
        """The number of tokens of ``text``."""
        ...


def is_cjk(ch: str) -> bool:
    """Whether the character ``ch`` is CJK (ideograph, kana, hangul, CJK or full-width mark)."""
    code = ord(ch)
    return (
        0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= code <= 0x4DBF  # extension A
        or 0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0xAC00 <= code <= 0xD7AF  # hangul syllables
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0x3000 <= code <= 0x303F  # CJK punctuation
        or 0xFF00 <= code <= 0xFFEF  # full-width forms
    )


_CJK: Final = re.compile(
    "[\u4e00-\u9fff\u3400-\u4dbf\u3040-\u30ff\uac00-\ud7af\uf900-\ufaff\u3000-\u303f\uff00-\uffef]"
)  # the ranges of is_cjk, for counting a whole text at C speed


def estimate_tokens(text: str) -> int:
    """Estimate the tokens of ``text``: CJK characters one each, other text one per four."""
    if text.isascii():
        return (len(text) + 3) // 4
    cjk = len(_CJK.findall(text))
    other = len(text) - cjk
    return cjk + (other + 3) // 4


class EstimateCounter:
    """:class:`TokenCounter` by :func:`estimate_tokens` (see the module docstring)."""

    @property
    def name(self) -> str:
        """Always ``estimate``."""
        return "estimate"

    def count(self, text: str) -> int:
        """The estimated tokens of ``text``."""
        return estimate_tokens(text)


_CACHE_CHARS: Final = 4_000_000  # characters of counted texts a tokenizer counter remembers
_ENTRY_CHARS: Final = 100  # what one remembered count costs besides its text, in characters


class TokenizerCounter:
    """:class:`TokenCounter` with a model's own tokenizer (``tokenizer.json``), offline.

    Counts are remembered per text (the newest texts, up to ``cache_chars`` characters in all,
    each text counting a hundred characters more for its entry: 4 million characters is about
    4–8 MB for long texts, and at most 40,000 entries for short ones):
    every message counts the turns of its conversation's history again, and encoding costs
    tens of microseconds per hundred characters (a BPE vocabulary: 62 µs for 300 characters),
    so twenty turns of history cost a millisecond a message, more than the rest of the
    gateway's work on it; a remembered count costs a dictionary lookup.

    Args:
        path: a ``tokenizer.json`` file, or a model directory that holds one.
        cache_chars: how many characters of counted texts to remember (0: none).

    Raises:
        ConfigError: keyed ``context.tokenizer``: the ``tokenizers`` package is not
            installed, the file does not exist, or it is not a valid tokenizer.
    """

    def __init__(self, path: str | os.PathLike[str], *, cache_chars: int = _CACHE_CHARS) -> None:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / _TOKENIZER_FILE
        if not file.is_file():
            raise ConfigError(f"no tokenizer file at {file}", key=_KEY)
        try:
            library: Any = importlib.import_module("tokenizers")
        except ImportError:
            raise ConfigError(
                "counting with a model's tokenizer needs the tokenizers package "
                "(pip install tokenizers); or leave context.tokenizer unset to estimate",
                key=_KEY,
            ) from None
        try:
            self._tokenizer: Any = library.Tokenizer.from_file(str(file))
            self._tokenizer.encode(_PROBE, add_special_tokens=False)
        except Exception as exc:  # the Rust side raises plain Exception for a bad file
            raise ConfigError(f"not a valid tokenizer file: {file} ({exc})", key=_KEY) from None
        self.path = file
        self._failed = False
        self._counts: dict[str, int] = {}  # text -> tokens, oldest first
        self._cached_chars = 0
        self._cache_chars = max(cache_chars, 0)
        self.encoded = 0
        """Texts the tokenizer encoded (counts not found among the remembered ones)."""

    @property
    def name(self) -> str:
        """``tokenizer:<path of tokenizer.json>``."""
        return f"tokenizer:{self.path}"

    def count(self, text: str) -> int:
        """The tokens of ``text`` by the model's tokenizer, special tokens left out."""
        if not text:
            return 0
        known = self._counts.get(text)
        if known is not None:
            return known
        self.encoded += 1
        try:
            tokens = len(self._tokenizer.encode(text, add_special_tokens=False).ids)
        except Exception as exc:  # e.g. a WordLevel vocabulary without an unknown token
            if not self._failed:
                self._failed = True
                logger.warning("tokenizer %s failed (%s); estimating instead", self.path, exc)
            tokens = estimate_tokens(text)
        self._remember(text, tokens)
        return tokens

    def _remember(self, text: str, tokens: int) -> None:
        size = len(text) + _ENTRY_CHARS
        if size > self._cache_chars // 16:  # a text this long would push out too many others
            return
        counts = self._counts
        while counts and self._cached_chars + size > self._cache_chars:
            oldest = next(iter(counts))
            del counts[oldest]
            self._cached_chars -= len(oldest) + _ENTRY_CHARS
        counts[text] = tokens
        self._cached_chars += size


def load_token_counter(path: str | os.PathLike[str] | None) -> TokenCounter:
    """The counter for ``context.tokenizer``: a :class:`TokenizerCounter`, or the estimate.

    Args:
        path: a ``tokenizer.json`` or a model directory holding one; ``None``: estimate.

    Raises:
        ConfigError: see :class:`TokenizerCounter`.
    """
    if path is None or os.fspath(path) == "":
        return EstimateCounter()
    return TokenizerCounter(path)
