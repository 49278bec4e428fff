"""Store protocols: the durable inbox, the reply record (outbox) and conversation context.

Theory of operation: a connector calls :meth:`Inbox.put` and ACKs the platform only after it
returns; ``put`` returns only once the message is committed (commits are grouped over a few
milliseconds). A message moves ``received → processing → replied | failed | dropped``. At start-up
:meth:`Inbox.pending` returns every message still ``received`` or ``processing`` (a crash cut it
off) in arrival order, and the worker resumes them. Before sending reply part *n* of a message the
sender asks :meth:`Outbox.was_sent`; after the platform accepted it, it calls
:meth:`Outbox.record_sent`, so a restart never sends a recorded part again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from imrelay.message import InboundMessage

__all__ = [
    "ContextStore",
    "ContextTurn",
    "Inbox",
    "InboxRecord",
    "MessageState",
    "Outbox",
    "Store",
]


class MessageState(StrEnum):
    """Where a message is in its life."""

    RECEIVED = "received"
    PROCESSING = "processing"
    REPLIED = "replied"
    FAILED = "failed"
    DROPPED = "dropped"


FINAL_STATES = frozenset({MessageState.REPLIED, MessageState.FAILED, MessageState.DROPPED})


@dataclass(frozen=True, slots=True)
class InboxRecord:
    """A message as the inbox holds it."""

    seq: int
    message: InboundMessage
    state: MessageState
    attempts: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ContextTurn:
    """One entry of a conversation's history: ``role`` is ``user`` or ``assistant``."""

    role: str
    content: str
    at: float
    message_id: str = ""


class Inbox(Protocol):
    """Durable, deduplicating intake."""

    async def put(self, message: InboundMessage) -> bool:
        """Commit ``message`` as ``received`` unless any of its keys was seen.

        The keys are ``message.message_id`` and every entry of ``message.dedup_keys``, scoped by
        ``message.platform``. Returns ``True`` if stored, ``False`` for a duplicate. Returns
        only after the commit is durable.
        """
        ...

    async def set_state(
        self, platform: str, message_id: str, state: MessageState, reason: str = ""
    ) -> None:
        """Move a message to ``state`` (``processing`` also increments ``attempts``)."""
        ...

    async def get(self, platform: str, message_id: str) -> InboxRecord | None:
        """Return the record of a message, or ``None``."""
        ...

    async def pending(self) -> list[InboxRecord]:
        """Every message in ``received`` or ``processing``, oldest first."""
        ...

    async def counts(self) -> dict[MessageState, int]:
        """How many messages are in each state."""
        ...

    async def purge(self, older_than: float) -> int:
        """Forget finished messages and dedup keys received before ``older_than`` (epoch s)."""
        ...


class Outbox(Protocol):
    """Which reply parts the platform has accepted."""

    async def was_sent(self, platform: str, message_id: str, part: int) -> bool:
        """Whether reply part ``part`` of a message was recorded as sent."""
        ...

    async def record_sent(self, platform: str, message_id: str, part: int, at: float) -> None:
        """Record that the platform accepted reply part ``part``; durable on return."""
        ...


class ContextStore(Protocol):
    """Conversation history, kept across restarts."""

    async def load(self, key: str, since: float) -> list[ContextTurn]:
        """The turns of ``key`` written at or after ``since`` (epoch s), oldest first."""
        ...

    async def append(self, key: str, turns: Sequence[ContextTurn], keep: int) -> None:
        """Append ``turns`` to ``key`` and keep at most the newest ``keep`` turns."""
        ...

    async def clear(self, key: str) -> None:
        """Forget the history of ``key``."""
        ...

    async def expire(self, before: float) -> int:
        """Forget turns stamped before ``before`` (epoch s): no load asks for them any more.

        Returns:
            The number of turns deleted.
        """
        ...


class Store(Inbox, Outbox, ContextStore, Protocol):
    """One backend that provides all three, plus lifecycle."""

    async def open(self) -> None:
        """Create tables / connect."""
        ...

    async def ping(self) -> None:
        """Raise :class:`~imrelay.errors.StoreError` if the store cannot be reached."""
        ...

    async def aclose(self) -> None:
        """Flush pending commits and close."""
        ...
