"""The audit log: hash chain, tamper detection on the SQLite file itself, export, concurrency."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from imrelay.errors import StoreError
from imrelay.security.audit import (
    GENESIS,
    AuditLog,
    AuditSettings,
    audit_path,
    chain_hash,
    export_jsonl,
    read_jsonl,
    read_sqlite,
    sign,
    verify_records,
)

KEY = b"audit-test-key-0123456789abcdef"
EPOCH = 1_700_000_000.0


class Clock:
    """An epoch clock that ticks 1 ms per reading."""

    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


async def _fill(log: AuditLog, n: int) -> None:
    for i in range(1, n + 1):
        await log.append("message", {"i": i, "text_sha256": f"{i:064x}", "名": "张三"})


def _rows(path: Path) -> list[dict[str, Any]]:
    return list(read_sqlite(path))


def _tamper(path: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Run SQL on the audit file the way an attacker would: triggers dropped first."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
        conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for sql, args in statements:
            conn.execute(sql, args)
    finally:
        conn.close()


def _renumber(path: Path, from_seq: int, delta: int) -> list[tuple[str, tuple[Any, ...]]]:
    """Statements shifting every seq >= from_seq by delta (via a detour, avoiding clashes)."""
    return [
        ("UPDATE audit SET seq = seq + 1000000 WHERE seq >= ?", (from_seq,)),
        ("UPDATE audit SET seq = seq - 1000000 + ? WHERE seq >= 1000000", (delta,)),
    ]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "imrelay-audit.db"


@pytest.fixture
async def log(db: Path) -> AsyncIterator[AuditLog]:
    async with AuditLog(db, clock=Clock(), commit_interval_ms=0) as audit:
        yield audit


@pytest.fixture
async def filled(db: Path) -> Path:
    """A closed, unsigned audit file with five records."""
    async with AuditLog(db, clock=Clock(), commit_interval_ms=0) as audit:
        await _fill(audit, 5)
    return db


@pytest.fixture
async def signed(db: Path) -> Path:
    """A closed, signed audit file with five records."""
    async with AuditLog(db, hmac_key=KEY, clock=Clock(), commit_interval_ms=0) as audit:
        await _fill(audit, 5)
    return db


# -- the chain -------------------------------------------------------------------------------


async def test_audit_chain_verifies_and_reports_head(log: AuditLog, db: Path) -> None:
    """Records get seqs 1..n chained from the genesis hash; verify passes and names the head."""
    first = await log.append("message", {"a": 1})
    second = await log.append("admin", {"b": [1, 2]})
    assert (first.seq, first.prev_hash) == (1, GENESIS)
    assert (second.seq, second.prev_hash) == (2, first.hash)
    assert second.hash == chain_hash(first.hash, 2, second.at, "admin", {"b": [1, 2]})
    assert first.hmac is None
    result = await log.verify()
    assert result.ok
    assert (result.records, result.head_seq, result.head_hash) == (2, 2, second.hash)
    assert not result.signed
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


async def test_audit_empty_log_verifies(log: AuditLog) -> None:
    """An empty log is intact, with the genesis hash as its head."""
    result = await log.verify()
    assert (result.ok, result.records, result.head_seq, result.head_hash) == (True, 0, 0, GENESIS)


async def test_audit_triggers_refuse_update_and_delete(filled: Path) -> None:
    """The file itself refuses UPDATE and DELETE on records (append-only)."""
    conn = sqlite3.connect(filled)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit SET kind = 'admin' WHERE seq = 1")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit WHERE seq = 1")
    finally:
        conn.close()
    assert verify_records(read_sqlite(filled)).ok


async def test_audit_verify_catches_edited_record(filled: Path) -> None:
    """Changing a record's fields in the file is reported as record 3 altered."""
    _tamper(filled, ("UPDATE audit SET fields = ? WHERE seq = 3", ('{"i":99}',)))
    result = verify_records(read_sqlite(filled))
    assert (result.ok, result.first_bad, result.problem) == (False, 3, "altered")
    assert result.records == 2
    assert result.head_seq == 2


