"""The grouped-commit writer's WAL housekeeping: under steady writes the WAL still restarts
(it does not grow without bound), the writer copies the last frames itself between two
transactions, and closing waits for a checkpoint thread."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

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


def _wal_number(path: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time it starts the
    WAL from its beginning (read from the file, so that nothing is checkpointed)."""
    with open(f"{path}-wal", "rb") as wal:
        header = wal.read(16)
    return int.from_bytes(header[12:16], "big")


class _TableWriter(GroupWriter[bytes, None]):
    """Rows into table ``t`` of ``path``, committed without lingering."""

    def __init__(self, path: Path, **kwargs: object) -> None:
        super().__init__(
            "test",
            connect=lambda: _connect(path),
            commit=_insert,
            linger_s=0.0,
            path=str(path),
            **kwargs,  # type: ignore[arg-type]
        )


class _SlowCheckpoints(_TableWriter):
    """Checkpoints that take ``delay_s`` in their thread and note the commits made meanwhile."""

    def __init__(self, path: Path, delay_s: float, **kwargs: object) -> None:
        super().__init__(path, **kwargs)
        self.delay_s = delay_s
        self.running = threading.Event()
        self.during_held: list[int] = []  # commits made while a held copy ran
        self.last: list[tuple[bool, int]] = []  # per last copy: in a transaction?, WAL number
        self.first_after: list[int] = []  # the WAL's number after the commit that followed one

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

    def _copy_last_frames(self) -> None:
        conn = self._conn
        assert conn is not None
        in_transaction = conn.in_transaction
        self.last.append((in_transaction, _wal_number(self.path_)))
        super()._copy_last_frames()

    def _commit(self, batch: list[Any]) -> None:
        after_last = len(self.last) > len(self.first_after)
        super()._commit(batch)
        if after_last:
            self.first_after.append(_wal_number(self.path_))

    @property
    def path_(self) -> Path:
        assert self._path is not None
        return Path(self._path)


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
    WAL again; once it holds ``restart_frames``, the writer's copy of the last frames lets the
    next commit restart it, and the WAL stays near that size (plus what a few intervals write)
    however much is written."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.01, checkpoint_interval_s=0.02, restart_frames=300)
    await writer.open()
    try:
        written = await _write_steadily(writer, 1.5)
        frames = _wal_frames(path)
    finally:
        await writer.aclose()
    assert writer.last_copies + writer.held_copies >= 2
    # without restarts the WAL holds a frame or more per row written; with them, a few
    # checkpoint intervals' worth (more when other processes slow the checkpoint thread)
    assert frames < written / 2, f"{frames} WAL frames for {written} rows"


async def test_writer_copies_the_last_frames_between_transactions(tmp_path: Path) -> None:
    """The last copy runs on the writer's connection outside any transaction, leaves the WAL
    with no frame the database lacks, and the next commit starts the WAL from its beginning."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.02, checkpoint_interval_s=0.01, restart_frames=1)
    await writer.open()
    try:
        deadline = asyncio.get_running_loop().time() + 0.8
        while asyncio.get_running_loop().time() < deadline:  # paced: catch-ups get short
            await writer.submit(_ROW)
            await asyncio.sleep(0.002)
    finally:
        await writer.aclose()
    assert writer.last, "the writer never copied the last frames"
    assert writer.last_copies == len(writer.last)
    assert writer.last_copy_s > 0
    # the commit after each last copy started the WAL again
    assert len(writer.first_after) == len(writer.last)
    for (in_transaction, before), after in zip(writer.last, writer.first_after, strict=True):
        assert not in_transaction
        assert after > before


async def test_held_copy_keeps_commits_out(tmp_path: Path) -> None:
    """When writes keep pace with the catch-up copies (back to back here), the rest is copied in
    the thread while writes queue: none commits during that copy, and the WAL still restarts."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.05, checkpoint_interval_s=0.01, restart_frames=1)
    await writer.open()
    try:
        await _write_steadily(writer, 0.8)
    finally:
        await writer.aclose()
    assert writer.held_copies >= 1
    assert writer.during_held == [0] * len(writer.during_held)
    assert len(writer.during_held) == writer.held_copies


