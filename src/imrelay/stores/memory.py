"""An in-memory store with the SQLite store's semantics, for tests (nothing is durable).

Theory of operation: every method does its work without awaiting in between, so on one event
loop each call is atomic, just as each SQLite operation is one transaction: of two concurrent
puts sharing a key exactly one wins. Messages are kept as the same JSON text the SQLite store
writes, so a message that SQLite would refuse is refused here too, and callers never share
mutable state with the store.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from imrelay.errors import StoreError
from imrelay.message import InboundMessage
from imrelay.stores.base import FINAL_STATES, ContextTurn, InboxRecord, MessageState

__all__ = ["MemoryStore"]

logger = logging.getLogger(__name__)

_PENDING = frozenset({MessageState.RECEIVED, MessageState.PROCESSING})


@dataclass(slots=True)
class _Row:
    seq: int
    body: str
    state: MessageState
    received_at: float
    attempts: int = 0
    reason: str = ""


class MemoryStore:
    """A :class:`~imrelay.stores.base.Store` held in dictionaries.

    Args:
        dedup_ttl_s: how long a dedup key blocks redeliveries.
        clock: epoch seconds; stamps arrival and dedup times.
    """

    def __init__(
        self, *, dedup_ttl_s: float = 86400.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._ttl = dedup_ttl_s
        self._clock = clock
        self._opened = False
        self._closed = False
        self._seq = 0
        self._messages: dict[tuple[str, str], _Row] = {}
        self._dedup: dict[tuple[str, str], float] = {}
        self._sent: dict[tuple[str, str, int], float] = {}
        self._context: dict[str, list[ContextTurn]] = {}

    async def __aenter__(self) -> MemoryStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Mark the store usable.

        Raises:
            StoreError: the store was opened or closed before.
        """
        if self._closed:
            raise StoreError("store is closed")
        if self._opened:
            raise StoreError("store is already open")
        self._opened = True

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store is open."""
        self._check_open()

    async def aclose(self) -> None:
        """Close the store; later calls raise :class:`StoreError`. Safe to call twice."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")
        if not self._opened:
            raise StoreError("store is not open")

    # -- Inbox -----------------------------------------------------------------------------

    async def put(self, message: InboundMessage) -> bool:
        """Store ``message`` as ``received`` unless one of its keys is known.

        Returns:
            ``True`` if stored; ``False`` for a duplicate (nothing stored).

        Raises:
            StoreError: the store is closed or the message cannot be serialised.
        """
        self._check_open()
        try:
            body = json.dumps(message.to_dict(), ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise StoreError(f"message is not json-serialisable: {exc}") from exc
        now = self._clock()
        platform = message.platform
        keys = [(platform, k) for k in dict.fromkeys((message.message_id, *message.dedup_keys))]
        if any(self._dedup.get(k, float("-inf")) >= now - self._ttl for k in keys):
            return False
        ident = (platform, message.message_id)
        old = self._messages.get(ident)
        if old is not None:
            if old.state in _PENDING:  # its keys expired but it was never finished
                return False
            del self._messages[ident]
            for sent_key in [s for s in self._sent if s[:2] == ident]:
                del self._sent[sent_key]
        for k in keys:
            self._dedup[k] = now
        self._seq += 1
        self._messages[ident] = _Row(self._seq, body, MessageState.RECEIVED, now)
        return True

    async def set_state(
        self, platform: str, message_id: str, state: MessageState, reason: str = ""
    ) -> None:
        """Move a message to ``state``; ``processing`` also increments ``attempts``.

        Raises:
            StoreError: the message is unknown or the store is closed.
        """
        self._check_open()
        state = MessageState(state)
        row = self._messages.get((platform, message_id))
        if row is None:
            raise StoreError(f"unknown message {platform}:{message_id}")
        row.state = state
        row.reason = reason
        if state is MessageState.PROCESSING:
            row.attempts += 1

    async def get(self, platform: str, message_id: str) -> InboxRecord | None:
        """Return the record of a message, or ``None``.

        Raises:
            StoreError: the record is unreadable or the store is closed.
        """
        self._check_open()
        row = self._messages.get((platform, message_id))
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
        self._check_open()
        records: list[InboxRecord] = []
        for (platform, message_id), row in sorted(self._messages.items(), key=lambda i: i[1].seq):
            if row.state not in _PENDING:
                continue
            try:
                records.append(_decode(row))
            except ValueError:
                logger.warning(
                    "skipping unreadable inbox record %s:%s; marked failed", platform, message_id
                )
                row.state = MessageState.FAILED
                row.reason = "unreadable record"
        return records

    async def counts(self) -> dict[MessageState, int]:
        """How many messages are in each state (every state present, zeros included)."""
        self._check_open()
        counts = dict.fromkeys(MessageState, 0)
        for row in self._messages.values():
            counts[row.state] += 1
        return counts

    async def purge(self, older_than: float) -> int:
        """Forget finished messages received before ``older_than`` (epoch s).

        Same rules as :meth:`imrelay.stores.sqlite.SQLiteStore.purge`.

        Returns:
            The number of messages deleted.
        """
        self._check_open()
        keys_before = min(older_than, self._clock() - self._ttl)
        doomed = [
            ident
            for ident, row in self._messages.items()
            if row.state in FINAL_STATES and row.received_at < older_than
        ]
        for ident in doomed:
            del self._messages[ident]
        for key in [k for k, seen in self._dedup.items() if seen < keys_before]:
            del self._dedup[key]
        pending = {i for i, row in self._messages.items() if row.state in _PENDING}
        for sent_key in [k for k, at in self._sent.items() if at < older_than]:
            if sent_key[:2] not in pending:
                del self._sent[sent_key]
        return len(doomed)

    # -- Outbox ----------------------------------------------------------------------------

    async def was_sent(self, platform: str, message_id: str, part: int) -> bool:
        """Whether reply part ``part`` of a message was recorded as sent."""
        self._check_open()
        return (platform, message_id, part) in self._sent

    async def record_sent(self, platform: str, message_id: str, part: int, at: float) -> None:
        """Record that reply part ``part`` was accepted; idempotent (the first time is kept)."""
        self._check_open()
        self._sent.setdefault((platform, message_id, part), at)

    # -- ContextStore ----------------------------------------------------------------------

    async def load(self, key: str, since: float) -> list[ContextTurn]:
        """The turns of ``key`` written at or after ``since``, oldest first."""
        self._check_open()
        return [t for t in self._context.get(key, ()) if t.at >= since]

    async def append(self, key: str, turns: Sequence[ContextTurn], keep: int) -> None:
        """Append ``turns`` to ``key`` and keep only the newest ``keep`` turns.

        Raises:
            ValueError: ``keep`` is negative.
        """
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self._check_open()
        history = [*self._context.get(key, ()), *turns]
        kept = history[-keep:] if keep else []
        if kept:
            self._context[key] = kept
        else:
            self._context.pop(key, None)

    async def clear(self, key: str) -> None:
        """Forget the history of ``key``."""
        self._check_open()
        self._context.pop(key, None)

    async def expire(self, before: float) -> int:
        """Forget turns stamped before ``before``; a key left without turns goes.

        Returns:
            The number of turns deleted.
        """
        self._check_open()
        deleted = 0
        for key, turns in list(self._context.items()):
            kept = [t for t in turns if t.at >= before]
            if len(kept) != len(turns):
                deleted += len(turns) - len(kept)
                if kept:
                    self._context[key] = kept
                else:
                    del self._context[key]
        return deleted

    def corrupt(self, platform: str, message_id: str, body: str) -> None:
        """Overwrite a stored record with ``body`` (lets tests exercise unreadable records)."""
        self._messages[(platform, message_id)].body = body


def _decode(row: _Row) -> InboxRecord:
    try:
        message = InboundMessage.from_dict(json.loads(row.body))
    except (TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"unreadable record: {type(exc).__name__}") from exc
    return InboxRecord(row.seq, message, row.state, row.attempts, row.reason)
