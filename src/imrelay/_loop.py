"""Running a coroutine on the fastest event loop available.

Theory of operation: every long-running ``imrelay`` process (the gateway, the simulators, the
benchmark driver) starts its loop through :func:`run`. Where ``uvloop`` is installed (a
dependency on Linux and macOS) the loop is uvloop's, which roughly halves the cost of each
socket read, write and timer against the pure-Python loop; elsewhere, or when
``IMRELAY_LOOP=asyncio`` asks for it, the standard loop runs. Both behave the same for imrelay:
nothing here relies on uvloop-only behaviour.

:func:`settle_heap` is called once a long-running process has started: everything allocated
so far (modules, settings, compiled patterns, metric families) lives as long as the process, so
it is moved out of the garbage collector's sight (``gc.freeze``), and the youngest generation's
threshold is raised from 700 to 10,000 allocations. A gateway message allocates a few hundred
short-lived containers, almost none of them in reference cycles; with the defaults the collector
ran every few messages and rescanned the whole start-up heap on each full collection, which
showed as the largest single item (14 % of the event loop) in a profile of the gateway.
A configuration reload replaces part of that heap (the pipeline, the models): frozen objects are
never collected, so :func:`resettle_heap` unfreezes, collects what the reload let go of, and
freezes again.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "loop_name", "resettle_heap", "run", "settle_heap"]

_GEN0_THRESHOLD = 10_000

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's ``new_event_loop`` when it is installed and not switched off, else ``None``."""
    if os.environ.get("IMRELAY_LOOP", "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    """``"uvloop"`` or ``"asyncio"``: the loop :func:`run` would use."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop (uvloop when available), like ``asyncio.run``."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def settle_heap() -> None:
    """Freeze the start-up heap out of the collector's scans and collect the young less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_GEN0_THRESHOLD, gen1, gen2)


def resettle_heap() -> None:
    """After part of a settled heap was replaced (a reload): collect what was let go of, then
    settle again. Does nothing in a process that never called :func:`settle_heap`."""
    if gc.get_freeze_count() == 0:
        return
    gc.unfreeze()
    settle_heap()
