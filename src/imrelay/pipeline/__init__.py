"""The pipeline: one module per stage, and the runner that times them."""

from __future__ import annotations

__all__: list[str] = []
