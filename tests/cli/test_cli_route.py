"""``imrelay route explain`` and ``imrelay canary …`` as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from imrelay.cli.route import canary_app, route_app
from imrelay.routing.canary import (
    CanaryDecision,
    CanaryStateFile,
    Evaluation,
    ModelSample,
    canary_bucket,
)

RUNNER = CliRunner()


def write_config(tmp_path: Path, **routing: Any) -> Path:
    """A configuration file with echo models and the given routing section."""
    storage = routing.pop("storage", f"sqlite:///{tmp_path / 'imrelay.db'}")
    data = {
        "storage": {"url": storage},
        "platforms": {
            "dingtalk": {"type": "dingtalk", "app_key": "k", "app_secret": "s"},
        },
        "models": {
            "qwen": {"type": "echo", "system_prompt": "You are a helpful assistant."},
            "qwen-next": {"type": "echo"},
            "coder": {"type": "echo"},
            "finance": {"type": "echo"},
        },
        "routing": {"default": "qwen", **routing},
    }
    path = tmp_path / "imrelay.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


CANARY_RULES = [
    {"name": "fin", "match": {"group": "cidFin"}, "model": "finance",
     "system_prompt": "Answer finance questions only."},
    {"name": "next", "match": {"kind": "text"}, "model": "qwen",
     "canary": {"model": "qwen-next", "percent": 10, "groups": ["cidTest"]}},
]  # fmt: skip


def explain(config: Path, *args: str) -> str:
    result = RUNNER.invoke(route_app, ["explain", "-c", str(config), *args])
    assert result.exit_code == 0, result.output
    return result.output


def canary(config: Path, *args: str, code: int = 0) -> str:
    result = RUNNER.invoke(canary_app, [args[0], "-c", str(config), *args[1:]])
    assert result.exit_code == code, result.output
    return result.output


def test_cli_route_explain_names_rule_model_and_reasons(tmp_path: Path) -> None:
    """The output names the model, the deciding rule, why, and each rule tried in order."""
    config = write_config(tmp_path, fallback={"finance": ["qwen"]}, rules=CANARY_RULES)
    out = explain(config, "--text", "预算怎么做", "--group", "cidFin")
    assert "model:          finance\n" in out
    assert "decided by:     rule fin\n" in out
    assert "why:            group listed\n" in out
    assert "system prompt:  the rule's: Answer finance questions only.\n" in out
    assert "fallbacks:      finance -> qwen\n" in out
    assert "   1. MATCH fin -> finance: group listed\n" in out
    assert " 2. " not in out  # rules after the match are not tried
    out = explain(config, "--text", "hello", "--group", "cidTest")
    assert "decided by:     rule next\n" in out
    assert "canary arm:     candidate\n" in out
    assert "model:          qwen-next\n" in out
    assert "   1. no    fin -> finance: not a listed group\n" in out
    assert "   2. MATCH next -> qwen: kind text\n" in out
    assert "system prompt:  none\n" in out


def test_cli_route_explain_code_and_by_kind(tmp_path: Path) -> None:
    """Code is detected and routed by by_kind.code; the kind line shows the verdict."""
    config = write_config(tmp_path, by_kind={"code": "coder", "image": "coder"})
    out = explain(config, "--text", "SELECT * FROM users;")
    assert "model:          coder\n" in out
    assert "decided by:     by_kind.code\n" in out
    assert "kind:           code (1 of 1 lines look like code)\n" in out
    assert "rules, in order" not in out
    out = explain(config, "--text", "午饭吃什么？")
    assert "decided by:     default\n" in out
    assert "system prompt:  the model's: You are a helpful assistant.\n" in out
    out = explain(config, "--text", "", "--kind", "image")
    assert "decided by:     by_kind.image\n" in out
    assert "kind:           image\n" in out


def test_cli_route_explain_user_platform_conversation_department(tmp_path: Path) -> None:
    """The sender, platform, direct conversation and departments can be given."""
    rules = [
        {"match": {"department": ["d1"]}, "model": "finance"},
        {"match": {"user": "u9", "platform": "dingtalk", "conversation": "c7"}, "model": "coder"},
    ]
    config = write_config(tmp_path, rules=rules)
    out = explain(config, "--text", "hi", "--department", "d1")
    assert "decided by:     rule #1\n" in out
    out = explain(
        config, "--text", "hi", "--user", "u9", "--platform", "dingtalk", "--conversation", "c7"
    )
    assert "decided by:     rule #2\n" in out
    assert "why:            platform dingtalk, conversation listed, user listed\n" in out


def test_cli_route_explain_shows_a_rolled_back_canary(tmp_path: Path) -> None:
    """After a rollback the explanation sends even the canary group to the baseline."""
    config = write_config(tmp_path, rules=CANARY_RULES)
    canary(config, "rollback", "--rule", "next")
    out = explain(config, "--text", "hello", "--group", "cidTest")
    assert "model:          qwen\n" in out
    assert "why:            kind text; canary rolled back\n" in out


def test_cli_route_explain_bad_config_exits_2(tmp_path: Path) -> None:
    """A configuration problem is one line and exit status 2."""
    path = tmp_path / "bad.yaml"
    path.write_text("models: {}\n", encoding="utf-8")
    result = RUNNER.invoke(route_app, ["explain", "-c", str(path), "--text", "x"])
    assert result.exit_code == 2
    assert "config error: models: at least one model is required" in result.output


def test_cli_canary_rollback_promote_reset_and_status(tmp_path: Path) -> None:
    """Each decision lands in the file the gateway reads, and status shows it."""
    config = write_config(tmp_path, rules=CANARY_RULES)
    state = tmp_path / "imrelay.db.canary.json"
    out = canary(config, "status")
    assert f"decisions file: {state}" in out
    assert "next: qwen (baseline) vs qwen-next (candidate)" in out
    assert "  status:     active\n" in out
    assert "  traffic:    10% of conversations and groups cidTest (while active)" in out
    assert "  limits:     error rate +5.0%, latency x1.5, at least 20 requests per 300s" in out
    out = canary(config, "rollback", "--reason", "latency spike")
    assert "next: rolled back: all of its traffic now goes to qwen" in out
    saved = json.loads(state.read_text(encoding="utf-8"))["rules"]["next"]
    assert (saved["status"], saved["candidate"], saved["reason"]) == (
        "rolled_back",
        "qwen-next",
        "latency spike",
    )
    assert saved["by"].startswith("cli")
    assert "  status:     rolled back\n" in canary(config, "status", "--rule", "next")
    assert "all of its traffic now goes to qwen-next" in canary(config, "promote")
    out = canary(config, "status")
    assert "  status:     promoted\n" in out
    assert "by cli" in out
    assert "promoted by an operator" in out
    assert "the canary is active again" in canary(config, "reset")
    assert "  status:     active\n" in canary(config, "status")


def test_cli_canary_status_shows_the_latest_evaluation_and_stale_decisions(
    tmp_path: Path,
) -> None:
    """The gateway's last evaluation is shown; a decision about another candidate is flagged."""
    config = write_config(tmp_path, rules=CANARY_RULES)
    store = CanaryStateFile(tmp_path / "imrelay.db.canary.json")
    evaluation = Evaluation(
        "keep", "within limits", ModelSample(30, 1, 3.0, 29), ModelSample(300, 3)
    )
    store.note_evaluation("next", evaluation, 1_700_000_000.0)
    store.decide("next", CanaryDecision("old-model", "rolled_back", 1_700_000_000.0, "imrelay"))
    out = canary(config, "status")
    assert (
        "  evaluated:  2023-11-14 22:13:20 UTC: keep: within limits [candidate 30 requests, "
        in out
    )
    assert "3.3% errors, mean 0.103s; baseline 300 requests, 1.0% errors, mean n/a]" in out
    assert "  ignored:    a decision about old-model, not this candidate" in out
    assert "  status:     active\n" in out


