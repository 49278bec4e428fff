"""The figures of a run, computed from what was sent and what came back.

Theory of operation: a :class:`Ledger` records every message the simulator handed over
(:class:`Sent`, with the simulator's clock at that moment), every reply the simulator recorded
(its ``received_at`` is the same clock) and every model request the model simulator answered
(its own measured time). :func:`summarize` turns a set of sent messages into the figures:

* **lost**: handed over (in HTTP mode: answered 200 by the gateway), and no reply by the end
  of the run plus the grace period;
* **doubled**: a reply whose text was already received for the same message (a long answer
  split in several parts is not doubled: the parts differ);
* **out of order**: in one conversation, a message whose first reply arrived before the
  first reply to the message sent just before it;
* **end-to-end latency**: the last part of the reply received − message sent, both on the
  DingTalk simulator's clock;
* **overhead**: end-to-end − the model simulator's time for that message (summed over
  attempts when the bot retried); a picture without a model request counts 0 model time;
  a message whose model request was not found is left out of the overhead figures.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imrelay.bench.load import token_number

__all__ = ["Ledger", "Reply", "Sent", "percentile", "summarize"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values`` by nearest rank; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(slots=True)
class Sent:
    """One message the simulator handed over.

    Attributes:
        n: the message number in the run.
        conversation: the conversation number.
        k: the message's place in its conversation.
        kind: ``text``, ``picture``, ``long`` or ``code``.
        due: when the schedule wanted it sent (epoch seconds).
        msg_id: DingTalk's ``msgId``.
        sent_at: the simulator's clock when it handed the message over (epoch seconds).
        webhook_status: HTTP mode only: the gateway's final answer.
        webhook_ms: HTTP mode only: how long the delivery took.
    """

    n: int
    conversation: int
    k: int
    kind: str
    due: float
    msg_id: str
    sent_at: float
    webhook_status: int | None = None
    webhook_ms: float | None = None


@dataclass(slots=True)
class Reply:
    """One reply the simulator recorded."""

    seq: int
    received_at: float
    text: str


def _reply_text(body: Any) -> str:
    if isinstance(body, Mapping):
        kind = body.get("msgtype")
        inner = body.get(kind) if isinstance(kind, str) else None
        if isinstance(inner, Mapping):
            for key in ("text", "content"):
                value = inner.get(key)
                if isinstance(value, str):
                    return value
    return json.dumps(body, ensure_ascii=False, sort_keys=True)


@dataclass
class Ledger:
    """Everything one run sent and received, indexed for :func:`summarize`."""

    sent: dict[str, Sent] = field(default_factory=dict)
    by_number: dict[int, Sent] = field(default_factory=dict)
    replies: dict[str, list[Reply]] = field(default_factory=dict)
    model_ms: dict[int, float] = field(default_factory=dict)
    unmatched: list[Mapping[str, Any]] = field(default_factory=list)
    refused: int = 0

    def add_sent(self, sent: Sent) -> None:
        """Record a message the simulator handed over."""
        self.sent[sent.msg_id] = sent
        self.by_number[sent.n] = sent
        if sent.webhook_status not in (None, 200):
            self.refused += 1

    def add_reply(self, record: Mapping[str, Any]) -> None:
        """Record one ``GET /_sim/replies`` item; match it by ``msg_id``, else by its token.

        A reply can be collected before the answer to the batch that sent its message was
        read; it is kept aside and matched again by :meth:`rematch`.
        """
        if not self._match(record):
            self.unmatched.append(record)

    def rematch(self) -> None:
        """Try again to match the replies that were collected before their message."""
        if self.unmatched:
            self.unmatched = [r for r in self.unmatched if not self._match(r)]

    def _match(self, record: Mapping[str, Any]) -> bool:
        text = _reply_text(record.get("body"))
        msg_id = record.get("msg_id")
        if not (isinstance(msg_id, str) and msg_id in self.sent):
            n = token_number(text)
            owner = self.by_number.get(n) if n is not None else None
            if owner is None:
                return False
            msg_id = owner.msg_id
        reply = Reply(int(record["seq"]), float(record["received_at"]), text)
        self.replies.setdefault(msg_id, []).append(reply)
        return True

    def add_timing(self, record: Mapping[str, Any]) -> None:
        """Record one ``GET /_sim/timings`` item of the model simulator."""
        n = token_number(str(record.get("text", "")))
        if n is not None:
            self.model_ms[n] = self.model_ms.get(n, 0.0) + float(record["model_time_ms"])

    @property
    def answered(self) -> int:
        """How many sent messages have at least one reply."""
        return len(self.replies)

    @property
    def backlog(self) -> int:
        """Messages the bot took (not refused webhooks) without a reply yet."""
        return max(0, len(self.sent) - self.refused - len(self.replies))


def _stats(values: Sequence[float], qs: Iterable[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in qs:
        value = percentile(values, q)
        out[f"p{q:g}"] = None if value is None else round(value, 3)
    out["max"] = round(max(values), 3) if values else None
    return out


def summarize(ledger: Ledger, sents: Sequence[Sent]) -> dict[str, Any]:
    """The figures of the messages ``sents`` (see the module docstring for each one)."""
    latencies: list[float] = []
    overheads: list[float] = []
    models: list[float] = []
    lags: list[float] = []
    lost = doubled = parts = 0
    lost_ids: list[str] = []
    first_seq: dict[str, int] = {}
    last_reply = 0.0
    for s in sents:
        lags.append((s.sent_at - s.due) * 1000.0)
        replies = ledger.replies.get(s.msg_id)
        if not replies:
            # A webhook the gateway refused (after the simulator's retries) was not taken.
            if s.webhook_status is None or s.webhook_status == 200:
                lost += 1
                lost_ids.append(s.msg_id)
            continue
        counts = Counter(r.text for r in replies)
        doubled += sum(c - 1 for c in counts.values())
        parts += len(counts)
        first_seq[s.msg_id] = min(r.seq for r in replies)
        seen: set[str] = set()
        done = 0.0
        for r in sorted(replies, key=lambda r: r.seq):
            if r.text not in seen:
                seen.add(r.text)
                done = r.received_at
        last_reply = max(last_reply, done)
        e2e = (done - s.sent_at) * 1000.0
        latencies.append(e2e)
        model = ledger.model_ms.get(s.n)
        if model is None and s.kind == "picture":
            model = 0.0
        if model is not None:
            models.append(model)
            overheads.append(e2e - model)
    by_conversation: dict[int, list[Sent]] = defaultdict(list)
    for s in sents:
        by_conversation[s.conversation].append(s)
    out_of_order = 0
    for conv in by_conversation.values():
        seqs = [
            first_seq[s.msg_id] for s in sorted(conv, key=lambda s: s.k) if s.msg_id in first_seq
        ]
        out_of_order += sum(1 for a, b in itertools.pairwise(seqs) if b < a)
    answered = len(first_seq)
    first_sent = min((s.sent_at for s in sents), default=0.0)
    last_sent = max((s.sent_at for s in sents), default=0.0)
    span = last_reply - first_sent
    webhook = [s for s in sents if s.webhook_status is not None]
    result: dict[str, Any] = {
        "messages_sent": len(sents),
        "messages_answered": answered,
        "reply_parts": parts,
        "lost": lost,
        "lost_msg_ids": lost_ids[:20],
        "doubled": doubled,
        "out_of_order": out_of_order,
        "send_rate": round((len(sents) - 1) / (last_sent - first_sent), 1)
        if len(sents) > 1 and last_sent > first_sent
        else None,
        "throughput": round(answered / span, 1) if answered and span > 0 else None,
        "latency_ms": _stats(latencies, (50, 95, 99)),
        "overhead_ms": _stats(overheads, (50, 95, 99)),
        "overhead_samples": len(overheads),
        "model_ms": _stats(models, (50, 99)),
        "driver_lag_ms": _stats(lags, (50, 99)),
        "webhook": None,
    }
    if webhook:
        times = [s.webhook_ms for s in webhook if s.webhook_ms is not None]
        result["webhook"] = {
            "accepted": sum(1 for s in webhook if s.webhook_status == 200),
            "refused": sum(1 for s in webhook if s.webhook_status != 200),
            "response_ms": _stats(times, (50, 95, 99)),
        }
    return result
