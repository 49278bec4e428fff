"""The behaviour every Store backend promises, run against each of them."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from imrelay.errors import StoreError
from imrelay.stores import MemoryStore, SQLiteStore
from imrelay.stores.base import ContextTurn, MessageState, Store

DAY = 86400.0

BACKENDS = ["memory", "sqlite"]


def build_store(kind: str, tmp_path: Path, clock: Callable[[], float], **kwargs: Any) -> Store:
    if kind == "memory":
        return MemoryStore(clock=clock, **kwargs)
    return SQLiteStore(tmp_path / "db" / "imrelay.db", clock=clock, **kwargs)


def corrupt(store: Store, mid: str, body: str) -> None:
    """Overwrite the stored JSON of a message behind the store's back."""
    if isinstance(store, MemoryStore):
        store.corrupt("dingtalk", mid, body)
        return
    assert isinstance(store, SQLiteStore)
    with sqlite3.connect(store.path) as conn:
        cur = conn.execute(
            "UPDATE messages SET body = ? WHERE platform = 'dingtalk' AND message_id = ?",
            (body, mid),
        )
        assert cur.rowcount == 1
    conn.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    return str(request.param)


@pytest.fixture
async def store(backend: str, tmp_path: Path, clock: Any) -> AsyncIterator[Store]:
    """An opened store of each backend, closed after the test."""
    s = build_store(backend, tmp_path, clock)
    await s.open()
    yield s
    await s.aclose()


