"""The worker runtime as a real process (``python -m tokenhive.workers``, echo backend) on real
sockets, driven by a fake broker ROUTER that speaks the real protocol (tests/support)."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.worker_peers import FakeBroker, Received, WorkerProc, short_ipc_dir, start_worker
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import VERSION_FRAME, encode
from tokenhive.schemas.messages import (
    BrokerPing,
    CancelWork,
    Chunk,
    Error,
    Final,
    Goodbye,
    Health,
    Heartbeat,
    Kind,
    Ready,
    Rejected,
    Request,
    Reregister,
    Sampling,
)
from tokenhive.workers.coalesce import ChunkStream
from tokenhive.workers.link import BrokerLink

pytestmark = pytest.mark.timeout(60)

StartWorker = Callable[..., WorkerProc]


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """Sockets and worker logs (``<id>.log``); KEEP_THW=1 keeps them to debug a failure."""
    path = short_ipc_dir()
    yield path
    if "KEEP_THW" not in os.environ:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker(ipc_dir: Path) -> Iterator[FakeBroker]:
    with FakeBroker(f"ipc://{ipc_dir}/broker.sock") as fake:
        yield fake


@pytest.fixture
def workers(ipc_dir: Path) -> Iterator[StartWorker]:
    procs: list[WorkerProc] = []

    def start(address: str, *extra: str, **kw: Any) -> WorkerProc:
        proc = start_worker(address, ipc_dir, *extra, **kw)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def is_ready_ok(r: Received) -> bool:
    return isinstance(r.msg, Ready) and r.msg.health == Health.OK


def heartbeat(pred: Callable[[Heartbeat], bool]) -> Callable[[Received], bool]:
    return lambda r: isinstance(r.msg, Heartbeat) and pred(r.msg)


def terminal_of(key: bytes) -> Callable[[Received], bool]:
    return lambda r: r.route == b"e" + key


def req(rid: str = "r1", **kw: Any) -> Request:
    kw.setdefault("model", "echo")
    return Request(id=rid, **kw)


def wait_for_log(proc: WorkerProc, msg: str, count: int = 1, timeout: float = 10.0) -> None:
    """Poll the worker's JSON log (with a deadline) until ``msg`` appears ``count`` times."""
    deadline = time.monotonic() + timeout
    while sum(r.get("msg") == msg for r in proc.log_records()) < count:
        assert time.monotonic() < deadline, f"{msg!r} x{count} not logged:\n{proc.log_text()}"
        time.sleep(0.02)


# -- the pieces, in-process on a real socket ---------------------------------------------------


def test_chunk_stream_accounts_for_every_token(broker: FakeBroker) -> None:
    async def main() -> int:
        link = BrokerLink(broker.address, b"w9", on_message=lambda frames: None)
        link.open()
        hello = link.send([VERSION_FRAME, b"", encode(Ready(worker="w9", model="m", backend="echo",
                                                            slots=1))])
        if hello is not None:
            await hello  # held in the backlog until the connection is up
        stream = ChunkStream(link, b"k1", "r", 0.0)
        for text, tokens in (("a", 1), ("", 1), ("b", 1), ("", 2)):
            await stream.add(text, tokens)  # "" = half a character: no chunk of its own
        await stream.close()
        link.close(linger_ms=2000)
        link.ctx.term()
        return stream.sent

    sent = asyncio.run(main())
    broker.expect(Ready)
    chunks = [broker.expect(lambda r: r.route == b"ck1").msg for _ in range(sent)]
    assert [(c.seq, c.text, c.tokens) for c in chunks] == [  # type: ignore[union-attr]
        (0, "a", 1), (1, "b", 2), (2, "", 2)]


# -- registration and heartbeats -----------------------------------------------------------