async def test_audit_verify_catches_edited_timestamp(filled: Path) -> None:
    """Changing only a record's time is reported as altered too."""
    _tamper(filled, ("UPDATE audit SET at = at + 1 WHERE seq = 4", ()))
    result = verify_records(read_sqlite(filled))
    assert (result.first_bad, result.problem) == (4, "altered")


async def test_audit_verify_catches_deleted_record(filled: Path) -> None:
    """Deleting a record leaves a gap, reported as record 3 removed."""
    _tamper(filled, ("DELETE FROM audit WHERE seq = 3", ()))
    result = verify_records(read_sqlite(filled))
    assert (result.ok, result.first_bad, result.problem) == (False, 3, "removed")
    assert "3 are missing" in result.detail


async def test_audit_verify_catches_deleted_records_range(filled: Path) -> None:
    """Deleting several records names the whole missing range."""
    _tamper(filled, ("DELETE FROM audit WHERE seq IN (2, 3)", ()))
    result = verify_records(read_sqlite(filled))
    assert (result.first_bad, result.problem) == (2, "removed")
    assert "2-3 are missing" in result.detail


async def test_audit_verify_catches_deleted_first_record(filled: Path) -> None:
    """Deleting record 1 is a gap at the start of the chain."""
    _tamper(filled, ("DELETE FROM audit WHERE seq = 1", ()))
    result = verify_records(read_sqlite(filled))
    assert (result.first_bad, result.problem, result.records) == (1, "removed", 0)


async def test_audit_verify_catches_deletion_with_renumbering(filled: Path) -> None:
    """Deleting a record and renumbering the rest is still reported at the gap's place."""
    _tamper(filled, ("DELETE FROM audit WHERE seq = 3", ()), *_renumber(filled, 4, -1))
    assert [r["seq"] for r in _rows(filled)] == [1, 2, 3, 4]
    result = verify_records(read_sqlite(filled))
    assert (result.first_bad, result.problem) == (3, "removed")


async def test_audit_verify_catches_inserted_record(filled: Path) -> None:
    """A correctly chained record slipped in at seq 3 (later ones renumbered) is named."""
    rows = _rows(filled)
    at = rows[1]["at"] + 0.0005
    fields = {"i": "forged"}
    digest = chain_hash(rows[1]["hash"], 3, at, "admin", fields)
    _tamper(
        filled,
        *_renumber(filled, 3, 1),
        (
            "INSERT INTO audit (seq, at, kind, fields, prev_hash, hash, hmac) "
            "VALUES (3, ?, 'admin', ?, ?, ?, NULL)",
            (at, json.dumps(fields), rows[1]["hash"], digest),
        ),
    )
    result = verify_records(read_sqlite(filled))
    assert (result.ok, result.first_bad, result.problem) == (False, 3, "inserted")
    assert result.records == 3  # records 1, 2 and the insertion itself chain correctly


async def test_audit_verify_catches_record_inserted_before_the_first(filled: Path) -> None:
    """An insertion at seq 1 (chained to the genesis hash) is named as well."""
    digest = chain_hash(GENESIS, 1, EPOCH, "admin", {})
    _tamper(
        filled,
        *_renumber(filled, 1, 1),
        (
            "INSERT INTO audit (seq, at, kind, fields, prev_hash, hash) "
            "VALUES (1, ?, 'admin', '{}', ?, ?)",
            (EPOCH, GENESIS, digest),
        ),
    )
    result = verify_records(read_sqlite(filled))
    assert (result.first_bad, result.problem) == (1, "inserted")


async def test_audit_verify_catches_rewritten_record(filled: Path) -> None:
    """A record edited and rehashed no longer matches its successor: reported as altered."""
    row = _rows(filled)[2]
    fields = {"i": "rewritten"}
    digest = chain_hash(row["prev_hash"], 3, row["at"], row["kind"], fields)
    _tamper(
        filled,
        ("UPDATE audit SET fields = ?, hash = ? WHERE seq = 3", (json.dumps(fields), digest)),
    )
    result = verify_records(read_sqlite(filled))
    assert (result.first_bad, result.problem) == (3, "altered")
    assert "rewritten" in result.detail


