"""The gateway's log as ELK receives it: every line ECS JSON, per-message fields, Filebeat's view.

``imrelay run`` runs in a subprocess with its stderr appended to a file, as a service manager
would do for Filebeat to pick up. The test sends messages that end each way (answered, dropped,
model failure), stops the gateway, and reads every line back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from _ops_support import DEPLOY
from prometheus_client import CollectorRegistry

from _support import gateway_settings, wait_for
from imrelay.app import Gateway
from imrelay.observability.logging import ECSFormatter, MessageContextFilter
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator
from imrelay.stores.sqlite import SQLiteStore

FILEBEAT = DEPLOY / "filebeat" / "filebeat.yml"
HEX16 = re.compile(r"[0-9a-f]{16}")


def _config(dt: DingTalkSimulator, model: ModelSimulator, tmp_path: Path) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"url": f"sqlite:///{tmp_path / 'logs.db'}"},
        "platforms": {
            "dingtalk": {
                "type": "dingtalk",
                "app_key": dt.app_key,
                "app_secret": dt.app_secret,
                "api_base": dt.base_url,
                "backoff_initial_s": 0.05,
                "backoff_max_s": 0.5,
            }
        },
        "models": {
            "default": {
                "type": "openai",
                "base_url": model.base_url,
                "model": "sim-model",
                "timeout_s": 5,
            }
        },
        "logging": {"level": "DEBUG", "format": "ecs"},
    }


def _conversation_hash(platform: str, conversation_id: str) -> str:
    """The documented digest, computed independently of the gateway's code."""
    return hashlib.sha256(f"{platform}\0{conversation_id}".encode()).hexdigest()[:16]


# -- a model of what Filebeat and Elasticsearch do with a line (see filebeat.yml) ------------


def _filebeat_inputs() -> list[dict[str, Any]]:
    config = yaml.safe_load(FILEBEAT.read_text())
    inputs: list[dict[str, Any]] = config["filebeat.inputs"]
    return inputs


def _find(doc: dict[str, Any], key: str) -> tuple[dict[str, Any], str] | None:
    """libbeat's mapFind: the key as is first, else walk its dotted path."""
    while True:
        if key in doc:
            return doc, key
        head, dot, rest = key.partition(".")
        if not dot or not isinstance(doc.get(head), dict):
            return None
        doc, key = doc[head], rest


def filebeat_event(line: str, with_rename: bool = True) -> dict[str, Any]:
    """The event Filebeat builds from one line with the shipped input's parser and processors."""
    (source,) = _filebeat_inputs()
    ndjson = source["parsers"][0]["ndjson"]
    assert ndjson["target"] == ""
    assert ndjson["expand_keys"] is False  # keys land as written (libbeat DeepUpdate)
    event: dict[str, Any] = json.loads(line)
    if not with_rename:
        return event
    for processor in source["processors"]:
        for field in processor["rename"]["fields"]:
            found = _find(event, field["from"])
            if found is None:
                continue
            holder, key = found
            value = holder.pop(key)
            node = event
            *parents, leaf = field["to"].split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return event


def elasticsearch_source(doc: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Expand dotted field names into objects as Elasticsearch does; raise on a conflict."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{path}{key}: {part} is a value and an object")
        if isinstance(value, dict):
            value = elasticsearch_source(value, f"{path}{key}.")
            existing = node.get(leaf, {})
            if not isinstance(existing, dict):
                raise ValueError(f"{path}{key}: a value and an object")
            for k, v in value.items():
                if k in existing and (isinstance(v, dict) != isinstance(existing[k], dict)):
                    raise ValueError(f"{path}{key}.{k}: a value and an object")
                existing[k] = v
            node[leaf] = existing
        else:
            if isinstance(node.get(leaf), dict):
                raise ValueError(f"{path}{key}: an object and a value")
            node[leaf] = value
    return out


