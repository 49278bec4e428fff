"""The event loop every imrelay process runs on: uvloop when installed, asyncio on request."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from imrelay._loop import loop_name, run


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
