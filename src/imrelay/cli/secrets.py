"""``imrelay secrets``: keep app secrets and API keys encrypted at rest.

Register with ``app.add_typer(secrets_app, name="secrets")``. The store file and its key come
from options or the environment (``IMRELAY_SECRETS_FILE``, ``IMRELAY_SECRETS_KEY_FILE``,
``IMRELAY_SECRETS_KEY``), never from the configuration file, since the configuration may itself
refer to the secrets. Only ``get --reveal`` and ``keygen`` without ``--key-file`` print secret
material. Exit codes: 0 done, 1 the store refused (wrong key, unknown name…), 2 bad usage.
"""

from __future__ import annotations

import datetime
import getpass
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Final, NoReturn

import typer

from imrelay.errors import ConfigError
from imrelay.security.secrets import (
    DEFAULT_KEY_ENV,
    DEFAULT_SECRETS_FILE,
    SecretStore,
    generate_key,
    load_key,
    write_key_file,
)

__all__ = ["parse_duration", "secrets_app"]

secrets_app = typer.Typer(
    help="Keep app secrets and API keys encrypted at rest (config: secret:NAME).",
    no_args_is_help=True,
    add_completion=False,
)

_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DAY: Final = 86400.0

FileOption = Annotated[
    Path,
    typer.Option("--file", envvar="IMRELAY_SECRETS_FILE", help="The encrypted secrets file."),
]
KeyFileOption = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        envvar="IMRELAY_SECRETS_KEY_FILE",
        help="A file holding the key (mode 0600); default: the --key-env variable.",
        show_default=False,
    ),
]
KeyEnvOption = Annotated[
    str, typer.Option("--key-env", help="The environment variable holding the key.")
]
StdinOption = Annotated[
    bool,
    typer.Option(
        "--value-stdin",
        help="Read the value from standard input (the default when it is not a terminal).",
    ),
]


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``12h`` or ``7d``.

    Raises:
        ValueError: any other form.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError("expected a number of seconds, or a number followed by s, m, h or d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _fail(text: str, code: int = 1) -> NoReturn:
    print(f"error: {text}", file=sys.stderr)
    raise typer.Exit(code)


def _store(file: Path, key_file: Path | None, key_env: str) -> SecretStore:
    try:
        key = load_key(environ=os.environ, key_file=key_file, key_env=key_env)
        return SecretStore(file, key)
    except ConfigError as exc:
        _fail(str(exc))


def _read_value(from_stdin: bool, prompt: Callable[[str], str] = getpass.getpass) -> str:
    if from_stdin or not sys.stdin.isatty():
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
    else:
        value = prompt("value (hidden): ")
        if prompt("again: ") != value:
            _fail("the two values differ", 2)
    if not value:
        _fail("a secret cannot be empty", 2)
    return value


def _guarded(action: Callable[[], None]) -> None:
    try:
        action()
    except ConfigError as exc:
        _fail(str(exc))


@secrets_app.command("set")
def set_(
    name: Annotated[str, typer.Argument(help="The secret's name (config: secret:NAME).")],
    value_stdin: StdinOption = False,
    file: FileOption = Path(DEFAULT_SECRETS_FILE),
    key_file: KeyFileOption = None,
    key_env: KeyEnvOption = DEFAULT_KEY_ENV,
) -> None:
    """Store a secret (prompted without echo on a terminal, else read from standard input)."""
    store = _store(file, key_file, key_env)
    value = _read_value(value_stdin)
    _guarded(lambda: store.set(name, value))
    print(f"secret {name} set", file=sys.stderr)


@secrets_app.command("get")
def get(
    name: Annotated[str, typer.Argument(help="The secret's name.")],
    reveal: Annotated[
        bool, typer.Option("--reveal", help="Required: print the value in clear.")
    ] = False,
    file: FileOption = Path(DEFAULT_SECRETS_FILE),
    key_file: KeyFileOption = None,
    key_env: KeyEnvOption = DEFAULT_KEY_ENV,
) -> None:
    """Print a secret's current value (only with --reveal)."""
    if not reveal:
        _fail("refusing to print a secret without --reveal", 2)
    store = _store(file, key_file, key_env)
    try:
        value = store.get(name)
    except ConfigError as exc:
        _fail(str(exc))
    print(value)


@secrets_app.command("rotate")
def rotate(
    name: Annotated[str, typer.Argument(help="The secret's name.")],
    grace: Annotated[
        str,
        typer.Option(
            "--grace", help="How long the old value stays valid: seconds, or 30m, 12h, 7d."
        ),
    ] = "1d",
    value_stdin: StdinOption = False,
    file: FileOption = Path(DEFAULT_SECRETS_FILE),
    key_file: KeyFileOption = None,
    key_env: KeyEnvOption = DEFAULT_KEY_ENV,
) -> None:
    """Replace a secret's value, keeping the old one valid for a grace period."""
    try:
        grace_s = parse_duration(grace)
    except ValueError as exc:
        _fail(f"--grace: {exc}", 2)
    store = _store(file, key_file, key_env)
    if store.entry(name) is None:
        _fail(f"secret {name!r} is not set; use imrelay secrets set")
    value = _read_value(value_stdin)
    _guarded(lambda: store.rotate(name, value, grace_s=grace_s))
    print(f"secret {name} rotated; the old value stays valid for {grace}", file=sys.stderr)


@secrets_app.command("list")
def list_(
    max_age_days: Annotated[
        float, typer.Option("--max-age-days", help="Flag secrets older than this.")
    ] = 90.0,
    file: FileOption = Path(DEFAULT_SECRETS_FILE),
    key_file: KeyFileOption = None,
    key_env: KeyEnvOption = DEFAULT_KEY_ENV,
) -> None:
    """List secret names with their age (never their values)."""
    store = _store(file, key_file, key_env)
    now = time.time()
    for name, entry in store.items():
        age = max(now - entry.set_at, 0.0)
        set_at = datetime.datetime.fromtimestamp(entry.set_at, tz=datetime.UTC)
        notes = ["STALE: rotate it"] if age > max_age_days * _DAY else []
        until = entry.previous_valid_until
        if entry.previous is not None and until is not None and until > now:
            notes.append(f"previous value valid for {(until - now) / 3600:.1f} h")
        print(
            f"{name}\t{age / _DAY:.1f} days\tset {set_at:%Y-%m-%dT%H:%M:%SZ}"
            + (f"\t{'; '.join(notes)}" if notes else "")
        )


@secrets_app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="The secret's name.")],
    file: FileOption = Path(DEFAULT_SECRETS_FILE),
    key_file: KeyFileOption = None,
    key_env: KeyEnvOption = DEFAULT_KEY_ENV,
) -> None:
    """Remove a secret."""
    store = _store(file, key_file, key_env)
    _guarded(lambda: store.delete(name))
    print(f"secret {name} deleted", file=sys.stderr)


@secrets_app.command("keygen")
def keygen(
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key-file", help="Write the key to this new file (mode 0600) instead of printing it."
        ),
    ] = None,
) -> None:
    """Make a new store key: put it in $IMRELAY_SECRETS_KEY or a 0600 key file."""
    key = generate_key()
    if key_file is None:
        print(key.decode())
        return
    _guarded(lambda: write_key_file(key_file, key))
    print(f"key written to {key_file}", file=sys.stderr)
