"""The routing and context settings this feature adds: parsing, validation, documentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from imrelay.config import (
    CanarySettings,
    ContextSettings,
    RoutingSettings,
    RuleMatchSettings,
    RuleSettings,
    format_config_error,
    parse_settings,
)
from imrelay.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def data(routing: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A minimal valid file with three models, and the given routing section."""
    return {
        "models": {"qwen": {"type": "echo"}, "next": {"type": "echo"}, "coder": {"type": "echo"}},
        "routing": {"default": "qwen", **(routing or {})},
        **sections,
    }


def errors(routing: dict[str, Any]) -> list[str]:
    """The rendered error lines for a routing section."""
    with pytest.raises(ConfigError) as info:
        parse_settings(data(routing), environ={})
    return format_config_error(info.value).splitlines()


def test_config_rules_parse_with_single_values_and_numeric_ids() -> None:
    """A single value stands for a one-item list; YAML integers become id strings."""
    settings = parse_settings(
        data(
            {
                "by_kind": {"code": "coder"},
                "rules": [
                    {
                        "name": "r1",
                        "match": {"group": 123, "user": ["a", 7], "kind": "code", "keyword": "k"},
                        "model": "coder",
                        "system_prompt": "be brief",
                        "canary": {"model": "next", "percent": 5, "groups": 99},
                    },
                    {"model": "qwen"},
                ],
            },
            context={"tokenizer": "/models/qwen"},
        ),
        environ={},
    )
    first, second = settings.routing.rules
    assert first.match.group == ["123"]
    assert first.match.user == ["a", "7"]
    assert first.match.kind == ["code"]
    assert first.match.keyword == ["k"]
    assert first.canary is not None
    assert first.canary.groups == ["99"]
    assert (first.canary.max_error_rate_delta, first.canary.max_latency_ratio) == (0.05, 1.5)
    assert (first.canary.min_requests, first.canary.window_s) == (20, 300.0)
    assert second.name is None
    assert second.match == RuleMatchSettings()
    assert settings.routing.by_kind == {"code": "coder"}
    assert settings.context.tokenizer == "/models/qwen"
    assert ContextSettings().tokenizer is None


@pytest.mark.parametrize(
    ("routing", "line"),
    [
        (
            {"rules": [{"model": "gpt"}]},
            "config error: routing.rules.0.model: unknown model 'gpt'",
        ),
        (
            {"rules": [{"name": "a", "model": "qwen"}, {"name": "a", "model": "qwen"}]},
            "config error: routing.rules.1.name: another rule has the name 'a'",
        ),
        (
            {"rules": [{"model": "qwen", "canary": {"model": "next", "percent": 5}}]},
            "config error: routing.rules.0.name: a rule with a canary needs a name",
        ),
        (
            {"rules": [{"name": "c", "model": "qwen", "canary": {"model": "x", "percent": 5}}]},
            "config error: routing.rules.0.canary.model: unknown model 'x'",
        ),
        (
            {"rules": [{"name": "c", "model": "qwen", "canary": {"model": "qwen", "percent": 5}}]},
            "config error: routing.rules.0.canary.model: the candidate is the rule's own model",
        ),
        (
            {"rules": [{"name": "c", "model": "qwen", "canary": {"model": "next"}}]},
            "config error: routing.rules.0.canary: a canary needs a percent above 0 or a list "
            "of groups",
        ),
        (
            {"rules": [{"model": "qwen", "canary": {"model": "next", "percent": 101}}]},
            "config error: routing.rules.0.canary.percent: input should be less than or equal "
            "to 100",
        ),
        (
            {"rules": [{"model": "qwen", "match": {"regex": "(unclosed"}}]},
            "config error: routing.rules.0.match.regex: not a valid regular expression: "
            "missing ), unterminated subpattern at position 0",
        ),
        (
            {"rules": [{"model": "qwen", "match": {"keyword": ["ok", " "]}}]},
            "config error: routing.rules.0.match.keyword: a keyword cannot be empty",
        ),
        (
            {"rules": [{"model": "qwen", "match": {"kind": "sticker"}}]},
            "config error: routing.rules.0.match.kind.0: input should be 'text', 'image', "
            "'audio', 'video', 'file', 'rich' or 'code'",
        ),
        (
            {"rules": [{"model": "qwen", "match": {"colour": "red"}}]},
            "config error: routing.rules.0.match.colour: extra inputs are not permitted",
        ),
        (
            {"by_kind": {"code": "nope"}},
            "config error: routing.by_kind.code: unknown model 'nope'",
        ),
    ],
)
def test_config_routing_problems_name_the_key(routing: dict[str, Any], line: str) -> None:
    """Every problem with rules names the key in the user's file."""
    assert line in errors(routing)


def test_config_routing_sections_are_documented() -> None:
    """docs/configuration.md mentions every key this feature added."""
    text = DOCS.read_text(encoding="utf-8")
    sections: list[type[BaseModel]] = [RuleSettings, RuleMatchSettings, CanarySettings]
    missing = [
        f"{model.__name__}.{name}"
        for model in sections
        for name in model.model_fields
        if f"`{name}`" not in text
    ]
    assert missing == []
    assert "`rules`" in text
    assert "`tokenizer`" in text
    assert "`code`" in text
    assert set(RoutingSettings.model_fields) >= {"rules", "by_kind"}
