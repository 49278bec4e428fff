"""Token counters: the CJK-aware estimate and a real tokenizer trained here, offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from imrelay.errors import ConfigError
from imrelay.routing.tokens import (
    EstimateCounter,
    TokenCounter,
    TokenizerCounter,
    estimate_tokens,
    is_cjk,
    load_token_counter,
)

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "你", "好", "世", "界"]


def train_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer (one token per whitespace-separated word) saved as tokenizer.json."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[CLS]"])
    tokenizer.train_from_iterator([" ".join(WORDS)] * 3, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_tokens_estimate_counts_cjk_one_by_one() -> None:
    """The estimate: one token per CJK character, one per four other characters."""
    counter = EstimateCounter()
    assert isinstance(counter, TokenCounter)
    assert counter.name == "estimate"
    assert counter.count("你好世界") == 4
    assert counter.count("abcdefgh") == 2
    assert counter.count("你好 abcd") == estimate_tokens("你好 abcd") == 2 + 2
    assert counter.count("") == 0


def test_tokens_tokenizer_counts_with_the_model_tokenizer(tmp_path: Path) -> None:
    """A tokenizer.json (or its directory) counts by the model's own vocabulary."""
    path = train_tokenizer(tmp_path / "model")
    for source in (path, tmp_path / "model", str(path)):
        counter = TokenizerCounter(source)
        assert isinstance(counter, TokenCounter)
        assert counter.name == f"tokenizer:{path}"
        assert counter.count("alpha beta gamma") == 3
        assert counter.count("alpha   beta") == 2
        assert counter.count("") == 0
    # The estimate and the tokenizer disagree, which is why the tokenizer matters.
    text = "epsilon epsilon epsilon epsilon"
    assert TokenizerCounter(path).count(text) == 4
    assert estimate_tokens(text) == 8


def test_tokens_special_tokens_are_not_counted(tmp_path: Path) -> None:
    """A post-processor adding [CLS] does not change the count (special tokens left out)."""
    path = train_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_file(str(path))
    from tokenizers import processors

    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", 1)]
    )
    tokenizer.save(str(path))
    assert len(tokenizer.encode("alpha beta").ids) == 3
    assert TokenizerCounter(path).count("alpha beta") == 2


def test_tokens_load_token_counter(tmp_path: Path) -> None:
    """No tokenizer configured: the estimate; a path: the tokenizer."""
    assert isinstance(load_token_counter(None), EstimateCounter)
    assert isinstance(load_token_counter(""), EstimateCounter)
    assert isinstance(load_token_counter(train_tokenizer(tmp_path)), TokenizerCounter)


