"""Running a coroutine on the fastest event loop available.

Theory of operation: every long-running ``imrelay`` process (the gateway, the simulators, the
benchmark driver) starts its loop through :func:`run`. Where ``uvloop`` is installed (a
dependency on Linux and macOS) the loop is uvloop's, which roughly halves the cost of each
socket read, write and timer against the pure-Python loop; elsewhere, or when
``IMRELAY_LOOP=asyncio`` asks for it, the standard loop runs. Both behave the same for imrelay:
nothing here relies on uvloop-only behaviour.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "loop_name", "run"]

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