def test_cli_canary_rule_choice_and_errors(tmp_path: Path) -> None:
    """--rule is needed with several canaries and must name one; no canary is said plainly."""
    two = [*CANARY_RULES, {**CANARY_RULES[1], "name": "other", "match": {"kind": "image"}}]
    config = write_config(tmp_path, rules=two)
    out = canary(config, "rollback", code=2)
    assert "error: --rule is required; rules with a canary: next, other" in out
    out = canary(config, "promote", "--rule", "fin", code=2)
    assert "error: no rule named 'fin' has a canary; rules with a canary: next, other" in out
    (tmp_path / "plain").mkdir()
    plain = write_config(tmp_path / "plain")
    assert "no routing rule has a canary" in canary(plain, "status")
    assert "rules with a canary: none" in canary(plain, "rollback", "--rule", "x", code=2)


def test_cli_canary_memory_storage_and_damaged_file(tmp_path: Path) -> None:
    """memory:// storage has no decisions file; a damaged file is reported, exit 2."""
    config = write_config(tmp_path, rules=CANARY_RULES, storage="memory://")
    assert "decisions file: none (memory:// storage)" in canary(config, "status")
    out = canary(config, "rollback", code=2)
    assert "storage.url is memory://" in out
    config = write_config(tmp_path, rules=CANARY_RULES, storage="redis://localhost:6379/0")
    out = canary(config, "status", code=2)
    assert "error: storage.url: canary state needs storage.url sqlite:///<path>" in out
    config = write_config(tmp_path, rules=CANARY_RULES)
    (tmp_path / "imrelay.db.canary.json").write_text("{oops", encoding="utf-8")
    assert "error: invalid canary state file" in canary(config, "status", code=2)
    assert "error: invalid canary state file" in canary(config, "promote", code=2)


def test_cli_canary_buckets_match_the_router(tmp_path: Path) -> None:
    """A conversation in the canary's percent is explained as a candidate (same hash)."""
    config = write_config(tmp_path, rules=CANARY_RULES)
    inside = next(f"c{i}" for i in range(1000) if canary_bucket("next", "dingtalk", f"c{i}") < 10)
    out = explain(config, "--text", "hi", "--conversation", inside)
    assert "why:            kind text; canary 10%\n" in out


@pytest.mark.parametrize("app", ["route_app", "canary_app"])
def test_cli_route_apps_run_as_commands(tmp_path: Path, app: str) -> None:
    """The sub-apps run in a fresh interpreter as ``imrelay route|canary`` will."""
    config = write_config(tmp_path, rules=CANARY_RULES)
    args = (
        ["explain", "-c", str(config), "--text", "hi"]
        if app == "route_app"
        else ["status", "-c", str(config)]
    )
    result = subprocess.run(
        [sys.executable, "-c", f"from imrelay.cli.route import {app}; {app}()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "next" in result.stdout
