"""The benchmark's output: the JSON document and the tables drawn from it.

The JSON document (``imrelay bench --json``) is the source; the tables only show it::

    {"imrelay_version", "command", "machine": {cores, cpu, python, platform, load_average},
     "options": {...}, "results": {"imrelay": {...}, "official-sdk": {...}},
     "comparison": {...} | null}

Each result holds the figures of :func:`imrelay.bench.stats.summarize` plus ``bot`` (the pid,
CPU seconds, percent of one core and milliseconds per answered message, peak RSS of the bot
process during the run), ``messages_per_conversation`` and ``rig_cpu_s`` (CPU
seconds of the simulators and of the benchmark driver, to see whether the load generator was
the bottleneck). With ``--max`` a result also has ``max_rate``, ``at_max`` (the figures of the
best passing step) and ``steps``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from imrelay import __version__

__all__ = [
    "build_document",
    "describe_machine",
    "figure_rows",
    "machine_info",
    "render",
    "render_markdown",
]

_Getter = Callable[[Mapping[str, Any]], Any]


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, Python and OS of this machine, and its load when the run started."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "load_average": load,
    }


def build_document(
    *,
    command: list[str],
    machine: dict[str, Any],
    options: dict[str, Any],
    results: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The JSON document of a benchmark; ``comparison`` when a baseline ran too."""
    comparison = None
    mine, base = results.get("imrelay"), results.get("official-sdk")
    if mine is not None and base is not None:
        comparison = {
            "throughput_ratio": _ratio(_throughput(mine), _throughput(base)),
            "max_rate_ratio": _ratio(mine.get("max_rate"), base.get("max_rate")),
            "overhead_p99_ratio": _ratio(
                _at(mine)["overhead_ms"]["p99"], _at(base)["overhead_ms"]["p99"]
            ),
            "latency_p99_ratio": _ratio(
                _at(mine)["latency_ms"]["p99"], _at(base)["latency_ms"]["p99"]
            ),
            "peak_rss_ratio": _ratio(mine["bot"]["peak_rss_mb"], base["bot"]["peak_rss_mb"]),
            "cpu_per_message_ratio": _ratio(
                mine["bot"]["cpu_ms_per_message"], base["bot"]["cpu_ms_per_message"]
            ),
        }
    return {
        "imrelay_version": __version__,
        "command": command,
        "machine": machine,
        "options": options,
        "results": results,
        "comparison": comparison,
    }


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 2)
    return None


