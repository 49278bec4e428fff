"""One SQLite connection on the event loop, with writes grouped into shared transactions.

Theory of operation: SQLite allows one writer at a time, and a commit costs a WAL append
whatever it holds, so both the inbox/context store and the audit log write the same way:
callers :meth:`GroupWriter.submit` an item and await its result; a writer task collects
whatever is queued (waiting ``linger_s`` when a write arrives alone, so that others can share
its commit) and hands the batch to the owner's ``commit`` function, in one call. That function
runs one transaction over the whole batch and returns one outcome per item: ``(True, result)``
or ``(False, exception)`` for an item that failed on its own (the others still commit). If it
raises, the transaction did not happen and every item of the batch gets the exception.

The connection is used on the event loop's own thread. In WAL mode with ``synchronous=NORMAL``
a commit appends to the WAL without waiting for the disk, so a batch costs tens of
microseconds. A connection on a thread of its own cost more: each SQLite call releases and
re-takes the GIL, and under load the writer thread waited up to the interpreter's switch
interval for it every time, so a busy gateway saw store round trips of 50 ms and more (and
spent ~15 % more CPU per message on the handoffs). What does wait for the disk is the WAL
checkpoint (copying the WAL back into the database, with an fsync), so automatic checkpoints
are turned off on this connection and a background task runs a ``PASSIVE`` checkpoint on a
connection of its own, in a worker thread, every ``checkpoint_interval_s`` after writes, and
flushes the database file; a passive checkpoint never blocks the writer.

SQLite starts the WAL again from its beginning only when a write finds every frame of it copied
into the database. Under steady load some commit always lands while a checkpoint runs, so the
WAL never restarted: it grew by ~40 MB a second at 1,200 messages/s, without bound, and the
writer's cost per message doubled within a minute (appending to an ever longer file and its
index). So once the WAL holds ``restart_frames`` (32,768 pages, 128 MiB at 4 KiB) and commits
happened during the background copy, catch-up copies follow (in the worker thread, up to five,
while each copies at most half as much as the one before) until one copied few frames (256);
then the writer itself, before it begins its next transaction, copies the last frames on its
own connection, on the event loop: no commit can land in between, so that transaction starts
the WAL again (unless another process reads an older snapshot). That last copy blocks the loop
for 1–4 ms (a few hundred pages and two small fsyncs). When the catch-ups do not get that
short (writes keep pace with them: a bulk load, or a slow disk), the rest is copied in the
worker thread while writes wait instead, so the loop never copies much. The last copy used to
run in the worker thread, with writes waiting, every time: the thread needed the GIL back after
each SQLite call, which a busy loop hands over once per switch interval (5 ms), and it flushed
everything copied since the last restart, so writes were held for 5–40 ms. At 1,500
messages/s the WAL restarts every ~2 s; under light load a checkpoint usually finds no commit
beside it and the WAL restarts without any of this. While another connection keeps an old
snapshot open (a long read by another process), the copy cannot finish and the WAL cannot
restart: the writer is then not asked again for 30 s. A WAL file that
grew beyond 512 MiB (``journal_size_limit``) is trimmed when it restarts; in steady operation it
stays below that, since trimming happens on the writer's own (event-loop) thread.

Reads go through :meth:`GroupWriter.call` and see every committed write. :meth:`aclose`
commits what is queued, checkpoints, then closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from imrelay.errors import StoreError

__all__ = ["GroupWriter", "Outcome"]

logger = logging.getLogger(__name__)

_I = TypeVar("_I")
_R = TypeVar("_R")
_T = TypeVar("_T")

Outcome = tuple[bool, Any]
"""``(True, result)`` or ``(False, exception)`` for one item of a batch."""

_MAX_BATCH: Final = 1024
_CHECKPOINT_INTERVAL_S: Final = 1.0
_RESTART_FRAMES: Final = 32768  # WAL frames (128 MiB of 4 KiB pages) that call for a restart
_WAL_SIZE_LIMIT: Final = 512 * 1024 * 1024  # a WAL file larger than this is trimmed at restart
_RESTART_BACKOFF_S: Final = 30.0  # after a last copy a reader kept from finishing
_CATCH_UP_ROUNDS: Final = 5  # background copies before the writer copies the rest itself
_LAST_COPY_FRAMES: Final = 256  # a catch-up this short leaves few enough for the writer


@dataclass(slots=True)
class _Queued(Generic[_I]):
    item: _I
    future: asyncio.Future[Any]


class GroupWriter(Generic[_I, _R]):
    """A connection on the event loop, grouped commits of submitted items, background
    checkpoints.

    Args:
        name: names the writer task and starts error texts (``"store"``, ``"audit log"``).
        connect: opens and prepares the connection (WAL mode); raises :class:`StoreError`
            when it cannot.
        commit: writes a batch in one transaction (see the module docstring).
        linger_s: how long a lone write waits for company.
        path: the database file, for the checkpoint connection (``None`` or ``":memory:"``:
            no checkpoints).
        max_batch: the most items in one transaction.
        checkpoint_interval_s: how often, while writes happen, the WAL is checkpointed.
        restart_frames: how long the WAL may grow (in frames, one per page written) before the
            writer copies its last frames itself so that it restarts (see the module docstring).
    """

    def __init__(
        self,
        name: str,
        *,
        connect: Callable[[], sqlite3.Connection],
        commit: Callable[[sqlite3.Connection, list[_I]], list[Outcome]],
        linger_s: float,
        path: str | None = None,
        max_batch: int = _MAX_BATCH,
        checkpoint_interval_s: float = _CHECKPOINT_INTERVAL_S,
        restart_frames: int = _RESTART_FRAMES,
    ) -> None:
        self.name = name
        self._connect = connect
        self._commit_fn = commit
        self._linger = max(linger_s, 0.0)
        self._path = None if path in (None, ":memory:") else path
        self._max_batch = max_batch
        self._checkpoint_interval_s = checkpoint_interval_s
        self._conn: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[_Queued[_I] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        # set: copy the WAL's last frames before the next transaction, then resolve it
        self._restart: asyncio.Future[tuple[int, int]] | None = None
        self._thread_work: asyncio.Future[tuple[int, int]] | None = None  # a checkpoint thread
        self._hold: asyncio.Future[None] | None = None  # set: begin no transaction until done
        # the database file, for flushing it after a checkpoint; opened once and closed only
        # after the connection: closing any descriptor of a file drops the POSIX locks the
        # process holds on it, SQLite's included
        self._sync_fd: int | None = None
        self._restart_frames = restart_frames
        self._restart_again_at = 0.0  # loop time before which the writer is not asked again
        self.closed = False
        self.commits = 0
        """Transactions committed so far (each may hold many items)."""
        self.checkpoints = 0
        """Rounds of background checkpoints that ran (each a copy, and at times catch-ups and
        the writer's last copy after it)."""
        self.last_copies = 0
        """Copies of the WAL's last frames the writer made on its own connection, between two
        transactions, so that the next one restarts the WAL (see the module docstring)."""
        self.last_copy_s = 0.0
        """How long the latest of them took (seconds, on the event loop)."""
        self.held_copies = 0
        """Copies of the WAL's rest made in the worker thread while the writer waited, when
        writes kept pace with the catch-up copies (a bulk load)."""

    @property
    def is_open(self) -> bool:
        """Opened and not closed."""
        return self._conn is not None and not self.closed

    async def open(self) -> None:
        """Connect and start the writer and checkpoint tasks.

        Raises:
            StoreError: opened before, closed, or ``connect`` failed.
        """
        if self.closed:
            raise StoreError(f"{self.name} is closed")
        if self._conn is not None:
            raise StoreError(f"{self.name} is already open")
        conn = self._connect()
        if self._path is not None:
            try:
                conn.execute("PRAGMA wal_autocheckpoint=0")  # see the module docstring
                conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            except sqlite3.Error as exc:
                conn.close()
                raise StoreError(f"{self.name}: cannot configure sqlite: {exc}") from exc
            try:
                self._sync_fd = os.open(self._path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                conn.close()
                raise StoreError(
                    f"{self.name}: cannot open {self._path}: {exc.strerror}"
                ) from None
        self._conn = conn
        task_name = "imrelay-" + self.name.replace(" ", "-")
        self._task = asyncio.create_task(self._run(), name=f"{task_name}-writer")
        if self._path is not None:
            self._checkpointer = asyncio.create_task(
                self._checkpoint_loop(), name=f"{task_name}-checkpoint"
            )

    async def aclose(self) -> None:
        """Commit every queued item, checkpoint, then close the connection. Safe to call
        twice."""
        if self.closed:  # an earlier aclose() may have been cut off before the end
            if self._conn is not None and (self._task is None or self._task.done()):
                await self._stop_checkpoints()
                self._close_connection()
            return
        self.closed = True
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
        await self._stop_checkpoints()
        self._close_connection()

    async def _stop_checkpoints(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
        work = self._thread_work
        if work is not None and not work.done():  # a thread cannot be stopped: let it finish
            await asyncio.wait([work])

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._path is not None:
                with contextlib.suppress(sqlite3.Error):  # best effort: the WAL stays valid
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
        fd, self._sync_fd = self._sync_fd, None
        if fd is not None:  # after the connection (see __init__)
            os.close(fd)

    @property
    def connected(self) -> bool:
        """The connection is still open (until :meth:`aclose` has closed it)."""
        return self._conn is not None

    def check_open(self) -> None:
        """Raise :class:`StoreError` unless open."""
        if self.closed:
            raise StoreError(f"{self.name} is closed")
        if self._conn is None:
            raise StoreError(f"{self.name} is not open")

    async def submit(self, item: _I) -> _R:
        """Queue ``item``; return its result once its transaction committed.

        Raises:
            StoreError: not open, or the commit failed; or the item's own exception.
        """
        self.check_open()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Queued(item, future))
        result: _R = await future
        return result

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn(connection)`` (for reads); ``sqlite3.Error`` becomes StoreError."""
        self.check_open()
        conn = self._conn
        assert conn is not None  # nosec B101  # check_open() above
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite query failed: {exc}") from exc

    async def _run(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            if self._queue.empty() and self._linger > 0:
                await asyncio.sleep(self._linger)
            while (hold := self._hold) is not None:  # a thread copies the rest (a bulk load)
                await asyncio.shield(hold)
            if self._restart is not None:  # before this transaction begins: see the docstring
                self._copy_last_frames()
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                queued = self._queue.get_nowait()
                if queued is None:  # aclose() enqueues it after the last write
                    stop = True
                    break
                batch.append(queued)
            self._commit(batch)
        request, self._restart = self._restart, None
        if request is not None and not request.done():  # closing: the next one will do it
            request.set_result((0, 0))

    def _copy_last_frames(self) -> None:
        """Copy the frames the WAL holds beyond the database, on the writer's connection and
        outside any transaction, so that the next transaction starts the WAL again."""
        request, self._restart = self._restart, None
        conn = self._conn
        if request is None or conn is None:
            return
        started = time.perf_counter()
        try:
            row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            if not request.done():
                request.set_exception(exc)
            return
        self.last_copies += 1
        self.last_copy_s = time.perf_counter() - started
        if not request.done():
            request.set_result(_frames(row))

    def _commit(self, batch: list[_Queued[_I]]) -> None:
        conn = self._conn
        try:
            if conn is None:
                raise StoreError(f"{self.name} is closed")
            outcomes = self._commit_fn(conn, [queued.item for queued in batch])
        except Exception as exc:  # the commit itself failed: no item took effect
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(exc)
            return
        self.commits += 1
        self._dirty.set()
        for queued, (ok, value) in zip(batch, outcomes, strict=True):
            if queued.future.done():  # the caller was cancelled; the write stands
                continue
            if ok:
                queued.future.set_result(value)
            else:
                queued.future.set_exception(value)

    async def _checkpoint_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            commits = self.commits
            try:
                frames, _ = await self._in_thread(self._checkpoint)
                self.checkpoints += 1
                # commits meanwhile keep the WAL from restarting: once it is long, copy what
                # they wrote, then have the writer copy the last frames (see the docstring)
                if (
                    self.commits != commits
                    and frames >= self._restart_frames
                    and self._loop_time() >= self._restart_again_at
                ):
                    await self._restart_wal(frames)
            except (sqlite3.Error, OSError) as exc:  # retried after the next writes
                logger.warning("%s: wal checkpoint failed: %s", self.name, exc)
            await asyncio.sleep(self._checkpoint_interval_s)

    async def _restart_wal(self, frames: int) -> None:
        """Catch up with the commits made during the copy that found ``frames`` in the WAL,
        then let the writer copy the rest before its next transaction."""
        previous = None  # frames the catch-up before copied
        short = False
        for _ in range(_CATCH_UP_ROUNDS):
            commits = self.commits
            log, _ = await self._in_thread(self._checkpoint)
            if self.commits == commits:  # nothing was written since: the next commit restarts
                return
            caught_up, frames = log - frames, log
            if caught_up <= _LAST_COPY_FRAMES:  # a short copy: fewer still came during it
                short = True
                break
            if previous is not None and caught_up > previous // 2:  # writes keep pace with
                break  # the copies (a bulk load): more rounds would not leave less
            previous = caught_up
        if short:
            request = self._restart = asyncio.get_running_loop().create_future()
            try:
                _, left = await request
            except sqlite3.Error as exc:  # e.g. a statement of the connection still open
                logger.warning("%s: the writer's wal copy failed: %s", self.name, exc)
                left = 1
        else:  # too much for the loop to copy: a thread copies it while writes wait
            left = await self._held_copy()
        if left:  # a reader's snapshot kept frames back: the WAL cannot restart while it lasts,
            # so do not ask the writer every interval meanwhile
            self._restart_again_at = self._loop_time() + _RESTART_BACKOFF_S

    async def _held_copy(self) -> int:
        """Copy the WAL in the worker thread while the writer begins no transaction; return
        how many frames the copy could not take."""
        hold: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hold = hold

        def release(_: object = None) -> None:
            if self._hold is hold:
                self._hold = None
            if not hold.done():
                hold.set_result(None)

        try:
            _, left = await self._in_thread(self._checkpoint)
            self.held_copies += 1
            return left
        finally:
            work = self._thread_work
            if work is not None and not work.done():  # cancelled: held until the thread ends
                work.add_done_callback(release)
            else:
                release()

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def _in_thread(self, fn: Callable[[], tuple[int, int]]) -> tuple[int, int]:
        work = self._thread_work = asyncio.ensure_future(asyncio.to_thread(fn))
        return await asyncio.shield(work)  # cancelling the wait leaves the thread running

    def _checkpoint(self) -> tuple[int, int]:
        """Copy the WAL into the database (in a worker thread, on a connection of its own),
        then flush the database file to the disk; return how many frames the WAL holds, and
        how many of them the copy could not take (a reader's snapshot keeps them).

        SQLite flushes the database only after a copy that reached the WAL's end, which under
        steady load no background copy does: without the flush here the writer's last copy
        (see the module docstring) flushed everything copied since the WAL last restarted,
        tens of megabytes, for 15-40 ms on the event loop.
        """
        assert self._path is not None  # nosec B101  # the loop only runs with a file
        conn = sqlite3.connect(self._path, timeout=5.0, isolation_level=None)
        try:
            row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            conn.close()
        fd = self._sync_fd
        if fd is not None:
            os.fsync(fd)
        return _frames(row)


def _frames(row: Any) -> tuple[int, int]:
    """``(frames in the WAL, frames not copied)`` from a ``wal_checkpoint`` row."""
    if row is None or row[1] is None or row[2] is None or row[1] < 0:
        return 0, 0
    return int(row[1]), int(row[1]) - int(row[2])
