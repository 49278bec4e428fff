"""Configuration hot reload: SIGHUP and the /reload admin command, on a running gateway."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from _support import wait_for
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(
    dt: DingTalkSimulator, models: dict[str, ModelSimulator], tmp: Path, **pipeline: Any
) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"url": f"sqlite:///{tmp / 'r.db'}"},
        "platforms": {"dingtalk": {
            "type": "dingtalk", "app_key": dt.app_key, "app_secret": dt.app_secret,
            "api_base": dt.base_url, "reply_format": "text",
        }},
        "models": {
            name: {"type": "openai", "base_url": m.base_url, "model": "sim-model"}
            for name, m in models.items()
        },
        "routing": {"default": "first"},
        "pipeline": {"help_text": "help v1", **pipeline},
        "security": {
            "audit": {"url": f"sqlite:///{tmp / 'audit.db'}"},
            "access": {"default": {"admins": ["boss"]}},
        },
        "logging": {"format": "text", "level": "INFO"},
    }  # fmt: skip


async def ask(dt: DingTalkSimulator, text: str, sender: str = "user") -> str:
    ids = await dt.send_message(text, sender_id=sender)
    await wait_for(lambda: bool(dt.replies(ids["msg_id"])), timeout=15, what=repr(text))
    return str(dt.replies(ids["msg_id"])[0]["body"]["text"]["content"])


async def test_reload_sighup_applies_a_good_file_and_refuses_a_broken_one(
    tmp_path: Path,
) -> None:
    """SIGHUP re-reads the file: a valid change applies, a broken file changes nothing."""
    async with (
        DingTalkSimulator() as dt,
        ModelSimulator(model_names=("sim-model",)) as first,
        ModelSimulator() as second,
    ):
        data = config(dt, {"first": first, "second": second}, tmp_path)
        path = tmp_path / "imrelay.json"
        path.write_text(json.dumps(data))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imrelay", "run", "-c", str(path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
        )  # fmt: skip
        try:
            await wait_for(lambda: dt.active_connections() == 1, timeout=30)
            assert await ask(dt, "/help") == "help v1"
            assert (await ask(dt, "q1")).startswith("echo: q1")
            assert (len(first.requests), len(second.requests)) == (1, 0)
            # A valid change: new help text, and the default route moves to the second model.
            data["pipeline"]["help_text"] = "help v2"
            data["routing"]["default"] = "second"
            path.write_text(json.dumps(data))
            proc.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                return await ask(dt, "/help") == "help v2"

            await wait_for(reloaded, timeout=15, what="the new help text")
            await ask(dt, "q2")
            assert (len(first.requests), len(second.requests)) == (1, 1)
            # A broken file: nothing changes and the gateway keeps running.
            path.write_text('{"models": [')
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert proc.returncode is None
            assert await ask(dt, "/help") == "help v2"
            # The /reload admin command, from an admin, with the file fixed again.
            data["pipeline"]["help_text"] = "help v3"
            path.write_text(json.dumps(data))
            assert "only administrators" in await ask(dt, "/reload", sender="mallory")
            assert await ask(dt, "/help") == "help v2"
            assert (await ask(dt, "/reload", sender="boss")).startswith("configuration reloaded")
            assert await ask(dt, "/help") == "help v3"
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0
    log = err.decode()
    assert "reload refused, the running configuration stays" in log
    assert "configuration reloaded" in log
