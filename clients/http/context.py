"""What every route of one server shares: the broker client, the metrics, the settings."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.types import Receive

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.http.metrics import ServeMetrics
from tokenhive.clients.retry import RetryPolicy
from tokenhive.schemas.errors import ErrorCode, TokenHiveError

T = TypeVar("T")

#: errors the HTTP caller should see at once (429/503 with Retry-After) rather than have the
#: server sit on its connection retrying: the caller decides whether to come back.
PASSED_BACK = frozenset({ErrorCode.OVERLOADED, ErrorCode.RATE_LIMITED})


class ServeRetry(RetryPolicy, frozen=True, kw_only=True):
    """The client's policy (retryable errors before anything streamed, e.g. a worker lost
    before its first token), except load refusals, which go back to the HTTP caller."""

    def should_retry(self, exc: TokenHiveError, attempt: int, chunks_seen: int) -> bool:
        return exc.code not in PASSED_BACK and super().should_retry(exc, attempt, chunks_seen)


@dataclass
class ServeContext:
    client: AsyncClient
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    request_timeout: float | None = None  # seconds per request; None: no server-side cap
    status_timeout: float = 2.0  # /health, /v1/models, /metrics wait this long on the broker


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run ``work`` (after the request body was read) unless the HTTP client goes away first:
    then ``work`` is cancelled (a Call sends the broker a Cancel) and ``(False, None)`` is
    returned. Otherwise ``(True, result)``; ``work``'s exception propagates.

    ``work`` runs in the calling task and one watcher task cancels it if the disconnect
    comes first (one task per request instead of two: this is every request's path)."""
    caller = asyncio.current_task()
    assert caller is not None
    state = {"ended": False, "gone": False}

    def on_watcher_done(watcher: asyncio.Future[None]) -> None:
        if watcher.cancelled() or watcher.exception() is not None or state["ended"]:
            return
        state["gone"] = True
        caller.cancel()

    watcher = asyncio.ensure_future(_disconnected(receive))
    watcher.add_done_callback(on_watcher_done)
    try:
        result = await work
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        caller.uncancel()  # the client left: ours, not a cancellation from above
        return False, None
    finally:
        state["ended"] = True
        watcher.cancel()
    return True, result
