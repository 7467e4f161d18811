"""One HTTP/1.1 client connection for ``transport.py``: an asyncio Protocol whose received
bytes are parsed as they arrive by httptools (llhttp, Node's parser: strict and maintained).

llhttp rejects a Content-Length that is not plain digits (``-1``, ``+5``, ``1_0``), any
second Content-Length, a chunk size that is not plain hex (``0x1f``), Content-Length with
Transfer-Encoding, bytes after a ``Connection: close`` response. It has no size limit of
its own, so the head is capped here at ``MAX_HEAD`` bytes, counted both while it is still
arriving and once it is complete. Request heads are written here, and every header name
and value is checked before anything is sent (``encode_request``).

Why httptools and not h11 (also strict, already installed): h11 runs a Python state
machine per event, and a streamed reply is one event per SSE write; against a paced
upstream the client spent 1.6x the CPU per request with h11 as with httptools, which
matches the old hand-written parser (``bench.http_transport`` measures the latter).
"""

from __future__ import annotations

import asyncio
import re

import httptools
import httpx

MAX_HEAD = 64 * 1024  # status lines + headers (1xx heads and the final one together)
READ_PAUSE = 1024 * 1024  # body bytes received and not yet taken above which reading pauses
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: a header name


class Stale(Exception):
    """A reused keep-alive connection ended before any byte of the answer arrived: the
    server closed it as we picked it, so the request can be sent again safely."""


class _Reject(Exception):
    """Raised from a parser callback to stop parsing; its text becomes the error's."""


def encode_request(request: httpx.Request, body: bytes) -> bytes:
    """The request as bytes; ``LocalProtocolError`` (nothing sent) if a header name is not
    a token or a name or value holds CR, LF or NUL, which would forge or cut a header."""
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
    chunked = False
    for name, value in request.headers.raw:
        if not _TOKEN.fullmatch(name):
            raise httpx.LocalProtocolError(f"illegal header name {name[:64]!r}: request "
                                           "not sent", request=request)
        if name.lower() == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        lines.append(b"%s: %s\r\n" % (name, value))
    head = b"".join(lines)
    # One pass in C instead of three scans per value: the only CR/LF are the line ends.
    if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines) or b"\0" in head:
        bad = next((n for n, v in request.headers.raw if any(c in v for c in b"\r\n\0")), None)
        # The value may be a credential: name the header, never quote the value.
        what = f"header {bad[:64]!r}" if bad is not None else "the request line"
        raise httpx.LocalProtocolError(f"{what} contains CR, LF or NUL: request not sent",
                                       request=request)
    if chunked:  # a streamed body (the adapters send bytes; this is for completeness)
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return head + b"\r\n" + body


class Conn(asyncio.Protocol):
    """One TCP connection, at most one request in flight and one reader waiting. The
    parser's callbacks fill in the current response; the reader takes from it."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.busy = False  # a request is in flight
        self.stray = False  # bytes outside a response: the framing can no longer be trusted
        self.uses = 0  # requests sent; above 1 the current one rides a reused connection
        self.idle_since = 0.0
        self._waiter: asyncio.Future[bool] | None = None
        self._paused = False
        self._start(head_only=False)

    def _start(self, head_only: bool) -> None:
        self.received = 0  # bytes of this response so far
        self.error = ""  # why the response cannot be read, once it cannot
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False  # the final (non-1xx) head is complete
        self.body: list[bytes] = []  # received, not yet taken
        self.done = False  # the whole response is here
        self.keep = False  # the connection may carry another request after it
        self.until_close = False  # no length, not chunked: the body ends with the connection
        self._head_only = head_only  # a HEAD request: the body is not sent
        self._head_size = 0
        self._body_size = 0
        self._framed = False  # Content-Length or chunked: not read-until-close

    # -- asyncio protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.done or self.error:
            self.stray = True
            return
        self.received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self.error = str(cause) if isinstance(cause, _Reject) else \
                f"malformed response ({exc})"
        if not self.head_done and self.received > MAX_HEAD and not self.error:
            self.error = f"response head larger than {MAX_HEAD} bytes"  # no end marker yet
        if self._body_size > READ_PAUSE and not self._paused and self.transport is not None:
            self._paused = True  # a slow consumer: let TCP push back instead of buffering
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

    # -- parser callbacks (httptools finds them by name) ----------------------------------------

    def on_message_begin(self) -> None:
        if self.head_done:  # a second response to one request: it answers nothing we sent
            raise _Reject("bytes after the end of the response")

    def on_status(self, reason: bytes) -> None:
        self.reason = reason
        self._grow(len(reason) + 15)  # "HTTP/1.1 200 " + CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        self.headers.append((name, value))
        lname = name.lower()
        if lname == b"content-length" or (  # llhttp's rule: chunked only when it is last
                lname == b"transfer-encoding" and value.lower().rstrip().endswith(b"chunked")):
            self._framed = True

    def _grow(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEAD:  # the end marker came in the same read
            raise _Reject(f"response head larger than {MAX_HEAD} bytes")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # informational (101 ends in HttpParserUpgrade): skip it
            self.headers = []
            self._framed = False
            return
        self.status = status
        self.head_done = True
        self.keep = self._parser.should_keep_alive()
        if self._head_only:
            # llhttp cannot be told the body is absent: the head is all, the connection
            # goes (HEAD is never on a hot path here).
            self.done, self.keep = True, False
        elif not self._framed and status not in (204, 304):
            self.until_close, self.keep = True, False

    def on_body(self, data: bytes) -> None:
        self.body.append(data)
        self._body_size += len(data)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.done = True

    # -- for the transport -----------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        return not (self.eof or self.stray or self.transport is None or
                    self.transport.is_closing())

    async def exchange(self, request: httpx.Request, wire: bytes, silence_s: float | None) -> None:
        """Send the request and wait for the final response head (1xx ones are skipped)."""
        self._start(head_only=request.method == "HEAD")
        if self._paused and self.transport is not None:  # the last body was left unread
            self._paused = False
            self.transport.resume_reading()
        self.busy = True
        self.uses += 1
        self.transport.write(wire)  # type: ignore[union-attr]
        while not self.head_done:
            if self.error:
                raise httpx.RemoteProtocolError(self.error, request=request)
            if self.eof:
                if self.received:
                    raise httpx.RemoteProtocolError("server closed the connection mid-head",
                                                    request=request)
                if self.uses > 1:
                    raise Stale
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request)
            await self.more(silence_s, request)

    def take(self) -> bytes:
        """Everything of the body received so far, in one piece."""
        body, self.body, self._body_size = self.body, [], 0
        return body[0] if len(body) == 1 else b"".join(body)

    async def more(self, silence_s: float | None, request: httpx.Request) -> None:
        """Wait until something happens: bytes, the end of the connection, an error."""
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
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

    def next_cycle(self) -> bool:
        """Ready the connection for the next request; False if it cannot take one."""
        self.busy = False
        return self.done and self.keep and not self.error and self.reusable

    def close(self) -> None:
        self.busy = False
        if self.transport is not None:
            self.transport.close()
        self.eof = True
