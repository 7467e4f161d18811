"""The whole pool end to end: a real broker, real echo workers and real clients, each its
own OS process, on real ipc and tcp sockets. These are the issue's "must show" scenarios."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
import zmq

from tests.support.procs import Proc, ipc_address, start_broker
from tests.support.worker_peers import WorkerProc, start_worker
from tokenhive.clients import NO_RETRY, AsyncClient
from tokenhive.schemas import frames
from tokenhive.schemas import messages as m
from tokenhive.schemas.errors import Overloaded, WorkerLost
from tokenhive.schemas.messages import StatusReply

T = TypeVar("T")
SCRIPT = "the quick brown fox jumps over the lazy dog "


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


async def wait_status(client: AsyncClient, ok: Callable[[StatusReply], bool],
                      within: float = 20.0) -> StatusReply:
    """Poll the broker's status until ``ok`` holds (deadline ``within`` seconds)."""
    deadline = time.monotonic() + within
    status: StatusReply | None = None
    while time.monotonic() < deadline:
        try:
            status = await client.status(timeout=2.0)
        except Exception:  # broker restarting: keep polling until the deadline
            status = None
        if status is not None and ok(status):
            return status
        await asyncio.sleep(0.05)  # polling interval, not synchronisation
    raise TimeoutError(f"condition not met within {within}s; last status: {status}")


def healthy(n: int) -> Callable[[StatusReply], bool]:
    return lambda s: sum(w.health == "ok" for w in s.workers) >= n


def stop_all(workers: list[WorkerProc], broker: Proc | None) -> None:
    for w in workers:
        w.stop()
    if broker is not None and broker.alive():
        broker.terminate()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_thousand_concurrent_streams_across_four_workers(tmp_path: Path, transport: str) -> None:
    """1,000 streamed requests at once over 4 workers: every one complete, in order."""
    workers_addr = ipc_address(tmp_path, "w") if transport == "ipc" else "tcp://127.0.0.1:0"
    broker = start_broker(tmp_path, workers=workers_addr, heartbeat_interval=0.5)
    workers = [
        start_worker(broker.workers, tmp_path, "--option", f"text={SCRIPT!r}".replace("'", '"'),
                     "--option", "tokens=12", worker_id=f"w{i}", slots=64)
        for i in range(4)
    ]
    # the echo backend's tokens: each word with its leading space, then the trailing space
    expected = "the quick brown fox jumps over the lazy dog the quick"
    try:
        async def one(client: AsyncClient, i: int) -> tuple[str, list[int], str]:
            seqs: list[int] = []
            text = []
            stream = client.stream(prompt=f"p{i}", request_id=f"r{i}", timeout=120)
            async for chunk in stream:
                seqs.append(chunk.seq)
                text.append(chunk.text)
            return "".join(text), seqs, stream.result.worker

        async def main() -> None:
            async with AsyncClient(broker.clients, model="echo", retry=NO_RETRY) as client:
                await wait_status(client, healthy(4))
                results = await asyncio.gather(*(one(client, i) for i in range(1000)))
                for text, seqs, _ in results:
                    assert text == expected
                    assert seqs == list(range(len(seqs))) and len(seqs) == 12
                used = {w for _, _, w in results}
                assert used == {"w0", "w1", "w2", "w3"}, used
                status = await client.status()
                assert status.in_flight == 0 and sum(status.queues.values()) == 0
                assert all(w.free_slots == w.slots for w in status.workers)

        run(main())
    finally:
        stop_all(workers, broker)


