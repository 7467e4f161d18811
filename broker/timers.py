"""The core's timers: deadlines, liveness of workers and clients, pings, stalled queues.

A collaborator of ``BrokerCore`` over the shared ``BrokerState``; work is ended through
``JobFlow``. ``tick`` is called by the socket loop every few tens of milliseconds and does
nothing costly when nothing is due.
"""

from __future__ import annotations

import logging

from tokenhive.broker.flow import JobFlow
from tokenhive.broker.job import JobState
from tokenhive.broker.state import BrokerState
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import encode
from tokenhive.schemas.messages import BrokerPing, Health

log = logging.getLogger("tokenhive.broker")

_WILL_SERVE = (Health.OK, Health.LOADING)


class Timers:
    def __init__(self, state: BrokerState, flow: JobFlow) -> None:
        self.state = state
        self.flow = flow

    def tick(self) -> None:
        """Timers: deadlines, liveness of both sides, pings, orphaned queues."""
        state = self.state
        state.touch()
        now = state.now
        for job in state.deadlines.due(now):
            where = "queued" if job.state is JobState.QUEUED else "in flight"
            state.counts["deadline_exceeded"] += 1
            self.flow.end(job, ErrorCode.DEADLINE_EXCEEDED, f"deadline passed while {where}")
        self._check_nodes(now)
        self._check_workers(now)
        if self.flow.gateway.routed:
            self.flow.gateway.move_stalled()
        liveness = state.cfg.client_liveness
        for ident, client in list(state.clients.items()):
            if now - client.last_seen > liveness:
                self.flow.drop_client(ident, f"silent for more than {liveness}s")
        if now - state.last_housekeeping >= state.cfg.heartbeat_interval:
            state.last_housekeeping = now
            self._fail_orphans(now)
            for ident, sent in list(state.rereg_sent.items()):
                if now - sent > state.worker_timeout:
                    del state.rereg_sent[ident]
        self.flow.settle()

    def _check_nodes(self, now: float) -> None:
        """A node agent silent past the worker timeout: the machine (or its network) is
        gone, so all its workers are lost now, together, not each on its own timer."""
        state = self.state
        for node in state.nodes.silent(now, state.worker_timeout):
            node.lost = True
            state.counts["nodes_down"] += 1
            state.nodes_dirty = True
            workers = [w for w in state.registry if w.node == node.id]
            log.warning("node down", extra={"node": node.id, "workers": len(workers),
                                            "silent_s": round(now - node.last_report, 3)})
            for worker in workers:
                self.flow.lose_worker(worker, f"node {node.id} down (no report for "
                                              f"more than {state.worker_timeout:g}s)")

    def _check_workers(self, now: float) -> None:
        state = self.state
        ping = now - state.last_ping >= state.cfg.heartbeat_interval
        if ping:
            state.last_ping = now
            body = encode(BrokerPing(at=state.wall()))
        for worker in state.registry:
            if now - worker.last_seen > state.worker_timeout:
                self.flow.lose_worker(worker, f"silent for more than {state.worker_timeout:g}s")
                continue
            expired = [r for r, until in worker.cancelling.items() if until <= now]
            for route in expired:  # the worker never ended cancelled work: free the slot
                del worker.cancelling[route]
                state.dirty.add(worker.model)
            if ping:
                state.send_worker(worker, body)

    def _fail_orphans(self, now: float) -> None:
        """Queued work waits at most no_worker_timeout while its model has no worker that
        is, or may become, able to serve it (none registered, or all unhealthy/degraded).
        Workers that are loading count as able: loading a model may take minutes."""
        state = self.state
        limit = state.cfg.no_worker_timeout
        for model, queue in list(state.queues.items()):  # a fallback may add a queue
            workers = state.registry.of_model(model)
            if not queue or any(w.health in _WILL_SERVE for w in workers):
                state.stalled_since.pop(model, None)
                continue
            since = state.stalled_since.get(model)
            if since is None:
                since = state.registry.orphaned_since.get(model, now)
                state.stalled_since[model] = since
            if workers:
                code, counter = ErrorCode.BACKEND_UNAVAILABLE, "no_healthy_worker"
                why = f"no healthy worker for model {model!r} for {limit:g}s"
            else:
                code, counter = ErrorCode.WORKER_LOST, "worker_lost"
                why = f"no live worker for model {model!r} for {limit:g}s"
            for job in list(queue):
                if now - max(since, job.enqueued_at) >= limit:
                    if job.plan and self.flow.gateway.fall_back(job, why):
                        continue
                    state.counts[counter] += 1
                    self.flow.end(job, code, why, retryable=True)
