"""Metrics for operations: backlog age, process limits, gateway overhead, naming rules."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from _support import wait_for
from imrelay.app import Gateway, core_share
from imrelay.message import Conversation, InboundMessage, Sender
from imrelay.observability.metrics import (
    LATENCY_BUCKETS,
    STAGE_BUCKETS,
    CounterChildren,
    FastHistogram,
    Metrics,
    ProcessLimits,
    ProcessLimitsCollector,
    read_process_limits,
)
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator
from imrelay.stores.base import MessageState
from imrelay.stores.memory import MemoryStore
from imrelay.worker import Worker

EPOCH = 1_700_000_000.0
GIB = 1024**3


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class _HeldRunner:
    """Stands in for the Runner: each message waits until the test releases it."""

    def __init__(self) -> None:
        self.release: dict[str, asyncio.Event] = {}

    async def handle(self, message: InboundMessage, *, resumed: bool = False) -> MessageState:
        event = self.release.setdefault(message.message_id, asyncio.Event())
        await event.wait()
        return MessageState.REPLIED

    def let_go(self, message_id: str) -> None:
        self.release.setdefault(message_id, asyncio.Event()).set()


def _message(message_id: str, conversation: str, received_at: float) -> InboundMessage:
    return InboundMessage(
        platform="dingtalk",
        message_id=message_id,
        conversation=Conversation(id=conversation, kind="direct"),
        sender=Sender(id="staff-1"),
        kind="text",
        text="hi",
        received_at=received_at,
        mentions_bot=True,
    )


async def test_metrics_oldest_age_follows_the_oldest_unfinished_message() -> None:
    """The oldest-age gauge is computed at scrape time from the worker's unfinished messages."""
    metrics = Metrics(CollectorRegistry(), process=False)
    clock = _Clock(EPOCH + 30)
    runner = _HeldRunner()
    async with MemoryStore(clock=clock) as store:
        worker = Worker(store, runner, metrics, wall_clock=clock)  # type: ignore[arg-type]

        def age() -> float | None:
            return metrics.registry.get_sample_value("imrelay_inbox_oldest_age_seconds")

        try:
            assert age() == 0
            await worker.offer(_message("m1", "conv-a", EPOCH))
            await worker.offer(_message("m2", "conv-b", EPOCH + 20))
            await worker.offer(_message("m3", "conv-a", EPOCH + 25))
            assert age() == 30
            runner.let_go("m1")  # conv-a moves on to m3; conv-b's m2 is now the oldest
            await wait_for(lambda: worker.pending == 2, timeout=3, what="m1 finished")
            assert age() == 10
            clock.now += 5
            assert age() == 15
            runner.let_go("m2")
            runner.let_go("m3")
            await wait_for(lambda: worker.pending == 0, timeout=3, what="all finished")
            assert age() == 0
        finally:
            await worker.aclose()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("files", "self_cgroup", "expected"),
    [
        # cgroup v2, limits on the process's own group (nested path from /proc/self/cgroup)
        (
            {"kubepods/pod1/memory.max": "536870912\n", "kubepods/pod1/cpu.max": "50000 100000"},
            "0::/kubepods/pod1\n",
            ProcessLimits(memory_bytes=512 * 1024**2, cpu_cores=0.5),
        ),
        # cgroup v2 inside a cgroup namespace: the root is the process's group
        (
            {"memory.max": "1073741824", "cpu.max": "150000 100000"},
            "0::/\n",
            ProcessLimits(memory_bytes=GIB, cpu_cores=1.5),
        ),
        # cgroup v2 without limits: the machine's
        ({"memory.max": "max", "cpu.max": "max 100000"}, "0::/\n", ProcessLimits(8 * GIB, 4)),
        # cgroup v1
        (
            {
                "memory/docker/abc/memory.limit_in_bytes": "2147483648",
                "cpu/docker/abc/cpu.cfs_quota_us": "200000",
                "cpu/docker/abc/cpu.cfs_period_us": "100000",
            },
            "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n",
            ProcessLimits(memory_bytes=2 * GIB, cpu_cores=2.0),
        ),
        # cgroup v1 without limits
        (
            {
                "memory/memory.limit_in_bytes": "9223372036854771712",
                "cpu/cpu.cfs_quota_us": "-1",
                "cpu/cpu.cfs_period_us": "100000",
            },
            "4:memory:/\n1:cpu,cpuacct:/\n",
            ProcessLimits(8 * GIB, 4),
        ),
        # a limit above the machine's resources is the machine's
        ({"memory.max": str(64 * GIB), "cpu.max": "800000 100000"}, "", ProcessLimits(8 * GIB, 4)),
        # no cgroup file system at all
        ({}, "", ProcessLimits(8 * GIB, 4)),
    ],
)
def test_metrics_process_limits_read_cgroups(
    tmp_path: Path, files: dict[str, str], self_cgroup: str, expected: ProcessLimits
) -> None:
    """Memory and CPU limits come from cgroup v2 or v1, else from the machine."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for rel, text in files.items():
        _write(root / rel, text)
    _write(tmp_path / "self_cgroup", self_cgroup)
    limits = read_process_limits(
        cgroup_root=root, self_cgroup=tmp_path / "self_cgroup", physical_memory=8 * GIB, cpus=4
    )
    assert limits == expected


def test_metrics_process_limits_collector_exports_both_gauges() -> None:
    """The collector reads the limits at each scrape and exports them as two gauges."""
    registry = CollectorRegistry()
    reads: list[int] = []

    def read() -> ProcessLimits:
        reads.append(1)
        return ProcessLimits(memory_bytes=GIB * len(reads), cpu_cores=0.5)

    registry.register(ProcessLimitsCollector(read))
    first = registry.get_sample_value("imrelay_process_memory_limit_bytes")
    second = registry.get_sample_value("imrelay_process_memory_limit_bytes")
    assert (first, second) == (GIB, 2 * GIB)
    assert registry.get_sample_value("imrelay_process_cpu_limit_cores") == 0.5


def test_metrics_process_limits_default_reads_this_machine() -> None:
    """Without injected paths the limits are read from this machine and are positive."""
    limits = read_process_limits()
    assert limits.memory_bytes > 64 * 1024**2
    assert limits.cpu_cores > 0


def test_metrics_labels_never_identify_people() -> None:
    """Every imrelay metric is prefixed, and no label could carry a user or chat id."""
    metrics = Metrics(CollectorRegistry(), process=False)
    kinds = (MetricWrapperBase, FastHistogram)
    wrappers: list[Any] = [v for v in vars(metrics).values() if isinstance(v, kinds)]
    assert len(wrappers) >= 20
    assert sum(isinstance(w, FastHistogram) for w in wrappers) == 5
    for metric in wrappers:
        assert metric._name.startswith("imrelay_"), metric._name
        for label in metric._labelnames:
            for word in ("user", "sender", "conversation", "chat", "staff", "id", "text"):
                assert word not in label, (metric._name, label)


def test_fast_histogram_exposes_what_prometheus_client_does() -> None:
    """Same observations, same exposition (bounds, cumulative counts, +Inf, count, sum), but
    for prometheus_client's ``_created`` series."""
    values = [0.0, 0.00005, 0.0001, 0.00011, 0.003, 0.0025, 1.0, 59.9, 60.0, 61.0, 1e9]
    reference, fast = CollectorRegistry(), CollectorRegistry()
    slow = Histogram("t_seconds", "help", ["stage"], buckets=STAGE_BUCKETS, registry=reference)
    mine = FastHistogram("t_seconds", "help", ["stage"], buckets=STAGE_BUCKETS, registry=fast)
    for i, value in enumerate(values):
        for h in (slow, mine):
            h.labels("a" if i % 3 else "b").observe(value)
    mine.labels("unused")  # a child never observed: zeros, like prometheus_client's
    slow.labels("unused")

    def exposition(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return sorted(line for line in text.splitlines() if "_created" not in line)

    assert exposition(fast) == exposition(reference)
    assert 'le="0.0001"' in generate_latest(fast).decode()


def test_fast_histogram_refuses_bad_buckets_and_labels() -> None:
    """Buckets must be finite, not negative, distinct and ascending; a child needs every
    label value."""
    for buckets in ((), (1.0, 0.5), (0.5, 0.5), (1.0, float("inf")), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="buckets"):
            FastHistogram("x", "h", ["a"], buckets=buckets, registry=CollectorRegistry())
    h = FastHistogram("x", "h", ["a", "b"], buckets=(1.0,), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="expected 2 label values"):
        h.labels("only-one")
    assert h.labels("1", "2") is h.labels("1", "2")


def test_counter_children_count_into_the_labelled_series() -> None:
    """A remembered child is the counter's own: what it counts is what ``labels()`` reads."""
    metrics = Metrics(CollectorRegistry(), process=False)
    received = CounterChildren(metrics.messages_received)
    received("dingtalk", "text").inc()
    received("dingtalk", "text").inc(2)
    received("dingtalk", "picture").inc()
    assert received("dingtalk", "text") is metrics.messages_received.labels("dingtalk", "text")
    value = metrics.registry.get_sample_value(
        "imrelay_messages_received_total", {"platform": "dingtalk", "kind": "text"}
    )
    assert value == 3


def test_metrics_latency_buckets_resolve_the_500ms_slo() -> None:
    """The latency buckets have 0.5 s as an edge and fine resolution below one second."""
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    assert 0.5 in LATENCY_BUCKETS
    assert len([b for b in LATENCY_BUCKETS if b <= 1.0]) >= 10
    assert LATENCY_BUCKETS[-1] >= 60


async def _scrape(gateway: Gateway) -> dict[str, list[Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{gateway.port}/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


async def test_metrics_gateway_exposes_process_and_backlog_metrics(gateway: Gateway) -> None:
    """/metrics carries process CPU and memory, their limits and the backlog gauges."""
    samples = await _scrape(gateway)
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "imrelay_process_memory_limit_bytes",
        "imrelay_process_cpu_limit_cores",
    ):
        assert samples[name][0].value > 0, name
    assert samples["imrelay_inbox_oldest_age_seconds"][0].value == 0
    assert samples["imrelay_inbox_depth"][0].value == 0


async def test_metrics_gateway_overhead_excludes_model_time(
    gateway: Gateway, dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator
) -> None:
    """With a 300 ms model, the overhead histogram holds the latency minus the model's time."""
    model_sim.set_behaviour(latency_ms=300)
    ids = await dingtalk_sim.send_message("how slow?")
    await wait_for(lambda: len(dingtalk_sim.replies(ids["msg_id"])) == 1, what="the reply")

    def value(samples: dict[str, list[Any]], name: str) -> float:
        return sum(s.value for s in samples.get(name, []))

    async def observed() -> bool:
        samples = await _scrape(gateway)
        return value(samples, "imrelay_gateway_overhead_seconds_count") == 1

    await wait_for(observed, timeout=5, what="the overhead observation")
    samples = await _scrape(gateway)
    total = value(samples, "imrelay_message_processing_latency_seconds_sum")
    model = value(samples, "imrelay_model_latency_seconds_sum")
    overhead = value(samples, "imrelay_gateway_overhead_seconds_sum")
    assert model >= 0.3
    assert total >= model
    assert 0 <= overhead <= total - 0.29
    assert overhead == pytest.approx(total - model, abs=0.05)


def test_core_share_is_the_quota_under_one_core_and_one_otherwise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the adaptive limit measures saturation against; a limit that cannot be read
    never keeps the gateway from starting."""

    def limits(cores: float) -> ProcessLimits:
        return ProcessLimits(memory_bytes=1e9, cpu_cores=cores)

    assert core_share(lambda: limits(0.5)) == 0.5
    assert core_share(lambda: limits(4.0)) == 1.0
    assert core_share(lambda: limits(float("nan"))) == 1.0
    assert core_share(lambda: limits(0.0)) == 1.0

    def unreadable() -> ProcessLimits:
        raise ZeroDivisionError("float division by zero")

    with caplog.at_level(logging.WARNING, logger="imrelay.app"):
        assert core_share(unreadable) == 1.0
    assert "assuming one core" in caplog.text
