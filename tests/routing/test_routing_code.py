"""Code detection: accuracy on a labelled Chinese/English set, and bounded cost."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from imrelay.routing.code import detect_code, is_code

CORPUS = Path(__file__).with_name("code_corpus.jsonl")
REQUIRED_ACCURACY = 0.95


def _corpus() -> list[dict[str, object]]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line]


def test_code_corpus_is_large_and_mixed() -> None:
    """The labelled set has at least 200 messages, in both languages, of every category."""
    rows = _corpus()
    assert len(rows) >= 200
    langs = Counter(str(r["lang"]) for r in rows)
    assert langs["zh"] >= 80
    assert langs["en"] >= 80
    categories = {str(r["category"]) for r in rows}
    assert {"fenced", "unfenced", "sql", "shell", "technical_prose", "log", "data"} <= categories
    labels = Counter(bool(r["code"]) for r in rows)
    assert min(labels.values()) >= 100  # both classes well represented


def test_code_detection_accuracy_on_the_labelled_set() -> None:
    """At least 95 % of the labelled messages are classified right (printed on failure)."""
    rows = _corpus()
    wrong = [r for r in rows if is_code(str(r["text"])) is not r["code"]]
    accuracy = 1 - len(wrong) / len(rows)
    per_lang = {
        lang: 1
        - sum(1 for r in wrong if r["lang"] == lang) / sum(1 for r in rows if r["lang"] == lang)
        for lang in ("zh", "en")
    }
    report = (
        f"accuracy {accuracy:.1%} on {len(rows)} messages (zh {per_lang['zh']:.1%}, "
        f"en {per_lang['en']:.1%}); wrong: {[(r['category'], r['text']) for r in wrong]}"
    )
    assert accuracy >= REQUIRED_ACCURACY, report
    assert min(per_lang.values()) >= REQUIRED_ACCURACY, report


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("```\nx\n```", "fenced block"),
        ("look: ```a = 1```", "fenced block"),
        ("```python\nprint(1)", "fenced block"),  # unclosed fence with content
        ("x = 1\ny = 2", "2 of 2 lines look like code"),
        ("just words here", "no code-like lines"),
    ],
)
def test_code_verdict_reason(text: str, reason: str) -> None:
    """The verdict says why (shown by ``route explain``)."""
    assert detect_code(text).reason == reason


def test_code_prose_lines_more_than_three_times_the_code_is_prose() -> None:
    """One code-looking line in a long prose message does not make it code."""
    prose = "\n".join(
        [
            "Hi team, here is the weekly update for the platform group.",
            "We finished the migration of the billing service last Tuesday.",
            "The on-call rotation for next month is posted in the wiki.",
            "Please review the budget draft before the Friday meeting.",
            "x = 1",
        ]
    )
    verdict = detect_code(prose)
    assert not verdict.is_code
    assert (verdict.code_lines, verdict.lines) == (1, 5)
    assert is_code("\n".join(["x = 1", *prose.splitlines()[:3]])) is True  # a third: code


def test_code_json_and_yaml_are_data() -> None:
    """JSON that parses, YAML key/values and CSV tables are data, not code."""
    assert not is_code('{"a": 1, "b": [1, 2]}')
    assert not is_code("[\n  1,\n  2\n]")
    assert not is_code("name: imrelay\nport: 8080")
    assert not is_code("a,b,c\n1,2,3")
    assert is_code('{"a": 1,}\nfoo(bar);')  # broken JSON followed by code


def test_code_comments_and_strings_do_not_hide_code() -> None:
    """Chinese inside strings and comments does not turn a code line into prose."""
    assert is_code('print("你好，世界")  # 打印问候')
    assert is_code("// 初始化\nint count = 0;")
    assert not is_code("这是一个关于 `print()` 的问题")


def test_code_long_input_has_bounded_cost() -> None:
    """Adversarial long pastes are classified quickly (no catastrophic backtracking)."""
    cases = [
        "[" * 50_000,
        "{\n" * 10_000,
        ("a(" * 250 + ")" * 250 + "\n") * 100,
        "word " * 20_000,
        ("x." * 300 + "\n") * 300,
    ]
    for text in cases:
        started = time.perf_counter()
        detect_code(text)
        assert time.perf_counter() - started < 0.25, text[:20]  # backtracking takes seconds
