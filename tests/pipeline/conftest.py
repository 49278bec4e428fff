"""Fixtures for the pipeline tests: real stores and metrics, a scriptable platform and model."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from imrelay.message import Conversation, InboundMessage, OutboundReply, Sender
from imrelay.models.base import ChatMessage, Generation
from imrelay.observability.metrics import Metrics
from imrelay.pipeline.context import TurnContext
from imrelay.platforms.base import Intake
from imrelay.stores.memory import MemoryStore

PLATFORM = "dingtalk"
EPOCH = 1_700_000_000.0

MessageFactory = Callable[..., InboundMessage]
ContextFactory = Callable[..., TurnContext]
SampleReader = Callable[..., float]


class FakeClock:
    """A clock that moves only when told to (or when :meth:`sleep` is awaited)."""

    def __init__(self, now: float = EPOCH) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """Record the delay and advance the clock by it, without waiting."""
        self.sleeps.append(seconds)
        self.now += seconds


class RecordingPlatform:
    """A :class:`~imrelay.platforms.base.Platform` that records what it is asked to send.

    ``failures`` holds exceptions to raise, one per ``send`` call, before sends succeed.
    """

    ingress = "stream"

    def __init__(self, name: str = PLATFORM) -> None:
        self.name = name
        self.sent: list[tuple[InboundMessage, OutboundReply]] = []
        self.attempts = 0
        self.failures: list[Exception] = []
        self.closed = False

    @property
    def ready(self) -> bool:
        return not self.closed

    @property
    def not_ready_reason(self) -> str:
        return "closed" if self.closed else ""

    async def run(self, intake: Intake) -> None:
        await asyncio.Event().wait()

    async def send(self, message: InboundMessage, reply: OutboundReply) -> None:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append((message, reply))

    async def probe(self) -> str:
        return "recording platform"

    async def aclose(self) -> None:
        self.closed = True

    @property
    def texts(self) -> list[str]:
        """The text of every reply part accepted so far."""
        return [reply.text for _, reply in self.sent]


class ScriptedBackend:
    """A :class:`~imrelay.models.base.ModelBackend` that yields ``deltas`` or raises ``error``.

    It records every prompt it is given, and fills usage when asked to.
    """

    def __init__(
        self,
        name: str = "default",
        deltas: Sequence[str] = ("hello", " world"),
        *,
        error: Exception | None = None,
        first_token_s: float | None = 0.01,
        prompt_tokens: int | None = 7,
        completion_tokens: int | None = 2,
    ) -> None:
        self.name = name
        self.deltas = list(deltas)
        self.error = error
        self.first_token_s = first_token_s
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.prompts: list[list[ChatMessage]] = []
        self.closed = False

    async def generate(self, messages: Sequence[ChatMessage], result: Generation) -> Any:
        self.prompts.append(list(messages))
        for i, delta in enumerate(self.deltas):
            if i == 0:
                result.first_token_s = self.first_token_s
            result.text += delta
            yield delta
        if self.error is not None:
            raise self.error
        result.prompt_tokens = self.prompt_tokens
        result.completion_tokens = self.completion_tokens

    async def probe(self) -> str:
        return "scripted model"

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def clock() -> FakeClock:
    """A fake epoch clock."""
    return FakeClock()


@pytest.fixture
async def store(clock: FakeClock) -> AsyncIterator[MemoryStore]:
    """An open in-memory store on the fake clock."""
    async with MemoryStore(clock=clock) as s:
        yield s


@pytest.fixture
def metrics() -> Metrics:
    """Metrics on a fresh registry."""
    return Metrics(CollectorRegistry(), process=False)


@pytest.fixture
def sample(metrics: Metrics) -> SampleReader:
    """Read one sample of ``metrics`` (0.0 when it was never set)."""

    def read(name: str, **labels: str) -> float:
        value = metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    return read


@pytest.fixture
def platform() -> RecordingPlatform:
    """A platform that records replies."""
    return RecordingPlatform()


@pytest.fixture
def make_message() -> MessageFactory:
    """Build an InboundMessage (a mentioned group text by default); keywords override."""

    def factory(message_id: str = "m1", **overrides: Any) -> InboundMessage:
        conv_kind = overrides.pop("conv_kind", "group")
        conv_id = overrides.pop("conv_id", "cid-1")
        sender_id = overrides.pop("sender_id", "staff-1")
        fields: dict[str, Any] = {
            "platform": PLATFORM,
            "message_id": message_id,
            "conversation": Conversation(id=conv_id, kind=conv_kind, title="研发群"),
            "sender": Sender(id=sender_id, name="张三"),
            "kind": "text",
            "text": f"hello {message_id}",
            "received_at": EPOCH,
            "mentions_bot": True,
        }
        fields.update(overrides)
        return InboundMessage(**fields)

    return factory


@pytest.fixture
def make_ctx(make_message: MessageFactory) -> ContextFactory:
    """Build a TurnContext around a message; keywords go to the message factory."""
    logger = logging.getLogger("tests.pipeline")

    def factory(message_id: str = "m1", *, resumed: bool = False, **overrides: Any) -> TurnContext:
        message = make_message(message_id, **overrides)
        log = logging.LoggerAdapter(logger, {"platform": message.platform})
        return TurnContext(message=message, log=log, resumed=resumed)

    return factory


@pytest.fixture
def make_backend() -> Callable[..., ScriptedBackend]:
    """Build scripted model backends (see :class:`ScriptedBackend`)."""
    return ScriptedBackend


@pytest.fixture
def make_platform() -> Callable[..., RecordingPlatform]:
    """Build recording platforms (see :class:`RecordingPlatform`)."""
    return RecordingPlatform
