"""A lean HTTP/1.1 transport for httpx, used for plain ``http://`` upstreams.

Why: a worker's adapter is the busiest process of a pool serving a local upstream (vLLM,
llama-server), and httpcore's pool costs more CPU per request than all the rest of the
worker. It rescans every pooled connection (a ``poll`` syscall each, and a quadratic count
of idle ones) on every request and release, and runs each read through anyio, h11 and
several context managers. This transport keeps httpx as the API (request building,
headers, content decoding, exception types, proxies from the environment, which httpx
mounts ahead of it) and replaces only the connection pool and the HTTP/1.1 framing: an
asyncio Protocol per connection, a LIFO list of idle ones, and a body iterator that hands
over everything already received in one piece (one network read of several SSE events
becomes one chunk, which the adapter turns into one Delta).

``https://`` stays on httpx's own transport (TLS, HTTP/2).

Failure behaviour matches httpcore's where the adapters depend on it: a connection closed
before any byte of the response raises ``RemoteProtocolError`` (the adapter then retries
once on a fresh connection); a cut mid-body raises ``RemoteProtocolError`` (chunked or
content-length) or ends the body (read-until-close framing); silence longer than the read
timeout raises ``ReadTimeout``; connect failures raise ``ConnectError``/``ConnectTimeout``;
waiting longer than the pool timeout for a free connection raises ``PoolTimeout``. Closing
a response before its end closes its connection, which is how a cancel reaches the server.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator

import httpx

KEEPALIVE_EXPIRY_S = 5.0  # an idle connection older than this is closed, not reused
MAX_HEAD = 64 * 1024  # status line + headers
MAX_CHUNK_LINE = 4096
READ_PAUSE = 1024 * 1024  # buffered bytes above which reading from the socket pauses


class _Conn(asyncio.Protocol):
    """One TCP connection: received bytes accumulate in ``buf``; one reader waits at most."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[bool] | None = None
        self._paused = False

    # -- protocol callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > READ_PAUSE and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake(True)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake(True)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake(True)

    def _wake(self, value: bool) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    # -- for the transport -----------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        return not self.eof and not self.buf and self.transport is not None and \
            not self.transport.is_closing()

    async def more(self, silence_s: float | None, request: httpx.Request) -> bool:
        """Wait for more bytes (True) or the end of the connection with nothing new (False)."""
        if self.eof:
            return False
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        before = len(self.buf)
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(silence_s, self._wake, False) if silence_s is not None else None
        try:
            received = await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if not received:
            raise httpx.ReadTimeout(f"no data from the server for {silence_s}s", request=request)
        return len(self.buf) > before or not self.eof

    def take(self, n: int = -1) -> bytes:
        buf = self.buf
        if n < 0 or n >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        return data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.eof = True


class LeanHTTPTransport(httpx.AsyncBaseTransport):
    """Plain-TCP HTTP/1.1 with keep-alive, at most ``max_connections`` at once."""

    def __init__(self, max_connections: int, keepalive_expiry: float = KEEPALIVE_EXPIRY_S):
        self.max_connections = max(1, max_connections)
        self.keepalive_expiry = keepalive_expiry
        self._idle: list[_Conn] = []  # most recently used last
        self._open = 0  # connections in use, idle or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"this transport speaks plain http, not {request.url.scheme!r}", request=request)
        timeouts = request.extensions.get("timeout", {})
        conn = await self._acquire(request, timeouts)
        try:
            conn.transport.write(await _encode_request(request))  # type: ignore[union-attr]
            status, reason, headers, keep = await _read_head(conn, request, timeouts.get("read"))
        except BaseException:
            self._release(conn, reuse=False)
            raise
        body = _Body(self, conn, request, timeouts.get("read"), headers, status, keep)
        return httpx.Response(status, headers=headers, stream=body,
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason})

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
            self._open -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # -- the pool -----------------------------------------------------------------------------

    async def _acquire(self, request: httpx.Request, timeouts: dict[str, float | None]) -> _Conn:
        deadline: float | None = None
        while True:
            if self._closed:
                raise httpx.ConnectError("transport closed", request=request)
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if conn.reusable and now - conn.idle_since < self.keepalive_expiry:
                    return conn
                conn.close()
                self._open -= 1
            if self._open < self.max_connections:
                self._open += 1
                try:
                    return await _connect(request, timeouts.get("connect"))
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            pool_timeout = timeouts.get("pool")
            if pool_timeout is not None and deadline is None:
                deadline = asyncio.get_running_loop().time() + pool_timeout
            await self._wait_turn(request, deadline)

    async def _wait_turn(self, request: httpx.Request, deadline: float | None) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):  # loop time
                await waiter
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection in time", request=request) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # our turn came as we were cancelled: pass it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()

    def _release(self, conn: _Conn, reuse: bool) -> None:
        if reuse and conn.reusable and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
            self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


async def _connect(request: httpx.Request, limit_s: float | None) -> _Conn:
    host, port = request.url.host, request.url.port or 80
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(limit_s):
            _, conn = await loop.create_connection(_Conn, host, port)
    except TimeoutError:
        raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out",
                                   request=request) from None
    except OSError as exc:
        raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from None
    return conn


