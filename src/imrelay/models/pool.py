"""Reliability around model backends: replicas, retries, circuit breakers, fallback chains.

Theory of operation. A :class:`ModelPool` stands in front of one configured model's replicas
(one backend per endpoint URL). For each request it picks, among the replicas whose
:class:`CircuitBreaker` lets a call through, the one with the fewest requests outstanding. A
failed call is retried on a (possibly different) replica, with exponential backoff and jitter,
only when the error is retryable (connection errors, timeouts, 429, 5xx, never a 400) and only
if no text reached the caller yet (a retry after the first delta would show the user a second
beginning). A first-token timeout bounds the wait for the first delta; the backend's own
``timeout_s`` bounds the whole call.

A breaker opens after ``failures`` consecutive failures; while open, its replica is skipped.
After ``reset_s`` it is half-open: exactly one request probes it; success closes it, failure
opens it again for another ``reset_s``.

A :class:`FallbackChain` tries the models of a ``routing.fallback`` chain in order, moving on
when one fails before it produced any text.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from imrelay.errors import ModelError, ModelTimeout, ModelUnavailable
from imrelay.models.base import ChatMessage, Generation, ModelBackend
from imrelay.observability.metrics import Metrics

__all__ = ["CircuitBreaker", "FallbackChain", "ModelPool"]

logger = logging.getLogger(__name__)


class CircuitBreaker:
    """Consecutive-failure breaker with a half-open probe (see the module docstring)."""

    def __init__(
        self, *, failures: int = 5, reset_s: float = 30.0, clock: Callable[[], float]
    ) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.reset_s:
            return "half_open"
        return "open"

    def allows(self) -> bool:
        """Whether a call may go through now (without claiming the half-open probe)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self.probing)

    def acquire(self) -> None:
        """Claim the call; in half-open state this takes the single probe slot."""
        if self.state == "half_open":
            self.probing = True

    def success(self) -> None:
        """Record a success: the breaker closes."""
        self.consecutive = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        """Record a failure: a failed probe, or the threshold reached, opens the breaker."""
        self.consecutive += 1
        if self.probing or self.consecutive >= self.threshold:
            if self.opened_at is None or self.probing:
                logger.warning("circuit breaker opened after %d failures", self.consecutive)
            self.opened_at = self.clock()
        self.probing = False


@dataclass(slots=True)
class _Replica:
    backend: ModelBackend
    breaker: CircuitBreaker
    outstanding: int = 0
    index: int = field(default=0)