def test_ready_advertises_the_worker(broker: FakeBroker, workers: StartWorker) -> None:
    proc = workers(broker.address, "-o", "context_length=1234", slots=3)
    first = broker.expect(Ready)
    assert first.msg.health in (Health.LOADING, Health.OK)  # loading unless load won the race
    ready = first if is_ready_ok(first) else broker.expect(is_ready_ok)
    msg = ready.msg
    assert isinstance(msg, Ready)
    assert ready.identity == b"w1"  # routing id == worker id
    assert (msg.worker, msg.model, msg.backend, msg.slots) == ("w1", "echo", "echo", 3)
    assert (msg.context_length, msg.device, msg.pid) == (1234, "cpu", proc.pid)
    assert set(msg.kinds) == {Kind.CHAT, Kind.COMPLETION, Kind.EMBEDDING}
    assert msg.memory_mb > 0


def test_default_worker_id_is_model_and_pid(broker: FakeBroker, ipc_dir: Path) -> None:
    proc = WorkerProc(["--broker", broker.address, "--backend", "echo", "--model", "m7",
                       "--heartbeat-interval", "0.1"], ipc_dir / "default-id.log")
    try:
        ready = broker.expect(Ready)
        assert ready.msg.worker == f"m7-{proc.pid}" == ready.identity.decode()  # type: ignore[union-attr]
    finally:
        proc.stop()


def test_heartbeats_report_slots_and_health(broker: FakeBroker, workers: StartWorker) -> None:
    workers(broker.address, slots=3, interval=0.1)
    broker.expect(is_ready_ok)
    beats = [broker.expect(heartbeat(lambda hb: hb.health == Health.OK)) for _ in range(6)]
    for beat in beats:
        hb = beat.msg
        assert isinstance(hb, Heartbeat)
        assert (hb.worker, hb.free_slots, hb.in_flight, hb.retry_after) == ("w1", 3, 0, None)
        assert hb.memory_mb > 0
    gaps = [b.at - a.at for a, b in itertools.pairwise(beats[1:])]
    assert 0.03 < sum(gaps) / len(gaps) < 0.4  # every ~0.1 s (noisy shared machine)


def test_loading_worker_says_so_and_refuses_work(broker: FakeBroker, workers: StartWorker) -> None:
    workers(broker.address, "-o", "load_seconds=0.8")
    loading = broker.expect(Ready)
    assert loading.msg.health == Health.LOADING  # type: ignore[union-attr]
    hb = broker.expect(heartbeat(lambda hb: hb.health == Health.LOADING)).msg
    assert hb.free_slots == 0  # type: ignore[union-attr]
    key = broker.dispatch(b"w1", req())
    chunks, end = broker.collect(key)
    assert chunks == [] and isinstance(end, Error)
    assert end.code == ErrorCode.OVERLOADED and end.retryable and "loading" in end.message
    broker.expect(is_ready_ok, timeout=10)
    broker.expect(heartbeat(lambda hb: hb.health == Health.OK and hb.free_slots == 2))


# -- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_stream_in_order_with_final(transport: str, ipc_dir: Path, workers: StartWorker) -> None:
    address = f"ipc://{ipc_dir}/b.sock" if transport == "ipc" else "tcp://127.0.0.1:*"
    text = "The quick brown fox jumps over the lazy dog, twice."
    with FakeBroker(address) as broker:
        workers(broker.address, "-o", f"text={text}", "-o", "tokens_per_s=200")
        broker.expect(is_ready_ok)
        key = broker.dispatch(b"w1", req(prompt="four words of prompt"), queued_ms=12.5)
        chunks, final = broker.collect(key)
    assert isinstance(final, Final)
    assert [c.seq for c in chunks] == list(range(10))
    assert "".join(c.text for c in chunks) == text
    assert all(c.id == "r1" and c.tokens == 1 for c in chunks)
    assert (final.id, final.chunks, final.finish_reason, final.worker) == ("r1", 10, "stop", "w1")
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (4, 10)
    assert final.usage.total_tokens == 14
    assert final.timings.queue_ms == 12.5
    assert 0 <= final.timings.ttft_ms < final.timings.total_ms
    assert final.timings.total_ms >= 40  # 10 tokens at 200/s: the last is due at 45 ms