async def _encode_request(request: httpx.Request) -> bytes:
    body = await request.aread()
    chunked = False
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
    for name, value in request.headers.raw:
        if name.lower() == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    if chunked:  # a streamed body (the adapters send bytes; this is for completeness)
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    lines.append(body)
    return b"".join(lines)


async def _read_head(
    conn: _Conn, request: httpx.Request, silence_s: float | None
) -> tuple[int, bytes, list[tuple[bytes, bytes]], bool]:
    """Status, reason, headers and whether the connection may be reused afterwards.
    Informational (1xx) responses are skipped."""
    started = False
    while True:
        end = conn.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.buf) > MAX_HEAD:
                raise httpx.RemoteProtocolError("response head too large", request=request)
            started = started or bool(conn.buf)
            if not await conn.more(silence_s, request):
                if started:
                    raise httpx.RemoteProtocolError("server closed the connection mid-head",
                                                    request=request)
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request)
            continue
        head = conn.take(end + 4)[:-4].split(b"\r\n")
        try:
            version, _, rest = head[0].partition(b" ")
            code, _, reason = rest.partition(b" ")
            status = int(code)
            headers = [_header(line) for line in head[1:]]
        except ValueError:
            raise httpx.RemoteProtocolError(f"malformed response head {head[0][:80]!r}",
                                            request=request) from None
        if not version.startswith(b"HTTP/1."):
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x response: {version[:20]!r}",
                                            request=request)
        if 100 <= status < 200 and status != 101:
            started = False
            continue
        tokens = b",".join(v for n, v in headers if n.lower() == b"connection").lower()
        keep = version == b"HTTP/1.1" and b"close" not in tokens
        return status, reason, headers, keep


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, colon, value = line.partition(b":")
    if not colon or not name or name != name.strip():
        raise ValueError(line)
    return name, value.strip()


class _Body(httpx.AsyncByteStream):
    """The response body as it arrives; everything already received goes out in one piece."""

    def __init__(self, pool: LeanHTTPTransport, conn: _Conn, request: httpx.Request,
                 timeout: float | None, headers: list[tuple[bytes, bytes]], status: int,
                 keep: bool) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self._request = request
        self._timeout = timeout
        self._keep = keep
        self._complete = False
        self._length: int | None = None
        self._chunked = False
        if request.method == "HEAD" or status in (204, 304):
            self._length = 0
        else:
            for name, value in headers:
                lname = name.lower()
                if lname == b"transfer-encoding" and b"chunked" in value.lower():
                    self._chunked = True
                elif lname == b"content-length" and not self._chunked:
                    try:
                        self._length = int(value)
                    except ValueError:
                        self._length = None
            if self._chunked:
                self._length = None
            elif self._length is None:
                self._keep = False  # the body ends when the connection does
        if self._length == 0:
            self._complete = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None or self._complete:
            return
        if self._chunked:
            parser = _Chunked()
            while True:
                data = parser.feed(conn.buf)
                if parser.done:
                    self._complete = True
                    if data:
                        yield data
                    return
                if data:
                    yield data
                if not await conn.more(self._timeout, self._request):
                    raise self._cut()
        elif self._length is not None:
            left = self._length
            while True:
                if conn.buf:
                    data = conn.take(left)
                    left -= len(data)
                    if not left:
                        self._complete = True
                    yield data
                    if not left:
                        return
                if not await conn.more(self._timeout, self._request):
                    raise self._cut()
        else:
            while True:
                if conn.buf:
                    yield conn.take()
                if not await conn.more(self._timeout, self._request):
                    self._complete = True
                    return

    def _cut(self) -> httpx.RemoteProtocolError:
        return httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body", request=self._request)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn, reuse=self._complete and self._keep)


class _Chunked:
    """Incremental decoder of ``Transfer-Encoding: chunked``, consuming from a buffer."""

    __slots__ = ("_left", "_state", "done")

    def __init__(self) -> None:
        self._state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailers
        self._left = 0
        self.done = False

    def feed(self, buf: bytearray) -> bytes:
        out: list[bytes] = []
        while True:
            if self._state == 1:
                if not buf:
                    break
                n = min(self._left, len(buf))
                out.append(bytes(buf[:n]))
                del buf[:n]
                self._left -= n
                if self._left:
                    break
                self._state = 2
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    raise httpx.RemoteProtocolError("chunk size line too long")
                break
            line = bytes(buf[:end])
            del buf[: end + 2]
            if self._state == 0:
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise httpx.RemoteProtocolError(f"bad chunk size {line[:40]!r}") from None
                if size < 0:
                    raise httpx.RemoteProtocolError(f"bad chunk size {line[:40]!r}")
                self._left = size
                self._state = 1 if size else 3
            elif self._state == 2:
                if line:
                    raise httpx.RemoteProtocolError("chunk data longer than its size")
                self._state = 0
            elif not line:  # the empty line after the (ignored) trailers
                self.done = True
                break
        return out[0] if len(out) == 1 else b"".join(out)
