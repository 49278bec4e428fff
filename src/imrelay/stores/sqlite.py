"""The SQLite store: durable inbox, outbox and conversation context in one file.

Theory of operation: every write (``put``, ``set_state``, ``record_sent``, ``append``,
``clear``, ``purge``, ``expire``) becomes an operation on an asyncio queue. One writer task
drains the queue: it takes whatever is queued when it wakes (and, if that is a single
operation, lingers ``commit_interval_ms`` for company), then runs the whole batch in one
transaction (see :mod:`imrelay.stores._writer`: the connection lives on the event loop, WAL
checkpoints run in the background). The batch first runs without savepoints; if an operation
fails, it is run again with a ``SAVEPOINT`` around each operation so the failing one is rolled
back alone; the callers' futures resolve only after ``COMMIT`` returned, so ``put`` returning
``True`` means the message is committed. Because operations run one after another on one
connection, a duplicate within the same batch sees the keys its predecessor inserted: of two
concurrent puts sharing a key exactly one wins.

Reads run on the same connection between batches, so they see every committed write and never
an uncommitted one.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. A committed transaction is
in the WAL file (the OS page cache) when ``COMMIT`` returns, so a process crash (``kill -9``,
OOM) loses nothing; only an OS crash or power loss may lose the last few commits, which are
fsynced at the next checkpoint (at most about a second later while writes happen). ``FULL``
would fsync every commit for that last guarantee.

One gateway per file: :meth:`SQLiteStore.open` takes an exclusive lock on ``<path>.lock``
(``flock``, released when the store closes or the process dies, ``kill -9`` included) and
refuses to open a file another process holds. Two gateways on one inbox would each resume the
other's unfinished messages at start and answer them twice, and their writers would wait on
each other's locks inside the event loop (SQLite's busy handler sleeps).

Context: the turns of the most recently used keys (``context_cache_keys``, 1,024) are kept in
memory as well, each list exactly the rows of its key, so a load is a read of the file only
for a key not used lately, and an append deletes old rows only when the key holds more than
``keep``. The lock above is what makes this safe: no other process writes the file. The list
is updated once the append committed, and dropped when a write's outcome is unknown; a key
with an append in flight is read from the file and not cached until that append has run.
Turns older than the context TTL are deleted by :meth:`SQLiteStore.expire` (the gateway calls
it with each purge): rows are appended as time goes, so the expired ones are the lowest ids,
and each transaction reads at most ``_PURGE_BATCH`` rows from that end, deletes those before
the first fresh one and stops there, without scanning the table. A turn stamped earlier than
one appended before it (rare: a message handled late) waits for a later purge. A cached list
that held an expired turn is dropped, to be read again.

Dedup keys (``message_id`` plus ``dedup_keys``, per platform) are stamped with the store clock
when the message is accepted and count for ``dedup_ttl_s`` seconds. A key older than that no
longer blocks a message, except that a message still pending is never stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from imrelay import _json
from imrelay.errors import StoreError
from imrelay.message import InboundMessage
from imrelay.stores._writer import GroupWriter, Outcome
from imrelay.stores.base import FINAL_STATES, ContextTurn, InboxRecord, MessageState

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
_BUSY_TIMEOUT_S: Final = 5.0
_PURGE_BATCH: Final = 2000
_PENDING: Final = (MessageState.RECEIVED.value, MessageState.PROCESSING.value)
_FINAL: Final = tuple(sorted(s.value for s in FINAL_STATES))

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    platform TEXT NOT NULL,
    message_id TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (platform, message_id)
);
CREATE INDEX IF NOT EXISTS messages_by_state ON messages (state, seq);
CREATE INDEX IF NOT EXISTS messages_by_received ON messages (received_at);
CREATE TABLE IF NOT EXISTS dedup (
    platform TEXT NOT NULL,
    key TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (platform, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_by_seen ON dedup (seen_at);
CREATE TABLE IF NOT EXISTS sent (
    platform TEXT NOT NULL,
    message_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (platform, message_id, part)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS context (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    at REAL NOT NULL,
    message_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS context_by_key ON context (key, id);
"""

if sys.platform != "win32":
    import fcntl

