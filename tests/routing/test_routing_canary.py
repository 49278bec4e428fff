"""Canary: sticky buckets, the decisions file, windowed evaluation, rollback, audit, restart."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from imrelay.config import CanarySettings, RoutingSettings, Settings
from imrelay.errors import StoreError
from imrelay.observability.metrics import Metrics
from imrelay.routing.canary import (
    CanaryBook,
    CanaryController,
    CanaryDecision,
    CanaryStateFile,
    ModelSample,
    canary_bucket,
    canary_state_path,
    judge,
    read_model_sample,
)
from imrelay.security.audit import AuditLog, read_sqlite

EPOCH = 1_700_000_000.0


class Clock:
    """An epoch clock moved by hand."""

    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> float:
        return self.now


class RecordingAudit:
    """Records ``record_admin`` calls; raises ``error`` when set."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.error: Exception | None = None

    async def record_admin(self, **fields: Any) -> None:
        if self.error is not None:
            raise self.error
        self.records.append(fields)


def routing(**canary: Any) -> RoutingSettings:
    """A routing section with one canary rule ``next``: qwen (baseline) vs qwen-next."""
    canary = {"model": "qwen-next", "percent": 10, "min_requests": 10, "window_s": 60, **canary}
    data = {
        "models": {"qwen": {"type": "echo"}, "qwen-next": {"type": "echo"}},
        "routing": {
            "default": "qwen",
            "rules": [
                {"name": "plain", "model": "qwen", "match": {"keyword": "x"}},
                {"name": "next", "model": "qwen", "canary": canary},
            ],
        },
    }
    return Settings.model_validate(data).routing


def serve(
    metrics: Metrics, model: str, ok: int = 0, failed: int = 0, latency: float = 0.1
) -> None:
    """Record calls the way the generate stage does."""
    for _ in range(ok):
        metrics.model_requests.labels(model, "ok").inc()
        metrics.model_latency.labels(model).observe(latency)
    for _ in range(failed):
        metrics.model_requests.labels(model, "error").inc()


@pytest.fixture
def metrics() -> Metrics:
    """Metrics on a fresh registry."""
    return Metrics(CollectorRegistry(), process=False)


# -- buckets and paths --------------------------------------------------------------------------


def test_canary_bucket_is_stable_and_salted_by_rule() -> None:
    """The bucket is in [0, 100), the same every time, and differs between rules."""
    buckets = [canary_bucket("r", "dingtalk", f"c{i}") for i in range(2000)]
    assert all(0 <= b < 100 for b in buckets)
    assert buckets == [canary_bucket("r", "dingtalk", f"c{i}") for i in range(2000)]
    assert sum(b < 10 for b in buckets) in range(150, 251)  # ~200 expected
    assert canary_bucket("r", "dingtalk", "c1") != canary_bucket("s", "dingtalk", "c1")
    assert canary_bucket("r", "dingtalk", "c1") != canary_bucket("r", "feishu", "c1")


def test_canary_state_path_from_the_storage_url() -> None:
    """Next to the SQLite file; none for memory://; other URLs are refused."""
    assert canary_state_path("sqlite:///./data/imrelay.db") == Path(
        "./data/imrelay.db.canary.json"
    )
    assert canary_state_path("sqlite:////var/lib/i.db") == Path("/var/lib/i.db.canary.json")
    assert canary_state_path("memory://") is None
    for url in ("redis://localhost", "sqlite://host/x.db", "sqlite:///", "imrelay.db"):
        with pytest.raises(ValueError, match="sqlite:///<path> or memory://"):
            canary_state_path(url)


# -- the decisions file --------------------------------------------------------------------------


def test_canary_state_file_round_trip_and_missing_file(tmp_path: Path) -> None:
    """No file reads as no decisions; a decision written is read back; None forgets it."""
    store = CanaryStateFile(tmp_path / "sub" / "db.canary.json")
    assert store.read().decisions == {}
    assert store.stamp() is None
    decision = CanaryDecision("qwen-next", "rolled_back", EPOCH, "imrelay", "error rate 50%")
    store.decide("next", decision)
    assert store.read().decisions == {"next": decision}
    assert store.stamp() is not None
    data = json.loads((tmp_path / "sub" / "db.canary.json").read_text(encoding="utf-8"))
    assert data["version"] == 1
    assert data["rules"]["next"]["status"] == "rolled_back"
    store.decide("next", None)
    assert store.read().decisions == {}


