"""``imrelay audit``: verify the audit log's hash chain, export it as JSON lines.

Register with ``app.add_typer(audit_app, name="audit")``. Exit codes: 0 the chain is intact
(or the export succeeded), 1 the chain was tampered with, 2 the command could not run (no such
file, no key).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from imrelay.errors import StoreError
from imrelay.security.audit import (
    VerifyResult,
    audit_path,
    export_jsonl,
    read_jsonl,
    read_sqlite,
    verify_records,
)

__all__ = ["audit_app"]

audit_app = typer.Typer(
    help="Verify and export the audit log.", no_args_is_help=True, add_completion=False
)

_ANCHOR = re.compile(r"(\d+):([0-9a-f]{64})")

DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="IMRELAY_AUDIT_DB",
        help="The audit database: a path or sqlite:///<path> (security.audit.url).",
    ),
]


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def _db_path(db: str) -> str:
    if "://" not in db:
        return db
    try:
        return audit_path(db)
    except ValueError as exc:
        _err(f"error: --db: {exc}")
        raise typer.Exit(2) from None


def _report(result: VerifyResult) -> str:
    signed = "hmac checked" if result.signed else "hmac not checked (no key)"
    if result.ok:
        return (
            f"ok: {result.records} record(s), chain intact, {signed}; "
            f"head {result.head_seq}:{result.head_hash}"
        )
    return (
        f"TAMPERED: record {result.first_bad} {result.problem}: {result.detail} "
        f"({result.records} record(s) verified before it, {signed})"
    )


@audit_app.command("verify")
def verify(
    db: DbOption = "./imrelay-audit.db",
    key_env: Annotated[
        str | None,
        typer.Option(
            "--key-env",
            help="Environment variable holding the HMAC key; every record must be signed.",
            show_default=False,
        ),
    ] = None,
    jsonl: Annotated[
        Path | None,
        typer.Option(
            "--jsonl", help="Verify an exported JSON lines file instead.", show_default=False
        ),
    ] = None,
    anchor: Annotated[
        str | None,
        typer.Option(
            "--anchor",
            help="SEQ:HASH printed by an earlier verify: that record must still be there.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Walk the hash chain and name the first record altered, removed, inserted or forged."""
    key: bytes | None = None
    if key_env is not None:
        value = os.environ.get(key_env, "")
        if not value:
            _err(f"error: --key-env: environment variable {key_env} is not set")
            raise typer.Exit(2)
        key = value.encode()
    point: tuple[int, str] | None = None
    if anchor is not None:
        match = _ANCHOR.fullmatch(anchor.strip())
        if match is None:
            _err("error: --anchor: expected SEQ:HASH (a number, a colon, 64 hex digits)")
            raise typer.Exit(2)
        point = (int(match.group(1)), match.group(2))
    try:
        if jsonl is not None:
            with jsonl.open(encoding="utf-8") as lines:
                result = verify_records(read_jsonl(lines), key=key, anchor=point)
        else:
            result = verify_records(read_sqlite(_db_path(db)), key=key, anchor=point)
    except (StoreError, OSError) as exc:
        _err(f"error: {exc}")
        raise typer.Exit(2) from None
    print(_report(result))
    raise typer.Exit(0 if result.ok else 1)


@audit_app.command("export")
def export(
    out: Annotated[
        str, typer.Option("--out", help="The JSON lines file to write ('-': standard output).")
    ],
    db: DbOption = "./imrelay-audit.db",
    since: Annotated[int, typer.Option("--since", help="Only records after this seq.")] = 0,
) -> None:
    """Write the audit records as JSON lines (one object per record, for Filebeat)."""
    path = _db_path(db)
    try:
        if out == "-":
            count = export_jsonl(path, sys.stdout, since=since)
        else:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                count = export_jsonl(path, file, since=since)
    except (StoreError, OSError) as exc:
        _err(f"error: {exc}")
        raise typer.Exit(2) from None
    _err(f"exported {count} record(s)")
