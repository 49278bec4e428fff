"""The audit log: an append-only, hash-chained record of every message and admin action.

Theory of operation: the record format, the chain and its verification are in
:mod:`imrelay.security.chain` (re-exported here). :meth:`AuditLog.append` queues a record; one
writer task takes whatever is queued (lingering ``commit_interval_ms`` when alone), and (see
:mod:`imrelay.stores._writer`) reads the chain head, chains and inserts the batch and commits
it in one ``BEGIN IMMEDIATE`` transaction. Callers resume after the commit. Reading the head
inside the transaction keeps the chain linear even if two processes share the file. SQLite
triggers refuse ``UPDATE`` and ``DELETE`` on records, so a mistaken tool cannot change history (a
deliberate one can drop the triggers; the chain shows it). The file is separate from the inbox
(its purge never touches it) and created with mode 0600.

Who: records carry the sender's and conversation's platform ids in clear by default: an audit
trail must name who did what, and hashing an enterprise user id protects little (the directory
is small enough to enumerate). ``identities: hashed`` replaces both with a keyed hash (the HMAC
key, when set) for deployments whose policy forbids ids at rest. Message and answer text are
stored only as SHA-256 of the text given (the masked text), unless ``include_text`` is set.

Cost: the writer spends about 10 µs per record in batches (two canonical JSON dumps, a
SHA-256, an HMAC, one row); a lone record waits ``commit_interval_ms`` plus one commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac as hmac_mod
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from imrelay.errors import StoreError
from imrelay.security.chain import (
    GENESIS,
    AuditRecord,
    Problem,
    VerifyResult,
    canonical_json,
    chain_hash,
    export_jsonl,
    hash_fields_text,
    read_jsonl,
    read_sqlite,
    sign,
    verify_records,
)
from imrelay.stores._writer import GroupWriter, Outcome

__all__ = [
    "GENESIS",
    "AuditKind",
    "AuditLog",
    "AuditRecord",
    "AuditSettings",
    "Problem",
    "VerifyResult",
    "audit_path",
    "chain_hash",
    "export_jsonl",
    "read_jsonl",
    "read_sqlite",
    "sign",
    "verify_records",
]

logger = logging.getLogger(__name__)

AuditKind = Literal["message", "admin", "access_denied", "rate_limited"]
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    fields TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    hmac TEXT
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
INSERT OR IGNORE INTO audit_meta (key, value) VALUES ('schema_version', '1');
"""
_INSERT: Final = (
    "INSERT INTO audit (seq, at, kind, fields, prev_hash, hash, hmac) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def audit_path(url: str) -> str:
    """The file of a ``sqlite:///<path>`` audit URL.

    Raises:
        ValueError: another scheme, a host part, a query or no path.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "sqlite":
        raise ValueError("only sqlite:///<path> audit urls are supported for now")
    if not rest.startswith("/") or not rest[1:]:
        raise ValueError("sqlite url must be sqlite:///<path> (no host part)")
    if "?" in rest or "#" in rest:
        raise ValueError("sqlite url takes no query or fragment")
    return rest[1:]


class AuditSettings(BaseModel):
    """``security.audit``.

    Attributes:
        enabled: write the audit log.
        url: ``sqlite:///<path>``: a file of its own, never purged with the inbox.
        hmac_key: signs every record (``secret:NAME`` or ``${ENV}``); without it the chain
            detects edits but not a rebuilt chain.
        include_text: store the (masked) message and answer text, not only their hashes.
        identities: ``plain`` sender and conversation ids, or ``hashed`` (see the module doc).
        jsonl_path: also append every committed record to this file as a JSON line (Filebeat).
        commit_interval_ms: how long a lone record waits for others to share its commit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    url: str = "sqlite:///./imrelay-audit.db"
    hmac_key: SecretStr | None = None
    include_text: bool = False
    identities: Literal["plain", "hashed"] = "plain"
    jsonl_path: str | None = None
    commit_interval_ms: float = Field(2.0, ge=0, le=1000)

    @field_validator("url")
    @classmethod
    def _sqlite_url(cls, value: str) -> str:
        audit_path(value)
        return value

    @field_validator("hmac_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def path(self) -> str:
        """The database file."""
        return audit_path(self.url)


# -- the log ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    at: float
    kind: str
    fields: dict[str, Any]
    text: str  # the canonical JSON of fields


def _mirror(path: Path, records: list[AuditRecord]) -> None:
    try:
        with path.open("a", encoding="utf-8") as out:
            out.writelines(canonical_json(r.to_json()) + "\n" for r in records)
    except OSError as exc:  # the database holds the records; `audit export` can refill
        logger.error("audit json lines could not be written: %s", exc)


def _create_private(path: Path) -> None:
    """Create ``path`` (and its parents) readable by the owner only, if it does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class AuditLog:
    """The audit log in one SQLite file (see the module docstring).

    Args:
        path: the database file; created (mode 0600) with its directories by :meth:`open`.
        hmac_key: signs every record.
        include_text: keep message and answer text, not only their SHA-256.
        identities: ``plain`` or ``hashed`` sender and conversation ids.
        jsonl_path: mirror each committed record to this file as a JSON line.
        commit_interval_ms: how long a lone record waits for company.
        busy_timeout_s: how long a commit waits for another process holding the file.
        clock: epoch seconds, stamps records.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        hmac_key: bytes | None = None,
        include_text: bool = False,
        identities: Literal["plain", "hashed"] = "plain",
        jsonl_path: str | os.PathLike[str] | None = None,
        commit_interval_ms: float = 2.0,
        busy_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self.include_text = include_text
        self.identities = identities
        self.jsonl_path = None if jsonl_path is None else Path(jsonl_path)
        self._key = hmac_key
        self._clock = clock
        self._writer: GroupWriter[_Pending, AuditRecord] = GroupWriter(
            "audit log",
            connect=self._connect,
            commit=self._insert,
            linger_s=max(commit_interval_ms, 0.0) / 1000.0,
            path=str(self.path),
        )

    @property
    def commits(self) -> int:
        """Transactions committed so far (each may hold many records)."""
        return self._writer.commits

    @classmethod
    def from_settings(
        cls, settings: AuditSettings, *, clock: Callable[[], float] = time.time
    ) -> AuditLog:
        """A log configured by ``security.audit`` (not opened yet)."""
        key = settings.hmac_key.get_secret_value().encode() if settings.hmac_key else None
        return cls(
            settings.path,
            hmac_key=key,
            include_text=settings.include_text,
            identities=settings.identities,
            jsonl_path=settings.jsonl_path,
            commit_interval_ms=settings.commit_interval_ms,
            clock=clock,
        )

    async def __aenter__(self) -> AuditLog:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Create the file and schema, start the writer.

        Raises:
            StoreError: already opened or closed, or the database cannot be used.
        """
        if self._writer.closed or self._writer.is_open:
            raise StoreError("audit log cannot be opened twice")
        await self._writer.open()

    def _connect(self) -> sqlite3.Connection:
        try:
            _create_private(self.path)
            if self.jsonl_path is not None:
                _create_private(self.jsonl_path)
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the audit database: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot initialise the audit database: {exc}") from exc
        return conn

    async def aclose(self) -> None:
        """Commit every queued record, then close. Safe to call twice."""
        await self._writer.aclose()

    # -- writing -----------------------------------------------------------------------------

    async def append(self, kind: AuditKind, fields: Mapping[str, Any]) -> AuditRecord:
        """Add a record; return it once it is committed.

        Raises:
            StoreError: the log is not open, the fields are not JSON, or the commit failed.
        """
        if not self._writer.is_open:
            raise StoreError("audit log is not open")
        data = dict(fields)
        try:
            text = canonical_json(data)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"audit fields are not json-serialisable: {exc}") from None
        return await self._writer.submit(_Pending(round(self._clock(), 6), kind, data, text))

    def _insert(self, conn: sqlite3.Connection, batch: list[_Pending]) -> list[Outcome]:
        """Chain, sign and insert ``batch`` in one transaction."""
        records: list[AuditRecord] = []
        rows: list[tuple[Any, ...]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (0, GENESIS) if row is None else (int(row[0]), str(row[1]))
            for item in batch:
                seq += 1
                digest = hash_fields_text(prev, seq, item.at, item.kind, item.text)
                mac = sign(self._key, digest) if self._key is not None else None
                records.append(
                    AuditRecord(seq, item.at, item.kind, item.fields, prev, digest, mac)
                )
                rows.append((seq, item.at, item.kind, item.text, prev, digest, mac))
                prev = digest
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.rollback()
            raise StoreError(f"audit commit failed: {exc}") from exc
        if self.jsonl_path is not None:
            _mirror(self.jsonl_path, records)
        return [(True, record) for record in records]

    # -- typed records -------------------------------------------------------------------------

    def _who(
        self, platform: str, message_id: str, conversation_id: str, sender_id: str
    ) -> dict[str, Any]:
        if self.identities == "hashed":
            conversation_id = self._pseudonym(platform, conversation_id)
            sender_id = self._pseudonym(platform, sender_id)
        return {
            "platform": platform,
            "message_id": message_id,
            "conversation": conversation_id,
            "sender": sender_id,
        }

    def _pseudonym(self, platform: str, value: str) -> str:
        data = f"{platform}:{value}".encode()
        if self._key is not None:
            return "hmac:" + hmac_mod.new(self._key, data, hashlib.sha256).hexdigest()[:32]
        return "sha256:" + hashlib.sha256(data).hexdigest()[:32]

    def _text(self, name: str, text: str | None) -> dict[str, Any]:
        if text is None:
            return {}
        out: dict[str, Any] = {f"{name}_sha256": hashlib.sha256(text.encode()).hexdigest()}
        if self.include_text:
            out[name] = text
        return out

    async def record_message(
        self,
        *,
        platform: str,
        message_id: str,
        conversation_id: str,
        sender_id: str,
        outcome: str,
        reason: str = "",
        model: str = "",
        text: str | None = None,
        answer: str | None = None,
        received_at: float | None = None,
        timings: Mapping[str, float] | None = None,
        first_token_s: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        resumed: bool = False,
    ) -> AuditRecord:
        """Record how one message ended (what a runner knows when it settles the message).

        Args:
            platform: the configured platform name.
            message_id: the platform's message id.
            conversation_id: the conversation's platform id.
            sender_id: the sender's platform id (who).
            outcome: the final state (``replied``, ``dropped``, ``failed``).
            reason: why it was dropped or failed (the closed-set metric reason).
            model: the model that answered (or was to answer), if one was picked.
            text: the message text after masking; stored as SHA-256 (and as text only with
                ``include_text``).
            answer: the answer text, likewise.
            received_at: epoch seconds the platform handed the message over; gives
                ``latency_s``.
            timings: seconds per stage, when the runner collects them.
            first_token_s: model time to first token.
            prompt_tokens: model usage.
            completion_tokens: model usage.
            resumed: the message was resumed after a restart.
        """
        fields: dict[str, Any] = self._who(platform, message_id, conversation_id, sender_id)
        fields["outcome"] = outcome
        fields["reason"] = reason
        if model:
            fields["model"] = model
        fields.update(self._text("text", text))
        fields.update(self._text("answer", answer))
        if received_at is not None:
            fields["received_at"] = received_at
            fields["latency_s"] = round(max(self._clock() - received_at, 0.0), 6)
        if timings:
            fields["timings"] = {k: round(v, 6) for k, v in timings.items()}
        for name, value in (
            ("first_token_s", first_token_s),
            ("prompt_tokens", prompt_tokens),
            ("completion_tokens", completion_tokens),
        ):
            if value is not None:
                fields[name] = value
        if resumed:
            fields["resumed"] = True
        return await self.append("message", fields)

    async def record_admin(
        self,
        *,
        platform: str,
        message_id: str,
        conversation_id: str,
        sender_id: str,
        action: str,
        args: str,
        outcome: Literal["ok", "failed", "denied", "invalid"],
        detail: str = "",
    ) -> AuditRecord:
        """Record an admin command: who ran which action with what argument, and how it went."""
        fields = self._who(platform, message_id, conversation_id, sender_id)
        fields.update(action=action, args=args, outcome=outcome, detail=detail)
        return await self.append("admin", fields)

    async def record_denied(
        self,
        *,
        platform: str,
        message_id: str,
        conversation_id: str,
        sender_id: str,
        rule: str,
    ) -> AuditRecord:
        """Record a message refused by access control, and the rule that refused it."""
        fields = self._who(platform, message_id, conversation_id, sender_id)
        fields["rule"] = rule
        return await self.append("access_denied", fields)

    async def record_rate_limited(
        self,
        *,
        platform: str,
        message_id: str,
        conversation_id: str,
        sender_id: str,
        scope: Literal["user", "conversation"],
        retry_after_s: float,
    ) -> AuditRecord:
        """Record that a sender or conversation started being rate limited."""
        fields = self._who(platform, message_id, conversation_id, sender_id)
        fields.update(scope=scope, retry_after_s=round(retry_after_s, 3))
        return await self.append("rate_limited", fields)

    # -- reading -----------------------------------------------------------------------------

    async def verify(self, *, anchor: tuple[int, str] | None = None) -> VerifyResult:
        """Verify the whole chain (with this log's key, if any)."""
        if not self._writer.is_open:
            raise StoreError("audit log is not open")
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: verify_records(read_sqlite(self.path), key=self._key, anchor=anchor)
        )
