"""Routing: the rule engine, code detection, canary rollout, token counting, reasoning blocks.

- :mod:`imrelay.routing.rules`: :class:`Router` picks the model of a message;
- :mod:`imrelay.routing.code`: does a text hold code;
- :mod:`imrelay.routing.canary`: canary buckets, decisions and their automatic evaluation;
- :mod:`imrelay.routing.tokens`: token counters for the context budget;
- :mod:`imrelay.routing.think`: removing ``<think>`` blocks from answers.
"""

from __future__ import annotations

__all__: list[str] = []
