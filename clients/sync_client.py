"""Client: the synchronous face of AsyncClient, run on a private event loop thread."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Unpack

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.connection import ConnectionStats
from tokenhive.clients.loop_thread import LoopThread
from tokenhive.clients.request_builder import EmbedOptions, MessagesArg, RequestOptions
from tokenhive.clients.result import Result
from tokenhive.clients.retry import RetryPolicy
from tokenhive.clients.stream import Stream
from tokenhive.schemas.config import DEFAULT_CLIENTS
from tokenhive.schemas.messages import Chunk, NodeStatus, Priority, Request, StatusReply
from tokenhive.transport import CurveKeys


class SyncStream:
    """A plain iterator of Chunks; ``result`` once it is exhausted. ``close()`` cancels."""

    def __init__(self, runner: LoopThread, stream: Stream) -> None:
        self._runner = runner
        self._stream = stream
        self._done = False

    @property
    def id(self) -> str:
        return self._stream.id

    @property
    def result(self) -> Result:
        return self._stream.result

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        try:
            return self._runner.run(self._stream.__anext__())
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._runner.run(self._stream.aclose())

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Client:
    """Same arguments and methods as AsyncClient, blocking. Thread-safe: calls from several
    threads share the one socket and run concurrently on the private loop.

    >>> with Client("tcp://127.0.0.1:5555", model="gemma3-270m") as client:
    ...     print(client.chat("Say hi", max_tokens=16).text)
    """

    def __init__(
        self,
        address: str = DEFAULT_CLIENTS,
        *,
        model: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        priority: int = Priority.NORMAL,
        heartbeat_interval: float = 1.0,
        broker_timeout: float = 5.0,
        profile: str | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self._runner = LoopThread()
        self._client = AsyncClient(
            address, model=model, timeout=timeout, retry=retry, priority=priority,
            heartbeat_interval=heartbeat_interval, broker_timeout=broker_timeout,
            profile=profile, curve=curve,
        )
        self._closed = False
        self._is_view = False  # a for_agent view: closing it leaves the loop and socket

    @property
    def profile(self) -> str | None:
        return self._client.profile

    def for_agent(self, profile: str) -> Client:
        """This client under ``profile``, sharing its loop thread and connection."""
        view = copy.copy(self)
        view._client = self._client.for_agent(profile)
        view._is_view = True
        return view

    @property
    def stats(self) -> ConnectionStats:
        return self._client.stats

    def chat(self, messages: MessagesArg, **options: Unpack[RequestOptions]) -> Result:
        return self._runner.run(self._client.chat(messages, **options))

    def complete(self, prompt: str, **options: Unpack[RequestOptions]) -> Result:
        return self._runner.run(self._client.complete(prompt, **options))

    def stream(
        self,
        messages: MessagesArg | None = None,
        *,
        prompt: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> SyncStream:
        return SyncStream(self._runner, self._client.stream(messages, prompt=prompt, **options))

    def embed(self, inputs: str | Sequence[str], **options: Unpack[EmbedOptions]) -> Result:
        return self._runner.run(self._client.embed(inputs, **options))

    def execute(self, request: Request) -> Result:
        return self._runner.run(self._client.execute(request))

    def status(self, timeout: float | None = None) -> StatusReply:
        return self._runner.run(self._client.status(timeout))

    def drain_node(self, node: str, drain: bool = True,
                   timeout: float | None = None) -> NodeStatus:
        """See ``AsyncClient.drain_node``."""
        return self._runner.run(self._client.drain_node(node, drain, timeout))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._is_view:
            return
        self._runner.run(self._client.aclose())
        self._runner.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