def test_concurrent_streams_interleave_but_stay_ordered(
    broker: FakeBroker, workers: StartWorker
) -> None:
    workers(broker.address, "-o", "tokens_per_s=300", slots=4)
    broker.expect(is_ready_ok)
    prompts = {f"r{i}": " ".join(f"w{i}-{j}" for j in range(25)) for i in range(4)}
    keys = {rid: broker.dispatch(b"w1", req(rid, prompt=p)) for rid, p in prompts.items()}
    for rid, key in keys.items():
        chunks, final = broker.collect(key)
        assert isinstance(final, Final) and final.chunks == len(chunks) == 25
        assert [c.seq for c in chunks] == list(range(25))
        assert "".join(c.text for c in chunks) == prompts[rid]
    arrivals = [r.route for r in broker.seen if r.route[:1] == b"c"]
    assert arrivals[:25] != [arrivals[0]] * 25  # the four really ran at the same time


def test_non_stream_request_gets_one_chunk(broker: FakeBroker, workers: StartWorker) -> None:
    workers(broker.address, "-o", "text=alpha beta gamma delta")
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req(stream=False, sampling=Sampling(max_tokens=3)))
    chunks, final = broker.collect(key)
    assert [(c.seq, c.text, c.tokens) for c in chunks] == [(0, "alpha beta gamma", 3)]
    assert isinstance(final, Final)
    assert (final.chunks, final.finish_reason, final.usage.completion_tokens) == (1, "length", 3)


def test_embedding_request(broker: FakeBroker, workers: StartWorker) -> None:
    workers(broker.address, "-o", "embedding_dim=5")
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req(kind=Kind.EMBEDDING, input=["a b", "c"]))
    chunks, final = broker.collect(key)
    assert chunks == [] and isinstance(final, Final)
    assert final.embeddings is not None and [len(v) for v in final.embeddings] == [5, 5]
    assert (final.chunks, final.usage.prompt_tokens) == (0, 3)


def test_coalescing_merges_tokens_within_the_window(
    broker: FakeBroker, workers: StartWorker
) -> None:
    workers(broker.address, "-o", "tokens_per_s=400", "-o", "tokens=80", "-o", "text=a b c d",
            "--coalesce-ms", "50")
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req())
    chunks, final = broker.collect(key)
    assert isinstance(final, Final)
    assert 2 <= len(chunks) <= 80 // 5  # ~20 tokens per 50 ms window at 400 tokens/s
    assert [c.seq for c in chunks] == list(range(len(chunks))) and final.chunks == len(chunks)
    assert sum(c.tokens for c in chunks) == 80 == final.usage.completion_tokens
    assert "".join(c.text for c in chunks) == "a b c d" * 20


def test_heartbeats_flow_while_a_stream_runs_flat_out(
    broker: FakeBroker, workers: StartWorker
) -> None:
    workers(broker.address, "-o", "tokens=60000", "-o", "text=tok", interval=0.05)
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req())
    chunks, final = broker.collect(key, timeout=50)
    assert isinstance(final, Final) and len(chunks) == final.chunks == 60000
    # Heartbeats are sent between chunks, in the one ordered stream the broker receives.
    routes = [r.route for r in broker.seen]
    first, last = routes.index(b"c" + key), routes.index(b"e" + key)
    beats = sum(isinstance(r.msg, Heartbeat) for r in broker.seen[first:last])
    streamed_s = final.timings.total_ms / 1000
    assert beats >= int(streamed_s / 0.05) // 3, (beats, streamed_s)


# -- limits, cancels, deadlines --------------------------------------------------------------


def test_dispatch_beyond_slots_is_overloaded(broker: FakeBroker, workers: StartWorker) -> None:
    workers(broker.address, "-o", "tokens_per_s=50", "-o", "tokens=1000", slots=2)
    broker.expect(is_ready_ok)
    first, second = (broker.dispatch(b"w1", req(f"r{i}")) for i in range(2))
    broker.expect(lambda r: r.route == b"c" + second)  # both are streaming
    third = broker.dispatch(b"w1", req("r3"))
    chunks, end = broker.collect(third)
    assert chunks == [] and isinstance(end, Error)
    assert (end.code, end.retryable, end.chunks_sent, end.worker) == (
        ErrorCode.OVERLOADED, True, 0, "w1")
    broker.expect(heartbeat(lambda hb: hb.free_slots == 0 and hb.in_flight == 2))
    for key in (first, second):
        broker.send(b"w1", CancelWork(key=key))
        assert broker.expect(terminal_of(key)).msg.code == ErrorCode.CANCELLED  # type: ignore[union-attr]
    broker.expect(heartbeat(lambda hb: hb.free_slots == 2 and hb.in_flight == 0))
    fourth = broker.dispatch(b"w1", req("r4"))
    broker.expect(lambda r: r.route == b"c" + fourth)  # the slots really are free again


