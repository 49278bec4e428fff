"""The event loop every imrelay process runs on: uvloop when installed, asyncio on request."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref

import pytest
import uvloop

from imrelay._loop import keep_heap_settled, loop_name, resettle_heap, run, settle_heap


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_loop_is_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop is a dependency on Linux, so the gateway runs on it."""
    monkeypatch.delenv("IMRELAY_LOOP", raising=False)
    assert loop_name() == "uvloop"
    assert issubclass(run(_loop_type()), uvloop.Loop)


def test_loop_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """IMRELAY_LOOP=asyncio runs the standard loop (to rule uvloop out when debugging)."""
    monkeypatch.setenv("IMRELAY_LOOP", "asyncio")
    assert loop_name() == "asyncio"
    assert not issubclass(run(_loop_type()), uvloop.Loop)
    assert run(asyncio.sleep(0, result=7)) == 7


def test_settle_heap_freezes_start_up_objects_and_raises_gen0() -> None:
    """After settle_heap the start-up heap is frozen and gen0 collects every 10,000 allocations."""
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (10_000, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_resettle_heap_collects_cycles_let_go_of_after_settling() -> None:
    """A cycle frozen by settle_heap survives a collection once dropped (what a reload leaves
    behind); resettle_heap frees it and freezes again."""
    before = gc.get_threshold()
    node = _Node()
    gone = weakref.ref(node)
    try:
        settle_heap()
        del node
        gc.collect()
        assert gone() is not None  # frozen: the collector does not look at it
        resettle_heap()
        assert gone() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_resettle_heap_does_nothing_in_an_unsettled_process() -> None:
    """Without settle_heap (tests, embedders) nothing is frozen by resettle_heap."""
    assert gc.get_freeze_count() == 0
    resettle_heap()
    assert gc.get_freeze_count() == 0


def _tracked(obj: object) -> bool:
    """The collector's generations (not the frozen set) hold ``obj``."""
    return any(other is obj for other in gc.get_objects())


def test_keep_heap_settled_freezes_survivors_and_collects_them_in_the_end() -> None:
    """What survives an interval leaves the collector's sight (a simulator's records are not
    scanned again and again); a cycle frozen while alive is freed by the periodic full
    collection."""

    async def scenario() -> None:
        record = [["a simulator's record"]]
        node = _Node()
        gone = weakref.ref(node)
        task = asyncio.create_task(keep_heap_settled(interval_s=0.02, full_collection_s=0.5))
        try:
            assert _tracked(record)
            await asyncio.sleep(0.1)
            assert not _tracked(record)  # frozen
            del node  # a cycle let go of after it was frozen
            gc.collect()
            assert gone() is not None  # frozen: only the full collection frees it
            deadline = asyncio.get_running_loop().time() + 5
            while gone() is not None:
                assert asyncio.get_running_loop().time() < deadline, "never collected"
                await asyncio.sleep(0.02)
            assert record == [["a simulator's record"]]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        run(scenario())
    finally:
        gc.unfreeze()
