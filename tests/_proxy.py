"""A forward HTTP proxy on 127.0.0.1 for tests: ``CONNECT`` tunnels and absolute-form requests
(what aiohttp sends for a plain ``http``/``ws`` URL), each piped to its target as bytes.

It records what it was asked (``("CONNECT", "host:port")`` or ``(method, absolute URL)``; only
the first request of a connection: later ones on it go through the pipe unseen), can demand
Basic credentials (407 without them), and resolves ``aliases`` (host names only it knows, so a
client that bypasses it cannot reach them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from types import TracebackType
from urllib.parse import urlsplit


class TunnelProxy:
    """``async with TunnelProxy() as proxy:`` then ``proxy.url``."""

    def __init__(
        self,
        *,
        credentials: tuple[str, str] | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.aliases = dict(aliases or {})
        self.seen: list[tuple[str, str]] = []
        self.refused = 0
        self._expected = None
        if credentials is not None:
            pair = f"{credentials[0]}:{credentials[1]}".encode()
            self._expected = "Basic " + base64.b64encode(pair).decode()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> TunnelProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        for task in list(self._pipes):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in header_lines if line)
            }
            if self._expected is not None and headers.get("proxy-authorization") != self._expected:
                self.refused += 1
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
                )
                await writer.drain()
                return
            self.seen.append((method, target))
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                host = host.strip("[]")
                up_reader, upstream = await asyncio.open_connection(
                    self.aliases.get(host, host), int(port)
                )
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                parts = urlsplit(target)
                assert parts.hostname is not None
                up_reader, upstream = await asyncio.open_connection(
                    self.aliases.get(parts.hostname, parts.hostname), parts.port or 80
                )
                kept = [
                    line for line in header_lines if line and not line.lower().startswith("proxy-")
                ]
                path = parts.path or "/"
                if parts.query:
                    path += "?" + parts.query
                upstream.write(
                    "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "", ""]).encode("latin-1")
                )
            await writer.drain()
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._pipes.discard(task)
            for w in (writer, upstream):
                if w is not None:
                    w.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()
