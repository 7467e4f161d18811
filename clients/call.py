"""One logical request on a Connection: its attempts, its deadline, its result.

A Call submits the request, hands out its Chunks one at a time, and ends with the Final
(``next_chunk`` returns None) or raises the typed exception of the Error. Retries happen here,
transparently, only while the caller has seen no chunk; attempt ``n > 1`` is submitted under
the id ``<id>.r<n>`` so it can never be confused with a late message of an earlier attempt.

The timeout covers the whole call, retries and backoff included. It travels in
``Request.timeout`` (relative, so clocks need not agree) for the broker to enforce, and is
enforced here too: on expiry the broker is sent a Cancel and the caller gets
DeadlineExceeded. If the caller's task is cancelled, the broker is sent a Cancel as well.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from tokenhive.clients.connection import Connection
from tokenhive.clients.inbox import Inbox
from tokenhive.clients.result import Result
from tokenhive.clients.retry import RetryPolicy
from tokenhive.schemas.errors import DeadlineExceeded, TokenHiveError
from tokenhive.schemas.messages import Chunk, Error, Final, Request, StreamMsg, Submit
from tokenhive.schemas.tools import ToolCallAssembler


class Call:
    def __init__(self, conn: Connection, request: Request, retry: RetryPolicy) -> None:
        self._conn = conn
        self._request = request
        self._retry = retry
        self._deadline: float | None = None  # set at the first submission
        self._attempt = 0
        self._queue: Inbox | None = None
        self._active_id = request.id
        self._generation = 0
        self._parts: list[str] = []
        self._chunks = 0
        self._final: Final | None = None
        self._tool_calls = ToolCallAssembler()

    @property
    def id(self) -> str:
        return self._active_id

    @property
    def finished(self) -> bool:
        return self._final is not None

    async def next_chunk(self) -> Chunk | None:
        """The next Chunk, or None once the Final arrived. Raises the request's error."""
        while self._final is None:
            if self._queue is None:
                self._submit()
            try:
                msg = await self._receive()
            except asyncio.CancelledError:
                self.abort()
                raise
            if isinstance(msg, Chunk):
                self._chunks += 1
                self._parts.append(msg.text)
                if msg.tool_calls:
                    self._tool_calls.add(msg.tool_calls)
                return msg
            self._end_attempt()
            if isinstance(msg, Final):
                self._final = msg
                return None
            await self._on_error(msg)
        return None

    def result(self) -> Result:
        final = self._final
        if final is None:
            raise RuntimeError("the call has not finished")
        return Result(
            id=self._active_id, text="".join(self._parts), finish_reason=final.finish_reason,
            usage=final.usage, timings=final.timings, worker=final.worker, chunks=self._chunks,
            embeddings=final.embeddings, attempts=self._attempt, model=final.model,
            tried=final.tried,
            tool_calls=self._tool_calls.calls() if self._tool_calls else None,
        )

    def abort(self) -> None:
        """Tell the broker to stop the attempt in flight (the caller gave up on it)."""
        if self._queue is not None:
            self._queue.close()
            self._conn.cancel(self._active_id, self._generation)
            self._queue = None

    # -- internals ------------------------------------------------------------------------

    def _remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _submit(self) -> None:
        if self._attempt == 0 and self._request.timeout:
            self._deadline = time.monotonic() + self._request.timeout
        self._attempt += 1
        base = self._request.id
        self._active_id = base if self._attempt == 1 else f"{base}.r{self._attempt}"
        remaining = self._remaining()
        if remaining is not None and remaining <= 0:
            raise self._deadline_error()
        request = msgspec.structs.replace(self._request, id=self._active_id, timeout=remaining)
        self._queue, self._generation = self._conn.open_stream(self._active_id)
        if remaining is not None:  # one timer for the attempt, not one per wait
            self._queue.expire_at(asyncio.get_running_loop().time() + remaining)
        self._conn.send(Submit(request=request))

    async def _receive(self) -> StreamMsg:
        queue = self._queue
        assert queue is not None
        try:
            return await queue.get()
        except TimeoutError:
            self.abort()
            raise self._deadline_error() from None

    def _end_attempt(self) -> None:
        if self._queue is not None:
            self._queue.close()
        self._conn.close_stream(self._active_id)
        self._queue = None

    async def _on_error(self, msg: Error) -> None:
        exc = msg.to_exception()
        if not self._retry.should_retry(exc, self._attempt, self._chunks):
            raise exc
        delay = self._retry.delay(self._attempt, exc.retry_after)
        remaining = self._remaining()
        if remaining is not None and delay >= remaining:
            raise exc  # waiting would outlive the deadline: the error is the honest answer
        await asyncio.sleep(delay)

    def _deadline_error(self) -> TokenHiveError:
        return DeadlineExceeded(
            f"request {self._request.id} exceeded its {self._request.timeout}s timeout",
            request_id=self._active_id, chunks_sent=self._chunks,
        )