async def test_audit_rebuilt_chain_passes_without_key_and_fails_with_it(signed: Path) -> None:
    """Re-chaining every record after an edit fools a plain hash check, not the HMAC."""
    rows = _rows(signed)
    rows[2]["fields"] = json.dumps({"i": "forged"})
    prev = rows[1]["hash"]
    statements: list[tuple[str, tuple[Any, ...]]] = []
    for row in rows[2:]:
        digest = chain_hash(prev, row["seq"], row["at"], row["kind"], json.loads(row["fields"]))
        statements.append(
            (
                "UPDATE audit SET fields = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (row["fields"], prev, digest, row["seq"]),
            )
        )
        prev = digest
    _tamper(signed, *statements)
    assert verify_records(read_sqlite(signed)).ok
    result = verify_records(read_sqlite(signed), key=KEY)
    assert (result.ok, result.first_bad, result.problem) == (False, 3, "forged")
    assert result.signed
    assert "wrong signature" in result.detail


async def test_audit_signed_chain_verifies_with_key_only(signed: Path) -> None:
    """A signed log verifies with its key; a wrong key calls record 1 forged."""
    rows = _rows(signed)
    assert rows[0]["hmac"] == sign(KEY, rows[0]["hash"])
    assert verify_records(read_sqlite(signed), key=KEY).ok
    wrong = verify_records(read_sqlite(signed), key=b"another key")
    assert (wrong.first_bad, wrong.problem) == (1, "forged")


async def test_audit_unsigned_records_are_forged_under_a_key(filled: Path) -> None:
    """With a key, a record without an HMAC is reported as not signed."""
    result = verify_records(read_sqlite(filled), key=KEY)
    assert (result.first_bad, result.problem) == (1, "forged")
    assert "not signed" in result.detail


async def test_audit_verify_catches_unreadable_record(filled: Path) -> None:
    """Fields that are not JSON any more are reported as altered at their seq."""
    _tamper(filled, ("UPDATE audit SET fields = 'not json' WHERE seq = 2", ()))
    result = verify_records(read_sqlite(filled))
    assert (result.first_bad, result.problem) == (2, "altered")
    assert "cannot be read" in result.detail


async def test_audit_verify_catches_nan_time(filled: Path) -> None:
    """A time JSON cannot carry (NaN) is reported as altered rather than crashing."""
    rows = _rows(filled)
    rows[1]["at"] = float("nan")
    result = verify_records(rows)
    assert (result.first_bad, result.problem) == (2, "altered")
    assert "json cannot carry" in result.detail


def test_audit_verify_rejects_malformed_rows() -> None:
    """Rows missing keys, with a boolean seq or with non-object fields are unreadable."""
    good = {"seq": 1, "at": EPOCH, "kind": "message", "fields": {}, "prev_hash": GENESIS}
    good["hash"] = chain_hash(GENESIS, 1, EPOCH, "message", {})
    assert verify_records([good]).ok
    for bad in ({}, {**good, "seq": True}, {**good, "fields": [1]}, {**good, "seq": "x"}):
        result = verify_records([bad])
        assert (result.ok, result.first_bad, result.problem) == (False, 1, "altered")
    assert verify_records([good, {**good, "seq": 7, "fields": "{"}]).first_bad == 7


async def test_audit_anchor_catches_truncated_and_rebuilt_tail(filled: Path) -> None:
    """With the head noted earlier, a truncated log or a changed record is caught."""
    head = verify_records(read_sqlite(filled))
    anchor = (head.head_seq, head.head_hash)
    assert verify_records(read_sqlite(filled), anchor=anchor).ok
    assert verify_records(read_sqlite(filled), anchor=(3, _rows(filled)[2]["hash"])).ok
    _tamper(filled, ("DELETE FROM audit WHERE seq >= 4", ()))
    assert verify_records(read_sqlite(filled)).ok  # no outside copy: truncation is invisible
    result = verify_records(read_sqlite(filled), anchor=anchor)
    assert (result.first_bad, result.problem) == (4, "removed")
    other = verify_records(read_sqlite(filled), anchor=(2, "f" * 64))
    assert (other.first_bad, other.problem) == (2, "altered")


