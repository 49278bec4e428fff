"""``imrelay bench`` smoke runs: the command as a user runs it, a few seconds at a low rate.

The command starts its own simulators and bot processes over loopback sockets; these runs only
prove that the instrument works end to end and reports every figure (the full benchmark runs
are not part of the suite, see bench/README.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = [sys.executable, "-m", "imrelay.cli.bench"]
pytestmark = pytest.mark.slow


async def run_bench(
    *args: str, timeout: float = 50.0, cwd: Path | None = None
) -> tuple[int, str, str]:
    """Run the bench command to completion; return (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMRELAY_")}
    proc = await asyncio.create_subprocess_exec(
        *BENCH, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env=env, cwd=cwd,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def check_result(result: dict[str, Any], sent: int) -> None:
    """Every figure is present; nothing lost, doubled or unmatched."""
    assert result["messages_sent"] == sent
    assert result["messages_answered"] == sent
    assert result["lost"] == 0
    assert result["doubled"] == 0
    assert result["unmatched_replies"] == 0
    for key in ("p50", "p95", "p99", "max"):
        assert result["latency_ms"][key] > 0
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert result["overhead_samples"] == sent
    assert result["overhead_ms"]["p99"] <= result["latency_ms"]["max"]
    assert result["throughput"] > 0
    assert result["bot"]["peak_rss_mb"] > 10
    assert result["bot"]["cpu_s"] > 0
    assert set(result["rig_cpu_s"]) == {"dingtalk simulator", "model simulator", "bench driver"}


async def test_bench_smoke_run_reports_every_figure(tmp_path: Path) -> None:
    """A short run of every message kind is answered in full, in order, once each; the run
    leaves nothing in the current directory (the inbox and the audit log live in its own)."""
    code, out, err = await run_bench(
        "--rate", "20", "--duration", "2", "--conversations", "4",
        "--mix", "text=60,long=10,code=10,picture=20", "--grace", "5", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []
    doc = json.loads(out)
    assert doc["command"][:2] == ["imrelay", "bench"]
    assert doc["machine"]["cores"] >= 1
    assert doc["options"]["mix"] == "text=60,long=10,code=10,picture=20"
    assert doc["comparison"] is None
    result = doc["results"]["imrelay"]
    check_result(result, 40)
    assert result["out_of_order"] == 0
    assert result["webhook"] is None


async def test_bench_smoke_max_search_runs_several_steps() -> None:
    """--max runs step after step on the same driver (a step's connections closed, the next
    step's opened) and reports the rate search."""
    code, out, err = await run_bench(
        "--max", "--start-rate", "20", "--step-s", "1", "--step-factor", "2",
        "--refine", "1", "--slo-ms", "1", "--conversations", "4", "--grace", "3", "--json",
        timeout=90,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)["results"]["imrelay"]
    assert len(result["steps"]) >= 2
    assert result["lost"] == 0
    assert result["doubled"] == 0


async def test_bench_smoke_webhook_ingress_reports_responses() -> None:
    """In webhook mode every signed request is accepted and its response time reported."""
    code, out, err = await run_bench(
        "--ingress", "webhook", "--rate", "20", "--duration", "1.5", "--conversations", "3",
        "--grace", "5", "--json",
    )  # fmt: skip
    if "webhook mode is not available yet" in err:  # until the webhook connector lands
        pytest.skip("the gateway does not accept webhook mode yet")
    assert code == 0, err
    result = json.loads(out)["results"]["imrelay"]
    check_result(result, 30)
    assert result["webhook"]["accepted"] == 30
    assert result["webhook"]["refused"] == 0
    assert result["webhook"]["response_ms"]["p99"] > 0


async def test_bench_smoke_baseline_side_by_side() -> None:
    """``--baseline official-sdk`` runs the same load against the SDK bot and compares."""
    code, out, err = await run_bench(
        "--baseline", "official-sdk", "--rate", "20", "--duration", "1",
        "--conversations", "2", "--grace", "5",
    )  # fmt: skip
    assert code == 0, err
    assert "official-sdk" in out
    assert "imrelay / official-sdk" in out
    code, out, err = await run_bench(
        "--baseline", "official-sdk", "--rate", "20", "--duration", "1",
        "--conversations", "2", "--grace", "5", "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    check_result(doc["results"]["imrelay"], 20)
    check_result(doc["results"]["official-sdk"], 20)
    assert doc["comparison"]["throughput_ratio"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ingress", "pigeon"], "--ingress: expected stream or webhook"),
        (["--baseline", "homegrown"], "--baseline: expected official-sdk"),
        (["--baseline", "official-sdk", "--ingress", "webhook"], "Stream mode only"),
        (["--mix", "text=1,video=2"], "unknown kind 'video'"),
        (["--rate", "0"], "--rate: must be positive"),
    ],
)
async def test_bench_invalid_options_exit_2(args: list[str], message: str) -> None:
    """Invalid options are refused with status 2 and a message, before anything starts."""
    code, out, err = await run_bench(*args, timeout=20)
    assert code == 2
    assert message in err
    assert out == ""
