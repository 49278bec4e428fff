"""The gateway forgets handled messages past ``storage.retention_s`` and conversation turns past
``context.ttl_s``, at start and hourly."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from _support import GatewayFactory, wait_for
from imrelay.message import Conversation, InboundMessage, Sender
from imrelay.stores import SQLiteStore
from imrelay.stores.base import ContextTurn, MessageState

DAY = 86400.0


def handled(message_id: str) -> InboundMessage:
    """A DingTalk text message, as the inbox stores it."""
    return InboundMessage(
        platform="dingtalk",
        message_id=message_id,
        conversation=Conversation(id="cid-1", kind="direct"),
        sender=Sender(id="staff-1"),
        kind="text",
        text=f"hello {message_id}",
        received_at=0.0,
    )


async def test_gateway_start_purges_handled_messages_past_retention(
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handled message older than the retention is gone after a start; a recent one stays."""
    db = tmp_path / "imrelay.db"
    now = time.time()
    async with SQLiteStore(db, clock=lambda: now - 10 * DAY) as old:
        await old.put(handled("old-done"))
        await old.set_state("dingtalk", "old-done", MessageState.REPLIED)
    async with SQLiteStore(db, clock=lambda: now - DAY) as recent:
        await recent.put(handled("recent-done"))
        await recent.set_state("dingtalk", "recent-done", MessageState.REPLIED)
    with caplog.at_level(logging.INFO, logger="imrelay.app"):
        gateway = await gateway_factory(storage__retention_s=7 * DAY)

        async def old_gone() -> bool:
            return await gateway.store.get("dingtalk", "old-done") is None

        await wait_for(old_gone, what="the purge at start")
    assert await gateway.store.get("dingtalk", "recent-done") is not None
    assert any(r.getMessage() == "purged 1 handled messages older than 7d" for r in caplog.records)


async def test_gateway_start_purges_conversation_turns_past_the_context_ttl(
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Turns older than ``context.ttl_s`` (never loaded again) are deleted at start; newer
    ones stay."""
    db = tmp_path / "imrelay.db"
    now = time.time()
    async with SQLiteStore(db) as store:
        await store.append(
            "dingtalk:cid-1",
            [
                ContextTurn("user", "two days ago", now - 2 * DAY),
                ContextTurn("assistant", "answered then", now - 2 * DAY),
                ContextTurn("user", "an hour ago", now - 3600),
            ],
            keep=20,
        )
    with caplog.at_level(logging.INFO, logger="imrelay.app"):
        gateway = await gateway_factory(context__ttl_s=DAY)

        async def purged() -> bool:
            return any(
                r.getMessage() == "purged 2 conversation turns older than 1d"
                for r in caplog.records
            )

        await wait_for(purged, what="the context purge at start")
    turns = await gateway.store.load("dingtalk:cid-1", since=0)
    assert [t.content for t in turns] == ["an hour ago"]
