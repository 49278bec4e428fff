"""Fixtures for the operations tests: the real Prometheus tools, and the deploy/ files."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from _ops_support import ROOT, PrometheusTools


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    """promtool and prometheus, installed by scripts/ensure-prometheus when missing.

    Fails (never skips) when they cannot be installed: CI must prove the rules.
    """
    script = ROOT / "scripts" / "ensure-prometheus"
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=900, check=False)
    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    if done.returncode != 0 or promtool is None or prometheus is None:
        pytest.fail(
            "promtool/prometheus are required and could not be installed by "
            f"scripts/ensure-prometheus (exit {done.returncode}):\n{done.stderr[-2000:]}",
            pytrace=False,
        )
    return PrometheusTools(promtool=promtool, prometheus=prometheus)
