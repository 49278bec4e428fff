"""SQLite-only behaviour: durability across restarts and crashes, WAL, schema, URLs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from imrelay.errors import ConfigError, StoreError
from imrelay.stores import MemoryStore, SQLiteStore, open_store
from imrelay.stores.base import ContextTurn, MessageState
from imrelay.stores.sqlite import SCHEMA_VERSION


def raw_query(path: Path | str, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_sqlite_store_survives_close_and_reopen(
    tmp_path: Path, make_message: Any, clock: Any
) -> None:
    """A new store object on the same file sees pending messages, reply records, context, keys."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path, clock=clock) as first:
        await first.put(make_message("m1", dedup_keys=("frame-1",)))
        await first.put(make_message("m2"))
        await first.put(make_message("m3"))
        await first.set_state("dingtalk", "m1", MessageState.PROCESSING)
        await first.set_state("dingtalk", "m3", MessageState.REPLIED)
        await first.record_sent("dingtalk", "m1", 0, clock())
        await first.append("k", [ContextTurn("user", "hi", 1.0, "m1")], keep=5)
        before = await first.pending()

    async with SQLiteStore(path, clock=clock) as second:
        after = await second.pending()
        assert after == before
        assert [(r.message.message_id, r.attempts) for r in after] == [("m1", 1), ("m2", 0)]
        assert await second.was_sent("dingtalk", "m1", 0) is True
        assert await second.load("k", since=0) == [ContextTurn("user", "hi", 1.0, "m1")]
        assert await second.put(make_message("m9", dedup_keys=("frame-1",))) is False
        assert await second.put(make_message("m4")) is True
        record = await second.get("dingtalk", "m4")
        assert record is not None
        assert record.seq > max(r.seq for r in after)


async def test_sqlite_aclose_flushes_queued_puts_to_disk(
    tmp_path: Path, make_message: Any
) -> None:
    """Puts still queued when aclose() starts are on disk afterwards."""
    path = tmp_path / "imrelay.db"
    store = SQLiteStore(path, commit_interval_ms=20)
    await store.open()
    tasks = [asyncio.ensure_future(store.put(make_message(f"m{i}"))) for i in range(40)]
    await asyncio.sleep(0)
    await store.aclose()
    assert all(await asyncio.gather(*tasks))
    assert raw_query(path, "SELECT COUNT(*) FROM messages") == [(40,)]


async def test_sqlite_concurrent_puts_share_commits(tmp_path: Path, make_message: Any) -> None:
    """Many concurrent puts are grouped into a few transactions."""
    async with SQLiteStore(tmp_path / "imrelay.db") as store:
        results = await asyncio.gather(*(store.put(make_message(f"m{i}")) for i in range(200)))
        assert all(results)
        assert 1 <= store.commits <= 5


async def test_sqlite_failing_write_fails_alone_in_a_shared_commit(
    tmp_path: Path, make_message: Any
) -> None:
    """One write of a grouped batch fails (unknown message): it alone is undone, with its own
    error; the writes before and after it in the same transaction are committed."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path, commit_interval_ms=20) as store:
        results = await asyncio.gather(
            store.put(make_message("m1")),
            store.put(make_message("m2")),
            store.set_state("dingtalk", "nope", MessageState.REPLIED),
            store.put(make_message("m3")),
            return_exceptions=True,
        )
        assert results[:2] == [True, True]
        assert isinstance(results[2], StoreError)
        assert results[3] is True
        assert store.commits == 1
    assert raw_query(path, "SELECT message_id FROM messages ORDER BY seq") == [
        ("m1",),
        ("m2",),
        ("m3",),
    ]


async def test_sqlite_failing_read_fails_alone_beside_writes(
    tmp_path: Path, make_message: Any
) -> None:
    """A broken read among concurrent writes and reads fails with StoreError; the writes and
    the other reads succeed."""
    async with SQLiteStore(tmp_path / "imrelay.db", commit_interval_ms=20) as store:
        assert await store.put(make_message("m0"))

        def broken(conn: sqlite3.Connection) -> object:
            return conn.execute("SELECT nope FROM nowhere").fetchone()

        results = await asyncio.gather(
            store.put(make_message("m1")),
            store._read(broken),
            store.get("dingtalk", "m0"),
            store.put(make_message("m2")),
            return_exceptions=True,
        )
        assert results[0] is True
        assert results[3] is True
        assert isinstance(results[1], StoreError)
        assert "sqlite query failed" in str(results[1])
        record = results[2]
        assert not isinstance(record, BaseException)
        assert record is not None
        assert record.message.message_id == "m0"
        assert len(await store.pending()) == 3


async def test_sqlite_wal_is_checkpointed_in_the_background(
    tmp_path: Path, make_message: Any
) -> None:
    """The writer's connection never checkpoints (that would wait for the disk on the event
    loop): a background checkpoint copies the WAL into the database file soon after writes."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path) as store:
        await asyncio.sleep(1.2)  # the schema's own checkpoint
        size_before = path.stat().st_size
        done_before = store._writer.checkpoints
        await asyncio.gather(
            *(store.put(make_message(f"m{i}", text="x" * 2000)) for i in range(300))
        )
        async with asyncio.timeout(5):
            while store._writer.checkpoints == done_before:
                await asyncio.sleep(0.05)
        assert path.stat().st_size > size_before + 300 * 2000  # the rows reached the file
        auto = store._writer._conn.execute("PRAGMA wal_autocheckpoint").fetchone()  # type: ignore[union-attr]
        assert auto == (0,)


