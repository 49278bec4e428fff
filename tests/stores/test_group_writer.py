"""The grouped-commit writer's WAL housekeeping: under steady writes the WAL still restarts
(it does not grow without bound), a held checkpoint keeps commits out while it runs, and
closing waits for a checkpoint thread."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path

from imrelay.stores._writer import GroupWriter, Outcome

_ROW = b"x" * 3000  # most of a 4 KiB page: about one WAL frame per row


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    return conn


def _insert(conn: sqlite3.Connection, batch: list[bytes]) -> list[Outcome]:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO t (body) VALUES (?)", [(b,) for b in batch])
    conn.execute("COMMIT")
    return [(True, None) for _ in batch]


def _wal_frames(path: Path) -> int:
    """Frames in the WAL since its last restart (what a passive checkpoint reports)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        conn.close()
    return int(row[1])


class _SlowCheckpoints(GroupWriter[bytes, None]):
    """Checkpoints that take ``delay_s`` in their thread and note the commits made meanwhile."""

    def __init__(self, path: Path, delay_s: float, **kwargs: object) -> None:
        super().__init__(
            "test",
            connect=lambda: _connect(path),
            commit=_insert,
            linger_s=0.0,
            path=str(path),
            **kwargs,  # type: ignore[arg-type]
        )
        self.delay_s = delay_s
        self.during_held: list[int] = []  # commits made while a held checkpoint ran
        self.running = threading.Event()

    def _checkpoint(self) -> tuple[int, int]:
        held = self._hold is not None
        before = self.commits
        self.running.set()
        time.sleep(self.delay_s)
        frames = super()._checkpoint()
        if held:
            self.during_held.append(self.commits - before)
        self.running.clear()
        return frames


async def _write_steadily(writer: GroupWriter[bytes, None], seconds: float) -> int:
    """Four writers back to back for ``seconds``: some commit lands in every checkpoint."""
    deadline = asyncio.get_running_loop().time() + seconds
    written = 0

    async def one() -> None:
        nonlocal written
        while asyncio.get_running_loop().time() < deadline:
            await writer.submit(_ROW)
            written += 1

    await asyncio.gather(*(one() for _ in range(4)))
    return written


async def test_wal_restarts_under_steady_writes(tmp_path: Path) -> None:
    """Commits land during every background checkpoint, so SQLite alone would never start the
    WAL again; once it holds ``restart_frames``, a held checkpoint lets the next commit restart
    it, and the WAL stays near that size (plus what a few intervals write) however much is
    written."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.01, checkpoint_interval_s=0.02, restart_frames=300)
    await writer.open()
    try:
        written = await _write_steadily(writer, 1.5)
        frames = _wal_frames(path)
    finally:
        await writer.aclose()
    assert writer.held_checkpoints >= 2
    # without restarts the WAL holds a frame or more per row written; with them, a few
    # checkpoint intervals' worth
    assert frames < written / 5, f"{frames} WAL frames for {written} rows"


async def test_held_checkpoint_keeps_commits_out(tmp_path: Path) -> None:
    """While a held checkpoint runs, writes queue; they commit once it is over."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.05, checkpoint_interval_s=0.01, restart_frames=1)
    await writer.open()
    try:
        await _write_steadily(writer, 0.8)
    finally:
        await writer.aclose()
    assert writer.during_held, "no held checkpoint ran"
    assert writer.during_held == [0] * len(writer.during_held)


async def test_short_wal_is_not_held(tmp_path: Path) -> None:
    """Below ``restart_frames`` no checkpoint holds the writer back."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.005, checkpoint_interval_s=0.01, restart_frames=10**9)
    await writer.open()
    try:
        await _write_steadily(writer, 0.5)
        assert writer.checkpoints >= 2
    finally:
        await writer.aclose()
    assert writer.held_checkpoints == 0


async def test_close_waits_for_a_checkpoint_thread(tmp_path: Path) -> None:
    """A checkpoint thread cannot be stopped: closing waits for it before it closes the
    connection (whose last, truncating checkpoint would otherwise find it busy and leave the
    WAL as it is)."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.3, checkpoint_interval_s=0.01)
    await writer.open()
    await writer.submit(_ROW)
    async with asyncio.timeout(5):
        while not writer.running.is_set():
            await asyncio.sleep(0.005)
    await writer.aclose()
    assert not writer.running.is_set()  # the thread was over before aclose() returned
    assert os.path.getsize(path) > len(_ROW)


async def test_a_reader_that_keeps_the_wal_is_not_fought_every_interval(tmp_path: Path) -> None:
    """While another connection holds an old snapshot the WAL cannot restart: after a held
    copy that could not finish, the writer is not held again for a while."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.002, checkpoint_interval_s=0.01, restart_frames=1)
    await writer.open()
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        await writer.submit(_ROW)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM t").fetchone()  # a snapshot, kept open
        await _write_steadily(writer, 0.6)
    finally:
        reader.close()
        await writer.aclose()
    assert writer.checkpoints >= 10
    assert writer.held_checkpoints == 1


async def test_writer_sets_a_wal_size_limit(tmp_path: Path) -> None:
    """``journal_size_limit`` is set on the writer's connection, so SQLite trims a WAL file
    that a burst made large once the WAL restarts."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.0, checkpoint_interval_s=0.01)
    await writer.open()
    try:
        conn = writer._conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_size_limit").fetchone() == (512 * 1024 * 1024,)
    finally:
        await writer.aclose()