def test_canary_state_file_in_memory() -> None:
    """Without a path the decisions live in memory (storage.url memory://)."""
    store = CanaryStateFile(None)
    assert store.stamp() is None
    store.decide("next", CanaryDecision("m", "promoted", EPOCH, "cli:x"))
    state = store.read()
    assert state.decisions["next"].status == "promoted"
    state.decisions.clear()  # a copy: the stored state is unchanged
    assert "next" in store.read().decisions


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"version": 2}',
        '{"version": 1, "rules": []}',
        '{"version": 1, "rules": {"r": 3}}',
        '{"version": 1, "rules": {"r": {"status": "maybe"}}}',
        '{"version": 1, "rules": {"r": {"status": "active", "candidate": 1, "by": "x", "at": 1}}}',
        '{"version": 1, "rules": {"r": {"status": "active", "candidate": "m", "by": "x"}}}',
        '{"version": 1, "rules": {"r": {"status": "active", "candidate": "m", "by": "x", '
        '"at": true}}}',
    ],
)
def test_canary_state_file_invalid_content_is_a_store_error(tmp_path: Path, content: str) -> None:
    """A damaged or foreign file is reported, not guessed at."""
    path = tmp_path / "s.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(StoreError, match="invalid canary state file"):
        CanaryStateFile(path).read()


def test_canary_state_file_unreadable_and_unwritable(tmp_path: Path) -> None:
    """A directory in place of the file, or a file in place of its directory, is a StoreError."""
    folder = tmp_path / "s.json"
    folder.mkdir()
    with pytest.raises(StoreError, match="cannot read"):
        CanaryStateFile(folder).read()
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(StoreError, match="cannot write"):
        CanaryStateFile(blocker / "s.json").decide("r", None)


def test_canary_state_file_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """Writers in parallel threads each add their decision; the lock keeps every one."""
    store = CanaryStateFile(tmp_path / "s.json")

    def write(i: int) -> None:
        store.decide(f"r{i}", CanaryDecision("m", "promoted", EPOCH + i, "cli:x"))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(store.read().decisions) == sorted(f"r{i}" for i in range(16))


def test_canary_book_reloads_only_when_the_file_changes(tmp_path: Path) -> None:
    """``load`` returns the changed decisions, and nothing when the file did not change."""
    store = CanaryStateFile(tmp_path / "s.json")
    book = CanaryBook(store)
    assert book.load() == {}
    assert book.status("next", "qwen-next") == "active"
    first = CanaryDecision("qwen-next", "rolled_back", EPOCH, "imrelay", "bad")
    store.decide("next", first)
    assert book.load() == {"next": (None, first)}
    assert book.status("next", "qwen-next") == "rolled_back"
    assert book.status("next", "other") == "active"  # a decision about another candidate
    assert book.load() == {}
    second = CanaryDecision("qwen-next", "active", EPOCH + 1, "cli:ops", "reset")
    store.decide("next", second)
    assert book.load() == {"next": (first, second)}
    assert book.status("next", "qwen-next") == "active"


# -- samples and judging -------------------------------------------------------------------------


def test_canary_read_model_sample_counts_errors_fallbacks_and_latency(metrics: Metrics) -> None:
    """Requests: all outcomes; errors: non-ok plus fallbacks away; latency: mean of successes."""
    serve(metrics, "qwen-next", ok=3, failed=1, latency=0.2)
    metrics.model_requests.labels("qwen-next", "timeout").inc()
    metrics.model_fallbacks.labels("qwen-next", "qwen").inc(2)
    serve(metrics, "qwen", ok=5)  # another model: not counted
    sample = read_model_sample(metrics, "qwen-next")
    assert sample == ModelSample(
        requests=5, errors=4, latency_sum=pytest.approx(0.6), latency_count=3
    )
    assert sample.error_rate == pytest.approx(0.8)
    assert sample.mean_latency == pytest.approx(0.2)
    assert read_model_sample(metrics, "unused") == ModelSample()
    assert ModelSample().error_rate == 0.0
    assert ModelSample().mean_latency is None
    later = ModelSample(10, 5, 2.0, 8)
    assert later.minus(ModelSample(4, 1, 0.5, 3)) == ModelSample(6, 4, 1.5, 5)
    assert later.to_dict() == {
        "requests": 10,
        "errors": 5,
        "error_rate": 0.5,
        "mean_latency_s": 0.25,
    }


def _canary(**kw: Any) -> CanarySettings:
    return CanarySettings(model="c", percent=10, min_requests=10, **kw)


