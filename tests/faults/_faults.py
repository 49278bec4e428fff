"""Helpers for the fault-injection suite: a gateway subprocess, a load driver, the checks."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator

TOTALS: dict[str, int] = {"scenarios": 0, "messages": 0, "lost": 0, "doubled": 0, "reordered": 0}
REPORT: list[str] = []


def report(line: str) -> None:
    """Add a line to the suite's closing report (printed even when output is captured)."""
    REPORT.append(line)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_config(
    dt: DingTalkSimulator,
    models: dict[str, dict[str, Any]],
    tmp: Path,
    *,
    port: int,
    routing: dict[str, Any] | None = None,
    pipeline: dict[str, Any] | None = None,
) -> Path:
    """Write a configuration for a gateway subprocess wired to the simulators."""
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"url": f"sqlite:///{tmp / 'faults.db'}"},
        "platforms": {
            "dingtalk": {
                "type": "dingtalk",
                "app_key": dt.app_key,
                "app_secret": dt.app_secret,
                "api_base": dt.base_url,
                "heartbeat_s": 1.0,
                "pong_timeout_s": 0.5,
                "backoff_initial_s": 0.05,
                "backoff_max_s": 0.5,
                "healthy_after_s": 1.0,
                "rate_limit": {"per_conversation_per_minute": 100000, "app_qps": 100000},
            }
        },
        "models": models,
        "routing": routing or {"default": "default"},
        "pipeline": {"max_concurrency": 16, "drain_timeout_s": 2, **(pipeline or {})},
        "logging": {"format": "text", "level": "WARNING"},
        "security": {
            "audit": {"url": f"sqlite:///{tmp / 'faults-audit.db'}"},
            "rate_limit": {"enabled": False},
        },
    }
    path = tmp / "faults.json"
    path.write_text(json.dumps(config))
    return path


def openai_model(sim: ModelSimulator, **extra: Any) -> dict[str, Any]:
    return {"type": "openai", "base_url": sim.base_url, "model": "sim-model", "timeout_s": 10,
            "retry_backoff_s": 0.02, **extra}  # fmt: skip