@pytest.mark.parametrize("reason", [ErrorCode.CANCELLED, ErrorCode.DEADLINE_EXCEEDED])
def test_cancel_mid_stream_frees_the_slot(
    reason: ErrorCode, broker: FakeBroker, workers: StartWorker
) -> None:
    workers(broker.address, "-o", "tokens_per_s=100", "-o", "tokens=100000", slots=1)
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req())
    for _ in range(3):
        broker.expect(lambda r: r.route == b"c" + key)
    cancelled_at = time.monotonic()
    broker.send(b"w1", CancelWork(key=key, reason=reason))
    chunks, end = broker.collect(key)
    assert isinstance(end, Error)
    assert (end.code, end.retryable, end.worker) == (reason, False, "w1")
    assert end.chunks_sent == 3 + len(chunks)  # every chunk sent before the terminal
    assert [c.seq for c in chunks] == list(range(3, 3 + len(chunks)))
    assert time.monotonic() - cancelled_at < 1.0  # stopped between tokens, not at the end
    broker.expect(heartbeat(lambda hb: hb.free_slots == 1 and hb.in_flight == 0))


def test_cancel_right_behind_the_dispatch_still_answers(
    broker: FakeBroker, workers: StartWorker
) -> None:
    # Both arrive in one wake-up: the job's task is cancelled before it ever ran.
    workers(broker.address, "-o", "tokens_per_s=100", "-o", "tokens=1000", slots=1)
    broker.expect(is_ready_ok)
    for i in range(5):
        key = broker.dispatch(b"w1", req(f"r{i}"))
        broker.send(b"w1", CancelWork(key=key))
        chunks, end = broker.collect(key)
        assert isinstance(end, Error) and end.code == ErrorCode.CANCELLED
        assert end.chunks_sent == len(chunks)
    broker.expect(heartbeat(lambda hb: hb.free_slots == 1))


def test_every_dispatch_gets_exactly_one_terminal_under_churn(
    broker: FakeBroker, workers: StartWorker
) -> None:
    workers(broker.address, "-o", "tokens_per_s=400", "-o", "tokens=20", slots=3)
    broker.expect(is_ready_ok)
    keys = [broker.dispatch(b"w1", req(f"r{i}")) for i in range(40)]
    for key in keys[::4]:
        broker.send(b"w1", CancelWork(key=key))
    outcomes: dict[bytes, list[str]] = {key: [] for key in keys}
    for key in keys:
        chunks, end = broker.collect(key)
        outcomes[key].append(end.code.value if isinstance(end, Error) else "final")
        assert (end.chunks if isinstance(end, Final) else end.chunks_sent) == len(chunks)
    broker.pump(0.3)  # anything extra still on its way arrives now
    extra = [r for r in broker.pending if r.route[:1] == b"e"]
    assert extra == []  # no second terminal for anyone
    kinds = {code for codes in outcomes.values() for code in codes}
    assert kinds <= {"final", "cancelled", "overloaded"} and "final" in kinds
    assert "overloaded" in kinds  # 40 at once on 3 slots: the rest were refused, not dropped


def test_cancel_for_unknown_key_is_ignored(broker: FakeBroker, workers: StartWorker) -> None:
    workers(broker.address, "-o", "text=x y")
    broker.expect(is_ready_ok)
    broker.send(b"w1", CancelWork(key=b"nope"))
    key = broker.dispatch(b"w1", req())
    assert isinstance(broker.collect(key)[1], Final)


