"""Sensitive words: folding, disguised terms, categories, masking on the original text, reload."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from imrelay.errors import ConfigError
from imrelay.security.words import (
    CategoryAction,
    Match,
    WordFilter,
    WordsSettings,
    load_terms,
    normalize,
)

TERMS = """\
# politics list, maintained by the compliance team
敏感词
bad

[abuse]
傻瓜
idiot
[secret]
绝密
"""


class Clock:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def term_file(tmp_path: Path) -> Path:
    """A term file whose first block belongs to the category named after the file."""
    path = tmp_path / "politics.txt"
    path.write_text(TERMS, encoding="utf-8")
    return path


@pytest.fixture
def words(term_file: Path) -> WordFilter:
    """A filter over :data:`TERMS` that re-checks the file on every scan."""
    return WordFilter(WordsSettings(files=[term_file], reload_interval_s=0))


def found(words: WordFilter, text: str) -> list[tuple[str, str, str]]:
    """``(category, term, original span)`` of every match."""
    return [(m.category, m.term, text[m.start : m.end]) for m in words.scan(text)]


def test_words_load_terms_reads_headers_comments_and_file_category(term_file: Path) -> None:
    """Terms before a header take the file's name; comments and blank lines are skipped."""
    assert load_terms(term_file) == {
        "politics": ["敏感词", "bad"],
        "abuse": ["傻瓜", "idiot"],
        "secret": ["绝密"],
    }


def test_words_normalize_folds_and_maps_back_to_original() -> None:
    """Full width, case, separators and zero-width characters fold; the map points back."""
    text = "Ａ-b\u200bC 敏 感"
    folded, index = normalize(text)
    assert folded == "abc敏感"
    assert [text[i] for i in index] == ["Ａ", "b", "C", "敏", "感"]


def test_words_normalize_folds_accents_and_compatibility_forms() -> None:
    """Accents drop, ligatures and circled digits decompose, symbols vanish."""
    assert normalize("Café ﬁ ① ㈱ $!")[0] == "cafefi1株"


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("这是敏感词吗", "敏感词"),
        ("这是敏 感 词吗", "敏 感 词"),
        ("这是敏\u200b感\u200d词吗", "敏\u200b感\u200d词"),
        ("敏·感·词", "敏·感·词"),
        ("敏\u3000感\u3000词", "敏\u3000感\u3000词"),
        ("敏-感_词!", "敏-感_词"),
        ("that is ｂａｄ.", "ｂａｄ"),
        ("that is BaD!", "BaD"),
        ("that is b-a-d", "b-a-d"),
        ("that is b.a.d", "b.a.d"),
        ("that is b a d", "b a d"),
        ("that is b\u200bad", "b\u200bad"),
        ("that is b\u0301ad", "b\u0301ad"),
        ("很bad的事", "bad"),
    ],
)
def test_words_disguised_terms_are_found(words: WordFilter, text: str, span: str) -> None:
    """Spaces, punctuation, zero-width characters, full width and case do not hide a term."""
    assert [s for _, _, s in found(words, text)] == [span]


@pytest.mark.parametrize(
    "text", ["badge", "a badly done job", "abad", "ba d", "the bad4 code", "ｂａｄｇｅ"]
)
def test_words_latin_terms_must_stand_alone(words: WordFilter, text: str) -> None:
    """An ASCII term inside a longer word, or split across words, is not a match."""
    assert words.scan(text) == []


def test_words_latin_term_not_glued_from_two_words(tmp_path: Path) -> None:
    """``is a`` does not spell the term ``isa``; ``i s a`` does."""
    path = tmp_path / "misc.txt"
    path.write_text("isa\n", encoding="utf-8")
    words = WordFilter(WordsSettings(files=[path]))
    assert words.scan("this is a test") == []
    assert found(words, "this i s a test") == [("misc", "isa", "i s a")]