@pytest.mark.parametrize(
    ("candidate", "baseline", "verdict", "reason"),
    [
        (ModelSample(9, 9), ModelSample(100), "wait", "9 of 10 candidate requests so far"),
        (
            ModelSample(10, 3, 1.0, 7),
            ModelSample(100, 2, 10.0, 98),
            "rollback",
            "error rate 30.0% vs baseline 2.0% (allowed +5.0%)",
        ),
        (ModelSample(10, 1), ModelSample(0), "rollback", "error rate 10.0% vs baseline 0.0%"),
        (
            ModelSample(10, 0, 4.0, 10),
            ModelSample(100, 0, 10.0, 100),
            "rollback",
            "mean latency 0.400s vs baseline 0.100s (x4.00, allowed x1.50)",
        ),
        (ModelSample(10, 0, 1.4, 10), ModelSample(100, 0, 10.0, 100), "keep", "within limits"),
        (ModelSample(10, 0), ModelSample(100, 0, 10.0, 100), "keep", "within limits"),
        (ModelSample(10, 0, 9.0, 10), ModelSample(10, 10), "keep", "within limits"),
        (ModelSample(10, 0, 9.0, 10), ModelSample(10, 0, 0.0, 10), "keep", "within limits"),
    ],
)
def test_canary_judge(
    candidate: ModelSample, baseline: ModelSample, verdict: str, reason: str
) -> None:
    """Too few requests wait; a worse error rate or latency rolls back; else keep."""
    evaluation = judge(_canary(), candidate, baseline)
    assert evaluation.verdict == verdict
    assert reason in evaluation.reason
    assert evaluation.to_dict()["verdict"] == verdict


# -- the controller ------------------------------------------------------------------------------


