"""The one batch engine: parsed batch items through an AsyncClient, results through a sink.

``tokenhive batch`` (results appended to OUT.jsonl) and the HTTP Batches API (results
recorded in the job store) both run their lines here, so both get the same concurrency
limit, the same batch priority, the same retry rule and the same output lines.

Each item runs in its own task, at most ``concurrency`` at once. A task ends in exactly one
of two ways: its output line (success or error) handed to the sink, or cancelled before any
line was written (``cancel``/``aclose``, Ctrl-C): a cancelled item has no line and runs again
on a resume. The sink is called from the task itself, never after ``aclose`` returned, so a
closed output is never written to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable, Hashable
from typing import Any, Protocol

import msgspec

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.batch.openai_format import BatchItem, error_line, success_line
from tokenhive.clients.result import Result
from tokenhive.clients.retry import RetryPolicy
from tokenhive.schemas.errors import InternalError, TokenHiveError
from tokenhive.schemas.messages import Kind, Priority

log = logging.getLogger("tokenhive.batch")


class ResultSink(Protocol):
    """Where finished lines go. ``key`` is what the caller submitted the item under."""

    async def record(self, key: Hashable, line: dict[str, Any], ok: bool) -> None: ...


class BatchEngine:
    """Runs items at batch priority, ``concurrency`` at a time.

    ``retry``: an extra retry round around the client's own (which already retries retryable
    errors before anything streamed); None leaves retries to the client.
    """

    def __init__(self, client: AsyncClient, sink: ResultSink, *, concurrency: int,
                 retry: RetryPolicy | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._client = client
        self._sink = sink
        self._retry = retry
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: dict[asyncio.Task[None], Hashable] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: BaseException | None = None  # a sink that raised stops the run
        self.succeeded = 0
        self.failed = 0
        self.cost_usd = 0.0  # the broker's price table; 0 for unpriced and local models
        self.estimated = 0  # answers whose usage the backend could only estimate

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def free_slots(self) -> int:
        return self._concurrency - len(self._tasks)

    def keys_in_flight(self) -> list[Hashable]:
        return list(self._tasks.values())

    async def submit(self, key: Hashable, item: BatchItem) -> None:
        """Start ``item`` once a slot is free (waits for one)."""
        self._raise_failure()
        await self._slots.acquire()
        task = asyncio.create_task(self._run_one(key, item), name=f"batch-line-{key}")
        self._tasks[task] = key
        self._idle.clear()
        task.add_done_callback(self._finished)

    async def record_invalid(self, key: Hashable, custom_id: str | None,
                             exc: TokenHiveError) -> None:
        """A line that never reached the pool (bad JSON, bad body): its error line."""
        await self._record(key, error_line(custom_id, exc), ok=False)

    async def run(self, items: AsyncIterable[tuple[Hashable, BatchItem]]) -> None:
        """Submit every item, then wait for all of them. On any exit other than a normal
        end (cancellation, a failing sink) the items still in flight are cancelled first."""
        try:
            async for key, item in items:
                await self.submit(key, item)
            await self.drain()
        finally:
            await self.aclose()

    async def drain(self) -> None:
        """Wait until nothing is in flight."""
        await self._idle.wait()
        self._raise_failure()

    def cancel(self, which: Callable[[Hashable], bool]) -> list[Hashable]:
        """Cancel the in-flight items whose key matches; their lines are not written."""
        hit = [(task, key) for task, key in self._tasks.items() if which(key)]
        for task, _ in hit:
            task.cancel()
        return [key for _, key in hit]

    async def aclose(self) -> None:
        """Cancel everything in flight and wait until those tasks have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals ------------------------------------------------------------------------

    async def _run_one(self, key: Hashable, item: BatchItem) -> None:
        item.request.priority = Priority.BATCH  # beside interactive traffic, never before it
        try:
            result = await self._execute(item)
        except TokenHiveError as exc:
            line, ok = error_line(item.custom_id, exc), False
        except Exception as exc:  # a bug must cost one line, not the batch
            log.exception("batch line %s failed unexpectedly", item.custom_id)
            line, ok = error_line(item.custom_id, InternalError(repr(exc))), False
        else:
            line, ok = success_line(item, result), True
            self.cost_usd += result.usage.cost_usd
            self.estimated += int(result.usage.estimated)
        # the result is in hand: a cancel arriving now waits for it to be recorded, so a
        # line that ran is never lost (and never run again)
        recording = asyncio.ensure_future(self._record(key, line, ok))
        try:
            await asyncio.shield(recording)
        except asyncio.CancelledError:
            await recording
            raise

    async def _execute(self, item: BatchItem) -> Result:
        attempt = 1
        while True:
            request = item.request if attempt == 1 else msgspec.structs.replace(
                item.request, id=f"{item.request.id}.b{attempt}")
            try:
                result = await self._client.execute(request)
                _check_embeddings(item, result)
                return result
            except TokenHiveError as exc:
                # a batch collects whole answers: a partial stream was never delivered, so
                # "nothing streamed yet" holds for every attempt (chunks_seen=0)
                policy = self._retry
                if policy is None or not policy.should_retry(exc, attempt, 0):
                    raise
                await asyncio.sleep(policy.delay(attempt, exc.retry_after))  # backoff
                attempt += 1

    async def _record(self, key: Hashable, line: dict[str, Any], ok: bool) -> None:
        await self._sink.record(key, line, ok)
        if ok:
            self.succeeded += 1
        else:
            self.failed += 1

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._slots.release()
        if not self._tasks:
            self._idle.set()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._failure is None:
            self._failure = exc
            log.error("batch sink failed: %r", exc)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


def _check_embeddings(item: BatchItem, result: Result) -> None:
    wanted = len(item.request.input)
    if item.request.kind is Kind.EMBEDDING and (
        result.embeddings is None or len(result.embeddings) != wanted
    ):
        raise InternalError(f"expected {wanted} embeddings from worker {result.worker!r}")