def test_words_astral_characters_and_code_unit_boundaries(tmp_path: Path) -> None:
    """Terms with characters beyond the BMP match; a match straddling two characters does not."""
    path = tmp_path / "rare.txt"
    path.write_text("𠀀好\na\n", encoding="utf-8")
    words = WordFilter(WordsSettings(files=[path]))
    text = "𪚥 𠀀 好 〆"
    assert found(words, text) == [("rare", "𠀀好", "𠀀 好")]
    # U+3006 U+1100 is 3006 1100 in hex: "0061" ("a") sits across the two characters
    assert words.scan("〆ᄀ") == []
    assert found(words, "〆 a ᄀ") == [("rare", "a", "a")]


def test_words_categories_and_terms_reported(words: WordFilter) -> None:
    """Each match names its category and the term as written in the list."""
    assert found(words, "你这个傻瓜，IDIOT，绝密文件") == [
        ("abuse", "傻瓜", "傻瓜"),
        ("abuse", "idiot", "IDIOT"),
        ("secret", "绝密", "绝密"),
    ]


def test_words_same_term_in_two_categories_reported_for_each(tmp_path: Path) -> None:
    """A term listed under two categories (or twice) gives one match per category."""
    path = tmp_path / "a.txt"
    path.write_text("[x]\n机密\n机密\n[y]\n机 密\n", encoding="utf-8")
    words = WordFilter(WordsSettings(files=[path]))
    assert words.term_count == 1
    assert sorted((m.category, m.term) for m in words.scan("机密")) == [
        ("x", "机密"),
        ("y", "机 密"),
    ]
    assert words.mask("《机密》", words.scan("《机密》")) == "《＊＊》"


def test_words_mask_replaces_original_spans(words: WordFilter) -> None:
    """The mask covers exactly what the user wrote, separators included."""
    text = "这是敏 感 词，还有ｂａｄ的"
    assert words.mask(text, words.scan(text)) == "这是＊＊＊＊＊，还有＊＊＊的"


def test_words_mask_merges_overlapping_matches(tmp_path: Path) -> None:
    """Overlapping and nested matches are masked once, with the configured character."""
    path = tmp_path / "t.txt"
    path.write_text("敏感\n敏感词\n感词汇\n", encoding="utf-8")
    words = WordFilter(WordsSettings(files=[path], mask_char="#"))
    text = "a敏感词汇b"
    assert len(words.scan(text)) == 3
    assert words.mask(text, words.scan(text)) == "a####b"


def test_words_mask_without_matches_returns_text(words: WordFilter) -> None:
    """Nothing to mask leaves the text alone."""
    assert words.mask("hello", []) == "hello"


def test_words_actions_default_and_per_category(term_file: Path) -> None:
    """Configured categories use their actions; others use the default ones."""
    settings = WordsSettings(
        files=[term_file],
        categories={"abuse": CategoryAction(inbound="mask", outbound="mask")},
    )
    words = WordFilter(settings)
    assert words.action("abuse") == CategoryAction(inbound="mask", outbound="mask")
    assert words.action("politics") == CategoryAction(inbound="block", outbound="withhold")
    matches = words.scan("傻瓜 敏感词 傻瓜")
    assert list(words.categories_of(matches)) == ["abuse", "politics"]


def test_words_no_files_matches_nothing() -> None:
    """Without lists, nothing matches and nothing is loaded."""
    words = WordFilter(WordsSettings())
    assert words.term_count == 0
    assert words.scan("敏感词 bad") == []


def test_words_file_of_only_comments_matches_nothing(tmp_path: Path) -> None:
    """A list whose terms all fold to nothing is empty."""
    path = tmp_path / "empty.txt"
    path.write_text("# nothing yet\n\n!!!\n[]\n", encoding="utf-8")
    words = WordFilter(WordsSettings(files=[path]))
    assert words.term_count == 0
    assert words.scan("!!! []") == []


def test_words_missing_file_at_start_is_config_error(tmp_path: Path) -> None:
    """A configured list that cannot be read stops start-up, naming the key."""
    with pytest.raises(ConfigError) as info:
        WordFilter(WordsSettings(files=[tmp_path / "missing.txt"]))
    assert info.value.key == "security.words.files"


