"""The worker side of the core: registration, health, stream messages, terminals.

A collaborator of ``BrokerCore`` over the shared ``BrokerState``; work is ended, requeued
and dispatched through ``JobFlow``. ``on_chunk`` is the hot path: the socket loop calls it
(as ``BrokerCore.on_chunk``) for every chunk, with ``state.now`` already fresh.
"""

from __future__ import annotations

import logging

import msgspec

from tokenhive.broker import packs, wire
from tokenhive.broker.cost import cost_usd
from tokenhive.broker.flow import JobFlow
from tokenhive.broker.job import Job
from tokenhive.broker.nodes import report_problem
from tokenhive.broker.registry import Worker
from tokenhive.broker.state import BrokerState
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import (
    ROUTE_CHUNK,
    ROUTE_END,
    ROUTE_PACK,
    encode,
    worker_msg_decoder,
)
from tokenhive.schemas.messages import (
    Error,
    Final,
    Goodbye,
    Health,
    Heartbeat,
    NodeReport,
    Ready,
)

log = logging.getLogger("tokenhive.broker")

# Self-reported text a worker puts in status replies and logs: capped, so a peer cannot make
# every status reply megabytes long.
MAX_NAME_CHARS = 256  # worker id, model, device
MAX_DETAIL_CHARS = 1024  # health detail (a longer one from a heartbeat is cut)


