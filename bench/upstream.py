"""A local OpenAI-compatible SSE upstream for the remote-API benches, in its own process.

Every POST gets a chunked SSE reply: ``events`` content events, a finish event, a usage
event and ``[DONE]``. Paced (``interval`` > 0): one event per write, ``interval`` apart, as
a real server streams tokens; unpaced: the whole reply in one write. It does no model work,
so what a bench measures against it is the cost of each client path.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent


def sse_events(events: int) -> list[bytes]:
    """Each event as one HTTP chunk; the last one also ends the chunked body."""
    docs: list[object] = [{"choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}
                          for i in range(events)]
    docs.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    docs.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": events,
                                          "total_tokens": 5 + events}})
    payloads = [b"data: " + json.dumps(d).encode() + b"\n\n" for d in docs]
    payloads.append(b"data: [DONE]\n\n")
    chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in payloads]
    chunks[-1] += b"0\r\n\r\n"
    return chunks


HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")


class KeepAliveProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive server side: ``respond()`` once per complete request."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            assert self.transport is not None
            self.respond(self.transport)

    def respond(self, transport: asyncio.WriteTransport) -> None:
        raise NotImplementedError


class FixedReplyProtocol(KeepAliveProtocol):
    """Every complete request gets the whole reply in one write."""

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__()
        self.reply = HEAD + b"".join(chunks)

    def respond(self, transport: asyncio.WriteTransport) -> None:
        transport.write(self.reply)


class PacedProtocol(KeepAliveProtocol):
    """A complete request gets the head, then one chunk per tick."""

    def __init__(self, chunks: list[bytes], interval: float) -> None:
        super().__init__()
        self.chunks, self.interval = chunks, interval

    def respond(self, transport: asyncio.WriteTransport) -> None:
        transport.write(HEAD)
        self._send(0)

    def _send(self, i: int) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(self.chunks[i])
        if i + 1 < len(self.chunks):
            asyncio.get_running_loop().call_later(self.interval, self._send, i + 1)


async def serve(events: int, interval: float) -> None:
    """Serve on a free loopback port, printed on the first line of stdout."""
    loop = asyncio.get_running_loop()
    chunks = sse_events(events)

    def protocol() -> KeepAliveProtocol:
        return PacedProtocol(chunks, interval) if interval > 0 else FixedReplyProtocol(chunks)

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def with_upstream(
    serve_argv: list[str], run: Callable[[str, int], Coroutine[Any, Any, dict[str, object]]]
) -> dict[str, object]:
    """Start the upstream in its own process (it prints its port), then
    ``run(url, upstream pid)`` against it."""
    server = subprocess.Popen(serve_argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        return uvloop.run(run(f"http://127.0.0.1:{port}", server.pid))
    finally:
        server.terminate()
        server.wait(timeout=10)
