"""``imrelay bench``: load the gateway over real sockets and measure it, optionally side by side
with a bot built on the official DingTalk SDK.

Registered in :mod:`imrelay.cli.main` with ``app.command()(bench)``; also runnable as
``python -m imrelay.cli.bench``. Only typer and the standard library are imported here, so
``imrelay --help`` stays fast; the engine (:mod:`imrelay.bench`) is imported when the command
runs. See ``bench/README.md`` for what each figure means.

Exit status: 0 when the run completed and imrelay lost and doubled nothing, 1 when it lost or
doubled messages or a process failed, 2 for invalid options.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["bench"]

_BASELINE_SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "baseline_official_sdk.py"


def bench(
    rate: Annotated[
        float, typer.Option(help="Messages per second, sent whatever the replies (open loop).")
    ] = 100.0,
    find_max: Annotated[
        bool,
        typer.Option(
            "--max",
            help="Search the highest rate at which P99 stays under --slo-ms and the backlog "
            "does not grow (ignores --rate and --duration).",
        ),
    ] = False,
    duration: Annotated[float, typer.Option(help="Seconds of sending at --rate.")] = 10.0,
    conversations: Annotated[
        int, typer.Option(help="Conversations the messages are spread over (round-robin).")
    ] = 100,
    model_latency_ms: Annotated[
        float, typer.Option(help="The model simulator's time to first token.")
    ] = 0.0,
    tokens_per_s: Annotated[
        float | None,
        typer.Option(
            help="The model simulator streams word by word at this rate.", show_default=False
        ),
    ] = None,
    mix: Annotated[
        str, typer.Option(help="Shares of message kinds: text, picture, long, code.")
    ] = "text=100",
    ingress: Annotated[str, typer.Option(help="stream or webhook.")] = "stream",
    storage: Annotated[
        str | None,
        typer.Option(
            help="The gateway's storage URL (default: SQLite in the run's temp dir).",
            show_default=False,
        ),
    ] = None,
    slo_ms: Annotated[float, typer.Option(help="The P99 latency bound of --max.")] = 500.0,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Also run the same load against a baseline bot: official-sdk.",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the JSON document instead of tables.")
    ] = False,
    grace: Annotated[
        float, typer.Option(help="Seconds without a new reply before the rest count as lost.")
    ] = 10.0,
    concurrency: Annotated[
        int, typer.Option(help="The gateway's pipeline.max_concurrency.")
    ] = 256,
    start_rate: Annotated[float, typer.Option(help="--max: the first step's rate.")] = 200.0,
    step_s: Annotated[float, typer.Option(help="--max: seconds per step.")] = 5.0,
    step_factor: Annotated[float, typer.Option(help="--max: rate factor between steps.")] = 1.25,
    refine: Annotated[
        int, typer.Option(help="--max: bisection steps once the limit is bracketed.")
    ] = 2,
    baseline_handler: Annotated[
        str, typer.Option(help="The baseline's SDK handler: thread or inline.")
    ] = "thread",
    baseline_workers: Annotated[
        int, typer.Option(help="Threads of the baseline's thread handler.")
    ] = 8,
    baseline_script: Annotated[
        Path | None,
        typer.Option(
            help="The baseline bot (default: bench/baseline_official_sdk.py of the source tree).",
            show_default=False,
        ),
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(help="Where the run's files go (default: a temp dir).", show_default=False),
    ] = None,
    keep: Annotated[
        bool, typer.Option(help="Keep the run's files (configuration, database, logs).")
    ] = False,
) -> None:
    """Benchmark the gateway (load, latency, overhead, memory) against the simulators."""
    problems: list[str] = []
    if ingress not in ("stream", "webhook"):
        problems.append(f"--ingress: expected stream or webhook, got {ingress!r}")
    if baseline not in (None, "official-sdk"):
        problems.append(f"--baseline: expected official-sdk, got {baseline!r}")
    if baseline is not None and ingress != "stream":
        problems.append("--baseline: the official SDK speaks Stream mode only")
    if baseline_handler not in ("thread", "inline"):
        problems.append(f"--baseline-handler: expected thread or inline, got {baseline_handler!r}")
    for name, value in (("--rate", rate), ("--duration", duration), ("--start-rate", start_rate),
                        ("--step-s", step_s), ("--slo-ms", slo_ms)):  # fmt: skip
        if not value > 0:
            problems.append(f"{name}: must be positive")
    if step_factor <= 1:
        problems.append("--step-factor: must be more than 1")
    if conversations < 1 or concurrency < 1 or baseline_workers < 1:
        problems.append("--conversations, --concurrency, --baseline-workers: must be at least 1")
    if model_latency_ms < 0 or grace < 0 or refine < 0:
        problems.append("--model-latency-ms, --grace, --refine: must not be negative")
    script = baseline_script or _BASELINE_SCRIPT
    if baseline is not None and not script.is_file():
        problems.append(f"--baseline-script: {script} not found (run from a source checkout)")
    if baseline is not None:
        import importlib.util

        if importlib.util.find_spec("dingtalk_stream") is None:
            problems.append("--baseline official-sdk needs the dingtalk-stream package")

    from imrelay.bench.load import parse_mix

    try:
        kinds = parse_mix(mix)
    except ValueError as exc:
        problems.append(f"--{exc}")
        kinds = None
    if problems or kinds is None:
        for problem in problems:
            print(f"bench: {problem}", file=sys.stderr)
        raise typer.Exit(2)

    from imrelay.bench.stack import BenchOptions

    options = BenchOptions(
        rate=rate,
        find_max=find_max,
        duration_s=duration,
        conversations=conversations,
        model_latency_ms=model_latency_ms,
        tokens_per_s=tokens_per_s,
        mix=kinds,
        ingress=ingress,  # type: ignore[arg-type]  # checked above
        storage=storage,
        slo_ms=slo_ms,
        grace_s=grace,
        start_rate=start_rate,
        step_s=step_s,
        step_factor=step_factor,
        refine=refine,
        concurrency=concurrency,
        baseline_script=script,
        baseline_handler=baseline_handler,  # type: ignore[arg-type]  # checked above
        baseline_workers=baseline_workers,
    )
    targets = ["imrelay", *(["official-sdk"] if baseline else [])]
    raise typer.Exit(_run(options, targets, json_out=json_out, workdir=workdir, keep=keep))


def _run(
    options: Any, targets: list[str], *, json_out: bool, workdir: Path | None, keep: bool
) -> int:
    import json
    import shutil

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from imrelay._loop import run as run_loop
    from imrelay.bench.procs import BenchProcessError
    from imrelay.bench.report import build_document, machine_info, render
    from imrelay.bench.runner import make_workdir, run_target

    machine = machine_info()
    where = make_workdir(workdir)
    err = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
        disable=json_out,
    )

    class Sink:
        task: Any = None

        def begin(self, label: str, total: int) -> None:
            self.task = bar.add_task(label, total=total, status="")

        def advance(self, sent: int, answered: int, backlog: int, rss_mb: float) -> None:
            if self.task is not None:
                status = f"answered {answered:,} · backlog {backlog:,} · RSS {rss_mb:.0f} MB"
                bar.update(self.task, completed=sent, status=status)

        def end(self) -> None:
            if self.task is not None:
                bar.update(self.task, completed=bar.tasks[-1].total)

    results: dict[str, dict[str, Any]] = {}
    try:
        with bar:
            for target in targets:
                results[target] = run_loop(run_target(target, options, where, Sink()))  # type: ignore[arg-type]
    except BenchProcessError as exc:
        err.print(f"bench: {exc}", markup=False, highlight=False)
        err.print(f"bench: the run's files are in {where}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print(f"bench: interrupted; the run's files are in {where}", markup=False)
        return 130
    document = build_document(
        command=["imrelay", "bench", *(sys.argv[2:] if _is_bench_argv() else sys.argv[1:])],
        machine=machine,
        options=_describe(options),
        results=results,
    )
    if json_out:
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        render(document, Console(soft_wrap=True))
    if keep:
        err.print(f"bench: the run's files are in {where}", markup=False, highlight=False)
    else:
        shutil.rmtree(where, ignore_errors=True)
    mine = results["imrelay"]
    return 1 if mine["lost"] or mine["doubled"] else 0


def _is_bench_argv() -> bool:
    return len(sys.argv) > 1 and sys.argv[1] == "bench"


def _describe(options: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in options.__dataclass_fields__:
        value = getattr(options, name)
        if name == "mix":
            value = value.describe()
        elif isinstance(value, Path):
            value = str(value)
        out[name] = value
    return out


if __name__ == "__main__":
    typer.run(bench)