def test_request_deadline_is_enforced_by_the_worker(
    broker: FakeBroker, workers: StartWorker
) -> None:
    workers(broker.address, "-o", "tokens_per_s=100", "-o", "tokens=100000")
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req(deadline=time.time() + 0.3))
    chunks, end = broker.collect(key)
    assert isinstance(end, Error) and end.code == ErrorCode.DEADLINE_EXCEEDED
    assert end.chunks_sent == len(chunks) > 5
    late = broker.dispatch(b"w1", req("late", deadline=time.time() - 1))
    chunks, end = broker.collect(late)
    assert chunks == [] and isinstance(end, Error) and end.code == ErrorCode.DEADLINE_EXCEEDED


def test_duplicate_key_gets_an_error_and_the_first_goes_on(
    broker: FakeBroker, workers: StartWorker
) -> None:
    workers(broker.address, "-o", "tokens_per_s=200", "-o", "tokens=40")
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req())
    broker.dispatch(b"w1", req("again"), key=key)
    dup = broker.expect(lambda r: r.route == b"e" + key)
    assert isinstance(dup.msg, Error) and dup.msg.code == ErrorCode.INTERNAL
    assert dup.msg.id == "again"
    _, final = broker.collect(key)
    assert isinstance(final, Final) and final.id == "r1" and final.chunks == 40


# -- backend errors and health -------------------------------------------------------------


def test_backend_errors_degrade_health_until_a_success(
    broker: FakeBroker, workers: StartWorker
) -> None:
    workers(broker.address, "-o", "text=a b c", "-o", "degraded_after_errors=2")
    broker.expect(is_ready_ok)
    fail = {"echo_fail": "backend_error", "echo_fail_after": "2"}
    chunks, end = broker.collect(broker.dispatch(b"w1", req("f1", metadata=fail)))
    assert isinstance(end, Error) and len(chunks) == 2
    assert (end.code, end.retryable, end.chunks_sent) == (ErrorCode.BACKEND_ERROR, True, 2)
    chunks, end = broker.collect(broker.dispatch(b"w1", req("f2", metadata={"echo_fail": "crash"})))
    assert isinstance(end, Error) and end.code == ErrorCode.BACKEND_ERROR
    assert end.message == "RuntimeError: echo: simulated crash"
    broker.drop_pending()
    degraded = broker.expect(heartbeat(lambda hb: hb.health == Health.DEGRADED)).msg
    assert "2 consecutive backend errors" in degraded.detail  # type: ignore[union-attr]
    assert isinstance(broker.collect(broker.dispatch(b"w1", req("ok")))[1], Final)
    broker.drop_pending()
    broker.expect(heartbeat(lambda hb: hb.health == Health.OK and hb.detail == ""))


def test_client_faults_do_not_degrade_health(broker: FakeBroker, workers: StartWorker) -> None:
    workers(broker.address, "-o", "context_length=3", "-o", "degraded_after_errors=1")
    broker.expect(is_ready_ok)
    _, end = broker.collect(broker.dispatch(b"w1", req(prompt="one two three four")))
    assert isinstance(end, Error)
    assert (end.code, end.retryable) == (ErrorCode.CONTEXT_TOO_LONG, False)
    broker.drop_pending()
    for _ in range(3):
        assert broker.expect(Heartbeat).msg.health == Health.OK  # type: ignore[union-attr]


def test_rate_limit_shows_in_heartbeats_until_it_passes(
    broker: FakeBroker, workers: StartWorker
) -> None:
    workers(broker.address, "-o", "text=a b")
    broker.expect(is_ready_ok)
    meta = {"echo_fail": "rate_limited", "echo_retry_after": "0.6"}
    _, end = broker.collect(broker.dispatch(b"w1", req(metadata=meta)))
    assert isinstance(end, Error)
    assert (end.code, end.retryable, end.retry_after) == (ErrorCode.RATE_LIMITED, True, 0.6)
    broker.drop_pending()
    limited = broker.expect(heartbeat(lambda hb: hb.health == Health.DEGRADED)).msg
    assert isinstance(limited, Heartbeat)
    assert limited.retry_after is not None and 0 < limited.retry_after <= 0.6
    cleared = broker.expect(heartbeat(lambda hb: hb.health == Health.OK), timeout=5).msg
    assert cleared.retry_after is None  # type: ignore[union-attr]