# -- export ----------------------------------------------------------------------------------


async def test_audit_export_writes_verifiable_json_lines(filled: Path) -> None:
    """Each record becomes one JSON line with @timestamp; the lines verify on their own."""
    out = io.StringIO()
    assert export_jsonl(filled, out) == 5
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert first["@timestamp"].startswith("2023-11-14T22:13:20.001")
    assert first["@timestamp"].endswith("Z")
    assert first["fields"]["名"] == "张三"
    assert "张三" in lines[0]  # not \\u-escaped
    assert verify_records(read_jsonl([*lines, ""])).ok
    edited = [*lines]
    edited[3] = edited[3].replace('"i":4', '"i":40')
    assert verify_records(read_jsonl(edited)).first_bad == 4
    broken = verify_records(read_jsonl([lines[0], "not json", *lines[2:]]))
    assert (broken.first_bad, broken.problem) == (2, "altered")
    swapped = verify_records(read_jsonl([lines[0], lines[2], lines[1]]))
    assert (swapped.first_bad, swapped.problem) == (2, "removed")
    repeated = verify_records(read_jsonl([lines[0], lines[1], lines[1]]))
    assert (repeated.first_bad, repeated.problem) == (2, "inserted")
    since = io.StringIO()
    assert export_jsonl(filled, since, since=3) == 2
    assert json.loads(since.getvalue().splitlines()[0])["seq"] == 4


async def test_audit_export_refuses_unreadable_record(filled: Path) -> None:
    """Exporting a record whose fields are not JSON fails naming its seq."""
    _tamper(filled, ("UPDATE audit SET fields = 'nope' WHERE seq = 2", ()))
    with pytest.raises(StoreError, match="audit record 2 is unreadable"):
        export_jsonl(filled, io.StringIO())


def test_audit_read_sqlite_errors(tmp_path: Path) -> None:
    """A missing file or a database without the audit table is a StoreError."""
    with pytest.raises(StoreError, match="no audit database"):
        list(read_sqlite(tmp_path / "missing.db"))
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    with pytest.raises(StoreError, match="cannot read the audit database"):
        list(read_sqlite(other))
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        list(read_sqlite(garbage))


async def test_audit_mirrors_records_to_json_lines(db: Path, tmp_path: Path) -> None:
    """With jsonl_path every committed record is appended as a line, in a 0600 file."""
    mirror = tmp_path / "logs" / "audit.jsonl"
    async with AuditLog(db, jsonl_path=mirror, commit_interval_ms=0) as audit:
        await _fill(audit, 3)
        await asyncio.gather(*(audit.append("admin", {"n": n}) for n in range(10)))
    lines = mirror.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 14))
    assert verify_records(read_jsonl(lines)).ok
    assert stat.S_IMODE(mirror.stat().st_mode) == 0o600


