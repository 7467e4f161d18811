"""``SseResponse``: the SSE body of one streamed chat or completion request, as a plain ASGI
response that writes our frames straight to the server.

Starlette's StreamingResponse runs every stream in an anyio task group (one task sending,
one listening for the disconnect) and sends each frame as its own message after an
isinstance check. This is the per-token path of ``tokenhive serve``, so instead: one watcher
task per stream (``unless_disconnected``), which cancels the body when the client goes away
(the broker then gets a Cancel through ``stream.aclose()``), headers built once per process,
frames that wait together sent as one message (``CoalescingWriter``), the first chunk sent
with the opening event, and the closing events sent with the final message. The
inter-token gaps are noted in a list and observed into the histogram once the stream ended,
off the path between two tokens.

The cleanup (cancel if unfinished, metrics, in-flight count) runs however the response ends,
even if the body never started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from tokenhive.clients.http.context import ServeContext, unless_disconnected
from tokenhive.clients.http.errors import stream_error_event
from tokenhive.clients.http.openai_requests import Parsed
from tokenhive.clients.http.openai_responses import SseFramer
from tokenhive.clients.stream import Stream
from tokenhive.schemas.errors import TokenHiveError
from tokenhive.schemas.messages import Chunk, Usage

CLIENT_CLOSED = "client_closed"  # the outcome label when the HTTP client went away
# What Starlette's StreamingResponse(media_type="text/event-stream") sent, byte for byte.
RAW_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                   (b"content-type", b"text/event-stream; charset=utf-8")]
START = {"type": "http.response.start", "status": 200, "headers": RAW_SSE_HEADERS}

Finished = Callable[[str, Usage | None, float | None], None]


class CoalescingWriter:
    """Sends frames from a task of its own, every frame waiting at that moment in one
    message: chunks that arrived together from the broker (or piled up while the client
    was slow to read) go out in one write instead of one each. The producer never waits
    on the client; the frames of one stream are bounded by its max_tokens."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.pending: list[bytes] = []
        self.wake = asyncio.Event()
        self.closing = False
        self.task = asyncio.ensure_future(self._run())

    def write(self, frame: bytes) -> None:
        self.pending.append(frame)
        self.wake.set()

    async def close(self, last: bytes) -> None:
        """Send ``last`` after everything pending as the final message; wait until sent."""
        self.pending.append(last)
        self.closing = True
        self.wake.set()
        try:
            await self.task
        finally:
            self.abandon()

    def abandon(self) -> None:
        if not self.task.done():
            self.task.cancel()

    async def _run(self) -> None:
        pending = self.pending
        while True:
            await self.wake.wait()
            self.wake.clear()
            closing = self.closing  # read before sending: a close while we send is next turn
            body = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            await self.send({"type": "http.response.body", "body": body,
                             "more_body": not closing})
            if closing:
                return


class SseResponse:
    """An ASGI app answering one streamed request; ``finished(outcome, usage, queue_ms)``
    records its metrics once it ended."""

    def __init__(self, ctx: ServeContext, parsed: Parsed, stream: Stream, first: Chunk | None,
                 started: float, finished: Finished) -> None:
        self.ctx = ctx
        self.parsed = parsed
        self.stream = stream
        self.first = first
        self.started = started
        self.finished = finished
        self.outcome = CLIENT_CLOSED  # until the body says otherwise
        self.usage: Usage | None = None
        self.queue_ms: float | None = None
        self.gaps: list[float] = []
        request = parsed.request
        self.framer = SseFramer(request.kind, stream.id, request.model,
                                include_usage=parsed.include_usage)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await unless_disconnected(receive, self._send_body(send))  # gone: body cancelled
        except OSError:  # the transport broke under a send: the client is gone
            pass
        finally:
            await self._cleanup()

    async def _send_body(self, send: Send) -> None:
        framer, stream, first = self.framer, self.stream, self.first
        metrics = self.ctx.metrics
        opening = framer.start()
        if first is not None:
            metrics.observe_ttft(self.parsed.request.model, time.monotonic() - self.started)
            opening += self._frame(first)
        await send(START)
        if opening:
            await send({"type": "http.response.body", "body": opening, "more_body": True})
        writer = CoalescingWriter(send)
        # the per-token loop: locals, and the writer's write() inlined
        gaps, frame, delta, monotonic = self.gaps, self._frame, framer.delta, time.monotonic
        pending, wake = writer.pending, writer.wake
        last = monotonic()
        try:
            if first is not None:
                async for chunk in stream:
                    now = monotonic()
                    gaps.append(now - last)
                    last = now
                    pending.append(frame(chunk) if chunk.tool_calls else delta(chunk.text))
                    wake.set()
            result = stream.result
        except TokenHiveError as exc:
            self.outcome = exc.code.value
            await writer.close(stream_error_event(exc))
            return
        except BaseException:
            writer.abandon()
            raise
        self.outcome = "ok"
        self.usage = result.usage
        self.queue_ms = result.timings.queue_ms
        await writer.close(framer.finish(result.finish_reason, result.usage))

    def _frame(self, chunk: Chunk) -> bytes:
        if not chunk.tool_calls:
            return self.framer.delta(chunk.text)
        text = self.framer.delta(chunk.text) if chunk.text else b""
        return text + self.framer.tool_calls(chunk.tool_calls)

    async def _cleanup(self) -> None:
        await self.stream.aclose()  # a no-op when finished; else the broker gets a Cancel
        metrics = self.ctx.metrics
        if self.gaps:
            metrics.gap.observe_many(metrics.model_label(self.parsed.request.model), self.gaps)
        self.finished(self.outcome, self.usage, self.queue_ms)
        metrics.in_flight.dec()