_T = TypeVar("_T")
_Op = Callable[[sqlite3.Connection], Any]
_Row = tuple[Any, ...]


def _encode(message: InboundMessage) -> str:
    try:
        return _json.dumps(message.to_dict())
    except (TypeError, ValueError) as exc:
        raise StoreError(f"message is not json-serialisable: {exc}") from exc


def _decode(row: _Row) -> InboxRecord:
    """Build a record from ``(seq, body, state, attempts, reason)``; raises ``ValueError``."""
    seq, body, state, attempts, reason = row
    try:
        message = InboundMessage.from_dict(_json.loads(body))
        return InboxRecord(int(seq), message, MessageState(state), int(attempts), str(reason))
    except (TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"unreadable record: {type(exc).__name__}") from exc


def _execute(conn: sqlite3.Connection, ops: list[_Op]) -> list[Outcome]:
    """Run ``ops`` in one transaction; a failure of the transaction itself raises.

    Operations rarely fail on their own (a constraint, a vanished row), so the batch first runs
    without savepoints. If one op raises, that transaction is rolled back and the batch is run
    again with a savepoint around each op, so the failing op is undone alone and the others
    still commit.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            results: list[Outcome] = [(True, op(conn)) for op in ops]
        except Exception:
            conn.rollback()
            conn.execute("BEGIN IMMEDIATE")
            results = [_isolated(conn, op) for op in ops]
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.rollback()
        raise StoreError(f"sqlite commit failed: {exc}") from exc
    return results


def _lock(path: str) -> int | None:
    """Lock ``<path>.lock`` for this process; its descriptor (``None`` where flock is missing).

    Raises:
        StoreError: another process holds the lock, or the lock file cannot be created.
    """
    if sys.platform == "win32":
        return None
    lock_path = path + ".lock"
    try:
        Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(
            f"{path} is in use by another process (it holds {lock_path}); "
            "run one gateway per database file"
        ) from None
    with contextlib.suppress(OSError):  # only informative: who holds it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _isolated(conn: sqlite3.Connection, op: _Op) -> Outcome:
    conn.execute("SAVEPOINT op")
    try:
        value = op(conn)
    except Exception as exc:
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return (False, _translate(exc))
    conn.execute("RELEASE op")
    return (True, value)


class SQLiteStore:
    """A :class:`~imrelay.stores.base.Store` in one SQLite file.

    Args:
        path: the database file; parent directories are created by :meth:`open`.
        commit_interval_ms: how long a lone write waits for others to share its commit.
        dedup_ttl_s: how long a dedup key blocks redeliveries.
        context_cache_keys: how many contexts (the most recently used) are kept in memory as
            well, so loading one does not read the file (see the module docstring).
        clock: epoch seconds; stamps arrival and dedup times.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        commit_interval_ms: float = 2.0,
        dedup_ttl_s: float = 86400.0,
        context_cache_keys: int = 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        self._lock_fd: int | None = None
        self._context: OrderedDict[str, list[ContextTurn]] = OrderedDict()
        self._appending: dict[str, int] = {}  # appends in flight, per key
        self._context_keys = context_cache_keys
        self._ttl = dedup_ttl_s
        self._clock = clock
        self._writer: GroupWriter[_Op, Any] = GroupWriter(
            "store",
            connect=self._connect,
            commit=_execute,
            linger_s=max(commit_interval_ms, 0.0) / 1000.0,
            path=self.path,
        )

    @property
    def commits(self) -> int:
        """Transactions committed so far (each may hold many operations)."""
        return self._writer.commits

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file, its parent directories and the schema; start the writer.

        Raises:
            StoreError: the store was opened before, another process holds the file, or the
                database cannot be used.
        """
        took = None
        if self.path != ":memory:" and self._lock_fd is None and not self._writer.closed:
            took = self._lock_fd = _lock(self.path)
        try:
            await self._writer.open()
        except BaseException:
            if took is not None:  # not a lock an earlier open() holds
                self._unlock()
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open sqlite database: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and self.path != ":memory:":
                raise StoreError(f"sqlite refused wal journal mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=NORMAL")
            # one transaction, so a second process opening the same file waits for the schema
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA)
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            if row[0] is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(
                    f"database schema version {row[0]} is newer than supported ({SCHEMA_VERSION})"
                )
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.close()  # rolls back an open transaction
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot initialise sqlite database: {exc}") from exc
            raise
        return conn

    async def ping(self) -> None:
        """Run a trivial query; raise :class:`StoreError` if the database cannot answer."""
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        """Commit every queued write, then close the database. Safe to call twice."""
        self._context.clear()
        await self._writer.aclose()
        if not self._writer.connected:  # not while a close that was cut off left it open
            self._unlock()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock

    async def _write(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        result: _T = await self._writer.submit(op)
        return result

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._writer.call(fn)

    # -- Inbox -----------------------------------------------------------------------------

    async def put(self, message: InboundMessage) -> bool:
        """Commit ``message`` as ``received`` unless one of its keys is known.

        Returns:
            ``True`` once the message is committed; ``False`` for a duplicate (nothing stored).

        Raises:
            StoreError: the store is closed, the message cannot be serialised, or SQLite failed.
        """
        self._writer.check_open()
        body = _encode(message)
        keys = list(dict.fromkeys((message.message_id, *message.dedup_keys)))
        now = self._clock()
        fresh_after = now - self._ttl
        platform, message_id = message.platform, message.message_id

        def op(conn: sqlite3.Connection) -> bool:
            marks = ",".join("?" * len(keys))
            live = conn.execute(
                f"SELECT 1 FROM dedup WHERE platform = ? AND key IN ({marks}) AND seen_at >= ?"  # nosec B608  # only "?" marks
                " LIMIT 1",
                (platform, *keys, fresh_after),
            ).fetchone()
            if live is not None:
                return False
            old = conn.execute(
                "SELECT state FROM messages WHERE platform = ? AND message_id = ?",
                (platform, message_id),
            ).fetchone()
            if old is not None:
                if old[0] in _PENDING:  # its keys expired but it was never finished
                    return False
                conn.execute(
                    "DELETE FROM messages WHERE platform = ? AND message_id = ?",
                    (platform, message_id),
                )
                conn.execute(
                    "DELETE FROM sent WHERE platform = ? AND message_id = ?",
                    (platform, message_id),
                )
            conn.executemany(
                "INSERT OR REPLACE INTO dedup (platform, key, seen_at) VALUES (?, ?, ?)",
                [(platform, key, now) for key in keys],
            )
            conn.execute(
                "INSERT INTO messages (platform, message_id, state, received_at, body)"
                " VALUES (?, ?, ?, ?, ?)",
                (platform, message_id, MessageState.RECEIVED.value, now, body),
            )
            return True

        return await self._write(op)

    async def set_state(
        self, platform: str, message_id: str, state: MessageState, reason: str = ""
    ) -> None:
        """Move a message to ``state``; ``processing`` also increments ``attempts``.

        Raises:
            StoreError: the message is unknown, or the store failed.
        """
        value = MessageState(state).value
        bump = 1 if value == MessageState.PROCESSING.value else 0

        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE messages SET state = ?, reason = ?, attempts = attempts + ?"
                " WHERE platform = ? AND message_id = ?",
                (value, reason, bump, platform, message_id),
            )
            if cur.rowcount == 0:
                raise StoreError(f"unknown message {platform}:{message_id}")

        await self._write(op)

    async def get(self, platform: str, message_id: str) -> InboxRecord | None:
        """Return the record of a message, or ``None``.

        Raises:
            StoreError: the stored record is unreadable, or the store failed.
        """
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT seq, body, state, attempts, reason FROM messages"
                " WHERE platform = ? AND message_id = ?",
                (platform, message_id),
            ).fetchone()
        )
        if row is None:
            return None
        try:
            return _decode(row)
        except ValueError as exc:
            raise StoreError(f"message record {platform}:{message_id} is unreadable") from exc

    async def pending(self) -> list[InboxRecord]:
        """Every ``received`` or ``processing`` message, in arrival order.

        A record that can no longer be decoded is skipped and marked ``failed``.
        """

        def read(conn: sqlite3.Connection) -> tuple[list[InboxRecord], list[_Row]]:
            rows = conn.execute(
                "SELECT seq, body, state, attempts, reason, platform, message_id FROM messages"
                " WHERE state IN (?, ?) ORDER BY seq",
                _PENDING,
            ).fetchall()
            good: list[InboxRecord] = []
            bad: list[_Row] = []
            for row in rows:
                try:
                    good.append(_decode(row[:5]))
                except ValueError:
                    bad.append(row)
            return good, bad

        records, corrupted = await self._read(read)
        for row in corrupted:
            seq, platform, message_id = row[0], row[5], row[6]
            logger.warning(
                "skipping unreadable inbox record %s:%s; marked failed", platform, message_id
            )
            await self._write(_mark_unreadable(int(seq)))
        return records

    async def counts(self) -> dict[MessageState, int]:
        """How many messages are in each state (every state present, zeros included)."""
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT state, COUNT(*) FROM messages GROUP BY state"
            ).fetchall()
        )
        counts = dict.fromkeys(MessageState, 0)
        for state, n in rows:
            if state in counts:
                counts[MessageState(state)] = int(n)
        return counts

    async def purge(self, older_than: float) -> int:
        """Forget finished messages received before ``older_than`` (epoch s).

        Pending messages and their reply records are never purged; dedup keys are purged only
        once older than both ``older_than`` and the dedup TTL; reply records of messages that
        are not pending go once recorded before ``older_than``.

        Returns:
            The number of messages deleted.
        """
        keys_before = min(older_than, self._clock() - self._ttl)
        limit = _PURGE_BATCH

        def op(conn: sqlite3.Connection) -> tuple[int, bool]:
            deleted = conn.execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages"
                " WHERE received_at < ? AND state IN (?, ?, ?) LIMIT ?)",
                (older_than, *_FINAL, limit),
            ).rowcount
            keys = conn.execute(
                "DELETE FROM dedup WHERE (platform, key) IN"
                " (SELECT platform, key FROM dedup WHERE seen_at < ? LIMIT ?)",
                (keys_before, limit),
            ).rowcount
            parts = conn.execute(
                "DELETE FROM sent WHERE (platform, message_id, part) IN"
                " (SELECT platform, message_id, part FROM sent WHERE at < ? AND NOT EXISTS"
                " (SELECT 1 FROM messages m WHERE m.platform = sent.platform"
                " AND m.message_id = sent.message_id AND m.state IN (?, ?)) LIMIT ?)",
                (older_than, *_PENDING, limit),
            ).rowcount
            return int(deleted), max(deleted, keys, parts) >= limit

        # in transactions of at most _PURGE_BATCH rows per table: the connection is on the
        # event loop, and a first purge of a long-running inbox must not stall it
        return await self._write_batches(op)

    # -- Outbox ----------------------------------------------------------------------------

    async def was_sent(self, platform: str, message_id: str, part: int) -> bool:
        """Whether reply part ``part`` of a message was recorded as sent."""
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT 1 FROM sent WHERE platform = ? AND message_id = ? AND part = ?",
                (platform, message_id, part),
            ).fetchone()
        )
        return row is not None

    async def record_sent(self, platform: str, message_id: str, part: int, at: float) -> None:
        """Record that reply part ``part`` was accepted; committed on return, idempotent."""
        await self._write(
            lambda conn: conn.execute(
                "INSERT OR IGNORE INTO sent (platform, message_id, part, at) VALUES (?, ?, ?, ?)",
                (platform, message_id, part, at),
            )
        )

    # -- ContextStore ----------------------------------------------------------------------

    async def load(self, key: str, since: float) -> list[ContextTurn]:
        """The turns of ``key`` stamped at or after ``since``, oldest first."""
        self._writer.check_open()
        turns = self._context.get(key)
        if turns is not None:
            self._context.move_to_end(key)
        else:
            rows = await self._read(
                lambda conn: conn.execute(
                    "SELECT role, content, at, message_id FROM context WHERE key = ? ORDER BY id",
                    (key,),
                ).fetchall()
            )
            turns = [ContextTurn(role, content, at, mid) for role, content, at, mid in rows]
            if key not in self._appending:  # else the list may miss turns about to commit
                self._remember(key, turns)
        return [t for t in turns if t.at >= since]

    async def append(self, key: str, turns: Sequence[ContextTurn], keep: int) -> None:
        """Add ``turns`` to ``key`` and keep only its newest ``keep`` turns.

        Raises:
            ValueError: ``keep`` is negative.
        """
        if keep < 0:
            raise ValueError("keep must be >= 0")
        rows = [(key, t.role, t.content, t.at, t.message_id) for t in turns]
        known = self._context.get(key)
        # the cached list is every row of the key: when the new ones still fit, nothing to
        # trim, unless another append of the key is in flight (the list is about to grow)
        trim = known is None or key in self._appending or len(known) + len(rows) > keep

        ran = False

        def op(conn: sqlite3.Connection) -> None:
            nonlocal ran
            if not ran:  # ran: no longer in flight, even if its caller stopped waiting
                ran = True  # (a batch with a failing op runs again, this op with it)
                self._appended(key)
            conn.executemany(
                "INSERT INTO context (key, role, content, at, message_id) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            if trim:
                conn.execute(
                    "DELETE FROM context WHERE key = ? AND id NOT IN"
                    " (SELECT id FROM context WHERE key = ? ORDER BY id DESC LIMIT ?)",
                    (key, key, keep),
                )

        self._appending[key] = self._appending.get(key, 0) + 1
        try:
            await self._write(op)
        except asyncio.CancelledError:
            self._context.pop(key, None)  # the op may still run: read the key again after it
            raise
        except BaseException:
            self._context.pop(key, None)  # whether it committed is unknown: read it again
            if not ran:  # its batch is over (or it was refused) without running it: never will
                self._appended(key)
            raise
        cached = self._context.get(key)
        if cached is not None and cached is known:
            cached.extend(turns)
            if len(cached) > keep:
                del cached[: len(cached) - keep]
        else:  # read while this append was in flight: it may lack these turns or hold them
            self._context.pop(key, None)

    async def clear(self, key: str) -> None:
        """Forget every turn of ``key``."""
        try:
            await self._write(
                lambda conn: conn.execute("DELETE FROM context WHERE key = ?", (key,))
            )
        finally:
            self._context.pop(key, None)

    async def expire(self, before: float) -> int:
        """Forget turns stamped before ``before`` (epoch s), oldest first, in transactions of
        at most ``_PURGE_BATCH`` rows (see the module docstring).

        Returns:
            The number of turns deleted.
        """
        limit = _PURGE_BATCH

        def op(conn: sqlite3.Connection) -> tuple[int, bool]:
            rows = conn.execute(
                "SELECT id, at FROM context ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
            last = None
            for ident, at in rows:
                if at >= before:  # the first fresh turn: the rest is newer
                    break
                last = ident
            if last is None:
                return 0, False
            deleted = conn.execute("DELETE FROM context WHERE id <= ?", (last,)).rowcount
            # a cached list is every row of its key: drop those that may lose some, here,
            # where no load can come between (it runs, and commits, on the loop)
            for key in [k for k, turns in self._context.items() if turns and turns[0].at < before]:
                del self._context[key]
            return int(deleted), len(rows) == limit and last == rows[-1][0]

        return await self._write_batches(op)

    async def _write_batches(self, op: Callable[[sqlite3.Connection], tuple[int, bool]]) -> int:
        """Run ``op`` in transactions of its own until it says there is no more (it returns
        how many rows it deleted and whether to go on); return the rows deleted in all."""
        total = 0
        more = True
        while more:
            deleted, more = await self._write(op)
            total += deleted
        return total

    def _appended(self, key: str) -> None:
        left = self._appending.get(key, 0) - 1
        if left > 0:
            self._appending[key] = left
        else:
            self._appending.pop(key, None)

    def _remember(self, key: str, turns: list[ContextTurn]) -> None:
        self._context[key] = turns
        if len(self._context) > self._context_keys:
            self._context.popitem(last=False)


def _mark_unreadable(seq: int) -> Callable[[sqlite3.Connection], None]:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE messages SET state = ?, reason = ? WHERE seq = ? AND state IN (?, ?)",
            (MessageState.FAILED.value, "unreadable record", seq, *_PENDING),
        )

    return op


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        error = StoreError(f"sqlite write failed: {exc}")
        error.__cause__ = exc
        return error
    return exc
