"""CPU per ``generate()`` of the OpenAI-compatible model client, against the model simulator.

Runs ``python -m imrelay sim model --port 0`` in a subprocess (so its CPU is not counted) and
calls ``OpenAICompatBackend.generate()`` on it, streamed and not, measuring this process's CPU
time (``time.process_time``) per call. ``--old REF`` also loads the backend as it was at a git
revision (``git show REF:src/imrelay/models/openai_compat.py``, e.g. the ``openai``-SDK version)
and runs both, round by round in turns, so drift of the machine hits both alike. Prints the
median over the rounds of CPU µs and wall ms per call::

    .venv/bin/python bench/bench_model_client.py --old HEAD --calls 300 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from imrelay.config import OpenAIModelSettings
from imrelay.models.base import ChatMessage, Generation
from imrelay.models.openai_compat import OpenAICompatBackend

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "hello there world"},
]


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per round and client")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (the median is printed)")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight")
    parser.add_argument("--old", metavar="REF", help="also run the backend of this git revision")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    return parser.parse_args(argv)


def _load_old(ref: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{ref}:src/imrelay/models/openai_compat.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("bench_old_openai_compat", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{ref}:openai_compat.py", "exec"), module.__dict__)
    return module


def _start_simulator() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imrelay", "sim", "model", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "model simulator on http://127.0.0.1:PORT/v1"
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"the model simulator did not start: {line!r}")
    return proc, line[line.index("http://") :].strip()


async def _round(backend: Any, calls: int, concurrency: int) -> tuple[float, float]:
    """CPU seconds and wall seconds per call over ``calls`` generations."""
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            result = Generation()
            async for _ in backend.generate(MESSAGES, result):
                pass
            if not result.text:
                raise RuntimeError("empty answer")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls


async def _run(options: argparse.Namespace, base_url: str) -> None:
    clients: dict[str, Callable[..., Any]] = {"new": OpenAICompatBackend}
    if options.old:
        clients[f"old ({options.old})"] = _load_old(options.old).OpenAICompatBackend
    samples: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    backends: dict[tuple[str, bool], Any] = {}
    for name, cls in clients.items():
        for stream in (True, False):
            settings = OpenAIModelSettings(
                type="openai", base_url=base_url, model="sim-model", stream=stream
            )
            backend = cls("bench", settings)
            backends[name, stream] = backend
            await _round(backend, 50, options.concurrency)  # warm up: connections, caches
            samples[name, stream] = []
    for _ in range(options.rounds):
        for key, backend in backends.items():
            samples[key].append(await _round(backend, options.calls, options.concurrency))
    for backend in backends.values():
        await backend.aclose()
    lines = [
        f"{options.rounds} rounds x {options.calls} calls, concurrency {options.concurrency}, "
        f"{'uvloop' if options.uvloop else 'asyncio'}; median per call",
        f"{'client':<16} {'mode':<10} {'CPU µs':>8} {'wall ms':>8}",
    ]
    for (name, stream), values in samples.items():
        cpu = statistics.median(v[0] for v in values) * 1e6
        wall = statistics.median(v[1] for v in values) * 1e3
        lines.append(f"{name:<16} {'stream' if stream else 'whole':<10} {cpu:8.0f} {wall:8.2f}")
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Start the simulator, run the rounds, print the medians."""
    options = _options(argv)
    proc, base_url = _start_simulator()
    try:
        if options.uvloop:
            import uvloop

            uvloop.run(_run(options, base_url))
        else:
            asyncio.run(_run(options, base_url))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
