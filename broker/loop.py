"""The only module that touches sockets: two ROUTERs, drained into the core.

Both sockets are plain (non-asyncio) zmq sockets whose FDs are registered with the event
loop. ZeroMQ FDs are edge-triggered and also signal on internal commands, so on every
wake-up the loop receives with NOBLOCK until ``zmq.Again`` (in batches, so that neither
socket nor the timers starve), and after sending it re-checks ``EVENTS``: a send may have
consumed the notification for messages that are already waiting.

Nothing is dropped silently. Both ROUTERs are ROUTER_MANDATORY, so a send to a peer that
is gone raises EHOSTUNREACH and one to a peer whose pipe is full raises EAGAIN; both are
reported to the core (``sink.GONE`` / ``sink.FULL``). Sends to a slow client are buffered
per client (up to ``client_buffer`` messages), flushed whenever the socket wakes us.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from tokenhive.broker.core import BrokerCore
from tokenhive.broker.sink import FULL, GONE, SENT
from tokenhive.schemas.config import BrokerConfig
from tokenhive.schemas.frames import VERSION_FRAME

log = logging.getLogger("tokenhive.broker")

BATCH = 2000  # messages per socket per wake-up before yielding to timers and the other socket
_MORE_NOW = zmq.SNDMORE | zmq.NOBLOCK
_ROUTE_CHUNK_BYTE = ord("c")


def _recv_message(recv: Callable[..., Any]) -> list[bytes]:
    """One whole multipart message from a ROUTER, without blocking (zmq.Again if none).

    Not recv_multipart: it asks getsockopt(RCVMORE) after every frame, which costs more
    than the recv itself. A zero-copy Frame carries the same bit as ``.more``, and the
    identity frame needs no check: a ROUTER always delivers it with at least one more."""
    frames = [recv(zmq.NOBLOCK)]
    frame = recv(zmq.NOBLOCK, copy=False)  # the rest of the message is already here
    frames.append(frame.bytes)
    while frame.more:
        frame = recv(zmq.NOBLOCK, copy=False)
        frames.append(frame.bytes)
    return frames


def _bindable(address: str) -> str:
    """``tcp://host:0`` means any free port; zmq spells that ``tcp://host:*``."""
    if address.startswith("tcp://") and address.endswith(":0"):
        return address[:-1] + "*"
    return address


