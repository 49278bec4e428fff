"""What a benchmark sends: message kinds, their mix, and texts that carry the message's number.

Every text starts with a token ``b<n> c<conversation> k<index>``: ``n`` numbers the message in
the run, ``k`` its place in its conversation. The model simulator echoes the text, so the
token also appears in the model's record of the request and in the reply, which is how both
are matched to the message (see :data:`TOKEN`).

Conversations are 1:1 chats ``cidBench<c>`` with sender ``bench<c>``; message ``n`` goes to
conversation ``n % conversations`` (round-robin), so at rate R each conversation receives one
message every ``conversations / R`` seconds and no conversation queues behind itself unless
the bot is slower than that.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "KINDS",
    "TOKEN",
    "Mix",
    "build_message",
    "conversation_id",
    "parse_mix",
    "token_number",
]

KINDS: Final = ("text", "picture", "long", "code")
TOKEN: Final = re.compile(r"\bb(\d+) c\d+ k\d+\b")

_GOLDEN: Final = (math.sqrt(5) - 1) / 2
_SHORT: Final = (
    "what is the status of the release?",
    "请帮我总结一下今天的会议要点",
    "can you draft a reply to the customer about the delayed shipment?",
    "明天下午三点的评审会议室订好了吗",
    "explain the difference between a process and a thread in two sentences",
    "周报模板发我一下，谢谢",
)
_PARAGRAPH: Final = (
    "The quarterly review covers delivery, reliability and cost. Delivery improved: the "
    "median lead time for a change fell from nine days to four, mostly because reviews now "
    "start within a day. Reliability held steady with two incidents, both caught by alerts "
    "before users noticed. Cost rose slightly with the new staging cluster. "
    "本季度回顾涵盖交付、可靠性和成本三个方面。交付有所改善，可靠性保持稳定。"
)
_LONG: Final = "\n\n".join([_PARAGRAPH] * 6)
_CODE: Final = (
    "why does this fail on an empty list?\n\n"
    "```python\n"
    "def average(values):\n"
    "    total = 0\n"
    "    for value in values:\n"
    "        total += value\n"
    "    return total / len(values)\n"
    "\n"
    "print(average([]))\n"
    "```\n"
)


@dataclass(frozen=True, slots=True)
class Mix:
    """Shares of message kinds; :meth:`kind_of` spreads them evenly over message numbers.

    Attributes:
        shares: ``(kind, share)`` pairs, shares summing to 1.
    """

    shares: tuple[tuple[str, float], ...]

    def kind_of(self, n: int) -> str:
        """The kind of message ``n`` (deterministic, evenly spread: a golden-ratio sequence)."""
        u = (n * _GOLDEN) % 1.0
        total = 0.0
        for kind, share in self.shares:
            total += share
            if u < total:
                return kind
        return self.shares[-1][0]

    def describe(self) -> str:
        """The mix as ``text=70,long=30`` (percentages)."""
        return ",".join(f"{kind}={share * 100:g}" for kind, share in self.shares)


def parse_mix(spec: str) -> Mix:
    """Parse ``text=70,picture=10,long=10,code=10`` (weights, not necessarily summing to 100).

    Raises:
        ValueError: an unknown kind, a malformed or negative weight, or all weights zero.
    """
    weights: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, raw = part.strip().partition("=")
        if not sep:
            raise ValueError(f"mix: expected kind=weight, got {part.strip()!r}")
        if name not in KINDS:
            raise ValueError(f"mix: unknown kind {name!r} (known: {', '.join(KINDS)})")
        try:
            weight = float(raw)
        except ValueError:
            raise ValueError(f"mix: weight of {name} is not a number: {raw!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"mix: weight of {name} must be a non-negative number")
        weights[name] = weights.get(name, 0.0) + weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("mix: at least one weight must be positive")
    return Mix(tuple((k, w / total) for k, w in weights.items() if w > 0))


def conversation_id(conversation: int) -> str:
    """The DingTalk conversation id of benchmark conversation ``conversation``."""
    return f"cidBench{conversation:06d}"


def build_message(n: int, conversation: int, k: int, kind: str) -> dict[str, Any]:
    """The ``POST /_sim/messages`` body of message ``n``, the ``k``-th of its conversation."""
    body: dict[str, Any] = {
        "conversation_id": conversation_id(conversation),
        "conversation_type": "1",
        "sender_id": f"bench{conversation:06d}",
        "sender_nick": f"Bench {conversation}",
    }
    token = f"b{n} c{conversation} k{k}"
    if kind == "picture":
        return {**body, "msgtype": "picture", "text": ""}
    if kind == "long":
        text = f"{token} {_LONG}"
    elif kind == "code":
        text = f"{token} {_CODE}"
    else:
        text = f"{token} {_SHORT[n % len(_SHORT)]}"
    return {**body, "msgtype": "text", "text": text}


def token_number(text: str) -> int | None:
    """The message number in the first token found in ``text``, if any."""
    match = TOKEN.search(text)
    return int(match.group(1)) if match else None