# -- broker loss, reregister, rejection ------------------------------------------------------


def test_broker_restart_gets_a_fresh_socket_and_ready(
    ipc_dir: Path, workers: StartWorker
) -> None:
    address = f"ipc://{ipc_dir}/restart.sock"
    first = FakeBroker(address)
    proc = workers(address, "-o", "tokens_per_s=50", "-o", "tokens=100000", interval=0.1,
                   liveness=3)
    first.expect(is_ready_ok)
    key = first.dispatch(b"w1", req())
    first.expect(lambda r: r.route == b"c" + key)
    first.close()  # the broker dies with a request in flight
    with FakeBroker(address) as second:
        ready = second.expect(is_ready_ok, timeout=15)
        assert ready.msg.pid == proc.pid  # type: ignore[union-attr]  # same process, new socket
        lost = second.expect(terminal_of(key)).msg
        assert isinstance(lost, Error) and lost.code == ErrorCode.WORKER_LOST
        assert lost.chunks_sent >= 1 and not lost.retryable  # text was already streamed
        registered = [r for r in proc.log_records() if r.get("msg") == "registered"]
        assert registered[-1]["socket"] >= 2  # a fresh DEALER, not the old one reconnected
        again = second.dispatch(b"w1", req("after"))
        second.expect(heartbeat(lambda hb: hb.in_flight <= 1))
        second.send(b"w1", CancelWork(key=again))
        assert second.expect(terminal_of(again)).msg.code == ErrorCode.CANCELLED  # type: ignore[union-attr]


def test_silent_broker_gets_a_fresh_socket(broker: FakeBroker, workers: StartWorker) -> None:
    proc = workers(broker.address, interval=0.1, liveness=3)
    broker.expect(is_ready_ok)
    broker.pinging = False  # alive and bound, but silent
    wait_for_log(proc, "broker silent")
    broker.pinging = True
    broker.expect(is_ready_ok, timeout=10)
    wait_for_log(proc, "registered", count=2)
    assert proc.proc.poll() is None


def test_worker_started_before_the_broker_registers_when_it_appears(
    ipc_dir: Path, workers: StartWorker
) -> None:
    address = f"ipc://{ipc_dir}/late.sock"
    proc = workers(address, interval=0.05, liveness=2)
    wait_for_log(proc, "broker lost; reconnecting with a fresh socket", count=2)
    backoffs = [r["backoff_s"] for r in proc.log_records() if "backoff_s" in r]
    assert backoffs[:2] == [0.05, 0.1]  # doubling while the broker stays away
    with FakeBroker(address) as late:
        late.expect(is_ready_ok, timeout=15)


def test_reregister_sends_ready_again_and_keeps_work(
    broker: FakeBroker, workers: StartWorker
) -> None:
    workers(broker.address, "-o", "tokens_per_s=200", "-o", "tokens=60")
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req())
    broker.expect(lambda r: r.route == b"c" + key)
    broker.send(b"w1", Reregister())
    again = broker.expect(is_ready_ok)
    assert again.msg.slots == 2  # type: ignore[union-attr]
    _, final = broker.collect(key)
    assert isinstance(final, Final) and final.chunks == 60


def test_protocol_rejection_exits_4(broker: FakeBroker, workers: StartWorker) -> None:
    proc = workers(broker.address)
    broker.expect(is_ready_ok)
    broker.send(b"w1", Rejected(code=ErrorCode.PROTOCOL_VERSION, message="speak v9"))
    assert proc.wait(10) == 4
    assert any(r.get("msg") == "broker rejected us" for r in proc.log_records())


