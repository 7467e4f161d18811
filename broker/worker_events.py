"""The worker side of the core: registration, health, terminals, lost workers.

A mixin of ``BrokerCore`` (split out only to keep files small); it uses the core's state
and helpers, declared below for the type checker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec

from tokenhive.broker import wire
from tokenhive.broker.job import Job, JobState
from tokenhive.broker.registry import Worker, WorkerRegistry
from tokenhive.schemas.config import BrokerConfig
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import ROUTE_CHUNK, ROUTE_END, worker_msg_decoder
from tokenhive.schemas.messages import Goodbye, Health, Heartbeat, Ready

if TYPE_CHECKING:
    from tokenhive.broker.inflight import InFlight
    from tokenhive.broker.queue import ModelQueue
    from tokenhive.broker.sink import Sink

log = logging.getLogger("tokenhive.broker")


class WorkerEvents:
    if TYPE_CHECKING:
        cfg: BrokerConfig
        sink: Sink
        now: float
        counts: dict[str, int]
        registry: WorkerRegistry
        inflight: InFlight
        worker_timeout: float
        _dirty: set[str]
        _rereg_sent: dict[bytes, float]

        def touch(self) -> None: ...
        def settle(self) -> None: ...
        def on_chunk(self, ident: bytes, route: bytes, body: bytes) -> None: ...
        def _queue(self, model: str) -> ModelQueue: ...
        def _end(self, job: Job, code: ErrorCode, message: str, **fields: object) -> None: ...
        def _finish(self, job: Job, body: bytes, outcome: str) -> None: ...
        def _terminal(self, job: Job, body: bytes) -> tuple[bytes, str]: ...

    def on_worker_frames(self, frames: list[bytes]) -> None:
        """One message from the worker socket: ``[ident, VERSION, route, body]``, or garbage."""
        self.touch()
        ident = frames[0]
        worker = self.registry.get(ident)
        if worker is not None:
            worker.last_seen = self.now  # any message proves it alive
        if len(frames) < 2:
            self._reject(ident, "bad_frames", ErrorCode.INVALID_REQUEST, "empty message")
        elif (problem := wire.version_problem(frames[1])) is not None:
            self._reject(ident, problem[0], ErrorCode.PROTOCOL_VERSION, problem[1])
        elif len(frames) != 4:
            self._reject(ident, "bad_frames", ErrorCode.INVALID_REQUEST,
                         f"expected 3 frames [version, route, body], got {len(frames) - 1}")
        else:
            route, body = frames[2], frames[3]
            tag = route[:1]
            if not route:
                self._on_control(ident, body)
            elif tag == ROUTE_CHUNK and len(route) > 1:
                self.on_chunk(ident, route, body)
            elif tag == ROUTE_END and len(route) > 1:
                self.on_end(ident, route, body)
            else:
                self._reject(ident, "bad_frames", ErrorCode.INVALID_REQUEST,
                             f"unknown route frame {route[:16]!r}")
        self.settle()

    def _on_control(self, ident: bytes, body: bytes) -> None:
        try:
            msg = worker_msg_decoder.decode(body)
        except msgspec.DecodeError as exc:
            self._reject(ident, "bad_frames", ErrorCode.INVALID_REQUEST,
                         f"undecodable worker message: {wire.short(exc)}")
            return
        if isinstance(msg, Ready):
            self.on_ready(ident, msg)
        elif isinstance(msg, Heartbeat):
            self.on_heartbeat(ident, msg)
        else:
            self.on_goodbye(ident, msg)

    def on_ready(self, ident: bytes, ready: Ready) -> None:
        problem = (
            "worker name must not be empty" if not ready.worker
            else "model must not be empty" if not ready.model
            else f"slots must be >= 1, got {ready.slots}" if ready.slots < 1
            else None
        )
        if problem is not None:
            self._reject(ident, "bad_frames", ErrorCode.INVALID_REQUEST, f"bad Ready: {problem}")
            return
        previous = self.registry.get(ident)
        if previous is not None and not previous.active and not previous.cancelling:
            # an update (a worker announces itself while loading, then again when loaded)
            self.registry.remove(previous, self.now)
        elif previous is not None:  # the same socket announcing itself again: a fresh start
            self._lose_worker(previous, "registered again", counter="workers_lost")
        namesake = self.registry.by_name(ready.worker)
        if namesake is not None:  # a restarted worker on a new socket replaces the old one
            self._lose_worker(namesake, "replaced by a new registration", counter="workers_lost")
        worker = self.registry.add(ident, ready, self.now)
        self._rereg_sent.pop(ident, None)
        self.counts["workers_registered"] += 1
        log.info("worker registered", extra={
            "worker": worker.name, "model": worker.model, "backend": worker.backend,
            "slots": worker.slots, "health": worker.health.value, "device": worker.device,
        })
        self._dirty.add(worker.model)

    def on_heartbeat(self, ident: bytes, hb: Heartbeat) -> None:
        worker = self.registry.get(ident)
        if worker is None:
            self._reregister(ident)
            return
        if hb.health is not worker.health:
            log.info("worker health", extra={"worker": worker.name, "health": hb.health.value,
                                             "was": worker.health.value, "detail": hb.detail})
        worker.health = hb.health
        worker.detail = hb.detail
        worker.memory_mb = hb.memory_mb
        worker.reported_free = hb.free_slots
        worker.reported_in_flight = hb.in_flight
        if hb.health is Health.OK:
            self._dirty.add(worker.model)

    def on_goodbye(self, ident: bytes, bye: Goodbye) -> None:
        worker = self.registry.get(ident)
        if worker is not None:
            why = f"goodbye: {bye.reason}" if bye.reason else "goodbye"
            if bye.code is not None:
                why += f" ({bye.code.value})"
            self._lose_worker(worker, why, counter="workers_left")

    def on_end(self, ident: bytes, route: bytes, body: bytes) -> None:
        """A worker's terminal (Final or Error): release the slot, answer the client."""
        job = self.inflight.by_end_route.get(route)
        if job is None or job.worker_ident != ident:
            worker = self.registry.get(ident)
            if worker is not None and worker.cancelling.pop(route, None) is not None:
                self._dirty.add(worker.model)  # the cancelled work really stopped: slot free
            self._stray(ident, route, "late_terminals")
            return
        worker = job.worker
        assert worker is not None
        self.inflight.remove(job)
        del worker.active[route]
        if not job.first_at:
            job.first_at = self.now
        worker.record_latency((job.first_at - job.dispatched_at) * 1000.0)
        answer, outcome = self._terminal(job, body)
        if outcome == "completed":
            worker.served += 1
        else:
            worker.failed += 1
        self._finish(job, answer, outcome)
        self._dirty.add(worker.model)

    def _stray(self, ident: bytes, route: bytes, counter: str) -> None:
        """A stream message for a request that is not (or no longer) in flight there."""
        self.counts[counter] += 1
        if self.registry.get(ident) is None:
            self._reregister(ident)

    def _reregister(self, ident: bytes) -> None:
        """Tell an unknown worker to send Ready, at most once per heartbeat interval."""
        sent = self._rereg_sent.get(ident)
        if sent is not None and self.now - sent < self.cfg.heartbeat_interval:
            return
        self._rereg_sent[ident] = self.now
        self.counts["reregister_sent"] += 1
        if self.sink.to_worker(ident, wire.REREGISTER):
            self.counts["send_failures"] += 1

    def _reject(self, ident: bytes, counter: str, code: ErrorCode, message: str) -> None:
        self.counts[counter] += 1
        if self.sink.to_worker(ident, wire.rejected_body(code, message)):
            self.counts["send_failures"] += 1

    def _lose_worker(self, worker: Worker, why: str, counter: str = "workers_lost") -> None:
        """Unregister; its work is requeued if nothing streamed yet, else answered."""
        if self.registry.get(worker.ident) is not worker:
            return  # already gone
        self.registry.remove(worker, self.now)
        self.counts[counter] += 1
        jobs = sorted(worker.active.values(), key=lambda j: j.seq, reverse=True)
        worker.active.clear()
        worker.cancelling.clear()
        # a worker leaving idle (drained, stopped) is routine; losing work is not
        log.log(logging.WARNING if jobs else logging.INFO, "worker removed", extra={
            "worker": worker.name, "model": worker.model, "why": why, "in_flight": len(jobs)})
        for job in jobs:  # newest first, each to the front: the oldest ends up leading
            self.inflight.remove(job)
            if job.chunks == 0 and job.attempts < self.cfg.max_attempts:
                job.state = JobState.QUEUED
                job.worker = None
                job.worker_ident = b""
                job.enqueued_at = self.now
                self._queue(job.model).push(job, front=True)
                self.counts["requeued"] += 1
                continue
            self.counts["worker_lost"] += 1
            if job.chunks:
                message = f"worker {worker.name} lost after {job.chunks} chunks ({why})"
            else:
                message = (f"worker {worker.name} lost ({why}); "
                           f"gave up after {job.attempts} attempts")
            # active was cleared above, so _end sends no CancelWork to the dead worker
            self._end(job, ErrorCode.WORKER_LOST, message, retryable=job.chunks == 0)
        self._dirty.add(worker.model)