def test_tokens_missing_or_invalid_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    """A missing file, a directory without tokenizer.json or a bad file name the key."""
    with pytest.raises(ConfigError, match="no tokenizer file") as missing:
        TokenizerCounter(tmp_path / "nope.json")
    assert missing.value.key == "context.tokenizer"
    with pytest.raises(ConfigError, match="no tokenizer file"):
        TokenizerCounter(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a valid tokenizer file") as invalid:
        load_token_counter(bad)
    assert invalid.value.key == "context.tokenizer"


def test_tokens_without_the_tokenizers_package_is_a_clear_error(tmp_path: Path) -> None:
    """When the optional package is missing the error says what to install."""
    path = train_tokenizer(tmp_path)
    code = (
        "import sys; sys.modules['tokenizers'] = None\n"
        "from imrelay.errors import ConfigError\n"
        "from imrelay.routing.tokens import load_token_counter\n"
        f"try:\n    load_token_counter({str(path)!r})\n"
        "except ConfigError as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "context.tokenizer: counting with a model's tokenizer needs the tokenizers" in (
        result.stdout
    )
    assert "pip install tokenizers" in result.stdout


def _no_unknown_token(path: Path, corpus: str) -> Path:
    """A word-level tokenizer without an unknown token: it cannot encode words it never saw."""
    tokenizer = Tokenizer(models.WordLevel())
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([corpus], trainer=trainers.WordLevelTrainer())
    tokenizer.save(str(path))
    return path


def test_tokens_tokenizer_that_cannot_encode_is_refused_at_load(tmp_path: Path) -> None:
    """A tokenizer failing on a short probe text is a configuration error, not a crash later."""
    path = _no_unknown_token(tmp_path / "tokenizer.json", "alpha beta")
    with pytest.raises(ConfigError, match="not a valid tokenizer file"):
        TokenizerCounter(path)


def test_tokens_tokenizer_failing_later_falls_back_to_the_estimate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Text the tokenizer cannot encode is estimated, with one warning."""
    path = _no_unknown_token(tmp_path / "tokenizer.json", "Hello , 世界 123 alpha")
    counter = TokenizerCounter(path)
    assert counter.count("alpha alpha") == 2
    with caplog.at_level("WARNING", logger="imrelay.routing.tokens"):
        assert counter.count("zzzzzzzz") == estimate_tokens("zzzzzzzz")
        assert counter.count("yyyy") == 1
    assert caplog.text.count("estimating instead") == 1


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x10FFFF)))
def test_tokens_estimate_counts_exactly_the_cjk_characters(text: str) -> None:
    """The whole-text count agrees with :func:`is_cjk` character by character."""
    cjk = sum(1 for ch in text if is_cjk(ch))
    assert estimate_tokens(text) == cjk + (len(text) - cjk + 3) // 4


@pytest.mark.parametrize(
    "code",
    [
        0x2FFF,
        0x3000,
        0x303F,
        0x3040,
        0x30FF,
        0x3100,
        0x33FF,
        0x3400,
        0x4DBF,
        0x4DC0,
        0x4DFF,
        0x4E00,
        0x9FFF,
        0xA000,
        0xABFF,
        0xAC00,
        0xD7AF,
        0xD7B0,
        0xF8FF,
        0xF900,
        0xFAFF,
        0xFB00,
        0xFEFF,
        0xFF00,
        0xFFEF,
        0xFFF0,
    ],
)
def test_tokens_estimate_range_edges(code: int) -> None:
    """Every range's first and last code point, and their neighbours, count as is_cjk says."""
    text = chr(code) * 4
    assert estimate_tokens(text) == (4 if is_cjk(chr(code)) else 1)


def test_tokens_tokenizer_counts_are_remembered(tmp_path: Path) -> None:
    """A text counted before is not encoded again (every message counts its whole history)."""
    counter = TokenizerCounter(train_tokenizer(tmp_path))
    encoded = counter.encoded
    assert counter.count("alpha beta gamma") == 3
    assert counter.encoded == encoded + 1
    for _ in range(5):
        assert counter.count("alpha beta gamma") == 3
    assert counter.count("alpha beta") == 2
    assert counter.encoded == encoded + 2


def test_tokens_tokenizer_cache_is_bounded_in_characters(tmp_path: Path) -> None:
    """The oldest counts go once the remembered texts, each counting 100 characters more for
    its entry, exceed ``cache_chars``; a text longer than a sixteenth of it is never
    remembered; 0 remembers nothing."""
    path = train_tokenizer(tmp_path)
    counter = TokenizerCounter(path, cache_chars=1760)  # entries of at most 110 characters
    texts = [f"alpha {i:04d}" for i in range(40)]  # 10 + 100 characters each: 16 fit
    for text in texts:
        assert counter.count(text) == 2
    assert counter.encoded == 40
    assert len(counter._counts) == 16
    assert counter.count(texts[-1]) == 2
    assert counter.encoded == 40  # still remembered
    assert counter.count(texts[0]) == 2
    assert counter.encoded == 41  # pushed out, encoded again
    long = "alpha beta "  # 11 + 100 characters: more than a sixteenth of 1760
    assert counter.count(long) == 2
    assert counter.count(long) == 2
    assert counter.encoded == 43
    none = TokenizerCounter(path, cache_chars=0)
    none.count("alpha")
    none.count("alpha")
    assert none.encoded == 2
