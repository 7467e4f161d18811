"""Staying registered with the broker: Ready, heartbeats, liveness and fresh reconnects.

A *session* is one DEALER socket's life. It starts by sending Ready (the send waits for the
connection, see link.py) and ends when the broker has been silent for ``heartbeat_liveness``
intervals. Then the owner gives up its in-flight work (``broker_lost``), the socket is closed
and a fresh one opened: straight away after a session in which the broker spoke, after a
backoff doubling from ``heartbeat_interval`` up to ``reconnect_max`` while it stays away.

Terminal messages produced while no Ready has gone out on the current socket are held back
and sent right after the next Ready, so the broker always hears who we are first.

Reregister -> Ready again on the same socket. BrokerPing only proves liveness. Everything
else (Dispatch, CancelWork, Rejected) goes to the owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import msgspec

from tokenhive import transport
from tokenhive.schemas.frames import (
    ROUTE_CONTROL,
    ROUTE_END,
    VERSION_FRAME,
    broker_to_worker_decoder,
    encode,
    version_of,
)
from tokenhive.schemas.messages import (
    BrokerPing,
    BrokerToWorkerMsg,
    CancelWork,
    Dispatch,
    Error,
    Final,
    Health,
    Heartbeat,
    Ready,
    Rejected,
    Reregister,
    WorkerMsg,
)
from tokenhive.workers.link import BrokerLink

log = logging.getLogger("tokenhive.worker")


class ConnectionOwner(Protocol):
    worker_id: str

    def ready(self) -> Ready: ...

    def heartbeat(self) -> Heartbeat: ...

    def handle(self, msg: Dispatch | CancelWork | Rejected) -> None: ...

    async def broker_lost(self) -> None: ...


def control(msg: WorkerMsg) -> list[bytes]:
    return [VERSION_FRAME, ROUTE_CONTROL, encode(msg)]


class BrokerConnection:
    def __init__(self, address: str, owner: ConnectionOwner, *, interval: float,
                 liveness: int, reconnect_max: float,
                 max_message_bytes: int = transport.DEFAULT_MAX_MESSAGE_BYTES,
                 curve: transport.CurveKeys | None = None) -> None:
        self.link = BrokerLink(address, owner.worker_id.encode(), self._on_frames,
                               max_message_bytes=max_message_bytes, curve=curve)
        self.owner = owner
        self.interval = interval
        self.silence_limit = interval * liveness
        self.reconnect_max = reconnect_max
        self.registered = False  # Ready has gone out on the current socket
        self._heard = False  # the broker has spoken on the current socket
        self._last_seen = 0.0
        self._deferred: list[list[bytes]] = []  # terminals waiting for the next Ready
        self._registering: asyncio.Task[None] | None = None

    # -- what the owner sends ----------------------------------------------------------------

    def send_heartbeat(self) -> None:
        if self.registered:
            self.link.send_or_drop(control(self.owner.heartbeat()))

    def announce(self) -> None:
        """Tell the broker our facts changed (e.g. loading finished): Ready, then Heartbeat."""
        if self.registered:
            self.link.send(control(self.owner.ready()))
            self.send_heartbeat()

    def send_terminal(self, key: bytes, msg: Final | Error) -> None:
        frames = [VERSION_FRAME, ROUTE_END + key, encode(msg)]
        if self.registered and self.link.is_open:
            self.link.send(frames)
        else:
            self._deferred.append(frames)

    async def say_goodbye(self, msg: WorkerMsg, wait_s: float) -> bool:
        """Send ``msg`` and let it leave before the socket closes; False if no broker
        connection turned up within ``wait_s``."""
        if not self.link.is_open:
            return False
        sending = self.link.send(control(msg))
        if sending is not None:
            try:
                await asyncio.wait_for(sending, timeout=wait_s)
            except TimeoutError:
                return False
        self.link.close(linger_ms=1000)
        return True

    # -- sessions ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until cancelled."""
        silent_sessions = 0
        while True:
            self.link.open()
            heard = await self._session()
            self.registered = False  # terminals from here on wait for the next Ready
            silent_sessions = 0 if heard else silent_sessions + 1
            await self.owner.broker_lost()
            self.link.close()
            delay = 0.0
            if silent_sessions:
                delay = min(self.reconnect_max, self.interval * 2 ** (silent_sessions - 1))
            log.warning("broker lost; reconnecting with a fresh socket", extra={
                "worker": self.owner.worker_id, "backoff_s": delay,
                "silent_sessions": silent_sessions})
            if delay:
                await asyncio.sleep(delay)  # reconnect backoff

    async def _session(self) -> bool:
        """Serve on the open socket until the broker falls silent; True if it ever spoke."""
        self.registered = False
        self._heard = False
        self._last_seen = time.monotonic()
        self._start_registering()
        try:
            tick = time.monotonic()
            while True:
                tick += self.interval
                await asyncio.sleep(max(0.0, tick - time.monotonic()))  # heartbeat timer
                now = time.monotonic()
                late = now - tick
                if late > max(0.25, self.interval / 2):
                    log.warning("event loop was blocked (a backend computing on the loop?)",
                                extra={"worker": self.owner.worker_id,
                                       "late_ms": round(late * 1000)})
                    tick = now
                    # Judge the broker on what it sent, not on our own stall: read what is
                    # waiting, and do not count the stalled time as broker silence.
                    self._last_seen = min(now, self._last_seen + late)
                    self.link.pump()
                if now - self._last_seen > self.silence_limit:
                    log.warning("broker silent", extra={
                        "worker": self.owner.worker_id,
                        "silent_s": round(now - self._last_seen, 2)})
                    return self._heard
                self.send_heartbeat()
        finally:
            if self._registering is not None:
                self._registering.cancel()
                await asyncio.gather(self._registering, return_exceptions=True)
                self._registering = None

    def _start_registering(self) -> None:
        if self._registering is None or self._registering.done():
            self._registering = asyncio.create_task(self._register())
            self._registering.add_done_callback(_log_failure)

    async def _register(self) -> None:
        """Send Ready (waiting for the connection), then what waited for it."""
        self.registered = False
        while True:
            ready = self.owner.ready()
            sending = self.link.send(control(ready))
            if sending is not None:
                await sending  # no connection yet: IMMEDIATE holds it until there is one
            # Loading may have finished while the send waited for a connection.
            if ready.health != Health.LOADING or self.owner.ready().health == Health.LOADING:
                break
        self.registered = True
        self._last_seen = time.monotonic()  # the broker can only ping us once it knows us
        log.info("registered", extra={"worker": self.owner.worker_id, "socket": self.link.opened,
                                      "health": ready.health.value})
        deferred, self._deferred = self._deferred, []
        for frames in deferred:
            self.link.send(frames)
        self.send_heartbeat()

    def _on_frames(self, frames: list[bytes]) -> None:
        msg = self._decode(frames)
        if msg is None:
            return
        self._last_seen = time.monotonic()
        self._heard = True
        if isinstance(msg, BrokerPing):
            return
        log.debug("from broker", extra={"worker": self.owner.worker_id, "type": type(msg).__name__})
        if isinstance(msg, Reregister):
            log.info("broker asked us to register again", extra={"worker": self.owner.worker_id})
            self.registered = False  # terminals from here on wait for the new Ready
            self._start_registering()
        else:
            self.owner.handle(msg)

    def _decode(self, frames: list[bytes]) -> BrokerToWorkerMsg | None:
        if len(frames) != 2 or frames[0] != VERSION_FRAME:
            log.warning("dropping malformed broker message", extra={
                "worker": self.owner.worker_id, "frames": len(frames),
                "version": version_of(frames[0]) if frames else None})
            return None
        try:
            return broker_to_worker_decoder.decode(frames[1])
        except msgspec.DecodeError as exc:
            log.warning("dropping undecodable broker message",
                        extra={"worker": self.owner.worker_id, "error": str(exc)})
            return None


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("registration failed", exc_info=task.exception())
