"""The fault-injection suite's one-line summary, printed at the end of the run."""

from __future__ import annotations

from typing import Any

from _faults import REPORT, TOTALS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print ``faults: N scenarios, M messages, lost L, doubled D, reordered R``."""
    for line in REPORT:
        terminalreporter.write_line(line)
    if TOTALS["scenarios"]:
        terminalreporter.write_line(
            f"faults: {TOTALS['scenarios']} scenarios, {TOTALS['messages']} messages, "
            f"lost {TOTALS['lost']}, doubled {TOTALS['doubled']}, "
            f"reordered {TOTALS['reordered']}"
        )
