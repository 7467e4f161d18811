"""The broker as a real OS process on real sockets, driven by raw zmq peers.

Clients connect over tcp (port 0 -> a free port the broker reports), workers over ipc.
The peers (tests/support/broker_peers.py) speak the real protocol with the real codecs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker_peers import FakeClient, FakeWorker, wait_for
from tests.support.procs import Proc, start_broker
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import VERSION_FRAME
from tokenhive.schemas.messages import (
    CancelWork,
    Chunk,
    Dispatch,
    Error,
    Final,
    Health,
    Pong,
    Priority,
    Reregister,
)

# Liveness generous enough for a loaded 2-core machine; the tests that need death detect it
# through the socket (a closed peer is unreachable) or set their own values.
FAST: dict[str, Any] = dict(heartbeat_interval=0.2, heartbeat_liveness=5, client_liveness=30)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Proc]:
    with start_broker(tmp_path, **FAST) as proc:
        yield proc


@pytest.fixture
def client(broker: Proc) -> Iterator[FakeClient]:
    with FakeClient(broker.clients) as c:
        yield c


def wait_workers(client: FakeClient, n: int, timeout: float = 5.0) -> None:
    wait_for(lambda: len(client.status().workers) == n, timeout, f"{n} registered workers")


def counters(client: FakeClient) -> dict[str, int]:
    return client.status().counters


@pytest.mark.timeout(30)
def test_ready_file_log_ping_status_and_clean_exit(broker: Proc, client: FakeClient) -> None:
    assert broker.clients.startswith("tcp://127.0.0.1:") and not broker.clients.endswith(":0")
    assert broker.workers.startswith("ipc://")
    ready = [r for r in broker.log_records() if r["msg"] == "broker ready"]
    assert ready and ready[0]["clients"] == broker.clients
    assert ready[0]["workers"] == broker.workers

    client.ping()
    pong = client.recv()
    assert isinstance(pong, Pong) and pong.at > 0

    status = client.status()
    assert status.workers == [] and status.in_flight == 0
    for name in ("accepted", "completed", "failed", "cancelled", "requeued", "overloaded",
                 "bad_frames", "wrong_version", "late_terminals"):
        assert status.counters[name] == 0

    assert broker.terminate() == 0
    assert any(r["msg"] == "broker stopped" for r in broker.log_records())


@pytest.mark.timeout(30)
def test_unknown_model_no_dispatch_before_ready_then_served(
    broker: Proc, client: FakeClient
) -> None:
    client.submit("r1", model="m")
    err = client.terminal("r1")
    assert isinstance(err, Error) and err.code is ErrorCode.UNKNOWN_MODEL

    with FakeWorker(broker.workers, name="w1", model="m") as worker:
        worker.send_heartbeat()  # before any Ready: the broker does not know it
        worker.expect(Reregister)
        assert client.status().workers == []

        worker.health = Health.LOADING  # Ready and heartbeats say "loading"
        worker.ready()  # registered, but not ready for work
        wait_workers(client, 1)
        client.submit("r2", model="m")
        wait_for(lambda: client.status().queues.get("m") == 1, what="r2 queued")
        worker.assert_nothing(Dispatch, within=0.5)

        worker.send_heartbeat(Health.OK)
        dispatch = worker.expect(Dispatch)
        assert dispatch.request.id == "r2" and dispatch.attempt == 1
        worker.stream(dispatch.key, "r2", 3)
        chunks, final = client.result("r2")
        assert [c.text for c in chunks] == ["t0", "t1", "t2"]
        assert isinstance(final, Final) and final.chunks == 3
    c = counters(client)
    assert c["unknown_model"] == 1 and c["reregister_sent"] >= 1 and c["completed"] == 1


@pytest.mark.timeout(60)
def test_many_concurrent_streams_arrive_complete_and_in_order(broker: Proc) -> None:
    n_chunks = 25
    workers = [FakeWorker(broker.workers, name=f"w{i}", model="m", slots=4,
                          auto_chunks=n_chunks) for i in range(3)]
    clients = [FakeClient(broker.clients) for _ in range(2)]
    try:
        for w in workers:
            w.ready()
        wait_workers(clients[0], 3)
        ids = {i: [f"c{i}-r{j}" for j in range(30)] for i in range(2)}
        for i, c in enumerate(clients):
            for rid in ids[i]:
                c.submit(rid)
        served_by: set[str] = set()
        for i, c in enumerate(clients):
            for rid in ids[i]:
                chunks, final = c.result(rid, timeout=20)
                assert [ch.seq for ch in chunks] == list(range(n_chunks))
                assert all(ch.text == f"{rid}:{ch.seq}" for ch in chunks)
                assert isinstance(final, Final) and final.chunks == n_chunks
                served_by.add(final.worker)
        assert served_by == {"w0", "w1", "w2"}
        counts = counters(clients[0])
        assert counts["accepted"] == counts["completed"] == 60
        assert counts["chunks"] == 60 * n_chunks
        assert counts["late_chunks"] == counts["late_terminals"] == counts["bad_frames"] == 0
        assert all(m.attempt == 1 for w in workers for m in w.received
                   if isinstance(m, Dispatch))
    finally:
        for w in workers:
            w.close()
        for c in clients:
            c.close()


@pytest.mark.timeout(30)
def test_priorities_then_fifo(broker: Proc, client: FakeClient) -> None:
    with FakeWorker(broker.workers, slots=1) as worker:
        worker.ready()
        wait_workers(client, 1)
        client.submit("blocker")
        blocker = worker.expect(Dispatch)
        order = [("b1", Priority.BATCH), ("n1", Priority.NORMAL), ("i1", Priority.INTERACTIVE),
                 ("n2", Priority.NORMAL), ("i2", Priority.INTERACTIVE)]
        for rid, prio in order:
            client.submit(rid, priority=prio)
        wait_for(lambda: client.status().queues.get("m") == 5, what="5 queued")
        worker.final(blocker.key, "blocker", 0)
        dispatched = []
        for _ in order:
            d = worker.expect(Dispatch)
            dispatched.append(d.request.id)
            worker.final(d.key, d.request.id, 0)
        assert dispatched == ["i1", "i2", "n1", "n2", "b1"]
        for rid, _ in order:
            assert isinstance(client.terminal(rid), Final)


@pytest.mark.timeout(30)
def test_queue_full_gets_overloaded_with_retry_after(tmp_path: Path) -> None:
    with start_broker(tmp_path, queue_size=2, retry_after=0.75, **FAST) as broker, \
            FakeClient(broker.clients) as client, \
            FakeWorker(broker.workers, slots=1) as worker:
        worker.ready()
        wait_workers(client, 1)
        client.submit("busy")
        busy = worker.expect(Dispatch)
        client.submit("q1")
        client.submit("q2")
        client.submit("q3")
        err = client.terminal("q3")
        assert isinstance(err, Error) and err.code is ErrorCode.OVERLOADED
        assert err.retryable and err.retry_after == 0.75
        status = client.status()
        assert status.queues["m"] == 2 and status.counters["overloaded"] == 1
        worker.final(busy.key, "busy", 0)  # the queued ones are still served
        for rid in ("q1", "q2"):
            d = worker.expect(Dispatch)
            assert d.request.id == rid
            worker.final(d.key, rid, 0)
            assert isinstance(client.terminal(rid), Final)


@pytest.mark.timeout(30)
def test_deadline_passes_in_queue_without_dispatch(broker: Proc, client: FakeClient) -> None:
    with FakeWorker(broker.workers, slots=1) as worker:
        worker.ready()
        wait_workers(client, 1)
        client.submit("busy")
        busy = worker.expect(Dispatch)
        client.submit("late", timeout=0.3)
        err = client.terminal("late")
        assert isinstance(err, Error) and err.code is ErrorCode.DEADLINE_EXCEEDED
        assert "queued" in err.message and not err.retryable
        worker.final(busy.key, "busy", 0)
        worker.assert_nothing(Dispatch, within=0.5)
        c = counters(client)
        assert c["deadline_exceeded"] == 1 and c["dispatched"] == 1


@pytest.mark.timeout(30)
def test_deadline_in_flight_cancels_worker_and_drops_late_terminal(
    broker: Proc, client: FakeClient
) -> None:
    with FakeWorker(broker.workers, slots=1) as worker:
        worker.ready()
        wait_workers(client, 1)
        client.submit("r", timeout=0.6)
        d = worker.expect(Dispatch)
        assert d.request.deadline is not None and d.request.timeout is None
        worker.chunk(d.key, "r", 0)
        worker.chunk(d.key, "r", 1)
        cancel = worker.expect(CancelWork)
        assert cancel.key == d.key and cancel.reason is ErrorCode.DEADLINE_EXCEEDED
        chunks, err = client.result("r")
        assert len(chunks) == 2
        assert isinstance(err, Error) and err.code is ErrorCode.DEADLINE_EXCEEDED
        assert err.chunks_sent == 2 and not err.retryable
        worker.final(d.key, "r", 2)  # too late: already answered
        wait_for(lambda: counters(client)["late_terminals"] == 1, what="late terminal counted")
        client.ping()
        assert isinstance(client.recv(), Pong)  # and nothing else reached the client
        assert client.held() == []


@pytest.mark.timeout(30)
def test_worker_lost_before_streaming_is_requeued(broker: Proc, client: FakeClient) -> None:
    w1 = FakeWorker(broker.workers, name="w1", slots=1)
    with FakeWorker(broker.workers, name="w2", slots=1) as w2:
        w1.ready()
        wait_workers(client, 1)
        client.submit("r")
        first = w1.expect(Dispatch)
        assert first.attempt == 1
        w2.ready()
        wait_workers(client, 2)
        w1.close()  # dies before streaming anything
        second = w2.expect(Dispatch, timeout=10)
        assert second.request.id == "r" and second.attempt == 2 and second.key != first.key
        w2.stream(second.key, "r", 4)
        chunks, final = client.result("r")
        assert len(chunks) == 4 and isinstance(final, Final) and final.worker == "w2"
        c = counters(client)
        assert c["requeued"] == 1 and c["workers_lost"] == 1 and c["completed"] == 1


@pytest.mark.timeout(30)
def test_worker_lost_after_streaming_is_not_rerun(broker: Proc, client: FakeClient) -> None:
    w1 = FakeWorker(broker.workers, name="w1", slots=1)
    with FakeWorker(broker.workers, name="w2", slots=1) as w2:
        w1.ready()
        wait_workers(client, 1)
        client.submit("r")
        d = w1.expect(Dispatch)
        w2.ready()
        wait_workers(client, 2)
        for seq in range(3):
            w1.chunk(d.key, "r", seq)
        wait_for(lambda: counters(client)["chunks"] == 3, what="3 chunks forwarded")
        w1.close()
        chunks, err = client.result("r", timeout=10)
        assert len(chunks) == 3
        assert isinstance(err, Error) and err.code is ErrorCode.WORKER_LOST
        assert err.chunks_sent == 3 and not err.retryable
        w2.assert_nothing(Dispatch, within=0.3)


@pytest.mark.timeout(30)
def test_worker_lost_too_often_fails_retryable(tmp_path: Path) -> None:
    with start_broker(tmp_path, max_attempts=2, **FAST) as broker, \
            FakeClient(broker.clients) as client:
        w1 = FakeWorker(broker.workers, name="w1")
        w2 = FakeWorker(broker.workers, name="w2")
        w1.ready()
        wait_workers(client, 1)
        client.submit("r")
        w1.expect(Dispatch)
        w2.ready()
        wait_workers(client, 2)
        w1.close()
        assert w2.expect(Dispatch, timeout=10).attempt == 2
        w2.close()
        err = client.terminal("r", timeout=10)
        assert isinstance(err, Error) and err.code is ErrorCode.WORKER_LOST
        assert err.retryable and err.chunks_sent == 0


@pytest.mark.timeout(30)
def test_client_cancel_reaches_worker(broker: Proc, client: FakeClient) -> None:
    with FakeWorker(broker.workers, slots=1) as worker:
        worker.ready()
        wait_workers(client, 1)
        client.submit("r")
        d = worker.expect(Dispatch)
        worker.chunk(d.key, "r", 0)
        assert isinstance(client.recv(), Chunk)  # streaming has begun
        client.cancel("r")
        cancel = worker.expect(CancelWork)
        assert cancel.key == d.key and cancel.reason is ErrorCode.CANCELLED
        chunks, err = client.result("r")
        assert chunks == [] and isinstance(err, Error)
        assert err.code is ErrorCode.CANCELLED and err.chunks_sent == 1
        worker.error(d.key, "r", ErrorCode.CANCELLED, "stopped")  # the worker's own ending
        wait_for(lambda: counters(client)["late_terminals"] == 1, what="late terminal")
        # the slot came back: the next request is dispatched
        client.submit("r2")
        d2 = worker.expect(Dispatch)
        worker.final(d2.key, "r2", 0)
        assert isinstance(client.terminal("r2"), Final)
        c = counters(client)
        assert c["cancelled"] == 1 and c["completed"] == 1


@pytest.mark.timeout(30)
def test_silent_client_is_cancelled(tmp_path: Path) -> None:
    options = {**FAST, "client_liveness": 0.8}
    with start_broker(tmp_path, **options) as broker, \
            FakeWorker(broker.workers, slots=1) as worker:
        watcher = FakeClient(broker.clients)
        worker.ready()
        wait_workers(watcher, 1)
        with FakeClient(broker.clients) as silent:
            silent.submit("r")
            d = worker.expect(Dispatch)
            worker.chunk(d.key, "r", 0)
            # the client says nothing more: after client_liveness its work is cancelled
            cancel = worker.expect(CancelWork, timeout=5)
            assert cancel.key == d.key and cancel.reason is ErrorCode.CANCELLED
        c = counters(watcher)
        assert c["clients_gone"] == 1 and c["cancelled"] == 1
        watcher.close()


@pytest.mark.timeout(30)
def test_client_garbage_and_wrong_version(broker: Proc, client: FakeClient) -> None:
    import msgspec

    client.send_frames([b"TH\x02", b"whatever"])
    err = client.recv()
    assert isinstance(err, Error) and err.code is ErrorCode.PROTOCOL_VERSION and err.id == ""
    client.send_frames([b"nonsense"])
    err = client.recv()
    assert isinstance(err, Error) and err.code is ErrorCode.PROTOCOL_VERSION
    client.send_frames([VERSION_FRAME, b"\xc1\xc1"])
    err = client.recv()
    assert isinstance(err, Error) and err.code is ErrorCode.INVALID_REQUEST
    client.send_frames([VERSION_FRAME, msgspec.msgpack.encode(
        {"type": "submit", "request": {"id": "no-model"}})])
    err = client.recv()
    assert isinstance(err, Error) and err.code is ErrorCode.INVALID_REQUEST
    assert err.id == "no-model"  # the id is recovered so the caller gets its answer
    client.send_frames([VERSION_FRAME, b"a", b"b"])
    err = client.recv()
    assert isinstance(err, Error) and err.code is ErrorCode.INVALID_REQUEST
    client.submit("")
    err = client.recv()
    assert isinstance(err, Error) and err.code is ErrorCode.INVALID_REQUEST
    client.submit("t", timeout=-1)
    assert client.terminal("t").code is ErrorCode.INVALID_REQUEST  # type: ignore[union-attr]

    client.ping()  # still serving
    assert isinstance(client.recv(), Pong)
    c = counters(client)
    assert c["wrong_version"] == 1 and c["bad_frames"] == 4 and c["rejected_invalid"] == 2
    assert c["accepted"] == 0


@pytest.mark.timeout(30)
def test_worker_garbage_and_wrong_version(broker: Proc, client: FakeClient) -> None:
    from tokenhive.schemas.frames import ROUTE_CHUNK
    from tokenhive.schemas.messages import Rejected

    with FakeWorker(broker.workers, name="bad") as bad, \
            FakeWorker(broker.workers, name="good", auto_chunks=2) as good:
        bad.send_frames([b"TH\x09", b"", b"x"])
        rej = bad.expect(Rejected)
        assert rej.code is ErrorCode.PROTOCOL_VERSION
        bad.send_frames([VERSION_FRAME, b"", b"\xff\xff"])
        assert bad.expect(Rejected).code is ErrorCode.INVALID_REQUEST
        bad.send_frames([VERSION_FRAME])
        assert bad.expect(Rejected).code is ErrorCode.INVALID_REQUEST
        bad.send_frames([VERSION_FRAME, b"?", b"y"])
        assert bad.expect(Rejected).code is ErrorCode.INVALID_REQUEST
        bad.send_frames([VERSION_FRAME, ROUTE_CHUNK + b"12345678", b"body"])
        bad.expect(Reregister)  # an unknown worker streaming: told to register
        bad.ready(slots=0)  # a Ready that makes no sense is refused too
        assert bad.expect(Rejected).code is ErrorCode.INVALID_REQUEST

        good.ready()
        wait_workers(client, 1)
        client.submit("r")
        chunks, final = client.result("r")
        assert len(chunks) == 2 and isinstance(final, Final)
        c = counters(client)
        assert c["wrong_version"] == 1 and c["bad_frames"] == 4 and c["late_chunks"] == 1
        assert [w.id for w in client.status().workers] == ["good"]


@pytest.mark.timeout(30)
def test_unhealthy_worker_gets_no_work(broker: Proc, client: FakeClient) -> None:
    with FakeWorker(broker.workers, name="sick", slots=2, auto_chunks=1,
                    health=Health.UNHEALTHY) as sick, \
            FakeWorker(broker.workers, name="fine", slots=2, auto_chunks=1) as fine:
        sick.ready()
        fine.ready()
        wait_workers(client, 2)
        for i in range(6):
            client.submit(f"r{i}")
        for i in range(6):
            final = client.terminal(f"r{i}")
            assert isinstance(final, Final) and final.worker == "fine"
        assert not any(isinstance(m, Dispatch) for m in sick.received)

        fine.goodbye("draining")
        wait_workers(client, 1)
        sick.health = Health.OK  # recovers: its next heartbeat says ok
        client.submit("after")
        final = client.terminal("after")
        assert isinstance(final, Final) and final.worker == "sick"
        assert counters(client)["workers_left"] == 1


@pytest.mark.timeout(45)
def test_restarted_broker_asks_workers_to_reregister(tmp_path: Path) -> None:
    first = start_broker(tmp_path, **FAST)
    worker = FakeWorker(first.workers, name="w1", auto_chunks=1)
    try:
        worker.ready()
        with FakeClient(first.clients) as client:
            wait_workers(client, 1)
        first.kill()
        with start_broker(tmp_path, clients=first.clients, workers=first.workers,
                          **FAST) as second, FakeClient(second.clients) as client:
            worker.expect(Reregister, timeout=10)  # its heartbeats reach a broker that forgot it
            worker.ready()
            wait_workers(client, 1)
            client.submit("r")
            assert isinstance(client.terminal("r"), Final)
    finally:
        worker.close()
        first.kill()


@pytest.mark.timeout(60)
def test_slow_client_is_cut_off_without_stalling_others(tmp_path: Path) -> None:
    buffer = 500
    with start_broker(tmp_path, hwm=200, client_buffer=buffer, **FAST) as broker, \
            FakeWorker(broker.workers, name="w", slots=2, auto_chunks=20_000,
                       chunk_bytes=1000) as worker, \
            FakeClient(broker.clients, rcvhwm=100_000) as fast, \
            FakeClient(broker.clients, rcvhwm=10) as slow:
        worker.ready()
        wait_workers(fast, 1)
        slow.submit("slow")
        fast.submit("fast")
        chunks, final = fast.result("fast", timeout=40)  # never reads "slow", keeps flowing
        assert len(chunks) == 20_000 and isinstance(final, Final)
        # the slow client's request was cut off and its work cancelled
        wait_for(lambda: any(isinstance(m, CancelWork) for m in worker.received), 10,
                 "CancelWork for the slow client")
        cancel = next(m for m in worker.received if isinstance(m, CancelWork))
        assert cancel.reason is ErrorCode.OVERLOADED
        assert fast.status().counters["client_overflows"] == 1
        # everything the broker counted as sent is delivered, then the error
        received = 0
        while True:
            msg = slow.recv(timeout=10)
            if isinstance(msg, Chunk):
                assert msg.seq == received
                received += 1
                continue
            assert isinstance(msg, Error) and msg.code is ErrorCode.OVERLOADED
            assert msg.chunks_sent == received and received > buffer
            break


@pytest.mark.timeout(30)
def test_model_without_workers_fails_queued_requests_in_bounded_time(tmp_path: Path) -> None:
    options = {**FAST, "no_worker_timeout": 0.5}
    with start_broker(tmp_path, **options) as broker, FakeClient(broker.clients) as client:
        with FakeWorker(broker.workers, name="w1") as worker:
            worker.ready()
            wait_workers(client, 1)
            worker.goodbye()
            wait_workers(client, 0)
        client.submit("d")  # the model is known: queued, waiting for a worker
        client.submit("d")  # same id while the first is pending: refused
        dup = client.terminal("d")
        assert isinstance(dup, Error) and dup.code is ErrorCode.INVALID_REQUEST
        err = client.terminal("d", timeout=5)
        assert isinstance(err, Error) and err.code is ErrorCode.WORKER_LOST and err.retryable
        c = counters(client)
        assert c["accepted"] == 1 and c["failed"] == 1 and c["rejected_invalid"] == 1


@pytest.mark.timeout(30)
def test_sigterm_answers_pending_requests_and_exits_zero(broker: Proc, client: FakeClient) -> None:
    with FakeWorker(broker.workers, slots=1) as worker:
        worker.ready()
        wait_workers(client, 1)
        client.submit("inflight")
        worker.expect(Dispatch)
        client.submit("queued")
        wait_for(lambda: client.status().queues.get("m") == 1, what="queued")
        assert broker.terminate(timeout=10) == 0
        for rid in ("inflight", "queued"):
            err = client.terminal(rid)
            assert isinstance(err, Error) and err.code is ErrorCode.BROKER_UNAVAILABLE
        assert worker.expect(CancelWork).reason is ErrorCode.BROKER_UNAVAILABLE


@pytest.mark.timeout(30)
def test_status_reports_workers_and_queues(broker: Proc, client: FakeClient) -> None:
    with FakeWorker(broker.workers, name="w1", slots=2) as worker:
        worker.ready(device="cuda:0")
        wait_workers(client, 1)
        client.submit("a")
        client.submit("b")
        client.submit("c")
        da, db = worker.expect(Dispatch), worker.expect(Dispatch)
        status = client.status()
        (ws,) = status.workers
        assert (ws.id, ws.model, ws.health, ws.slots) == ("w1", "m", "ok", 2)
        assert ws.free_slots == 0 and ws.in_flight == 2 and ws.device == "cuda:0"
        assert status.queues == {"m": 1} and status.in_flight == 2
        worker.final(da.key, da.request.id, 0)
        worker.final(db.key, db.request.id, 0)
        dc = worker.expect(Dispatch)
        worker.final(dc.key, dc.request.id, 0)
        for rid in "abc":
            assert isinstance(client.terminal(rid), Final)
        ws = client.status().workers[0]
        assert ws.served == 3 and ws.in_flight == 0 and ws.free_slots == 2


@pytest.mark.timeout(30)
def test_worker_restarted_with_same_identity_takes_over(broker: Proc, client: FakeClient) -> None:
    """ROUTER_HANDOVER: a restarted worker reusing its socket identity replaces the old
    connection; its Ready means a fresh start, so unstarted work is dispatched again."""
    old = FakeWorker(broker.workers, name="w", identity=b"worker-w")
    old.ready()
    wait_workers(client, 1)
    client.submit("r")
    first = old.expect(Dispatch)
    old.close()
    with FakeWorker(broker.workers, name="w", identity=b"worker-w", auto_chunks=2) as new:
        new.ready()
        chunks, final = client.result("r", timeout=10)
        assert len(chunks) == 2 and isinstance(final, Final)
        again = next(m for m in new.received if isinstance(m, Dispatch))
        assert again.attempt == 2 and again.key != first.key
        assert [w.id for w in client.status().workers] == ["w"]


@pytest.mark.timeout(60)
def test_oversized_frames_are_dropped_on_both_sockets(broker: Proc, client: FakeClient) -> None:
    """A 64 MiB frame (over the 16 MiB default MAXMSGSIZE) never reaches the broker's code:
    libzmq drops the sender's connection at the frame's header instead of buffering it, and
    the broker keeps serving, the sender's next message included."""
    big = b"\xc1" * (64 * 2**20)  # not msgpack either: delivered, it would be a bad_frames
    with FakeClient(broker.clients) as rogue:
        rogue.send_frames([VERSION_FRAME, big])
        rogue.wait_reconnected()  # a message sent earlier could go down with the connection
        rogue.ping()
        assert isinstance(rogue.recv(timeout=20), Pong)  # the first answer: none for the frame
    with FakeWorker(broker.workers, name="w1", model="m") as worker:
        worker.send_frames([VERSION_FRAME, b"", big])
        worker.ready()
        wait_workers(client, 1, timeout=20)
        client.submit("r")
        dispatch = worker.expect(Dispatch, timeout=10)
        worker.stream(dispatch.key, "r", 2)
        chunks, final = client.result("r")
        assert [c.text for c in chunks] == ["t0", "t1"] and isinstance(final, Final)
    c = counters(client)
    assert c["bad_frames"] == 0 and c["internal_errors"] == 0 and c["completed"] == 1


@pytest.mark.timeout(60)
def test_configured_max_message_bytes_is_the_cap(tmp_path: Path) -> None:
    """``limits.max_message_bytes`` sets the cap: over it is dropped, under it is delivered
    (and, being garbage, answered and counted as such)."""
    limits = json.dumps({"limits": {"max_message_bytes": 2**20}})
    with start_broker(tmp_path, config_json=limits, **FAST) as broker, \
            FakeClient(broker.clients) as rogue:
        rogue.send_frames([VERSION_FRAME, b"\xc1" * (2 * 2**20)])  # over: never delivered
        rogue.wait_reconnected()
        rogue.send_frames([VERSION_FRAME, b"\xc1" * 2**19])  # under: reaches the core
        error = rogue.recv(timeout=20)
        assert isinstance(error, Error) and error.code is ErrorCode.INVALID_REQUEST
        assert counters(rogue)["bad_frames"] == 1
