"""ECS log lines: hashed conversations, shared trace ids, context binding, stack traces."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from imrelay.observability.logging import (
    ECSFormatter,
    MessageContextFilter,
    configure_logging,
    conversation_hash,
    log_context,
    message_logger,
)


class _Lines(logging.Handler):
    """Formats records as ECS JSON, with the context filter, and keeps them decoded."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(ECSFormatter(exclude_fields=["log.original"]))
        self.addFilter(MessageContextFilter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, _Lines]]:
    """A private logger writing ECS lines to a list."""
    logger = logging.getLogger("tests.ops.log_format")
    handler = _Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


def test_conversation_hash_is_short_stable_and_platform_scoped() -> None:
    """The digest is 16 hex digits, the same each time, and differs between platforms."""
    first = conversation_hash("dingtalk", "cid-1")
    assert first == conversation_hash("dingtalk", "cid-1")
    assert len(first) == 16
    assert int(first, 16) >= 0
    assert first != conversation_hash("feishu", "cid-1")
    assert first != conversation_hash("dingtalk", "cid-2")


def test_log_message_fields_are_flat_and_share_the_trace_id(
    captured: tuple[logging.Logger, _Lines],
) -> None:
    """message.id stays flat beside the text; trace.id and conversation.hash come along."""
    logger, handler = captured
    log = message_logger(logger, platform="dingtalk", message_id="m1", conversation="cid-1")
    log.info("message replied", extra={"event.duration": 5})
    (line,) = handler.lines
    assert line["message"] == "message replied"
    assert line["message.id"] == "m1"
    assert line["trace"] == {"id": "m1"}
    assert line["conversation"] == {"hash": conversation_hash("dingtalk", "cid-1")}
    assert line["event"] == {"duration": 5}
    assert "cid-1" not in json.dumps(line)


def test_log_trace_id_defaults_to_the_message_id_for_any_logger(
    captured: tuple[logging.Logger, _Lines],
) -> None:
    """A line naming a message but no trace gets trace.id = message id; explicit ones stay."""
    logger, handler = captured
    logger.warning("commit failed", extra={"message.id": "m9", "platform": "dingtalk"})
    message_logger(logger, platform="dingtalk", message_id="m2", trace_id="t-2").info("x")
    assert handler.lines[0]["trace"] == {"id": "m9"}
    assert handler.lines[1]["trace"] == {"id": "t-2"}


def test_log_context_tags_other_loggers_lines(captured: tuple[logging.Logger, _Lines]) -> None:
    """Inside log_context, lines without a message get its fields; others keep their own."""
    logger, handler = captured
    fields = message_logger(logger, platform="dingtalk", message_id="m1", conversation="c").extra
    logger.info("before")
    with log_context(fields):
        logger.info("model attempt failed")
        logger.info("about another", extra={"message.id": "m7"})
    logger.info("after")
    before, inside, other, after = handler.lines
    assert "message.id" not in before
    assert "message.id" not in after
    assert inside["message.id"] == "m1"
    assert inside["trace"] == {"id": "m1"}
    assert inside["platform"] == "dingtalk"
    assert other["message.id"] == "m7"
    assert other["trace"] == {"id": "m7"}
    assert "conversation" not in other


async def test_log_context_is_per_task(captured: tuple[logging.Logger, _Lines]) -> None:
    """Two messages processed at once in two tasks each tag their own lines."""
    logger, handler = captured

    async def work(message_id: str, gate: asyncio.Event, then: asyncio.Event) -> None:
        with log_context({"message.id": message_id, "platform": "dingtalk"}):
            gate.set()
            await then.wait()
            logger.info("working")

    a_in, b_in, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(work("a", a_in, go)), asyncio.create_task(work("b", b_in, go))]
    await a_in.wait()
    await b_in.wait()
    go.set()
    await asyncio.gather(*tasks)
    assert sorted(str(line["message.id"]) for line in handler.lines) == ["a", "b"]


def test_log_exception_has_error_stack_trace(captured: tuple[logging.Logger, _Lines]) -> None:
    """logger.exception writes error.type, error.message and error.stack_trace."""
    logger, handler = captured
    log = message_logger(logger, platform="dingtalk", message_id="m3")
    try:
        raise RuntimeError("history write failed")
    except RuntimeError:
        log.exception("message processing failed")
    (line,) = handler.lines
    error = line["error"]
    assert isinstance(error, dict)
    assert error["type"] == "RuntimeError"
    assert error["message"] == "history write failed"
    assert "test_log_exception_has_error_stack_trace" in error["stack_trace"]
    assert line["trace"] == {"id": "m3"}


