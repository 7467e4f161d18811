"""The broker's state machine: events in, sends out through a ``Sink``. No zmq here.

Entry points are the ``on_*`` methods (one per decoded event or raw frame list), ``tick``
(timers) and ``settle`` (follow-ups of the hot path). Every slow entry point settles before
it returns; the socket loop calls ``touch`` before and ``settle`` after each drained batch.

Guarantee: every accepted request gets exactly one final answer (Final or Error), sent in
``_finish``. Work is re-run only if the worker died before it streamed anything.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import msgspec

from tokenhive.broker import admission, wire
from tokenhive.broker.balancer import Balancer, make_balancer
from tokenhive.broker.deadlines import DeadlineHeap
from tokenhive.broker.inflight import InFlight, KeyMaker
from tokenhive.broker.job import ClientState, Job, JobState
from tokenhive.broker.queue import ModelQueue
from tokenhive.broker.registry import Worker, WorkerRegistry
from tokenhive.broker.sink import GONE, SENT, Sink
from tokenhive.broker.status import COUNTERS, snapshot
from tokenhive.broker.timers import Timers
from tokenhive.broker.worker_events import WorkerEvents
from tokenhive.schemas.config import BrokerConfig
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import client_msg_decoder, encode, stream_decoder
from tokenhive.schemas.messages import (
    Cancel,
    CancelWork,
    Dispatch,
    Error,
    Final,
    Ping,
    Pong,
    Request,
    StatusReply,
    Submit,
)

log = logging.getLogger("tokenhive.broker")


class BrokerCore(WorkerEvents, Timers):
    def __init__(
        self,
        config: BrokerConfig,
        sink: Sink,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        balancer: Balancer | None = None,
    ) -> None:
        self.cfg = config
        self.sink = sink
        self.clock = clock
        self.wall = wall
        self.now = clock()
        self.started = self.now
        self.registry = WorkerRegistry()
        self.queues: dict[str, ModelQueue] = {}
        self.inflight = InFlight()
        self.deadlines = DeadlineHeap()
        self.clients: dict[bytes, ClientState] = {}
        self.balancer = balancer or make_balancer(config.balancer)
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.chunks = 0  # forwarded; a plain attribute because the hot path bumps it
        self.worker_timeout = config.heartbeat_interval * config.heartbeat_liveness
        self._new_key = KeyMaker()
        self._seq = itertools.count(1)
        self._dirty: set[str] = set()  # models whose queue may now be dispatchable
        self._gone_clients: set[bytes] = set()
        self._full_clients: set[bytes] = set()
        self._troubled_workers: dict[bytes, int] = {}
        self._rereg_sent: dict[bytes, float] = {}
        self._stalled_since: dict[str, float] = {}  # model -> since when nobody can serve it
        self._last_ping = float("-inf")
        self._last_housekeeping = float("-inf")

    # -- time ------------------------------------------------------------------------------

    def touch(self) -> None:
        """Read the clock once; the hot path uses ``self.now`` instead of calling it."""
        self.now = self.clock()

    # -- the hot path ----------------------------------------------------------------------

    def on_chunk(self, ident: bytes, route: bytes, body: bytes) -> None:
        """Forward a chunk body unchanged. Not decoded; only counted."""
        job = self.inflight.by_chunk_route.get(route)
        if job is None or job.worker_ident != ident:
            self._stray(ident, route, "late_chunks")
            return
        if not job.chunks:
            job.first_at = self.now
        job.chunks += 1
        self.chunks += 1
        job.worker.last_seen = self.now  # type: ignore[union-attr]  # in flight => has worker
        rc = self.sink.to_client(job.client, body)
        if rc:
            self._client_trouble(job.client, rc)

    # -- client side -----------------------------------------------------------------------

    def on_client_frames(self, frames: list[bytes]) -> None:
        """One message from the client socket: ``[ident, VERSION, body]``, or garbage."""
        self.touch()
        ident = frames[0]
        client = self.clients.get(ident)
        if client is not None:
            client.last_seen = self.now  # any message refreshes liveness
        if len(frames) < 2:
            self._refuse_client(ident, "bad_frames", ErrorCode.INVALID_REQUEST, "empty message")
        elif (problem := wire.version_problem(frames[1])) is not None:
            self._refuse_client(ident, problem[0], ErrorCode.PROTOCOL_VERSION, problem[1])
        elif len(frames) != 3:
            self._refuse_client(ident, "bad_frames", ErrorCode.INVALID_REQUEST,
                                f"expected 2 frames [version, message], got {len(frames) - 1}")
        else:
            try:
                msg = client_msg_decoder.decode(frames[2])
            except msgspec.DecodeError as exc:
                self._refuse_client(ident, "bad_frames", ErrorCode.INVALID_REQUEST,
                                    f"undecodable client message: {wire.short(exc)}",
                                    request_id=wire.guess_request_id(frames[2]))
            else:
                if isinstance(msg, Submit):
                    self.on_submit(ident, msg.request)
                elif isinstance(msg, Cancel):
                    self.on_cancel(ident, msg.id)
                elif isinstance(msg, Ping):
                    self._send_client(ident, encode(Pong(at=msg.at)))
                else:
                    self._send_client(ident, encode(self.status()))
        self.settle()

    def on_submit(self, ident: bytes, request: Request) -> None:
        client = self.clients.get(ident)
        deadline = admission.deadline_of(request, self.now, self.wall())
        queue = self.queues.get(request.model)
        refused = admission.refusal(
            request,
            duplicate=client is not None and request.id in client.jobs,
            registry=self.registry,
            queue_full=queue is not None and queue.full,
            deadline=deadline,
            now=self.now,
            retry_after=self.cfg.retry_after,
        )
        if refused is not None:
            self.counts[refused.counter] += 1
            self._send_client(ident, encode(refused.error))
            return
        if client is None:
            client = self.clients[ident] = ClientState(self.now)
        job = Job(ident, request, next(self._seq), self.now, deadline)
        client.jobs[request.id] = job
        self._queue(request.model).push(job)
        self.deadlines.add(job)
        self.counts["accepted"] += 1
        self._dirty.add(request.model)

    def on_cancel(self, ident: bytes, request_id: str) -> None:
        client = self.clients.get(ident)
        job = client.jobs.get(request_id) if client is not None else None
        if job is not None:  # unknown ids: already answered, nothing to do
            self._end(job, ErrorCode.CANCELLED, "cancelled by the client")

    def _refuse_client(
        self, ident: bytes, counter: str, code: ErrorCode, message: str, request_id: str = ""
    ) -> None:
        """Bad input from a client: count it and tell it; nothing else changes."""
        self.counts[counter] += 1
        self._send_client(ident, wire.error_body(request_id, code, message))

    # -- dispatch --------------------------------------------------------------------------

    def _queue(self, model: str) -> ModelQueue:
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = ModelQueue(self.cfg.queue_size)
        return queue

    def _pump(self, model: str) -> None:
        """Dispatch queued work of ``model`` while an eligible worker has a free slot.

        Head of line: if the front request's kind has no free worker, nothing behind it
        leaves either (one model name normally serves one set of kinds)."""
        queue = self.queues.get(model)
        while queue:
            job = queue.peek()
            if job is None:
                return
            workers = self.registry.candidates(model, job.request.kind)
            if not workers:
                return
            queue.pop()
            self._dispatch(job, self.balancer.pick(model, workers))

    def _dispatch(self, job: Job, worker: Worker) -> None:
        now = self.now
        self.inflight.add(job, self._new_key())
        job.state = JobState.IN_FLIGHT
        job.worker = worker
        job.worker_ident = worker.ident
        job.attempts += 1
        job.chunks = 0
        job.first_at = 0.0
        job.dispatched_at = now
        worker.active[job.end_route] = job
        worker.last_dispatch = now
        request = job.request
        if job.deadline is not None:  # the worker sees the same absolute deadline
            request = msgspec.structs.replace(
                request, deadline=self.wall() + (job.deadline - now), timeout=None
            )
        body = encode(Dispatch(
            key=job.key, request=request, queued_ms=round((now - job.accepted_at) * 1000, 3),
            attempt=job.attempts,
        ))
        rc = self.sink.to_worker(worker.ident, body)
        if rc == SENT:
            self.counts["dispatched"] += 1
            return
        # Not delivered: the request never left, so it goes back to the front untouched,
        # and a worker that cannot take a message is gone (or stuck) for good.
        self.counts["send_failures"] += 1
        self.inflight.remove(job)
        del worker.active[job.end_route]
        job.state = JobState.QUEUED
        job.attempts -= 1
        job.worker = None
        job.worker_ident = b""
        self._queue(job.model).push(job, front=True)
        self._lose_worker(worker, "unreachable" if rc == GONE else "not reading (pipe full)")

    # -- ending requests -------------------------------------------------------------------

    def _end(self, job: Job, code: ErrorCode, message: str, **fields: object) -> None:
        """Answer a pending job with an Error, wherever it is; in-flight work is cancelled."""
        if job.state is JobState.QUEUED:
            self.queues[job.model].discard(job)
        elif job.state is JobState.IN_FLIGHT:
            self._stop_in_flight(job, code)
        fields.setdefault("chunks_sent", job.chunks)
        if job.chunks:
            fields.setdefault("retryable", False)  # never re-run what already streamed
        worker = job.worker.name if job.worker is not None else ""
        body = wire.error_body(job.id, code, message, worker=worker, **fields)
        self._finish(job, body, "cancelled" if code is ErrorCode.CANCELLED else "failed")

    def _stop_in_flight(self, job: Job, reason: ErrorCode) -> None:
        self.inflight.remove(job)
        worker = job.worker
        if worker is not None and worker.active.pop(job.end_route, None) is not None:
            worker.cancelling[job.end_route] = self.now + self.worker_timeout
            self._send_worker(worker, encode(CancelWork(key=job.key, reason=reason)))

    def _finish(self, job: Job, body: bytes, outcome: str) -> None:
        """The one place a final answer is sent; the job is done afterwards."""
        if job.state is JobState.DONE:  # a bug if it ever happens: counted, never sent
            self.counts["internal_errors"] += 1
            log.error("second final answer suppressed", extra={"request": job.id})
            return
        job.state = JobState.DONE
        client = self.clients.get(job.client)
        if client is not None and client.jobs.get(job.id) is job:
            del client.jobs[job.id]
            if not client.jobs:  # idle clients are not tracked
                del self.clients[job.client]
        self.counts[outcome] += 1
        self._send_client(job.client, body)

    def _terminal(self, job: Job, body: bytes) -> tuple[bytes, str]:
        """Check a worker's terminal before forwarding it: the client must get a valid
        Final or Error for this request id, or it would wait forever."""
        try:
            msg = stream_decoder.decode(body)
        except msgspec.DecodeError as exc:
            problem = f"undecodable ({wire.short(exc)})"
        else:
            if isinstance(msg, (Final, Error)) and msg.id == job.id:
                if isinstance(msg, Final):
                    return body, "completed"
                return body, "cancelled" if msg.code is ErrorCode.CANCELLED else "failed"
            problem = f"a {type(msg).__name__} for id {msg.id!r}"
        self.counts["bad_terminals"] += 1
        worker = job.worker.name if job.worker is not None else ""
        log.warning("bad terminal from worker", extra={"worker": worker, "problem": problem})
        return wire.error_body(
            job.id, ErrorCode.INTERNAL, f"worker {worker} ended the request with {problem}",
            chunks_sent=job.chunks, worker=worker, retryable=False,
        ), "failed"

    # -- sends -----------------------------------------------------------------------------

    def _send_client(self, ident: bytes, body: bytes) -> None:
        rc = self.sink.to_client(ident, body)
        if rc:
            self._client_trouble(ident, rc)

    def client_unreachable(self, ident: bytes) -> None:
        """The loop found a client gone while flushing its buffer; handled at settle."""
        self._gone_clients.add(ident)

    def _client_trouble(self, ident: bytes, rc: int) -> None:
        self.counts["send_failures"] += 1
        (self._gone_clients if rc == GONE else self._full_clients).add(ident)

    def _send_worker(self, worker: Worker, body: bytes) -> None:
        rc = self.sink.to_worker(worker.ident, body)
        if rc:
            self.counts["send_failures"] += 1
            self._troubled_workers[worker.ident] = rc

    # -- follow-ups and timers -------------------------------------------------------------

    def settle(self) -> None:
        """Handle what sends reported (gone/full peers) and dispatch newly possible work."""
        while self._gone_clients or self._full_clients or self._troubled_workers or self._dirty:
            while self._gone_clients:
                self._drop_client(self._gone_clients.pop(), "disconnected")
            while self._full_clients:
                ident = self._full_clients.pop()
                if ident in self.clients:
                    self.counts["client_overflows"] += 1
                    self._cut_off(ident)
            while self._troubled_workers:
                ident, rc = self._troubled_workers.popitem()
                worker = self.registry.get(ident)
                if worker is not None:
                    why = "unreachable" if rc == GONE else "not reading (pipe full)"
                    self._lose_worker(worker, why)
            dirty, self._dirty = self._dirty, set()
            for model in dirty:
                self._pump(model)

    def _drop_client(self, ident: bytes, why: str) -> None:
        client = self.clients.get(ident)
        if client is None:
            return
        self.counts["clients_gone"] += 1
        log.info("client gone", extra={"client": ident.hex(), "why": why,
                                       "requests": len(client.jobs)})
        for job in list(client.jobs.values()):
            self._end(job, ErrorCode.CANCELLED, f"client {why}")

    def _cut_off(self, ident: bytes) -> None:
        client = self.clients[ident]
        log.warning("slow client cut off", extra={"client": ident.hex(),
                                                  "requests": len(client.jobs)})
        for job in list(client.jobs.values()):
            self._end(job, ErrorCode.OVERLOADED,
                      f"client too slow: more than {self.cfg.client_buffer} messages unread")

    def shutdown(self) -> None:
        """Broker stopping: every pending request gets broker_unavailable, workers a cancel."""
        self.touch()
        for client in list(self.clients.values()):
            for job in list(client.jobs.values()):
                self._end(job, ErrorCode.BROKER_UNAVAILABLE, "broker shutting down")
        self._gone_clients.clear()
        self._full_clients.clear()
        self._troubled_workers.clear()

    # -- status ----------------------------------------------------------------------------

    def status(self) -> StatusReply:
        extra = {
            "chunks": self.chunks,
            "queued": sum(len(q) for q in self.queues.values()),
            "in_flight": len(self.inflight),
            "clients": len(self.clients),
            "workers": len(self.registry),
        }
        return snapshot(self.registry, self.queues, len(self.inflight), self.counts, extra,
                        self.now, self.now - self.started)

