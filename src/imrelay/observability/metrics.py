"""Prometheus metrics, on an explicit registry (never the global default one).

Names follow ``imrelay_<thing>_<unit>[_total]``; labels come from closed sets only (platform
name from config, message kind, stage, model name from config, outcome, reason) and never carry a
user or conversation id.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = [
    "LATENCY_BUCKETS",
    "STAGE_BUCKETS",
    "CounterChildren",
    "FastHistogram",
    "HistogramChild",
    "Metrics",
    "ProcessLimits",
    "ProcessLimitsCollector",
    "read_process_limits",
]

_le = cast(
    Callable[[float], str], floatToGoString
)  # a bucket bound as prometheus_client writes it

# Fine resolution below one second for a 500 ms processing SLO, then coarse up to model timeouts.
LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0,
    1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Stages other than the model call are expected to take micro- to milliseconds.
STAGE_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class HistogramChild:
    """One label set's buckets: an observation is a bisect and two additions."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); the last: +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose upper bound is at least ``amount``."""
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class FastHistogram(Collector):
    """A labelled histogram for the event loop's hot path, exposed like prometheus_client's.

    A message makes about twenty observations (one per pipeline stage, and the message's own
    latencies). prometheus_client's ``observe`` takes a lock for the sum and for the bucket and
    walks the bounds in Python: 0.66 µs; this one is a bisect and two additions: 0.11 µs. It
    is meant for one thread (the event loop): observations made from several threads at once
    could lose a count. The exposition is the same ``_bucket``/``_count``/``_sum`` series,
    without ``_created``.

    Args:
        name: the metric name.
        documentation: its help text.
        labelnames: its label names.
        buckets: the upper bounds, ascending, from 0 up (``+Inf`` is added).
        registry: where it is registered.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        *,
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if (
            not bounds
            or list(bounds) != sorted(set(bounds))
            or bounds[0] < 0  # the exposition would lose _count and _sum (prometheus_client)
            or bounds[-1] == float("inf")
        ):
            raise ValueError("buckets must be finite, not negative, distinct and ascending")
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = bounds
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        """The child of one label set (created at first use)."""
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected {len(self._labelnames)} label values")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, HistogramChild(self._bounds))
        return child

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            counts = list(child.counts)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip((*self._bounds, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            family.add_metric(list(key), buckets, child.sum)
        yield family


class CounterChildren:
    """``counter.labels(*values)``, remembered per label set.

    ``labels()`` takes a lock and checks its arguments on every call (~1.5 µs); the per-message
    counters are looked up here instead. Label values come from closed sets (see the module
    docstring), so the cache stays small.
    """

    __slots__ = ("_children", "_counter")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[tuple[str, ...], Counter] = {}

    def __call__(self, *values: str) -> Counter:
        """The child of ``values``."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._counter.labels(*values)
        return child


