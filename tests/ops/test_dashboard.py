"""The Grafana dashboard: a valid JSON model whose queries use only metrics imrelay exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from _ops_support import PrometheusTools, concrete, expressions, load_dashboard, query_panels
from prometheus_client import CollectorRegistry

from imrelay.observability.metrics import Metrics

pytestmark = pytest.mark.timeout(300)  # the first use of promtool may install it

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, labels and keywords left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = _GROUPING.sub("", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def exported_series() -> set[str]:
    """Names of every series a gateway's Metrics registry can export."""
    registry = CollectorRegistry()
    Metrics(registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }


def test_dashboard_metric_name_parser_finds_selectors() -> None:
    """The name parser keeps selected metrics and drops functions, labels and keywords."""
    expr = (
        'sum by (model) (rate(a_total{outcome="ok", x=~"$platform"}[5m])) / on (job) '
        "clamp_max(b_cores, 1) > 0.7 and c_seconds_bucket offset 5m"
    )
    assert metric_names(expr) == {"a_total", "b_cores", "c_seconds_bucket"}


def test_dashboard_is_a_valid_grafana_model() -> None:
    """The JSON model has what Grafana needs to import it, and a sane non-overlapping layout."""
    d = load_dashboard()
    assert d["title"] == "imrelay"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"])
    assert isinstance(d["schemaVersion"], int)
    assert d["schemaVersion"] >= 36
    assert d["id"] is None  # importable into any Grafana
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in d["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0
        assert pos["w"] > 0
        assert pos["h"] > 0
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for panel in query_panels(d):
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        for target in panel["targets"]:
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables or var == "__rate_interval", (panel["title"], var)


def test_dashboard_queries_only_exported_metrics() -> None:
    """Every metric a panel queries is one imrelay exports (no typo, no removed metric)."""
    exported = exported_series()
    used: set[str] = set()
    for expr in expressions(load_dashboard()):
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr}: unknown {sorted(names - exported)}"
        used |= names
    assert len(used) >= 15


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    """Traffic, P50/P99 by stage, model success rate, connections, backlog and throttling."""
    exprs = [re.sub(r"\s+", "", e) for e in expressions(load_dashboard())]

    def has(*parts: str) -> bool:
        return any(all(p in e for p in parts) for e in exprs)

    assert has("rate(imrelay_messages_received_total")
    for q in ("0.5", "0.99"):
        assert has(f"histogram_quantile({q},", "by(le,stage)", "imrelay_stage_latency_seconds")
        assert has(f"histogram_quantile({q},", "imrelay_message_processing_latency_seconds")
    assert has('imrelay_model_requests_total{outcome="ok"}', "/")
    assert has("imrelay_connection_up")
    assert has("imrelay_inbox_depth")
    assert has("imrelay_inbox_oldest_age_seconds")
    assert has("imrelay_platform_throttled_total")
    assert has("imrelay_gateway_overhead_seconds_bucket")
    assert has("process_cpu_seconds_total")
    assert has("process_resident_memory_bytes")


def test_dashboard_expressions_pass_promtool(
    prometheus_tools: PrometheusTools, tmp_path: Path
) -> None:
    """Every expression parses as PromQL: promtool checks them as recording rules."""
    exprs = expressions(load_dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": concrete(e)}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        [prometheus_tools.promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout
