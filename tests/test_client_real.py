"""AsyncClient and Client against the real broker and real echo workers (subprocesses)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from tests.support.procs import Proc, ipc_address, start_broker
from tests.support.worker_peers import WorkerProc, start_worker
from tokenhive.clients import AsyncClient, Client, RetryPolicy
from tokenhive.schemas.errors import (
    BrokerUnavailable,
    ContextTooLong,
    DeadlineExceeded,
    TokenHiveError,
    UnknownModel,
)
from tokenhive.schemas.messages import StatusReply

T = TypeVar("T")
SLOW = ("--option", "tokens_per_s=40", "--option", "tokens=400")  # 10 s of tokens


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


async def wait_workers(client: AsyncClient, n: int, within: float = 20.0) -> StatusReply:
    """Poll status until ``n`` healthy workers are registered (deadline: ``within`` s)."""
    deadline = time.monotonic() + within
    while True:
        try:
            status = await client.status(timeout=2.0)
        except BrokerUnavailable:
            status = None
        if status is not None and sum(w.health == "ok" for w in status.workers) >= n:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} workers not ready in {within}s: {status}")
        await asyncio.sleep(0.05)  # polling interval, not synchronisation


class Pool:
    def __init__(self, broker: Proc, workers: list[WorkerProc]) -> None:
        self.broker = broker
        self.workers = workers


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    broker = start_broker(tmp_path, heartbeat_interval=0.2)
    workers = [start_worker(broker.workers, tmp_path, worker_id=f"w{i}") for i in range(2)]
    try:
        yield Pool(broker, workers)
    finally:
        for w in workers:
            w.stop()
        broker.terminate()


@pytest.fixture
def slow_pool(tmp_path: Path) -> Iterator[Pool]:
    broker = start_broker(tmp_path, heartbeat_interval=0.2)
    worker = start_worker(broker.workers, tmp_path, *SLOW, worker_id="slow", slots=1)
    try:
        yield Pool(broker, [worker])
    finally:
        worker.stop()
        broker.terminate()


@pytest.mark.timeout(60)
def test_chat_complete_stream_embed_and_status(pool: Pool) -> None:
    async def main() -> None:
        async with AsyncClient(pool.broker.clients, model="echo") as client:
            status = await wait_workers(client, 2)
            assert sorted(w.id for w in status.workers) == ["w0", "w1"]
            chat = await client.chat("the quick brown fox", system="be terse")
            assert chat.text == "the quick brown fox" and chat.finish_reason == "stop"
            assert chat.worker in ("w0", "w1") and chat.usage.completion_tokens == 4
            cut = await client.complete("one two three four five", max_tokens=2)
            assert (cut.text, cut.finish_reason) == ("one two", "length")
            stream = client.stream(prompt="alpha beta gamma")
            pieces = [c.text async for c in stream]
            assert "".join(pieces) == "alpha beta gamma" and len(pieces) == stream.result.chunks
            emb = await client.embed(["a", "b c"])
            assert emb.embeddings is not None and len(emb.embeddings) == 2
            assert len(emb.embeddings[0]) == 8
            after = await client.status()
            assert after.counters["completed"] >= 4

    run(main())


@pytest.mark.timeout(60)
def test_many_concurrent_requests_over_one_socket(pool: Pool) -> None:
    async def main() -> None:
        async with AsyncClient(pool.broker.clients, model="echo") as client:
            await wait_workers(client, 2)
            prompts = [f"request number {i}" for i in range(300)]
            results = await asyncio.gather(*(client.complete(p) for p in prompts))
            assert [r.text for r in results] == prompts
            assert {r.worker for r in results} == {"w0", "w1"}  # balanced over both
            assert client.stats.sockets == 1 and client.stats.unknown_id == 0

    run(main())


@pytest.mark.timeout(60)
def test_typed_errors_from_real_broker_and_worker(pool: Pool) -> None:
    async def main() -> None:
        async with AsyncClient(pool.broker.clients, model="echo") as client:
            await wait_workers(client, 2)
            with pytest.raises(UnknownModel):
                await client.chat("hi", model="no-such-model")
            with pytest.raises(ContextTooLong):
                await client.chat("hi", metadata={"echo_fail": "context_too_long"})
            # rate_limited is retryable and nothing streamed: the client retries, after
            # the retry_after the worker sent
            started = time.monotonic()
            limited = {"echo_fail": "rate_limited", "echo_retry_after": "0.3"}
            with pytest.raises(TokenHiveError) as info:
                await client.chat("hi", metadata=limited)
            assert info.value.code.value == "rate_limited"
            assert time.monotonic() - started >= 0.6  # 3 attempts, >= 0.3 s apart

    run(main())


@pytest.mark.timeout(60)
def test_cancel_and_timeout_reach_the_worker(slow_pool: Pool) -> None:
    async def main() -> None:
        async with AsyncClient(slow_pool.broker.clients, model="echo") as client:
            await wait_workers(client, 1)
            async with client.stream(prompt="x") as stream:
                async for _ in stream:
                    break  # one chunk is enough: leaving cancels
            with pytest.raises(DeadlineExceeded):
                await client.complete("x", timeout=0.5)
            # the single slot is free again only if both requests were really stopped
            quick = await client.complete("x", max_tokens=3, timeout=10.0)
            assert quick.text == "xxx"
            status = await client.status()
            c = status.counters
            assert c["cancelled"] >= 1 and status.in_flight == 0, c
            # the timeout ended at the broker or at the worker: either way, it ended
            assert c["accepted"] == 3 == c["completed"] + c["failed"] + c["cancelled"], c

    run(main())


@pytest.mark.timeout(90)
def test_client_survives_a_broker_restart(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, heartbeat_interval=0.2)
    clients, workers_addr = broker.clients, broker.workers  # fixed: the restart reuses them
    worker = start_worker(workers_addr, tmp_path, *SLOW, worker_id="w0", slots=2)
    restarted: list[Proc] = []  # filled inside main(), stopped in finally even if it fails
    try:
        async def main() -> None:
            client = AsyncClient(clients, model="echo", broker_timeout=2.0,
                                 heartbeat_interval=0.2, retry=RetryPolicy(max_attempts=1))
            async with client:
                await wait_workers(client, 1)
                stream = client.stream(prompt="x")
                await stream.__anext__()  # streaming has begun
                started = time.monotonic()
                await asyncio.to_thread(broker.kill)
                with pytest.raises(BrokerUnavailable):
                    async for _ in stream:
                        pass
                assert time.monotonic() - started < 3.0  # within broker_timeout + slack
                restarted.append(await asyncio.to_thread(
                    start_broker, tmp_path, clients=clients, workers=workers_addr,
                    heartbeat_interval=0.2,
                ))
                await wait_workers(client, 1)  # the worker re-registered with the new broker
                result = await client.complete("back again", max_tokens=2)
                assert result.text == "back again" and client.stats.sockets >= 2

        run(main())
    finally:
        worker.stop()
        broker.kill()
        for proc in restarted:
            proc.terminate()


@pytest.mark.timeout(60)
def test_sync_client(pool: Pool) -> None:
    with Client(pool.broker.clients, model="echo") as client:
        deadline = time.monotonic() + 20
        while sum(w.health == "ok" for w in client.status().workers) < 2:
            assert time.monotonic() < deadline, "workers not ready"
            time.sleep(0.05)  # polling interval, not synchronisation
        assert client.chat("hello sync world").text == "hello sync world"
        stream = client.stream(prompt="a b c d")
        assert "".join(c.text for c in stream) == "a b c d"
        assert stream.result.finish_reason == "stop"
        with pytest.raises(UnknownModel):
            client.complete("x", model="nope")
        with client.stream(prompt="never read") as early:
            pass  # closing unread cancels it
        assert early.id


@pytest.mark.timeout(30)
def test_no_broker_address_listening(tmp_path: Path) -> None:
    async def main() -> None:
        client = AsyncClient(ipc_address(tmp_path, "none"), model="echo", broker_timeout=0.5,
                             heartbeat_interval=0.1, retry=RetryPolicy(max_attempts=2))
        async with client:
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await client.chat("anyone?")
            assert time.monotonic() - started < 3.0  # two attempts of 0.5 s + backoff

    run(main())
