"""Replicas, retries, first-token timeouts, circuit breakers and fallback chains."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest
from prometheus_client import CollectorRegistry

from imrelay.errors import ModelError, ModelResponseError, ModelTimeout, ModelUnavailable
from imrelay.models.base import ChatMessage, Generation
from imrelay.models.pool import CircuitBreaker, FallbackChain, ModelPool
from imrelay.observability.metrics import Metrics

PROMPT: list[ChatMessage] = [{"role": "user", "content": "hi"}]


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """Records requested sleeps without waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class Scripted:
    """A backend that follows a script: each call pops an outcome.

    An outcome is a list of deltas (success), an exception (raised before any delta), a
    ``("partial", deltas, exc)`` tuple (deltas then the exception), or ``"hang"``.
    """

    def __init__(self, name: str, script: Sequence[object]) -> None:
        self.name = name
        self.script = list(script)
        self.calls = 0
        self.active = 0
        self.peak = 0
        self.closed = False
        self.release = asyncio.Event()

    async def generate(
        self, messages: Sequence[ChatMessage], result: Generation
    ) -> AsyncIterator[str]:
        self.calls += 1
        outcome = self.script.pop(0) if self.script else ["ok"]
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if outcome == "hang":
                await asyncio.Event().wait()
            if outcome == "block":
                await self.release.wait()
                outcome = ["ok"]
            if isinstance(outcome, BaseException):
                raise outcome
            if isinstance(outcome, tuple):
                _, deltas, exc = outcome
                for d in deltas:
                    result.text += d
                    yield d
                raise exc
            assert isinstance(outcome, list)
            for d in outcome:
                result.text += d
                yield d
        finally:
            self.active -= 1

    async def probe(self) -> str:
        if self.script and isinstance(self.script[0], ModelError):
            raise self.script.pop(0)  # type: ignore[misc]
        return f"{self.name} ok"

    async def aclose(self) -> None:
        self.closed = True


def retryable(msg: str = "down") -> ModelUnavailable:
    return ModelUnavailable(msg, backend="x", retryable=True)


def permanent(msg: str = "bad request") -> ModelResponseError:
    return ModelResponseError(msg, backend="x", retryable=False)


async def collect(backend: ModelPool | FallbackChain) -> tuple[str, Generation]:
    result = Generation()
    text = "".join([d async for d in backend.generate(PROMPT, result)])
    return text, result


def pool(*replicas: Scripted, **kw: object) -> tuple[ModelPool, Clock, Sleeps]:
    clock, sleeps = Clock(), Sleeps()
    options: dict[str, object] = {"clock": clock, "sleep": sleeps, "rng": lambda: 1.0}
    options.update(kw)
    return ModelPool("m", list(replicas), **options), clock, sleeps  # type: ignore[arg-type]


async def test_pool_retries_retryable_errors_with_backoff() -> None:
    """Two retryable failures, then an answer: the caller sees only the answer."""
    r = Scripted("a", [retryable(), retryable(), ["hel", "lo"]])
    p, _, sleeps = pool(r, retries=2, backoff_s=0.1)
    text, result = await collect(p)
    assert (text, result.text) == ("hello", "hello")
    assert sleeps.delays == [pytest.approx(0.1), pytest.approx(0.2)]


async def test_pool_gives_up_after_retries() -> None:
    """More retryable failures than retries: the last error reaches the caller."""
    r = Scripted("a", [retryable("1"), retryable("2"), retryable("3")])
    p, _, _ = pool(r, retries=2)
    with pytest.raises(ModelUnavailable, match="3"):
        await collect(p)
    assert r.calls == 3


async def test_pool_does_not_retry_a_permanent_error() -> None:
    """A 400-like error is not retried."""
    r = Scripted("a", [permanent()])
    p, _, sleeps = pool(r, retries=5)
    with pytest.raises(ModelResponseError):
        await collect(p)
    assert (r.calls, sleeps.delays) == (1, [])


async def test_pool_does_not_retry_after_text_was_yielded() -> None:
    """A failure after the first delta is not retried (the user already saw a beginning)."""
    r = Scripted("a", [("partial", ["half"], retryable())])
    p, _, _ = pool(r, retries=3)
    seen: list[str] = []

    async def consume() -> None:
        async for d in p.generate(PROMPT, Generation()):
            seen.append(d)

    with pytest.raises(ModelUnavailable):
        await consume()
    assert (seen, r.calls) == (["half"], 1)


async def test_pool_first_token_timeout_is_retryable() -> None:
    """No first token within the limit: a ModelTimeout, retried on the next attempt."""
    r = Scripted("a", ["hang", ["late"]])
    p, _, _ = pool(r, retries=1, first_token_timeout_s=0.02)
    assert (await collect(p))[0] == "late"
    r2 = Scripted("b", ["hang"])
    p2, _, _ = pool(r2, retries=0, first_token_timeout_s=0.02)
    with pytest.raises(ModelTimeout, match="first token"):
        await collect(p2)


async def test_pool_first_token_timeout_with_an_empty_answer() -> None:
    """An answer with no delta at all ends cleanly under a first-token limit."""
    r = Scripted("a", [[]])
    p, _, _ = pool(r, first_token_timeout_s=1.0)
    assert (await collect(p))[0] == ""


