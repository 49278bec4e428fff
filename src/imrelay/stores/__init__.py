"""Durable stores: the inbox, the reply record (outbox) and conversation context.

:func:`open_store` builds a store from ``storage.url``:

- ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` → :class:`SQLiteStore`
- ``memory://`` → :class:`MemoryStore` (tests and demos only: nothing survives a restart)

The returned store is not opened yet: call ``await store.open()`` (or ``async with store``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from imrelay.errors import ConfigError
from imrelay.stores.base import Store
from imrelay.stores.memory import MemoryStore
from imrelay.stores.sqlite import SQLiteStore

__all__ = ["MemoryStore", "SQLiteStore", "open_store"]

_KEY: Final = "storage.url"
_LATER: Final = frozenset({"redis", "rediss"})


def open_store(
    url: str,
    *,
    commit_interval_ms: float = 2.0,
    dedup_ttl_s: float = 86400.0,
    clock: Callable[[], float] = time.time,
) -> Store:
    """Build the store ``url`` names (not opened yet).

    Args:
        url: ``sqlite:///<path>`` (three slashes then the path: ``sqlite:///./a.db`` is
            relative, ``sqlite:////var/lib/a.db`` absolute) or ``memory://``.
        commit_interval_ms: SQLite commit grouping window (ignored by the memory store).
        dedup_ttl_s: how long a dedup key blocks redeliveries.
        clock: epoch seconds.

    Raises:
        ConfigError: keyed ``storage.url``, when the URL is malformed or its scheme unsupported.
            The message names the scheme only, never the rest of the URL (it may hold a password).
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(
            "storage url has no scheme (use sqlite:///<path> or memory://)", key=_KEY
        )
    if scheme == "sqlite":
        if not rest.startswith("/"):
            raise ConfigError("sqlite url must be sqlite:///<path> (no host part)", key=_KEY)
        path = rest[1:]
        if not path:
            raise ConfigError("sqlite url has no database path", key=_KEY)
        if "?" in path or "#" in path:
            raise ConfigError("sqlite url takes no query or fragment", key=_KEY)
        return SQLiteStore(
            path, commit_interval_ms=commit_interval_ms, dedup_ttl_s=dedup_ttl_s, clock=clock
        )
    if scheme == "memory":
        if rest:
            raise ConfigError("memory url takes nothing after memory://", key=_KEY)
        return MemoryStore(dedup_ttl_s=dedup_ttl_s, clock=clock)
    if scheme in _LATER:
        raise ConfigError(f"storage url scheme {scheme!r} is not supported yet", key=_KEY)
    raise ConfigError(
        f"unsupported storage url scheme {scheme!r} (use sqlite:///<path> or memory://)", key=_KEY
    )
