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

import msgspec
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from tokenhive.clients.http.context import ServeContext, unless_disconnected
from tokenhive.clients.http.errors import from_exception
from tokenhive.clients.http.openai_requests import Parsed, parse_body
from tokenhive.clients.http.openai_responses import response_body
from tokenhive.clients.http.sse_response import CLIENT_CLOSED, SseResponse
from tokenhive.clients.stream import Stream
from tokenhive.schemas.errors import InternalError, TokenHiveError
from tokenhive.schemas.messages import Chunk, Kind, Usage

ENDPOINT = {Kind.CHAT: "chat", Kind.COMPLETION: "completions", Kind.EMBEDDING: "embeddings"}
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": nobody reads it, logs do


def json_response(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status,
                    media_type="application/json")


async def handle(ctx: ServeContext, http: HttpRequest, kind: Kind) -> Response | SseResponse:
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
        metrics.observe_ttft(model, (result.timings.queue_ms + result.timings.ttft_ms) / 1000.0)
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
                        started: float) -> Response | SseResponse:
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
    endpoint, model = ENDPOINT[parsed.request.kind], parsed.request.model

    def finished(outcome: str, usage: Usage | None, queue_ms: float | None) -> None:
        ctx.metrics.finished(endpoint, model, outcome, time.monotonic() - started, usage,
                             queue_ms)

    return SseResponse(ctx, parsed, stream, first, started, finished)


async def _first_chunk(stream: Stream) -> Chunk | None:
    """The first chunk, or None when the request finished without one."""
    async for chunk in stream:
        return chunk
    return None
