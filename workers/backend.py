"""The interface between the worker runtime and whatever produces tokens.

A backend is an async context manager: entering it loads the model or opens the client,
leaving it frees everything. The runtime owns the socket, heartbeats, slots and cancels; a
backend never touches zmq.

Streaming contract: ``stream(request)`` is an async iterator that yields ``Delta`` items
(text plus the number of tokens it holds) and ends with exactly one ``Done`` (finish reason
and usage). The runtime cancels a request by cancelling the task that iterates the stream
(the iterator sees ``asyncio.CancelledError`` / ``aclose()``); a backend that generates in a
thread must stop that thread between tokens when this happens (see ``GGUF`` for the pattern:
a ``threading.Event`` checked per token, set in the iterator's ``finally``).

Errors: raise the exceptions of ``tokenhive.schemas.errors`` (``ContextTooLong``,
``RateLimited(retry_after=...)``, ``BackendError``, ...). Anything else is reported as
``backend_error`` with its message.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self

import msgspec

from tokenhive.schemas.messages import Health, Kind, Request, Usage
from tokenhive.schemas.tools import ToolCallDelta


class Delta(msgspec.Struct):
    text: str
    tokens: int = 1
    tool_calls: list[ToolCallDelta] | None = None  # pieces of tool calls (OpenAI's deltas)


class Done(msgspec.Struct):
    finish_reason: str = "stop"  # stop | length | tool_calls
    usage: Usage = msgspec.field(default_factory=Usage)


class Embeddings(msgspec.Struct):
    vectors: list[list[float]]
    usage: Usage = msgspec.field(default_factory=Usage)


class BackendInfo(msgspec.Struct):
    """What the worker advertises in READY."""

    backend: str
    context_length: int = 0
    device: str = "cpu"
    kinds: list[Kind] = msgspec.field(default_factory=lambda: [Kind.CHAT, Kind.COMPLETION])
    memory_mb: float = 0.0


class HealthReport(msgspec.Struct):
    health: Health = Health.OK
    detail: str = ""
    retry_after: float | None = None  # set while an upstream rate-limits us


class BackendStats(msgspec.Struct):
    """What only the backend knows, for the heartbeat (zeros where it does not know)."""

    generated_tokens: int = 0  # since start; the runtime turns it into tokens/s
    kv_used: float = 0.0  # KV-cache cells in use, 0..1
    prefix_hits: int = 0  # requests that reused a cached prompt prefix, since start


class Backend(abc.ABC):
    """Base class for all backends. Subclasses implement ``start``, ``stream`` and ``info``."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model / open connections. Raise ModelLoadFailed on failure."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Free everything. Must be safe to call after a failed start."""

    @abc.abstractmethod
    def info(self) -> BackendInfo:
        """Static facts for READY. Valid after start()."""

    def health(self) -> HealthReport:
        """The backend's own verdict, sent in every heartbeat."""
        return HealthReport()

    def stats(self) -> BackendStats:
        """Counters for the heartbeat; cheap (it runs on the event loop every interval)."""
        return BackendStats()

    @abc.abstractmethod
    def stream(self, request: Request) -> AsyncIterator[Delta | Done]:
        """Generate for a chat or completion request: Deltas, then exactly one Done."""

    async def embed(self, request: Request) -> Embeddings:
        """One pooled vector per ``request.input`` item."""
        from tokenhive.schemas.errors import InvalidRequest

        raise InvalidRequest(f"backend {self.info().backend!r} does not serve embeddings")
