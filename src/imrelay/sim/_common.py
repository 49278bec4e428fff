"""Small helpers shared by the platform simulators in :mod:`imrelay.sim`.

Nothing here knows about a particular platform: JSON responses that keep non-ASCII text readable
(from a value, or from JSON text assembled by the caller), a JSON-object body reader that never
raises (optionally handing back the body's text too, so that a recorded body can be served again
without being serialised anew), a size-bounded mapping for recorded traffic, and the loopback URL
a client should use to reach a server bound to a wildcard address.

The simulators' per-message paths build their JSON from pieces: :data:`json_str` quotes one
string exactly as ``json.dumps(value, ensure_ascii=False)`` does, so assembled documents match
what the serialiser would have produced. :class:`FastFront` is the lean HTTP/1.1 server that
answers a simulator's hot routes in aiohttp's place and hands every other connection to aiohttp
(see its docstring). Clients sending many requests a second (webhook deliveries, the
benchmark's batches) use :class:`imrelay.http.HTTPClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import json.encoder
import logging
import math
import re
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import Any, Final, TypeVar, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

__all__ = [
    "BoundedDict",
    "FastExchange",
    "FastFront",
    "FastHandler",
    "api_error",
    "api_error_text",
    "json_response",
    "json_str",
    "json_text",
    "json_text_response",
    "loopback_url",
    "new_request_id",
    "parse_json_object",
    "read_json_object",
    "require_seconds",
]

logger = logging.getLogger(__name__)

_K = TypeVar("_K")
_V = TypeVar("_V")

_dumps = partial(json.dumps, ensure_ascii=False)

json_str: Final[Callable[[str], str]] = json.encoder.encode_basestring
"""Quote a string as JSON, non-ASCII kept (same text as ``json.dumps(s, ensure_ascii=False)``)."""


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


def json_text(data: Any) -> str:
    """``data`` as the JSON text :func:`json_response` sends."""
    return _dumps(data)


def json_text_response(text: str, *, status: int = 200) -> web.Response:
    """Return JSON text the caller assembled as an ``application/json; charset=utf-8`` response."""
    return web.Response(text=text, status=status, content_type="application/json")


def new_request_id() -> str:
    """Return an id shaped like the ``requestid`` of DingTalk-style API errors."""
    return str(uuid.uuid4()).upper()


def api_error_text(code: str, message: str) -> str:
    """A DingTalk new-API error body, ``{"requestid", "code", "message"}``, as JSON text."""
    return json_text({"requestid": new_request_id(), "code": code, "message": message})


def api_error(status: int, code: str, message: str) -> web.Response:
    """A DingTalk new-API error answer (see :func:`api_error_text`)."""
    return json_text_response(api_error_text(code, message), status=status)


async def read_json_object(request: web.Request) -> dict[str, Any] | None:
    """Parse the request body as a JSON object.

    Returns:
        The object, or ``None`` when the body is not UTF-8 JSON or not an object.
    """
    return parse_json_object(await request.read())[0]


def parse_json_object(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """Parse ``raw`` as a UTF-8 JSON object and hand back its text as well.

    Returns:
        The object (``None`` when the body is not UTF-8 JSON or not an object) and the body
        decoded as UTF-8 (``""`` when it is not UTF-8). When the object is not ``None`` the text
        is exactly one JSON value, fit to be embedded in another JSON document.
    """
    try:
        text = raw.decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError:
        return None, ""
    except ValueError:
        return None, text
    return (value, text) if isinstance(value, dict) else (None, text)


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


# ---------------------------------------------------------------------- lean HTTP/1.1 front

#: A :class:`FastFront` route: it answers through the exchange's methods. A handler that needs
#: to wait returns an awaitable; the connection takes no further request until it is done. A
#: handler that returns ``None`` without answering declines: the request goes to aiohttp.
FastHandler = Callable[["FastExchange"], Awaitable[None] | None]

_MAX_HEAD: Final = 8190
_PASSED_ON: Final = frozenset({"transfer-encoding", "expect", "upgrade"})
_CRLF2: Final = b"\r\n\r\n"
# One header line after a line break: a token, a colon, the value without surrounding blanks.
_HEADER_LINE: Final = re.compile(
    r"\r\n([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[^\r\n]*[^\r\n \t])?)[ \t]*(?=\r\n|\Z)"
)


@functools.lru_cache(maxsize=128)
def _status_line(status: int) -> str:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return f"HTTP/1.1 {status} {reason}\r\n"


class _Clock:
    """The ``Date`` and ``Server`` lines that end every head, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._lines = b""

    def closing_lines(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            date = formatdate(now, usegmt=True)
            self._second = now
            self._lines = f"Date: {date}\r\nServer: {SERVER_SOFTWARE}\r\n".encode("latin-1")
        return self._lines


class FastExchange:
    """One request taken by a :class:`FastFront` route, and the way to answer it.

    Attributes:
        method: the request method.
        path: the path, without the query string.
        query_string: what follows ``?`` in the target (``""`` when nothing does).
        headers: the request headers, names in lower case.
        body: the request body.
        started: whether a head went out (a route that fails after it cannot answer 500).
        done: whether the whole answer went out.
    """

    __slots__ = ("_conn", "body", "done", "headers", "method", "path", "query_string", "started")

    def __init__(
        self,
        conn: _FastConnection,
        method: str,
        path: str,
        query_string: str,
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        self._conn = conn
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.body = body
        self.started = False  # a head went out
        self.done = False  # the whole answer went out

    def query(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or ``None`` when it is absent.

        Only plain query strings are parsed here: a route must first check
        :meth:`plain_query` (the front hands anything else to aiohttp, which decodes it).
        """
        for pair in self.query_string.split("&"):
            key, _, value = pair.partition("=")
            if key == name:
                return value
        return None

    def plain_query(self) -> bool:
        """Whether the query string needs no decoding (no ``%`` escapes, no ``+``)."""
        return "%" not in self.query_string and "+" not in self.query_string

    @property
    def content_type(self) -> str:
        """The media type of the body, as aiohttp's ``request.content_type`` gives it."""
        raw = self.headers.get("content-type")
        if raw is None:
            return "application/octet-stream"
        return raw.split(";", 1)[0].strip().lower()

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json; charset=utf-8",
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Send a whole response with a ``Content-Length``."""
        self.started = self.done = True
        head = self._conn.head(status, [*headers, ("Content-Type", content_type)])
        self._conn.write(b"%sContent-Length: %d\r\n%s\r\n%s" % (head[0], len(body), head[1], body))

    def respond_json(self, status: int, text: str) -> None:
        """Send JSON text as an ``application/json; charset=utf-8`` response."""
        self.respond(status, text.encode("utf-8"))

    def start_stream(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        """Send the head of a chunked response now (``headers`` name the content type)."""
        self.started = True
        head = self._conn.head(status, headers)
        self._conn.write(b"%sTransfer-Encoding: chunked\r\n%s\r\n" % head)

    def write_chunk(self, data: bytes) -> None:
        """Send one chunk of a response begun with :meth:`start_stream`."""
        if data:
            self._conn.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self, data: bytes = b"", head: Sequence[tuple[str, str]] | None = None) -> None:
        """Send the last chunk and the end of a chunked response.

        With ``head`` (the response headers), nothing was sent yet: the head goes out in the
        same write, so a response that is ready at once costs one system call.
        """
        self.started = self.done = True
        out = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"
        if head is not None:
            start, end = self._conn.head(200, head)
            out = b"%sTransfer-Encoding: chunked\r\n%s\r\n%s" % (start, end, out)
        self._conn.write(out)


class _FastConnection(asyncio.Protocol):
    """One client connection: requests for the front's routes are answered here, in order."""

    def __init__(self, front: FastFront) -> None:
        self._front = front
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self.busy: asyncio.Task[None] | None = None
        self._paused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a TCP server's (uvloop's too)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._front.connections.discard(self)
        if self.busy is not None and self._front.cancel_on_disconnect:
            self.busy.cancel()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self.busy is None:
            self._serve()
        elif len(self._buf) > self._front.max_body + _MAX_HEAD and not self._paused:
            assert self._transport is not None  # nosec B101  # set by connection_made
            self._transport.pause_reading()
            self._paused = True

    def head(self, status: int, headers: Iterable[tuple[str, str]]) -> tuple[bytes, bytes]:
        """The status line and ``headers``, and the ``Date``/``Server`` lines that close a head."""
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
        start = (_status_line(status) + lines).encode("latin-1")
        return start, self._front.clock.closing_lines()

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _serve(self) -> None:
        """Answer every complete request in the buffer; hand the connection on when told to."""
        while not self.closed and self.busy is None:
            buf = self._buf
            end = buf.find(_CRLF2)
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._hand_over()
                return
            request = _parse_head(bytes(buf[:end]))
            handler = self._front.routes.get(request[:2]) if request is not None else None
            if request is None or handler is None or request[4] > self._front.max_body:
                self._hand_over()
                return
            method, path, query, headers, length = request
            start = end + 4
            if len(buf) < start + length:
                return
            body = bytes(buf[start : start + length])
            exchange = FastExchange(self, method, path, query, headers, body)
            try:
                pending = handler(exchange)
            except Exception:
                logger.exception("simulator route %s %s failed", method, path)
                del buf[: start + length]
                self._fail(exchange)
                return
            if pending is None and not exchange.done:
                self._hand_over()  # the route declined, the request still buffered
                return
            del buf[: start + length]
            if pending is not None:
                self.busy = asyncio.ensure_future(self._finish(pending, exchange))
                return

    async def _finish(self, pending: Awaitable[None], exchange: FastExchange) -> None:
        try:
            await pending
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception:
            logger.exception("simulator route %s %s failed", exchange.method, exchange.path)
            self._fail(exchange)
            return
        finally:
            self.busy = None
        if not exchange.done:
            self._fail(exchange)
            return
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        self._serve()

    def _fail(self, exchange: FastExchange) -> None:
        """Answer 500 if nothing went out yet (else the answer stays cut short); close."""
        if not exchange.started:
            exchange.respond(500, b"500 Internal Server Error", "text/plain; charset=utf-8")
        self.close()

    def _hand_over(self) -> None:
        """Give the connection, with what it has buffered, to aiohttp for the rest of its life."""
        transport = self._transport
        if transport is None or self.closed:
            return
        self._front.connections.discard(self)
        self.closed = True
        protocol = self._front.server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._buf:
            protocol.data_received(bytes(self._buf))
            self._buf.clear()
        if self._paused:
            transport.resume_reading()


def _parse_head(raw: bytes) -> tuple[str, str, str, dict[str, str], int] | None:
    """Method, path, query, headers and body length of a plain HTTP/1.1 request head.

    Returns ``None`` for anything else (another version, an absolute or encoded target, a
    malformed, folded or repeated header, a body framed otherwise than by one
    ``Content-Length``, an upgrade, ``Expect``, ``Connection: close``): aiohttp deals with those.
    """
    text = raw.decode("latin-1")
    line_end = text.find("\r\n")
    request_line = text if line_end < 0 else text[:line_end]
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or not parts[1].startswith("/"):
        return None
    method, target = parts[0], parts[1]
    path, _, query = target.partition("?")
    if "%" in path or "#" in target:
        return None
    pairs = _HEADER_LINE.findall(text) if line_end >= 0 else []
    if len(pairs) != text.count("\r\n"):  # a line that is not "name: value"
        return None
    headers = {name.lower(): value for name, value in pairs}
    if len(headers) != len(pairs) or not _PASSED_ON.isdisjoint(headers):
        return None
    if "close" in headers.get("connection", "").lower():
        return None
    raw_length = headers.get("content-length", "0")
    if not raw_length.isdigit() or len(raw_length) > 12:
        return None
    return method, path, query, headers, int(raw_length)


class FastFront:
    """A lean HTTP/1.1 server in front of an aiohttp application, for a simulator's hot routes.

    Theory of operation: aiohttp spends over a hundred microseconds of Python on each request,
    which is most of what a simulator costs per message in a benchmark. The front listens in
    aiohttp's place. Each connection starts with it: a request whose method and path are in
    ``routes``, with a plain HTTP/1.1 head (see :func:`_parse_head`) and a ``Content-Length``
    body, is answered by the route's handler through a :class:`FastExchange`, in arrival order,
    keep-alive. The first request it does not take (another route, an upgrade, chunked or
    oversized bodies, ``Connection: close``, an encoded target, a handler that declines by
    answering nothing) is handed, with the rest of the connection, to aiohttp's protocol, which
    serves it as if it had accepted the connection itself. A route therefore answers exactly
    what the aiohttp handler of the same path answers; the responses carry the same headers
    (``Date`` and ``Server`` included).

    Args:
        server: the aiohttp low-level server (``AppRunner.server``) connections are handed to.
        routes: ``(method, path)`` to handler.
        max_body: the largest body a route takes (larger: aiohttp answers 413).
        cancel_on_disconnect: cancel a waiting handler when its client goes away (aiohttp's
            ``handler_cancellation``).
    """

    def __init__(
        self,
        server: Callable[[], asyncio.Protocol],
        routes: Mapping[tuple[str, str], FastHandler],
        *,
        max_body: int = 1024**2,
        cancel_on_disconnect: bool = False,
    ) -> None:
        self.server = server
        self.routes = dict(routes)
        self.max_body = max_body
        self.cancel_on_disconnect = cancel_on_disconnect
        self.connections: set[_FastConnection] = set()
        self.clock = _Clock()
        self.port = 0
        self._listener: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (0: any free port, then read :attr:`port`)."""
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _FastConnection(self), host, port, backlog=128
        )
        self.port = int(self._listener.sockets[0].getsockname()[1])

    async def close(self, grace_s: float = 1.0) -> None:
        """Stop listening; let answers under way finish (up to ``grace_s``); close the rest."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        busy = [conn.busy for conn in self.connections if conn.busy is not None]
        if busy:
            await asyncio.wait(busy, timeout=grace_s)
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()
