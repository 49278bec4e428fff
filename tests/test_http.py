"""The gateway's HTTP/1.1 client, against real servers on 127.0.0.1: aiohttp's, and raw
asyncio servers that write exact bytes (framings, malformed answers, closes)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from _proxy import TunnelProxy
from imrelay.http import HTTPClient, HTTPConnectError, HTTPError, HTTPProtocolError

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve_raw(handler: Handler) -> tuple[asyncio.Server, str]:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(closing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


@pytest.fixture
async def app_url() -> AsyncIterator[str]:
    """An aiohttp server: /echo (body back), /stream (SSE, slowly), /status/{n}."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(
            body=body,
            headers={
                "X-Method": request.method,
                "X-Agent": request.headers.get("User-Agent", ""),
                "X-Host": request.headers.get("Host", ""),
            },
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DO")
        await asyncio.sleep(0.01)
        await resp.write(b"NE]\r\n\r\n")
        await resp.write_eof()
        return resp

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["n"]), text="x")

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/stream", stream)
    app.router.add_get("/status/{n}", status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_http_post_reads_status_headers_and_body_and_reuses_the_connection(
    app_url: str,
) -> None:
    """Sequential requests share one keep-alive connection; Host and User-Agent are sent."""
    async with HTTPClient(user_agent="imrelay-test") as client:
        for i in range(5):
            async with await client.request(
                "POST", f"{app_url}/echo?q=1", body=f"hello {i}".encode()
            ) as resp:
                assert resp.status == 200
                assert resp.headers["x-method"] == "POST"
                assert resp.headers["x-agent"] == "imrelay-test"
                assert resp.headers["x-host"] == app_url.removeprefix("http://")
                assert await resp.read() == f"hello {i}".encode()
        assert client.connections_made == 1


async def test_http_concurrent_requests_stay_within_the_limit(app_url: str) -> None:
    """20 requests at once over a limit of 3 connections all succeed on at most 3."""
    async with HTTPClient(limit=3) as client:

        async def one(i: int) -> bytes:
            resp = await client.request("POST", f"{app_url}/echo", body=str(i).encode())
            return await resp.read()

        bodies = await asyncio.gather(*(one(i) for i in range(20)))
        assert bodies == [str(i).encode() for i in range(20)]
        assert client.connections_made <= 3


async def test_http_streams_lines_across_chunk_boundaries(app_url: str) -> None:
    """A chunked SSE body, a line split over two writes included, arrives line by line."""
    async with HTTPClient() as client:
        resp = await client.request(
            "GET", f"{app_url}/stream", headers={"Accept": "text/event-stream"}
        )
        assert resp.headers["content-type"] == "text/event-stream"
        lines = (await resp.read()).splitlines()
        assert lines == [b"data: 0", b"", b"data: 1", b"", b"data: 2", b"", b"data: [DONE]", b""]
        # read to the end: the connection is reused
        again = await client.request("GET", f"{app_url}/status/204")
        assert again.status == 204
        assert await again.read() == b""
        assert client.connections_made == 1


async def test_http_error_statuses_are_answers_not_exceptions(app_url: str) -> None:
    """4xx and 5xx come back as responses with their body."""
    async with HTTPClient() as client:
        for code in (400, 404, 429, 500, 503):
            resp = await client.request("GET", f"{app_url}/status/{code}")
            assert (resp.status, await resp.read()) == (code, b"x")


async def test_http_unread_body_closes_the_connection(app_url: str) -> None:
    """A response released before its end is not reused (its rest would be read as the next
    answer)."""
    async with HTTPClient() as client:
        resp = await client.request("GET", f"{app_url}/stream")
        assert (await resp.read_chunk()).startswith(b"data: 0")
        resp.release()
        again = await client.request("POST", f"{app_url}/echo", body=b"next")
        assert await again.read() == b"next"
        assert client.connections_made == 2


async def test_http_refused_connection_is_a_connect_error() -> None:
    """Nothing listening: HTTPConnectError, an OSError, naming the target."""
    server, url = await _serve_raw(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()
    async with HTTPClient() as client:
        with pytest.raises(HTTPConnectError, match=r"cannot connect to 127\.0\.0\.1") as info:
            await client.request("GET", url + "/")
        assert isinstance(info.value, OSError)


async def test_http_content_length_and_close_delimited_bodies() -> None:
    """Raw answers: Content-Length in pieces, then a body that ends when the server closes."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_request(reader)
        served += 1
        if served == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"world")
            await writer.drain()
            await _read_request(reader)  # the same connection carries the second request
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        writer.close()

    server, url = await _serve_raw(handler)
    async with server, HTTPClient() as client:
        first = await client.request("GET", url + "/a")
        assert await first.read() == b"helloworld"
        second = await client.request("GET", url + "/b")
        assert await second.read() == b"until the end"
        assert client.connections_made == 1
        # close-delimited: that connection is spent, the next request opens another
        assert not client._pools[next(iter(client._pools))].idle


async def test_http_chunked_with_extensions_and_trailers() -> None:
    """Chunk extensions are ignored and trailers skipped; the connection stays usable."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await _read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
            )
            await writer.drain()
        writer.close()

    server, url = await _serve_raw(handler)
    async with server, HTTPClient() as client:
        for _ in range(2):
            resp = await client.request("POST", url + "/", body=b"{}")
            assert await resp.read() == b"hello world"
        assert client.connections_made == 1


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"SMTP ready\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n", "malformed response header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "before the end of the body"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX", "not followed"),
        (b"", "connection closed by the server"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000, "too long"),
    ],
)
async def test_http_unreadable_answers_are_protocol_errors(answer: bytes, error: str) -> None:
    """Each malformed answer is an HTTPProtocolError with a clear text, never a hang."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server, url = await _serve_raw(handler)
    async with server, HTTPClient() as client:

        async def exchange() -> bytes:
            resp = await client.request("GET", url + "/")
            return await resp.read()

        with pytest.raises(HTTPProtocolError, match=error):
            await exchange()


async def test_http_server_closing_an_idle_connection_is_noticed_before_reuse() -> None:
    """The server closes a keep-alive connection between requests: the next request goes on a
    new connection instead of failing (and is sent once)."""
    requests = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await _read_request(reader)
        requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # without "Connection: close": the client finds out from the socket

    server, url = await _serve_raw(handler)
    async with server, HTTPClient() as client:
        for _ in range(3):
            resp = await client.request("POST", url + "/", body=b"x")
            assert await resp.read() == b"ok"
            await asyncio.sleep(0.05)
        assert requests == 3
        assert client.connections_made == 3


async def test_http_idle_connections_expire() -> None:
    """A connection idle longer than keepalive_s is not reused."""
    now = [0.0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    server, url = await _serve_raw(handler)
    async with server, HTTPClient(keepalive_s=5, clock=lambda: now[0]) as client:
        await (await client.request("GET", url + "/")).read()
        now[0] = 4.0
        await (await client.request("GET", url + "/")).read()
        assert client.connections_made == 1
        now[0] = 10.0
        await (await client.request("GET", url + "/")).read()
        assert client.connections_made == 2


async def test_http_cancelled_request_frees_its_place() -> None:
    """A request cancelled while waiting for its answer closes that connection and lets the
    next caller in (limit 1); the server never answers the first one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await _read_request(reader)
        if b"/slow" in head:
            await reader.read()  # until the client closes: never answered
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    server, url = await _serve_raw(handler)
    async with server, HTTPClient(limit=1) as client:
        slow = asyncio.create_task(client.request("GET", url + "/slow"))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(client.request("GET", url + "/fast"))
        await asyncio.sleep(0.05)
        assert not queued.done()
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        resp = await asyncio.wait_for(queued, 5)
        assert await resp.read() == b"ok"
        assert client.connections_made == 2