class WorkerEvents:
    def __init__(self, state: BrokerState, flow: JobFlow) -> None:
        self.state = state
        self.flow = flow
        # With CURVE: worker id -> the public key (z85) that first registered it. Only that
        # key may register the id again; kept for the broker's life (a restarted worker
        # with the same key takes its place, another key never does). The same for node ids.
        self.owners: dict[str, str] = {}
        self.node_owners: dict[str, str] = {}

    def on_chunk(self, ident: bytes, route: bytes, body: bytes) -> None:
        """Forward a chunk body unchanged. Not decoded; only counted.

        Written for speed: ``state.sink.to_client(...)`` is a plain method call, measurably
        cheaper than calling a bound method cached on ``self``."""
        state = self.state
        job = state.inflight.by_chunk_route.get(route)
        if job is None or job.worker_ident != ident:
            self._stray(ident, route, "late_chunks")
            return
        now = state.now
        if job.chunks:
            state.metrics.gaps.observe(now - job.last_at)
        else:
            job.first_at = now
        job.last_at = now
        job.chunks += 1
        state.chunks += 1
        job.worker.last_seen = now  # type: ignore[union-attr]  # in flight => has worker
        rc = state.sink.to_client(job.client, body)
        if rc:
            state.client_trouble(job.client, rc)

    def on_worker_frames(self, frames: list[bytes], user: str | None = None) -> None:
        """One message from the worker socket: ``[ident, VERSION, route, body]``, or garbage;
        ``user`` is the sender's CURVE public key when the socket authenticates peers."""
        state = self.state
        state.touch()
        ident = frames[0]
        worker = state.registry.get(ident)
        if worker is not None:
            worker.last_seen = state.now  # any message proves it alive
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
                self._on_control(ident, body, user)
            elif tag == ROUTE_CHUNK and len(route) > 1:
                self.on_chunk(ident, route, body)
            elif tag == ROUTE_END and len(route) > 1:
                self.on_end(ident, route, body)
            elif tag == ROUTE_PACK and len(route) > 1:  # the loop's hot path takes real ones
                packs.on_pack(state, ident, route, body)
            else:
                self._reject(ident, "bad_frames", ErrorCode.INVALID_REQUEST,
                             f"unknown route frame {route[:16]!r}")
        self.flow.settle()

    def _on_control(self, ident: bytes, body: bytes, user: str | None = None) -> None:
        try:
            msg = worker_msg_decoder.decode(body)
        except msgspec.DecodeError as exc:
            self._reject(ident, "bad_frames", ErrorCode.INVALID_REQUEST,
                         f"undecodable worker message: {wire.short(exc)}")
            return
        if isinstance(msg, Ready):
            self.on_ready(ident, msg, user)
        elif isinstance(msg, Heartbeat):
            self.on_heartbeat(ident, msg)
        elif isinstance(msg, NodeReport):
            self.on_node_report(ident, msg, user)
        else:
            self.on_goodbye(ident, msg)

    def on_node_report(self, ident: bytes, report: NodeReport, user: str | None = None) -> None:
        """A node agent's report (not answered; a refused one gets Rejected)."""
        state = self.state
        counter, problem = "bad_frames", report_problem(report)
        if problem is None and user is not None:
            owner = self.node_owners.setdefault(report.node, user)
            if owner != user:  # another key may not speak for a registered node
                counter, problem = ("worker_claims_refused",
                                    f"node id {report.node!r} is registered to another key")
        if problem is None and state.nodes.on_report(report, state.now) is None:
            problem = "too many nodes"
        if problem is not None:
            self._reject(ident, counter, ErrorCode.INVALID_REQUEST, f"bad NodeReport: {problem}")
            return
        state.counts["node_reports"] += 1
        state.nodes_dirty = True

    def on_ready(self, ident: bytes, ready: Ready, user: str | None = None) -> None:
        cap = self.state.cfg.limits.max_worker_slots
        problem = (
            "worker name must not be empty" if not ready.worker
            else "model must not be empty" if not ready.model
            else f"slots must be >= 1, got {ready.slots}" if ready.slots < 1
            else f"slots {ready.slots} over limits.max_worker_slots {cap}" if ready.slots > cap
            else f"worker, model, device and node must be at most {MAX_NAME_CHARS} characters"
            if max(len(ready.worker), len(ready.model), len(ready.device),
                   len(ready.node)) > MAX_NAME_CHARS
            else f"detail must be at most {MAX_DETAIL_CHARS} characters"
            if len(ready.detail) > MAX_DETAIL_CHARS
            else None
        )
        if problem is not None:
            self._reject(ident, "bad_frames", ErrorCode.INVALID_REQUEST, f"bad Ready: {problem}")
            return
        if user is not None:
            # An id belongs to the first key that used it: another key may not evict a
            # worker, nor put itself in a node's group (a node's workers use its key, the
            # agent hands it to them). Both are checked before either is bound, so a refused
            # Ready binds nothing.
            for table, name, what in ((self.owners, ready.worker, "worker id"),
                                      (self.node_owners, ready.node, "node")):
                if name and table.get(name, user) != user:
                    log.warning("id claimed with another key", extra={
                        "worker": ready.worker, "node": ready.node, "key": user[:8]})
                    self._reject(ident, "worker_claims_refused", ErrorCode.INVALID_REQUEST,
                                 f"{what} {name!r} is registered to another key")
                    return
            self.owners.setdefault(ready.worker, user)
            if ready.node:
                self.node_owners.setdefault(ready.node, user)
        state, registry = self.state, self.state.registry
        previous = registry.get(ident)
        if previous is not None and not previous.active and not previous.cancelling:
            # an update (a worker announces itself while loading, then again when loaded)
            registry.remove(previous, state.now)
        elif previous is not None:  # the same socket announcing itself again: a fresh start
            self.flow.lose_worker(previous, "registered again", counter="workers_lost")
        namesake = registry.by_name(ready.worker)
        if namesake is not None:  # a restarted worker on a new socket replaces the old one
            self.flow.lose_worker(namesake, "replaced by a new registration",
                                  counter="workers_lost")
        worker = registry.add(ident, ready, state.now)
        state.rereg_sent.pop(ident, None)
        state.counts["workers_registered"] += 1
        log.info("worker registered", extra={
            "worker": worker.name, "model": worker.model, "backend": worker.backend,
            "slots": worker.slots, "health": worker.health.value, "device": worker.device,
        })
        state.dirty.add(worker.model)
        if worker.node:
            state.nodes_dirty = True  # its rank comes from its node (a draining one, say)

    def on_heartbeat(self, ident: bytes, hb: Heartbeat) -> None:
        worker = self.state.registry.get(ident)
        if worker is None:
            self.state.ask_reregister(ident)
            return
        if hb.health is not worker.health:
            log.info("worker health", extra={"worker": worker.name, "health": hb.health.value,
                                             "was": worker.health.value, "detail": hb.detail})
            if worker.node:
                self.state.nodes_dirty = True
        worker.health = hb.health
        worker.detail = hb.detail[:MAX_DETAIL_CHARS]
        worker.memory_mb = hb.memory_mb
        worker.reported_free = hb.free_slots
        worker.reported_in_flight = hb.in_flight
        worker.decode_tps = max(0.0, hb.decode_tps)
        worker.kv_used = min(1.0, max(0.0, hb.kv_used))
        worker.prefix_hits = max(0, hb.prefix_hits)
        if hb.health is Health.OK:
            self.state.dirty.add(worker.model)

    def on_goodbye(self, ident: bytes, bye: Goodbye) -> None:
        worker = self.state.registry.get(ident)
        if worker is not None:
            why = f"goodbye: {bye.reason}" if bye.reason else "goodbye"
            if bye.code is not None:
                why += f" ({bye.code.value})"
            self.flow.lose_worker(worker, why, counter="workers_left")

    def on_end(self, ident: bytes, route: bytes, body: bytes) -> None:
        """A worker's terminal (Final or Error): release the slot, answer the client."""
        state = self.state
        job = state.inflight.by_end_route.get(route)
        if job is None or job.worker_ident != ident:
            worker = state.registry.get(ident)
            if worker is not None and worker.cancelling.pop(route, None) is not None:
                state.dirty.add(worker.model)  # the cancelled work really stopped: slot free
            self._stray(ident, route, "late_terminals")
            return
        worker = job.worker
        assert worker is not None
        state.inflight.remove(job)
        del worker.active[route]
        if not job.first_at:
            job.first_at = state.now
        worker.record_latency((job.first_at - job.dispatched_at) * 1000.0)
        answer, outcome, msg = self.flow.terminal(job, body)
        state.dirty.add(worker.model)
        if outcome == "completed":
            worker.served += 1
            answer = self._settled(job, worker, msg, answer)  # type: ignore[arg-type]
        else:
            worker.failed += 1
            if isinstance(msg, Error):
                if self.flow.gateway.after_error(job, msg):
                    return  # moved to its next model: the answer will come from there
                if job.tried:
                    msg.tried = list(job.tried)
                    answer = encode(msg)
        code = None if outcome == "completed" else (
            msg.code if isinstance(msg, Error) else ErrorCode.INTERNAL)
        self.flow.finish(job, answer, outcome, code)

    def _settled(self, job: Job, worker: Worker, final: Final, body: bytes) -> bytes:
        """Price a Final, add it to the spend tables, and say which models served and were
        tried; re-encoded only when something changed (the Final of an unpriced model that
        needed no fallback goes out as the worker sent it)."""
        state = self.state
        usage = final.usage
        price = state.prices.price_of(worker.model, worker.backend, worker.upstream)
        cost = cost_usd(price, usage)
        state.spend.record(worker.model, job.request.profile, usage, cost, state.now)
        if not cost and not job.tried and final.model:
            return body
        usage.cost_usd = cost
        final.model = final.model or worker.model
        final.tried = list(job.tried)
        return encode(final)

    def _stray(self, ident: bytes, route: bytes, counter: str) -> None:
        """A stream message for a request that is not (or no longer) in flight there."""
        self.state.counts[counter] += 1
        if self.state.registry.get(ident) is None:
            self.state.ask_reregister(ident)

    def _reject(self, ident: bytes, counter: str, code: ErrorCode, message: str) -> None:
        self.state.counts[counter] += 1
        self.state.send_worker_ident(ident, wire.rejected_body(code, message))
