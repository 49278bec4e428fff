"""Logging set-up: ECS JSON (Elastic Common Schema) by default, plain text for humans.

Only the CLI calls :func:`configure_logging`; library code uses ``logging.getLogger(__name__)``
and passes ECS fields through ``extra`` (``{"message.id": …, "platform": …}``), usually via
:func:`message_logger`. A filter masks registered secrets in every record as a last line of
defence.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal, TextIO

import ecs_logging

__all__ = ["ECSFormatter", "SecretMasker", "configure_logging", "message_logger"]

_ECS_KEYS = ("platform", "message.id")


class SecretMasker(logging.Filter):
    """Replace any registered secret value in a record's message and args with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            masked = self._mask(message)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
                record.exc_text = self._mask(logging.Formatter().formatException(record.exc_info))
        return True


class ECSFormatter(ecs_logging.StdlibFormatter):
    """ECS JSON, with ``message.id`` kept as a flat key beside the ``message`` text.

    ecs-logging expands dotted ``extra`` keys into nested objects, which would turn
    ``message.id`` into ``{"message": {"id": …}}`` and overwrite the log text.
    """

    def format_to_ecs(self, record: logging.LogRecord) -> dict[str, Any]:
        message_id = record.__dict__.get("message.id")
        if message_id is not None:
            record = logging.makeLogRecord(
                {k: v for k, v in record.__dict__.items() if k != "message.id"}
            )
        result: dict[str, Any] = super().format_to_ecs(record)
        if message_id is not None:
            result["message.id"] = message_id
        return result


class _TextFormatter(logging.Formatter):
    """``time level logger [platform message.id] message``."""

    def format(self, record: logging.LogRecord) -> str:
        tags = [str(getattr(record, k)) for k in _ECS_KEYS if hasattr(record, k)]
        base = super().format(record)
        if not tags:
            return base
        head, _, rest = base.partition(" | ")
        return f"{head} [{' '.join(tags)}] | {rest}"


def configure_logging(
    *,
    fmt: Literal["ecs", "text"] = "ecs",
    level: str = "INFO",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure the root logger once, for the CLI.

    Args:
        fmt: ``ecs`` for ECS JSON lines, ``text`` for humans.
        level: the root level.
        secrets: values to mask wherever they would appear.
        stream: where to write (default: stderr).
    """
    formatter: dict[str, Any]
    if fmt == "ecs":
        formatter = {"()": ECSFormatter, "exclude_fields": ["log.original"]}
    else:
        formatter = {
            "()": _TextFormatter,
            "format": "%(asctime)s %(levelname)-7s %(name)s | %(message)s",
        }
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"secrets": {"()": SecretMasker, "secrets": list(secrets)}},
            "formatters": {"main": formatter},
            "handlers": {
                "main": {
                    "class": "logging.StreamHandler",
                    "stream": stream or sys.stderr,
                    "formatter": "main",
                    "filters": ["secrets"],
                }
            },
            "root": {"level": level, "handlers": ["main"]},
            "loggers": {
                # third-party chatter stays at WARNING unless we debug
                "aiohttp.access": {"level": "WARNING"},
                "httpx": {"level": "WARNING"},
                "httpx2": {"level": "WARNING"},
                "openai": {"level": "WARNING"},
            },
        }
    )


class _MessageAdapter(logging.LoggerAdapter[logging.Logger]):
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def message_logger(
    logger: logging.Logger, *, platform: str, message_id: str = "", trace_id: str = ""
) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose every line carries ``platform``, ``message.id`` and ``trace.id``."""
    extra: dict[str, object] = {"platform": platform}
    if message_id:
        extra["message.id"] = message_id
        extra["trace.id"] = trace_id or message_id
    return _MessageAdapter(logger, extra)
