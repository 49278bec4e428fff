"""Reconnection policy shared by long-connection connectors.

:func:`backoff` yields delays: exponential growth with *full jitter* (each delay is uniform in
``[0, min(cap, initial * 2**n)]``), as recommended for avoiding reconnect storms when many
clients lose a server at once. :func:`is_retryable` is the single place that decides whether a
failure to connect is worth retrying.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator

import aiohttp

from imrelay.errors import AuthError, ConnectionLost, PlatformAPIError, ProtocolError

__all__ = ["backoff", "is_retryable"]


def backoff(
    initial: float = 1.0,
    maximum: float = 60.0,
    factor: float = 2.0,
    rng: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Yield reconnection delays forever (full jitter, capped at ``maximum``)."""
    ceiling = initial
    while True:
        yield rng() * ceiling
        ceiling = min(maximum, ceiling * factor)


def is_retryable(exc: BaseException) -> bool:
    """Whether a failure to connect may go away by itself.

    Refused credentials are not retryable; network errors, timeouts, server errors, throttling,
    dropped connections and malformed answers from an overloaded server are.
    """
    if isinstance(exc, AuthError):
        return False
    if isinstance(exc, PlatformAPIError):
        return exc.retryable
    return isinstance(
        exc,
        ConnectionLost
        | ProtocolError
        | aiohttp.ClientError
        | OSError
        | TimeoutError
        | asyncio.TimeoutError,
    )