def _at(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """The figures to show for latency: at the highest passing rate with ``--max``."""
    at_max = result.get("at_max")
    return at_max if isinstance(at_max, Mapping) else result


def _throughput(result: Mapping[str, Any]) -> Any:
    return _at(result).get("throughput")


def _path(*keys: str) -> _Getter:
    def get(result: Mapping[str, Any]) -> Any:
        value: Any = result
        for key in keys:
            if not isinstance(value, Mapping):
                return None
            value = value.get(key)
        return value

    return get


def _latency(kind: str, q: str) -> _Getter:
    return lambda r: _path(kind, q)(_at(r))


_ROWS: list[tuple[str, _Getter]] = [
    ("messages sent", _path("messages_sent")),
    ("messages answered", _path("messages_answered")),
    ("lost", _path("lost")),
    ("doubled", _path("doubled")),
    ("out of order", _path("out_of_order")),
    ("messages per conversation", _path("messages_per_conversation")),
    ("max sustainable rate (msg/s)", _path("max_rate")),
    ("throughput (msg/s)", _throughput),
    ("send rate achieved (msg/s)", lambda r: _at(r).get("send_rate")),
    ("end-to-end P50 (ms)", _latency("latency_ms", "p50")),
    ("end-to-end P95 (ms)", _latency("latency_ms", "p95")),
    ("end-to-end P99 (ms)", _latency("latency_ms", "p99")),
    ("end-to-end max (ms)", _latency("latency_ms", "max")),
    ("overhead P50 (ms)", _latency("overhead_ms", "p50")),
    ("overhead P99 (ms)", _latency("overhead_ms", "p99")),
    ("model time P50 (ms)", _latency("model_ms", "p50")),
    ("webhooks accepted", _path("webhook", "accepted")),
    ("webhooks refused", _path("webhook", "refused")),
    ("webhook response P50 (ms)", _path("webhook", "response_ms", "p50")),
    ("webhook response P99 (ms)", _path("webhook", "response_ms", "p99")),
    ("bot peak RSS (MB)", _path("bot", "peak_rss_mb")),
    ("bot CPU (s)", _path("bot", "cpu_s")),
    ("bot CPU (% of one core)", _path("bot", "cpu_percent")),
    ("bot CPU per message (ms)", _path("bot", "cpu_ms_per_message")),
    ("driver lag P99 (ms)", _latency("driver_lag_ms", "p99")),
    ("dingtalk simulator CPU (s)", _path("rig_cpu_s", "dingtalk simulator")),
    ("model simulator CPU (s)", _path("rig_cpu_s", "model simulator")),
]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def figure_rows(results: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The figure table as text cells: label, one column per target, and the ratio of two."""
    names = list(results)
    rows: list[list[str]] = []
    for label, get in _ROWS:
        values = [get(results[name]) for name in names]
        if all(v is None for v in values):
            continue
        cells = [label, *(_fmt(v) for v in values)]
        if len(names) == 2:
            # the model's time is the load, not a result: its ratio means nothing
            ratio = None if label.startswith("model time") else _ratio(values[0], values[1])
            cells.append("-" if ratio is None else f"{ratio:.2f}×")
        rows.append(cells)
    return rows


def _step_rows(steps: list[Mapping[str, Any]]) -> list[list[str]]:
    keys = ("rate", "sent", "answered", "throughput", "latency_p50_ms", "latency_p99_ms")
    return [
        [*(_fmt(s[k]) for k in keys), _fmt(s["backlog_growth"]), "yes" if s["ok"] else "no"]
        for s in steps
    ]


_STEP_COLUMNS = ("rate", "sent", "answered", "throughput", "P50 ms", "P99 ms", "backlog +", "ok")


def render(document: Mapping[str, Any], console: Console) -> None:
    """Draw the document: the step tables of a ``--max`` run, then the figures."""
    results: Mapping[str, Mapping[str, Any]] = document["results"]
    for name, result in results.items():
        if result.get("steps"):
            steps = Table(title=f"{name}: rate search", title_justify="left")
            for column in _STEP_COLUMNS:
                steps.add_column(column, justify="left" if column == "ok" else "right")
            for row in _step_rows(result["steps"]):
                steps.add_row(
                    *row[:-1], "[green]yes[/green]" if row[-1] == "yes" else "[red]no[/red]"
                )
            console.print(steps)
    names = list(results)
    table = Table(title="imrelay bench", title_justify="left")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    if len(names) == 2:
        table.add_column(f"{names[0]} / {names[1]}", justify="right")
    for row in figure_rows(results):
        table.add_row(*row)
    console.print(table)
    console.print(f"[dim]{describe_machine(document)}[/dim]")


def describe_machine(document: Mapping[str, Any]) -> str:
    """One line: cores, CPU, Python, load average at the start, imrelay version."""
    machine = document["machine"]
    return (
        f"{machine['cores']} cores ({machine['cpu'] or 'unknown CPU'}), "
        f"Python {machine['python']}, load average at start {machine['load_average']}; "
        f"imrelay {document['imrelay_version']}"
    )


def render_markdown(document: Mapping[str, Any]) -> str:
    """The document as Markdown: the figure table, then the step table of each ``--max``."""
    results: Mapping[str, Mapping[str, Any]] = document["results"]
    names = list(results)
    header = ["", *names, *([f"{names[0]} / {names[1]}"] if len(names) == 2 else [])]
    lines = [_md_row(header), _md_row(["---"] + ["---:"] * (len(header) - 1))]
    lines += [_md_row(row) for row in figure_rows(results)]
    for name, result in results.items():
        if result.get("steps"):
            lines += ["", f"Rate search ({name}):", ""]
            lines.append(_md_row(list(_STEP_COLUMNS)))
            lines.append(_md_row(["---:"] * (len(_STEP_COLUMNS) - 1) + ["---"]))
            lines += [_md_row(row) for row in _step_rows(result["steps"])]
    return "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
