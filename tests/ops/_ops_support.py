"""Helpers shared by the operations tests (a unique name: conftest.py names are ambiguous)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "imrelay.json"

# what the Grafana variables stand for when an expression is checked outside Grafana
SUBSTITUTIONS = {"$__rate_interval": "1m", "$platform": ".*"}


@dataclass(frozen=True)
class PrometheusTools:
    """Paths of the ``promtool`` and ``prometheus`` binaries."""

    promtool: str
    prometheus: str


def load_dashboard() -> dict[str, Any]:
    """The dashboard's JSON model."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries Prometheus (rows excluded)."""
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of every panel, in order."""
    return [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]


def concrete(expr: str) -> str:
    """``expr`` with Grafana's variables replaced, as Prometheus would receive it."""
    for var, value in SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr
