"""A small HTTP/1.1 client for the gateway's own outbound calls (model endpoints, DingTalk).

Theory of operation: every message the gateway answers costs at least two outbound requests
(the model call and the reply), so their client cost bounds throughput. A general-purpose client
(aiohttp's ``ClientSession``) spends ~150–250 µs of CPU per request on this machine building
URL objects, multidicts, cookie handling, tracing hooks and timers the gateway never uses; this
client does what the gateway needs in about a quarter of that:

- ``http`` and ``https`` (TLS with the system's trust store, or a given ``ssl.SSLContext``);
  no cookies, no redirects, no compression (it sends no ``Accept-Encoding``, so a server
  answers in identity encoding);
- optionally through an HTTP forward proxy (``proxy="http://[user:password@]host:port"``):
  every connection is a ``CONNECT`` tunnel to the target (TLS, for ``https``, runs inside it,
  end to end), so the proxy sees host and port, never a request; a refused tunnel (407, 403,
  …) is an :class:`HTTPConnectError` naming the proxy's status, never its credentials;
- a pool of keep-alive connections per origin (scheme, host, port), bounded by ``limit`` (callers
  beyond it wait for a connection); a connection goes back to the pool only after its response
  was read to the end and neither side asked to close it, and an idle one is dropped after
  ``keepalive_s``, or as soon as the server closes it;
- responses framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the end of the
  connection; the body is read whole (:meth:`Response.read`) or as it arrives
  (:meth:`Response.read_chunk`, :meth:`Response.iter_chunks`) for server-sent events.

A request is never sent twice: a pooled connection the server closed is noticed (its protocol
saw the end of the stream) and discarded before use, and if a connection fails after the
request was written, the error goes to the caller, which knows whether a retry is safe.

Errors: :class:`HTTPConnectError` (the connection could not be made: refused, unreachable, DNS,
TLS handshake, connect timeout) and :class:`HTTPProtocolError` (the connection broke or the
server's answer is not HTTP/1.1 as this client understands it) are both :class:`HTTPError`,
itself an :class:`OSError`, so code written for ``ConnectionError``/``OSError`` keeps working.
Timeouts of a whole exchange are the caller's (``asyncio.timeout``); cancelling a request
closes its connection.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final
from urllib.parse import unquote, urlsplit

__all__ = [
    "HTTPClient",
    "HTTPConnectError",
    "HTTPConnectTimeout",
    "HTTPError",
    "HTTPProtocolError",
    "HTTPStatusError",
    "ProxyURL",
    "Response",
]

_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 64 * 1024 * 1024
_READ_CHUNK: Final = 64 * 1024
_NO_BODY_STATUS: Final = frozenset({204, 304})


class HTTPError(OSError):
    """An outbound HTTP exchange failed."""


class HTTPConnectError(HTTPError):
    """The connection could not be made (refused, unreachable, DNS, TLS, connect timeout)."""


class HTTPConnectTimeout(HTTPConnectError, TimeoutError):
    """The connection was not made within the connect timeout."""


class HTTPProtocolError(HTTPError):
    """The connection broke, or the answer is not HTTP/1.1 as this client reads it."""


class HTTPStatusError(Exception):
    """An answer with an error status, for callers that report one as the cause of their own
    error. It holds the method, the URL without query or credentials, the status and the
    reason; never headers or body (either may repeat a credential)."""

    def __init__(self, method: str, url: str, status: int, reason: str) -> None:
        self.url = _shown(url)
        self.method = method
        self.status = status
        self.reason = reason
        super().__init__(f"{method} {self.url}: http {status} {reason}".rstrip())


def _shown(url: str) -> str:
    """``url`` as errors may show it: without query, fragment or credentials (a DingTalk
    sessionWebhook carries its session in the query), cut to 100 characters."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:  # a bad port: show no host part at all
        return "<unparsable url>"
    return f"{parts.scheme}://{host}{parts.path}"[:100]


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True, repr=False)
class ProxyURL:
    """An HTTP proxy's ``http://[user:password@]host:port``, parsed (user and password
    percent-decoded). Its repr shows host and port only."""

    host: str
    port: int
    user: str | None = None
    password: str = ""

    @classmethod
    def parse(cls, url: str) -> ProxyURL:
        """Parse ``url``.

        Raises:
            ValueError: not such a URL (the text never repeats it: it may hold a password).
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError("not a proxy url with a valid port") from None
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ValueError("must be http://host:port of an HTTP proxy")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("must be http://host:port of an HTTP proxy, without a path")
        user = None if parts.username is None else unquote(parts.username)
        if user is not None and ":" in user:
            raise ValueError("the proxy's user name must not hold a ':'")
        return cls(parts.hostname, port or 80, user, unquote(parts.password or ""))

    def __repr__(self) -> str:
        return f"ProxyURL({self.host!r}, {self.port})"

    @property
    def address(self) -> str:
        """``host:port`` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value (Basic, UTF-8), when a user was given."""
        if self.user is None:
            return None
        pair = f"{self.user}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


class _Connection(asyncio.Protocol):
    """One socket: bytes arrive in ``buffer``; a waiter is woken when more come or it ends."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading -------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, and the server has neither closed it nor sent anything unasked."""
        transport = self.transport
        return (
            transport is not None
            and not transport.is_closing()
            and not self.eof
            and not self.buffer
        )

    async def fill(self) -> None:
        """Wait until more bytes arrive; raise :class:`HTTPProtocolError` if the stream ends
        first."""
        before = len(self.buffer)
        await self.fill_or_end()
        if len(self.buffer) == before:  # woken by the end, not by data
            detail = f": {self.error}" if self.error is not None else ""
            raise HTTPProtocolError(f"connection closed by the server{detail}")

    async def read_until(self, marker: bytes, limit: int) -> bytes:
        """Bytes up to and including ``marker``."""
        start = 0
        while True:
            index = self.buffer.find(marker, start)
            if index >= 0:
                end = index + len(marker)
                data = bytes(self.buffer[:end])
                del self.buffer[:end]
                return data
            if len(self.buffer) > limit:
                raise HTTPProtocolError("response line or header too long")
            start = max(len(self.buffer) - len(marker) + 1, 0)
            await self.fill()

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self.fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_some(self, size: int) -> bytes:
        """Up to ``size`` buffered bytes, waiting for some; ``b""`` once the stream ended."""
        if not self.buffer:
            if self.eof:
                return b""
            await self.fill_or_end()
            if not self.buffer:
                return b""
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def fill_or_end(self) -> None:
        """Wait until more bytes arrive or the stream ends (at once if it has ended)."""
        if self.eof:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.eof = True


@dataclass(slots=True)
class _Pool:
    idle: collections.deque[_Connection] = field(default_factory=collections.deque)
    busy: int = 0
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


class Response:
    """An HTTP response whose body has not been read yet.

    Read it with :meth:`read`, :meth:`read_chunk` or :meth:`iter_chunks`, or leave it with
    :meth:`release` (also by ``async with``); a body left unread closes the connection.
    """

    def __init__(
        self,
        client: HTTPClient,
        origin: _Origin,
        conn: _Connection,
        status: int,
        reason: str,
        headers: dict[str, str],
        *,
        keep_alive: bool,
        length: int | None,
        chunked: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        """Response headers, names in lower case (a repeated header: its last value)."""
        self._client = client
        self._origin = origin
        self._conn: _Connection | None = conn
        self._keep_alive = keep_alive
        self._remaining = length  # None: chunked or until close
        self._chunked = chunked
        self._chunk_left = 0
        self._done = length == 0
        if self._done:
            self._finish()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def read(self, limit: int = _MAX_BODY) -> bytes:
        """The whole body (at most ``limit`` bytes, else :class:`HTTPProtocolError`)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > limit:
                self.release()
                raise HTTPProtocolError(f"response body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrives; ``b""`` at its end.

        If a wait for it is cancelled (a timeout), the rest of the body cannot be read any
        more: :meth:`release` then closes the connection.
        """
        try:
            return await self._next_chunk() or b""
        except BaseException:
            self.release()
            raise

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunk boundaries carry no meaning)."""
        try:
            while (chunk := await self._next_chunk()) is not None:
                yield chunk
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the connection back (body read to the end) or close it (body left unread)."""
        if self._conn is None:
            return
        if not self._done:
            self._keep_alive = False
        self._finish()

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._release(self._origin, conn, reusable=self._keep_alive)

    async def _next_chunk(self) -> bytes | None:
        conn = self._conn
        if self._done or conn is None:
            return None
        if self._chunked:
            data = await self._next_chunked(conn)
        elif self._remaining is not None:
            data = await conn.read_some(min(self._remaining, _READ_CHUNK))
            if not data:
                raise HTTPProtocolError("connection closed before the end of the body")
            self._remaining -= len(data)
            if self._remaining == 0:
                self._done = True
        else:  # until the server closes
            data = await conn.read_some(_READ_CHUNK)
            if not data:
                self._done = True
        if self._done:
            self._finish()
        return data or None

    async def _next_chunked(self, conn: _Connection) -> bytes:
        if self._chunk_left == 0:
            line = await conn.read_until(b"\r\n", 1024)
            size_text = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HTTPProtocolError("bad chunk size in the response") from None
            if size < 0:
                raise HTTPProtocolError("bad chunk size in the response")
            if size == 0:  # last chunk: skip trailers up to the blank line
                while await conn.read_until(b"\r\n", _MAX_HEAD) != b"\r\n":
                    pass
                self._done = True
                return b""
            self._chunk_left = size
        data = await conn.read_some(min(self._chunk_left, _READ_CHUNK))
        if not data:
            raise HTTPProtocolError("connection closed inside a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and await conn.read_exactly(2) != b"\r\n":
            raise HTTPProtocolError("chunk not followed by CRLF")
        return data


class HTTPClient:
    """Keep-alive HTTP/1.1 requests (see the module docstring).

    Args:
        limit: the most connections per origin (others wait for one).
        connect_timeout_s: bound on making a connection (TCP and TLS).
        keepalive_s: an idle connection older than this is closed, not reused.
        ssl_context: for ``https``; default: the system's trust store.
        user_agent: sent unless a request sets its own ``User-Agent``.
        clock: monotonic seconds (idle ages).
        proxy: ``http://[user:password@]host:port`` of an HTTP proxy to tunnel every
            connection through (see the module docstring); ``None``: connect directly.

    Raises:
        ValueError: ``limit`` below 1, or ``proxy`` not such a URL.
    """

    def __init__(
        self,
        *,
        limit: int = 256,
        connect_timeout_s: float = 10.0,
        keepalive_s: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = "imrelay",
        clock: collections.abc.Callable[[], float] = time.monotonic,
        proxy: str | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._proxy = ProxyURL.parse(proxy) if proxy is not None else None
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._ssl = ssl_context
        self._user_agent = user_agent
        self._clock = clock
        self._pools: dict[_Origin, _Pool] = {}
        self._origins: dict[str, tuple[_Origin, str]] = {}
        self._closed = False
        self.connections_made = 0
        """Connections opened so far (to see keep-alive working)."""

    async def __aenter__(self) -> HTTPClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self._closed = True
        for pool in self._pools.values():
            while pool.idle:
                pool.idle.popleft().close()
            while pool.waiters:
                waiter = pool.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
        await asyncio.sleep(0)  # let transports finish closing

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send a request; return the response once its status line and headers arrived.

        Args:
            method: ``GET``, ``POST``, …
            url: an absolute ``http://`` or ``https://`` URL.
            body: the request body (sent with ``Content-Length``).
            headers: request headers; ``Host``, ``Content-Length`` and ``Connection`` are set
                here.

        Raises:
            HTTPConnectError: the connection could not be made.
            HTTPProtocolError: the connection broke or the answer is unreadable.
            ValueError: the URL is not an absolute http(s) URL.
        """
        if self._closed:
            raise HTTPProtocolError("client is closed")
        origin, target = self._split(url)
        head = self._head(method, origin, target, body, headers)
        conn = await self._acquire(origin)
        try:
            conn.transport.write(head + body if body else head)  # type: ignore[union-attr]
            return await self._response(method, origin, conn)
        except BaseException:
            self._release(origin, conn, reusable=False)
            raise

    # -- internals -------------------------------------------------------------------------

    def _split(self, url: str) -> tuple[_Origin, str]:
        cached = self._origins.get(url)
        if cached is not None:
            return cached
        base, mark, query = url.partition("?")
        # e.g. a sessionWebhook: its base is cached. Only a plain query: urlsplit strips tabs
        # and line breaks, and a line break must never reach the request line
        if mark and query and "#" not in url and query.isascii() and query.isprintable():
            cached = self._origins.get(base)
            if cached is None:
                cached = self._split(base)
            origin, path = cached
            return origin, f"{path}?{query}"
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an absolute http(s) url: {_shown(url)!r}")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"bad port in url: {_shown(url)!r}") from None
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        result = (_Origin(scheme, parts.hostname, port), target)
        # URLs with a query (each sessionWebhook is one, and holds its session) are not kept
        if not parts.query and len(self._origins) < 1024:
            self._origins[url] = result
        return result

    def _head(
        self,
        method: str,
        origin: _Origin,
        target: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
    ) -> bytes:
        if "\r" in target or "\n" in target:
            raise ValueError("the request target holds a line break")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.host_header}"]
        has_agent = False
        if headers:
            for name, value in headers.items():
                if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                    raise ValueError(f"header {name!r} holds a line break")
                lowered = name.lower()
                if lowered in ("host", "content-length", "connection", "transfer-encoding"):
                    continue
                has_agent = has_agent or lowered == "user-agent"
                lines.append(f"{name}: {value}")
        if not has_agent:
            lines.append(f"User-Agent: {self._user_agent}")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body) if body else 0}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    async def _response(self, method: str, origin: _Origin, conn: _Connection) -> Response:
        while True:
            head = await conn.read_until(b"\r\n\r\n", _MAX_HEAD)
            status, reason, headers = _parse_head(head)
            if status >= 200 or status == 101:
                break  # 1xx informational answers precede the real one
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length: int | None = None
        if method == "HEAD" or status in _NO_BODY_STATUS or status < 200:
            length = 0
        elif not chunked:
            raw = headers.get("content-length")
            if raw is not None:
                try:
                    length = int(raw)
                except ValueError:
                    raise HTTPProtocolError("bad Content-Length in the response") from None
                if length < 0:
                    raise HTTPProtocolError("bad Content-Length in the response")
            else:
                keep_alive = False  # the body ends when the server closes
        return Response(
            self,
            origin,
            conn,
            status,
            reason,
            headers,
            keep_alive=keep_alive,
            length=length,
            chunked=chunked,
        )

    async def _acquire(self, origin: _Origin) -> _Connection:
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool()
        while True:
            now = self._clock()
            while pool.idle:
                conn = pool.idle.pop()  # the most recently used: least likely to be stale
                if conn.usable and now - conn.idle_since < self.keepalive_s:
                    pool.busy += 1
                    return conn
                conn.close()
            if pool.busy < self.limit:
                pool.busy += 1
                try:
                    return await self._connect(origin)
                except BaseException:
                    pool.busy -= 1
                    self._wake_one(pool)
                    raise
            waiter = asyncio.get_running_loop().create_future()
            pool.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in pool.waiters:
                    pool.waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake_one(pool)  # pass the turn on
                raise
            if self._closed:
                raise HTTPProtocolError("client is closed")

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if origin.scheme == "https":
            if self._ssl is None:  # loading the trust store costs milliseconds: once per client
                self._ssl = ssl.create_default_context()
            context = self._ssl
        proxy = self._proxy
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if proxy is not None:
                    conn = await self._tunnel(proxy, origin, context)
                else:
                    _, conn = await loop.create_connection(
                        _Connection,
                        origin.host,
                        origin.port,
                        ssl=context,
                        server_hostname=origin.host if context is not None else None,
                    )
        except TimeoutError:
            raise HTTPConnectTimeout(
                f"connecting to {origin.host_header} timed out after {self.connect_timeout_s:g} s"
            ) from None
        except HTTPConnectError:
            raise
        except (OSError, ssl.SSLError) as exc:
            via = f" through the proxy {proxy.address}" if proxy is not None else ""
            raise HTTPConnectError(
                f"cannot connect to {origin.host_header}{via}: {type(exc).__name__}: {exc}"
            ) from exc
        self.connections_made += 1
        return conn

    async def _tunnel(
        self, proxy: ProxyURL, origin: _Origin, context: ssl.SSLContext | None
    ) -> _Connection:
        """A connection to ``origin`` through a ``CONNECT`` tunnel of ``proxy`` (TLS inside
        it when ``context`` is given)."""
        loop = asyncio.get_running_loop()
        transport, conn = await loop.create_connection(_Connection, proxy.host, proxy.port)
        try:
            host = f"[{origin.host}]" if ":" in origin.host else origin.host
            target = f"{host}:{origin.port}"
            lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
            if proxy.authorization is not None:
                lines.append(f"Proxy-Authorization: {proxy.authorization}")
            transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            try:
                status, reason, _ = _parse_head(await conn.read_until(b"\r\n\r\n", _MAX_HEAD))
            except HTTPProtocolError as exc:
                raise HTTPConnectError(
                    f"the proxy {proxy.address} gave no tunnel to {origin.host_header}: {exc}"
                ) from None
            if not 200 <= status < 300:
                raise HTTPConnectError(
                    f"the proxy {proxy.address} refused a tunnel to {origin.host_header}:"
                    f" http {status} {reason}".rstrip()
                )
            if conn.buffer:  # the tunnel's first bytes are ours to send
                raise HTTPConnectError(f"the proxy {proxy.address} sent data into the tunnel")
            if context is not None:
                tls = await loop.start_tls(transport, conn, context, server_hostname=origin.host)
                if tls is None:
                    raise HTTPConnectError(f"no TLS through the proxy to {origin.host_header}")
                conn.transport = tls
        except BaseException:
            transport.close()
            raise
        return conn

    def _release(self, origin: _Origin, conn: _Connection, *, reusable: bool) -> None:
        pool = self._pools[origin]
        pool.busy -= 1
        if reusable and conn.usable and not self._closed:
            conn.idle_since = self._clock()
            pool.idle.append(conn)
        else:
            conn.close()
        self._wake_one(pool)

    @staticmethod
    def _wake_one(pool: _Pool) -> None:
        while pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    text = head[:-4].decode("latin-1")  # decodes any byte
    status_line, *header_lines = text.split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HTTPProtocolError(f"not an HTTP/1.x status line: {status_line[:60]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HTTPProtocolError(f"malformed response header line: {line[:60]!r}")
        headers[name.lower()] = value.strip()
    return int(code), reason, headers