class ModelPool:
    """One model's replicas behind retries and breakers; itself a :class:`ModelBackend`."""

    def __init__(
        self,
        name: str,
        replicas: Sequence[ModelBackend],
        *,
        retries: int = 2,
        backoff_s: float = 0.2,
        first_token_timeout_s: float | None = None,
        breaker_failures: int = 5,
        breaker_reset_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not replicas:
            raise ValueError("a model pool needs at least one replica")
        self.name = name
        self.retries = retries
        self.backoff_s = backoff_s
        self.first_token_timeout_s = first_token_timeout_s
        self.sleep = sleep
        self.rng = rng
        self.replicas = [
            _Replica(
                backend,
                CircuitBreaker(failures=breaker_failures, reset_s=breaker_reset_s, clock=clock),
                index=i,
            )
            for i, backend in enumerate(replicas)
        ]
        self._next = 0

    def _pick(self) -> _Replica | None:
        usable = [r for r in self.replicas if r.breaker.allows()]
        if not usable:
            return None
        # Least outstanding requests; ties go round-robin so idle replicas share the load.
        self._next += 1
        n = len(self.replicas)
        return min(usable, key=lambda r: (r.outstanding, (r.index - self._next) % n))

    async def generate(
        self, messages: Sequence[ChatMessage], result: Generation
    ) -> AsyncIterator[str]:
        """Yield the answer's deltas from a healthy replica, retrying as the docstring says."""
        attempt = 0
        while True:
            replica = self._pick()
            if replica is None:
                raise ModelUnavailable(
                    f"model {self.name}: every endpoint is unhealthy (circuit open)",
                    backend=self.name,
                    retryable=True,
                )
            replica.breaker.acquire()
            replica.outstanding += 1
            attempt_result = Generation()
            emitted = False
            settled = False
            try:
                async for delta in self._guarded(replica.backend, messages, attempt_result):
                    emitted = True
                    _copy(attempt_result, result)
                    yield delta
            except ModelError as exc:
                settled = True
                replica.breaker.failure()
                _copy(attempt_result, result)
                if emitted or not exc.retryable or attempt >= self.retries:
                    raise
                attempt += 1
                delay = self.backoff_s * 2 ** (attempt - 1) * (0.5 + self.rng() / 2)
                logger.info(
                    "model %s: attempt %d failed (%s); retrying in %.2fs",
                    self.name,
                    attempt,
                    exc,
                    delay,
                )
                await self.sleep(delay)
                continue
            finally:
                replica.outstanding -= 1
                if not settled and not emitted:
                    replica.breaker.probing = False  # cancelled before an answer: no verdict
            replica.breaker.success()
            _copy(attempt_result, result)
            return

    async def _guarded(
        self, backend: ModelBackend, messages: Sequence[ChatMessage], result: Generation
    ) -> AsyncIterator[str]:
        """The backend's deltas, with the first one bounded by the first-token timeout."""
        stream = backend.generate(messages, result)
        try:
            if self.first_token_timeout_s is not None:
                try:
                    async with asyncio.timeout(self.first_token_timeout_s):
                        first = await anext(stream, None)
                except TimeoutError:
                    raise ModelTimeout(
                        f"model {self.name}: no first token within "
                        f"{self.first_token_timeout_s:g} s",
                        backend=self.name,
                        retryable=True,
                    ) from None
                if first is None:
                    return
                yield first
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def probe(self) -> str:
        """Probe every replica; ok if at least one answers."""
        results: list[str] = []
        errors: list[str] = []
        for replica in self.replicas:
            try:
                results.append(await replica.backend.probe())
            except ModelError as exc:
                errors.append(str(exc))
        if not results:
            raise ModelUnavailable(
                f"model {self.name}: no endpoint answered ({'; '.join(errors)})",
                backend=self.name,
            )
        healthy = f"{len(results)}/{len(self.replicas)} endpoints up"
        return f"{healthy}: {results[0]}" if len(self.replicas) > 1 else results[0]

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.backend.aclose()


class FallbackChain:
    """Try each model of a ``routing.fallback`` chain in order; itself a :class:`ModelBackend`.

    It moves on only when a model failed before producing any text. Each model's own outcome
    is counted in ``imrelay_model_requests_total`` by the caller for the chain as a whole and
    here, per member, in ``imrelay_model_fallbacks_total``.
    """

    def __init__(
        self, chain: Sequence[tuple[str, ModelBackend]], *, metrics: Metrics | None = None
    ) -> None:
        if not chain:
            raise ValueError("a fallback chain needs at least one model")
        self.name = chain[0][0]
        self.chain = list(chain)
        self.metrics = metrics

    async def generate(
        self, messages: Sequence[ChatMessage], result: Generation
    ) -> AsyncIterator[str]:
        """Yield the first model's answer that works."""
        last: ModelError | None = None
        for position, (name, backend) in enumerate(self.chain):
            emitted = False
            try:
                async for delta in backend.generate(messages, result):
                    emitted = True
                    yield delta
            except ModelError as exc:
                if emitted:
                    raise
                last = exc
                following = self.chain[position + 1][0] if position + 1 < len(self.chain) else ""
                if following:
                    logger.warning(
                        "model %s failed (%s); falling back to %s", name, exc, following
                    )
                    if self.metrics is not None:
                        self.metrics.model_fallbacks.labels(name, following).inc()
                continue
            result.extra["model"] = name
            return
        assert last is not None  # nosec B101  # the loop ran at least once
        raise last

    async def probe(self) -> str:
        return await self.chain[0][1].probe()

    async def aclose(self) -> None:
        """The members are owned (and closed) by whoever built them."""


def _copy(src: Generation, dst: Generation) -> None:
    dst.text = src.text
    dst.first_token_s = src.first_token_s
    dst.total_s = src.total_s
    dst.prompt_tokens = src.prompt_tokens
    dst.completion_tokens = src.completion_tokens
    dst.model_time_s = src.model_time_s
    dst.extra.update(src.extra)
