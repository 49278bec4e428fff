"""Platform connectors: one package per IM platform, the same files in each."""

from __future__ import annotations

__all__: list[str] = []
