"""The processes of one benchmark target, and the options of a run.

Theory of operation: a :class:`Stack` starts the DingTalk simulator and the model simulator
(port 0, their URL read from their first line of output), then the bot under test: the imrelay
gateway (configuration from :func:`gateway_config`, a free port; ready when its own pid
answers ``/healthz`` and, in Stream mode, the simulator sees its connection; in webhook mode
when ``/readyz`` answers 200) or the official-SDK baseline (ready when the simulator sees its
connection). :meth:`Stack.stop` stops them in reverse order. Every target of a benchmark gets a
new stack, so two targets never share a warm simulator.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from imrelay.bench.load import Mix, parse_mix
from imrelay.bench.procs import BenchProcessError, Proc, python, wait_until
from imrelay.cli.demo import free_port

__all__ = ["BenchOptions", "Stack", "Target", "gateway_config"]

Target = Literal["imrelay", "official-sdk"]
_READY_TIMEOUT_S = 60.0
_UNLIMITED = {"per_minute": 1e9, "burst": 1_000_000_000}


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """Everything a run needs to know; the CLI options map one to one."""

    rate: float = 100.0
    find_max: bool = False
    duration_s: float = 10.0
    conversations: int = 100
    model_latency_ms: float = 0.0
    tokens_per_s: float | None = None
    mix: Mix = field(default_factory=lambda: parse_mix("text=1"))
    ingress: Literal["stream", "webhook"] = "stream"
    storage: str | None = None
    slo_ms: float = 500.0
    grace_s: float = 10.0
    start_rate: float = 200.0
    step_s: float = 5.0
    step_factor: float = 1.25
    refine: int = 2
    rate_ceiling: float = 50_000.0
    concurrency: int = 256
    baseline_script: Path | None = None
    baseline_handler: Literal["thread", "inline"] = "thread"
    baseline_workers: int = 8


def gateway_config(
    *,
    port: int,
    dingtalk_url: str,
    model_url: str,
    app_key: str,
    app_secret: str,
    ingress: str,
    storage_url: str,
    audit_url: str,
    concurrency: int,
) -> dict[str, Any]:
    """The gateway's configuration: as a user runs it, with the rate limits lifted.

    The durable inbox, metrics, audit log and INFO logging (ECS JSON) stay on (the audit log in
    the run's directory, like the inbox, not in the current one); the DingTalk
    send limits are raised because the simulator does not throttle, and the inbound limits per
    user and per conversation because a benchmark's users send many messages a second.
    """
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"url": storage_url},
        "platforms": {
            "dingtalk": {
                "type": "dingtalk",
                "mode": ingress,
                "app_key": app_key,
                "app_secret": app_secret,
                "api_base": dingtalk_url,
                "rate_limit": {"per_conversation_per_minute": 1_000_000, "app_qps": 1e6},
            }
        },
        "models": {
            "default": {
                "type": "openai",
                "base_url": f"{model_url}/v1",
                "model": "sim-model",
                "timeout_s": 60,
            }
        },
        "routing": {"default": "default"},
        "pipeline": {"max_concurrency": concurrency},
        # Synthetic users send far faster than people: lift the inbound limits too (they
        # still run, so their cost is measured).
        "security": {
            "rate_limit": {"per_user": _UNLIMITED, "per_conversation": _UNLIMITED},
            "audit": {"url": audit_url},
        },
        "logging": {"format": "ecs", "level": "INFO"},
    }


def _child_env() -> dict[str, str]:
    # IMRELAY_* variables would override the generated configuration.
    return {k: v for k, v in os.environ.items() if not k.startswith("IMRELAY_")}


class Stack:
    """The simulators and the bot under test, started in that order, stopped in reverse.

    Args:
        target: which bot.
        options: the run's options.
        workdir: where configuration, database and logs go.
        http: the session for readiness checks.
    """

    def __init__(
        self, target: Target, options: BenchOptions, workdir: Path, http: aiohttp.ClientSession
    ) -> None:
        self.target = target
        self.options = options
        self.workdir = workdir
        self.http = http
        self.app_key = f"bench-{secrets.token_hex(4)}"
        self.app_secret = secrets.token_hex(16)
        self.procs: list[Proc] = []
        self.dingtalk_url = ""
        self.model_url = ""
        self.bot: Proc | None = None

    async def start(self) -> None:
        """Start every process and wait until the bot is connected (or accepting webhooks).

        Raises:
            PortTaken: the gateway's port was taken meanwhile; stop and start again.
            BenchProcessError: a process did not start.
        """
        o, env, logs = self.options, _child_env(), self.workdir
        imrelay = [*python(), "-m", "imrelay"]
        gw_port = free_port()
        dingtalk_argv = [*imrelay, "sim", "dingtalk", "--port", "0",
                         "--app-key", self.app_key, "--app-secret", self.app_secret]  # fmt: skip
        if o.ingress == "webhook":
            dingtalk_argv += ["--webhook-url", f"http://127.0.0.1:{gw_port}/webhooks/dingtalk"]
        dingtalk = self._proc("dingtalk simulator", dingtalk_argv, logs / "sim-dingtalk.log", env)
        self.dingtalk_url = await dingtalk.start(announce=True)
        model_argv = [
            *imrelay,
            "sim",
            "model",
            "--port",
            "0",
            "--latency-ms",
            str(o.model_latency_ms),
        ]
        if o.tokens_per_s is not None:
            model_argv += ["--tokens-per-s", str(o.tokens_per_s)]
        model = self._proc("model simulator", model_argv, logs / "sim-model.log", env)
        self.model_url = await model.start(announce=True)
        if self.target == "imrelay":
            await self._start_gateway(gw_port, env)
        else:
            await self._start_baseline(env)

    def _proc(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, log, env)
        self.procs.append(proc)
        return proc

    async def _start_gateway(self, port: int, env: dict[str, str]) -> None:
        o = self.options
        storage = o.storage or f"sqlite:///{self.workdir / 'imrelay.db'}"
        config = gateway_config(
            port=port,
            dingtalk_url=self.dingtalk_url,
            model_url=self.model_url,
            app_key=self.app_key,
            app_secret=self.app_secret,
            ingress=o.ingress,
            storage_url=storage,
            audit_url=f"sqlite:///{self.workdir / 'audit.db'}",
            concurrency=o.concurrency,
        )
        path = self.workdir / "imrelay.json"
        path.write_text(json.dumps(config, indent=2))
        argv = [*python(), "-m", "imrelay", "run", "-c", str(path)]
        gateway = self._proc("gateway", argv, self.workdir / "gateway.log", env)
        await gateway.start()
        self.bot = gateway
        await wait_until(
            self.http,
            f"http://127.0.0.1:{port}/healthz",
            [gateway],
            within_s=_READY_TIMEOUT_S,
            check=lambda body: isinstance(body, dict) and body.get("pid") == gateway.pid,
        )
        if o.ingress == "webhook":
            url = f"http://127.0.0.1:{port}/readyz"
            await wait_until(self.http, url, [gateway], within_s=_READY_TIMEOUT_S)
        else:
            await self._await_connection(gateway)

    async def _start_baseline(self, env: dict[str, str]) -> None:
        o = self.options
        script = o.baseline_script
        if script is None or not script.is_file():
            raise BenchProcessError(f"baseline script not found: {script}")
        argv = [*python(), str(script), "--endpoint", self.dingtalk_url,
                "--client-id", self.app_key, "--model-url", f"{self.model_url}/v1",
                "--handler", o.baseline_handler, "--workers", str(o.baseline_workers)]  # fmt: skip
        # The secret goes through the environment, not the command line (ps shows argv).
        env = {**env, "BENCH_DINGTALK_CLIENT_SECRET": self.app_secret}
        bot = self._proc("official-sdk bot", argv, self.workdir / "baseline.log", env)
        await bot.start()
        self.bot = bot
        await self._await_connection(bot)

    async def _await_connection(self, bot: Proc) -> None:
        await wait_until(
            self.http,
            f"{self.dingtalk_url}/_sim/state",
            [bot],
            within_s=_READY_TIMEOUT_S,
            check=lambda body: isinstance(body, dict) and body.get("connections", 0) >= 1,
        )

    async def stop(self) -> None:
        """Stop the bot first, then the simulators."""
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                await proc.stop()

    def proc(self, name: str) -> Proc:
        """The process called ``name``."""
        return next(p for p in self.procs if p.name == name)
