"""A lean HTTP/1.1 transport for httpx, used for plain ``http://`` upstreams.

Why: a worker's adapter is the busiest process of a pool serving a local upstream (vLLM,
llama-server), and httpcore's pool costs more CPU per request than the rest of the worker:
it rescans every pooled connection (a ``poll`` syscall each) on every request and release
and runs each read through anyio, h11 and several context managers. This transport keeps
httpx as the API (request building, content decoding, exception types, environment
proxies, which httpx mounts ahead of it) and replaces only the pool: an asyncio Protocol
per connection (``connection.py``, parsed by httptools), a LIFO list of idle ones, and a
body iterator that hands over everything already received in one piece (one network read
of several SSE events is one chunk). ``bench.http_transport`` measures its CPU per request
against httpx's own transport; ``connection.py`` says what the parser rejects and why
httptools rather than h11 (h11 measured at 1.6x this transport's client CPU).

Failures: a connection closed before any response byte raises ``RemoteProtocolError``
("Server disconnected without sending a response.") except on a reused keep-alive
connection, where the request is sent once more on a fresh connection (the server closed
an idle connection as we picked it; it cannot have started on our request). Nothing else
is ever re-sent: a POST to a paid API that may have started generating must not run
twice. A header that cannot be sent raises ``LocalProtocolError`` before connecting. A cut
mid-body raises ``RemoteProtocolError`` (or ends a read-until-close body); silence longer
than the read timeout raises ``ReadTimeout``; connect failures raise
``ConnectError``/``ConnectTimeout``; no free connection within the pool timeout raises
``PoolTimeout``. Closing a response before its end closes its connection, which is how a
cancel reaches the server. ``https://`` stays on httpx's own transport (TLS, HTTP/2).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator

import httpx

from tokenhive.workers.backends.http.connection import Conn, Stale, encode_request

KEEPALIVE_EXPIRY_S = 5.0  # an idle connection older than this is closed, not reused


class LeanHTTPTransport(httpx.AsyncBaseTransport):
    """Plain-TCP HTTP/1.1 with keep-alive, at most ``max_connections`` at once."""

    def __init__(self, max_connections: int, keepalive_expiry: float = KEEPALIVE_EXPIRY_S):
        self.max_connections = max(1, max_connections)
        self.keepalive_expiry = keepalive_expiry
        self._idle: list[Conn] = []  # most recently used last
        self._open = 0  # connections in use, idle or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"this transport speaks plain http, not {request.url.scheme!r}", request=request)
        # A header that cannot be sent fails here, before a connection is touched.
        wire = encode_request(request, await request.aread())
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        conn = await self._acquire(request, timeouts)
        try:
            try:
                await conn.exchange(request, wire, timeouts.get("read"))
            except Stale:
                # Reused, and closed before any byte of an answer: resend once, on a fresh
                # connection in the same slot. A failure there is final (Stale needs reuse).
                conn.close()
                conn = await _connect(request, timeouts.get("connect"))
                await conn.exchange(request, wire, timeouts.get("read"))
        except BaseException:
            self._release(conn, reuse=False)
            raise
        return httpx.Response(conn.status, headers=conn.headers,
                              stream=_Body(self, conn, request, timeouts.get("read")),
                              extensions={"http_version": b"HTTP/1.1",
                                          "reason_phrase": conn.reason})

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

    async def _acquire(self, request: httpx.Request, timeouts: dict[str, float | None]) -> Conn:
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

    def _release(self, conn: Conn, reuse: bool) -> None:
        if reuse and not self._closed and conn.next_cycle():
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


async def _connect(request: httpx.Request, limit_s: float | None) -> Conn:
    host, port = request.url.host, request.url.port or 80
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(limit_s):
            _, conn = await loop.create_connection(Conn, host, port)
    except TimeoutError:
        raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out",
                                   request=request) from None
    except OSError as exc:
        raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from None
    return conn


class _Body(httpx.AsyncByteStream):
    """The response body as it arrives; everything already received goes out in one piece."""

    def __init__(self, pool: LeanHTTPTransport, conn: Conn, request: httpx.Request,
                 timeout: float | None) -> None:
        self._pool = pool
        self._conn: Conn | None = conn
        self._request = request
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        while True:
            if conn.body:
                yield conn.take()
            elif conn.done:
                return
            elif conn.error:
                raise httpx.RemoteProtocolError(conn.error, request=self._request)
            elif conn.eof:
                if not conn.until_close:
                    raise httpx.RemoteProtocolError(
                        "peer closed connection without sending complete message body",
                        request=self._request)
                return  # the body's end (keep is False: the connection goes)
            else:
                await conn.more(self._timeout, self._request)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # A response already here in full (say an unread 204) leaves the connection
            # usable; one still arriving closes it, which tells the server to stop.
            self._pool._release(conn, reuse=conn.done)
