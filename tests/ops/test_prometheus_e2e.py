"""A real Prometheus scrapes a running gateway and fires the shipped latency alert.

The rules Prometheus loads are the shipped alerts.yml with one change: HighMessageLatency waits
``for: 2s`` instead of 5 minutes, so the test sees it go pending, then firing, within seconds.
Its expression is the shipped one, unchanged (a 5-minute rate window works on a few seconds of
data: rate() needs two samples). Scrapes and rule evaluations run every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from _ops_support import DEPLOY, PrometheusTools, concrete, expressions, load_dashboard

from _support import TIMEOUT_FACTOR
from imrelay.app import Gateway
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator

ALERT = "HighMessageLatency"
TEST_FOR = "2s"

pytestmark = pytest.mark.timeout(300)  # the first use of the binaries may install them


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_prometheus_files(directory: Path, target_port: int) -> Path:
    """prometheus.yml (1 s scrapes and evaluations) and the rules; return the config path."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    changed = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == ALERT:
                assert rule["for"] == "5m"
                rule["for"] = TEST_FOR
                changed += 1
    assert changed == 1
    (directory / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "imrelay",
                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
            }
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class PrometheusAPI:
    """The HTTP API of a running Prometheus."""

    def __init__(self, http: aiohttp.ClientSession, base: str, log: Path) -> None:
        self.http = http
        self.base = base
        self.log = log

    async def get(self, path: str, **params: str) -> Any:
        """GET an API path; return the decoded body."""
        async with self.http.get(self.base + path, params=params) as resp:
            return await resp.json()

    async def alert_states(self, name: str) -> list[dict[str, Any]]:
        """The pending and firing instances of alert ``name``."""
        body = await self.get("/api/v1/alerts")
        assert body["status"] == "success", body
        return [a for a in body["data"]["alerts"] if a["labels"]["alertname"] == name]

    async def query(self, expr: str) -> dict[str, Any]:
        """An instant query; the whole response (status, data or error)."""
        result: dict[str, Any] = await self.get("/api/v1/query", query=expr)
        return result


@contextlib.asynccontextmanager
async def run_prometheus(
    tools: PrometheusTools, directory: Path, target_port: int
) -> AsyncIterator[PrometheusAPI]:
    """Start Prometheus on a loopback port, wait until it is ready, stop it afterwards."""
    config = write_prometheus_files(directory, target_port)
    port = free_port()
    log = directory / "prometheus.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            tools.prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            api = PrometheusAPI(http, f"http://127.0.0.1:{port}", log)
            deadline = time.monotonic() + 20 * TIMEOUT_FACTOR
            while True:
                if proc.returncode is not None:
                    pytest.fail(f"prometheus exited {proc.returncode}:\n{log.read_text()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(api.base + "/-/ready") as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline:
                    pytest.fail(f"prometheus not ready after 20 s:\n{log.read_text()}")
                await asyncio.sleep(0.05)
            yield api
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_prometheus_fires_high_latency_from_a_running_gateway(
    prometheus_tools: PrometheusTools,
    gateway: Gateway,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
    tmp_path: Path,
) -> None:
    """Slow model replies drive the shipped P99 rule to pending, then firing, in Prometheus."""
    model_sim.set_behaviour(latency_ms=800)
    async with run_prometheus(prometheus_tools, tmp_path, gateway.port) as api:
        seen: list[str] = []
        firing: dict[str, Any] = {}
        sent = 0
        next_send = 0.0
        deadline = time.monotonic() + 50 * TIMEOUT_FACTOR
        while not firing:
            now = time.monotonic()
            if now > deadline:
                pytest.fail(f"{ALERT} states seen: {seen}; log:\n{api.log.read_text()}")
            if now >= next_send:  # five messages a second, each in its own conversation
                await dingtalk_sim.send_message(f"question {sent}", sender_id=f"user{sent}")
                sent += 1
                next_send = now + 0.2
            for alert in await api.alert_states(ALERT):
                if not seen or seen[-1] != alert["state"]:
                    seen.append(alert["state"])
                if alert["state"] == "firing":
                    firing = alert
            await asyncio.sleep(0.05)
        assert seen == ["pending", "firing"]
        assert firing["labels"]["platform"] == "dingtalk"
        assert firing["labels"]["severity"] == "warning"
        assert firing["annotations"]["summary"] == (
            "P99 message processing latency above 500 ms on dingtalk"
        )
        assert float(firing["value"]) > 0.5
        assert len(dingtalk_sim.replies()) >= 1

        # every shipped rule evaluates without error against the gateway's real series
        body = await api.get("/api/v1/rules")
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        shipped = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
        assert sorted(r["name"] for r in rules) == sorted(
            r["alert"] for g in shipped["groups"] for r in g["rules"]
        )
        for rule in rules:
            assert rule["health"] == "ok", json.dumps(rule)

        # every dashboard expression is accepted by this Prometheus
        for expr in expressions(load_dashboard()):
            answer = await api.query(concrete(expr))
            assert answer["status"] == "success", (expr, answer)
        p99 = await api.query(
            concrete(
                "histogram_quantile(0.99, sum by (le) (rate("
                "imrelay_message_processing_latency_seconds_bucket[1m])))"
            )
        )
        assert float(p99["data"]["result"][0]["value"][1]) > 0.5

        # the operational series are scraped from the gateway
        for series in (
            'process_cpu_seconds_total{job="imrelay"}',
            'process_resident_memory_bytes{job="imrelay"}',
            "imrelay_process_memory_limit_bytes",
            "imrelay_process_cpu_limit_cores",
            "imrelay_inbox_oldest_age_seconds",
            'imrelay_gateway_overhead_seconds_count{platform="dingtalk"}',
            'imrelay_model_requests_total{outcome="ok"}',
        ):
            answer = await api.query(series)
            assert answer["data"]["result"], series