@pytest.mark.timeout(90)
def test_kill9_worker_mid_stream(tmp_path: Path) -> None:
    """Streams on a SIGKILLed worker end in worker_lost (with their chunk count); queued
    work goes to the surviving worker; nothing hangs."""
    broker = start_broker(tmp_path, heartbeat_interval=0.2, heartbeat_liveness=3)
    slow = ("--option", "tokens_per_s=50")
    doomed = start_worker(broker.workers, tmp_path, *slow, "--option", "tokens=150",
                          worker_id="doomed", slots=2)
    survivor = start_worker(broker.workers, tmp_path, *slow, "--option", "tokens=20",
                            worker_id="survivor", slots=1)
    try:
        async def drain(stream: Any) -> str:
            """'lost' if the stream ended in worker_lost (after streaming), else its worker."""
            try:
                async for _ in stream:
                    pass
            except WorkerLost as exc:
                assert exc.chunks_sent >= 1 and not exc.retryable
                return "lost"
            return str(stream.result.worker)

        async def main() -> None:
            async with AsyncClient(broker.clients, model="echo", retry=NO_RETRY) as client:
                await wait_status(client, healthy(2))
                # 3 streams fill all 3 slots (2 on the doomed worker, 1 on the survivor) ...
                streams = [client.stream(prompt=f"long {i}", timeout=60) for i in range(3)]
                ends = [asyncio.ensure_future(drain(s)) for s in streams]
                await wait_status(client, lambda s: s.in_flight == 3, within=10)
                # ... so these wait in the broker's queue.
                queued = [asyncio.ensure_future(client.complete(f"q{i}", timeout=60))
                          for i in range(6)]
                await wait_status(client, lambda s: s.queues.get("echo", 0) >= 5, within=10)
                os.kill(doomed.pid, signal.SIGKILL)

                outcomes = await asyncio.wait_for(asyncio.gather(*ends), 30)
                assert sorted(outcomes) == ["lost", "lost", "survivor"], outcomes
                results = await asyncio.wait_for(asyncio.gather(*queued), 60)
                assert [r.worker for r in results] == ["survivor"] * 6
                status = await wait_status(client, lambda s: len(s.workers) == 1, within=10)
                assert status.workers[0].id == "survivor"
                assert status.in_flight == 0

        run(main())
    finally:
        stop_all([doomed, survivor], broker)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(90)
def test_broker_restart_workers_reregister(tmp_path: Path) -> None:
    clients = f"tcp://127.0.0.1:{_free_port()}"
    workers_addr = ipc_address(tmp_path, "w")
    broker: Proc | None = start_broker(tmp_path, clients=clients, workers=workers_addr,
                                       heartbeat_interval=0.2)
    assert broker is not None
    workers = [start_worker(workers_addr, tmp_path, "--option", "tokens=4", worker_id=f"w{i}",
                            liveness=3, interval=0.2) for i in range(2)]
    try:
        async def before() -> None:
            async with AsyncClient(clients, model="echo") as client:
                await wait_status(client, healthy(2))
                assert (await client.complete("hi", timeout=20)).finish_reason

        run(before())
        broker.kill()
        broker = start_broker(tmp_path, clients=clients, workers=workers_addr,
                              heartbeat_interval=0.2)

        async def after() -> None:
            async with AsyncClient(clients, model="echo") as client:
                await wait_status(client, healthy(2), within=30)
                results = await asyncio.gather(
                    *(client.complete(f"x{i}", timeout=20) for i in range(20)))
                assert {r.worker for r in results} <= {"w0", "w1"}
                assert all(r.usage.completion_tokens == 4 for r in results)

        run(after())
    finally:
        stop_all(workers, broker)


CLIENT_SCRIPT = """
import sys, uvloop
from tokenhive.clients import AsyncClient
async def main():
    async with AsyncClient(sys.argv[1], model="echo", heartbeat_interval=0.2) as c:
        async for chunk in c.stream(prompt="go"):
            print(chunk.seq, flush=True)
uvloop.run(main())
"""


