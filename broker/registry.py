"""Registered workers, per model: slots, in-flight work, health, liveness, latency.

A worker exists here only after its Ready; nothing is ever dispatched to an identity that
is not registered. Slots are counted by the broker (dispatches it made), not by the
worker's heartbeat, because the broker's own count is always the more recent one.
"""

from __future__ import annotations

from collections.abc import Iterator

from tokenhive.broker.job import Job
from tokenhive.schemas.messages import Health, Kind, Ready

LATENCY_ALPHA = 0.2  # weight of the newest sample in the latency EWMA

# Worker.node_rank, set from its node's health by broker/nodes.py: lower is preferred, and
# RANK_UNUSABLE (node down or draining) takes no new work.
RANK_OK, RANK_DEGRADED, RANK_UNUSABLE = 0, 1, 2


class Worker:
    __slots__ = (
        "active", "backend", "cancelling", "decode_tps", "detail", "device", "failed",
        "health", "ident", "kinds", "kv_used", "last_dispatch", "last_seen", "latency_ms",
        "memory_mb", "model", "name", "node", "node_rank", "pid", "prefix_hits", "registered_seq",
        "reported_free", "reported_in_flight", "served", "slots", "upstream",
    )

    def __init__(self, ident: bytes, ready: Ready, now: float, seq: int) -> None:
        self.ident = ident  # ROUTER identity
        self.name = ready.worker
        self.model = ready.model
        self.backend = ready.backend
        self.upstream = ready.upstream_model  # remote backends: for the price table
        self.slots = ready.slots
        self.kinds = frozenset(ready.kinds)
        self.device = ready.device
        self.node = ready.node  # "" when it runs under no node agent
        self.node_rank = RANK_OK  # its node's verdict (nodes.py); RANK_OK without a node
        self.pid = ready.pid
        self.memory_mb = ready.memory_mb
        self.health = ready.health
        self.detail = ready.detail
        self.registered_seq = seq
        self.last_seen = now
        self.last_dispatch = 0.0
        self.reported_free = ready.slots
        self.reported_in_flight = 0
        self.active: dict[bytes, Job] = {}  # end route -> job
        # end route -> expiry: work the broker cancelled but the worker has not yet ended.
        # The slot stays taken until the worker's terminal arrives (or the expiry passes),
        # so a cancel never makes the broker overfill a worker that is still busy.
        self.cancelling: dict[bytes, float] = {}
        self.served = 0
        self.failed = 0
        self.latency_ms = 0.0  # EWMA of dispatch -> first message; 0 until sampled
        # from heartbeats: what only the worker sees (0 where its backend does not know)
        self.decode_tps = 0.0
        self.kv_used = 0.0
        self.prefix_hits = 0

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.active) - len(self.cancelling)

    def can_take(self, kind: Kind) -> bool:
        return self.health is Health.OK and self.free_slots > 0 and kind in self.kinds

    def record_latency(self, ms: float) -> None:
        if self.latency_ms == 0.0:
            self.latency_ms = ms
        else:
            self.latency_ms += LATENCY_ALPHA * (ms - self.latency_ms)

    def __repr__(self) -> str:
        return f"Worker({self.name!r}, {self.model!r}, {self.health.value}, free={self.free_slots})"


class WorkerRegistry:
    def __init__(self) -> None:
        self._by_ident: dict[bytes, Worker] = {}
        self._by_name: dict[str, Worker] = {}
        self._by_model: dict[str, list[Worker]] = {}
        self.models_seen: set[str] = set()
        # model -> monotonic time its last worker left; absent while it has workers
        self.orphaned_since: dict[str, float] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._by_ident)

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._by_ident.values()))

    def get(self, ident: bytes) -> Worker | None:
        return self._by_ident.get(ident)

    def by_name(self, name: str) -> Worker | None:
        return self._by_name.get(name)

    def of_model(self, model: str) -> list[Worker]:
        return self._by_model.get(model, [])

    def known_model(self, model: str) -> bool:
        return model in self.models_seen

    def add(self, ident: bytes, ready: Ready, now: float) -> Worker:
        """Register; the caller has already removed any previous holder of ident or name."""
        self._seq += 1
        worker = Worker(ident, ready, now, self._seq)
        self._by_ident[ident] = worker
        self._by_name[worker.name] = worker
        self._by_model.setdefault(worker.model, []).append(worker)
        self.models_seen.add(worker.model)
        self.orphaned_since.pop(worker.model, None)
        return worker

    def remove(self, worker: Worker, now: float) -> None:
        self._by_ident.pop(worker.ident, None)
        if self._by_name.get(worker.name) is worker:
            del self._by_name[worker.name]
        peers = self._by_model.get(worker.model, [])
        if worker in peers:
            peers.remove(worker)
        if not peers:
            self._by_model.pop(worker.model, None)
            self.orphaned_since[worker.model] = now

    def candidates(self, model: str, kind: Kind) -> list[Worker]:
        """Workers that may take a request of ``kind`` right now: none on a node that is down
        or draining, and only those on the healthiest nodes available."""
        ready = [w for w in self._by_model.get(model, ())
                 if w.can_take(kind) and w.node_rank < RANK_UNUSABLE]
        if len(ready) > 1:
            best = min(w.node_rank for w in ready)
            if best < RANK_DEGRADED and any(w.node_rank > best for w in ready):
                ready = [w for w in ready if w.node_rank == best]
        return ready

    def serves_kind(self, model: str, kind: Kind) -> bool:
        return any(kind in w.kinds for w in self._by_model.get(model, ()))
