"""Run the standard ``imrelay bench`` runs and write their figures into ``bench/RESULTS.md``.

Usage (from the repository root, in the development environment)::

    python bench/standard_runs.py                    # every run, about 15 minutes
    python bench/standard_runs.py --only max,rss-10k # some of them

Each run's JSON document is saved as ``bench/results/<name>.json``. In ``RESULTS.md`` only
the part between the ``<!-- standard-runs:start -->`` and ``<!-- standard-runs:end -->``
markers is rewritten (figures of the runs that were run now replace theirs; the others are
re-rendered from their saved JSON), so the notes written by hand around it stay.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess  # nosec B404  # runs our own CLI
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imrelay.bench.report import describe_machine, render_markdown

__all__ = ["RUNS", "main"]

HERE = Path(__file__).resolve().parent
START, END = "<!-- standard-runs:start -->", "<!-- standard-runs:end -->"

Check = Callable[[dict[str, Any]], list[tuple[str, bool]]]


def _mine(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["results"]["imrelay"]
    return result


def _at(result: dict[str, Any]) -> dict[str, Any]:
    return result.get("at_max") or result


def _le(value: Any, bound: float) -> bool:
    return value is not None and value <= bound


def _check_max(doc: dict[str, Any]) -> list[tuple[str, bool]]:
    mine = _mine(doc)
    ratio = (doc.get("comparison") or {}).get("max_rate_ratio")
    return [
        ("sustained ≥ 1,500 msg/s", (mine.get("max_rate") or 0) >= 1500),
        ("nothing lost or doubled", mine["lost"] == 0 and mine["doubled"] == 0),
        ("≥ 2.5× the official-SDK baseline", ratio is not None and ratio >= 2.5),
    ]


def _check_steady(doc: dict[str, Any]) -> list[tuple[str, bool]]:
    ratio = (doc.get("comparison") or {}).get("overhead_p99_ratio")
    return [("overhead P99 no worse than the baseline's", ratio is not None and ratio <= 1.0)]


def _check_500(doc: dict[str, Any]) -> list[tuple[str, bool]]:
    at = _at(_mine(doc))
    latency = float(doc["options"]["model_latency_ms"])
    return [
        ("overhead P99 ≤ 10 ms", _le(at["overhead_ms"]["p99"], 10.0)),
        (f"end-to-end P99 ≤ {latency:g} + 20 ms", _le(at["latency_ms"]["p99"], latency + 20)),
    ]


def _check_rss(doc: dict[str, Any]) -> list[tuple[str, bool]]:
    return [("gateway peak RSS ≤ 250 MB", _le(_mine(doc)["bot"]["peak_rss_mb"], 250.0))]


def _check_webhook(doc: dict[str, Any]) -> list[tuple[str, bool]]:
    at = _at(_mine(doc))
    hook = at.get("webhook") or {}
    accepted_rate = (at.get("send_rate") or 0) if not hook.get("refused") else 0
    return [
        ("≥ 1,500 signed requests/s accepted", accepted_rate >= 1500),
        ("response P99 ≤ 20 ms", _le((hook.get("response_ms") or {}).get("p99"), 20.0)),
    ]


RUNS: list[tuple[str, str, str, Check]] = [
    (
        "max",
        "Highest sustainable rate: zero-latency model, Stream ingress, vs the official SDK",
        "--max --conversations 1000 --step-s 10 --baseline official-sdk",
        _check_max,
    ),
    (
        "steady-250",
        "Steady 250 msg/s, zero-latency model: overhead vs the official SDK",
        "--rate 250 --duration 30 --conversations 1000 --baseline official-sdk",
        _check_steady,
    ),
    (
        "500-200ms",
        "500 msg/s, 1,000 conversations, 200 ms model",
        "--rate 500 --duration 30 --conversations 1000 --model-latency-ms 200",
        _check_500,
    ),
    (
        "rss-10k",
        "10,000 conversations with context: gateway memory",
        "--rate 100 --duration 200 --conversations 10000",
        _check_rss,
    ),
    (
        "webhook",
        "Webhook ingress: 1,500 signed requests/s",
        "--rate 1500 --duration 30 --conversations 1000 --ingress webhook",
        _check_webhook,
    ),
]


def _run(name: str, args: str) -> dict[str, Any] | str:
    """Run one benchmark; its JSON document, or why it failed."""
    argv = [sys.executable, "-m", "imrelay.cli.bench", *shlex.split(args), "--json"]
    print(f"== {name}: imrelay bench {args}", file=sys.stderr, flush=True)  # noqa: T201  # a script
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)  # nosec B603
    if proc.stdout.strip():
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc
    lines = [ln.strip() for ln in proc.stderr.strip().splitlines()[:3]]
    return " ".join(lines) if lines else f"exit {proc.returncode}"


def _section(name: str, title: str, args: str, check: Check) -> list[str]:
    lines = [f"### {title}", "", "```sh", f"imrelay bench {args}", "```", ""]
    path = HERE / "results" / f"{name}.json"
    failure = HERE / "results" / f"{name}.failed"
    if failure.exists():
        return [*lines, f"Not measured: {failure.read_text().strip()}", ""]
    if not path.exists():
        return [*lines, "Not measured yet.", ""]
    doc = json.loads(path.read_text())
    lines += [f"Machine: {describe_machine(doc)}.", ""]
    lines += [
        "Targets: "
        + "; ".join(f"{label}: **{'met' if ok else 'not met'}**" for label, ok in check(doc))
        + ".",
        "",
    ]
    lines += [render_markdown(doc)]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the selected standard runs and rewrite the generated part of RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", help="comma-separated run names: " + ", ".join(r[0] for r in RUNS)
    )
    parser.add_argument("--render-only", action="store_true", help="run nothing, re-render")
    options = parser.parse_args(argv)
    wanted = set(options.only.split(",")) if options.only else {r[0] for r in RUNS}
    unknown = wanted - {r[0] for r in RUNS}
    if unknown:
        parser.error(f"unknown runs: {', '.join(sorted(unknown))}")
    (HERE / "results").mkdir(exist_ok=True)
    if not options.render_only:
        for name, _, args, _ in RUNS:
            if name not in wanted:
                continue
            outcome = _run(name, args)
            failed = HERE / "results" / f"{name}.failed"
            if isinstance(outcome, str):
                failed.write_text(outcome + "\n")
            else:
                failed.unlink(missing_ok=True)
                (HERE / "results" / f"{name}.json").write_text(
                    json.dumps(outcome, indent=2) + "\n"
                )
    generated = [START, ""]
    for name, title, args, check in RUNS:
        generated += _section(name, title, args, check)
    generated.append(END)
    results = HERE / "RESULTS.md"
    text = (
        results.read_text() if results.exists() else f"# imrelay bench results\n\n{START}\n{END}\n"
    )
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    results.write_text(head + "\n".join(generated) + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