@pytest.mark.timeout(60)
def test_client_killed_mid_stream_frees_the_slot(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, heartbeat_interval=0.2, client_liveness=1.0)
    worker = start_worker(broker.workers, tmp_path, "--option", "tokens_per_s=20",
                          "--option", "tokens=2000", worker_id="w0", slots=1)
    client_proc = None
    try:
        async def ready() -> None:
            async with AsyncClient(broker.clients) as client:
                await wait_status(client, healthy(1))

        run(ready())
        client_proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, broker.clients],
                                       stdout=subprocess.PIPE,
                                       stderr=(tmp_path / "client.err").open("wb"))
        assert client_proc.stdout is not None
        for _ in range(3):  # wait until it is really streaming
            assert client_proc.stdout.readline().strip().isdigit()

        async def main() -> None:
            async with AsyncClient(broker.clients, model="echo") as client:
                busy = await client.status()
                assert busy.workers[0].free_slots == 0
                client_proc.kill()  # type: ignore[union-attr]
                freed = await wait_status(client, lambda s: s.workers[0].free_slots == 1,
                                          within=15)
                assert freed.in_flight == 0
                assert freed.counters.get("cancelled", 0) >= 1
                # the freed slot serves the next request
                assert (await client.complete("next", timeout=10, max_tokens=3)).usage

        run(main())
    finally:
        if client_proc is not None and client_proc.poll() is None:
            client_proc.kill()
        stop_all([worker], broker)


@pytest.mark.timeout(60)
def test_queue_overflow_is_an_immediate_overloaded(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, heartbeat_interval=0.2, queue_size=2, retry_after=0.5)
    worker = start_worker(broker.workers, tmp_path, "--option", "tokens_per_s=10",
                          "--option", "tokens=100", worker_id="w0", slots=1)
    try:
        async def main() -> None:
            async with AsyncClient(broker.clients, model="echo", retry=NO_RETRY) as client:
                await wait_status(client, healthy(1))
                busy = [asyncio.ensure_future(client.complete(f"b{i}", timeout=30))
                        for i in range(3)]  # 1 in flight + 2 queued = full
                await wait_status(client, lambda s: s.queues.get("echo", 0) == 2, within=10)
                t0 = time.monotonic()
                with pytest.raises(Overloaded) as info:
                    await client.complete("one too many", timeout=30)
                assert time.monotonic() - t0 < 1.0
                assert info.value.retry_after == 0.5 and info.value.retryable
                for f in busy:
                    f.cancel()
                await asyncio.gather(*busy, return_exceptions=True)

        run(main())
    finally:
        stop_all([worker], broker)


@pytest.mark.timeout(60)
def test_garbage_on_both_sockets_is_counted_and_serving_goes_on(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, heartbeat_interval=0.2)
    worker = start_worker(broker.workers, tmp_path, "--option", "tokens=3", worker_id="w0")
    ctx = zmq.Context.instance()
    try:
        for address in (broker.clients, broker.workers):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 5000)  # close() flushes what we queued
            sock.connect(address)
            sock.send_multipart([b"garbage"])
            sock.send_multipart([b"TH\x63", frames.encode(m.Ping())])  # protocol v99
            sock.send_multipart([frames.VERSION_FRAME, b"\xc1\xc1\xc1"])  # invalid msgpack
            assert sock.poll(5000), "a wrong-version peer must be told, not ignored"
            reply = sock.recv_multipart()
            assert reply[0] == frames.VERSION_FRAME
            if address == broker.clients:
                err = frames.broker_to_client_decoder.decode(reply[-1])
                assert isinstance(err, m.Error) and err.code == "protocol_version"
            else:
                rej = frames.broker_to_worker_decoder.decode(reply[-1])
                assert isinstance(rej, m.Rejected) and rej.code == "protocol_version"
            sock.close()

        async def main() -> None:
            async with AsyncClient(broker.clients, model="echo") as client:
                status = await wait_status(
                    client, lambda s: s.counters.get("bad_frames", 0) >= 4
                    and s.counters.get("wrong_version", 0) >= 2 and healthy(1)(s))
                assert status.workers[0].id == "w0"
                result = await client.complete("still serving", timeout=10)
                assert result.usage.completion_tokens == 3

        run(main())
    finally:
        stop_all([worker], broker)