class TestInbox:
    async def test_put_stores_message_as_received(self, store: Store, make_message: Any) -> None:
        """A new message is stored as received with zero attempts and round-trips intact."""
        msg = make_message("m1", dedup_keys=("frame-1",))
        assert await store.put(msg) is True
        record = await store.get("dingtalk", "m1")
        assert record is not None
        assert record.message == msg
        assert record.state is MessageState.RECEIVED
        assert record.attempts == 0
        assert record.reason == ""

    async def test_get_unknown_returns_none(self, store: Store) -> None:
        """Asking for a message never stored gives None."""
        assert await store.get("dingtalk", "nope") is None

    async def test_put_duplicate_message_id_is_rejected(
        self, store: Store, make_message: Any
    ) -> None:
        """A second message with a known message_id returns False and stores nothing."""
        assert await store.put(make_message("m1", text="first")) is True
        assert await store.put(make_message("m1", text="second")) is False
        record = await store.get("dingtalk", "m1")
        assert record is not None
        assert record.message.text == "first"
        assert len(await store.pending()) == 1

    async def test_put_duplicate_secondary_key_is_rejected(
        self, store: Store, make_message: Any
    ) -> None:
        """A message sharing any dedup key with a stored one returns False and stores nothing."""
        assert await store.put(make_message("m1", dedup_keys=("frame-1", "frame-2"))) is True
        assert await store.put(make_message("m2", dedup_keys=("frame-2",))) is False
        assert await store.get("dingtalk", "m2") is None
        # a message whose secondary key is another message's id is a duplicate too
        assert await store.put(make_message("m3", dedup_keys=("m1",))) is False
        assert await store.get("dingtalk", "m3") is None

    async def test_put_dedup_is_scoped_by_platform(self, store: Store, make_message: Any) -> None:
        """The same id on two platforms names two different messages."""
        assert await store.put(make_message("m1", platform="dingtalk")) is True
        assert await store.put(make_message("m1", platform="feishu")) is True
        assert await store.get("feishu", "m1") is not None

    async def test_put_concurrent_duplicates_exactly_one_wins(
        self, store: Store, make_message: Any
    ) -> None:
        """Of many concurrent puts sharing a key exactly one returns True."""
        copies = [make_message(f"m{i}", dedup_keys=("shared",)) for i in range(20)]
        copies += [make_message("m0") for _ in range(5)]
        results = await asyncio.gather(*(store.put(m) for m in copies))
        assert results.count(True) == 1
        assert len(await store.pending()) == 1

    async def test_put_concurrent_distinct_keep_call_order(
        self, store: Store, make_message: Any
    ) -> None:
        """Concurrent distinct puts are all stored, with seq following call order."""
        msgs = [make_message(f"m{i}") for i in range(50)]
        assert all(await asyncio.gather(*(store.put(m) for m in msgs)))
        pending = await store.pending()
        assert [r.message.message_id for r in pending] == [m.message_id for m in msgs]
        seqs = [r.seq for r in pending]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)

    async def test_put_unserialisable_message_raises_store_error(
        self, store: Store, make_message: Any
    ) -> None:
        """A message whose raw payload is not JSON raises StoreError and is not stored."""
        with pytest.raises(StoreError, match="json"):
            await store.put(make_message("m1", raw={"x": object()}))
        assert await store.get("dingtalk", "m1") is None

    async def test_set_state_processing_increments_attempts(
        self, store: Store, make_message: Any
    ) -> None:
        """Each move to processing adds an attempt; other states keep the count and set reason."""
        await store.put(make_message("m1"))
        await store.set_state("dingtalk", "m1", MessageState.PROCESSING)
        await store.set_state("dingtalk", "m1", MessageState.RECEIVED, "retry later")
        await store.set_state("dingtalk", "m1", MessageState.PROCESSING)
        record = await store.get("dingtalk", "m1")
        assert record is not None
        assert (record.state, record.attempts) == (MessageState.PROCESSING, 2)
        await store.set_state("dingtalk", "m1", MessageState.FAILED, "model timeout")
        record = await store.get("dingtalk", "m1")
        assert record is not None
        assert (record.state, record.attempts, record.reason) == (
            MessageState.FAILED,
            2,
            "model timeout",
        )

    async def test_set_state_unknown_message_raises(self, store: Store) -> None:
        """Moving a message that was never stored raises StoreError."""
        with pytest.raises(StoreError, match="unknown message"):
            await store.set_state("dingtalk", "ghost", MessageState.REPLIED)

    async def test_pending_lists_unfinished_in_arrival_order(
        self, store: Store, make_message: Any
    ) -> None:
        """pending() holds received and processing messages by arrival, not by received_at."""
        for i, at in enumerate([30.0, 10.0, 20.0, 5.0, 1.0]):
            await store.put(make_message(f"m{i}", received_at=at))
        await store.set_state("dingtalk", "m1", MessageState.PROCESSING)
        await store.set_state("dingtalk", "m2", MessageState.REPLIED)
        await store.set_state("dingtalk", "m3", MessageState.DROPPED, "filtered")
        await store.set_state("dingtalk", "m4", MessageState.FAILED)
        pending = await store.pending()
        assert [r.message.message_id for r in pending] == ["m0", "m1"]
        assert [r.state for r in pending] == [MessageState.RECEIVED, MessageState.PROCESSING]
        assert pending[1].attempts == 1

    async def test_counts_lists_every_state(self, store: Store, make_message: Any) -> None:
        """counts() reports each state, zeros included."""
        assert await store.counts() == dict.fromkeys(MessageState, 0)
        for i in range(4):
            await store.put(make_message(f"m{i}"))
        await store.set_state("dingtalk", "m0", MessageState.REPLIED)
        await store.set_state("dingtalk", "m1", MessageState.REPLIED)
        await store.set_state("dingtalk", "m2", MessageState.PROCESSING)
        assert await store.counts() == {
            MessageState.RECEIVED: 1,
            MessageState.PROCESSING: 1,
            MessageState.REPLIED: 2,
            MessageState.FAILED: 0,
            MessageState.DROPPED: 0,
        }

    async def test_failed_operation_does_not_undo_its_neighbours(
        self, store: Store, make_message: Any
    ) -> None:
        """A write that fails alongside concurrent writes fails alone; the others are stored."""
        results = await asyncio.gather(
            store.put(make_message("m1")),
            store.set_state("dingtalk", "ghost", MessageState.REPLIED),
            store.put(make_message("m2")),
            return_exceptions=True,
        )
        assert results[0] is True
        assert isinstance(results[1], StoreError)
        assert results[2] is True
        assert [r.message.message_id for r in await store.pending()] == ["m1", "m2"]

    async def test_pending_skips_and_fails_unreadable_records(
        self, store: Store, make_message: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Corrupted records are left out of pending(), marked failed and logged by id only."""
        for mid in ("m1", "m2", "m3", "m4"):
            await store.put(make_message(mid, text=f"secret text {mid}"))
        corrupt(store, "m2", '{"platform": "dingtalk"}')
        corrupt(store, "m3", "not json at all")
        corrupt(store, "m4", "[1, 2]")
        with caplog.at_level(logging.WARNING, logger="imrelay.stores"):
            pending = await store.pending()
        assert [r.message.message_id for r in pending] == ["m1"]
        counts = await store.counts()
        assert (counts[MessageState.FAILED], counts[MessageState.RECEIVED]) == (3, 1)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 3
        assert all("dingtalk:m" in w for w in warnings)
        assert not any("secret" in w for w in warnings)
        with pytest.raises(StoreError, match="unreadable"):
            await store.get("dingtalk", "m2")
        assert [r.message.message_id for r in await store.pending()] == ["m1"]


class TestPurge:
    async def test_purge_deletes_only_old_finished_messages(
        self, store: Store, make_message: Any, clock: Any
    ) -> None:
        """Finished messages before the cutoff go; pending and newer ones stay."""
        for i in range(5):
            await store.put(make_message(f"old{i}"))
        for i, state in enumerate([MessageState.REPLIED, MessageState.FAILED]):
            await store.set_state("dingtalk", f"old{i}", state)
        await store.set_state("dingtalk", "old2", MessageState.DROPPED)
        await store.set_state("dingtalk", "old3", MessageState.PROCESSING)
        clock.advance(100)
        await store.put(make_message("new"))
        await store.set_state("dingtalk", "new", MessageState.REPLIED)

        assert await store.purge(older_than=clock() - 50) == 3
        for mid in ("old0", "old1", "old2"):
            assert await store.get("dingtalk", mid) is None
        for mid in ("old3", "old4", "new"):
            assert await store.get("dingtalk", mid) is not None
        assert await store.purge(older_than=clock() - 50) == 0

    async def test_purge_never_deletes_pending_even_with_late_cutoff(
        self, store: Store, make_message: Any, clock: Any
    ) -> None:
        """A cutoff far in the future still keeps received and processing messages."""
        await store.put(make_message("m0"))
        await store.put(make_message("m1"))
        await store.set_state("dingtalk", "m1", MessageState.PROCESSING)
        assert await store.purge(older_than=clock() + 10 * DAY) == 0
        assert len(await store.pending()) == 2

    async def test_purge_keeps_dedup_keys_younger_than_ttl(
        self, store: Store, make_message: Any, clock: Any
    ) -> None:
        """After a purge the message is gone but its keys still reject redeliveries within TTL."""
        await store.put(make_message("m1", dedup_keys=("frame-1",)))
        await store.set_state("dingtalk", "m1", MessageState.REPLIED)
        clock.advance(DAY / 2)
        assert await store.purge(older_than=clock() + 1) == 1
        assert await store.get("dingtalk", "m1") is None
        assert await store.put(make_message("m1")) is False
        assert await store.put(make_message("m2", dedup_keys=("frame-1",))) is False

    async def test_purge_drops_dedup_keys_past_ttl(
        self, store: Store, make_message: Any, clock: Any
    ) -> None:
        """Once a key is older than the TTL and the cutoff, a purge forgets it."""
        await store.put(make_message("m1", dedup_keys=("frame-1",)))
        await store.set_state("dingtalk", "m1", MessageState.REPLIED)
        clock.advance(DAY + 1)
        assert await store.purge(older_than=clock()) == 1
        assert await store.put(make_message("m1", text="again")) is True
        record = await store.get("dingtalk", "m1")
        assert record is not None
        assert (record.message.text, record.state) == ("again", MessageState.RECEIVED)

    async def test_purge_forgets_reply_records_of_finished_messages(
        self, store: Store, make_message: Any, clock: Any
    ) -> None:
        """Old reply records of finished messages go; those of pending messages stay."""
        await store.put(make_message("done"))
        await store.put(make_message("busy"))
        await store.record_sent("dingtalk", "done", 0, clock())
        await store.record_sent("dingtalk", "busy", 0, clock())
        await store.set_state("dingtalk", "done", MessageState.REPLIED)
        clock.advance(100)
        await store.purge(older_than=clock())
        assert await store.was_sent("dingtalk", "done", 0) is False
        assert await store.was_sent("dingtalk", "busy", 0) is True

    async def test_put_after_ttl_accepts_expired_keys_without_purge(
        self, store: Store, make_message: Any, clock: Any
    ) -> None:
        """Keys older than the TTL no longer block a message, even before any purge."""
        await store.put(make_message("m1", dedup_keys=("frame-1",)))
        await store.set_state("dingtalk", "m1", MessageState.REPLIED)
        await store.record_sent("dingtalk", "m1", 0, clock())
        clock.advance(DAY - 1)
        assert await store.put(make_message("m2", dedup_keys=("frame-1",))) is False
        clock.advance(2)
        assert await store.put(make_message("m2", dedup_keys=("frame-1",))) is True
        assert await store.put(make_message("m1", text="redelivered late")) is True
        record = await store.get("dingtalk", "m1")
        assert record is not None
        assert (record.message.text, record.state) == ("redelivered late", MessageState.RECEIVED)
        # the new m1 is a new message: the old reply record does not suppress its answer
        assert await store.was_sent("dingtalk", "m1", 0) is False
        assert [r.message.message_id for r in await store.pending()] == ["m2", "m1"]

    async def test_put_after_ttl_still_rejects_pending_message(
        self, store: Store, make_message: Any, clock: Any
    ) -> None:
        """A message still pending is never stored twice, however old its keys."""
        await store.put(make_message("m1", text="original"))
        clock.advance(2 * DAY)
        assert await store.put(make_message("m1", text="copy")) is False
        record = await store.get("dingtalk", "m1")
        assert record is not None
        assert record.message.text == "original"


class TestOutbox:
    async def test_record_sent_is_seen_and_idempotent(self, store: Store) -> None:
        """A recorded part is reported sent; recording it again is harmless."""
        assert await store.was_sent("dingtalk", "m1", 0) is False
        await store.record_sent("dingtalk", "m1", 0, 1.0)
        await store.record_sent("dingtalk", "m1", 0, 2.0)
        assert await store.was_sent("dingtalk", "m1", 0) is True

    async def test_record_sent_is_scoped_by_part_message_and_platform(self, store: Store) -> None:
        """Another part, message or platform is not reported sent."""
        await store.record_sent("dingtalk", "m1", 0, 1.0)
        assert await store.was_sent("dingtalk", "m1", 1) is False
        assert await store.was_sent("dingtalk", "m2", 0) is False
        assert await store.was_sent("feishu", "m1", 0) is False


def turn(i: int, at: float | None = None, role: str = "user") -> ContextTurn:
    return ContextTurn(role=role, content=f"turn {i}", at=float(i) if at is None else at)


class TestContext:
    async def test_append_then_load_oldest_first(self, store: Store) -> None:
        """Turns come back in the order they were appended, fields intact."""
        first = ContextTurn("user", "你好", 1.0, message_id="m1")
        second = ContextTurn("assistant", "hi", 2.0)
        await store.append("k", [first], keep=10)
        await store.append("k", [second], keep=10)
        assert await store.load("k", since=0) == [first, second]

    async def test_append_trims_to_newest_keep(self, store: Store) -> None:
        """Only the newest ``keep`` turns survive an append."""
        await store.append("k", [turn(i) for i in range(5)], keep=10)
        await store.append("k", [turn(5), turn(6)], keep=3)
        assert [t.content for t in await store.load("k", since=0)] == [
            "turn 4",
            "turn 5",
            "turn 6",
        ]

    async def test_append_keep_zero_keeps_nothing(self, store: Store) -> None:
        """keep=0 leaves an empty history."""
        await store.append("k", [turn(1)], keep=0)
        assert await store.load("k", since=0) == []

    async def test_append_negative_keep_raises(self, store: Store) -> None:
        """A negative keep is a programming error."""
        with pytest.raises(ValueError, match="keep"):
            await store.append("k", [turn(1)], keep=-1)

    async def test_load_filters_by_since(self, store: Store) -> None:
        """Only turns written at or after ``since`` are loaded."""
        await store.append("k", [turn(i) for i in range(1, 6)], keep=10)
        assert [t.at for t in await store.load("k", since=3.0)] == [3.0, 4.0, 5.0]
        assert await store.load("k", since=6.0) == []

    async def test_clear_forgets_only_that_key(self, store: Store) -> None:
        """clear() empties one conversation and leaves the others."""
        await store.append("a", [turn(1)], keep=10)
        await store.append("b", [turn(2)], keep=10)
        await store.clear("a")
        await store.clear("never-written")
        assert await store.load("a", since=0) == []
        assert [t.content for t in await store.load("b", since=0)] == ["turn 2"]

    async def test_expire_forgets_turns_stamped_before(self, store: Store) -> None:
        """expire() deletes the turns older than its bound in every key, keeps the rest, and
        counts what it deleted; a key left without turns loads empty."""
        await store.append("b", [turn(1), turn(2)], keep=10)  # appended as time goes
        await store.append("a", [turn(i) for i in range(1, 6)], keep=10)
        assert await store.load("a", since=0) != []  # the SQLite store now caches both
        assert await store.load("b", since=0) != []
        assert await store.expire(before=3.0) == 4
        assert [t.at for t in await store.load("a", since=0)] == [3.0, 4.0, 5.0]
        assert await store.load("b", since=0) == []
        assert await store.expire(before=3.0) == 0
        await store.append("b", [turn(7)], keep=10)
        assert [t.at for t in await store.load("b", since=0)] == [7.0]


class TestLifecycle:
    async def test_ping_succeeds_when_open(self, store: Store) -> None:
        """An open store answers ping."""
        await store.ping()

    async def test_closed_store_raises_store_error(self, store: Store, make_message: Any) -> None:
        """Every method of a closed store raises StoreError; aclose itself is idempotent."""
        await store.aclose()
        await store.aclose()
        calls = [
            store.put(make_message("m1")),
            store.set_state("dingtalk", "m1", MessageState.REPLIED),
            store.get("dingtalk", "m1"),
            store.pending(),
            store.counts(),
            store.purge(0.0),
            store.was_sent("dingtalk", "m1", 0),
            store.record_sent("dingtalk", "m1", 0, 0.0),
            store.load("k", 0.0),
            store.append("k", [turn(1)], keep=1),
            store.clear("k"),
            store.ping(),
            store.open(),
        ]
        for call in calls:
            with pytest.raises(StoreError, match="closed"):
                await call

    async def test_unopened_store_raises_store_error(
        self, backend: str, tmp_path: Path, clock: Any, make_message: Any
    ) -> None:
        """Using a store before open() raises StoreError."""
        s = build_store(backend, tmp_path, clock)
        with pytest.raises(StoreError, match="not open"):
            await s.put(make_message("m1"))
        with pytest.raises(StoreError, match="not open"):
            await s.ping()
        await s.aclose()

    async def test_open_twice_raises_store_error(self, store: Store) -> None:
        """Opening an open store is refused."""
        with pytest.raises(StoreError, match="already open"):
            await store.open()

    async def test_aclose_commits_queued_writes(
        self, backend: str, tmp_path: Path, clock: Any, make_message: Any
    ) -> None:
        """Writes started before aclose() complete and report success."""
        s = build_store(backend, tmp_path, clock, dedup_ttl_s=DAY)
        await s.open()
        tasks = [asyncio.ensure_future(s.put(make_message(f"m{i}"))) for i in range(30)]
        await asyncio.sleep(0)  # let each task enqueue its write
        await s.aclose()
        assert all(await asyncio.gather(*tasks))
