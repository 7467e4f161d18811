"""Status counters and the StatusReply snapshot."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tokenhive.broker.queue import ModelQueue
from tokenhive.broker.registry import Worker
from tokenhive.schemas.messages import StatusReply, WorkerStatus

#: Every counter the broker keeps, all present (zero) from the start.
#: Accepted requests end in exactly one of completed / failed / cancelled, so
#: accepted == completed + failed + cancelled + queued + in_flight at all times.
COUNTERS = (
    "accepted",          # admitted into a queue
    "completed",         # Final forwarded
    "failed",            # Error answered (by a worker or by the broker) after acceptance
    "cancelled",         # ended by Cancel, client silence or client disconnect
    "rejected_invalid",  # refused: invalid_request (empty/duplicate id, bad timeout, kind)
    "rejected_deadline", # refused: deadline already passed on arrival
    "unknown_model",     # refused: no worker ever served the model
    "overloaded",        # refused: queue full
    "deadline_exceeded", # accepted, then its deadline passed (queued or in flight)
    "worker_lost",       # accepted, then failed because workers died
    "no_healthy_worker", # accepted, then failed: the model's workers stayed unhealthy
    "model_failed",      # failed at once: the supervisor reported the model's workers failed
    "budget_exceeded",   # refused: the request's profile spent a token or USD budget
    "fallbacks",         # a request moved to the next model of its group/fallbacks
    "cooldowns",         # a model's failures put it in cooldown
    "requeued",          # put back at the front after a worker died before streaming
    "dispatched",        # Dispatch messages sent
    "bad_frames",        # garbage on either socket: frame count, undecodable, not a version frame
    "wrong_version",     # a well-formed version frame of another protocol version
    "bad_terminals",     # a worker terminal that did not decode to this request's Final/Error
    "late_chunks",       # chunks for requests already answered (cancelled, expired, cut off)
    "packs",             # Pack messages forwarded (several requests' chunks in one message)
    "late_terminals",    # terminals for requests already answered
    "reregister_sent",   # Reregister replies to unknown workers
    "workers_registered",
    "workers_lost",      # declared dead: silent, unreachable, or replaced
    "workers_left",      # said Goodbye
    "clients_gone",      # silent past client_liveness or disconnected, with requests pending
    "client_overflows",  # clients cut off because they did not read their streams
    "send_failures",     # broker sends that found the peer gone or full
    "worker_claims_refused",  # a Ready for a worker id registered to another CURVE key
    "operator_refused",  # a drain or mark-failed from a client key that is not an admin
    "node_reports",      # NodeReports received from node agents
    "nodes_down",        # nodes declared down because their agent's reports stopped
    "internal_errors",   # exceptions caught by the loop (bugs); the broker keeps serving
)


def snapshot(
    workers: Iterable[Worker],
    queues: Mapping[str, ModelQueue],
    in_flight: int,
    counts: Mapping[str, int],
    extra: Mapping[str, int],
    now: float,
    uptime_s: float,
) -> StatusReply:
    return StatusReply(
        workers=[
            WorkerStatus(
                id=w.name, model=w.model, backend=w.backend, health=w.health.value,
                slots=w.slots, free_slots=w.free_slots, in_flight=len(w.active),
                device=w.device, detail=w.detail, served=w.served, failed=w.failed,
                latency_ms=round(w.latency_ms, 3), last_seen_s=round(now - w.last_seen, 3),
                node=w.node, decode_tps=round(w.decode_tps, 2), kv_used=round(w.kv_used, 4),
                prefix_hits=w.prefix_hits,
            )
            for w in workers
        ],
        queues={model: len(queue) for model, queue in queues.items()},
        in_flight=in_flight,
        counters={**counts, **extra},
        uptime_s=round(uptime_s, 3),
    )