async def test_canary_controller_keeps_then_rolls_back_and_persists(
    tmp_path: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """Healthy windows keep the canary; a failing window rolls it back, audited and logged."""
    clock, audit = Clock(), RecordingAudit()
    store = CanaryStateFile(tmp_path / "db.canary.json")
    book = CanaryBook(store)
    controller = CanaryController(routing(), book, metrics, audit=audit, clock=clock)
    assert [c.rule for c in controller.canaries] == ["next"]
    assert controller.poll_s == 2.0
    assert await controller.tick() == []  # the first tick starts the window
    serve(metrics, "qwen", ok=90)
    serve(metrics, "qwen-next", ok=10)
    clock.now += 30
    assert await controller.tick() == []  # the window is not over
    clock.now += 30
    ((rule, evaluation),) = await controller.tick()
    assert (rule, evaluation.verdict) == ("next", "keep")
    assert evaluation.candidate.requests == 10
    assert store.read().evaluations["next"]["verdict"] == "keep"
    serve(metrics, "qwen", ok=90)
    serve(metrics, "qwen-next", ok=5, failed=5)
    clock.now += 60
    with caplog.at_level(logging.WARNING, logger="imrelay.routing.canary"):
        ((_, evaluation),) = await controller.tick()
    assert evaluation.verdict == "rollback"
    assert evaluation.candidate == ModelSample(10, 5, pytest.approx(0.5), 5)  # this window only
    assert book.status("next", "qwen-next") == "rolled_back"
    saved = store.read()
    assert saved.decisions["next"].status == "rolled_back"
    assert saved.decisions["next"].by == "imrelay"
    assert saved.evaluations["next"]["verdict"] == "rollback"
    (record,) = [r for r in caplog.records if getattr(r, "event.action", "") == "canary_rollback"]
    assert record.levelno == logging.WARNING
    assert getattr(record, "imrelay.canary.rule") == "next"
    assert "error rate 50.0% vs baseline 0.0%" in record.getMessage()
    (entry,) = audit.records
    assert entry["action"] == "canary_rollback"
    assert entry["args"] == "next"
    assert entry["sender_id"] == "imrelay"
    assert entry["detail"].startswith("qwen-next: error rate 50.0%")
    serve(metrics, "qwen-next", failed=50)
    clock.now += 600
    assert await controller.tick() == []  # rolled back: no longer evaluated
    assert len(audit.records) == 1  # its own decision is not reported again on reload

    # A restart: a new book and controller read the rollback back from the file.
    restarted = CanaryBook(CanaryStateFile(tmp_path / "db.canary.json"))
    fresh = CanaryController(routing(), restarted, metrics, audit=audit, clock=clock)
    assert await fresh.tick() == []
    assert restarted.status("next", "qwen-next") == "rolled_back"
    assert len(audit.records) == 1


async def test_canary_controller_waits_for_enough_requests(
    tmp_path: Path, metrics: Metrics
) -> None:
    """Below min_requests the window grows; the wait is noted once per window."""
    clock = Clock()
    store = CanaryStateFile(tmp_path / "s.json")
    controller = CanaryController(routing(), CanaryBook(store), metrics, clock=clock)
    await controller.tick()
    serve(metrics, "qwen-next", failed=6)
    clock.now += 60
    ((_, first),) = await controller.tick()
    assert first.verdict == "wait"
    noted = store.read().evaluations["next"]["at"]
    clock.now += 2
    ((_, again),) = await controller.tick()
    assert again.verdict == "wait"
    assert store.read().evaluations["next"]["at"] == noted  # not rewritten every tick
    serve(metrics, "qwen-next", failed=6)  # 12 failures since the window started
    clock.now += 2
    ((_, last),) = await controller.tick()
    assert last.verdict == "rollback"
    assert last.candidate.requests == 12
    clock.now += 60
    assert await controller.tick() == []


async def test_canary_controller_reports_decisions_made_elsewhere(
    tmp_path: Path, metrics: Metrics
) -> None:
    """A promotion or reset written by the CLI is audited by the gateway that notices it."""
    clock, audit = Clock(), RecordingAudit()
    store = CanaryStateFile(tmp_path / "s.json")
    book = CanaryBook(store)
    controller = CanaryController(routing(), book, metrics, audit=audit, clock=clock)
    await controller.tick()
    store.decide("next", CanaryDecision("qwen-next", "promoted", EPOCH, "cli:ops", "looks good"))
    await controller.tick()
    assert book.status("next", "qwen-next") == "promoted"
    store.decide("next", CanaryDecision("qwen-next", "active", EPOCH, "cli:ops", "again"))
    await controller.tick()
    store.decide("next", None)  # forgetting a decision is not an action to report
    await controller.tick()
    assert [(r["action"], r["sender_id"], r["detail"]) for r in audit.records] == [
        ("canary_promote", "cli:ops", "qwen-next: looks good"),
        ("canary_reset", "cli:ops", "qwen-next: again"),
    ]


async def test_canary_controller_audit_failure_is_logged(
    tmp_path: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """An audit write that fails does not undo or stop the rollback."""
    clock, audit = Clock(), RecordingAudit()
    audit.error = StoreError("disk full")
    book = CanaryBook(CanaryStateFile(tmp_path / "s.json"))
    controller = CanaryController(routing(), book, metrics, audit=audit, clock=clock)
    await controller.tick()
    serve(metrics, "qwen-next", failed=10)
    clock.now += 60
    with caplog.at_level(logging.ERROR, logger="imrelay.routing.canary"):
        await controller.tick()
    assert book.status("next", "qwen-next") == "rolled_back"
    assert "canary decision could not be audited: disk full" in caplog.text


async def test_canary_controller_rollback_applies_even_if_the_file_cannot_be_written(
    tmp_path: Path, metrics: Metrics
) -> None:
    """The router stops sending traffic to a failing candidate even when the write fails."""
    clock, audit = Clock(), RecordingAudit()
    (tmp_path / "s.json.lock").mkdir()  # the lock file cannot be opened: no write is possible
    book = CanaryBook(CanaryStateFile(tmp_path / "s.json"))
    controller = CanaryController(routing(), book, metrics, audit=audit, clock=clock)
    await controller.tick()
    serve(metrics, "qwen-next", failed=10)
    clock.now += 60
    with pytest.raises(StoreError):
        await controller.tick()
    assert book.status("next", "qwen-next") == "rolled_back"
    assert [r["action"] for r in audit.records] == ["canary_rollback"]


async def test_canary_controller_run_survives_errors(
    tmp_path: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """``run`` keeps ticking after a failed tick (here: a damaged decisions file)."""
    path = tmp_path / "s.json"
    path.write_text("damaged", encoding="utf-8")
    book = CanaryBook(CanaryStateFile(path))
    controller = CanaryController(routing(window_s=0.01), book, metrics, poll_s=5.0)
    assert controller.poll_s == 0.01  # never slower than the shortest window
    task = asyncio.create_task(controller.run())
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while caplog.text.count("canary evaluation failed") < 2:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_canary_controller_without_canaries_polls_at_the_default(metrics: Metrics) -> None:
    """Rules without a canary are not evaluated."""
    data = {"models": {"qwen": {"type": "echo"}}, "routing": {"default": "qwen"}}
    plain = Settings.model_validate(data).routing
    controller = CanaryController(plain, CanaryBook(CanaryStateFile(None)), metrics, poll_s=3)
    assert (controller.canaries, controller.poll_s) == ([], 3)


async def test_canary_rollback_lands_in_the_real_audit_log(
    tmp_path: Path, metrics: Metrics
) -> None:
    """With the real audit log, the rollback is an ``admin`` record in the hash chain."""
    clock = Clock()
    async with AuditLog(tmp_path / "audit.db", clock=clock) as audit:
        book = CanaryBook(CanaryStateFile(tmp_path / "s.json"))
        controller = CanaryController(routing(), book, metrics, audit=audit, clock=clock)
        await controller.tick()
        serve(metrics, "qwen-next", failed=10)
        clock.now += 60
        await controller.tick()
        assert (await audit.verify()).ok
    (record,) = read_sqlite(tmp_path / "audit.db")
    assert record["kind"] == "admin"
    fields = json.loads(record["fields"])
    assert (fields["action"], fields["args"], fields["outcome"]) == (
        "canary_rollback",
        "next",
        "ok",
    )
    assert fields["sender"] == "imrelay"
