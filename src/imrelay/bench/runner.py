"""One benchmark run against one bot: at a fixed rate, or searching for the highest rate.

Theory of operation: :func:`run_target` starts a fresh :class:`~imrelay.bench.stack.Stack`
for the target (simulators, then the imrelay gateway or the official-SDK baseline), drives it
with a :class:`~imrelay.bench.driver.Driver` and stops everything.

* **Fixed rate** (``find_max=False``): ``rate × duration`` messages on the open-loop schedule,
  then the replies still owed are awaited (grace period) and the figures computed.
* **Highest sustainable rate** (``find_max=True``): steps of ``step_s`` seconds; a step passes
  when its end-to-end P99 is within ``slo_ms``, nothing sent in it was lost, and the backlog
  (sent − answered) did not grow between the middle and the end of the step. After a pass the
  rate is multiplied by ``step_factor``, after a failure (from the start) divided; once a
  passing and a failing rate are known, ``refine`` more steps bisect between them
  (geometrically). Between steps the backlog is drained. The result is the highest passing
  rate with that step's figures, plus totals (lost, doubled, out of order) over every step.

Conversations keep their history through a run, so the context sent to the model grows with
each conversation's message count (up to ``context.max_turns``), in steady runs and between the
steps of a search alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from imrelay.bench.driver import Driver
from imrelay.bench.procs import BenchProcessError, PortTaken, Proc
from imrelay.bench.stack import BenchOptions, Stack, Target
from imrelay.bench.stats import Ledger, Sent, summarize

__all__ = [
    "NullProgress",
    "ProgressSink",
    "make_workdir",
    "run_target",
]


class ProgressSink(Protocol):
    """Where a run reports progress (the CLI draws a progress bar)."""

    def begin(self, label: str, total: int) -> None:
        """A phase of ``total`` messages starts."""
        ...

    def advance(self, sent: int, answered: int, backlog: int, rss_mb: float) -> None:
        """Messages sent in the phase, answered and owed overall, the bot's RSS."""
        ...

    def end(self) -> None:
        """The phase is over."""
        ...


class NullProgress:
    """A :class:`ProgressSink` that shows nothing."""

    def begin(self, label: str, total: int) -> None:
        """Ignore."""

    def advance(self, sent: int, answered: int, backlog: int, rss_mb: float) -> None:
        """Ignore."""

    def end(self) -> None:
        """Ignore."""


async def run_target(
    target: Target,
    options: BenchOptions,
    workdir: Path,
    progress: ProgressSink | None = None,
) -> dict[str, Any]:
    """Run the benchmark against ``target`` in fresh processes; return its figures.

    Raises:
        BenchProcessError: a process failed to start or died.
    """
    sink = progress or NullProgress()
    timeout = aiohttp.ClientTimeout(total=120, connect=10)
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        for attempt in range(3):
            stack = Stack(target, options, workdir / f"{target}-{attempt}", http)
            try:
                await stack.start()
                return await _measure(stack, options, http, sink)
            except PortTaken:
                continue
            finally:
                await stack.stop()
    raise BenchProcessError("the gateway could not bind a free port three times")


