"""The benchmark's arithmetic: message mix, percentiles and the figures of a ledger."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from imrelay.bench.load import build_message, parse_mix, token_number
from imrelay.bench.stats import Ledger, Sent, percentile, summarize


def sent(n: int, conversation: int = 0, k: int | None = None, **extra: Any) -> Sent:
    """A message sent at ``100 + n`` seconds, due 1 ms earlier."""
    return Sent(
        n=n,
        conversation=conversation,
        k=n if k is None else k,
        kind=extra.pop("kind", "text"),
        due=100.0 + n - 0.001,
        msg_id=f"m{n}",
        sent_at=100.0 + n,
        **extra,
    )


def reply(seq: int, msg_id: str | None, at: float, text: str) -> dict[str, Any]:
    """A ``GET /_sim/replies`` item with a markdown body."""
    return {
        "seq": seq,
        "msg_id": msg_id,
        "received_at": at,
        "body": {"msgtype": "markdown", "markdown": {"title": "t", "text": text}},
    }


def test_mix_parse_normalizes_weights() -> None:
    """Weights become shares summing to 1; zero weights are dropped."""
    mix = parse_mix("text=3, long=1,code=0")
    assert mix.shares == (("text", 0.75), ("long", 0.25))
    assert mix.describe() == "text=75,long=25"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("text=1,video=1", "unknown kind 'video'"),
        ("text", "expected kind=weight"),
        ("text=lots", "not a number"),
        ("text=-1", "non-negative"),
        ("text=0", "at least one weight"),
    ],
)
def test_mix_parse_rejects_bad_specs(spec: str, message: str) -> None:
    """A malformed mix is refused with a message naming the problem."""
    with pytest.raises(ValueError, match=message):
        parse_mix(spec)


def test_mix_kind_of_spreads_shares_evenly() -> None:
    """Over 1,000 messages each kind's count is within 1% of its share."""
    mix = parse_mix("text=70,picture=10,long=10,code=10")
    counts = Counter(mix.kind_of(n) for n in range(1000))
    assert abs(counts["text"] - 700) <= 10
    for kind in ("picture", "long", "code"):
        assert abs(counts[kind] - 100) <= 10


def test_build_message_carries_its_token() -> None:
    """Each text kind starts with the token; a picture has no text; the chat is 1:1."""
    for kind in ("text", "long", "code"):
        body = build_message(42, 7, 3, kind)
        assert body["text"].startswith("b42 c7 k3 ")
        assert token_number("echo: " + body["text"]) == 42
        assert body["conversation_type"] == "1"
        assert body["conversation_id"] == "cidBench000007"
    assert build_message(1, 0, 0, "picture")["msgtype"] == "picture"
    assert len(build_message(1, 0, 0, "long")["text"]) > 1500
    assert token_number("no token here") is None


def test_percentile_nearest_rank() -> None:
    """P50 of 1..10 is 5, P99 is 10, P0 the minimum; empty input has no percentile."""
    values = [float(v) for v in range(10, 0, -1)]
    assert percentile(values, 50) == 5.0
    assert percentile(values, 99) == 10.0
    assert percentile(values, 0) == 1.0
    assert percentile([], 50) is None


def test_summarize_counts_lost_doubled_and_out_of_order() -> None:
    """A missing reply is lost, a repeated text doubled, an overtaking reply out of order."""
    ledger = Ledger()
    messages = [sent(0, k=0), sent(1, k=1), sent(2, k=2), sent(3, conversation=1, k=0)]
    for m in messages:
        ledger.add_sent(m)
    ledger.add_reply(reply(1, "m1", 101.05, "echo: b1 c0 k1"))  # overtakes m0
    ledger.add_reply(reply(2, "m0", 100.10, "echo: b0 c0 k0"))
    ledger.add_reply(reply(3, "m3", 103.02, "echo: b3 c1 k0"))
    ledger.add_reply(reply(4, "m3", 103.50, "echo: b3 c1 k0"))  # the same text again
    figures = summarize(ledger, messages)
    assert figures["messages_sent"] == 4
    assert figures["messages_answered"] == 3
    assert figures["lost"] == 1
    assert figures["lost_msg_ids"] == ["m2"]
    assert figures["doubled"] == 1
    assert figures["out_of_order"] == 1
    assert figures["latency_ms"]["p50"] == pytest.approx(50.0)
    assert figures["latency_ms"]["max"] == pytest.approx(100.0)
    assert ledger.backlog == 1