async def test_http_request_line_carries_path_and_query_as_given() -> None:
    """URLs with a query (a sessionWebhook each) share their origin and path with the plain
    URL but keep their own query; a fragment never goes out."""
    lines: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await _read_request(reader)
            lines.append(head.split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    server, url = await _serve_raw(handler)
    targets = [
        "/robot/send?session=a1",
        "/robot/send?session=b2&x=%2F",
        "/robot/send",
        "?only=query",
        "/p?q=1#frag",
        "/p?",
    ]
    async with server, HTTPClient() as client:
        for target in targets:
            (await client.request("POST", url + target, body=b"")).release()
    assert lines == [
        b"POST /robot/send?session=a1 HTTP/1.1",
        b"POST /robot/send?session=b2&x=%2F HTTP/1.1",
        b"POST /robot/send HTTP/1.1",
        b"POST /?only=query HTTP/1.1",
        b"POST /p?q=1 HTTP/1.1",
        b"POST /p HTTP/1.1",
    ]
    assert client.connections_made == 1


async def test_http_line_breaks_in_a_query_never_reach_the_request_line() -> None:
    """A query holding CR, LF or a tab (a sessionWebhook comes from the platform's payload)
    cannot split the request: the line breaks are dropped, as urlsplit does."""
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await _read_request(reader)
            heads.append(head)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    server, url = await _serve_raw(handler)
    async with server, HTTPClient() as client:
        for query in ("session=x\r\nX-Evil: 1", "a=1\tb=2", "s=\n"):
            (await client.request("POST", f"{url}/hook?{query}", body=b"")).release()
    assert [h.split(b"\r\n", 1)[0] for h in heads] == [
        b"POST /hook?session=xX-Evil: 1 HTTP/1.1",
        b"POST /hook?a=1b=2 HTTP/1.1",
        b"POST /hook?s= HTTP/1.1",
    ]
    assert not any(b"\r\nX-Evil" in h for h in heads)


def test_http_rejects_bad_urls_and_header_injection() -> None:
    """Relative or non-http URLs and header values with line breaks never reach a socket."""

    async def main() -> None:
        async with HTTPClient() as client:
            for url in ("/relative", "ftp://h/x", "http:///nohost", "http://h:99999/"):
                with pytest.raises(ValueError, match="url"):
                    await client.request("GET", url)
            # the message never shows a query or credentials (a sessionWebhook's session)
            for url in ("ftp://u:pw@h/x?session=SECRET1", "http://h:99999/x?session=SECRET1"):
                with pytest.raises(ValueError, match="url") as info:
                    await client.request("GET", url)
                assert "SECRET1" not in str(info.value)
                assert "pw" not in str(info.value)
            with pytest.raises(ValueError, match="line break"):
                await client.request("GET", "http://127.0.0.1:9/", headers={"X": "a\r\nB: c"})
        with pytest.raises(HTTPError, match="closed"):
            await client.request("GET", "http://127.0.0.1:9/")

    asyncio.run(main())


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def _tls_echo_server(tmp_path: Path) -> tuple[asyncio.Server, Path]:
    """A TLS server on 127.0.0.1 that answers each request with its body, and its
    self-signed certificate."""
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx), cert


