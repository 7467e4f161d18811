"""The broker's state machine: events in, sends out through a ``Sink``. No zmq here.

``BrokerCore`` owns one ``BrokerState`` (state.py) and three collaborators over it:
``JobFlow`` (flow.py: dispatch, requeue, the one final answer, losing peers, ``settle``),
``WorkerEvents`` (worker_events.py: the worker socket's messages, the chunk hot path) and
``Timers`` (timers.py: deadlines and liveness). The client side is here.

Entry points are the ``on_*`` methods (one per decoded event or raw frame list), ``tick``
(timers) and ``settle`` (follow-ups of the hot path). Every slow entry point settles before
it returns; the socket loop calls ``touch`` before and ``settle`` after each drained batch.

Guarantee: every accepted request gets exactly one final answer (Final or Error), sent in
``JobFlow.finish``. Work is re-run only if the worker died before it streamed anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec

from tokenhive.broker import admission, wire
from tokenhive.broker.balancer import Balancer
from tokenhive.broker.flow import JobFlow
from tokenhive.broker.inflight import InFlight
from tokenhive.broker.job import ClientState, Job
from tokenhive.broker.queue import ModelQueue
from tokenhive.broker.registry import WorkerRegistry
from tokenhive.broker.sink import Sink
from tokenhive.broker.state import BrokerState
from tokenhive.broker.status import snapshot
from tokenhive.broker.timers import Timers
from tokenhive.broker.worker_events import WorkerEvents
from tokenhive.schemas.config import BrokerConfig
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import client_msg_decoder, encode
from tokenhive.schemas.messages import (
    Cancel,
    DrainNode,
    Health,
    MarkModelFailed,
    Ping,
    Pong,
    Request,
    StatusReply,
    Submit,
)

log = logging.getLogger("tokenhive.broker")


class BrokerCore:
    def __init__(
        self,
        config: BrokerConfig,
        sink: Sink,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        balancer: Balancer | None = None,
    ) -> None:
        self.state = BrokerState(config, sink, clock=clock, wall=wall, balancer=balancer)
        self.flow = JobFlow(self.state)
        self.workers = WorkerEvents(self.state, self.flow)
        self.timers = Timers(self.state, self.flow)
        # The hot path, bound straight to its implementation: no delegating call per chunk.
        self.on_chunk = self.workers.on_chunk
        # Refused CURVE handshakes so far; the socket loop, which sees them, replaces this.
        self.auth_failures: Callable[[], int] = lambda: 0
        # Who may drain nodes and mark models failed, by CURVE key (broker/auth.py); the
        # socket loop sets it. None: a client on a socket without keys.
        self.may_operate: Callable[[str | None], bool] = lambda user: True

    # -- read-only views of the state (tests, the loop, status) ----------------------------

    @property
    def cfg(self) -> BrokerConfig:
        return self.state.cfg

    @property
    def now(self) -> float:
        return self.state.now

    @property
    def counts(self) -> dict[str, int]:
        return self.state.counts

    @property
    def chunks(self) -> int:
        return self.state.chunks

    @property
    def registry(self) -> WorkerRegistry:
        return self.state.registry

    @property
    def queues(self) -> dict[str, ModelQueue]:
        return self.state.queues

    @property
    def inflight(self) -> InFlight:
        return self.state.inflight

    @property
    def clients(self) -> dict[bytes, ClientState]:
        return self.state.clients

    # -- time, follow-ups, the worker side and timers ---------------------------------------

    def touch(self) -> None:
        """Read the clock once; the hot path uses ``state.now`` instead of calling it."""
        self.state.touch()

    def settle(self) -> None:
        """Handle what sends reported (gone/full peers) and dispatch newly possible work."""
        self.flow.settle()

    def on_worker_frames(self, frames: list[bytes], user: str | None = None) -> None:
        """One message from the worker socket: ``[ident, VERSION, route, body]``, or garbage."""
        self.workers.on_worker_frames(frames, user)

    def tick(self) -> None:
        """Timers: deadlines, liveness of both sides, pings, orphaned queues."""
        self.timers.tick()

    def client_unreachable(self, ident: bytes) -> None:
        """The loop found a client gone while flushing its buffer; handled at settle."""
        self.state.gone_clients.add(ident)

    # -- client side -----------------------------------------------------------------------

    def on_client_frames(self, frames: list[bytes], user: str | None = None) -> None:
        """One message from the client socket: ``[ident, VERSION, body]``, or garbage;
        ``user`` is the sender's CURVE public key when the socket authenticates clients."""
        state = self.state
        state.touch()
        ident = frames[0]
        client = state.clients.get(ident)
        if client is not None:
            client.last_seen = state.now  # any message refreshes liveness
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
            except msgspec.DecodeError as exc:  # not msgpack, or it breaks a type's rule
                message, request_id = wire.decode_problem(exc, frames[2])
                self._refuse_client(ident, "bad_frames", ErrorCode.INVALID_REQUEST, message,
                                    request_id=request_id)
            else:
                if isinstance(msg, Submit):
                    self.on_submit(ident, msg.request)
                elif isinstance(msg, Cancel):
                    self.on_cancel(ident, msg.id)
                elif isinstance(msg, Ping):
                    state.send_client(ident, encode(Pong(at=msg.at)))
                elif isinstance(msg, (MarkModelFailed, DrainNode)) and not self.may_operate(user):
                    self._refuse_client(ident, "operator_refused", ErrorCode.INVALID_REQUEST,
                                        "draining nodes and marking models failed needs the "
                                        "broker's own key or one in --curve-allow-admins")
                elif isinstance(msg, MarkModelFailed):
                    self.on_model_failed(msg.model, msg.reason)
                elif isinstance(msg, DrainNode):
                    self.on_drain_node(msg.node, msg.drain)
                else:
                    state.send_client(ident, encode(self.status()))
        self.flow.settle()

    def on_model_failed(self, model: str, reason: str) -> None:
        """Fail the model's queued requests now, and new ones on arrival, with the reason."""
        state = self.state
        if self._serving(model):
            return  # a worker of it is up after all: nothing has failed for good
        state.failed_models[model] = reason
        queue = state.queues.get(model)
        for job in list(queue) if queue is not None else []:
            state.counts["model_failed"] += 1
            self.flow.end(job, ErrorCode.MODEL_FAILED, reason)

    def on_drain_node(self, node_id: str, drain: bool) -> None:
        """An operator drains (or undrains) a node: no new work goes there. An unknown node
        changes nothing; the status the client asks for next tells it so."""
        state = self.state
        node = state.nodes.get(node_id)
        if node is None or node.draining == drain:
            return
        node.draining = drain
        state.nodes_dirty = True
        log.info("node drain", extra={"node": node_id, "draining": drain})

    def _serving(self, model: str) -> bool:
        """A worker of the model that is up (not loading: a crashed one stays registered
        until its heartbeats lapse, and one that is loading may crash like the others)."""
        return any(w.model == model and w.health in (Health.OK, Health.DEGRADED)
                   for w in self.state.registry)

    def on_submit(self, ident: bytes, request: Request) -> None:
        state = self.state
        plan: list[str] = []
        if request.profile is not None or request.model in self.flow.gateway.routed:
            admitted = self.flow.gateway.admit(request)  # profile, budget, group/fallbacks
            if isinstance(admitted, admission.Refusal):
                state.counts[admitted.counter] += 1
                self._refused_metric(request.model, admitted.error.code)
                state.send_client(ident, encode(admitted.error))
                return
            request, plan = admitted
        reason = state.failed_models.get(request.model)
        if reason is not None:
            if not self._serving(request.model):
                state.counts["model_failed"] += 1
                self._refused_metric(request.model, ErrorCode.MODEL_FAILED)
                state.send_client(ident, wire.error_body(request.id, ErrorCode.MODEL_FAILED,
                                                         reason))
                return
            del state.failed_models[request.model]  # a worker registered since
        client = state.clients.get(ident)
        deadline = admission.deadline_of(request, state.now, state.wall())
        queue = state.queues.get(request.model)
        refused = admission.refusal(
            request,
            duplicate=client is not None and request.id in client.jobs,
            registry=state.registry,
            queue_full=queue is not None and queue.full,
            deadline=deadline,
            now=state.now,
            retry_after=state.cfg.retry_after,
            limits=state.cfg.limits,
        )
        if refused is not None:
            state.counts[refused.counter] += 1
            self._refused_metric(request.model, refused.error.code)
            state.send_client(ident, encode(refused.error))
            return
        if client is None:
            client = state.clients[ident] = ClientState(state.now)
        job = Job(ident, request, next(state.seq), state.now, deadline)
        job.plan = plan
        client.jobs[request.id] = job
        state.queue(request.model).push(job)
        state.deadlines.add(job)
        state.counts["accepted"] += 1
        state.dirty.add(request.model)

    def _refused_metric(self, model: str, code: ErrorCode) -> None:
        """Count a refusal by model (a model the broker does not know: ``_unknown``)."""
        known = self.state.registry.known_model(model) or model in self.flow.gateway.routed
        self.state.metrics.refused(model, code, known)

    def on_cancel(self, ident: bytes, request_id: str) -> None:
        client = self.state.clients.get(ident)
        job = client.jobs.get(request_id) if client is not None else None
        if job is not None:  # unknown ids: already answered, nothing to do
            self.flow.end(job, ErrorCode.CANCELLED, "cancelled by the client")

    def _refuse_client(
        self, ident: bytes, counter: str, code: ErrorCode, message: str, request_id: str = ""
    ) -> None:
        """Bad input from a client: count it and tell it; nothing else changes."""
        self.state.counts[counter] += 1
        self.state.send_client(ident, wire.error_body(request_id, code, message))

    # -- shutdown and status ---------------------------------------------------------------

    def shutdown(self) -> None:
        """Broker stopping: every pending request gets broker_unavailable, workers a cancel."""
        state = self.state
        state.touch()
        for client in list(state.clients.values()):
            for job in list(client.jobs.values()):
                self.flow.end(job, ErrorCode.BROKER_UNAVAILABLE, "broker shutting down")
        state.gone_clients.clear()
        state.full_clients.clear()
        state.troubled_workers.clear()

    def status(self) -> StatusReply:
        state = self.state
        extra = {
            "chunks": state.chunks,
            "queued": sum(len(q) for q in state.queues.values()),
            "in_flight": len(state.inflight),
            "clients": len(state.clients),
            "workers": len(state.registry),
            "auth_failures": self.auth_failures(),
        }
        reply = snapshot(state.registry, state.queues, len(state.inflight), state.counts, extra,
                         state.now, state.now - state.started)
        reply.groups = {name: list(g.models) for name, g in state.cfg.groups.items()}
        reply.cooldowns = state.cooldowns.left(state.now)
        reply.spend_by_model = state.spend.by_model
        reply.spend_by_profile = state.spend.by_profile
        reply.nodes = state.nodes.status(state.registry, state.now)
        return reply