async def test_audit_mirror_failure_keeps_records(
    db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mirror that cannot be written is logged; the records are committed anyway."""
    mirror = tmp_path / "mirror.jsonl"
    async with AuditLog(db, jsonl_path=mirror, commit_interval_ms=0) as audit:
        mirror.unlink()
        mirror.mkdir()  # appending to a directory fails
        record = await audit.append("message", {})
        assert record.seq == 1
    assert "audit json lines could not be written" in caplog.text
    assert verify_records(read_sqlite(db)).records == 1


# -- writing ---------------------------------------------------------------------------------


async def test_audit_concurrent_appends_form_one_chain(db: Path) -> None:
    """Hundreds of concurrent appends get distinct seqs, few commits and one valid chain."""
    async with AuditLog(db, hmac_key=KEY, commit_interval_ms=1) as audit:
        records = await asyncio.gather(*(audit.append("message", {"n": n}) for n in range(500)))
        assert sorted(r.seq for r in records) == list(range(1, 501))
        assert audit.commits < 100
    result = verify_records(read_sqlite(db), key=KEY)
    assert (result.ok, result.records) == (True, 500)


async def test_audit_two_writers_on_one_file_keep_the_chain_linear(db: Path) -> None:
    """Two logs on the same file (two processes) interleave without forking the chain."""
    async with (
        AuditLog(db, commit_interval_ms=0) as one,
        AuditLog(db, commit_interval_ms=0) as two,
    ):
        await asyncio.gather(
            *(log.append("message", {"n": n}) for n in range(50) for log in (one, two))
        )
    result = verify_records(read_sqlite(db))
    assert (result.ok, result.records) == (True, 100)


async def test_audit_reopen_continues_the_chain(filled: Path) -> None:
    """A log opened on an existing file continues after its last record."""
    async with AuditLog(filled, commit_interval_ms=0) as audit:
        record = await audit.append("admin", {})
        assert record.seq == 6
        assert (await audit.verify()).records == 6


async def test_audit_lifecycle_errors(db: Path, tmp_path: Path) -> None:
    """Appending before open or after close fails; opening twice fails; closing twice is fine."""
    audit = AuditLog(db)
    with pytest.raises(StoreError, match="not open"):
        await audit.append("message", {})
    with pytest.raises(StoreError, match="not open"):
        await audit.verify()
    await audit.open()
    with pytest.raises(StoreError, match="opened twice"):
        await audit.open()
    await audit.aclose()
    await audit.aclose()
    with pytest.raises(StoreError, match="not open"):
        await audit.append("message", {})
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the audit database"):
        await AuditLog(blocker / "audit.db").open()
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"x" * 4096)
    with pytest.raises(StoreError, match="cannot initialise"):
        await AuditLog(bad).open()


async def test_audit_rejects_fields_that_are_not_json(log: AuditLog) -> None:
    """Fields JSON cannot carry fail at append, before anything is queued."""
    with pytest.raises(StoreError, match="not json-serialisable"):
        await log.append("message", {"x": object()})
    with pytest.raises(StoreError, match="not json-serialisable"):
        await log.append("message", {"x": float("inf")})
    assert (await log.verify()).records == 0


async def test_audit_commit_failure_fails_the_batch(db: Path) -> None:
    """A commit that fails (another process holds the file) fails its records, not the writer."""
    async with AuditLog(db, commit_interval_ms=0, busy_timeout_s=0.01) as audit:
        await audit.append("message", {"n": 1})
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")  # holds the write lock past the busy timeout
        try:
            with pytest.raises(StoreError, match="audit commit failed"):
                await audit.append("message", {"n": 2})
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        assert (await audit.append("message", {"n": 3})).seq == 2


# -- typed records ---------------------------------------------------------------------------


async def test_audit_record_message_hashes_text_by_default(log: AuditLog) -> None:
    """The message record holds who, outcome, model, timings and text hashes, not the text."""
    record = await log.record_message(
        platform="dingtalk",
        message_id="m1",
        conversation_id="cid-1",
        sender_id="staff-1",
        outcome="replied",
        model="default",
        text="我的电话是[PHONE]",
        answer="好的",
        received_at=EPOCH - 1.5,
        timings={"generate": 0.1234567},
        first_token_s=0.2,
        prompt_tokens=7,
        completion_tokens=3,
        resumed=True,
    )
    f = record.fields
    assert record.kind == "message"
    assert (f["platform"], f["message_id"], f["conversation"], f["sender"]) == (
        "dingtalk",
        "m1",
        "cid-1",
        "staff-1",
    )
    assert (f["outcome"], f["reason"], f["model"]) == ("replied", "", "default")
    assert len(f["text_sha256"]) == 64
    assert len(f["answer_sha256"]) == 64
    assert "text" not in f
    assert "answer" not in f
    assert f["latency_s"] == pytest.approx(1.501, abs=1e-3)
    assert f["timings"] == {"generate": 0.123457}
    assert (f["first_token_s"], f["prompt_tokens"], f["completion_tokens"]) == (0.2, 7, 3)
    assert f["resumed"] is True
    bare = await log.record_message(
        platform="dingtalk",
        message_id="m2",
        conversation_id="c",
        sender_id="s",
        outcome="dropped",
        reason="empty",
    )
    assert set(bare.fields) == {
        "platform",
        "message_id",
        "conversation",
        "sender",
        "outcome",
        "reason",
    }


async def test_audit_include_text_and_hashed_identities(db: Path) -> None:
    """include_text keeps the text; hashed identities replace ids with keyed pseudonyms."""
    async with AuditLog(db, include_text=True, identities="hashed", hmac_key=KEY) as audit:
        record = await audit.record_message(
            platform="dingtalk",
            message_id="m1",
            conversation_id="cid-1",
            sender_id="staff-1",
            outcome="replied",
            text="hello",
            answer="world",
        )
    f = record.fields
    assert (f["text"], f["answer"]) == ("hello", "world")
    assert f["sender"].startswith("hmac:")
    assert "staff-1" not in json.dumps(f)
    assert f["message_id"] == "m1"
    async with AuditLog(db, identities="hashed") as unkeyed:
        other = await unkeyed.record_denied(
            platform="dingtalk",
            message_id="m2",
            conversation_id="cid-1",
            sender_id="staff-1",
            rule="denied_user",
        )
    assert other.fields["sender"].startswith("sha256:")
    assert other.fields["sender"] != f["sender"]


async def test_audit_admin_denied_and_rate_limited_records(log: AuditLog) -> None:
    """The typed helpers write their kinds with their own fields."""
    who = {"platform": "dingtalk", "message_id": "m", "conversation_id": "c", "sender_id": "s"}
    admin = await log.record_admin(**who, action="model", args="big", outcome="ok", detail="d")
    denied = await log.record_denied(**who, rule="user_not_allowed")
    limited = await log.record_rate_limited(**who, scope="user", retry_after_s=2.34567)
    assert (admin.kind, admin.fields["action"], admin.fields["outcome"]) == (
        "admin",
        "model",
        "ok",
    )
    assert (denied.kind, denied.fields["rule"]) == ("access_denied", "user_not_allowed")
    assert (limited.kind, limited.fields["scope"], limited.fields["retry_after_s"]) == (
        "rate_limited",
        "user",
        2.346,
    )
    assert (await log.verify()).records == 3


# -- settings --------------------------------------------------------------------------------


def test_audit_settings_defaults_and_url_checks(tmp_path: Path) -> None:
    """The default is a SQLite file of its own; other URLs are refused with a reason."""
    settings = AuditSettings()
    assert settings.path == "./imrelay-audit.db"
    assert settings.hmac_key is None
    assert AuditSettings(hmac_key="").hmac_key is None
    assert audit_path("sqlite:////var/lib/a.db") == "/var/lib/a.db"
    for url, reason in (
        ("redis://127.0.0.1/0", "only sqlite"),
        ("a.db", "only sqlite"),
        ("sqlite://host/a.db", "no host part"),
        ("sqlite:///", "no host part"),
        ("sqlite:///a.db?mode=ro", "no query"),
    ):
        with pytest.raises(ValidationError, match=reason):
            AuditSettings(url=url)
    with pytest.raises(ValidationError):
        AuditSettings(unknown=1)  # type: ignore[call-arg]


async def test_audit_from_settings_signs_with_the_configured_key(tmp_path: Path) -> None:
    """A log built from settings uses the file, key and options they name."""
    db = tmp_path / "s.db"
    settings = AuditSettings(
        url=f"sqlite:///{db}", hmac_key="k" * 32, include_text=True, commit_interval_ms=0
    )
    async with AuditLog.from_settings(settings) as audit:
        record = await audit.record_message(
            platform="p", message_id="m", conversation_id="c", sender_id="s", outcome="x", text="t"
        )
        assert record.fields["text"] == "t"
    assert verify_records(read_sqlite(db), key=b"k" * 32).ok