async def test_http_https_verifies_the_server(tmp_path: Path) -> None:
    """TLS: a server whose certificate the context trusts answers; with the default trust
    store the same server is refused at the handshake (a connect error)."""
    server, cert = await _tls_echo_server(tmp_path)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    async with server:
        trusting = ssl.create_default_context(cafile=str(cert))
        async with HTTPClient(ssl_context=trusting) as client:
            resp = await client.request("POST", url, body=b"secret-free")
            assert await resp.read() == b"secret-free"
        async with HTTPClient() as client:
            with pytest.raises(HTTPConnectError, match="SSL"):
                await client.request("POST", url, body=b"x")
            context = client._ssl  # the system trust store, loaded once per client
            assert context is not None
            with pytest.raises(HTTPConnectError, match="SSL"):
                await client.request("POST", url, body=b"x")
            assert client._ssl is context


async def test_http_tunnels_through_a_proxy_and_keeps_the_tunnel(app_url: str) -> None:
    """With a proxy every connection is a CONNECT tunnel to the target; the proxy sees host and
    port only, and a kept-alive connection is the same tunnel."""
    async with TunnelProxy() as proxy, HTTPClient(proxy=proxy.url) as client:
        for body in (b"one", b"two"):
            resp = await client.request("POST", f"{app_url}/echo", body=body)
            assert await resp.read() == body
        assert client.connections_made == 1
        assert proxy.seen == [("CONNECT", app_url.removeprefix("http://"))]