def test_garbage_from_the_broker_is_dropped(broker: FakeBroker, workers: StartWorker) -> None:
    proc = workers(broker.address, "-o", "text=still here")
    broker.expect(is_ready_ok)
    broker.send_raw(b"w1", [b"TH\x09", encode(BrokerPing())])  # another protocol version
    broker.send_raw(b"w1", [VERSION_FRAME, b"\xc1not msgpack"])
    broker.send_raw(b"w1", [VERSION_FRAME])
    chunks, final = broker.collect(broker.dispatch(b"w1", req()))
    assert isinstance(final, Final) and "".join(c.text for c in chunks) == "still here"
    msgs = [r.get("msg") for r in proc.log_records()]
    assert msgs.count("dropping malformed broker message") == 2
    assert msgs.count("dropping undecodable broker message") == 1


# -- leaving -------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_work(broker: FakeBroker, workers: StartWorker) -> None:
    proc = workers(broker.address, "-o", "tokens_per_s=100", "-o", "tokens=40")
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req())
    broker.expect(lambda r: r.route == b"c" + key)
    proc.signal(signal.SIGTERM)
    draining = broker.expect(heartbeat(lambda hb: hb.detail == "draining")).msg
    assert (draining.free_slots, draining.health) == (0, Health.UNHEALTHY)  # type: ignore[union-attr]
    refused = broker.dispatch(b"w1", req("late"))
    assert broker.expect(terminal_of(refused)).msg.code == ErrorCode.OVERLOADED  # type: ignore[union-attr]
    _, final = broker.collect(key)
    assert isinstance(final, Final) and final.chunks == 40  # finished, not cut off
    bye = broker.expect(Goodbye).msg
    assert isinstance(bye, Goodbye) and (bye.reason, bye.code) == ("drained", None)
    assert proc.wait(10) == 0


def test_sigterm_drain_timeout_gives_work_up(broker: FakeBroker, workers: StartWorker) -> None:
    proc = workers(broker.address, "-o", "tokens_per_s=50", "-o", "tokens=100000",
                   "--drain-timeout", "0.3")
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req())
    broker.expect(lambda r: r.route == b"c" + key)
    proc.signal(signal.SIGTERM)
    chunks, end = broker.collect(key)
    assert isinstance(end, Error) and end.code == ErrorCode.WORKER_LOST
    assert end.chunks_sent == 1 + len(chunks) and not end.retryable
    broker.expect(Goodbye)
    assert proc.wait(10) == 0


def test_second_signal_stops_waiting(broker: FakeBroker, workers: StartWorker) -> None:
    proc = workers(broker.address, "-o", "tokens_per_s=50", "-o", "tokens=100000",
                   "--drain-timeout", "60")
    broker.expect(is_ready_ok)
    key = broker.dispatch(b"w1", req())
    broker.expect(lambda r: r.route == b"c" + key)
    proc.signal(signal.SIGTERM)
    broker.expect(heartbeat(lambda hb: hb.detail == "draining"))
    proc.signal(signal.SIGINT)
    _, end = broker.collect(key)
    assert isinstance(end, Error) and end.code == ErrorCode.WORKER_LOST
    assert proc.wait(10) == 0


def test_load_failure_without_a_broker_still_exits_3(ipc_dir: Path, workers: StartWorker) -> None:
    proc = workers(f"ipc://{ipc_dir}/nobody.sock", "-o", "embedding_dim=0")
    assert proc.wait(15) == 3
    msgs = [r.get("msg") for r in proc.log_records()]
    assert "model load failed" in msgs and "no broker to say goodbye to" in msgs


def test_model_load_failure_says_goodbye_and_exits_3(
    broker: FakeBroker, workers: StartWorker
) -> None:
    proc = workers(broker.address, "-o", "tokens_per_s=-1")
    bye = broker.expect(Goodbye).msg
    assert isinstance(bye, Goodbye) and bye.code == ErrorCode.MODEL_LOAD_FAILED
    assert "tokens_per_s" in bye.reason
    assert proc.wait(10) == 3
    assert any(r.get("msg") == "model load failed" for r in proc.log_records())


