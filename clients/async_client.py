"""AsyncClient: the one client core. The sync ``Client`` and the CLI are built on it."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from types import TracebackType
from typing import Unpack

import zmq.asyncio

from tokenhive.clients.call import Call
from tokenhive.clients.connection import Connection, ConnectionStats
from tokenhive.clients.request_builder import (
    EmbedOptions,
    MessagesArg,
    RequestOptions,
    build_request,
    to_inputs,
    to_messages,
)
from tokenhive.clients.result import Result
from tokenhive.clients.retry import RetryPolicy
from tokenhive.clients.stream import Stream
from tokenhive.schemas.config import DEFAULT_CLIENTS
from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import (
    DrainNode,
    Kind,
    MarkModelFailed,
    NodeStatus,
    Priority,
    Request,
    StatusReply,
)
from tokenhive.transport import CurveKeys


class AsyncClient:
    """Talks to a tokenhive broker over one DEALER socket, on the caller's event loop.

    >>> async with AsyncClient("tcp://127.0.0.1:5555", model="gemma3-270m") as client:
    ...     result = await client.chat("Say hi", max_tokens=16)
    ...     async for chunk in client.stream("Count to 5"):
    ...         print(chunk.text, end="")

    ``timeout`` is the default per-request timeout (None: none). ``broker_timeout`` bounds how
    long in-flight requests wait on a silent broker before failing with BrokerUnavailable.
    ``profile`` names a ``[profiles.NAME]`` of the broker config: its model (when none is
    given), sampling defaults, system prompt, priority and budgets apply to every request;
    ``for_agent(name)`` is the same client under another profile, on the same connection.
    ``curve`` (``tokenhive.transport.load_curve_keys(secret_file, broker_public_file)``)
    encrypts and authenticates the link to a broker run with CURVE keys.
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
        context: zmq.asyncio.Context | None = None,
        profile: str | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self.model = model
        self.profile = profile
        self._shares_connection = False  # a for_agent view: closing it leaves the socket
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.priority = priority
        self._conn = Connection(
            address, heartbeat_interval=heartbeat_interval, broker_timeout=broker_timeout,
            context=context, curve=curve,
        )

    @property
    def address(self) -> str:
        return self._conn.address

    @property
    def stats(self) -> ConnectionStats:
        return self._conn.stats

    @property
    def in_flight(self) -> int:
        return self._conn.in_flight

    # -- generation -----------------------------------------------------------------------

    async def chat(self, messages: MessagesArg, **options: Unpack[RequestOptions]) -> Result:
        """A chat completion. ``messages``: a user string, Messages, or OpenAI-style dicts."""
        request = self._build(Kind.CHAT, options, messages=messages, stream=False)
        return await Stream(Call(self._conn, request, self.retry)).collect()

    async def complete(self, prompt: str, **options: Unpack[RequestOptions]) -> Result:
        """A raw text completion of ``prompt`` (no chat template)."""
        request = self._build(Kind.COMPLETION, options, prompt=prompt, stream=False)
        return await Stream(Call(self._conn, request, self.retry)).collect()

    def stream(
        self,
        messages: MessagesArg | None = None,
        *,
        prompt: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> Stream:
        """Chunks as they are generated: a chat if ``messages`` is given, else a completion."""
        if (messages is None) == (prompt is None):
            raise InvalidRequest("stream() needs exactly one of messages or prompt")
        if messages is not None:
            request = self._build(Kind.CHAT, options, messages=messages, stream=True)
        else:
            request = self._build(Kind.COMPLETION, options, prompt=prompt, stream=True)
        return Stream(Call(self._conn, request, self.retry))

    async def embed(self, inputs: str | Sequence[str], **options: Unpack[EmbedOptions]) -> Result:
        """One vector per input, in ``Result.embeddings``."""
        built = build_request(
            Kind.EMBEDDING, self.model, options, inputs=to_inputs(inputs), stream=False,
            default_profile=self.profile,
        )
        request = self._with_defaults(built, explicit_priority="priority" in options)
        return await Stream(Call(self._conn, request, self.retry)).collect()

    async def execute(self, request: Request) -> Result:
        """Run a ready-made Request to its end (the batch runner builds its own)."""
        return await Stream(Call(self._conn, self._with_defaults(request), self.retry)).collect()

    def stream_request(self, request: Request) -> Stream:
        return Stream(Call(self._conn, self._with_defaults(request), self.retry))

    # -- pool -----------------------------------------------------------------------------

    async def status(self, timeout: float | None = None) -> StatusReply:  # noqa: ASYNC109
        """The broker's view of the pool: workers, queues, counters. ``timeout`` defaults
        to ``broker_timeout``."""
        limit = timeout if timeout is not None else self._conn.broker_timeout
        return await self._conn.status(limit)

    async def mark_model_failed(
        self, model: str, reason: str, timeout: float | None = None  # noqa: ASYNC109
    ) -> StatusReply:
        """For a pool supervisor: every worker of ``model`` failed for good. The broker fails
        the model's queued and new requests at once with ``model_failed`` and ``reason``
        until a worker of it registers. Returns the status that followed it on the same
        socket, so the broker has applied it when this returns."""
        self._conn.send(MarkModelFailed(model=model, reason=reason))
        return await self.status(timeout)

    async def drain_node(
        self, node: str, drain: bool = True, timeout: float | None = None  # noqa: ASYNC109
    ) -> NodeStatus:
        """Stop (``drain=True``) or resume dispatching to ``node``'s workers; what already
        runs there finishes. Returns the node as the broker shows it afterwards; raises
        InvalidRequest when the broker knows no such node."""
        self._conn.send(DrainNode(node=node, drain=drain))
        status = await self.status(timeout)
        for entry in status.nodes:
            if entry.id != node:
                continue
            if entry.draining != drain and not entry.stopping:  # a stopping node stays drained
                raise InvalidRequest(
                    f"the broker did not {'drain' if drain else 'undrain'} node {node!r}: with "
                    "CURVE keys that needs the broker's own key or one in its "
                    "--curve-allow-admins")
            return entry
        known = ", ".join(n.id for n in status.nodes) or "none"
        raise InvalidRequest(f"no node {node!r} at the broker (known: {known})")

    def for_agent(self, profile: str) -> AsyncClient:
        """This client under ``profile``: a light view on the same connection (closing the
        view does nothing; closing the client it came from closes both)."""
        view = copy.copy(self)
        view.profile = profile
        view._shares_connection = True
        return view

    async def aclose(self) -> None:
        if not self._shares_connection:
            await self._conn.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals ------------------------------------------------------------------------

    def _build(
        self,
        kind: Kind,
        options: RequestOptions,
        *,
        messages: MessagesArg | None = None,
        prompt: str | None = None,
        stream: bool,
    ) -> Request:
        if kind is Kind.CHAT:
            assert messages is not None
            built = to_messages(messages, options.get("system"))
            request = build_request(kind, self.model, options, messages=built, stream=stream,
                                    default_profile=self.profile)
        else:
            if not isinstance(prompt, str):
                raise InvalidRequest("prompt must be a string")
            if "system" in options:
                raise InvalidRequest("system is for chat requests, not completions")
            request = build_request(kind, self.model, options, prompt=prompt, stream=stream,
                                    default_profile=self.profile)
        return self._with_defaults(request, explicit_priority="priority" in options)

    def _with_defaults(self, request: Request, explicit_priority: bool = True) -> Request:
        if request.timeout is None and self.timeout is not None:
            request.timeout = self.timeout
        if not explicit_priority:
            request.priority = self.priority
        if request.profile is None and self.profile is not None:
            request.profile = self.profile
        return request
