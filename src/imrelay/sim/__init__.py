"""Simulators shipped with imrelay: IM platforms and an OpenAI-compatible model.

They let a person try imrelay with no IM account and no GPU, let the test suite run without
the network, and let benchmarks load the gateway without a real platform throttling them.
"""

from __future__ import annotations

__all__: list[str] = []
