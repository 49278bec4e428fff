"""The audit hash chain: record format, hashing, verification, reading and export.

Theory of operation: a record is ``(seq, at, kind, fields)`` plus ``prev_hash``, ``hash`` and,
when a key is configured, ``hmac``::

    hash = sha256(prev_hash + "\\n" + canonical_json({"seq", "at", "kind", "fields"}))
    hmac = HMAC-SHA256(key, hash)

``seq`` counts from 1 without gaps; record 1 chains to 64 zeros (:data:`GENESIS`). Canonical
JSON is UTF-8 with sorted keys, no spaces and no NaN, so any language can recompute a hash from
an exported line. :func:`verify_records` walks the chain and names the first bad record:

- ``altered``: a record's content no longer matches its hash (or a rehashed record no longer
  matches its successor's ``prev_hash``);
- ``removed``: a seq is missing, or a record's predecessor is not the one it was chained to;
- ``inserted``: a record sits between two records that were chained to each other;
- ``forged``: the chain is consistent but a record's HMAC is missing or wrong (someone with
  write access rebuilt the chain, which only the key prevents).

Removing the newest records leaves a valid, shorter chain; only an outside copy catches that:
ship the JSON lines off the host (``security.audit.jsonl_path`` for Filebeat) or keep the head
that ``imrelay audit verify`` prints and pass it back as ``--anchor SEQ:HASH``.

Everything here is synchronous and reads the database read-only: ``imrelay audit`` uses it
without a running gateway. Writing is :class:`imrelay.security.audit.AuditLog`.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac as hmac_mod
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

from imrelay.errors import StoreError

__all__ = [
    "GENESIS",
    "AuditRecord",
    "Problem",
    "VerifyResult",
    "canonical_json",
    "chain_hash",
    "export_jsonl",
    "hash_fields_text",
    "read_jsonl",
    "read_sqlite",
    "sign",
    "verify_records",
]

Problem = Literal["altered", "removed", "inserted", "forged"]
GENESIS: Final = "0" * 64
_SELECT: Final = (
    "SELECT seq, at, kind, fields, prev_hash, hash, hmac FROM audit WHERE seq > ? ORDER BY seq"
)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One committed record."""

    seq: int
    at: float
    kind: str
    fields: Mapping[str, Any]
    prev_hash: str
    hash: str
    hmac: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as one exported JSON line holds it (plus ``@timestamp`` for Filebeat)."""
        stamp = datetime.datetime.fromtimestamp(self.at, tz=datetime.UTC)
        return {
            "@timestamp": stamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "fields": dict(self.fields),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "hmac": self.hmac,
        }


# one encoder for every record: json.dumps with options builds a new one on each call
_CANONICAL: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 text, no NaN (raises ``ValueError`` on one)."""
    return _CANONICAL.encode(value)


def chain_hash(prev_hash: str, seq: int, at: float, kind: str, fields: Mapping[str, Any]) -> str:
    """The hash of a record (see the module docstring)."""
    return hash_fields_text(prev_hash, seq, at, kind, canonical_json(fields))


def hash_fields_text(prev_hash: str, seq: int, at: float, kind: str, fields_text: str) -> str:
    """:func:`chain_hash` from the fields' canonical JSON (the writer serialises them once)."""
    # the canonical JSON of {"at", "fields", "kind", "seq"} (sorted), around canonical fields
    at_text, kind_text = canonical_json(at), canonical_json(kind)
    body = f'{{"at":{at_text},"fields":{fields_text},"kind":{kind_text},"seq":{seq}}}'
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def sign(key: bytes, record_hash: str) -> str:
    """HMAC-SHA256 of a record hash."""
    return hmac_mod.new(key, record_hash.encode("ascii"), hashlib.sha256).hexdigest()


