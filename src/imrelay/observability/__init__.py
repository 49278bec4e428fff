"""Observability: Prometheus metrics and ECS logging."""

from __future__ import annotations

__all__: list[str] = []