def test_filebeat_config_decodes_ecs_lines_at_the_root() -> None:
    """The shipped filebeat.yml reads NDJSON at the root, keeps errors, renames message.id."""
    config = yaml.safe_load(FILEBEAT.read_text())
    (source,) = config["filebeat.inputs"]
    assert source["type"] == "filestream"
    assert source["id"]
    assert source["paths"]
    ndjson = source["parsers"][0]["ndjson"]
    assert ndjson == {
        "target": "",
        "overwrite_keys": True,
        "expand_keys": False,
        "add_error_key": True,
        "message_key": "message",
    }
    (rename,) = source["processors"]
    assert rename["rename"]["fields"] == [{"from": "message.id", "to": "imrelay.message.id"}]
    assert rename["rename"]["ignore_missing"] is True
    assert config["output.elasticsearch"]["hosts"]
    assert config["setup.template.pattern"] == "imrelay-*"
    assert config["output.elasticsearch"]["index"].startswith("imrelay-")


def test_filebeat_model_detects_the_message_id_conflict() -> None:
    """Without the rename a line with message.id cannot be indexed; with it, it can."""
    line = json.dumps({"message": "message replied", "message.id": "m1", "log.level": "info"})
    with pytest.raises(ValueError, match="message"):
        elasticsearch_source(filebeat_event(line, with_rename=False))
    source = elasticsearch_source(filebeat_event(line))
    assert source["imrelay"]["message"]["id"] == "m1"
    assert source["message"] == "message replied"
    assert source["log"]["level"] == "info"


