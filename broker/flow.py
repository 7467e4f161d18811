"""How jobs move: dispatch, requeue, the one final answer, and losing a peer.

``JobFlow`` works on the shared ``BrokerState`` and keeps nothing of its own. The client
side (``core``), the worker side (``worker_events``) and the timers (``timers``) all end,
requeue and dispatch work through it, and each of their entry points ends with ``settle``,
which handles what sends reported (gone or full peers) and dispatches newly possible work.

Guarantee: every accepted request gets exactly one final answer (Final or Error), sent in
``finish``. Work is re-run only if the worker died before it streamed anything.
"""

from __future__ import annotations

import logging

import msgspec

from tokenhive.broker import wire
from tokenhive.broker.gateway import Gateway
from tokenhive.broker.job import Job, JobState
from tokenhive.broker.registry import Worker
from tokenhive.broker.sink import GONE, SENT
from tokenhive.broker.state import BrokerState
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import encode, stream_decoder
from tokenhive.schemas.messages import CancelWork, Dispatch, Error, Final, StreamMsg

log = logging.getLogger("tokenhive.broker")


class JobFlow:
    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.gateway = Gateway(state)  # groups, fallbacks, cooldowns, profiles

    # -- dispatch --------------------------------------------------------------------------

    def pump(self, model: str) -> None:
        """Dispatch queued work of ``model`` while an eligible worker has a free slot.

        Head of line: if the front request's kind has no free worker, nothing behind it
        leaves either (one model name normally serves one set of kinds)."""
        state = self.state
        queue = state.queues.get(model)
        while queue:
            job = queue.peek()
            if job is None:
                return
            workers = state.registry.candidates(model, job.request.kind)
            if not workers:
                return
            queue.pop()
            self.dispatch(job, state.balancer.pick(model, workers))

    def dispatch(self, job: Job, worker: Worker) -> None:
        state = self.state
        now = state.now
        state.inflight.add(job, state.new_key())
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
                request, deadline=state.wall() + (job.deadline - now), timeout=None
            )
        body = encode(Dispatch(
            key=job.key, request=request, queued_ms=round((now - job.accepted_at) * 1000, 3),
            attempt=job.attempts, client=job.client,
        ))
        rc = state.sink.to_worker(worker.ident, body)
        if rc == SENT:
            state.counts["dispatched"] += 1
            state.metrics.dispatched(job, now)
            return
        # Not delivered: the request never left, so it goes back to the front untouched,
        # and a worker that cannot take a message is gone (or stuck) for good.
        state.counts["send_failures"] += 1
        state.inflight.remove(job)
        del worker.active[job.end_route]
        job.state = JobState.QUEUED
        job.attempts -= 1
        job.worker = None
        job.worker_ident = b""
        state.queue(job.model).push(job, front=True)
        self.lose_worker(worker, "unreachable" if rc == GONE else "not reading (pipe full)")

    # -- ending requests -------------------------------------------------------------------

    def end(self, job: Job, code: ErrorCode, message: str, **fields: object) -> None:
        """Answer a pending job with an Error, wherever it is; in-flight work is cancelled."""
        if job.state is JobState.QUEUED:
            self.state.queues[job.model].discard(job)
        elif job.state is JobState.IN_FLIGHT:
            self._stop_in_flight(job, code)
        fields.setdefault("chunks_sent", job.chunks)
        if job.chunks:
            fields.setdefault("retryable", False)  # never re-run what already streamed
        if job.tried:
            fields.setdefault("tried", list(job.tried))
        worker = job.worker.name if job.worker is not None else ""
        body = wire.error_body(job.id, code, message, worker=worker, **fields)
        self.finish(job, body, "cancelled" if code is ErrorCode.CANCELLED else "failed", code)

    def _stop_in_flight(self, job: Job, reason: ErrorCode) -> None:
        state = self.state
        state.inflight.remove(job)
        worker = job.worker
        if worker is not None and worker.active.pop(job.end_route, None) is not None:
            worker.cancelling[job.end_route] = state.now + state.worker_timeout
            state.send_worker(worker, encode(CancelWork(key=job.key, reason=reason)))

    def finish(self, job: Job, body: bytes, outcome: str, code: ErrorCode | None = None
               ) -> None:
        """The one place a final answer is sent; the job is done afterwards. ``code``: the
        Error's code (None for a Final), for the requests metric."""
        state = self.state
        if job.state is JobState.DONE:  # a bug if it ever happens: counted, never sent
            state.counts["internal_errors"] += 1
            log.error("second final answer suppressed", extra={"request": job.id})
            return
        job.state = JobState.DONE
        client = state.clients.get(job.client)
        if client is not None and client.jobs.get(job.id) is job:
            del client.jobs[job.id]
            if not client.jobs:  # idle clients are not tracked
                del state.clients[job.client]
        state.counts[outcome] += 1
        state.metrics.finished(job, code, state.now)
        state.send_client(job.client, body)

    def terminal(self, job: Job, body: bytes) -> tuple[bytes, str, StreamMsg | None]:
        """Check a worker's terminal before forwarding it: the client must get a valid
        Final or Error for this request id, or it would wait forever. Returns the body to
        send, the outcome and the decoded terminal (None when it was not valid)."""
        try:
            msg = stream_decoder.decode(body)
        except msgspec.DecodeError as exc:
            problem = f"undecodable ({wire.short(exc)})"
        else:
            if isinstance(msg, (Final, Error)) and msg.id == job.id:
                if isinstance(msg, Final):
                    return body, "completed", msg
                outcome = "cancelled" if msg.code is ErrorCode.CANCELLED else "failed"
                return body, outcome, msg
            problem = f"a {type(msg).__name__} for id {msg.id!r}"
        self.state.counts["bad_terminals"] += 1
        worker = job.worker.name if job.worker is not None else ""
        log.warning("bad terminal from worker", extra={"worker": worker, "problem": problem})
        return wire.error_body(
            job.id, ErrorCode.INTERNAL, f"worker {worker} ended the request with {problem}",
            chunks_sent=job.chunks, worker=worker, retryable=False,
        ), "failed", None

    # -- losing peers ----------------------------------------------------------------------

    def lose_worker(self, worker: Worker, why: str, counter: str = "workers_lost") -> None:
        """Unregister; its work is requeued if nothing streamed yet, else answered."""
        state = self.state
        if state.registry.get(worker.ident) is not worker:
            return  # already gone
        state.registry.remove(worker, state.now)
        state.counts[counter] += 1
        if worker.node:
            state.nodes_dirty = True
        jobs = sorted(worker.active.values(), key=lambda j: j.seq, reverse=True)
        worker.active.clear()
        worker.cancelling.clear()
        # a worker leaving idle (drained, stopped) is routine; losing work is not
        log.log(logging.WARNING if jobs else logging.INFO, "worker removed", extra={
            "worker": worker.name, "model": worker.model, "why": why, "in_flight": len(jobs)})
        if jobs:
            self.gateway.worker_died(worker.model)
        for job in jobs:  # newest first, each to the front: the oldest ends up leading
            state.inflight.remove(job)
            if job.chunks == 0 and job.attempts < state.cfg.max_attempts:
                job.state = JobState.QUEUED
                job.worker = None
                job.worker_ident = b""
                job.enqueued_at = state.now
                state.queue(job.model).push(job, front=True)
                state.counts["requeued"] += 1
                continue
            if job.chunks == 0 and self.gateway.fall_back(job, f"worker lost ({why})"):
                continue
            state.counts["worker_lost"] += 1
            if job.chunks:
                message = f"worker {worker.name} lost after {job.chunks} chunks ({why})"
            else:
                message = (f"worker {worker.name} lost ({why}); "
                           f"gave up after {job.attempts} attempts")
            # active was cleared above, so end() sends no CancelWork to the dead worker
            self.end(job, ErrorCode.WORKER_LOST, message, retryable=job.chunks == 0)
        state.dirty.add(worker.model)

    def drop_client(self, ident: bytes, why: str) -> None:
        """A client gone (or silent): its pending requests are cancelled."""
        client = self.state.clients.get(ident)
        if client is None:
            return
        self.state.counts["clients_gone"] += 1
        log.info("client gone", extra={"client": ident.hex(), "why": why,
                                       "requests": len(client.jobs)})
        for job in list(client.jobs.values()):
            self.end(job, ErrorCode.CANCELLED, f"client {why}")

    def _cut_off(self, ident: bytes) -> None:
        client = self.state.clients[ident]
        log.warning("slow client cut off", extra={"client": ident.hex(),
                                                  "requests": len(client.jobs)})
        limit = self.state.cfg.client_buffer
        for job in list(client.jobs.values()):
            self.end(job, ErrorCode.OVERLOADED,
                     f"client too slow: more than {limit} messages unread")

    # -- follow-ups ------------------------------------------------------------------------

    def settle(self) -> None:
        """Handle what sends reported (gone/full peers) and dispatch newly possible work."""
        state = self.state
        while (state.gone_clients or state.full_clients or state.troubled_workers or state.dirty
               or state.nodes_dirty):
            while state.gone_clients:
                self.drop_client(state.gone_clients.pop(), "disconnected")
            while state.full_clients:
                ident = state.full_clients.pop()
                if ident in state.clients:
                    state.counts["client_overflows"] += 1
                    self._cut_off(ident)
            while state.troubled_workers:
                ident, rc = state.troubled_workers.popitem()
                worker = state.registry.get(ident)
                if worker is not None:
                    why = "unreachable" if rc == GONE else "not reading (pipe full)"
                    self.lose_worker(worker, why)
            if state.nodes_dirty:  # before dispatching: a node may have gone down or drained
                state.nodes_dirty = False
                state.dirty |= state.nodes.refresh(state.registry, state.now, state.worker_timeout)
            dirty, state.dirty = state.dirty, set()
            for model in dirty:
                self.pump(model)