def test_summarize_split_reply_is_not_doubled() -> None:
    """A reply in two different parts is answered once; latency runs to the last part."""
    ledger = Ledger()
    m = sent(0)
    ledger.add_sent(m)
    ledger.add_reply(reply(1, "m0", 100.2, "part one"))
    ledger.add_reply(reply(2, "m0", 100.3, "part two"))
    figures = summarize(ledger, [m])
    assert figures["doubled"] == 0
    assert figures["reply_parts"] == 2
    assert figures["latency_ms"]["p50"] == pytest.approx(300.0)


def test_summarize_overhead_subtracts_model_time() -> None:
    """Overhead is end-to-end minus the model's time, summed over retries; pictures count 0."""
    ledger = Ledger()
    text, picture, unknown = sent(0), sent(1, kind="picture"), sent(2)
    for m in (text, picture, unknown):
        ledger.add_sent(m)
    ledger.add_timing({"seq": 1, "model_time_ms": 150.0, "text": "b0 c0 k0 hello"})
    ledger.add_timing({"seq": 2, "model_time_ms": 50.0, "text": "b0 c0 k0 hello"})
    ledger.add_reply(reply(1, "m0", 100.25, "echo: b0 c0 k0 hello"))
    ledger.add_reply(reply(2, "m1", 101.01, "sorry"))
    ledger.add_reply(reply(3, "m2", 102.5, "echo: b2 c0 k2"))
    figures = summarize(ledger, [text, picture, unknown])
    assert figures["overhead_samples"] == 2  # the third has no model record
    assert figures["overhead_ms"]["p50"] == pytest.approx(10.0)
    assert figures["overhead_ms"]["max"] == pytest.approx(50.0)
    assert figures["model_ms"]["max"] == pytest.approx(200.0)


def test_ledger_matches_a_reply_collected_before_its_message() -> None:
    """A reply polled before its batch answer is matched once the message is recorded."""
    ledger = Ledger()
    ledger.add_reply(reply(1, "m5", 105.1, "echo: b5 c0 k5"))
    assert ledger.unmatched
    ledger.add_sent(sent(5))
    ledger.rematch()
    assert ledger.unmatched == []
    assert ledger.answered == 1


def test_ledger_matches_by_token_without_msg_id() -> None:
    """A reply sent without a msgId (OpenAPI) is matched by the token in its text."""
    ledger = Ledger()
    ledger.add_sent(sent(9))
    ledger.add_reply(reply(1, None, 109.1, "echo: b9 c0 k9 (turns: 1)"))
    ledger.add_reply(reply(2, None, 109.2, "nobody's"))
    assert ledger.answered == 1
    assert len(ledger.unmatched) == 1


def test_summarize_refused_webhook_is_not_lost() -> None:
    """A webhook the gateway refused is counted as refused, not lost, and owes no reply."""
    ledger = Ledger()
    taken = sent(0, webhook_status=200, webhook_ms=3.0)
    refused = sent(1, webhook_status=503, webhook_ms=1.0)
    ledger.add_sent(taken)
    ledger.add_sent(refused)
    assert ledger.backlog == 1
    ledger.add_reply(reply(1, "m0", 100.1, "echo: b0 c0 k0"))
    figures = summarize(ledger, [taken, refused])
    assert figures["lost"] == 0
    assert figures["messages_answered"] == 1
    assert figures["webhook"]["accepted"] == 1
    assert figures["webhook"]["refused"] == 1
    assert figures["webhook"]["response_ms"]["max"] == pytest.approx(3.0)
    assert ledger.backlog == 0