async def test_sqlite_zero_commit_interval_still_commits(
    tmp_path: Path, make_message: Any
) -> None:
    """With no grouping window every write is still committed and readable."""
    async with SQLiteStore(tmp_path / "imrelay.db", commit_interval_ms=0) as store:
        for i in range(5):
            assert await store.put(make_message(f"m{i}")) is True
        assert len(await store.pending()) == 5
        assert store.commits == 5


async def test_sqlite_open_enables_wal_and_writes_schema_version(tmp_path: Path) -> None:
    """open() creates parent directories, turns on WAL and records the schema version."""
    path = tmp_path / "nested" / "dir" / "imrelay.db"
    async with SQLiteStore(path):
        assert path.exists()
        assert raw_query(path, "PRAGMA journal_mode") == [("wal",)]
        assert raw_query(path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    async with SQLiteStore(path):  # reopening does not add a second version row
        pass
    assert raw_query(path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


async def test_sqlite_open_refuses_newer_schema(tmp_path: Path) -> None:
    """A database written by a newer schema version is refused with StoreError."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    await store.aclose()


async def test_sqlite_open_translates_sqlite_errors(tmp_path: Path) -> None:
    """A path SQLite cannot open raises StoreError chained to the sqlite3 error."""
    store = SQLiteStore(tmp_path)  # a directory, not a database file
    with pytest.raises(StoreError, match="sqlite") as info:
        await store.open()
    assert isinstance(info.value.__cause__, sqlite3.Error)
    with pytest.raises(StoreError, match="not open"):
        await store.ping()
    await store.aclose()


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from imrelay.message import Conversation, InboundMessage, Sender
    from imrelay.stores import SQLiteStore

    def message(mid):
        return InboundMessage(
            platform="dingtalk", message_id=mid, conversation=Conversation("c", "group"),
            sender=Sender("s"), kind="text", text="t " + mid, received_at=0.0,
        )

    async def worker(store, w):
        i = 0
        while True:
            mid = f"w{w}-{i}"
            if not await store.put(message(mid)):
                raise SystemExit("duplicate " + mid)
            sys.stdout.write(mid + "\\n")
            sys.stdout.flush()
            i += 1

    async def main():
        store = SQLiteStore(sys.argv[1])
        await store.open()
        await asyncio.gather(*(worker(store, w) for w in range(8)))

    asyncio.run(main())
    """
)


async def test_sqlite_put_survives_sigkill(tmp_path: Path) -> None:
    """Every message whose put() returned True before a SIGKILL is there on reopen."""
    path = tmp_path / "imrelay.db"
    acked: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        while len(acked) < 300 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.stdout is not None
        acked.extend(line.strip() for line in proc.stdout.read().splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        stderr = proc.stderr.read()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, stderr
    assert len(acked) >= 300, stderr

    async with SQLiteStore(path) as store:
        stored = {r.message.message_id for r in await store.pending()}
    assert set(acked) <= stored


class TestOpenStore:
    def test_open_store_relative_sqlite_path(self) -> None:
        """Three slashes then a relative path give a relative database path."""
        store = open_store("sqlite:///./imrelay.db")
        assert isinstance(store, SQLiteStore)
        assert store.path == "./imrelay.db"

    def test_open_store_absolute_sqlite_path(self) -> None:
        """Four slashes give an absolute path."""
        store = open_store("sqlite:////var/lib/imrelay/imrelay.db")
        assert isinstance(store, SQLiteStore)
        assert store.path == "/var/lib/imrelay/imrelay.db"

    def test_open_store_memory(self) -> None:
        """memory:// gives a MemoryStore."""
        assert isinstance(open_store("memory://"), MemoryStore)

    async def test_open_store_passes_settings(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_message: Any, clock: Any
    ) -> None:
        """The built store works, relative to the working directory, with the given TTL."""
        monkeypatch.chdir(tmp_path)
        store = open_store("sqlite:///data/imrelay.db", dedup_ttl_s=600, clock=clock)
        await store.open()
        try:
            assert await store.put(make_message("m1")) is True
            await store.set_state("dingtalk", "m1", MessageState.REPLIED)
            clock.advance(599)
            assert await store.put(make_message("m1")) is False
            clock.advance(2)
            assert await store.put(make_message("m1")) is True
        finally:
            await store.aclose()
        assert (tmp_path / "data" / "imrelay.db").exists()

    @pytest.mark.parametrize(
        ("url", "match"),
        [
            ("redis://:hunter2@cache:6379/0", "'redis' is not supported yet"),
            ("rediss://cache:6380", "'rediss' is not supported yet"),
            ("postgresql://u:hunter2@db/imrelay", "unsupported storage url scheme 'postgresql'"),
            ("imrelay.db", "no scheme"),
            ("sqlite://dbhost/imrelay.db", "no host"),
            ("sqlite://", "no host"),
            ("sqlite:///", "no database path"),
            ("sqlite:///imrelay.db?mode=ro", "no query"),
            ("memory://somewhere", "nothing after"),
        ],
    )
    def test_open_store_rejects_bad_urls(self, url: str, match: str) -> None:
        """A malformed or unsupported URL raises ConfigError keyed storage.url, without secrets."""
        with pytest.raises(ConfigError, match=match) as info:
            open_store(url)
        assert info.value.key == "storage.url"
        assert "hunter2" not in str(info.value)


async def test_sqlite_purge_larger_than_one_batch(
    tmp_path: Path, make_message: Any, clock: Any
) -> None:
    """A purge of more rows than one transaction takes runs in several and deletes them all
    (the first purge of a long-running inbox must not hold the event loop in one)."""
    from imrelay.stores.sqlite import _PURGE_BATCH

    count = _PURGE_BATCH * 2 + 17
    async with SQLiteStore(tmp_path / "imrelay.db", clock=clock) as store:
        ids = [f"m{i}" for i in range(count)]
        assert all(await asyncio.gather(*(store.put(make_message(m)) for m in ids)))
        await asyncio.gather(
            *(store.set_state("dingtalk", m, MessageState.REPLIED) for m in ids),
            *(store.record_sent("dingtalk", m, 0, clock()) for m in ids),
        )
        await store.put(make_message("pending"))
        commits = store.commits
        clock.advance(2 * 86400)
        assert await store.purge(older_than=clock()) == count
        assert store.commits - commits >= 3
        counts = await store.counts()
        assert counts[MessageState.REPLIED] == 0
        assert counts[MessageState.RECEIVED] == 1
    assert raw_query(tmp_path / "imrelay.db", "SELECT COUNT(*) FROM sent") == [(0,)]
    assert raw_query(tmp_path / "imrelay.db", "SELECT COUNT(*) FROM dedup") == [(0,)]


_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from imrelay.stores import SQLiteStore

    async def main():
        async with SQLiteStore(sys.argv[1]):
            print("open", flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_sqlite_file_held_by_another_process_is_refused_until_it_dies(
    tmp_path: Path, make_message: Any
) -> None:
    """Two gateways on one inbox would answer each other's resumed messages twice."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path) as store:
        await store.put(make_message("m1"))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "open"
        refused = SQLiteStore(path)
        with pytest.raises(StoreError, match="in use by another process") as info:
            await refused.open()
        assert "one gateway per database file" in str(info.value)
        with pytest.raises(StoreError, match="not open"):
            await refused.put(make_message("m2"))
        os.kill(holder.pid, signal.SIGKILL)  # the kernel releases a dead process's lock
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        for stream in (holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
    async with SQLiteStore(path) as store:
        assert [r.message.message_id for r in await store.pending()] == ["m1"]


async def test_sqlite_file_is_held_per_store_and_released_by_aclose(tmp_path: Path) -> None:
    path = tmp_path / "imrelay.db"
    first = SQLiteStore(path)
    await first.open()
    try:
        with pytest.raises(StoreError, match="already open"):
            await first.open()
        with pytest.raises(StoreError, match="in use"):  # the failed open() kept the lock
            await SQLiteStore(path).open()
    finally:
        await first.aclose()
    async with SQLiteStore(path):
        pass


def context_rows(path: Path, key: str) -> list[str]:
    return [row[0] for row in raw_query(path, f"SELECT content FROM context WHERE key = '{key}'")]


def said(i: int, at: float | None = None) -> ContextTurn:
    return ContextTurn("user", f"turn {i}", float(i) if at is None else at)


async def test_sqlite_context_file_matches_what_loads_through_the_cache(tmp_path: Path) -> None:
    """The file is trimmed to ``keep`` although appends skip the trim while they fit."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path) as store:
        assert await store.load("k", since=0) == []  # now cached, and known empty
        for i in range(0, 10, 2):
            await store.append("k", [said(i), said(i + 1)], keep=5)
            assert [t.content for t in await store.load("k", since=0)] == context_rows(path, "k")
        assert context_rows(path, "k") == [f"turn {i}" for i in range(5, 10)]
        assert [t.at for t in await store.load("k", since=7)] == [7.0, 8.0, 9.0]
        await store.clear("k")
        assert await store.load("k", since=0) == [] == context_rows(path, "k")
    async with SQLiteStore(path) as reopened:
        assert await reopened.load("k", since=0) == []


async def test_sqlite_context_expire_drops_cached_lists_that_lost_turns(tmp_path: Path) -> None:
    """After expire() a cached history is read again: were the cached list kept, an append
    that fits would skip the trim and the list would hold a turn the file no longer has."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path) as store:
        await store.append("k", [said(1), said(2), said(3), said(100)], keep=4)
        assert len(await store.load("k", since=0)) == 4  # cached
        assert await store.expire(before=50.0) == 3
        await store.append("k", [said(101), said(102)], keep=4)
        loaded = [t.content for t in await store.load("k", since=0)]
        assert loaded == context_rows(path, "k") == ["turn 100", "turn 101", "turn 102"]


async def test_sqlite_context_expire_cancelled_still_leaves_cache_and_file_agreeing(
    tmp_path: Path,
) -> None:
    """A caller that stops waiting for expire() does not stop its delete, which commits
    later; a load in between caches rows the delete then removes, so the delete itself drops
    the cached lists."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path) as store:
        await store.append("k", [said(1), said(100)], keep=4)
        task = asyncio.create_task(store.expire(before=50.0))
        await asyncio.sleep(0)  # its delete is queued
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert len(await store.load("k", since=0)) == 2  # read, and cached, before the delete
        await store.append("other", [said(200)], keep=4)  # committed after the delete
        loaded = [t.content for t in await store.load("k", since=0)]
        assert loaded == context_rows(path, "k") == ["turn 100"]


async def test_sqlite_context_expire_works_from_the_oldest_rows_in_batches(tmp_path: Path) -> None:
    """Rows are deleted from the lowest ids up to the first fresh one, in transactions of at
    most 2,000 rows; a turn stamped early but appended after a fresh one waits."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path) as store:
        await store.append("old", [said(i, at=1.0) for i in range(4500)], keep=5000)
        await store.append("k", [said(1, at=10.0), said(2, at=100.0), said(3, at=20.0)], keep=9)
        commits = store._writer.commits
        assert await store.expire(before=50.0) == 4501
        assert store._writer.commits - commits == 3  # 2,000 + 2,000 + 501
        assert context_rows(path, "old") == []
        assert context_rows(path, "k") == ["turn 2", "turn 3"]
        assert [t.at for t in await store.load("k", since=50.0)] == [100.0]


async def test_sqlite_context_cache_is_bounded_and_rereads_an_evicted_key(tmp_path: Path) -> None:
    """Two keys cached: the least recently used one is dropped and read from the file again."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path, context_cache_keys=2) as store:
        for key in ("a", "b"):
            await store.append(key, [said(1)], keep=5)
            await store.load(key, since=0)
        outside = sqlite3.connect(path)  # rows the store did not write: visible only on a read
        try:
            with outside:
                outside.executemany(
                    "INSERT INTO context (key, role, content, at) VALUES (?, 'user', ?, 2.0)",
                    [("a", "x"), ("b", "y")],
                )
        finally:
            outside.close()

        async def contents(key: str) -> list[str]:
            return [t.content for t in await store.load(key, since=0)]

        assert await contents("a") == ["turn 1"]  # cached, and now used after "b"
        assert await contents("c") == []  # drops "b", the least recently used (not "a")
        assert await contents("a") == ["turn 1"]
        assert await contents("b") == ["turn 1", "y"]  # read again; drops "c"
        assert await contents("d") == []  # drops "a"
        assert await contents("a") == ["turn 1", "x"]


async def test_sqlite_context_failed_append_leaves_cache_and_file_agreeing(tmp_path: Path) -> None:
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path) as store:
        await store.append("k", [said(1)], keep=5)
        await store.load("k", since=0)
        broken = ContextTurn("user", object(), 2.0)  # type: ignore[arg-type]  # sqlite refuses it
        with pytest.raises(StoreError):
            await store.append("k", [said(2), broken], keep=5)
        assert [t.content for t in await store.load("k", since=0)] == ["turn 1"]
        assert context_rows(path, "k") == ["turn 1"]


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "not-cached"])
async def test_sqlite_context_load_during_an_append_in_flight(
    tmp_path: Path, cached: bool
) -> None:
    """A load while an append waits for its commit sees the committed turns, and the next
    load after the commit sees the new ones, whether the key was cached or not."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path, commit_interval_ms=500) as store:
        await store.append("k", [said(1)], keep=5)
        if cached:
            await store.load("k", since=0)
        pending = asyncio.create_task(store.append("k", [said(2)], keep=5))
        await asyncio.sleep(0.02)
        assert not pending.done()
        assert [t.content for t in await store.load("k", since=0)] == ["turn 1"]
        await pending
        assert [t.content for t in await store.load("k", since=0)] == ["turn 1", "turn 2"]


async def test_sqlite_context_read_after_a_commit_but_before_the_append_resumed(
    tmp_path: Path,
) -> None:
    """A task woken by an earlier write of the same commit reads the key (not cached) before
    the append's own task resumes: that list already holds the new turns, which the append
    must not add a second time."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path, commit_interval_ms=50) as store:

        async def reader() -> list[ContextTurn]:
            await store.record_sent("dingtalk", "m1", 0, 1.0)  # committed with the append
            return await store.load("k", since=0)

        read = asyncio.create_task(reader())
        await asyncio.sleep(0)  # its record_sent is queued first
        await store.append("k", [said(1), said(2)], keep=10)
        assert [t.content for t in await read] == ["turn 1", "turn 2"]
        assert [t.content for t in await store.load("k", since=0)] == ["turn 1", "turn 2"]
        assert context_rows(path, "k") == ["turn 1", "turn 2"]


