"""The ``imrelay`` command as a user runs it: in a subprocess, over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from _support import wait_for
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator

IMRELAY = [sys.executable, "-m", "imrelay"]


async def run_cli(
    *args: str, timeout: float = 30.0, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run ``imrelay ARGS`` to completion; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *IMRELAY, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def sim_config(
    dt: DingTalkSimulator, model: ModelSimulator, tmp_path: Path, **extra: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"url": f"sqlite:///{tmp_path / 'cli.db'}"},
        "platforms": {"dingtalk": {
            "type": "dingtalk", "app_key": dt.app_key, "app_secret": dt.app_secret,
            "api_base": dt.base_url, "backoff_initial_s": 0.05, "backoff_max_s": 0.5,
        }},
        "models": {"default": {
            "type": "openai", "base_url": model.base_url, "model": "sim-model",
        }},
    }  # fmt: skip
    data.update(extra)
    return data


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "platforms:\n  dingtalk:\n    type: dingtalk\n    app_key: k\n"
            "models:\n  default: {type: echo}\n",
            ["config error: platforms.dingtalk.app_secret: field required"],
        ),
        (
            "platforms:\n  dt: {type: dingtalk, app_key: k, app_secret: s,"
            " mode: carrier-pigeon}\n"
            "models:\n  default: {type: echo}\n",
            ["config error: platforms.dt.mode: input should be 'stream' or 'webhook'"],
        ),
        (
            "models:\n  default: {type: openai, base_url: 'http://x/v1', model: m,"
            " temperature: 5}\n"
            "routing: {default: nowhere}\nserver: {port: -1}\n",
            [
                "config error: models.default.temperature:"
                " input should be less than or equal to 2",
                "config error: server.port: input should be greater than or equal to 0",
            ],
        ),
        ("platforms: [\n", ["invalid yaml at line 2"]),
        ("- just\n- a list\n", ["top level"]),
    ],
)
async def test_run_bad_config_exits_2_with_named_keys(
    tmp_path: Path, content: str, expected: list[str]
) -> None:
    """A bad configuration file exits 2 with one line per problem naming the key, no traceback."""
    path = tmp_path / "imrelay.yaml"
    path.write_text(content)
    code, out, err = await run_cli("run", "-c", str(path))
    assert code == 2
    assert "Traceback" not in err + out
    for line in expected:
        assert line in err
    assert all(ln.startswith("config error: ") for ln in err.strip().splitlines())


async def test_run_missing_config_file_exits_2(tmp_path: Path) -> None:
    """With no configuration anywhere, the error lists where it looked."""
    code, _, err = await run_cli(
        "run", env={"HOME": str(tmp_path), "IMRELAY_CONFIG": str(tmp_path / "absent.yaml")}
    )
    assert code == 2
    assert "Traceback" not in err
    assert "absent.yaml" in err


async def test_check_reports_ok_against_simulators(
    dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """`imrelay check` probes the model and the platform credentials and prints ok for both."""
    path = write_config(tmp_path / "c.json", sim_config(dingtalk_sim, model_sim, tmp_path))
    code, out, err = await run_cli("check", "-c", str(path))
    assert code == 0, out + err
    assert out.count("ok") >= 3  # config, model, platform
    assert "failed" not in out


async def test_check_reports_failures_without_printing_secrets(
    dingtalk_sim: DingTalkSimulator, tmp_path: Path
) -> None:
    """Wrong credentials and an unreachable model are reported as failed; no secret is shown."""
    data = sim_config(dingtalk_sim, ModelSimulator(), tmp_path)
    secret = "wrong-secret-4f1c9e"
    data["platforms"]["dingtalk"]["app_secret"] = secret
    data["models"]["default"]["base_url"] = "http://127.0.0.1:9/v1"
    data["models"]["default"]["api_key"] = "sk-test-key-77aa"
    path = write_config(tmp_path / "c.json", data)
    code, out, err = await run_cli("check", "-c", str(path))
    assert code == 1
    assert out.count("failed") == 2
    assert secret not in out + err
    assert "sk-test-key-77aa" not in out + err


async def test_run_serves_until_sigterm_with_ecs_logs(
    dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """`imrelay run` answers, logs ECS JSON lines without secrets, and exits 0 on SIGTERM."""
    data = sim_config(dingtalk_sim, model_sim, tmp_path, logging={"level": "DEBUG"})
    path = write_config(tmp_path / "c.json", data)
    proc = await asyncio.create_subprocess_exec(
        *IMRELAY, "run", "-c", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_for(lambda: dingtalk_sim.active_connections() == 1, timeout=20)
        ids = await dingtalk_sim.send_message("secret-free hello")
        await wait_for(lambda: bool(dingtalk_sim.replies(ids["msg_id"])))
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert lines, "no log lines"
    assert all("@timestamp" in ln and "log.level" in ln and "message" in ln for ln in lines)
    per_message = [ln for ln in lines if ln.get("message.id") == ids["msg_id"]]
    assert per_message, "no line carries the message id"
    assert all(ln.get("platform") == "dingtalk" for ln in per_message)
    assert dingtalk_sim.app_secret not in err.decode()
    assert "secret-free hello" not in err.decode()  # text is logged only when configured


async def test_demo_runs_answers_and_stops_cleanly(tmp_path: Path) -> None:
    """`imrelay demo` starts the simulators and the gateway, answers, and stops on Ctrl-C."""
    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        *IMRELAY, "demo", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        page = ""
        async with asyncio.timeout(40):
            while not page:
                line = (await proc.stdout.readline()).decode()
                assert line, "demo exited before it was ready"
                if "Chat with the bot:" in line:
                    page = line.split("Chat with the bot:")[1].strip()
        async with aiohttp.ClientSession() as http:
            async with http.get(page) as resp:
                assert resp.status == 200
                assert "<html" in (await resp.text()).lower()
            # The demo streams answers into AI cards: a card names its conversation, not the
            # message, so the reply is found by conversation.
            message = {
                "text": "hi demo",
                "conversation_id": "cidDemoTest",
                "conversation_type": "2",
                "at_bot": True,
            }
            async with http.post(f"{page}_sim/messages", json=message) as resp:
                assert resp.status == 200

            async def replied() -> bool:
                params = {"conversation_id": "cidDemoTest"}
                async with http.get(f"{page}_sim/replies", params=params) as resp:
                    replies = (await resp.json())["replies"]
                return any("hi demo" in json.dumps(r, ensure_ascii=False) for r in replies)

            await wait_for(replied, timeout=15)
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0


async def test_run_with_refused_credentials_exits_1_without_the_secret(
    dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """Credentials refused on the first connection stop `imrelay run` with status 1."""
    data = sim_config(dingtalk_sim, model_sim, tmp_path)
    secret = "not-the-secret-93c1"
    data["platforms"]["dingtalk"]["app_secret"] = secret
    path = write_config(tmp_path / "c.json", data)
    code, out, err = await run_cli("run", "-c", str(path), "--log-format", "text")
    assert code == 1
    assert "credentials refused" in err
    assert "Traceback" not in err
    assert secret not in out + err
