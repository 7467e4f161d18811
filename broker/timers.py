"""The core's timers: deadlines, liveness of workers and clients, pings, stalled queues.

A mixin of ``BrokerCore`` (split out only to keep files small); ``tick`` is called by the
socket loop every few tens of milliseconds and does nothing costly when nothing is due.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenhive.broker.job import ClientState, Job, JobState
from tokenhive.schemas.config import BrokerConfig
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import encode
from tokenhive.schemas.messages import BrokerPing, Health

if TYPE_CHECKING:
    from tokenhive.broker.deadlines import DeadlineHeap
    from tokenhive.broker.queue import ModelQueue
    from tokenhive.broker.registry import Worker, WorkerRegistry

_WILL_SERVE = (Health.OK, Health.LOADING)


class Timers:
    if TYPE_CHECKING:
        cfg: BrokerConfig
        wall: Callable[[], float]
        now: float
        counts: dict[str, int]
        registry: WorkerRegistry
        queues: dict[str, ModelQueue]
        deadlines: DeadlineHeap
        clients: dict[bytes, ClientState]
        worker_timeout: float
        _dirty: set[str]
        _rereg_sent: dict[bytes, float]
        _stalled_since: dict[str, float]
        _last_ping: float
        _last_housekeeping: float

        def touch(self) -> None: ...
        def settle(self) -> None: ...
        def _end(self, job: Job, code: ErrorCode, message: str, **fields: object) -> None: ...
        def _drop_client(self, ident: bytes, why: str) -> None: ...
        def _send_worker(self, worker: Worker, body: bytes) -> None: ...
        def _lose_worker(self, worker: Worker, why: str, counter: str = ...) -> None: ...

    def tick(self) -> None:
        """Timers: deadlines, liveness of both sides, pings, orphaned queues."""
        self.touch()
        now = self.now
        for job in self.deadlines.due(now):
            where = "queued" if job.state is JobState.QUEUED else "in flight"
            self.counts["deadline_exceeded"] += 1
            self._end(job, ErrorCode.DEADLINE_EXCEEDED, f"deadline passed while {where}")
        self._check_workers(now)
        for ident, client in list(self.clients.items()):
            if now - client.last_seen > self.cfg.client_liveness:
                self._drop_client(ident, f"silent for more than {self.cfg.client_liveness}s")
        if now - self._last_housekeeping >= self.cfg.heartbeat_interval:
            self._last_housekeeping = now
            self._fail_orphans(now)
            for ident, sent in list(self._rereg_sent.items()):
                if now - sent > self.worker_timeout:
                    del self._rereg_sent[ident]
        self.settle()

    def _check_workers(self, now: float) -> None:
        ping = now - self._last_ping >= self.cfg.heartbeat_interval
        if ping:
            self._last_ping = now
            body = encode(BrokerPing(at=self.wall()))
        for worker in self.registry:
            if now - worker.last_seen > self.worker_timeout:
                self._lose_worker(worker, f"silent for more than {self.worker_timeout:g}s")
                continue
            expired = [r for r, until in worker.cancelling.items() if until <= now]
            for route in expired:  # the worker never ended cancelled work: free the slot
                del worker.cancelling[route]
                self._dirty.add(worker.model)
            if ping:
                self._send_worker(worker, body)

    def _fail_orphans(self, now: float) -> None:
        """Queued work waits at most no_worker_timeout while its model has no worker that
        is, or may become, able to serve it (none registered, or all unhealthy/degraded).
        Workers that are loading count as able: loading a model may take minutes."""
        limit = self.cfg.no_worker_timeout
        for model, queue in self.queues.items():
            workers = self.registry.of_model(model)
            if not queue or any(w.health in _WILL_SERVE for w in workers):
                self._stalled_since.pop(model, None)
                continue
            since = self._stalled_since.get(model)
            if since is None:
                since = self._stalled_since[model] = self.registry.orphaned_since.get(model, now)
            if workers:
                code, counter = ErrorCode.BACKEND_UNAVAILABLE, "no_healthy_worker"
                why = f"no healthy worker for model {model!r} for {limit:g}s"
            else:
                code, counter = ErrorCode.WORKER_LOST, "worker_lost"
                why = f"no live worker for model {model!r} for {limit:g}s"
            for job in list(queue):
                if now - max(since, job.enqueued_at) >= limit:
                    self.counts[counter] += 1
                    self._end(job, code, why, retryable=True)