# -- verification ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of walking a chain.

    Attributes:
        ok: every record checked out.
        records: records that verified before the first problem (all of them when ``ok``).
        head_seq: the last good record's seq (0 for an empty log).
        head_hash: its hash (:data:`GENESIS` for an empty log): note it as an anchor.
        first_bad: the seq of the first bad record (or of the first missing one).
        problem: what is wrong with it.
        detail: one lowercase sentence for humans.
        signed: HMACs were checked.
    """

    ok: bool
    records: int
    head_seq: int
    head_hash: str
    first_bad: int | None = None
    problem: Problem | None = None
    detail: str = ""
    signed: bool = False


class _Unreadable(Exception):
    def __init__(self, where: str, seq: int | None = None) -> None:
        super().__init__(where)
        self.seq = seq


def _record(raw: Mapping[str, Any], where: str) -> AuditRecord:
    """A record from a row or an exported line; raises :class:`_Unreadable`."""
    seq = raw.get("seq")
    good_seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    try:
        fields = raw["fields"]
        if isinstance(fields, str):
            fields = json.loads(fields)
        mac = raw.get("hmac")
        record = AuditRecord(
            seq=int(raw["seq"]),
            at=float(raw["at"]),
            kind=str(raw["kind"]),
            fields=fields,
            prev_hash=str(raw["prev_hash"]),
            hash=str(raw["hash"]),
            hmac=None if mac is None else str(mac),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _Unreadable(where, good_seq) from exc
    if not isinstance(record.fields, dict) or isinstance(raw["seq"], bool):
        raise _Unreadable(where, good_seq)
    return record


def verify_records(
    rows: Iterable[Mapping[str, Any]],
    *,
    key: bytes | None = None,
    anchor: tuple[int, str] | None = None,
) -> VerifyResult:
    """Walk a chain in seq order and report its first problem.

    Args:
        rows: records as mappings (:func:`read_sqlite`, :func:`read_jsonl`).
        key: the HMAC key; when given, every record must carry a valid HMAC.
        anchor: ``(seq, hash)`` noted earlier; the log must still hold that record unchanged.

    Returns:
        The verdict (see :class:`VerifyResult`).
    """
    count, prev_seq, prev_hash, before = 0, 0, GENESIS, ""

    def bad(seq: int, problem: Problem, detail: str) -> VerifyResult:
        return VerifyResult(
            False, count, prev_seq, prev_hash, seq, problem, detail, key is not None
        )

    for index, raw in enumerate(rows, start=1):
        try:
            rec = _record(raw, f"record {index}")
        except _Unreadable as exc:
            seq = exc.seq if exc.seq is not None else prev_seq + 1
            return bad(seq, "altered", f"{exc} (seq {seq}) cannot be read")
        if rec.seq <= prev_seq:
            return bad(rec.seq, "inserted", f"record {rec.seq} appears after record {prev_seq}")
        if rec.seq != prev_seq + 1:
            gap = f"{prev_seq + 1}" if rec.seq == prev_seq + 2 else f"{prev_seq + 1}-{rec.seq - 1}"
            return bad(prev_seq + 1, "removed", f"record(s) {gap} are missing")
        try:
            own = chain_hash(rec.prev_hash, rec.seq, rec.at, rec.kind, rec.fields)
        except ValueError:  # a NaN or infinity edited into the record
            return bad(rec.seq, "altered", f"record {rec.seq} holds a value json cannot carry")
        if rec.prev_hash != prev_hash:
            if before and rec.prev_hash == before:
                return bad(
                    prev_seq,
                    "inserted",
                    f"record {prev_seq} was inserted: record {rec.seq} is chained to the record "
                    f"before it",
                )
            if own == rec.hash and prev_seq:
                return bad(
                    prev_seq,
                    "altered",
                    f"record {prev_seq} was rewritten: record {rec.seq} is chained to another "
                    f"version of it",
                )
            return bad(
                rec.seq,
                "removed",
                f"record {rec.seq} is not chained to record {prev_seq}: records before it were "
                f"removed and the rest renumbered",
            )
        if own != rec.hash:
            return bad(rec.seq, "altered", f"record {rec.seq} does not match its hash")
        if key is not None and (
            rec.hmac is None or not hmac_mod.compare_digest(sign(key, rec.hash), rec.hmac)
        ):
            what = "is not signed" if rec.hmac is None else "has a wrong signature"
            return bad(rec.seq, "forged", f"record {rec.seq} {what}")
        if anchor is not None and rec.seq == anchor[0] and rec.hash != anchor[1]:
            return bad(rec.seq, "altered", f"record {rec.seq} differs from the anchor")
        count, before, prev_seq, prev_hash = count + 1, prev_hash, rec.seq, rec.hash
    if anchor is not None and anchor[0] > prev_seq:
        return bad(
            prev_seq + 1,
            "removed",
            f"the log ends at record {prev_seq} but the anchor names record {anchor[0]}",
        )
    return VerifyResult(True, count, prev_seq, prev_hash, signed=key is not None)


def read_sqlite(path: str | os.PathLike[str], *, since: int = 0) -> Iterator[dict[str, Any]]:
    """Yield the records of an audit database in seq order, read-only.

    Raises:
        StoreError: the file is missing or is not an audit database.
    """
    file = Path(path)
    if not file.is_file():
        raise StoreError(f"no audit database at {file}")
    try:
        conn = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the audit database: {exc}") from exc
    try:
        cursor = conn.execute(_SELECT, (since,))
        names = [d[0] for d in cursor.description]
        for row in cursor:
            yield dict(zip(names, row, strict=True))
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the audit database: {exc}") from exc
    finally:
        conn.close()


def read_jsonl(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Yield records from exported JSON lines (blank lines skipped).

    A line that is not a JSON object yields an empty mapping, which verification reports as an
    unreadable (altered) record.
    """
    for line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        yield value if isinstance(value, dict) else {}


def export_jsonl(path: str | os.PathLike[str], out: IO[str], *, since: int = 0) -> int:
    """Write the records after ``since`` to ``out`` as JSON lines; return how many.

    Raises:
        StoreError: the database cannot be read, or a record is unreadable.
    """
    count = 0
    for raw in read_sqlite(path, since=since):
        try:
            rec = _record(raw, "record")
        except _Unreadable:
            raise StoreError(f"audit record {raw.get('seq')!r} is unreadable") from None
        out.write(canonical_json(rec.to_json()) + "\n")
        count += 1
    return count
