"""``imrelay demo``: the simulators and the gateway, connected, in one process tree.

Three child processes (the DingTalk simulator, the model simulator, the gateway) are started
with a generated configuration in a temporary directory. When the gateway is ready, the URL of
the simulator's web chat page is printed. Ctrl-C (or SIGTERM) stops all three cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess  # nosec B404  # the demo starts its own simulators
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["demo_config", "free_port", "run_demo"]

APP_KEY = "demo-app-key"
APP_SECRET = "demo-app-secret"  # nosec B105  # the simulator's own credential, not a secret


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it can be bound on 127.0.0.1, else any free port."""
    for candidate in (preferred, 0) if preferred else (0,):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free port on 127.0.0.1")


def demo_config(
    *, dingtalk_port: int, model_port: int, http_port: int, db: Path
) -> dict[str, Any]:
    """The configuration the demo gateway runs with."""
    return {
        "server": {"host": "127.0.0.1", "port": http_port},
        "storage": {"url": f"sqlite:///{db}"},
        "platforms": {
            "dingtalk": {
                "type": "dingtalk",
                "mode": "stream",
                "app_key": APP_KEY,
                "app_secret": APP_SECRET,
                "api_base": f"http://127.0.0.1:{dingtalk_port}",
                # answers stream into an AI card: the chat page shows it growing
                "reply": {"stream": "card", "card_update_interval_ms": 150},
            }
        },
        "models": {
            "default": {
                "type": "openai",
                "base_url": f"http://127.0.0.1:{model_port}/v1",
                "model": "sim-model",
                "timeout_s": 30,
            }
        },
        "routing": {"default": "default"},
        "logging": {"format": "text", "level": "INFO"},
        "security": {"audit": {"url": f"sqlite:///{db.with_name('audit.db')}"}},
    }


def _wait_http(url: str, deadline: float, procs: list[subprocess.Popen[bytes]]) -> bool:
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # nosec B310  # http://127.0.0.1
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 25.0) -> None:
    for proc in reversed(procs):  # gateway first, simulators last
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_demo(*, port: int = 8765, ready_timeout_s: float = 60.0) -> int:
    """Run the demo until interrupted; return the exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="imrelay-demo-"))
    dingtalk_port = free_port(port)
    model_port = free_port()
    http_port = free_port()
    config_path = workdir / "imrelay.json"
    config_path.write_text(
        json.dumps(
            demo_config(
                dingtalk_port=dingtalk_port,
                model_port=model_port,
                http_port=http_port,
                db=workdir / "imrelay.db",
            ),
            indent=2,
        )
    )
    exe = [sys.executable, "-m", "imrelay"]
    env = dict(os.environ)
    env.pop("IMRELAY_CONFIG", None)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(  # nosec B603  # sys.executable, fixed arguments
                [*exe, "sim", "dingtalk", "--port", str(dingtalk_port),
                 "--app-key", APP_KEY, "--app-secret", APP_SECRET],
                env=env,
            )
        )  # fmt: skip
        procs.append(
            subprocess.Popen(  # nosec B603  # sys.executable, fixed arguments
                [*exe, "sim", "model", "--port", str(model_port),
                 "--latency-ms", "300", "--tokens-per-s", "30"],
                env=env,
            )
        )  # fmt: skip
        deadline = time.monotonic() + ready_timeout_s
        if not _wait_http(f"http://127.0.0.1:{dingtalk_port}/_sim/state", deadline, procs):
            print("demo: the DingTalk simulator did not start", file=sys.stderr)
            return 1
        if not _wait_http(f"http://127.0.0.1:{model_port}/v1/models", deadline, procs):
            print("demo: the model simulator did not start", file=sys.stderr)
            return 1
        procs.append(subprocess.Popen([*exe, "run", "-c", str(config_path)], env=env))  # nosec B603  # our own CLI
        if not _wait_http(f"http://127.0.0.1:{http_port}/readyz", deadline, procs):
            print("demo: the gateway did not become ready", file=sys.stderr)
            return 1
        print(
            "\n"
            "  imrelay demo is running.\n"
            f"  Chat with the bot:   http://127.0.0.1:{dingtalk_port}/\n"
            f"  Gateway metrics:     http://127.0.0.1:{http_port}/metrics\n"
            f"  Gateway readiness:   http://127.0.0.1:{http_port}/readyz\n"
            "  Press Ctrl-C to stop.\n",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        print("demo: a component exited unexpectedly; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with contextlib.suppress(KeyboardInterrupt):
            _stop(procs)
        shutil.rmtree(workdir, ignore_errors=True)