async def test_http_proxy_credentials_and_a_refused_tunnel(app_url: str) -> None:
    """Credentials in the proxy URL go as Basic Proxy-Authorization; a tunnel refused (407)
    is a connect error naming the proxy's status, never the password."""
    async with TunnelProxy(credentials=("svc-imrelay", "p@ss:wörd")) as proxy:
        port = proxy.url.rsplit(":", 1)[1]
        good = f"http://svc-imrelay:p%40ss%3Aw%C3%B6rd@127.0.0.1:{port}"
        async with HTTPClient(proxy=good) as client:
            resp = await client.request("POST", f"{app_url}/echo", body=b"ok")
            assert await resp.read() == b"ok"
        bad = f"http://svc-imrelay:wrong-secret@127.0.0.1:{port}"
        async with HTTPClient(proxy=bad) as client:
            with pytest.raises(HTTPConnectError, match=r"refused a tunnel.*http 407") as info:
                await client.request("POST", f"{app_url}/echo", body=b"x")
            assert "wrong-secret" not in str(info.value)
            assert "wrong-secret" not in repr(client._proxy)
        assert proxy.refused == 1
        assert len(proxy.seen) == 1


async def test_http_https_runs_end_to_end_inside_the_tunnel(tmp_path: Path) -> None:
    """TLS is negotiated with the target through the tunnel (the proxy only pipes bytes): the
    target's certificate is verified as without a proxy."""
    server, cert = await _tls_echo_server(tmp_path)
    port = server.sockets[0].getsockname()[1]
    async with server, TunnelProxy() as proxy:
        trusting = ssl.create_default_context(cafile=str(cert))
        async with HTTPClient(ssl_context=trusting, proxy=proxy.url) as client:
            resp = await client.request("POST", f"https://127.0.0.1:{port}/", body=b"sealed")
            assert await resp.read() == b"sealed"
        async with HTTPClient(proxy=proxy.url) as client:  # the system trust store: refused
            with pytest.raises(HTTPConnectError, match="SSL"):
                await client.request("POST", f"https://127.0.0.1:{port}/", body=b"x")
        assert proxy.seen == [("CONNECT", f"127.0.0.1:{port}")] * 2


async def test_http_proxy_that_is_down_or_not_a_proxy() -> None:
    """No proxy listening: a connect error naming the proxy. A server that answers CONNECT
    with something other than HTTP: a connect error too. A URL that is not an HTTP proxy's is
    refused when the client is made."""

    async def not_a_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    server, url = await _serve_raw(not_a_proxy)
    async with server, HTTPClient(proxy=url) as client:
        with pytest.raises(HTTPConnectError, match="gave no tunnel"):
            await client.request("GET", "http://127.0.0.1:9/")
    async with HTTPClient(proxy="http://127.0.0.1:9", connect_timeout_s=2) as client:
        with pytest.raises(HTTPConnectError, match=r"through the proxy 127\.0\.0\.1:9"):
            await client.request("GET", "http://example.invalid/")
    for bad in ("https://proxy:3128", "socks5://proxy:1080", "http://proxy:3128/path", "proxy"):
        with pytest.raises(ValueError, match="proxy"):
            HTTPClient(proxy=bad)
