"""One dispatched request, from Dispatch to the terminal message it produces.

``Job.run`` never raises: whatever happens (the backend finishes, raises, or the job is
cancelled), it returns exactly one terminal message, Final or Error, for the runtime to send.
Chunks go out from here as they are produced (see ``coalesce.ChunkStream``).

Cancelling goes through ``Job.cancel(reason)`` only: it records why, then cancels the task
that iterates ``backend.stream()``; the stream is closed (``aclose``) so a backend generating
in a thread stops between tokens. The reason becomes the Error code (cancelled,
deadline_exceeded, or worker_lost when the worker itself gives the work up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TypeAlias

from tokenhive.schemas.errors import BackendError, ErrorCode, InvalidRequest, TokenHiveError
from tokenhive.schemas.messages import Dispatch, Error, Final, Kind, Timings, Usage
from tokenhive.schemas.tools import ToolCallAssembler, as_deltas
from tokenhive.workers.backend import Backend, Done
from tokenhive.workers.coalesce import ChunkStream
from tokenhive.workers.link import BrokerLink

log = logging.getLogger("tokenhive.worker.job")

Terminal: TypeAlias = Final | Error


class Job:
    def __init__(
        self,
        dispatch: Dispatch,
        backend: Backend,
        link: BrokerLink,
        worker_id: str,
        kinds: list[Kind],
        coalesce_s: float,
    ) -> None:
        self.key = dispatch.key
        self.request = dispatch.request
        self.queued_ms = dispatch.queued_ms
        self.backend = backend
        self.worker_id = worker_id
        self.kinds = kinds
        self.chunks = ChunkStream(link, dispatch.key, dispatch.request.id, coalesce_s,
                                  client=dispatch.client)
        self.received = time.monotonic()
        self.first_token: float | None = None
        self.cancel_reason: ErrorCode | None = None
        self.task: asyncio.Task[Terminal] | None = None
        self.timer: asyncio.TimerHandle | None = None  # the request's deadline, if any

    def cancel(self, reason: ErrorCode) -> bool:
        """Stop the job with ``reason``; False when it was already stopping or done."""
        if self.cancel_reason is not None or self.task is None or self.task.done():
            return False
        self.cancel_reason = reason
        self.task.cancel()
        return True

    async def run(self) -> Terminal:
        request = self.request
        try:
            if request.kind not in self.kinds:
                served = [k.value for k in self.kinds]
                raise InvalidRequest(f"this worker serves {served}, not {request.kind.value!r}")
            if request.kind == Kind.EMBEDDING:
                return await self._embed()
            return await self._generate()
        except asyncio.CancelledError:
            self.chunks.discard()
            return self.stopped()
        except TokenHiveError as exc:
            self.chunks.discard()
            return Error.of(request.id, exc, chunks_sent=self.chunks.sent, worker=self.worker_id)
        except Exception as exc:
            self.chunks.discard()
            log.exception(
                "backend raised", extra={"request": request.id, "worker": self.worker_id}
            )
            return Error.make(
                request.id, ErrorCode.BACKEND_ERROR, f"{type(exc).__name__}: {exc}",
                chunks_sent=self.chunks.sent, worker=self.worker_id,
            )

    async def _generate(self) -> Final:
        request = self.request
        done: Done | None = None
        parts: list[str] = []  # non-streaming: the whole text, sent once
        tokens = 0
        calls = ToolCallAssembler()  # non-streaming: the whole tool calls, sent once
        stream = self.backend.stream(request)
        try:
            async for item in stream:
                if isinstance(item, Done):
                    done = item
                    break
                if self.first_token is None:
                    self.first_token = time.monotonic()
                if request.stream:
                    await self.chunks.add(item.text, item.tokens, item.tool_calls)
                else:
                    parts.append(item.text)
                    tokens += item.tokens
                    if item.tool_calls:
                        calls.add(item.tool_calls)
        finally:
            # Close the generator now (not at garbage collection) so a backend generating
            # in a thread stops between tokens, on cancel as on error.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        if done is None:
            raise BackendError("backend stream ended without Done")
        if request.stream:
            await self.chunks.close()
        else:
            self.chunks.single("".join(parts), tokens,
                               as_deltas(calls.calls()) if calls else None)
        return self._final(done.finish_reason, done.usage)

    async def _embed(self) -> Final:
        result = await self.backend.embed(self.request)
        self.first_token = time.monotonic()
        final = self._final("stop", result.usage)
        final.embeddings = result.vectors
        return final

    def _timings(self) -> Timings:
        now = time.monotonic()
        first = self.first_token if self.first_token is not None else now
        return Timings(
            queue_ms=self.queued_ms,
            ttft_ms=(first - self.received) * 1000.0,
            total_ms=(now - self.received) * 1000.0,
        )

    def _final(self, finish_reason: str, usage: Usage) -> Final:
        return Final(
            id=self.request.id, chunks=self.chunks.sent, finish_reason=finish_reason,
            usage=usage, timings=self._timings(), worker=self.worker_id,
            model=self.request.model,  # the backing model (the broker resolved groups)
        )

    def stopped(self) -> Error:
        """The terminal of a job stopped by ``cancel`` (or by the worker going away)."""
        reason = self.cancel_reason or ErrorCode.WORKER_LOST
        sent = self.chunks.sent
        kw: dict[str, object] = {}
        if reason == ErrorCode.WORKER_LOST:
            kw["retryable"] = sent == 0  # a retry would repeat text the client already has
        return Error.make(
            self.request.id, reason, f"{reason.value} after {sent} chunks",
            chunks_sent=sent, worker=self.worker_id, **kw,
        )