def test_words_settings_are_strict() -> None:
    """Unknown keys, unknown actions and a long mask character are rejected."""
    with pytest.raises(ValidationError):
        WordsSettings.model_validate({"file": []})
    with pytest.raises(ValidationError):
        WordsSettings.model_validate({"categories": {"x": {"inbound": "withhold"}}})
    with pytest.raises(ValidationError):
        WordsSettings(mask_char="**")


def _touch(path: Path, text: str, bump_s: int) -> None:
    path.write_text(text, encoding="utf-8")
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + bump_s * 1_000_000_000))


def test_words_reload_after_file_change(term_file: Path) -> None:
    """A changed file is picked up on the first scan after the interval, not before."""
    clock = Clock()
    words = WordFilter(WordsSettings(files=[term_file], reload_interval_s=5), clock=clock)
    _touch(term_file, "新词\n", bump_s=10)
    clock.now += 4
    assert [m.term for m in words.scan("新词 敏感词")] == ["敏感词"]
    clock.now += 1
    assert [m.term for m in words.scan("新词 敏感词")] == ["新词"]
    assert words.term_count == 1


def test_words_unchanged_stat_means_no_reread(term_file: Path) -> None:
    """The check is a stat: new content with the same size and mtime is not read."""
    clock = Clock()
    words = WordFilter(WordsSettings(files=[term_file], reload_interval_s=1), clock=clock)
    before = term_file.stat()
    term_file.write_text(TERMS.replace("绝密", "机要"), encoding="utf-8")
    os.utime(term_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    clock.now += 2
    assert [m.term for m in words.scan("绝密 机要")] == ["绝密"]
    assert words.reload() is True
    assert [m.term for m in words.scan("绝密 机要")] == ["机要"]


def test_words_reload_failure_keeps_old_lists(
    term_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A list that disappears is logged; the previous terms stay in force until it is back."""
    words = WordFilter(WordsSettings(files=[term_file], reload_interval_s=0))
    term_file.unlink()
    with caplog.at_level(logging.WARNING, logger="imrelay.security.words"):
        assert [m.term for m in words.scan("敏感词")] == ["敏感词"]
    assert "not reloaded" in caplog.text
    assert words.reload() is False
    term_file.write_text("回来了\n", encoding="utf-8")
    assert [m.term for m in words.scan("回来了 敏感词")] == ["回来了"]


def test_words_explicit_reload(term_file: Path) -> None:
    """``reload()`` re-reads the files at once."""
    words = WordFilter(WordsSettings(files=[term_file], reload_interval_s=3600))
    term_file.write_text("另一个\n", encoding="utf-8")
    assert words.reload() is True
    assert [m.term for m in words.scan("另一个")] == ["另一个"]


def test_words_match_is_a_value() -> None:
    """Matches compare by value."""
    assert Match("a", "b", 0, 1) == Match("a", "b", 0, 1)


@pytest.fixture(scope="module")
def property_words(tmp_path_factory: pytest.TempPathFactory) -> WordFilter:
    """A filter with short and overlapping terms, for the property test."""
    path = tmp_path_factory.mktemp("words") / "p.txt"
    path.write_text("敏感词\n感词\nbad\na\nab\n", encoding="utf-8")
    return WordFilter(WordsSettings(files=[path], reload_interval_s=3600))


@given(text=st.text(alphabet=st.sampled_from("敏感词badAB \u200b-ｂ.x1"), max_size=60) | st.text())
def test_words_mask_covers_exactly_the_matched_spans(
    property_words: WordFilter, text: str
) -> None:
    """Any text scans; each span lies in the text; masking changes exactly the matched spans."""
    matches = property_words.scan(text)
    covered = set()
    for m in matches:
        assert 0 <= m.start < m.end <= len(text)
        covered.update(range(m.start, m.end))
    masked = property_words.mask(text, matches)
    assert len(masked) == len(text)
    for i, (before, after) in enumerate(zip(text, masked, strict=True)):
        assert after == ("＊" if i in covered else before)