# -- command line ----------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenhive.workers", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("args", "named"), [
    (["--backend", "echo", "--model", "m", "--option", "no_such_key=1"], "no_such_key"),
    (["--backend", "echo", "--model", "m", "--option", "tokens=abc"], "tokens"),
    (["--backend", "echo", "--model", "m", "--option", "oops"], "KEY=VALUE"),
    (["--backend", "echo", "--model", "m", "--slots", "0"], "slots"),
    (["--backend", "nope", "--model", "m"], "nope"),
    (["--backend", "echo", "--model", "m", "--broker", "localhost:5555"], "--broker"),
    (["--model", "m"], "--backend"),
    (["--backend", "echo"], "--model"),
    (["--spec-json", '{"backend": "echo", "model": "m", "colour": "red"}'], "colour"),
    (["--spec-json", "{not json"], "--spec-json"),
])
def test_bad_command_lines_exit_2_naming_the_problem(args: list[str], named: str) -> None:
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr


def test_spec_json_configures_the_worker(broker: FakeBroker, ipc_dir: Path) -> None:
    spec = '{"backend": "echo", "model": "m2", "slots": 3, "id": "js", "text": "from json"}'
    proc = WorkerProc(["--broker", broker.address, "--spec-json", spec, "-o", "tokens=3",
                       "--heartbeat-interval", "0.1"], ipc_dir / "json.log")
    try:
        ready = broker.expect(is_ready_ok).msg
        assert isinstance(ready, Ready)
        assert (ready.worker, ready.model, ready.slots) == ("js", "m2", 3)
        chunks, final = broker.collect(broker.dispatch(b"js", req(model="m2")))
        assert "".join(c.text for c in chunks) == "from jsonfrom"
        assert isinstance(final, Final) and final.chunks == 3
        assert all(isinstance(c, Chunk) for c in chunks)
    finally:
        proc.stop()


# -- a real threaded backend: llama.cpp on a tiny GGUF ------------------------------------------


def gguf_worker(broker: FakeBroker, ipc_dir: Path, path: Path) -> WorkerProc:
    return WorkerProc(["--broker", broker.address, "--backend", "gguf", "--model", "tiny",
                       "--id", "g1", "--slots", "2", "-o", f"path={path}",
                       "--heartbeat-interval", "0.05", "--heartbeat-liveness", "20"],
                      ipc_dir / "gguf.log")


def test_gguf_missing_model_file_exits_3(broker: FakeBroker, ipc_dir: Path) -> None:
    pytest.importorskip("llama_cpp")
    proc = gguf_worker(broker, ipc_dir, ipc_dir / "missing.gguf")
    try:
        bye = broker.expect(Goodbye, timeout=60).msg
        assert isinstance(bye, Goodbye) and bye.code == ErrorCode.MODEL_LOAD_FAILED
        assert "missing.gguf" in bye.reason
        assert proc.wait(30) == 3
    finally:
        proc.stop()


@pytest.mark.timeout(120)
def test_gguf_streams_through_the_runtime_with_heartbeats(
    broker: FakeBroker, ipc_dir: Path
) -> None:
    pytest.importorskip("llama_cpp")
    from tests.support.tiny_gguf import write_tiny_llama

    proc = gguf_worker(broker, ipc_dir, write_tiny_llama(ipc_dir / "tiny.gguf"))
    try:
        ready = broker.expect(is_ready_ok, timeout=60).msg
        assert isinstance(ready, Ready) and (ready.backend, ready.slots) == ("gguf", 2)
        request = req(model="tiny", kind=Kind.COMPLETION, prompt="hello world",
                      sampling=Sampling(max_tokens=16, temperature=0.0))
        key = broker.dispatch(b"g1", request)
        chunks, final = broker.collect(key, timeout=60)
        assert isinstance(final, Final) and final.chunks == len(chunks) > 0
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert sum(c.tokens for c in chunks) == final.usage.completion_tokens == 16
        assert final.finish_reason == "length" and final.worker == "g1"
        # The engine computes in its own thread: heartbeats keep coming while it does.
        routes = [r.route for r in broker.seen]
        first, last = routes.index(b"c" + key), routes.index(b"e" + key)
        streamed_s = (final.timings.total_ms - final.timings.ttft_ms) / 1000
        beats = sum(isinstance(r.msg, Heartbeat) for r in broker.seen[first:last])
        assert beats >= int(streamed_s / 0.05) // 3, (beats, streamed_s)
    finally:
        proc.stop()