async def _measure(
    stack: Stack, options: BenchOptions, http: aiohttp.ClientSession, sink: ProgressSink
) -> dict[str, Any]:
    assert stack.bot is not None  # nosec B101  # set by Stack.start()
    bot = stack.bot
    ledger = Ledger()
    driver = Driver(
        http,
        dingtalk_url=stack.dingtalk_url,
        model_url=stack.model_url,
        conversations=options.conversations,
        mix=options.mix,
        ledger=ledger,
    )
    rig = [stack.proc("dingtalk simulator"), stack.proc("model simulator")]

    phase_start = [0]  # messages sent before the current phase (the max search has many)

    def on_poll() -> None:
        if bot.returncode is not None:
            return
        rss = bot.sample().rss_bytes / 2**20
        sink.advance(len(ledger.sent) - phase_start[0], ledger.answered, ledger.backlog, rss)

    cpu0 = {p.name: p.sample().cpu_s for p in [bot, *rig]}
    self0 = _self_cpu()
    wall0 = time.monotonic()
    collector = asyncio.create_task(driver.collect(on_poll))
    try:
        if options.find_max:
            result = await _search(driver, options, sink, phase_start, bot)
        else:
            sink.begin(
                f"{stack.target} @ {options.rate:g}/s", round(options.rate * options.duration_s)
            )
            sents = await driver.send(options.rate, options.duration_s)
            await driver.settle(options.grace_s)
            sink.end()
            result = summarize(ledger, sents)
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        await driver.aclose()
    if bot.returncode is not None:
        raise BenchProcessError(f"{bot.name} died during the run:\n{bot.log_tail()}")
    wall = time.monotonic() - wall0
    figures = {p.name: p.sample() for p in [bot, *rig]}
    cpu = figures[bot.name].cpu_s - cpu0[bot.name]
    result["unmatched_replies"] = len(ledger.unmatched)
    result["messages_per_conversation"] = round(len(ledger.sent) / options.conversations, 1)
    result["bot"] = {
        "pid": bot.pid,
        "cpu_s": round(cpu, 2),
        "cpu_percent": round(100.0 * cpu / wall, 1) if wall > 0 else None,
        "cpu_ms_per_message": round(1000.0 * cpu / ledger.answered, 2)
        if ledger.answered
        else None,
        "peak_rss_mb": round(figures[bot.name].peak_rss_bytes / 2**20, 1),
        "wall_s": round(wall, 2),
    }
    result["rig_cpu_s"] = {
        **{p.name: round(figures[p.name].cpu_s - cpu0[p.name], 2) for p in rig},
        "bench driver": round(_self_cpu() - self0, 2),
    }
    result["target"] = stack.target
    result["logs"] = str(stack.workdir)
    return result


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _search(
    driver: Driver,
    options: BenchOptions,
    sink: ProgressSink,
    phase_start: list[int],
    bot: Proc,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    every: list[Sent] = []
    best: tuple[float, list[Sent]] | None = None
    lo: float | None = None
    hi: float | None = None
    rate = options.start_rate
    refined = 0
    while True:
        phase_start[0] = len(driver.ledger.sent)
        step, sents, drained = await _step(driver, options, rate, sink)
        steps.append(step)
        every.extend(sents)
        if step["ok"]:
            lo = rate if lo is None else max(lo, rate)
            if best is None or rate > best[0]:
                best = (rate, sents)
        else:
            hi = rate if hi is None else min(hi, rate)
        if not drained or bot.returncode is not None:
            break
        if lo is not None and hi is not None:
            if refined >= options.refine or hi / lo < 1.02:
                break
            refined += 1
            rate = math.sqrt(lo * hi)
        elif lo is not None:
            rate = rate * options.step_factor
            if rate > options.rate_ceiling:
                break
        else:
            rate = rate / options.step_factor
            if rate < 1.0:
                break
    result = summarize(driver.ledger, every)
    result["max_rate"] = round(best[0], 1) if best else None
    result["at_max"] = summarize(driver.ledger, best[1]) if best else None
    result["steps"] = steps
    return result


async def _step(
    driver: Driver, options: BenchOptions, rate: float, sink: ProgressSink
) -> tuple[dict[str, Any], list[Sent], bool]:
    ledger = driver.ledger
    total = max(1, round(rate * options.step_s))
    marks: dict[str, int] = {}

    def on_batch(sent: int) -> None:
        if "mid" not in marks and sent >= total / 2:
            marks["mid"] = ledger.backlog

    sink.begin(f"step @ {rate:.0f}/s", total)
    sents = await driver.send(rate, options.step_s, on_batch=on_batch)
    growth = ledger.backlog - marks.get("mid", 0)
    await driver.settle(options.grace_s, deadline_s=max(10.0, 4 * options.step_s))
    sink.end()
    figures = summarize(ledger, sents)
    p99 = figures["latency_ms"]["p99"]
    allowed = max(10.0, 0.05 * rate * options.step_s / 2)
    ok = figures["lost"] == 0 and p99 is not None and p99 <= options.slo_ms and growth <= allowed
    step = {
        "rate": round(rate, 1),
        "sent": figures["messages_sent"],
        "answered": figures["messages_answered"],
        "throughput": figures["throughput"],
        "latency_p50_ms": figures["latency_ms"]["p50"],
        "latency_p99_ms": p99,
        "backlog_growth": growth,
        "ok": ok,
    }
    return step, sents, ledger.backlog == 0


def make_workdir(base: Path | None = None) -> Path:
    """A new directory for a benchmark's files, under ``base`` or the system temp dir."""
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkdtemp(prefix=f"imrelay-bench-{stamp}-", dir=base))