class GatewayProcess:
    """``imrelay run`` in a subprocess that can be killed with SIGKILL and restarted."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.kills = 0

    async def start(self, ready_timeout: float = 30.0) -> None:
        """Start the process and wait for its own /healthz (the pid must match).

        If another process took the port between choosing and binding it, the gateway exits
        with "address already in use": a new port is chosen and the start retried.
        """
        for _ in range(3):
            if await self._start_once(ready_timeout):
                return
            config = json.loads(self.config.read_text())
            self.port = config["server"]["port"] = free_port()
            self.config.write_text(json.dumps(config))
        raise AssertionError("gateway could not bind a port:\n" + self.log.read_text()[-3000:])

    async def _start_once(self, ready_timeout: float) -> bool:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "imrelay", "run", "-c", str(self.config),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + ready_timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    tail = self.log.read_bytes()[offset:].decode(errors="replace")
                    if "address already in use" in tail:
                        return False
                    raise AssertionError("gateway exited at start:\n" + tail[-3000:])
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/healthz") as resp:
                        if resp.status == 200 and (await resp.json()).get("pid") == self.proc.pid:
                            return True
                except (aiohttp.ClientError, ValueError):
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("gateway did not start:\n" + self.log.read_text()[-3000:])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.kills += 1

    async def restart_after_kill(self) -> None:
        assert self.proc is not None
        await self.proc.wait()
        await self.start()

    def rss_bytes(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(ln for ln in status.splitlines() if ln.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    async def stop(self) -> int:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError("gateway did not stop on SIGTERM") from None


@dataclass
class Load:
    """What a load run sent: per conversation, message ids in the order they were accepted."""

    sent: dict[str, list[str]] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.sent.values())


async def drive(
    sim: DingTalkSimulator,
    *,
    conversations: int,
    per_conversation: int,
    rate: float,
    ack_timeout: float = 40.0,
    prefix: str = "m",
) -> Load:
    """Send messages at about ``rate``/s over many conversations.

    Within a conversation the next message is sent only after the previous one was ACKed, so
    the order the gateway accepted them in is the order they were sent in (as with a person
    typing); across conversations messages interleave freely.
    """
    load = Load()
    interval = conversations / rate

    async def conversation(c: int) -> None:
        cid = f"cidFault{prefix}{c}"
        load.sent[cid] = []
        await asyncio.sleep(random.random() * interval)
        for k in range(per_conversation):
            text = f"{prefix} c{c} k{k}"
            ids = await sim.send_message(text, conversation_id=cid, sender_id=f"user{c}")
            load.sent[cid].append(ids["msg_id"])
            load.texts[ids["msg_id"]] = text
            deadline = time.monotonic() + ack_timeout
            while ids["message_id"] not in sim.acks:
                if time.monotonic() > deadline:
                    raise AssertionError(f"message {text!r} was never acknowledged")
                await asyncio.sleep(0.005)
            await asyncio.sleep(interval * (0.5 + random.random()))

    await asyncio.gather(*(conversation(c) for c in range(conversations)))
    return load


@dataclass
class Outcome:
    messages: int
    lost: list[str]
    doubled: int
    reordered: int
    wrong: list[str]
    apologies: int

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.messages} messages, lost {len(self.lost)}, doubled {self.doubled}, "
            f"reordered {self.reordered}, apologies {self.apologies}"
        )


def reply_text(reply: dict[str, Any]) -> str:
    body = reply["body"]
    if body["msgtype"] == "markdown":
        return str(body["markdown"]["text"])
    return str(body["text"]["content"])


async def settle(
    sim: DingTalkSimulator, load: Load, *, timeout: float = 60.0, apology: str = ""
) -> Outcome:
    """Wait until every message has a reply (or the timeout), then count what went wrong."""
    wanted = {m for ms in load.sent.values() for m in ms}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answered = {r["msg_id"] for r in sim.replies()}
        if wanted <= answered:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a late duplicate would show up here
    replies = [r for r in sim.replies() if r["msg_id"] in wanted]
    counts = Counter(r["msg_id"] for r in replies)
    first_seq: dict[str, int] = {}
    wrong: list[str] = []
    apologies = 0
    for r in replies:
        first_seq.setdefault(r["msg_id"], r["seq"])
        text = reply_text(r)
        if apology and text == apology:
            apologies += 1
        elif f"echo: {load.texts[r['msg_id']]} " not in text + " ":
            wrong.append(r["msg_id"])
    reordered = 0
    for msg_ids in load.sent.values():
        seqs = [first_seq[m] for m in msg_ids if m in first_seq]
        reordered += sum(1 for a, b in itertools.pairwise(seqs) if b < a)
    outcome = Outcome(
        messages=len(wanted),
        lost=sorted(wanted - set(counts)),
        doubled=sum(n - 1 for n in counts.values() if n > 1),
        reordered=reordered,
        wrong=wrong,
        apologies=apologies,
    )
    TOTALS["scenarios"] += 1
    TOTALS["messages"] += outcome.messages
    TOTALS["lost"] += len(outcome.lost)
    TOTALS["doubled"] += outcome.doubled
    TOTALS["reordered"] += outcome.reordered
    return outcome


async def during(
    load_task: Awaitable[Load], *actions: tuple[float, Callable[[], Awaitable[None]]]
) -> Load:
    """Run ``actions`` (each after its delay, in order) while the load runs; return the load."""
    task = asyncio.ensure_future(load_task)
    for delay, action in actions:
        await asyncio.sleep(delay)
        await action()
    return await task


def scale() -> float:
    """A factor for message counts (``IMRELAY_FAULTS_SCALE``, default 1)."""
    return float(os.environ.get("IMRELAY_FAULTS_SCALE", "1"))