async def test_checkpoint_flush_keeps_the_writers_locks(tmp_path: Path) -> None:
    """The flush after a checkpoint must not drop the process's SQLite locks (closing any
    descriptor of a file drops them): else another process that opens and closes the database
    takes it for unused, copies and deletes the WAL, and commits made after that are lost to
    every other reader."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.0, checkpoint_interval_s=0.01)
    await writer.open()
    try:
        await writer.submit(_ROW)
        async with asyncio.timeout(5):
            while writer.checkpoints < 2:
                await writer.submit(_ROW)
                await asyncio.sleep(0.02)
        _other_process(path, "c.execute('SELECT COUNT(*) FROM t').fetchone()")
        assert os.path.exists(f"{path}-wal")  # the other process saw the database in use
        rows = writer.commits
        await writer.submit(_ROW)
        seen = _other_process(path, "print(c.execute('SELECT COUNT(*) FROM t').fetchone()[0])")
        assert int(seen) == rows + 1
    finally:
        await writer.aclose()


def _other_process(path: Path, code: str) -> str:
    script = f"import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\n{code}\nc.close()\n"
    done = subprocess.run(  # this interpreter, a fixed script
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


async def test_short_wal_is_left_to_the_background(tmp_path: Path) -> None:
    """Below ``restart_frames`` the writer never copies frames itself."""
    path = tmp_path / "w.db"
    writer = _SlowCheckpoints(path, 0.005, checkpoint_interval_s=0.01, restart_frames=10**9)
    await writer.open()
    try:
        await _write_steadily(writer, 0.5)
        assert writer.checkpoints >= 2
    finally:
        await writer.aclose()
    assert writer.last_copies == 0


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
    """While another connection holds an old snapshot the WAL cannot restart: after a
    last copy that could not finish, no other is attempted for a while."""
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
    # one attempt to finish the restart: the writer's last copy or, when writes kept pace
    # with the catch-ups (a fast machine writes this table faster), the held copy
    assert writer.last_copies + writer.held_copies == 1


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


class _ScriptedCopies(_TableWriter):
    """Background copies that report scripted WAL lengths, each as if a commit landed during
    it; records the order of background copies and the writer's last copy."""

    def __init__(self, path: Path, lengths: list[int]) -> None:
        super().__init__(path, checkpoint_interval_s=3600.0, restart_frames=1000)
        self.lengths = list(lengths)
        self.events: list[str] = []

    def _checkpoint(self) -> tuple[int, int]:
        self.events.append("held copy" if self._hold is not None else "copy")
        self.commits += 1  # a commit during every copy: the WAL never restarts by itself
        return (self.lengths.pop(0) if self.lengths else 0), 0

    def _copy_last_frames(self) -> None:
        if self._restart is not None:
            self.events.append("last")
        super()._copy_last_frames()


async def _run_script(path: Path, lengths: list[int]) -> list[str]:
    writer = _ScriptedCopies(path, lengths)
    await writer.open()
    try:
        await writer.submit(_ROW)  # wakes the checkpoint task
        async with asyncio.timeout(5):
            while writer._restart is None and writer.held_copies == 0:
                await asyncio.sleep(0.001)
        await writer.submit(_ROW)  # the writer copies before this one's transaction
    finally:
        await writer.aclose()
    return writer.events


async def test_catch_up_copies_stop_once_one_was_short(tmp_path: Path) -> None:
    """Catch-up copies go on while each copied many frames; the first one that copied at most
    256 (what came during the copy before it) leaves the rest to the writer."""
    events = await _run_script(tmp_path / "w.db", [40_000, 42_000, 42_800, 43_000])
    assert events == ["copy"] + ["copy"] * 3 + ["last"]


async def test_catch_up_copies_stop_when_writes_keep_pace(tmp_path: Path) -> None:
    """A catch-up that copied more than half of what the one before copied shows the writes
    keeping pace with the copies: the rest is copied in the thread while writes wait, not by
    the writer on the loop."""
    events = await _run_script(tmp_path / "w.db", [40_000, 42_000, 43_500, 44_900])
    assert events == ["copy"] + ["copy"] * 2 + ["held copy"]


async def test_catch_up_copies_are_bounded(tmp_path: Path) -> None:
    """Five catch-up copies at most; if none was short, the thread copies the rest."""
    lengths = [40_000, 48_000, 52_000, 54_000, 55_000, 55_500, 55_750, 55_870]
    events = await _run_script(tmp_path / "w.db", lengths)
    assert events == ["copy"] + ["copy"] * 5 + ["held copy"]
