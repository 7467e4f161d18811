"""``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``.

Every accepted request ends in exactly one answer: a JSON body, an SSE stream ending in
``data: [DONE]`` (or an error event if it fails after the first event), or an error in
OpenAI's shape. A client that goes away cancels its request through to the worker's slot:
a stream by Starlette cancelling our iterator, a non-streamed request by watching for the
disconnect while it waits.

A stream's first chunk is awaited before the 200 is sent, so a request refused at once
(unknown model, full queue, bad value the broker caught) still gets its proper status.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenhive.clients.http.context import ServeContext, unless_disconnected
from tokenhive.clients.http.errors import from_exception, stream_error_event
from tokenhive.clients.http.openai_requests import Parsed, parse_body
from tokenhive.clients.http.openai_responses import SseFramer, response_body
from tokenhive.clients.stream import Stream
from tokenhive.schemas.errors import InternalError, TokenHiveError
from tokenhive.schemas.messages import Chunk, Kind, Usage

ENDPOINT = {Kind.CHAT: "chat", Kind.COMPLETION: "completions", Kind.EMBEDDING: "embeddings"}
CLIENT_CLOSED = "client_closed"  # the outcome label when the HTTP client went away
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": nobody reads it, logs do
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def json_response(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status,
                    media_type="application/json")


async def handle(ctx: ServeContext, http: HttpRequest, kind: Kind) -> Response:
    started = time.monotonic()
    endpoint = ENDPOINT[kind]
    metrics = ctx.metrics
    metrics.in_flight.inc()
    model = ""
    handed_over = False  # a stream's response owns the rest (and the in-flight count)
    try:
        parsed = parse_body(kind, await http.body(), timeout=ctx.request_timeout)
        model = parsed.request.model
        if parsed.stream:
            response = await _start_stream(ctx, http, parsed, started)
            handed_over = isinstance(response, SseResponse)
            return response
        stream = ctx.client.stream_request(parsed.request)
        present, result = await unless_disconnected(http.receive, stream.collect())
        if not present or result is None:
            metrics.finished(endpoint, model, CLIENT_CLOSED, time.monotonic() - started)
            return Response(status_code=CLIENT_CLOSED_STATUS)
        if kind is Kind.EMBEDDING and len(result.embeddings or []) != len(parsed.request.input):
            raise InternalError(f"expected {len(parsed.request.input)} embeddings, worker "
                                f"{result.worker!r} sent {len(result.embeddings or [])}")
        metrics.finished(endpoint, model, "ok", time.monotonic() - started, result.usage,
                         result.timings.queue_ms)
        metrics.ttft.labels(metrics.model_label(model)).observe(
            (result.timings.queue_ms + result.timings.ttft_ms) / 1000.0)
        return json_response(response_body(kind, result, model,
                                           encoding_format=parsed.encoding_format))
    except TokenHiveError as exc:
        metrics.finished(endpoint, model, exc.code.value, time.monotonic() - started)
        return from_exception(exc)
    except ClientDisconnect:  # gone while sending its body: nothing was submitted
        metrics.finished(endpoint, model, CLIENT_CLOSED, time.monotonic() - started)
        return Response(status_code=CLIENT_CLOSED_STATUS)
    finally:
        if not handed_over:
            metrics.in_flight.dec()


async def _start_stream(ctx: ServeContext, http: HttpRequest, parsed: Parsed,
                        started: float) -> Response:
    stream = ctx.client.stream_request(parsed.request)
    try:
        present, first = await unless_disconnected(http.receive, _first_chunk(stream))
    except BaseException:
        await stream.aclose()
        raise
    if not present:
        await stream.aclose()
        ctx.metrics.finished(ENDPOINT[parsed.request.kind], parsed.request.model,
                             CLIENT_CLOSED, time.monotonic() - started)
        return Response(status_code=CLIENT_CLOSED_STATUS)
    return SseResponse(ctx, parsed, stream, first, started)


async def _first_chunk(stream: Stream) -> Chunk | None:
    """The first chunk, or None when the request finished without one."""
    async for chunk in stream:
        return chunk
    return None


class SseResponse(StreamingResponse):
    """The SSE body of one streamed request. Its cleanup (cancel if unfinished, metrics,
    in-flight count) runs however the response ends, even if the body never started."""

    def __init__(self, ctx: ServeContext, parsed: Parsed, stream: Stream, first: Chunk | None,
                 started: float) -> None:
        self.ctx = ctx
        self.parsed = parsed
        self.stream = stream
        self.first = first
        self.started = started
        self.outcome = CLIENT_CLOSED  # until the iterator says otherwise
        self.usage: Usage | None = None
        self.queue_ms: float | None = None
        request = parsed.request
        self.framer = SseFramer(request.kind, stream.id, request.model,
                                include_usage=parsed.include_usage)
        super().__init__(self._events(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _events(self) -> AsyncIterator[bytes]:
        framer, stream, first = self.framer, self.stream, self.first
        gap = self.ctx.metrics.gap.labels(self.ctx.metrics.model_label(self.parsed.request.model))
        opening = framer.start()
        if first is not None:
            self.ctx.metrics.ttft.labels(self.ctx.metrics.model_label(
                self.parsed.request.model)).observe(time.monotonic() - self.started)
            opening += self._frame(first)
        if opening:
            yield opening
        last = time.monotonic()
        try:
            if first is not None:
                async for chunk in stream:
                    now = time.monotonic()
                    gap.observe(now - last)
                    last = now
                    yield self._frame(chunk)
            result = stream.result
        except TokenHiveError as exc:
            self.outcome = exc.code.value
            yield stream_error_event(exc)
            return
        self.outcome = "ok"
        self.usage = result.usage
        self.queue_ms = result.timings.queue_ms
        yield framer.finish(result.finish_reason, result.usage)

    def _frame(self, chunk: Chunk) -> bytes:
        if not chunk.tool_calls:
            return self.framer.delta(chunk.text)
        text = self.framer.delta(chunk.text) if chunk.text else b""
        return text + self.framer.tool_calls(chunk.tool_calls)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.aclose()  # a no-op when finished; else the broker gets a Cancel
            self.ctx.metrics.finished(
                ENDPOINT[self.parsed.request.kind], self.parsed.request.model, self.outcome,
                time.monotonic() - self.started, self.usage, self.queue_ms,
            )
            self.ctx.metrics.in_flight.dec()
