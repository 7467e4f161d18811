"""The broker's plain-code core, without sockets: queue, deadlines, balancers, state machine.

The core is driven with the same frame lists the socket loop hands it and sends through a
recording sink. Time is a plain number the test advances (the core takes its clock as a
parameter), so deadlines and liveness are exact instead of slept for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenhive.broker.balancer import Fastest, LeastLoaded, RoundRobin, make_balancer
from tokenhive.broker.core import BrokerCore
from tokenhive.broker.deadlines import DeadlineHeap
from tokenhive.broker.inflight import KeyMaker
from tokenhive.broker.job import Job, JobState
from tokenhive.broker.queue import ModelQueue
from tokenhive.broker.registry import Worker
from tokenhive.broker.sink import FULL, GONE, SENT
from tokenhive.schemas.config import BrokerConfig
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import (
    ROUTE_CHUNK,
    ROUTE_END,
    VERSION_FRAME,
    broker_to_client_decoder,
    broker_to_worker_decoder,
    encode,
)
from tokenhive.schemas.messages import (
    BrokerPing,
    Cancel,
    CancelWork,
    Chunk,
    Dispatch,
    Error,
    Final,
    Goodbye,
    Health,
    Heartbeat,
    Kind,
    MarkModelFailed,
    Ping,
    Pong,
    Ready,
    Rejected,
    Request,
    Reregister,
    StatusQuery,
    StatusReply,
    Submit,
)

C1, C2 = b"client-1", b"client-2"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class RecordingSink:
    """Records what the core sends; ``gone`` / ``full`` peers answer like the real loop."""

    def __init__(self) -> None:
        self.clients: list[tuple[bytes, bytes]] = []
        self.attempts: list[tuple[bytes, bytes]] = []  # including sends to gone clients
        self.workers: list[tuple[bytes, bytes]] = []
        self.gone: set[bytes] = set()
        self.full: set[bytes] = set()
        self.on_worker_send: Callable[[bytes, bytes], None] | None = None

    def to_client(self, ident: bytes, body: bytes) -> int:
        self.attempts.append((ident, body))
        if ident in self.gone:
            return GONE
        self.clients.append((ident, body))
        if ident in self.full:
            self.full.discard(ident)  # FULL is reported once; later sends are buffered
            return FULL
        return SENT

    def to_worker(self, ident: bytes, body: bytes) -> int:
        if self.on_worker_send is not None:
            self.on_worker_send(ident, body)
        if ident in self.gone:
            return GONE
        self.workers.append((ident, body))
        return FULL if ident in self.full else SENT

    def client_msgs(self, ident: bytes) -> list[Any]:
        return [broker_to_client_decoder.decode(b) for i, b in self.clients if i == ident]

    def worker_msgs(self, ident: bytes, kind: type | None = None) -> list[Any]:
        msgs = [broker_to_worker_decoder.decode(b) for i, b in self.workers if i == ident]
        return [m for m in msgs if kind is None or isinstance(m, kind)]


class Harness:
    def __init__(self, **config: Any) -> None:
        config.setdefault("heartbeat_interval", 1.0)
        config.setdefault("heartbeat_liveness", 3)
        self.clock = Clock()
        self.sink = RecordingSink()
        self.core = BrokerCore(BrokerConfig(**config), self.sink, clock=self.clock,
                               wall=lambda: self.clock.t + 1e9)
        self.sink.on_worker_send = self._check_dispatch

    def _check_dispatch(self, ident: bytes, body: bytes) -> None:
        """Every Dispatch goes to a registered, healthy worker with a slot for it."""
        if isinstance(broker_to_worker_decoder.decode(body), Dispatch):
            w = self.core.registry.get(ident)
            assert w is not None and w.health is Health.OK
            assert len(w.active) + len(w.cancelling) <= w.slots

    def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        self.core.tick()

    # worker side
    def worker_frames(self, ident: bytes, route: bytes, body: bytes) -> None:
        self.core.on_worker_frames([ident, VERSION_FRAME, route, body])

    def ready(self, ident: bytes, name: str | None = None, model: str = "m", slots: int = 1,
              **fields: Any) -> None:
        ready = Ready(worker=name or ident.decode(), model=model, backend="test", slots=slots,
                      **fields)
        self.worker_frames(ident, b"", encode(ready))

    def heartbeat(self, ident: bytes, health: Health = Health.OK) -> None:
        self.worker_frames(ident, b"", encode(Heartbeat(worker=ident.decode(), free_slots=0,
                                                        in_flight=0, health=health)))

    def chunk(self, ident: bytes, key: bytes, rid: str, seq: int) -> None:
        body = encode(Chunk(id=rid, seq=seq, text=f"{rid}:{seq}"))
        self.core.touch()
        self.core.on_chunk(ident, ROUTE_CHUNK + key, body)  # the loop's hot path
        self.core.settle()

    def final(self, ident: bytes, key: bytes, rid: str, chunks: int = 0) -> None:
        self.worker_frames(ident, ROUTE_END + key, encode(Final(id=rid, chunks=chunks)))

    def dispatches(self, ident: bytes) -> list[Dispatch]:
        return self.sink.worker_msgs(ident, Dispatch)

    # client side
    def client(self, ident: bytes, msg: msgspec.Struct) -> None:
        self.core.on_client_frames([ident, VERSION_FRAME, encode(msg)])

    def submit(self, rid: str, ident: bytes = C1, model: str = "m", **fields: Any) -> None:
        fields.setdefault("kind", Kind.COMPLETION)
        self.client(ident, Submit(request=Request(id=rid, model=model, **fields)))

    def answers(self, ident: bytes = C1) -> dict[str, list[Any]]:
        """Stream messages per request id, in order of arrival."""
        out: dict[str, list[Any]] = {}
        for msg in self.sink.client_msgs(ident):
            if isinstance(msg, (Chunk, Final, Error)):
                out.setdefault(msg.id, []).append(msg)
        return out

    def last(self, rid: str, ident: bytes = C1) -> Any:
        return self.answers(ident)[rid][-1]

    def status(self) -> StatusReply:
        return self.core.status()


def job(seq: int, priority: int = 1, deadline: float | None = None) -> Job:
    return Job(C1, Request(id=f"r{seq}", model="m", priority=priority), seq, 0.0, deadline)


def worker(name: str, slots: int = 2, seq: int = 1) -> Worker:
    return Worker(name.encode(), Ready(worker=name, model="m", backend="t", slots=slots), 0.0, seq)


# -- data structures ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_queue_priority_then_fifo_front_requeue_and_lazy_discard() -> None:
    q = ModelQueue(limit=10)
    jobs = [job(1, 0), job(2, 1), job(3, 2), job(4, 1), job(5, 2)]
    for j in jobs:
        q.push(j)
    assert [j.seq for j in q] == [3, 5, 2, 4, 1] and len(q) == 5
    assert q.discard(jobs[4]) and not q.discard(jobs[4])
    assert [j.seq for j in q] == [3, 2, 4, 1] and len(q) == 4
    first = q.pop()
    assert first is not None and first.seq == 3
    q.push(first, front=True)  # requeued: ahead of its own priority lane
    q.push(job(6, 2))
    assert [j.seq for j in q] == [3, 6, 2, 4, 1]
    assert [q.pop().seq for _ in range(5)] == [3, 6, 2, 4, 1]  # type: ignore[union-attr]
    assert q.pop() is None and len(q) == 0


@pytest.mark.timeout(30)
def test_queue_full_bounds_new_work_but_not_requeues() -> None:
    q = ModelQueue(limit=2)
    q.push(job(1))
    q.push(job(2))
    assert q.full
    q.push(job(3), front=True)
    assert len(q) == 3


@pytest.mark.timeout(30)
def test_queue_stays_small_under_discards_and_many_priorities() -> None:
    q = ModelQueue(limit=100_000)
    for i in range(5000):
        j = job(i, priority=i)
        q.push(j)
        q.discard(j)
    assert len(q) == 0 and q.peek() is None
    assert sum(len(lane) for lane in q._lanes.values()) == 0  # compacted / dropped lanes


@pytest.mark.timeout(30)
def test_deadline_heap_skips_answered_jobs() -> None:
    heap = DeadlineHeap()
    a, b, c = job(1, deadline=5.0), job(2, deadline=3.0), job(3, deadline=9.0)
    for j in (a, b, c, job(4)):
        heap.add(j)
    assert len(heap) == 3 and heap.next_deadline() == 3.0
    b.state = JobState.DONE
    assert heap.due(6.0) == [a]
    assert heap.due(100.0) == [c]


@pytest.mark.timeout(30)
def test_keys_are_unique_and_compact() -> None:
    make = KeyMaker()
    keys = {make() for _ in range(10_000)}
    assert len(keys) == 10_000 and {len(k) for k in keys} == {8}
    assert KeyMaker()() != KeyMaker()()  # random start per broker run


@pytest.mark.timeout(30)
def test_balancers() -> None:
    a, b, c = worker("a", slots=4, seq=1), worker("b", slots=4, seq=2), worker("c", slots=4, seq=3)
    a.active = {b"x": job(1), b"y": job(2)}
    b.active = {b"x": job(3)}
    assert LeastLoaded().pick("m", [a, b, c]) is c
    c.active = {b"x": job(4)}
    b.last_dispatch, c.last_dispatch = 5.0, 2.0
    assert LeastLoaded().pick("m", [a, b, c]) is c  # tie on free slots: least recently used

    rr = RoundRobin()
    assert [rr.pick("m", [a, b, c]).name for _ in range(4)] == ["a", "b", "c", "a"]
    assert rr.pick("m", [a, c]).name == "c"  # b full: skipped

    fastest = Fastest()
    a.latency_ms, b.latency_ms, c.latency_ms = 50.0, 20.0, 30.0
    assert fastest.pick("m", [a, b, c]) is b
    c.latency_ms = 0.0  # never measured: tried first
    assert fastest.pick("m", [a, b, c]) is c
    with pytest.raises(ValueError, match="round_robin"):
        make_balancer("random")


# -- the state machine -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_submit_dispatch_stream_final_forwards_bodies_unchanged() -> None:
    h = Harness()
    h.ready(b"w1")
    h.submit("r1", prompt="hi")
    (d,) = h.dispatches(b"w1")
    assert d.request.id == "r1" and d.attempt == 1 and len(d.key) == 8
    garbage = b"\x00not msgpack at all"  # chunk bodies are forwarded, never decoded
    h.core.touch()
    h.core.on_chunk(b"w1", ROUTE_CHUNK + d.key, garbage)
    assert h.sink.clients.pop() == (C1, garbage)
    h.sink.attempts.pop()
    h.chunk(b"w1", d.key, "r1", 1)
    h.final(b"w1", d.key, "r1", chunks=2)
    final = h.last("r1")
    assert isinstance(final, Final) and final.chunks == 2
    s = h.status()
    assert s.counters["completed"] == 1 and s.counters["chunks"] == 2
    assert s.workers[0].served == 1 and s.workers[0].free_slots == 1 and s.in_flight == 0
    assert h.core.clients == {}  # idle clients are not tracked


@pytest.mark.timeout(30)
def test_no_dispatch_before_ready_nor_to_unhealthy_or_loading() -> None:
    h = Harness()
    h.heartbeat(b"w1")  # unknown worker
    assert h.sink.worker_msgs(b"w1") == [Reregister()]
    h.heartbeat(b"w1")
    assert len(h.sink.worker_msgs(b"w1")) == 1  # rate limited: once per interval
    h.ready(b"w1", health=Health.LOADING)
    h.submit("r1")
    assert h.dispatches(b"w1") == [] and h.status().queues == {"m": 1}
    h.heartbeat(b"w1", Health.UNHEALTHY)
    h.heartbeat(b"w1", Health.DEGRADED)
    assert h.dispatches(b"w1") == []
    h.heartbeat(b"w1", Health.OK)
    assert [d.request.id for d in h.dispatches(b"w1")] == ["r1"]


@pytest.mark.timeout(30)
def test_refusals_are_typed_and_change_nothing() -> None:
    h = Harness(queue_size=1)
    h.submit("r0")
    assert h.last("r0").code is ErrorCode.UNKNOWN_MODEL
    h.ready(b"w1", kinds=[Kind.CHAT])
    h.submit("")
    assert h.last("").code is ErrorCode.INVALID_REQUEST
    h.submit("e", kind=Kind.EMBEDDING)
    assert h.last("e").code is ErrorCode.INVALID_REQUEST and "embedding" in h.last("e").message
    h.submit("t", kind=Kind.CHAT, timeout=0)
    assert h.last("t").code is ErrorCode.INVALID_REQUEST
    h.submit("p", kind=Kind.CHAT, deadline=h.clock.t + 1e9 - 1)  # wall deadline in the past
    assert h.last("p").code is ErrorCode.DEADLINE_EXCEEDED
    h.submit("a", kind=Kind.CHAT)  # dispatched
    h.submit("a", kind=Kind.CHAT)  # duplicate while pending
    assert h.last("a").code is ErrorCode.INVALID_REQUEST
    h.submit("b", kind=Kind.CHAT)  # queued (queue_size 1)
    h.submit("c", kind=Kind.CHAT)
    err = h.last("c")
    assert err.code is ErrorCode.OVERLOADED and err.retryable and err.retry_after == 1.0
    c = h.status().counters
    assert (c["accepted"], c["unknown_model"], c["rejected_invalid"], c["rejected_deadline"],
            c["overloaded"]) == (2, 1, 4, 1, 1)
    assert h.status().queues == {"m": 1} and h.status().in_flight == 1


@pytest.mark.timeout(30)
def test_client_bad_input_is_answered_and_counted() -> None:
    h = Harness()
    h.core.on_client_frames([C1])
    h.core.on_client_frames([C1, b"TH\x07", b"x"])
    h.core.on_client_frames([C1, b"XX", b"x"])
    h.core.on_client_frames([C1, VERSION_FRAME, b"\xc1"])
    h.core.on_client_frames([C1, VERSION_FRAME, encode({"type": "submit", "request": {"id": 5}})])
    h.core.on_client_frames([C1, VERSION_FRAME, b"x", b"y"])
    codes = [m.code for m in h.sink.client_msgs(C1)]
    assert codes == [ErrorCode.INVALID_REQUEST, ErrorCode.PROTOCOL_VERSION,
                     ErrorCode.PROTOCOL_VERSION, ErrorCode.INVALID_REQUEST,
                     ErrorCode.INVALID_REQUEST, ErrorCode.INVALID_REQUEST]
    c = h.status().counters
    assert c["bad_frames"] == 5 and c["wrong_version"] == 1 and c["accepted"] == 0
    h.client(C1, Ping(at=3.5))
    h.client(C1, StatusQuery())
    pong, status = h.sink.client_msgs(C1)[-2:]
    assert pong == Pong(at=3.5) and isinstance(status, StatusReply)


@pytest.mark.timeout(30)
def test_worker_bad_input_is_rejected_and_counted() -> None:
    h = Harness()
    h.core.on_worker_frames([b"w"])
    h.core.on_worker_frames([b"w", b"TH\x02", b"", b""])
    h.core.on_worker_frames([b"w", VERSION_FRAME, b"", b"\xc1"])
    h.core.on_worker_frames([b"w", VERSION_FRAME, b"zz", b""])
    h.core.on_worker_frames([b"w", VERSION_FRAME, b""])
    h.ready(b"w", slots=0)
    rejected = h.sink.worker_msgs(b"w", Rejected)
    assert [r.code for r in rejected] == [
        ErrorCode.INVALID_REQUEST, ErrorCode.PROTOCOL_VERSION, ErrorCode.INVALID_REQUEST,
        ErrorCode.INVALID_REQUEST, ErrorCode.INVALID_REQUEST, ErrorCode.INVALID_REQUEST]
    c = h.status().counters
    assert c["bad_frames"] == 5 and c["wrong_version"] == 1 and c["workers"] == 0


@pytest.mark.timeout(30)
def test_deadline_in_queue_and_in_flight() -> None:
    h = Harness()
    h.ready(b"w1")
    h.submit("a", timeout=5)
    h.submit("b", timeout=2)
    h.advance(2.5)
    assert h.last("b").code is ErrorCode.DEADLINE_EXCEEDED and "queued" in h.last("b").message
    (d,) = h.dispatches(b"w1")
    h.chunk(b"w1", d.key, "a", 0)
    h.advance(3.0)
    err = h.last("a")
    assert err.code is ErrorCode.DEADLINE_EXCEEDED and err.chunks_sent == 1 and not err.retryable
    (cancel,) = h.sink.worker_msgs(b"w1", CancelWork)
    assert cancel == CancelWork(key=d.key, reason=ErrorCode.DEADLINE_EXCEEDED)
    # the slot stays taken until the worker ends the cancelled work
    h.submit("c")
    assert len(h.dispatches(b"w1")) == 1
    h.chunk(b"w1", d.key, "a", 1)  # late: dropped
    h.final(b"w1", d.key, "a", chunks=2)  # late: dropped, frees the slot
    assert len(h.answers()["a"]) == 2  # one chunk, one error: nothing after the answer
    assert [x.request.id for x in h.dispatches(b"w1")] == ["a", "c"]
    c = h.status().counters
    assert c["late_chunks"] == 1 and c["late_terminals"] == 1 and c["deadline_exceeded"] == 2


@pytest.mark.timeout(30)
def test_cancelled_slot_is_freed_after_grace_if_worker_never_ends_it() -> None:
    h = Harness()
    h.ready(b"w1")
    h.submit("a")
    h.client(C1, Cancel(id="a"))
    assert h.last("a").code is ErrorCode.CANCELLED
    h.submit("b")
    assert len(h.dispatches(b"w1")) == 1
    for _ in range(4):  # heartbeats keep it alive; the grace is heartbeat_interval*liveness
        h.heartbeat(b"w1")
        h.advance(1.0)
    assert [x.request.id for x in h.dispatches(b"w1")] == ["a", "b"]


@pytest.mark.timeout(30)
def test_worker_lost_requeues_unstarted_work_and_fails_started_work() -> None:
    h = Harness(max_attempts=2)
    h.ready(b"w1", slots=2)
    h.submit("fresh")
    h.submit("started")
    d_fresh, d_started = h.dispatches(b"w1")
    h.chunk(b"w1", d_started.key, "started", 0)
    h.ready(b"w2")
    for _ in range(4):  # w1 silent past heartbeat_interval * heartbeat_liveness, w2 not
        h.heartbeat(b"w2")
        h.advance(1.0)
    err = h.last("started")
    assert err.code is ErrorCode.WORKER_LOST and err.chunks_sent == 1 and not err.retryable
    (again,) = h.dispatches(b"w2")
    assert again.request.id == "fresh" and again.attempt == 2 and again.key != d_fresh.key
    h.chunk(b"w1", d_fresh.key, "fresh", 0)  # the old worker wakes up: not routed
    assert "fresh" not in h.answers()
    assert Reregister() in h.sink.worker_msgs(b"w1")
    h.advance(3.5)  # w2 dies too: attempts exhausted
    err = h.last("fresh")
    assert err.code is ErrorCode.WORKER_LOST and err.retryable
    c = h.status().counters
    assert c["requeued"] == 1 and c["worker_lost"] == 2 and c["workers_lost"] == 2


@pytest.mark.timeout(30)
def test_requeued_work_goes_to_the_front_in_original_order() -> None:
    h = Harness()
    h.ready(b"w1", slots=2)
    h.submit("a")
    h.submit("b")
    h.submit("c")
    h.worker_frames(b"w1", b"", encode(Goodbye(worker="w1", reason="drain")))
    h.ready(b"w2")
    assert [d.request.id for d in h.dispatches(b"w2")] == ["a"]
    (d,) = h.dispatches(b"w2")
    h.final(b"w2", d.key, "a")
    assert [d.request.id for d in h.dispatches(b"w2")] == ["a", "b"]
    assert h.status().counters["workers_left"] == 1


@pytest.mark.timeout(30)
def test_undeliverable_dispatch_requeues_and_drops_the_worker() -> None:
    h = Harness()
    h.ready(b"w1")
    h.ready(b"w2")
    h.sink.gone.add(b"w1")
    h.sink.gone.add(b"w2")
    h.submit("a")
    assert h.status().workers == [] and h.status().queues == {"m": 1}
    h.ready(b"w3")
    assert [d.request.id for d in h.dispatches(b"w3")] == ["a"]
    assert h.dispatches(b"w3")[0].attempt == 1  # never delivered, so not an attempt


@pytest.mark.timeout(30)
def test_same_name_on_a_new_socket_replaces_the_old_registration() -> None:
    h = Harness()
    h.ready(b"sock-1", name="w")
    h.submit("a")
    h.ready(b"sock-2", name="w")  # restarted worker
    assert [w.id for w in h.status().workers] == ["w"]
    assert [d.request.id for d in h.dispatches(b"sock-2")] == ["a"]


@pytest.mark.timeout(30)
def test_client_disconnect_and_overflow_cancel_their_work() -> None:
    h = Harness()
    h.ready(b"w1", slots=3)
    h.submit("a", ident=C1)
    h.submit("b", ident=C2)
    h.submit("c", ident=C2)
    da, db, dc = h.dispatches(b"w1")
    h.sink.gone.add(C1)
    h.chunk(b"w1", da.key, "a", 0)  # the send finds C1 gone
    h.sink.full.add(C2)
    h.chunk(b"w1", db.key, "b", 0)  # C2's buffer overflows
    cancels = {m.key: m.reason for m in h.sink.worker_msgs(b"w1", CancelWork)}
    assert cancels == {da.key: ErrorCode.CANCELLED, db.key: ErrorCode.OVERLOADED,
                       dc.key: ErrorCode.OVERLOADED}
    answers = h.answers(C2)
    assert answers["b"][-1].code is ErrorCode.OVERLOADED and answers["b"][-1].chunks_sent == 1
    assert answers["c"][-1].code is ErrorCode.OVERLOADED and answers["c"][-1].retryable
    c = h.status().counters
    assert c["clients_gone"] == 1 and c["client_overflows"] == 1 and c["cancelled"] == 1


@pytest.mark.timeout(30)
def test_silent_client_is_dropped_but_pinging_client_is_not() -> None:
    h = Harness(client_liveness=5.0)
    h.ready(b"w1", slots=2)
    h.submit("a", ident=C1)
    h.submit("b", ident=C2)
    for _ in range(3):
        h.heartbeat(b"w1")
        h.client(C2, Ping())
        h.advance(2.0)
    (cancel,) = h.sink.worker_msgs(b"w1", CancelWork)
    assert cancel.key == h.dispatches(b"w1")[0].key
    assert h.last("a", C1).code is ErrorCode.CANCELLED
    assert "b" not in h.answers(C2)


@pytest.mark.timeout(30)
def test_model_without_workers_fails_queued_work_after_no_worker_timeout() -> None:
    h = Harness(no_worker_timeout=10.0, client_liveness=100.0)
    h.ready(b"w1")
    h.worker_frames(b"w1", b"", encode(Goodbye(worker="w1")))
    h.submit("a")
    assert h.status().queues == {"m": 1}
    h.advance(6.0)
    h.submit("b")
    h.advance(5.0)
    assert h.last("a").code is ErrorCode.WORKER_LOST and h.last("a").retryable
    assert "b" not in h.answers()  # it has waited only 5 s
    h.advance(6.0)
    assert h.last("b").code is ErrorCode.WORKER_LOST


@pytest.mark.timeout(30)
def test_queue_of_a_model_whose_workers_stay_unhealthy_fails_but_loading_waits() -> None:
    h = Harness(no_worker_timeout=5.0, client_liveness=100.0, heartbeat_liveness=100)
    h.ready(b"w1", health=Health.LOADING)
    h.submit("a")
    h.advance(6.0)  # loading may take long: still waiting
    assert "a" not in h.answers()
    h.heartbeat(b"w1", Health.UNHEALTHY)
    for _ in range(3):
        h.advance(1.0)
    assert "a" not in h.answers()
    for _ in range(3):  # stalled since the first check after it turned unhealthy
        h.advance(1.0)
    err = h.last("a")
    assert err.code is ErrorCode.BACKEND_UNAVAILABLE and err.retryable
    assert h.status().counters["no_healthy_worker"] == 1


@pytest.mark.timeout(30)
def test_bad_terminal_becomes_an_internal_error_for_the_right_id() -> None:
    h = Harness()
    h.ready(b"w1", slots=2)
    h.submit("a")
    h.submit("b")
    da, db = h.dispatches(b"w1")
    h.worker_frames(b"w1", ROUTE_END + da.key, b"\xc1")
    h.worker_frames(b"w1", ROUTE_END + db.key, encode(Final(id="someone-else", chunks=0)))
    for rid in ("a", "b"):
        err = h.last(rid)
        assert isinstance(err, Error) and err.code is ErrorCode.INTERNAL and err.id == rid
    assert h.status().counters["bad_terminals"] == 2


@pytest.mark.timeout(30)
def test_pings_go_to_every_worker_each_interval() -> None:
    h = Harness()
    h.ready(b"w1")
    h.ready(b"w2")
    for _ in range(3):
        h.heartbeat(b"w1")
        h.heartbeat(b"w2")
        h.advance(1.0)
    assert len(h.sink.worker_msgs(b"w1", BrokerPing)) == 3
    assert len(h.sink.worker_msgs(b"w2", BrokerPing)) == 3


@pytest.mark.timeout(30)
def test_shutdown_answers_everything_pending() -> None:
    h = Harness()
    h.ready(b"w1")
    h.submit("a")
    h.submit("b")
    h.core.shutdown()
    for rid in ("a", "b"):
        assert h.last(rid).code is ErrorCode.BROKER_UNAVAILABLE
    assert len(h.sink.worker_msgs(b"w1", CancelWork)) == 1


# -- property: exactly one final answer, whatever happens ---------------------------------

_submit = st.tuples(st.just("submit"), st.integers(0, 11), st.integers(0, 2),
                    st.sampled_from([None, 0.5, 3.0]))
_chunk = st.tuples(st.just("chunk"), st.integers(0, 20))
ops = st.lists(
    st.one_of(
        _submit, _submit, _submit,  # the common events are drawn more often
        _chunk, _chunk, _chunk,
        st.tuples(st.just("cancel"), st.integers(0, 11)),
        st.tuples(st.just("end"), st.integers(0, 20), st.booleans()),
        st.tuples(st.just("ready"), st.integers(0, 2), st.integers(1, 3)),
        st.tuples(st.just("health"), st.integers(0, 2), st.sampled_from(list(Health))),
        st.tuples(st.just("bye"), st.integers(0, 2)),
        st.tuples(st.just("hang"), st.integers(0, 2)),
        st.tuples(st.just("time"), st.sampled_from([0.2, 1.0, 4.0])),
        st.tuples(st.just("gone"), st.integers(0, 1)),
        st.tuples(st.just("stale"), st.integers(0, 50)),
    ),
    min_size=5,
    max_size=80,
)


@pytest.mark.timeout(120)
@settings(max_examples=400, deadline=None)
@given(ops)
def test_every_accepted_request_gets_exactly_one_final_answer(script: list[tuple]) -> None:
    h = Harness(queue_size=4, max_attempts=2, client_liveness=3.0, no_worker_timeout=5.0)
    clients = [C1, C2]
    idents = [b"w0", b"w1", b"w2"]
    h.ready(b"w0", slots=2)  # start with workers, so that work flows early
    h.ready(b"w1", slots=1)
    hung: set[bytes] = set()  # workers that stopped heartbeating (die when time passes)
    for op in script:
        kind = op[0]
        if kind == "submit":
            _, n, prio, timeout = op
            h.submit(f"r{n}", ident=clients[n % 2], priority=prio, timeout=timeout)
        elif kind == "cancel":
            h.client(clients[op[1] % 2], Cancel(id=f"r{op[1]}"))
        elif kind in ("chunk", "end"):
            live = list(h.core.inflight.by_end_route.values())
            if live:
                j = live[op[1] % len(live)]
                assert j.worker is not None
                if kind == "chunk":
                    h.chunk(j.worker.ident, j.key, j.id, j.chunks)
                elif op[2]:
                    h.final(j.worker.ident, j.key, j.id, j.chunks)
                else:
                    body = encode(Error.make(j.id, ErrorCode.BACKEND_ERROR, "boom"))
                    h.worker_frames(j.worker.ident, ROUTE_END + j.key, body)
        elif kind == "ready":
            h.ready(idents[op[1]], slots=op[2])
            hung.discard(idents[op[1]])
        elif kind == "hang":
            hung.add(idents[op[1]])
        elif kind == "health":
            h.heartbeat(idents[op[1]], op[2])
        elif kind == "bye":
            h.worker_frames(idents[op[1]], b"", encode(Goodbye(worker="x")))
        elif kind == "time":
            for c in clients:
                if c not in h.sink.gone:
                    h.client(c, Ping())
            for w in h.core.registry:
                if w.ident not in hung:
                    h.heartbeat(w.ident, w.health)
            h.advance(op[1])
        elif kind == "gone":
            h.sink.gone.add(clients[op[1]])
        elif kind == "stale":  # a worker streaming for work that was already answered
            stale = [(i, d) for i in idents for d in h.dispatches(i)
                     if ROUTE_END + d.key not in h.core.inflight.by_end_route]
            if stale:
                ident, d = stale[op[1] % len(stale)]
                before = len(h.sink.attempts)
                h.chunk(ident, d.key, d.request.id, 99)
                h.final(ident, d.key, d.request.id, 100)
                assert len(h.sink.attempts) == before  # nothing reaches any client
        check_invariants(h)
    # Drain: let every deadline, liveness and orphan timer fire.
    h.sink.gone.clear()
    for _ in range(12):
        h.advance(1.0)
    check_invariants(h)
    assert h.core.counts["accepted"] == sum(
        h.core.counts[k] for k in ("completed", "failed", "cancelled"))


def check_invariants(h: Harness) -> None:
    counts = h.core.counts
    assert counts["internal_errors"] == 0  # e.g. a second final answer for one request
    pending = sum(len(c.jobs) for c in h.core.clients.values())
    assert counts["accepted"] == counts["completed"] + counts["failed"] + counts["cancelled"] \
        + pending
    queued = sum(len(q) for q in h.core.queues.values())
    assert pending == queued + len(h.core.inflight)
    for w in h.core.registry:
        assert len(w.active) + len(w.cancelling) <= w.slots
    # Every answer (final or refusal) was sent exactly once, reachable client or not.
    terminals = sum(1 for _, body in h.sink.attempts
                    if isinstance(broker_to_client_decoder.decode(body), (Final, Error)))
    refusals = sum(counts[k] for k in ("rejected_invalid", "rejected_deadline",
                                       "unknown_model", "overloaded"))
    assert terminals == counts["completed"] + counts["failed"] + counts["cancelled"] + refusals
    # Within one request, chunks arrive in order and are never replayed: work that streamed
    # is never silently re-run (the script numbers chunks per dispatch from 0).
    for ident in (C1, C2):
        next_seq: dict[str, int] = {}
        for i, body in h.sink.attempts:
            msg = broker_to_client_decoder.decode(body)
            if i != ident or not isinstance(msg, (Chunk, Final, Error)):
                continue
            if isinstance(msg, Chunk):
                assert msg.seq == next_seq.get(msg.id, 0), f"{msg.id} chunk replayed/out of order"
                next_seq[msg.id] = msg.seq + 1
            elif not (isinstance(msg, Error) and msg.code is ErrorCode.INVALID_REQUEST):
                # (invalid_request here is the refusal of a duplicate id: the original
                # request is still streaming)
                next_seq.pop(msg.id, None)


@pytest.mark.timeout(30)
def test_core_parts_share_one_state() -> None:
    """The collaborators keep nothing of their own: one BrokerState, seen by all."""
    h = Harness()
    core = h.core
    assert core.flow.state is core.workers.state is core.timers.state is core.state
    assert core.workers.flow is core.timers.flow is core.flow
    assert core.on_chunk == core.workers.on_chunk  # the hot path, without a hop
    h.ready(b"w1")
    h.submit("r")
    assert core.registry is core.state.registry and len(core.state.inflight) == 1
    assert core.status().in_flight == 1 and core.counts is core.state.counts


@pytest.mark.timeout(10)
def test_a_model_marked_failed_fails_queued_and_new_requests_at_once_until_a_worker_is_up() -> None:
    h = Harness(no_worker_timeout=30.0)
    h.ready(b"w1", health=Health.LOADING)  # a gguf worker announces itself while loading...
    h.submit("queued")
    assert "queued" not in h.answers()  # ...so the request waits for it
    reason = "every worker of model 'm' failed: worker crashed: SIGILL (illegal instruction)"
    h.client(C2, MarkModelFailed(model="m", reason=reason))  # the supervisor gave up on it
    err = h.last("queued")
    assert isinstance(err, Error) and err.code == ErrorCode.MODEL_FAILED and err.message == reason
    h.submit("new")  # no 30 s wait (no_worker_timeout): refused on arrival, with the reason
    err = h.last("new")
    assert isinstance(err, Error) and err.code == ErrorCode.MODEL_FAILED and "SIGILL" in err.message
    assert h.status().counters["model_failed"] == 2
    h.ready(b"w2", slots=1)  # a worker of the model is up again (a rebuild, a restart)
    h.submit("after")
    assert [d.request.id for d in h.dispatches(b"w2")] == ["after"]


@pytest.mark.timeout(10)
def test_marking_a_model_that_is_serving_changes_nothing() -> None:
    h = Harness()
    h.ready(b"w1", slots=1)
    h.client(C2, MarkModelFailed(model="m", reason="stale report"))
    h.submit("r1")
    assert [d.request.id for d in h.dispatches(b"w1")] == ["r1"]