class Metrics:
    """Every metric imrelay exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            r.register(ProcessLimitsCollector())
        self.messages_received = Counter(
            "imrelay_messages_received_total",
            "Messages accepted from a platform (after deduplication).",
            ["platform", "kind"],
            registry=r,
        )
        self.messages_duplicate = Counter(
            "imrelay_messages_duplicate_total",
            "Redelivered messages recognised and ignored.",
            ["platform"],
            registry=r,
        )
        self.messages_rejected = Counter(
            "imrelay_messages_rejected_total",
            "Frames or requests rejected before they reached the inbox.",
            ["platform", "reason"],
            registry=r,
        )
        self.replies = Counter(
            "imrelay_replies_total",
            "Reply parts by outcome (sent, failed, skipped = already sent before a restart).",
            ["platform", "outcome"],
            registry=r,
        )
        self.messages_dropped = Counter(
            "imrelay_messages_dropped_total",
            "Messages the pipeline decided not to answer with a model, by reason.",
            ["platform", "reason"],
            registry=r,
        )
        self.messages_failed = Counter(
            "imrelay_messages_failed_total",
            "Messages whose processing failed, by reason.",
            ["platform", "reason"],
            registry=r,
        )
        self.processing_latency = FastHistogram(
            "imrelay_message_processing_latency_seconds",
            "Receipt of a message to its last reply part accepted by the platform.",
            ["platform"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gateway_overhead = FastHistogram(
            "imrelay_gateway_overhead_seconds",
            "Processing latency minus model time: what imrelay itself adds (queueing, stages, "
            "sending).",
            ["platform"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = FastHistogram(
            "imrelay_stage_latency_seconds",
            "Time spent in each pipeline stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.model_latency = FastHistogram(
            "imrelay_model_latency_seconds",
            "Model call duration, request to last token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_first_token = FastHistogram(
            "imrelay_model_first_token_seconds",
            "Model call duration, request to first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_requests = Counter(
            "imrelay_model_requests_total",
            "Model calls by outcome (ok, timeout, unavailable, error).",
            ["model", "outcome"],
            registry=r,
        )
        self.route_decisions = Counter(
            "imrelay_route_decisions_total",
            "Routing decisions by model, deciding step (pin, rule <name>, by_kind.<kind>, "
            "default) and canary arm (candidate, baseline, none).",
            ["model", "rule", "canary"],
            registry=r,
        )
        self.model_fallbacks = Counter(
            "imrelay_model_fallbacks_total",
            "Requests a model failed and handed to the next model of its fallback chain.",
            ["model", "to"],
            registry=r,
        )
        self.model_tokens = Counter(
            "imrelay_model_tokens_total",
            "Tokens reported by models, by direction (prompt, completion).",
            ["model", "direction"],
            registry=r,
        )
        self.connection_up = Gauge(
            "imrelay_connection_up",
            "1 while a platform's long connection is open and healthy.",
            ["platform"],
            registry=r,
        )
        self.reconnects = Counter(
            "imrelay_reconnects_total",
            "Long-connection reconnections, by reason.",
            ["platform", "reason"],
            registry=r,
        )
        self.platform_throttled = Counter(
            "imrelay_platform_throttled_total",
            "Sends that had to wait for a rate limit, by scope (conversation, app: imrelay's own "
            "token buckets; platform: the platform answered with a throttling error).",
            ["platform", "scope"],
            registry=r,
        )
        self.inflight = Gauge(
            "imrelay_messages_inflight",
            "Messages taken by the worker and not finished yet.",
            registry=r,
        )
        self.inbox_depth = Gauge(
            "imrelay_inbox_depth",
            "Messages accepted but not finished yet (queued and in flight).",
            registry=r,
        )
        self.concurrency_limit = Gauge(
            "imrelay_pipeline_concurrency_limit",
            "Messages the worker may process at once now: pipeline.max_concurrency, lowered "
            "while the event loop lags (pipeline.loop_lag_target_ms).",
            registry=r,
        )
        self.loop_lag = Gauge(
            "imrelay_event_loop_lag_seconds",
            "How late the event loop ran the worker's last lag probe (0 with the probe off).",
            registry=r,
        )
        # the worker makes this a callback (Gauge.set_function), computed at scrape time
        self.inbox_oldest_age = Gauge(
            "imrelay_inbox_oldest_age_seconds",
            "Age of the oldest message accepted and not finished yet (0 when there is none).",
            registry=r,
        )
        self.sensitive_matches = Counter(
            "imrelay_sensitive_matches_total",
            "Sensitive-word matches, by category (from the word lists), direction (inbound, "
            "outbound) and action (block, mask, flag, withhold).",
            ["category", "direction", "action"],
            registry=r,
        )
        self.pii_masked = Counter(
            "imrelay_pii_masked_total",
            "Personal data entities masked before the text reached a model, by entity type.",
            ["type"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """Return the exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# Above this a cgroup v1 memory limit means "no limit" (the kernel reports ~2**63 rounded down).
_V1_UNLIMITED: Final = 2**62


