"""Small helpers shared by the platform simulators in :mod:`imrelay.sim`.

Nothing here knows about a particular platform: JSON responses that keep non-ASCII text readable,
a JSON-object body reader that never raises, a size-bounded mapping for recorded traffic, and the
loopback URL a client should use to reach a server bound to a wildcard address.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import OrderedDict
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

__all__ = [
    "BoundedDict",
    "json_response",
    "loopback_url",
    "new_request_id",
    "read_json_object",
    "require_seconds",
]

_K = TypeVar("_K")
_V = TypeVar("_V")

_dumps = partial(json.dumps, ensure_ascii=False)


class BoundedDict(OrderedDict[_K, _V]):
    """An insertion-ordered dict that forgets its oldest entries beyond ``maxlen``.

    Simulators record traffic (ACKs, sessions) for assertions; a benchmark that runs for minutes
    must not grow them without limit.

    Args:
        maxlen: the largest number of entries kept (at least 1).
    """

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        super().__init__()
        self.maxlen = maxlen

    def __setitem__(self, key: _K, value: _V) -> None:
        super().__setitem__(key, value)
        if len(self) > self.maxlen:
            self.popitem(last=False)


def json_response(data: Any, *, status: int = 200) -> web.Response:
    """Return ``data`` as an ``application/json; charset=utf-8`` response, non-ASCII unescaped."""
    return web.json_response(data, status=status, dumps=_dumps)


def new_request_id() -> str:
    """Return an id shaped like the ``requestid`` of DingTalk-style API errors."""
    return str(uuid.uuid4()).upper()


async def read_json_object(request: web.Request) -> dict[str, Any] | None:
    """Parse the request body as a JSON object.

    Returns:
        The object, or ``None`` when the body is not UTF-8 JSON or not an object.
    """
    raw = await request.read()
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def loopback_url(host: str, port: int, scheme: str = "http") -> str:
    """Return ``scheme://host:port`` usable by a local client.

    A wildcard bind address (``0.0.0.0``, ``::`` or empty) becomes ``127.0.0.1``; an IPv6
    literal gets brackets.
    """
    if host in ("", "0.0.0.0", "::"):  # nosec B104  # replaced by 127.0.0.1 below
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def require_seconds(name: str, value: object, *, maximum: float = 86_400.0) -> float:
    """Validate a duration given in seconds.

    Args:
        name: the field name, used in the error message.
        value: the candidate value (an int or float, not a bool).
        maximum: the largest accepted value.

    Returns:
        The value as a float.

    Raises:
        ValueError: if the value is not a finite number in ``[0, maximum]``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or seconds > maximum:
        raise ValueError(f"{name} must be between 0 and {maximum:g} seconds")
    return seconds
