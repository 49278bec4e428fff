"""What every ``imrelay`` subcommand shares: the ``--config`` option, printing errors and loading
the configuration."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from imrelay.config import Settings, format_config_error, load_settings
from imrelay.errors import ConfigError

__all__ = ["ConfigOption", "err", "load_or_exit"]

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "-c",
        "--config",
        help="Configuration file (default: $IMRELAY_CONFIG, ./imrelay.yaml, "
        "~/.bot_config/config.json).",
        show_default=False,
    ),
]
"""The ``-c/--config`` option of every subcommand that reads the configuration."""


def err(text: str) -> None:
    """Print ``text`` on stderr."""
    print(text, file=sys.stderr)


def load_or_exit(config: Path | None) -> Settings:
    """Load settings, or exit 2 with one line per problem (never a traceback)."""
    try:
        settings, _ = load_settings(config)
    except ConfigError as exc:
        err(format_config_error(exc))
        raise typer.Exit(2) from None
    return settings
