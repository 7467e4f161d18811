"""Server-sent events (the text/event-stream format) parsed from an httpx response.

Follows the WHATWG rules that matter here: ``field: value`` lines, one optional space after
the colon, ``data`` lines joined with newlines, an empty line ends an event, ``:`` lines are
comments (keep-alives). ``id`` and ``retry`` are accepted and ignored; other field names are
ignored as the standard says, but counted, so an adapter can tell a stream that was
all garbage from one that was merely quiet. One non-standard field is understood:
llama.cpp's server reports a failure mid-stream as an ``error: {json}`` line, which becomes
an event named ``error`` (ignoring it would lose the server's reason).

Lines are split here on bytes, not with ``httpx.Response.aiter_lines``: that uses
``str.splitlines``, which also breaks on U+2028, U+2029 and U+0085, characters JSON allows
unescaped inside strings (llama.cpp's server writes them raw), so a model emitting one would
corrupt the stream. The event-stream format ends lines only at CR, LF or CRLF. Lines are
bounded: one longer than ``max_line`` raises ``MalformedStream`` instead of growing a buffer
without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

import httpx

MAX_LINE = 4 * 1024 * 1024  # a whole embedding or long completion can sit in one data line


_EOL = re.compile(rb"\r\n?|\n")


class MalformedStream(Exception):
    """The body is not a valid event stream. Adapters turn it into BackendError."""


class SSEEvent(NamedTuple):
    event: str  # "message" unless the server named it
    data: str


class SSEParser:
    """Incremental parser: feed lines, collect events. Counts ignored lines."""

    __slots__ = ("_data", "_event", "ignored_lines")

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self.ignored_lines = 0

    def feed(self, line: str) -> SSEEvent | None:
        """One line without its terminator; returns the event an empty line completes."""
        if not line:
            return self.flush()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "error":  # llama.cpp's server: "error: {...}"
            self._event = "error"
            self._data.append(value)
        elif name not in ("id", "retry"):
            self.ignored_lines += 1
        return None

    def flush(self) -> SSEEvent | None:
        """End the current event (an empty line, or the end of the body)."""
        event: SSEEvent | None = None
        if self._data:
            event = SSEEvent(self._event or "message", "\n".join(self._data))
        self._event = ""
        self._data = []
        return event


async def iter_line_batches(
    chunks: AsyncIterator[bytes], max_line: int = MAX_LINE
) -> AsyncIterator[list[str]]:
    """The complete lines (without terminators) each received chunk finishes, split only at
    CR, LF and CRLF; a batch holds everything that arrived together."""
    pending = bytearray()
    async for chunk in chunks:
        pending += chunk
        if b"\r" not in pending:
            # The common case (LF-only lines): one decode and one split for the whole read.
            # Splitting the decoded text at "\n" only is exact: LF never occurs inside a
            # multi-byte UTF-8 sequence, and str.split does not break on U+2028 and kin.
            end = pending.rfind(b"\n")
            lines: list[str] = []
            if end >= 0:
                lines = _decode(pending[:end]).split("\n")
                del pending[: end + 1]
            if len(pending) > max_line:
                raise MalformedStream(f"SSE line longer than {max_line} bytes")
            if lines:
                yield lines
            continue
        start = 0
        lines = []
        for match in _EOL.finditer(pending):
            if match.group() == b"\r" and match.end() == len(pending):
                break  # a CR at the end may be the first half of a CRLF: wait for more
            lines.append(_decode(pending[start : match.start()]))
            start = match.end()
        del pending[:start]
        if len(pending) > max_line:
            raise MalformedStream(f"SSE line longer than {max_line} bytes")
        if lines:
            yield lines
    if pending:
        yield [_decode(pending.rstrip(b"\r"))]


async def iter_lines(chunks: AsyncIterator[bytes], max_line: int = MAX_LINE) -> AsyncIterator[str]:
    """The lines of ``iter_line_batches``, one at a time."""
    async for batch in iter_line_batches(chunks, max_line):
        for line in batch:
            yield line


def _decode(line: bytes | bytearray) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedStream(f"event stream is not UTF-8 ({exc.reason})") from None


async def iter_sse_batches(
    response: httpx.Response, max_line: int = MAX_LINE
) -> AsyncIterator[list[SSEEvent]]:
    """Events from a streaming response, in order, grouped by what arrived together.

    Adapters turn a whole batch into one Delta: text that is already here goes out at once
    in one message instead of one per token, which costs no latency and spares every hop
    downstream (worker, broker, client) the per-message work. A final event without its
    closing blank line is still delivered (some servers close right after the last
    ``data:`` line).
    """
    parser = SSEParser()
    async for lines in iter_line_batches(response.aiter_bytes(), max_line):
        events = [ev for line in lines if (ev := parser.feed(line)) is not None]
        if events:
            yield events
    event = parser.flush()
    if event is not None:
        yield [event]


async def iter_sse(response: httpx.Response, max_line: int = MAX_LINE) -> AsyncIterator[SSEEvent]:
    """The events of ``iter_sse_batches``, one at a time."""
    async for batch in iter_sse_batches(response, max_line):
        for event in batch:
            yield event


async def texts_by_batch(
    batches: AsyncIterator[list[SSEEvent]], take: Callable[[SSEEvent, list[str]], bool]
) -> AsyncIterator[list[str]]:
    """Apply ``take(event, texts)`` to every event; yield the texts each batch produced
    (one Delta's worth). Ends after the event for which ``take`` returns True (the stream's
    final event). When ``take`` raises, the texts before it in that batch still go out
    first, then the error."""
    async for batch in batches:
        texts: list[str] = []
        final = False
        try:
            for event in batch:
                if take(event, texts):
                    final = True
                    break
        except Exception:
            if texts:
                yield texts
            raise
        if texts:
            yield texts
        if final:
            return


async def drain(events: AsyncIterator[object], limit_s: float = 1.0) -> None:
    """Read what is left of a stream after its final event (``[DONE]``, ``message_stop``).

    An HTTP/1.1 connection goes back to the pool only if its body was read to the end;
    stopping at the final event would make httpx close it, and the next request would pay
    for a new TCP (and TLS) handshake. Bounded in time: a server that keeps the body open
    after its final event costs us that connection, not the request.
    """
    with contextlib.suppress(TimeoutError, MalformedStream, httpx.HTTPError):
        async with asyncio.timeout(limit_s):
            async for _ in events:
                pass