@pytest.fixture
def root_restored() -> Iterator[None]:
    """Put the root logger back as it was after configure_logging changed it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quieted = {
        n: logging.getLogger(n).level for n in ("aiohttp.access", "httpx", "httpx2", "openai")
    }
    try:
        yield
    finally:
        for name, old in quieted.items():
            logging.getLogger(name).setLevel(old)
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


@pytest.mark.usefixtures("root_restored")
def test_configure_logging_installs_context_and_secret_filters() -> None:
    """The CLI's ECS handler tags lines with the bound message and masks secrets."""
    stream = io.StringIO()
    configure_logging(fmt="ecs", level="INFO", secrets=["s3cr3t-value"], stream=stream)
    logger = logging.getLogger("imrelay.tests.configured")
    with log_context({"message.id": "m5", "platform": "dingtalk"}):
        logger.info("token s3cr3t-value refused")
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["message.id"] == "m5"
    assert line["trace"] == {"id": "m5"}
    assert line["message"] == "token *** refused"


def test_log_explicit_non_object_trace_is_left_alone(
    captured: tuple[logging.Logger, _Lines],
) -> None:
    """A caller's own scalar ``trace`` field is kept rather than turned into an object."""
    logger, handler = captured
    logger.info("odd", extra={"message.id": "m4", "trace": "caller-value"})
    assert handler.lines[0]["trace"] == "caller-value"
    assert handler.lines[0]["message.id"] == "m4"


def test_message_logger_without_message_id_tags_platform_only(
    captured: tuple[logging.Logger, _Lines],
) -> None:
    """A platform-level logger carries the platform but no message or trace id."""
    logger, handler = captured
    message_logger(logger, platform="dingtalk").info("connected")
    (line,) = handler.lines
    assert line["platform"] == "dingtalk"
    assert "message.id" not in line
    assert "trace" not in line
    assert "conversation" not in line


@pytest.mark.usefixtures("root_restored")
def test_configure_logging_text_format_tags_and_masks() -> None:
    """Text lines show platform and message id, and mask secrets in tracebacks too."""
    stream = io.StringIO()
    configure_logging(fmt="text", level="INFO", secrets=["s3cr3t-value"], stream=stream)
    logger = logging.getLogger("imrelay.tests.text")
    logger.info("plain line")
    with log_context({"message.id": "m6", "platform": "dingtalk"}):
        try:
            raise ValueError("bad key s3cr3t-value")
        except ValueError:
            logger.exception("failed")
    text = stream.getvalue()
    plain, tagged = text.splitlines()[:2]
    assert plain.endswith("imrelay.tests.text | plain line")
    assert "[dingtalk m6] | failed" in tagged
    assert "ValueError: bad key ***" in text
    assert "s3cr3t-value" not in text


def _records() -> Iterator[logging.LogRecord]:
    """Records of every shape the gateway writes: extras, nesting, errors, non-ASCII."""
    logger = logging.getLogger("tests.ops.log_format.same")

    def record(level: int, msg: str, *args: object, **kwargs: object) -> logging.LogRecord:
        extra = kwargs.pop("extra", None)
        exc_info = kwargs.pop("exc_info", None)
        return logger.makeRecord(
            logger.name,
            level,
            "x.py",
            7,
            msg,
            args,
            exc_info,
            "fn",
            extra,  # type: ignore[arg-type]
        )

    yield record(logging.INFO, "plain %s", "line")
    yield record(
        logging.INFO,
        "message replied",
        extra={
            "platform": "dingtalk",
            "message.id": "msg-1",
            "conversation.hash": "ab12",
            "event.action": "message-handled",
            "event.duration": 12_000,
            "imrelay.model.name": "默认",
            "imrelay.model.tokens.prompt": 3,
            "imrelay.state": "replied",
            "skipped": None,
        },
    )
    yield record(logging.WARNING, "nested", extra={"http": {"request": {"method": "GET"}}})
    yield record(logging.DEBUG, "trace given", extra={"message.id": "m2", "trace.id": "t2"})
    try:
        raise ValueError("boom ü")
    except ValueError:
        yield record(logging.ERROR, "failed", exc_info=sys.exc_info())


def test_ecs_fast_path_writes_what_ecs_logging_writes() -> None:
    """The direct builder and ecs-logging's general path give the same document, key order
    included (``@timestamp``, ``log.level``, ``message`` first)."""
    fast = ECSFormatter(exclude_fields=["log.original"])
    general = ECSFormatter(exclude_fields=["log.original", "no.such.field"])
    for record in _records():
        line = fast.format(record)
        assert line == general.format(record), record.getMessage()
        assert list(json.loads(line))[:3] == ["@timestamp", "log.level", "message"]
    plain = next(_records())
    line = ECSFormatter().format(plain)
    assert json.loads(line)["log"]["original"] == "plain line"
    assert line == ECSFormatter(exclude_fields=["no.such.field"]).format(plain)