async def test_logs_every_line_is_ecs_json_with_per_message_fields(
    dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """Every line `imrelay run` writes is ECS JSON; each message ends with one complete line."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_config(dingtalk_sim, model_sim, tmp_path)))
    log_file = tmp_path / "imrelay.ndjson"
    with log_file.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imrelay", "run", "-c", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=err, stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        await wait_for(lambda: dingtalk_sim.active_connections() == 1, timeout=20)
        answered = await dingtalk_sim.send_message("private question", sender_id="alice")
        await wait_for(lambda: bool(dingtalk_sim.replies(answered["msg_id"])), timeout=10)
        ignored = await dingtalk_sim.send_message(
            "chatter", conversation_type="2", conversation_id="cidGroupLogs", at_bot=False
        )
        model_sim.set_behaviour(status=500)
        broken = await dingtalk_sim.send_message("are you there?", sender_id="bob")
        await wait_for(lambda: bool(dingtalk_sim.replies(broken["msg_id"])), timeout=10)
        model_sim.set_behaviour(status=None)

        def handled() -> int:
            return log_file.read_text().count('"message-handled"')

        await wait_for(lambda: handled() == 3, timeout=10, what="three handled lines")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0

    text = log_file.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line, none skipped
    assert len(lines) >= 10
    for line in lines:
        assert {"@timestamp", "log.level", "message", "ecs.version"} <= set(line), line
        assert line["log.level"] in {"debug", "info", "warning", "error"}
    assert dingtalk_sim.app_secret not in text
    for words in ("private question", "chatter", "are you there?"):
        assert words not in text  # message text only when logging.include_text is set

    # lines written while a message is processed carry its id, whichever module wrote them
    for line in lines:
        if line["log"]["logger"].startswith(("imrelay.pipeline.", "imrelay.models.")):
            assert "message.id" in line, line
    pool = [ln for ln in lines if ln["log"]["logger"].startswith("imrelay.models.")]
    assert pool, "the model backend logged nothing about the failed call"
    assert {ln["message.id"] for ln in pool} == {broken["msg_id"]}

    ends = {}
    for ids in (answered, ignored, broken):
        msg_id = ids["msg_id"]
        mine = [ln for ln in lines if ln.get("message.id") == msg_id]
        assert mine, msg_id
        for ln in mine:
            assert ln["trace"]["id"] == msg_id, ln
            assert ln["platform"] == "dingtalk", ln
        (end,) = [ln for ln in mine if ln.get("event", {}).get("action") == "message-handled"]
        assert end["log.level"] == "info"
        assert isinstance(end["event"]["duration"], int)
        assert end["event"]["duration"] > 0
        assert HEX16.fullmatch(end["conversation"]["hash"])
        ends[msg_id] = end

    ok = ends[answered["msg_id"]]
    assert ok["message"] == "message replied"
    assert ok["event"]["outcome"] == "success"
    assert ok["imrelay"]["model"]["name"] == "default"
    assert ok["imrelay"]["model"]["outcome"] == "ok"
    assert 0 < ok["imrelay"]["model"]["duration"] <= ok["event"]["duration"]
    alice = dingtalk_sim.direct_conversation_id("alice")
    assert ok["conversation"]["hash"] == _conversation_hash("dingtalk", alice)
    assert alice not in text

    dropped = ends[ignored["msg_id"]]
    assert (dropped["event"]["outcome"], dropped["event"]["reason"]) == (
        "success",
        "not_mentioned",
    )
    assert "model" not in dropped.get("imrelay", {})
    assert dropped["conversation"]["hash"] == _conversation_hash("dingtalk", "cidGroupLogs")

    failed = ends[broken["msg_id"]]
    assert failed["event"]["outcome"] == "failure"
    assert failed["event"]["reason"].startswith("model_")
    assert failed["imrelay"]["model"]["name"] == "default"
    assert failed["imrelay"]["model"]["outcome"] in {"error", "unavailable"}

    # and every line survives Filebeat's parser and processors and Elasticsearch's mapping
    for raw in text.splitlines():
        source = elasticsearch_source(filebeat_event(raw))
        assert isinstance(source["message"], str)
        if "message.id" in json.loads(raw):
            assert source["imrelay"]["message"]["id"] == json.loads(raw)["message.id"]


class _HistoryFails(SQLiteStore):
    """A store whose history writes fail: the answer goes out, then the message fails."""

    async def append(self, key: str, turns: Any, keep: int) -> None:
        raise RuntimeError("history write failed")


async def test_logs_unexpected_failure_carries_the_stack_trace(
    dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """An unexpected error is logged with error.stack_trace, under the message's trace id."""
    records: list[str] = []

    class _Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = _Capture()
    handler.setFormatter(ECSFormatter(exclude_fields=["log.original"]))
    handler.addFilter(MessageContextFilter())
    imrelay_logger = logging.getLogger("imrelay")
    previous = imrelay_logger.level
    imrelay_logger.addHandler(handler)
    imrelay_logger.setLevel(logging.DEBUG)
    settings = gateway_settings(dingtalk_sim, model_sim, tmp_path / "fail.db")
    gateway = Gateway(
        settings,
        registry=CollectorRegistry(),
        store=_HistoryFails(str(tmp_path / "fail.db"), commit_interval_ms=1),
    )
    try:
        await gateway.start()
        await wait_for(lambda: dingtalk_sim.active_connections() >= 1, what="stream")
        ids = await dingtalk_sim.send_message("hello")
        await wait_for(
            lambda: any('"message-handled"' in r and ids["msg_id"] in r for r in records),
            what="the handled line",
        )
    finally:
        await gateway.stop()
        imrelay_logger.removeHandler(handler)
        imrelay_logger.setLevel(previous)
    lines = [json.loads(r) for r in records]
    mine = [ln for ln in lines if ln.get("message.id") == ids["msg_id"]]
    (crash,) = [ln for ln in mine if "error" in ln and "stack_trace" in ln["error"]]
    assert crash["message"] == "message processing failed"
    assert crash["log.level"] == "error"
    assert crash["error"]["type"] == "RuntimeError"
    assert crash["error"]["message"] == "history write failed"
    assert "append" in crash["error"]["stack_trace"]
    (end,) = [ln for ln in mine if ln.get("event", {}).get("action") == "message-handled"]
    assert (end["event"]["outcome"], end["event"]["reason"]) == ("failure", "internal_error")
    assert {ln["trace"]["id"] for ln in mine} == {ids["msg_id"]}