async def test_pool_prefers_least_outstanding_replica() -> None:
    """Concurrent requests spread over replicas by requests in flight."""
    a = Scripted("a", ["block"] * 4)
    b = Scripted("b", ["block"] * 4)
    p, _, _ = pool(a, b)
    tasks = [asyncio.ensure_future(collect(p)) for _ in range(4)]
    while a.active + b.active < 4:
        await asyncio.sleep(0)
    assert (a.active, b.active) == (2, 2)
    a.release.set()
    b.release.set()
    await asyncio.gather(*tasks)


async def test_pool_breaker_skips_a_failing_replica_then_probes_it() -> None:
    """After N failures a replica is skipped; after reset_s one request probes it."""
    a = Scripted("a", [retryable(), retryable(), ["a-back"]])
    b = Scripted("b", [["b"]] * 20)
    p, clock, _ = pool(a, b, retries=1, breaker_failures=2, breaker_reset_s=10)
    for _ in range(6):
        if a.calls >= 2:
            break
        with contextlib.suppress(ModelUnavailable):
            await collect(p)
    assert a.calls == 2
    assert p.replicas[0].breaker.state == "open"
    for _ in range(3):
        assert (await collect(p))[0] == "b"
    assert a.calls == 2  # skipped while open
    clock.now = 10.0
    assert p.replicas[0].breaker.state == "half_open"
    for _ in range(4):
        if a.calls == 3:
            break
        await collect(p)
    assert a.calls == 3
    assert p.replicas[0].breaker.state == "closed"


async def test_pool_all_breakers_open_is_unavailable() -> None:
    """When every replica's circuit is open the pool fails fast."""
    a = Scripted("a", [retryable()])
    p, _, _ = pool(a, retries=0, breaker_failures=1)
    with pytest.raises(ModelUnavailable):
        await collect(p)
    with pytest.raises(ModelUnavailable, match="circuit open"):
        await collect(p)
    assert a.calls == 1


def test_breaker_failed_probe_reopens_and_single_probe_slot() -> None:
    """A failed half-open probe opens the circuit again; only one probe at a time."""
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_s=5, clock=clock)
    breaker.failure()
    assert breaker.state == "open"
    assert not breaker.allows()
    breaker.failure()  # a request still in flight when it opened also fails
    assert breaker.state == "open"
    clock.now = 5
    assert breaker.allows()
    breaker.acquire()
    assert not breaker.allows()  # the probe slot is taken
    breaker.failure()
    assert breaker.state == "open"
    clock.now = 10
    breaker.acquire()
    breaker.success()
    assert breaker.state == "closed"
    assert breaker.allows()


async def test_pool_cancelled_probe_releases_the_slot() -> None:
    """A half-open probe cancelled before any answer does not block later probes."""
    a = Scripted("a", [retryable(), "hang", ["ok"]])
    p, clock, _ = pool(a, retries=0, breaker_failures=1, breaker_reset_s=1)
    with pytest.raises(ModelUnavailable):
        await collect(p)
    clock.now = 1
    task = asyncio.ensure_future(collect(p))
    while a.active == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert p.replicas[0].breaker.allows()
    assert (await collect(p))[0] == "ok"


def test_pool_needs_a_replica() -> None:
    """An empty pool is a programming error."""
    with pytest.raises(ValueError, match="replica"):
        ModelPool("m", [])


async def test_pool_probe_and_close() -> None:
    """probe() is ok while one replica answers and says how many are up; aclose closes all."""
    a = Scripted("a", [retryable("a down")])
    b = Scripted("b", [])
    p, _, _ = pool(a, b)
    assert await p.probe() == "1/2 endpoints up: b ok"
    single, _, _ = pool(Scripted("c", []))
    assert await single.probe() == "c ok"
    dead, _, _ = pool(Scripted("d", [retryable("d down")]))
    with pytest.raises(ModelUnavailable, match="d down"):
        await dead.probe()
    await p.aclose()
    assert a.closed
    assert b.closed


async def test_fallback_chain_moves_on_and_counts() -> None:
    """The primary fails before answering: the backup answers; the fallback is counted."""
    metrics = Metrics(CollectorRegistry(), process=False)
    primary = Scripted("primary", [retryable()])
    backup = Scripted("backup", [["from backup"]])
    chain = FallbackChain([("primary", primary), ("backup", backup)], metrics=metrics)
    text, result = await collect(chain)
    assert text == "from backup"
    assert result.extra["model"] == "backup"
    value = metrics.registry.get_sample_value(
        "imrelay_model_fallbacks_total", {"model": "primary", "to": "backup"}
    )
    assert value == 1.0
    assert chain.name == "primary"
    assert await chain.probe() == "primary ok"
    await chain.aclose()
    assert not primary.closed  # members belong to whoever built them


async def test_fallback_chain_all_fail_raises_the_last_error() -> None:
    """Every member fails: the last member's error reaches the caller."""
    chain = FallbackChain(
        [("a", Scripted("a", [retryable("a")])), ("b", Scripted("b", [permanent("b")]))]
    )
    with pytest.raises(ModelResponseError, match="b"):
        await collect(chain)


async def test_fallback_chain_does_not_move_on_after_text() -> None:
    """A member that failed after producing text is not replaced (the text was shown)."""
    chain = FallbackChain(
        [
            ("a", Scripted("a", [("partial", ["so far"], retryable())])),
            ("b", Scripted("b", [["never"]])),
        ]
    )
    with pytest.raises(ModelUnavailable):
        await collect(chain)


def test_fallback_chain_needs_a_member() -> None:
    """An empty chain is a programming error."""
    with pytest.raises(ValueError, match="at least one"):
        FallbackChain([])