class BrokerServer:
    def __init__(self, config: BrokerConfig, context: zmq.Context[zmq.Socket[bytes]] | None = None):
        self.cfg = config
        self._own_context = context is None
        self.ctx = context or zmq.Context()
        self.frontend = self._router()  # clients
        self.backend = self._router()  # workers
        # The backend's own send, skipping pyzmq's Python-level wrapper (routing_id/group
        # handling we never use): half the cost per frame, and the hot path sends 3 frames.
        self._send_client = super(zmq.Socket, self.frontend).send
        self._send_worker = super(zmq.Socket, self.backend).send
        self._recv_client = super(zmq.Socket, self.frontend).recv
        self._recv_worker = super(zmq.Socket, self.backend).recv
        self.core = BrokerCore(config, self)
        self._backlog: dict[bytes, deque[bytes]] = {}  # slow clients: bodies not yet sent
        self._overflowed: set[bytes] = set()
        # A backlogged client's pipe is retried every this many new messages, not only on
        # wake-ups: one drained batch can be larger than the whole buffer.
        self._flush_at = max(1, min(64, config.client_buffer // 8))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_scheduled = False
        self._tick_handle: asyncio.TimerHandle | None = None
        # Deadlines and heartbeats are checked on this period; 50 ms is plenty for both.
        self.tick_interval = max(0.005, min(0.05, config.heartbeat_interval / 4))

    def _router(self) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.ROUTER)
        # All options before bind: they apply to pipes created afterwards.
        sock.setsockopt(zmq.SNDHWM, self.cfg.hwm)
        sock.setsockopt(zmq.RCVHWM, self.cfg.hwm)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable -> error, never a silent drop
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer with a set identity wins
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def bind(self) -> tuple[str, str]:
        """Bind both sockets; returns the actual endpoints (with real ports for ``:0``)."""
        self.frontend.bind(_bindable(self.cfg.clients))
        self.backend.bind(_bindable(self.cfg.workers))
        return (
            self.frontend.getsockopt(zmq.LAST_ENDPOINT).decode(),  # type: ignore[union-attr]
            self.backend.getsockopt(zmq.LAST_ENDPOINT).decode(),  # type: ignore[union-attr]
        )

    async def serve(self, stop: asyncio.Event) -> None:
        loop = self._loop = asyncio.get_running_loop()
        fds = (self.frontend.FD, self.backend.FD)
        for fd in fds:
            loop.add_reader(fd, self._pump)
        self._tick_handle = loop.call_later(self.tick_interval, self._tick)
        self._pump()  # whatever arrived before the readers were installed
        try:
            await stop.wait()
        finally:
            for fd in fds:
                loop.remove_reader(fd)
            self._tick_handle.cancel()
            self.core.shutdown()
            self._flush_backlogs()

    def close(self, linger_ms: int = 200) -> None:
        """Close both sockets, giving farewell messages ``linger_ms`` to leave."""
        for sock in (self.frontend, self.backend):
            sock.close(linger=linger_ms)
        if self._own_context:
            self.ctx.term()

    # -- receiving -------------------------------------------------------------------------

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        self.core.touch()
        more = self._drain_workers()
        more = self._drain_clients() or more
        self.core.settle()
        if self._backlog:
            self._flush_backlogs()
        if more:
            self._schedule_pump()
        else:
            self._recheck()

    def _recheck(self) -> None:
        """Edge-triggered FDs: after our own sends, look again before going to sleep."""
        pending = int(self.backend.EVENTS) | int(self.frontend.EVENTS)  # type: ignore[arg-type]
        if pending & zmq.POLLIN:
            self._schedule_pump()

    def _drain_workers(self) -> bool:
        """Receive up to BATCH worker messages; True if more may be waiting."""
        recv = self._recv_worker
        core = self.core
        on_chunk = core.on_chunk
        version = VERSION_FRAME
        for _ in range(BATCH):
            try:
                frames = _recv_message(recv)
            except zmq.Again:
                return False
            try:
                # Hot path: a chunk of a known request is one dict lookup and one send.
                if len(frames) == 4 and frames[1] == version:
                    route = frames[2]
                    if route and route[0] == _ROUTE_CHUNK_BYTE:
                        on_chunk(frames[0], route, frames[3])
                        continue
                core.on_worker_frames(frames)
            except Exception:  # a bug must not take the broker down for everyone
                core.counts["internal_errors"] += 1
                log.exception("internal error on a worker message")
        return True

    def _drain_clients(self) -> bool:
        recv = self._recv_client
        core = self.core
        for _ in range(BATCH):
            try:
                frames = _recv_message(recv)
            except zmq.Again:
                return False
            try:
                core.on_client_frames(frames)
            except Exception:
                core.counts["internal_errors"] += 1
                log.exception("internal error on a client message")
        return True

    def _tick(self) -> None:
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(self.tick_interval, self._tick)
        self._pump()  # read what already arrived, so liveness judges on fresh facts
        try:
            self.core.tick()
        except Exception:
            self.core.counts["internal_errors"] += 1
            log.exception("internal error in the broker tick")
        if self._backlog:
            self._flush_backlogs()
        self._recheck()

    # -- sending (the core's Sink) ---------------------------------------------------------

    def to_client(self, ident: bytes, body: bytes) -> int:
        backlog = self._backlog.get(ident) if self._backlog else None
        if backlog is None:
            send = self._send_client
            try:
                send(ident, _MORE_NOW)
            except zmq.Again:  # this client's pipe is full: start buffering for it
                backlog = self._backlog[ident] = deque()
            except zmq.ZMQError as exc:
                return self._send_error(exc, "client", ident)
            else:
                send(VERSION_FRAME, zmq.SNDMORE)
                send(body)
                return SENT
        backlog.append(body)
        if len(backlog) > self._flush_at and not self._flush_one(ident, backlog):
            return GONE
        if len(backlog) > self.cfg.client_buffer and ident not in self._overflowed:
            self._overflowed.add(ident)
            return FULL
        return SENT

    def to_worker(self, ident: bytes, body: bytes) -> int:
        send = self._send_worker
        try:
            send(ident, _MORE_NOW)
        except zmq.Again:
            return FULL
        except zmq.ZMQError as exc:
            return self._send_error(exc, "worker", ident)
        send(VERSION_FRAME, zmq.SNDMORE)
        send(body)
        return SENT

    def _send_error(self, exc: zmq.ZMQError, side: str, ident: bytes) -> int:
        if exc.errno != errno.EHOSTUNREACH:
            log.error("send failed", extra={"side": side, "peer": ident.hex(), "error": str(exc)})
        return GONE

    def _flush_one(self, ident: bytes, backlog: deque[bytes]) -> bool:
        """Send what the client's pipe takes now; False if the client is gone."""
        # Reading EVENTS makes zmq process pending commands now, among them the "reader
        # made room" notices of this pipe; sends only look at commands about once per ms.
        self.frontend.getsockopt(zmq.EVENTS)
        send = self._send_client
        while backlog:
            try:
                send(ident, _MORE_NOW)
            except zmq.Again:
                return True
            except zmq.ZMQError as exc:
                self._send_error(exc, "client", ident)
                backlog.clear()
                return False
            send(VERSION_FRAME, zmq.SNDMORE)
            send(backlog.popleft())
        return True

    def _flush_backlogs(self) -> None:
        for ident in list(self._backlog):
            backlog = self._backlog[ident]
            if not self._flush_one(ident, backlog):
                self.core.client_unreachable(ident)
            if not backlog:
                del self._backlog[ident]
                self._overflowed.discard(ident)
        self.core.settle()
