"""Logging set-up: ECS JSON (Elastic Common Schema) by default, plain text for humans.

Only the CLI calls :func:`configure_logging`; library code uses ``logging.getLogger(__name__)``
and passes ECS fields through ``extra`` (``{"message.id": …, "platform": …}``), usually via
:func:`message_logger`. A filter masks registered secrets in every record as a last line of
defence.

While the runner processes a message it binds that message's fields with
:func:`log_context`; :class:`MessageContextFilter` (installed by :func:`configure_logging`) adds
them to every line written meanwhile that names no message of its own, so lines from model
backends, platform APIs or libraries share the message's ``trace.id`` too.

Conversation ids are not logged as such: :func:`conversation_hash` turns them into a short
stable digest (``conversation.hash``), enough to follow one conversation in a log search without
writing who talked to whom in clear.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import logging.config
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, Literal, TextIO

import ecs_logging

__all__ = [
    "ECSFormatter",
    "MessageContextFilter",
    "SecretMasker",
    "configure_logging",
    "conversation_hash",
    "log_context",
    "message_logger",
]

_ECS_KEYS = ("platform", "message.id")

# the fields of the message the current task is processing (see log_context)
_MESSAGE_FIELDS: ContextVar[Mapping[str, object] | None] = ContextVar(
    "imrelay_message_fields", default=None
)


@contextlib.contextmanager
def log_context(fields: Mapping[str, object] | None) -> Iterator[None]:
    """Bind a message's log fields to the current context (task) for the ``with`` block."""
    token = _MESSAGE_FIELDS.set(fields)
    try:
        yield
    finally:
        _MESSAGE_FIELDS.reset(token)


class MessageContextFilter(logging.Filter):
    """Add the fields bound by :func:`log_context` to records that name no message."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _MESSAGE_FIELDS.get()
        if fields and "message.id" not in record.__dict__:
            for key, value in fields.items():
                record.__dict__.setdefault(key, value)
        return True


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


_RECORD_KEYS: frozenset[str] = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
}
_FAST_EXCLUDES: frozenset[str] = frozenset({"log.original"})
_dumps_rest = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), default=repr, ensure_ascii=True
).encode
_dumps_str = json.JSONEncoder(ensure_ascii=True).encode


_PATHS: dict[str, tuple[list[str], str]] = {}


def _put(doc: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` in ``doc`` as nested objects (ecs-logging's de_dot + merge)."""
    if type(value) is dict:
        for sub, subvalue in value.items():
            _put(doc, f"{key}.{sub}", subvalue)
        return
    path = _PATHS.get(key)
    if path is None:
        *parents, leaf = key.split(".")
        path = (parents, leaf)
        if len(_PATHS) < 4096:  # keys are the code's own field names: a small, fixed set
            _PATHS[key] = path
    node = doc
    for part in path[0]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[1]] = value


class ECSFormatter(ecs_logging.StdlibFormatter):
    """ECS JSON, with ``message.id`` kept as a flat key beside the ``message`` text.

    ecs-logging expands dotted ``extra`` keys into nested objects, which would turn
    ``message.id`` into ``{"message": {"id": …}}`` and overwrite the log text. A line about a
    message that names no trace gets ``trace.id`` = its message id, so every line of one
    message shares a trace id whichever logger wrote it.

    With the gateway's own settings (``exclude_fields=["log.original"]``) the line is built
    directly: one nested dict and one C-encoder call, the same document ecs-logging writes
    (``@timestamp``, ``log.level``, ``message`` first, the rest with sorted keys) at a fraction
    of its cost, which matters because every message writes one INFO line. Other
    ``exclude_fields`` go through ecs-logging's general path.
    """

    def format(self, record: logging.LogRecord) -> str:
        if not self._exclude_fields <= _FAST_EXCLUDES:
            return super().format(record)
        message = record.getMessage()
        created = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        doc: dict[str, Any] = {
            "ecs.version": ecs_logging.ECS_VERSION,
            "log": {
                "logger": record.name,
                "origin": {
                    "file": {"line": record.lineno, "name": record.filename},
                    "function": record.funcName,
                },
            },
            "process": {
                "name": record.processName,
                "pid": record.process,
                "thread": {"id": record.thread, "name": record.threadName},
            },
        }
        if "log.original" not in self._exclude_fields:
            doc["log"]["original"] = message
        if record.exc_info:
            error: dict[str, Any] = {}
            exc_type, exc, _ = record.exc_info
            if exc_type is not None:
                error["type"] = exc_type.__name__
            if exc:
                error["message"] = str(exc)
            trace = self._record_error_stack_trace(record)
            if trace:
                error["stack_trace"] = trace
            if error:
                doc["error"] = error
        elif record.stack_info:
            doc["error"] = {"stack_trace": str(record.stack_info)}
        message_id = None
        for key, value in record.__dict__.items():
            if value is None or key in _RECORD_KEYS:
                continue
            if key == "message.id":
                message_id = value
            elif key.startswith("elasticapm_"):
                continue
            else:
                _put(doc, key, value)
        if message_id is not None:
            doc["message.id"] = message_id
            trace_node = doc.setdefault("trace", {})
            if isinstance(trace_node, dict):
                trace_node.setdefault("id", message_id)
        head = (
            f'{{"@timestamp":"{stamp}.{int(record.msecs):03d}Z",'
            f'"log.level":{_dumps_str(record.levelname.lower())},'
            f'"message":{_dumps_str(message)},'
        )
        return head + _dumps_rest(doc)[1:]

    def format_to_ecs(self, record: logging.LogRecord) -> dict[str, Any]:
        message_id = record.__dict__.get("message.id")
        if message_id is not None:
            record = logging.makeLogRecord(
                {k: v for k, v in record.__dict__.items() if k != "message.id"}
            )
        result: dict[str, Any] = super().format_to_ecs(record)
        if message_id is not None:
            result["message.id"] = message_id
            trace = result.setdefault("trace", {})
            if isinstance(trace, dict):
                trace.setdefault("id", message_id)
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
            "filters": {
                "context": {"()": MessageContextFilter},
                "secrets": {"()": SecretMasker, "secrets": list(secrets)},
            },
            "formatters": {"main": formatter},
            "handlers": {
                "main": {
                    "class": "logging.StreamHandler",
                    "stream": stream or sys.stderr,
                    "formatter": "main",
                    "filters": ["context", "secrets"],
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


def conversation_hash(platform: str, conversation_id: str) -> str:
    """The first 16 hex digits of SHA-256 over ``platform``, a NUL and ``conversation_id``.

    Stable across restarts and replicas (no salt), so one conversation's lines can be found
    together; the id itself stays out of the logs.
    """
    digest = hashlib.sha256(f"{platform}\0{conversation_id}".encode())
    return digest.hexdigest()[:16]


def message_logger(
    logger: logging.Logger,
    *,
    platform: str,
    message_id: str = "",
    trace_id: str = "",
    conversation: str = "",
) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose every line carries ``platform``, ``message.id`` and ``trace.id``.

    Args:
        logger: the module's logger.
        platform: the configured platform name.
        message_id: the platform's message id (also the default ``trace.id``).
        trace_id: a trace id shared by every line of the message, if not the message id.
        conversation: the conversation id; logged only as ``conversation.hash``.
    """
    extra: dict[str, object] = {"platform": platform}
    if message_id:
        extra["message.id"] = message_id
        extra["trace.id"] = trace_id or message_id
    if conversation:
        extra["conversation.hash"] = conversation_hash(platform, conversation)
    return _MessageAdapter(logger, extra)
