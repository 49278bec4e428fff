"""The benchmark driver's reply collection: polls never count a reply twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from imrelay.bench.driver import Driver
from imrelay.bench.load import parse_mix
from imrelay.bench.stats import Ledger, Sent, summarize

REPLIES = [
    {"seq": i + 1, "msg_id": f"msg{i}", "received_at": 2.0 + i, "body": {"msgtype": "text",
     "text": {"content": f"echo: b{i} c{i} k0 hello"}}}
    for i in range(5)
]  # fmt: skip
TIMINGS = [{"seq": i + 1, "text": f"b{i} c{i} k0 hello", "model_time_ms": 10.0} for i in range(5)]


@pytest.fixture
async def sim_pages() -> AsyncIterator[str]:
    """Reply and timing pages like the simulators', answered after a pause so polls overlap."""

    def page(records: list[dict[str, Any]], key: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            await asyncio.sleep(0.05)
            after = int(request.query.get("after", "0"))
            return web.json_response({key: [r for r in records if r["seq"] > after]})

        return handler

    app = web.Application()
    app.router.add_get("/_sim/replies", page(REPLIES, "replies"))
    app.router.add_get("/_sim/timings", page(TIMINGS, "timings"))
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_driver_overlapping_polls_count_each_reply_once(sim_pages: str) -> None:
    """``settle`` polls while ``collect`` polls in the background: the two polls must not both
    take the same page, or its replies would count as doubled and model time twice."""
    ledger = Ledger()
    sents = [
        Sent(n=i, conversation=i, k=0, kind="text", due=1.0, msg_id=f"msg{i}", sent_at=1.0)
        for i in range(5)
    ]
    for s in sents:
        ledger.add_sent(s)
    async with aiohttp.ClientSession() as http:
        driver = Driver(
            http, dingtalk_url=sim_pages + "/", model_url=sim_pages, conversations=5,
            mix=parse_mix("text=100"), ledger=ledger,
        )  # fmt: skip
        try:
            await asyncio.gather(driver.poll(), driver.poll(), driver.poll())
        finally:
            await driver.aclose()
    summary = summarize(ledger, sents)
    assert summary["messages_answered"] == 5
    assert summary["doubled"] == 0
    assert ledger.model_ms == dict.fromkeys(range(5), 10.0)
