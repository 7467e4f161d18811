"""The one DEALER socket a client shares between all its requests.

It owns the socket, a reader that demultiplexes stream messages by request id into one queue
per request, and a heartbeat task that pings the broker while anything is in flight. If the
broker stays silent for ``broker_timeout`` seconds, or the socket monitor reports the link
dropped (ZeroMQ would reconnect, but the broker on the other side no longer knows our
requests), every in-flight request receives a ``broker_unavailable`` Error, the socket is
closed, and the next request opens a fresh one: a restarted broker is picked up by itself.
Everything runs on the event loop that first uses the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from collections import deque

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from tokenhive import transport
from tokenhive.clients.inbox import ConnectionStats, Inbox
from tokenhive.schemas.errors import BrokerUnavailable, ErrorCode, InvalidRequest
from tokenhive.schemas.frames import VERSION_FRAME, broker_to_client_decoder, encode, version_of
from tokenhive.schemas.messages import (
    Cancel,
    Chunk,
    ClientMsg,
    Error,
    Final,
    Pack,
    Ping,
    Pong,
    StatusQuery,
    StatusReply,
)
from tokenhive.transport import EVENTS, POLLIN, POLLOUT, recv_message, send_pair

log = logging.getLogger("tokenhive.client")

HWM = transport.DEFAULT_HWM  # the reader drains into per-request inboxes: rarely much here
RECV_BATCH = 1_000  # messages handled per wake-up before letting other callbacks run

# I/O goes through the socket's C-level methods (transport.raw) on its edge-triggered FD, as
# in the broker and the worker link, not through zmq.asyncio futures: those cost several
# Python calls, IntFlag operations and a future per message, which was most of the client's
# CPU per request. A send that would block (the high-water mark) waits in a backlog, in order.


class Connection:
    def __init__(
        self,
        address: str,
        *,
        heartbeat_interval: float = 1.0,
        broker_timeout: float = 5.0,
        context: zmq.asyncio.Context | None = None,
        max_message_bytes: int = transport.DEFAULT_MAX_MESSAGE_BYTES,
        curve: transport.CurveKeys | None = None,
    ) -> None:
        if heartbeat_interval <= 0 or broker_timeout <= 0:
            raise InvalidRequest("heartbeat_interval and broker_timeout must be > 0")
        self.address = address
        self.heartbeat_interval = heartbeat_interval
        self.broker_timeout = broker_timeout
        self.max_message_bytes = max_message_bytes
        self.curve = curve  # CurveZMQ to a keyed broker; None: a plain socket
        self.stats = ConnectionStats()
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._raw: transport.Raw | None = None  # the socket's C-level methods
        self._monitor: zmq.asyncio.Socket | None = None
        self._generation = 0  # bumped per socket, so a late Cancel never goes to a new one
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: dict[str, Inbox] = {}
        self._fd = -1
        self._backlog: deque[bytes] = deque()  # bodies a full socket could not take yet
        self._poke_pending = False
        self._status_waiters: deque[asyncio.Future[StatusReply]] = deque()
        self._busy = asyncio.Event()
        self._last_heard = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- requests -------------------------------------------------------------------------

    def open_stream(self, request_id: str) -> tuple[Inbox, int]:
        """Register a request id; its stream messages will arrive in the returned inbox."""
        if request_id in self._streams:
            raise InvalidRequest(f"request id {request_id!r} is already in flight")
        self._ensure_socket()
        self._mark_busy()
        inbox = self._streams[request_id] = Inbox()
        return inbox, self._generation

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._mark_idle_if_done()

    def send(self, msg: ClientMsg, generation: int | None = None) -> bool:
        """Queue ``msg`` on the socket without waiting. With ``generation``, only if that
        socket is still the current one (a Cancel for a request the old broker had)."""
        if generation is not None and generation != self._generation:
            return False
        if generation is None:
            self._ensure_socket()
        io = self._raw
        if io is None:
            return False
        body = encode(msg)
        if not self._backlog:
            try:
                send_pair(io.send, VERSION_FRAME, body)
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                log.debug("client send failed", extra={"error": str(exc)})
                return True
            else:
                self._poke()
                return True
        self._backlog.append(body)
        self._poke()
        return True

    def cancel(self, request_id: str, generation: int) -> None:
        self.close_stream(request_id)
        self.send(Cancel(id=request_id), generation)

    async def status(self, timeout: float | None = None) -> StatusReply:  # noqa: ASYNC109
        """Ask the broker for its StatusReply. Replies carry no id: they match in order."""
        self._ensure_socket()
        waiter: asyncio.Future[StatusReply] = asyncio.get_running_loop().create_future()
        self._mark_busy()
        self._status_waiters.append(waiter)
        try:
            self.send(StatusQuery())
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            raise BrokerUnavailable(f"no status reply from {self.address} in {timeout}s") from None
        finally:
            if waiter in self._status_waiters:
                self._status_waiters.remove(waiter)
            self._mark_idle_if_done()

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def aclose(self) -> None:
        """Cancel whatever is in flight (the broker is told), then close the socket."""
        self._closed = True
        for request_id, inbox in list(self._streams.items()):
            self.send(Cancel(id=request_id), self._generation)
            inbox.put(Error.make(request_id, ErrorCode.CANCELLED, "client closed"))
        self._flush()  # the Cancels, before the socket closes
        self._streams.clear()
        self._drop_socket(BrokerUnavailable("client closed"))
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- socket lifecycle -----------------------------------------------------------------

    def _ensure_socket(self) -> zmq.asyncio.Socket:
        if self._closed:
            raise BrokerUnavailable("client is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("a tokenhive client is bound to the event loop that first used it")
        self._loop = loop
        if self._socket is not None:
            return self._socket
        sock = transport.dealer(self._context, hwm=HWM, max_message_bytes=self.max_message_bytes,
                                curve=self.curve)
        self._generation += 1
        monitor = sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED, f"inproc://tokenhive-client-{id(self)}-{self._generation}"
        )
        try:
            sock.connect(self.address)
        except zmq.ZMQError as exc:  # a malformed address: nothing to retry
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            raise InvalidRequest(f"cannot connect to {self.address!r}: {exc}") from None
        self._socket, self._monitor = sock, monitor
        self._raw = transport.raw(sock)
        self._fd = typing.cast(int, sock.getsockopt(zmq.FD))
        loop.add_reader(self._fd, self._on_events)
        self.stats.sockets += 1
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(loop.create_task(self._heartbeat(sock), name="tokenhive-client-ping"))
        self._tasks.append(
            loop.create_task(self._watch(sock, monitor), name="tokenhive-client-mon")
        )
        log.debug("client socket opened", extra={"address": self.address, "gen": self._generation})
        return sock

    def _drop_socket(self, exc: BrokerUnavailable) -> None:
        """Fail everything in flight on the current socket and close it."""
        for request_id, inbox in self._streams.items():
            inbox.put(Error.make(request_id, exc.code, exc.message))
        self._streams.clear()
        while self._status_waiters:
            waiter = self._status_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(BrokerUnavailable(exc.message))
        self._busy.clear()
        sock, self._socket = self._socket, None
        self._raw = None
        monitor, self._monitor = self._monitor, None
        self._backlog.clear()
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            sock.disable_monitor()
            sock.close(linger=0)
        if monitor is not None:
            monitor.close(linger=0)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    def _mark_busy(self) -> None:
        if not self._busy.is_set():
            # the silence clock starts when there is something to wait for
            self._last_heard = time.monotonic()
            self._busy.set()

    def _mark_idle_if_done(self) -> None:
        if not self._streams and not self._status_waiters:
            self._busy.clear()

    # -- tasks ----------------------------------------------------------------------------

    def _poke(self) -> None:
        """Look at the socket again on the next loop turn: our own sends may have consumed
        the edge-triggered FD's signal for messages that are already waiting."""
        if not self._poke_pending and self._loop is not None:
            self._poke_pending = True
            self._loop.call_soon(self._on_events)

    def _on_events(self) -> None:
        """Receive (and flush the backlog) until ZMQ_EVENTS shows nothing left to do."""
        self._poke_pending = False
        handled = 0
        while (io := self._raw) is not None:
            try:
                events = io.get(EVENTS)
                if self._backlog and events & POLLOUT:
                    self._flush()
                    continue
                if not events & POLLIN:
                    return
                if handled >= RECV_BATCH:
                    self._poke()  # more is waiting: let the callers run first
                    return
                frames = recv_message(io.recv)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return  # closed under us; _drop_socket handles the rest
            handled += 1
            self._last_heard = time.monotonic()
            self.stats.received += 1
            self._deliver(frames)

    def _flush(self) -> None:
        io = self._raw
        backlog = self._backlog
        while io is not None and backlog:
            try:
                send_pair(io.send, VERSION_FRAME, backlog[0])
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.debug("client send failed", extra={"error": str(exc)})
                backlog.clear()
                return
            backlog.popleft()

    def _deliver(self, frames: list[bytes]) -> None:
        if len(frames) != 2 or frames[0] != VERSION_FRAME:
            self.stats.bad_frames += 1
            version = version_of(frames[0]) if frames else None
            log.warning("bad frame from broker", extra={"frames": len(frames), "version": version})
            return
        try:
            msg = broker_to_client_decoder.decode(frames[1])
        except msgspec.DecodeError as exc:
            self.stats.bad_frames += 1
            log.warning("undecodable message from broker", extra={"error": str(exc)})
            return
        if isinstance(msg, Chunk | Final | Error):
            inbox = self._streams.get(msg.id)
            if inbox is None:
                self.stats.unknown_id += 1
                log.debug("message for unknown request", extra={"request_id": msg.id})
            else:
                inbox.put(msg)
        elif isinstance(msg, Pack):
            # Several requests' chunks of one worker step: each as if it came alone. A member
            # for an id no longer waited for (cancelled meanwhile) is normal: dropped quietly.
            streams = self._streams
            for chunk in msg.chunks:
                inbox = streams.get(chunk.id)
                if inbox is None:
                    self.stats.unknown_id += 1
                else:
                    inbox.put(chunk)
        elif isinstance(msg, StatusReply):
            while self._status_waiters:
                waiter = self._status_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(msg)
                    break
            else:
                self.stats.unknown_id += 1
        elif isinstance(msg, Pong):
            pass  # _last_heard is all a Pong is for

    async def _watch(self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """The connection dropped: whatever the broker held for us is gone with it."""
        try:
            event = parse_monitor_message(await monitor.recv_multipart())
        except (asyncio.CancelledError, zmq.ZMQError):
            return
        if sock is self._socket and event["event"] == zmq.EVENT_DISCONNECTED:
            self.stats.broker_lost += 1
            log.warning("broker connection lost", extra={"address": self.address})
            self._drop_socket(BrokerUnavailable(f"connection to the broker at {self.address} lost"))

    async def _heartbeat(self, sock: zmq.asyncio.Socket) -> None:
        """While busy: Ping every interval; after broker_timeout of silence, give up the socket."""
        next_ping = 0.0
        while True:
            if not self._busy.is_set():
                await self._busy.wait()
                next_ping = time.monotonic() + self.heartbeat_interval
            if sock is not self._socket:
                return
            now = time.monotonic()
            silent = now - self._last_heard
            if silent >= self.broker_timeout:
                self.stats.broker_lost += 1
                message = f"no message from the broker at {self.address} for {silent:.1f}s"
                log.warning(
                    "broker unavailable", extra={"address": self.address, "silent_s": silent}
                )
                self._drop_socket(BrokerUnavailable(message))
                return
            if now >= next_ping:
                self.send(Ping(at=time.time()))
                next_ping = now + self.heartbeat_interval
            wake = min(next_ping, self._last_heard + self.broker_timeout)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))

