"""Prometheus metrics, on an explicit registry (never the global default one).

Names follow ``imrelay_<thing>_<unit>[_total]``; labels come from closed sets only (platform
name from config, message kind, stage, model name from config, outcome, reason) and never carry a
user or conversation id.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

__all__ = ["LATENCY_BUCKETS", "STAGE_BUCKETS", "Metrics"]

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


class Metrics:
    """Every metric imrelay exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
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
        self.processing_latency = Histogram(
            "imrelay_message_processing_latency_seconds",
            "Receipt of a message to its last reply part accepted by the platform.",
            ["platform"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "imrelay_stage_latency_seconds",
            "Time spent in each pipeline stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.model_latency = Histogram(
            "imrelay_model_latency_seconds",
            "Model call duration, request to last token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_first_token = Histogram(
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

    def render(self) -> tuple[bytes, str]:
        """Return the exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