@dataclass(frozen=True, slots=True)
class ProcessLimits:
    """What the process may use: the denominators of the CPU and memory alerts.

    Attributes:
        memory_bytes: the cgroup memory limit, or the machine's RAM when there is none (or
            when it is larger than the RAM).
        cpu_cores: the cgroup CPU quota in cores, or the CPUs the process may run on.
    """

    memory_bytes: float
    cpu_cores: float


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(root: Path, self_cgroup: Path, controller: str | None) -> list[Path]:
    """The process's own cgroup directory (for ``controller``, None: v2) first, then ``root``."""
    dirs: list[Path] = []
    for line in (_read(self_cgroup) or "").splitlines():
        _, _, rest = line.partition(":")
        names, _, rel = rest.partition(":")
        wanted = names == "" if controller is None else controller in names.split(",")
        if wanted and rel.strip("/"):
            base = root if controller is None else root / controller
            dirs.append(base / rel.strip("/"))
    dirs.append(root if controller is None else root / controller)
    return dirs


def _cgroup_memory(root: Path, self_cgroup: Path) -> float | None:
    for d in _cgroup_dirs(root, self_cgroup, None):
        value = _read(d / "memory.max")
        if value is not None:
            return None if value == "max" else float(value)
    for d in _cgroup_dirs(root, self_cgroup, "memory"):
        value = _read(d / "memory.limit_in_bytes")
        if value is not None:
            limit = float(value)
            return None if limit >= _V1_UNLIMITED else limit
    return None


def _cgroup_cpu(root: Path, self_cgroup: Path) -> float | None:
    for d in _cgroup_dirs(root, self_cgroup, None):
        value = _read(d / "cpu.max")
        if value is not None:
            quota, _, period = value.partition(" ")
            return None if quota == "max" else float(quota) / float(period or "100000")
    for d in _cgroup_dirs(root, self_cgroup, "cpu"):
        quota_us = _read(d / "cpu.cfs_quota_us")
        period_us = _read(d / "cpu.cfs_period_us")
        if quota_us is not None and period_us is not None:
            return None if int(quota_us) < 0 else float(quota_us) / float(period_us)
    return None


def _physical_memory() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _usable_cpus() -> float:
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only; macOS has none
    if affinity is not None:
        return float(len(affinity(0)))
    return float(os.cpu_count() or 1)


def read_process_limits(
    *,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    self_cgroup: Path = Path("/proc/self/cgroup"),
    physical_memory: float | None = None,
    cpus: float | None = None,
) -> ProcessLimits:
    """Read the memory and CPU limits from cgroup v2 or v1, falling back to the machine's.

    Args:
        cgroup_root: where the cgroup file system is mounted.
        self_cgroup: the process's cgroup membership file.
        physical_memory: the machine's RAM in bytes (default: from ``sysconf``).
        cpus: the CPUs the process may run on (default: its affinity mask).

    Returns:
        The smaller of the cgroup limit and the machine's resources, for each.
    """
    ram = _physical_memory() if physical_memory is None else physical_memory
    cores = _usable_cpus() if cpus is None else cpus
    memory = _cgroup_memory(cgroup_root, self_cgroup)
    quota = _cgroup_cpu(cgroup_root, self_cgroup)
    return ProcessLimits(
        memory_bytes=ram if memory is None else min(memory, ram),
        cpu_cores=cores if quota is None else min(quota, cores),
    )


class ProcessLimitsCollector(Collector):
    """``imrelay_process_memory_limit_bytes`` and ``imrelay_process_cpu_limit_cores``.

    The limits are read at each scrape (a few small files), so a resized container reports its
    new limits.
    """

    def __init__(self, read: Callable[[], ProcessLimits] = read_process_limits) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield both gauges."""
        limits = self.read()
        yield GaugeMetricFamily(
            "imrelay_process_memory_limit_bytes",
            "Memory the process may use: its cgroup limit, else the machine's RAM.",
            value=limits.memory_bytes,
        )
        yield GaugeMetricFamily(
            "imrelay_process_cpu_limit_cores",
            "CPU the process may use, in cores: its cgroup quota, else its CPUs.",
            value=limits.cpu_cores,
        )
