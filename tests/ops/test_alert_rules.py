"""The shipped Prometheus alert rules, checked and unit-tested by the real promtool."""

from __future__ import annotations

import asyncio
import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from _ops_support import DEPLOY, PrometheusTools

RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"

# installing promtool (first use of the fixture) may take a while on a cold machine
pytestmark = pytest.mark.timeout(300)

REQUIRED = {
    "HighMessageLatency",
    "ModelSuccessRateLow",
    "HighMessageErrorRate",
    "PlatformConnectionDown",
    "InboxBacklogGrowing",
    "InboxOldestMessageOld",
    "SecretRotationDue",
    "HighCPUUsage",
    "HighMemoryUsage",
}


def load_alerts(path: Path = RULES) -> list[dict[str, Any]]:
    """Every alerting rule in a rules file."""
    data = yaml.safe_load(path.read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command with a time limit; return its result."""
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_alert_rules_pass_promtool_check(prometheus_tools: PrometheusTools) -> None:
    """`promtool check rules` accepts alerts.yml and finds every rule."""
    done = run(prometheus_tools.promtool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(load_alerts())} rules found" in done.stdout


def test_alert_rules_pass_promtool_unit_tests(prometheus_tools: PrometheusTools) -> None:
    """`promtool test rules` passes every unit test in alerts_test.yml."""
    done = run(prometheus_tools.promtool, "test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_example_prometheus_config_is_valid(prometheus_tools: PrometheusTools) -> None:
    """`promtool check config` accepts the example prometheus.yml and its rule file."""
    done = run(prometheus_tools.promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["imrelay"]


def test_alert_rules_cover_the_guide_with_annotations() -> None:
    """Every required alert exists, with a severity and summary/description annotations."""
    alerts = {rule["alert"]: rule for rule in load_alerts()}
    assert set(alerts) >= REQUIRED
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"].split()) >= 10, name
        assert "for" in rule, name


def _squash(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def test_alert_rules_use_the_guide_thresholds() -> None:
    """The thresholds and windows are the integration guide's, computed the robust way."""
    alerts = {rule["alert"]: rule for rule in load_alerts()}
    latency = _squash(alerts["HighMessageLatency"]["expr"])
    assert latency.startswith("histogram_quantile(0.99,")
    assert "rate(imrelay_message_processing_latency_seconds_bucket[5m])" in latency
    assert latency.endswith(">0.5")
    assert alerts["HighMessageLatency"]["for"] == "5m"
    success = _squash(alerts["ModelSuccessRateLow"]["expr"])
    assert 'imrelay_model_requests_total{outcome="ok"}[10m]' in success
    assert success.endswith("<0.999")
    assert _squash(alerts["PlatformConnectionDown"]["expr"]) == "imrelay_connection_up==0"
    assert alerts["PlatformConnectionDown"]["for"] == "1m"
    assert _squash(alerts["InboxOldestMessageOld"]["expr"]).endswith(">60")
    assert _squash(alerts["HighCPUUsage"]["expr"]).endswith(">0.7")
    assert _squash(alerts["HighMemoryUsage"]["expr"]).endswith(">0.8")
    assert "imrelay_secret_age_seconds" in alerts["SecretRotationDue"]["expr"]


def test_alert_rule_tests_cover_every_alert_firing_and_quiet() -> None:
    """alerts_test.yml has, for every alert, a case where it fires and one where it must not."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in load_alerts()}
    assert firing == names
    assert quiet == names


async def test_alert_rule_tests_fail_when_an_alert_never_fires(
    prometheus_tools: PrometheusTools, tmp_path: Path
) -> None:
    """Replacing any one alert's expression by one that never fires breaks the unit tests."""
    data = yaml.safe_load(RULES.read_text())
    names = [rule["alert"] for rule in load_alerts()]

    async def mutated(name: str) -> tuple[str, int, str]:
        rules = copy.deepcopy(data)
        for group in rules["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == name:
                    rule["expr"] = "vector(0) > 1"
        case = tmp_path / name
        case.mkdir()
        (case / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        shutil.copy(RULE_TESTS, case / "alerts_test.yml")
        proc = await asyncio.create_subprocess_exec(
            prometheus_tools.promtool, "test", "rules", str(case / "alerts_test.yml"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return name, proc.returncode, out.decode()

    results = await asyncio.gather(*(mutated(name) for name in names))
    for name, code, out in results:
        assert code != 0, f"{name}: the unit tests still pass with a rule that never fires"
        assert f"alertname: {name}" in out, out
