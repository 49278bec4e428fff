"""One SQLite connection on its own thread, with writes grouped into shared transactions.

Theory of operation: SQLite allows one writer at a time, and a commit costs a WAL append
whatever it holds, so both the inbox/context store and the audit log write the same way: the
connection lives on a private one-thread executor (sqlite3 objects stay on the thread that made
them), callers :meth:`GroupWriter.submit` an item and await its result, and a writer task on the
event loop collects whatever is queued (waiting ``linger_s`` when a write arrives alone, so
that others can share its commit) and hands the batch to the owner's ``commit`` function on the
thread, in one call. That function runs one transaction over the whole batch and returns one
outcome per item: ``(True, result)`` or ``(False, exception)`` for an item that failed on its
own (the others still commit). If it raises, the transaction did not happen and every item of
the batch gets the exception.

Reads go through :meth:`GroupWriter.call`: a read joins the next batch (so reads and writes
share one hop to the thread) and runs before that batch's writes, so it sees every write
committed before it was queued. :meth:`GroupWriter.aclose` commits what is queued, then closes
the connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar, cast

from imrelay.errors import StoreError

__all__ = ["GroupWriter", "Outcome"]

_I = TypeVar("_I")
_R = TypeVar("_R")
_T = TypeVar("_T")

Outcome = tuple[bool, Any]
"""``(True, result)`` or ``(False, exception)`` for one item of a batch."""

_MAX_BATCH: Final = 1024


@dataclass(slots=True)
class _Queued(Generic[_I]):
    item: _I
    future: asyncio.Future[Any]
    read: Callable[[sqlite3.Connection], Any] | None = None  # a read rides along with writes


class GroupWriter(Generic[_I, _R]):
    """A connection on a private thread, and grouped commits of submitted items.

    Args:
        name: names the thread and the writer task, and starts error texts (``"store"``,
            ``"audit log"``).
        connect: opens and prepares the connection, on the thread; raises
            :class:`StoreError` when it cannot.
        commit: writes a batch in one transaction, on the thread (see the module docstring).
        linger_s: how long a lone write waits for company.
        max_batch: the most items in one transaction.
    """

    def __init__(
        self,
        name: str,
        *,
        connect: Callable[[], sqlite3.Connection],
        commit: Callable[[sqlite3.Connection, list[_I]], list[Outcome]],
        linger_s: float,
        max_batch: int = _MAX_BATCH,
    ) -> None:
        self.name = name
        self._connect = connect
        self._commit_fn = commit
        self._linger = max(linger_s, 0.0)
        self._max_batch = max_batch
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Queued[_I] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        self.commits = 0
        """Transactions committed so far (each may hold many items)."""

    @property
    def is_open(self) -> bool:
        """Opened and not closed."""
        return self._executor is not None and not self.closed

    async def open(self) -> None:
        """Connect on the thread and start the writer task.

        Raises:
            StoreError: opened before, closed, or ``connect`` failed.
        """
        if self.closed:
            raise StoreError(f"{self.name} is closed")
        if self._executor is not None:
            raise StoreError(f"{self.name} is already open")
        thread = "imrelay-" + self.name.replace(" ", "-")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread)
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._open_conn)
        except BaseException:
            # if open() was cancelled, connect may still finish: close what it opened
            self._executor.submit(self._close_conn)
            self._executor.shutdown(wait=True)
            self._executor = None
            raise
        self._task = asyncio.create_task(self._run(), name=f"{thread}-writer")

    def _open_conn(self) -> None:
        self._conn = self._connect()

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def aclose(self) -> None:
        """Commit every queued item, then close the connection. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_conn)
            self._executor.shutdown(wait=True)

    def check_open(self) -> None:
        """Raise :class:`StoreError` unless open."""
        if self.closed:
            raise StoreError(f"{self.name} is closed")
        if self._executor is None:
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
        """Run ``fn(connection)`` on the thread (for reads); ``sqlite3.Error`` → StoreError.

        The read joins the next batch (without waiting ``linger_s`` for company), so reads
        and writes share one hop to the thread.
        """
        self.check_open()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Queued(cast(_I, None), future, fn))
        result: _T = await future
        return result

    def _guard(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._conn is None:
            raise StoreError(f"{self.name} is closed")
        try:
            return fn(self._conn)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite query failed: {exc}") from exc

    async def _run(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            if first.read is None and self._queue.empty() and self._linger > 0:
                await asyncio.sleep(self._linger)
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                queued = self._queue.get_nowait()
                if queued is None:  # aclose() enqueues it after the last write
                    stop = True
                    break
                batch.append(queued)
            await self._commit(batch)

    def _execute(self, batch: list[_Queued[_I]]) -> list[Outcome]:
        """Reads first (each on its own: a failed read fails alone), then the writes' commit."""
        conn = self._conn
        if conn is None:
            raise StoreError(f"{self.name} is closed")
        reads: dict[int, Outcome] = {}
        items: list[_I] = []
        for index, queued in enumerate(batch):
            if queued.read is None:
                items.append(queued.item)
                continue
            try:
                reads[index] = (True, self._guard(queued.read))
            except Exception as exc:
                reads[index] = (False, exc)
        written = iter(self._commit_fn(conn, items) if items else [])
        return [reads[i] if i in reads else next(written) for i in range(len(batch))]

    async def _commit(self, batch: list[_Queued[_I]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._execute, batch)
        except asyncio.CancelledError:
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(StoreError(f"{self.name} writer was cancelled"))
            raise
        except Exception as exc:  # the commit itself failed: no item took effect
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(exc)
            return
        if any(queued.read is None for queued in batch):
            self.commits += 1
        for queued, (ok, value) in zip(batch, outcomes, strict=True):
            if queued.future.done():  # the caller was cancelled; the write stands
                continue
            if ok:
                queued.future.set_result(value)
            else:
                queued.future.set_exception(value)
