"""The worker's one DEALER socket to the broker, replaceable by a fresh one.

A broker that restarts forgets every peer; a socket that merely reconnects underneath keeps
its old pipe and queued messages. So on broker loss the runtime closes this socket and opens a
new one (``open`` after ``close``) and registers again on it.

The socket comes from ``tokenhive.transport`` (shared options: high-water marks,
MAXMSGSIZE, TCP keepalive, linger). The worker's own choices, and why:

* ``ROUTING_ID`` = the worker id, so the broker addresses the worker by name (and a restarted
  worker with the same id takes its place; the broker sets ROUTER_HANDOVER).
* ``IMMEDIATE`` = 1: messages are queued only on a completed connection. Without it a DEALER
  queues into a pipe for a broker that is not there, and on reconnect the broker would get a
  burst of stale heartbeats and chunks for requests it no longer knows. With it, a send waits
  for a connection (Ready does exactly that) and ``send_or_drop`` fails fast (a heartbeat is
  dropped instead of queued: the next one carries fresher state anyway).
* ``LINGER`` = 0 on broker loss (whatever is queued is for a broker that is gone), a short
  linger on a deliberate exit so Goodbye gets out.
* ``SNDHWM``/``RCVHWM`` high: a burst of chunks must not block a stream for long.
* ``MAXMSGSIZE`` (``max_message_bytes``): a broker message bigger than that drops the
  connection inside libzmq instead of being buffered here.
* ``RECONNECT_IVL`` short with a capped backoff: zmq reconnects the transport by itself while
  the broker restarts, quickly at first.

I/O is done on a plain (not ``zmq.asyncio``) socket, because the hot path is sending chunks
and zmq.asyncio costs ~5x more per send than a direct non-blocking send. The socket's FD is
edge-triggered: it signals "events may have changed", so on each wake-up we act until
ZMQ_EVENTS shows nothing left to do, and after our own sends (which can swallow a signal) we
look again on the next loop turn. A send that would block (no connection yet, or the
high-water mark reached) is kept in a backlog, in order, and later sends queue behind it
until it drains; the caller gets a future for it, which is how backpressure and "wait for
the connection" work.

Packing (``enable_packing``, ``WorkerConfig.pack_chunks``): chunks go through ``send_packed``
into a ``ChunkPacker`` (packer.py) that sends one turn's chunks per client as one message.
Every other send (``send``, ``send_or_drop``: terminals, Ready, heartbeats) flushes it first,
so nothing overtakes a chunk that was made before it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import typing
from collections.abc import Callable

import zmq

from tokenhive import transport
from tokenhive.transport import EVENTS, POLLIN, POLLOUT, recv_message, send_message
from tokenhive.workers.packer import ChunkPacker

log = logging.getLogger("tokenhive.worker.link")

HWM = transport.DEFAULT_HWM
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2_000
RECV_BATCH = 1_000  # messages handled per wake-up before yielding to the loop

# The hot path sends with the socket's C-level ``send`` (transport.raw): pyzmq's
# ``send_multipart`` spends ~8 us per 3-frame message in Python layers and IntFlag
# arithmetic, this ~1 us (measured on this machine).


class LinkDown(Exception):
    """A send was attempted while no socket is open."""


class BrokerLink:
    def __init__(self, address: str, identity: bytes,
                 on_message: Callable[[list[bytes]], None], hwm: int = HWM,
                 max_message_bytes: int = transport.DEFAULT_MAX_MESSAGE_BYTES,
                 curve: transport.CurveKeys | None = None) -> None:
        self.address = address
        self.identity = identity
        # With CURVE the broker's ROUTER picks our identity (no handover: a chosen one
        # proves nothing there); the worker id travels in Ready, bound to our key.
        self.curve = curve
        self.on_message = on_message
        self.hwm = hwm
        self.max_message_bytes = max_message_bytes
        self.ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] | None = None
        self._raw: transport.Raw | None = None  # the open socket's C-level methods
        self._fd = -1
        self._backlog: collections.deque[tuple[list[bytes], asyncio.Future[None]]] = (
            collections.deque())
        self._poke_pending = False
        self.opened = 0  # sockets opened so far: 1 is the first connection, more are reconnects
        # Set by enable_packing: chunks wait there for the end of the loop turn.
        self.packer: ChunkPacker | None = None

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def open(self) -> None:
        if self._sock is not None:
            raise RuntimeError("link already open")
        sock = transport.dealer(
            self.ctx, hwm=self.hwm, max_message_bytes=self.max_message_bytes,
            routing_id=None if self.curve else self.identity, immediate=True,
            reconnect_ivl_ms=RECONNECT_IVL_MS, reconnect_ivl_max_ms=RECONNECT_IVL_MAX_MS,
            curve=self.curve)
        transport.connect(sock, self.address)
        self._sock = sock
        self._raw = transport.raw(sock)
        self._fd = typing.cast(int, sock.getsockopt(zmq.FD))
        asyncio.get_running_loop().add_reader(self._fd, self._on_events)
        self.opened += 1
        self._poke()

    def enable_packing(self) -> None:
        """From now on, ``send_packed`` groups chunks per client and loop turn (packer.py)."""
        if self.packer is None:
            self.packer = ChunkPacker(self._enqueue, self._is_blocked)

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket; sends still in the backlog (or held for packing) are cancelled."""
        if self._sock is None:
            return
        if self.packer is not None:
            self.packer.drop()
        asyncio.get_running_loop().remove_reader(self._fd)
        while self._backlog:
            self._backlog.popleft()[1].cancel()
        self._sock.close(linger=linger_ms)
        self._sock = None
        self._raw = None

    def terminate(self) -> None:
        self.close()
        self.ctx.term()

    # -- sending -----------------------------------------------------------------------------

    def send(self, frames: list[bytes]) -> asyncio.Future[None] | None:
        """Send ``frames`` in order with every earlier send (chunks held for packing first).

        Returns None when the message went straight to the socket, else a future that
        completes when it does (cancel it to withdraw the message).
        """
        packer = self.packer
        if packer is not None and packer.pending:
            if self._raw is None:
                raise LinkDown("no broker socket")
            packer.flush()
        return self._enqueue(frames)

    def send_packed(self, key: bytes, client: bytes, body: bytes) -> asyncio.Future[None] | None:
        """Hold a chunk for the request with routing key ``key`` of ``client`` until the end of
        this loop turn (``enable_packing`` first); a future while the socket is backed up."""
        if self._raw is None:
            raise LinkDown("no broker socket")
        assert self.packer is not None
        return self.packer.add(key, client, body)

    def _is_blocked(self) -> bool:
        return bool(self._backlog)

    def _enqueue(self, frames: list[bytes]) -> asyncio.Future[None] | None:
        io = self._raw
        if io is None:
            raise LinkDown("no broker socket")
        if not self._backlog:
            try:
                send_message(io.send, frames)
            except zmq.Again:
                pass
            else:
                self._poke()
                return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._backlog.append((frames, future))
        self._poke()
        return future

    def send_or_drop(self, frames: list[bytes]) -> bool:
        """Send now or not at all (no connection / pipe full): for periodic messages."""
        packer = self.packer
        if packer is not None and packer.pending and self._raw is not None:
            packer.flush()
        io = self._raw
        if io is None or self._backlog:
            return False
        try:
            send_message(io.send, frames)
        except zmq.Again:
            return False
        self._poke()
        return True

    def _flush(self) -> None:
        io = self._raw
        assert io is not None
        while self._backlog:
            frames, future = self._backlog[0]
            if not future.done():  # a cancelled send is withdrawn, not sent
                try:
                    send_message(io.send, frames)
                except zmq.Again:
                    return
                future.set_result(None)
            self._backlog.popleft()

    # -- receiving ---------------------------------------------------------------------------

    def _poke(self) -> None:
        """Look at the socket again on the next loop turn (our own I/O may have eaten the
        edge-triggered FD's signal)."""
        if not self._poke_pending:
            self._poke_pending = True
            asyncio.get_running_loop().call_soon(self._on_events)

    def pump(self) -> None:
        """Handle whatever is waiting on the socket now (e.g. after the loop was blocked)."""
        self._on_events()

    def _on_events(self) -> None:
        # Act until ZMQ_EVENTS shows nothing to do: querying it processes the socket's pending
        # commands, so once it reports nothing actionable, any later change signals the FD.
        self._poke_pending = False
        handled = 0
        while (io := self._raw) is not None:
            events = io.get(EVENTS)
            if self._backlog and events & POLLOUT:
                self._flush()  # sends at least one message: progress
                continue
            if not events & POLLIN:
                return
            if handled >= RECV_BATCH:
                self._poke()  # more is waiting: come back after others had a turn
                return
            try:
                frames = recv_message(io.recv)
            except zmq.Again:
                continue
            handled += 1
            self.on_message(frames)
