"""The sidecar itself: reads llmkit's messages, runs them on the pool, writes the answers.

Every accepted request gets exactly one final answer: a response for a request with an id,
``stream.done`` or ``stream.error`` for a ``stream.start`` notification. Requests run
concurrently (one shared AsyncClient), and a response goes out when its own request is done,
so answers to different ids can come in any order. ``stream.start`` carries no id, so its
notifications can only be told apart by time: id-less streams run one after another, in the
order they came, and never interleave. A peer that wants many streams at once sends
``complete`` with ``"stream": true`` and an id: its ``stream.chunk`` notifications carry
that id in their params, and its response ends it.

It stops on ``shutdown`` (in-flight requests are answered with an error, a local pool is
stopped, then the shutdown response is the last line), on stdin EOF (in-flight requests may
finish for ``eof_grace`` seconds), on SIGTERM/SIGINT, and at once when the reader of its
stdout is gone (the parent died): it never outlives the process that drives it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from tokenhive.clients.sidecar import params as P
from tokenhive.clients.sidecar.rpc import (
    BACKEND_ERROR,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    MODEL_NOT_FOUND,
    STREAM_ERROR,
    BadMessage,
    Incoming,
    InitResult,
    RequestId,
    RpcError,
    ShutdownResult,
    StreamChunk,
    StreamDone,
    StreamError,
    TaggedStreamChunk,
    error_line,
    notification_line,
    parse,
    result_line,
)
from tokenhive.clients.sidecar.stdio import LineReader, LineWriter, Overlong
from tokenhive.clients.sidecar.upstream import Upstream
from tokenhive.schemas.errors import TokenHiveError

log = logging.getLogger("tokenhive.sidecar")

SHUTTING_DOWN = "sidecar shutting down"


class Entry:
    """One accepted request until its final answer is written."""

    def __init__(self, request_id: RequestId, *, has_id: bool) -> None:
        self.id = request_id
        self.has_id = has_id  # False: a stream.start notification
        self.answered = False
        self.task: asyncio.Task[None] | None = None

    def error(self, error: RpcError) -> bytes:
        if self.has_id:
            return error_line(self.id, error)
        return notification_line("stream.error", StreamError(code=error.code,
                                                             message=error.message))


class Sidecar:
    def __init__(self, upstream: Upstream, out: LineWriter, *, version: str,
                 max_in_flight: int = 256, eof_grace: float = 30.0) -> None:
        self.upstream = upstream
        self.out = out
        self.version = version
        self.max_in_flight = max_in_flight
        self.eof_grace = eof_grace
        self.model = ""
        self.stop = asyncio.Event()  # set by a signal or a hangup of stdout
        self.stop_reason = ""
        self._entries: dict[tuple[str, RequestId], Entry] = {}
        self._idless_turn = asyncio.Lock()  # id-less streams, one at a time, in order
        self._init_lock = asyncio.Lock()
        self._init_task: asyncio.Task[None] | None = None
        self._ready = False

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self.stop.set()

    # -- the read loop --------------------------------------------------------------------

    async def serve(self, reader: LineReader) -> str:
        """Until shutdown, EOF or a stop; returns why it ended. Cleans up before returning."""
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            while True:
                read = asyncio.ensure_future(reader.next())
                await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    await self._close(None)
                    return self.stop_reason
                item = read.result()
                if item is None:
                    await self._drain_after_eof(stopped)
                    await self._close(None)
                    return "eof"
                shutdown = await self._dispatch(item)
                if shutdown is not None:
                    await self._close(shutdown)
                    return "shutdown"
        finally:
            stopped.cancel()

    async def _dispatch(self, item: bytes | Overlong) -> Incoming | None:
        """Handle one line; a shutdown message is returned, for the caller to stop."""
        if isinstance(item, Overlong):
            await self.out.send(error_line(None, RpcError(
                INVALID_REQUEST, f"message longer than {item.limit} bytes: discarded")))
            return None
        if not item.strip():
            return None  # a blank line is no message
        try:
            msg = parse(item)
        except BadMessage as bad:
            await self.out.send(error_line(bad.id, bad.error))
            return None
        if msg.method == "shutdown":
            return msg
        if not msg.has_id:
            if msg.method == "stream.start":
                await self._accept(Entry(None, has_id=False), self._stream(msg.params))
            else:  # a notification is never answered (JSON-RPC 2.0, 4.1)
                log.warning("notification ignored", extra={"method": msg.method[:64]})
            return None
        entry = Entry(msg.id, has_id=True)
        if msg.method == "init":
            await self._accept(entry, self._init(entry, msg.params))
            self._init_task = entry.task  # requests after it wait for it (pipelined peers)
        elif msg.method in ("complete", "stream.start"):
            await self._accept(entry, self._complete(entry, msg.params))
        else:
            await self.out.send(error_line(msg.id, RpcError(
                METHOD_NOT_FOUND, f"method not found: {msg.method[:64]!r} (this sidecar "
                                  "speaks init, complete, stream.start, shutdown)")))
        return None

    async def _accept(self, entry: Entry, work: Coroutine[Any, Any, bytes]) -> None:
        key = (type(entry.id).__name__, entry.id)
        refusal = None
        if entry.has_id and key in self._entries:
            refusal = RpcError(INVALID_REQUEST, f"id {entry.id!r} is already in flight")
        elif len(self._entries) >= self.max_in_flight:
            refusal = RpcError(BACKEND_ERROR, f"{self.max_in_flight} requests are already in "
                               "flight; retry when one has finished",
                               {"tokenhive_code": "overloaded", "retryable": True})
        if refusal is not None:
            work.close()
            await self.out.send(entry.error(refusal))
            return
        if entry.has_id:
            self._entries[key] = entry
        else:
            key = ("stream", id(entry))
            self._entries[key] = entry
        entry.task = asyncio.get_running_loop().create_task(self._run(key, entry, work))

    async def _run(self, key: tuple[str, Any], entry: Entry,
                   work: Coroutine[Any, Any, bytes]) -> None:
        try:
            line = await work
        except RpcError as exc:
            line = entry.error(exc)
        except TokenHiveError as exc:
            line = entry.error(P.rpc_error(exc))
        except asyncio.CancelledError:
            return  # _close answers whatever it cancelled
        except Exception as exc:
            log.exception("sidecar request failed")
            line = entry.error(RpcError(INTERNAL_ERROR, f"internal error: {exc}"))
        # no await from here on: answered and gone from the table in one step, so _close
        # never answers it twice nor sends the shutdown response before this answer
        self._answer(entry, line)
        self._entries.pop(key, None)

    def _answer(self, entry: Entry, line: bytes) -> None:
        if not entry.answered:
            entry.answered = True
            self.out.send_now(line)

    # -- methods --------------------------------------------------------------------------

    async def _init(self, entry: Entry, params: Any) -> bytes:
        p = P.decode_params(params, P.InitParams, "init")
        P.check_init(p)
        async with self._init_lock:
            await self.upstream.connect(p.host)
            served = await self.upstream.served_models()
            if p.model not in served:
                raise RpcError(MODEL_NOT_FOUND, f"no worker serves model {p.model!r} at "
                               f"{self.upstream.address} (served: {', '.join(served) or 'none'})")
            self.model = p.model
            self._ready = True
        where = "a local pool" if self.upstream.local else f"the broker at {self.upstream.address}"
        return result_line(entry.id, InitResult(
            ready=True, version=self.version, message=f"tokenhive: {where}, model {p.model}"))

    async def _wait_ready(self) -> None:
        pending = self._init_task
        if pending is not None and not pending.done() and pending is not asyncio.current_task():
            await asyncio.wait({pending})
        if not self._ready:
            raise RpcError(INVALID_REQUEST, "call init first (no init has succeeded)")

    async def _complete(self, entry: Entry, params: Any) -> bytes:
        p = P.decode_params(params, P.CompleteParams, "complete")
        await self._wait_ready()
        messages, options = P.request_of(p, self.model)
        model = options["model"]
        client = self.upstream.client
        assert client is not None
        if not p.stream:
            result = await client.chat(messages, **options)
            return result_line(entry.id, P.complete_result(result, model))
        stream = client.stream(messages, **options)
        async with stream:
            async for chunk in stream:
                if chunk.text:
                    await self.out.send(notification_line("stream.chunk", TaggedStreamChunk(
                        content=chunk.text, done=False, id=entry.id)))
        return result_line(entry.id, P.complete_result(stream.result, model))

    async def _stream(self, params: Any) -> bytes:
        """llmkit's Stream: ``stream.start`` -> ``stream.chunk``... -> ``stream.done``."""
        async with self._idless_turn:
            p = P.decode_params(params, P.CompleteParams, "stream.start")
            await self._wait_ready()
            messages, options = P.request_of(p, self.model)
            client = self.upstream.client
            assert client is not None
            stream = client.stream(messages, **options)
            async with stream:
                async for chunk in stream:
                    if chunk.text:
                        await self.out.send(notification_line(
                            "stream.chunk", StreamChunk(content=chunk.text, done=False)))
            result = stream.result
            return notification_line("stream.done", StreamDone(
                usage=P.usage_of(result), finish_reason=result.finish_reason,
                model=options["model"]))

    # -- stopping -------------------------------------------------------------------------

    async def _drain_after_eof(self, stopped: asyncio.Future[Any]) -> None:
        """No more input: let what is in flight finish, unless stopped or out of time."""
        tasks = {e.task for e in self._entries.values() if e.task is not None}
        if not tasks:
            return
        log.info("stdin closed; finishing in-flight requests",
                 extra={"in_flight": len(tasks), "grace_s": self.eof_grace})
        finished = asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait({finished, stopped}, timeout=self.eof_grace,
                           return_when=asyncio.FIRST_COMPLETED)

    async def _close(self, shutdown: Incoming | None) -> None:
        """Cancel what is in flight (each gets its error answer), close the pool, then send
        the response to ``shutdown`` (when it was a request, not a notification) as the
        last line."""
        entries = list(self._entries.values())
        tasks = [e.task for e in entries if e.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in entries:
            self._answer(entry, entry.error(RpcError(
                STREAM_ERROR if not entry.has_id else BACKEND_ERROR, SHUTTING_DOWN,
                {"tokenhive_code": "cancelled", "retryable": False} if entry.has_id else None)))
        result = ShutdownResult(success=True, message="tokenhive sidecar stopped")
        try:
            await self.upstream.close()
        except Exception as exc:  # a pool that would not stop cleanly: still say so
            log.exception("closing the pool failed")
            result = ShutdownResult(success=False, message=f"stopping the pool failed: {exc}")
        if shutdown is not None and shutdown.has_id:
            self.out.send_now(result_line(shutdown.id, result))
        await self.out.flush()