async def test_sqlite_overlapping_appends_still_trim_the_file(tmp_path: Path) -> None:
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path, commit_interval_ms=50) as store:
        await store.append("k", [said(1), said(2)], keep=4)
        await store.load("k", since=0)  # cached: 2 turns, each append alone would fit
        await asyncio.gather(
            store.append("k", [said(3), said(4)], keep=4),
            store.append("k", [said(5), said(6)], keep=4),
        )
        assert context_rows(path, "k") == [f"turn {i}" for i in range(3, 7)]
        assert [t.content for t in await store.load("k", since=0)] == context_rows(path, "k")


async def test_sqlite_closed_store_refuses_a_load_it_has_cached(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "imrelay.db")
    await store.open()
    await store.append("k", [said(1)], keep=5)
    await store.load("k", since=0)
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.load("k", since=0)


async def test_sqlite_cancelled_append_still_counts_until_it_commits(tmp_path: Path) -> None:
    """An append whose caller stopped waiting still commits: a load meanwhile is not cached
    (it would miss those turns), and a later append trims the file."""
    path = tmp_path / "imrelay.db"
    async with SQLiteStore(path, commit_interval_ms=100) as store:
        await store.append("k", [said(1), said(2)], keep=3)
        await store.load("k", since=0)
        stopped = asyncio.create_task(store.append("k", [said(3)], keep=3))
        await asyncio.sleep(0.01)
        stopped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopped
        assert [t.content for t in await store.load("k", since=0)] == ["turn 1", "turn 2"]
        await store.append("k", [said(4)], keep=3)
        assert context_rows(path, "k") == ["turn 2", "turn 3", "turn 4"]
        assert [t.content for t in await store.load("k", since=0)] == context_rows(path, "k")


async def test_sqlite_lock_stays_while_an_interrupted_close_left_the_file_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "imrelay.db"
    store = SQLiteStore(path, commit_interval_ms=500)
    await store.open()
    writing = asyncio.create_task(store.append("k", [said(1)], keep=3))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(store.aclose())
    await asyncio.sleep(0.01)
    closing.cancel()  # cut off while it waits for the queued write
    with pytest.raises(asyncio.CancelledError):
        await closing
    with pytest.raises(StoreError, match="in use"):
        await SQLiteStore(path).open()
    await store.aclose()  # closes what the first one left open, then lets go of the file
    async with SQLiteStore(path):
        pass
    writing.cancel()
    await asyncio.gather(writing, return_exceptions=True)
