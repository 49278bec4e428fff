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

:func:`keep_heap_settled` is for the simulators, whose heap grows by design: they keep the last
100,000 messages, replies, sessions and model requests they saw, each a tracked container
that lives for minutes. The collector scanned them over and over (a young collection at
10,000 allocations takes ten generations of survivors with it), so at 1,500 messages/s the
DingTalk simulator paused 60–90 ms a few times a run and the model simulator 80 ms, and a
benchmark counted each pause in the gateway's latency. Frozen once a second, what survived
leaves the collector's sight; every ten minutes everything is unfrozen and collected once, so
that a reference cycle frozen while it was alive (a request in flight at that moment) is
freed in the end. The gateway does not need it: almost nothing it allocates per message
survives.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = [
    "keep_heap_settled",
    "loop_factory",
    "loop_name",
    "resettle_heap",
    "run",
    "settle_heap",
]

_GEN0_THRESHOLD = 10_000
_FREEZE_INTERVAL_S = 1.0
_FULL_COLLECTION_S = 600.0

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


async def keep_heap_settled(
    interval_s: float = _FREEZE_INTERVAL_S, full_collection_s: float = _FULL_COLLECTION_S
) -> None:
    """Freeze what survived every ``interval_s``; unfreeze and collect everything every
    ``full_collection_s`` (see the module docstring). Runs until cancelled."""
    loop = asyncio.get_running_loop()
    full_at = loop.time() + full_collection_s
    while True:
        await asyncio.sleep(interval_s)
        if loop.time() >= full_at:
            gc.unfreeze()
            gc.collect()
            full_at = loop.time() + full_collection_s
        gc.freeze()
