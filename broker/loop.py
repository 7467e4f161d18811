"""The only broker module that touches sockets: two ROUTERs, drained into the core.

The sockets and the C-level send/recv helpers come from ``tokenhive.transport`` (options:
high-water marks, MAXMSGSIZE from ``limits.max_message_bytes``, TCP keepalive).

Both sockets are plain (non-asyncio) zmq sockets whose FDs are registered with the event
loop. ZeroMQ FDs are edge-triggered and also signal on internal commands, so on every
wake-up the loop receives with NOBLOCK until ``zmq.Again`` (in batches, so that neither
socket nor the timers starve), and after sending it re-checks ``EVENTS``: a send may have
consumed the notification for messages that are already waiting.

Nothing is dropped silently. Both ROUTERs are ROUTER_MANDATORY, so a send to a peer that
is gone raises EHOSTUNREACH and one to a peer whose pipe is full raises EAGAIN; both are
reported to the core (``sink.GONE`` / ``sink.FULL``). Sends to a slow client are buffered
per client (up to ``client_buffer`` messages), flushed whenever the socket wakes us. The
one drop is on purpose and never reaches Python: a frame over MAXMSGSIZE makes libzmq close
that peer's connection at the frame's header (the peer reconnects; see ``transport``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque

import zmq
import zmq.utils.monitor

from tokenhive import transport
from tokenhive.broker.auth import CLIENTS_DOMAIN, WORKERS_DOMAIN, broker_curve, operator_check
from tokenhive.broker.core import BrokerCore
from tokenhive.broker.packs import on_pack
from tokenhive.broker.sink import FULL, GONE, SENT
from tokenhive.schemas.config import BrokerConfig
from tokenhive.schemas.frames import VERSION_FRAME
from tokenhive.transport import (
    EVENTS,
    POLLIN,
    recv_routed,
    recv_routed_sender,
    recv_routed_user,
    send_triple,
)

log = logging.getLogger("tokenhive.broker")

BATCH = 2000  # messages per socket per wake-up before yielding to timers and the other socket
_ROUTE_CHUNK_BYTE = ord("c")
_ROUTE_PACK_BYTE = ord("p")


class BrokerServer:
    def __init__(self, config: BrokerConfig, context: zmq.Context[zmq.Socket[bytes]] | None = None):
        self.cfg = config
        self._own_context = context is None
        self.ctx = context or zmq.Context()
        limit = config.limits.max_message_bytes  # bigger frames: libzmq drops the peer
        # CURVE (broker/auth.py): ZAP must be running before the sockets bind
        curve = broker_curve(config)
        self.authenticator: transport.CurveAuthenticator | None = None
        self._monitors: list[zmq.Socket[bytes]] = []
        self._handshake_failures = 0
        if curve is not None:
            self.authenticator = transport.CurveAuthenticator(self.ctx, curve.allow,
                                                            curve.keys.public)
            self.authenticator.start()
        keyed = curve.allow if curve is not None else {}
        client_keys = curve.keys if curve is not None and CLIENTS_DOMAIN in keyed else None
        worker_keys = curve.keys if curve is not None and WORKERS_DOMAIN in keyed else None
        self.frontend = transport.router(self.ctx, hwm=config.hwm, max_message_bytes=limit,
                                         curve=client_keys, zap_domain=CLIENTS_DOMAIN)
        self.backend = transport.router(self.ctx, hwm=config.hwm, max_message_bytes=limit,
                                        curve=worker_keys, zap_domain=WORKERS_DOMAIN)
        if client_keys is not None:
            self._monitors.append(transport.watch_handshakes(self.frontend, "clients"))
        if worker_keys is not None:
            self._monitors.append(transport.watch_handshakes(self.backend, "workers"))
        # keyed workers: read each Ready's sender key (the User-Id ZAP gave it)
        self._keyed_workers = worker_keys is not None
        self._keyed_clients = client_keys is not None  # operator messages check the key
        # The sockets' C-level methods: half the cost per frame of pyzmq's wrappers, and
        # the hot path receives 4 frames and sends 3 per chunk.
        self._send_client, self._recv_client, self._get_client = transport.raw(self.frontend)
        self._send_worker, self._recv_worker, self._get_worker = transport.raw(self.backend)
        self.core = BrokerCore(config, self)
        self.core.auth_failures = self._auth_failures
        self.core.may_operate = operator_check(config, curve)
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

    def bind(self) -> tuple[str, str]:
        """Bind both sockets; returns the actual endpoints (with real ports for ``:0``)."""
        return (transport.bind(self.frontend, self.cfg.clients),
                transport.bind(self.backend, self.cfg.workers))

    async def serve(self, stop: asyncio.Event) -> None:
        loop = self._loop = asyncio.get_running_loop()
        fds = (self.frontend.FD, self.backend.FD, *(m.FD for m in self._monitors))
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
            self._loop = None  # a pump already scheduled must not touch the closing sockets
            self.core.shutdown()
            self._flush_backlogs()

    def close(self, linger_ms: int = 200) -> None:
        """Close both sockets, giving farewell messages ``linger_ms`` to leave."""
        for monitor in self._monitors:
            monitor.close(linger=0)
        for sock in (self.frontend, self.backend):
            sock.close(linger=linger_ms)
        if self.authenticator is not None:
            self.authenticator.stop()
        if self._own_context:
            self.ctx.term()

    # -- receiving -------------------------------------------------------------------------

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        if self._loop is None:  # stopped serving (the sockets may be closed already)
            return
        self.core.touch()
        if self._monitors:
            self._drain_monitors()
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
        if (self._get_worker(EVENTS) | self._get_client(EVENTS)) & POLLIN:
            self._schedule_pump()

    def _drain_workers(self) -> bool:
        """Receive up to BATCH worker messages; True if more may be waiting. With CURVE on the
        worker side, a control message also carries its sender's public key (the ZAP
        User-Id), which registration checks; chunks never ask for it."""
        recv = self._recv_worker
        core = self.core
        on_chunk = core.on_chunk
        state = core.state
        version = VERSION_FRAME
        keyed = self._keyed_workers
        user: str | None = None
        for _ in range(BATCH):
            try:
                if keyed:
                    frames, user = recv_routed_user(recv)
                else:
                    frames = recv_routed(recv)
            except zmq.Again:
                return False
            try:
                # Hot path: a chunk of a known request is one dict lookup and one send; a
                # pack (several requests' chunks for one client) one lookup per chunk and
                # one send (broker/packs.py).
                if len(frames) == 4 and frames[1] == version:
                    route = frames[2]
                    if route:
                        tag = route[0]
                        if tag == _ROUTE_CHUNK_BYTE:
                            on_chunk(frames[0], route, frames[3])
                            continue
                        if tag == _ROUTE_PACK_BYTE:
                            on_pack(state, frames[0], route, frames[3])
                            continue
                core.on_worker_frames(frames, user)
            except Exception:  # a bug must not take the broker down for everyone
                core.counts["internal_errors"] += 1
                log.exception("internal error on a worker message")
        return True

    def _drain_monitors(self) -> None:
        """Count failed handshakes: peers without CURVE, unknown keys, wrong server keys."""
        for monitor in self._monitors:
            while True:
                try:
                    event = zmq.utils.monitor.recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handshake_failures += 1
                log.warning("handshake refused", extra={
                    "endpoint": event["endpoint"].decode(errors="replace"),
                    "event": event["event"].name if hasattr(event["event"], "name")
                    else str(event["event"])})

    def _auth_failures(self) -> int:
        return self._handshake_failures

    def _drain_clients(self) -> bool:
        recv = self._recv_client
        core = self.core
        keyed = self._keyed_clients
        user: str | None = None
        for _ in range(BATCH):
            try:
                if keyed:
                    frames, user = recv_routed_sender(recv)
                else:
                    frames = recv_routed(recv)
            except zmq.Again:
                return False
            try:
                core.on_client_frames(frames, user)
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
            try:
                send_triple(self._send_client, ident, VERSION_FRAME, body)
            except zmq.Again:  # this client's pipe is full: start buffering for it
                backlog = self._backlog[ident] = deque()
            except zmq.ZMQError as exc:
                return self._send_error(exc, "client", ident)
            else:
                return SENT
        backlog.append(body)
        if len(backlog) > self._flush_at and not self._flush_one(ident, backlog):
            return GONE
        if len(backlog) > self.cfg.client_buffer and ident not in self._overflowed:
            self._overflowed.add(ident)
            return FULL
        return SENT

    def to_worker(self, ident: bytes, body: bytes) -> int:
        try:
            send_triple(self._send_worker, ident, VERSION_FRAME, body)
        except zmq.Again:
            return FULL
        except zmq.ZMQError as exc:
            return self._send_error(exc, "worker", ident)
        return SENT

    def _send_error(self, exc: zmq.ZMQError, side: str, ident: bytes) -> int:
        if exc.errno != errno.EHOSTUNREACH:
            log.error("send failed", extra={"side": side, "peer": ident.hex(), "error": str(exc)})
        return GONE

    def _flush_one(self, ident: bytes, backlog: deque[bytes]) -> bool:
        """Send what the client's pipe takes now; False if the client is gone."""
        # Reading EVENTS makes zmq process pending commands now, among them the "reader
        # made room" notices of this pipe; sends only look at commands about once per ms.
        self._get_client(EVENTS)
        send = self._send_client
        while backlog:
            try:
                send_triple(send, ident, VERSION_FRAME, backlog[0])
            except zmq.Again:
                return True
            except zmq.ZMQError as exc:
                self._send_error(exc, "client", ident)
                backlog.clear()
                return False
            backlog.popleft()
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
