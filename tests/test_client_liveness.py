"""AsyncClient liveness against a fake broker: a broker that hangs, vanishes or never was;
cancellation and timeouts. The fake can go silent on demand, which a real broker cannot."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.client_peers import (
    LOOPS,
    FakeBroker,
    ipc,
    is_cancel_of,
    reply_text,
    run,
    send_answer,
    wait_fake,
)
from tokenhive.clients import NO_RETRY, AsyncClient, Client, RetryPolicy
from tokenhive.schemas.errors import (
    BrokerUnavailable,
    DeadlineExceeded,
)
from tokenhive.schemas.messages import (
    Chunk,
    Ping,
    Request,
    Submit,
)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_silent_broker_fails_in_flight_within_bound_then_client_reconnects(
    tmp_path: Path, transport: str
) -> None:
    address = ipc(tmp_path) if transport == "ipc" else "tcp://127.0.0.1:0"
    first = FakeBroker(address, reply_text(["a"])).start()
    address = first.address  # the tcp port actually bound, reused by the "restarted" broker

    async def main() -> None:
        client = AsyncClient(
            address, model="m", heartbeat_interval=0.1, broker_timeout=1.0, retry=NO_RETRY
        )
        async with client:
            assert (await client.chat("warm up")).text == "a"
            first.silent.set()  # the broker hangs: receives, answers nothing
            started = time.monotonic()
            pending = [asyncio.create_task(client.chat(f"q{i}")) for i in range(3)]
            results = await asyncio.gather(*pending, return_exceptions=True)
            elapsed = time.monotonic() - started
            assert all(isinstance(r, BrokerUnavailable) for r in results), results
            assert 0.9 <= elapsed < 3.0, elapsed  # broker_timeout, plus scheduling slack
            assert client.stats.broker_lost == 1 and client.in_flight == 0

            first.stop()  # ... and is restarted on the same address
            second = await asyncio.to_thread(FakeBroker(address, reply_text(["back"])).start)
            try:
                assert (await client.chat("again")).text == "back"
                assert client.stats.sockets == 2
            finally:
                second.stop()

    try:
        run(main())
    finally:
        first.stop()


@pytest.mark.timeout(20)
def test_no_broker_at_all_gives_broker_unavailable(tmp_path: Path) -> None:
    async def main() -> float:
        client = AsyncClient(
            ipc(tmp_path, "nobody"), model="m", heartbeat_interval=0.1, broker_timeout=0.5,
            retry=NO_RETRY,
        )
        async with client:
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await client.chat("hello?")
            with pytest.raises(BrokerUnavailable):
                await client.status()
            return time.monotonic() - started

    assert run(main()) < 3.0


@pytest.mark.timeout(20)
def test_broker_unavailable_is_retried_on_a_fresh_socket(tmp_path: Path) -> None:
    """The first broker never answers; by the retry, a live one holds the address."""
    address = ipc(tmp_path)
    dead = FakeBroker(address, answer_pings=False).start()
    dead.silent.set()

    async def main() -> None:
        policy = RetryPolicy(max_attempts=2, backoff_base=0.01)
        client = AsyncClient(
            address, model="m", heartbeat_interval=0.1, broker_timeout=0.8, retry=policy
        )
        async with client:
            task = asyncio.create_task(client.chat("hi", request_id="x"))
            await wait_fake(dead, lambda m: isinstance(m, Submit))
            await asyncio.to_thread(dead.stop)
            live = await asyncio.to_thread(FakeBroker(address, reply_text(["fine"])).start)
            try:
                result = await task
                assert result.text == "fine" and result.id == "x.r2" and result.attempts == 2
            finally:
                live.stop()

    try:
        run(main())
    finally:
        dead.stop()


@pytest.mark.timeout(20)
def test_dropped_connection_fails_in_flight_at_once(tmp_path: Path) -> None:
    """A broker that dies (connection closed) is noticed before broker_timeout runs out."""
    fake = FakeBroker(ipc(tmp_path)).start()  # holds every Submit

    async def main() -> float:
        client = AsyncClient(fake.address, model="m", broker_timeout=10.0, retry=NO_RETRY)
        async with client:
            task = asyncio.create_task(client.chat("hi"))
            await wait_fake(fake, lambda m: isinstance(m, Submit))
            started = time.monotonic()
            await asyncio.to_thread(fake.stop)
            with pytest.raises(BrokerUnavailable, match="lost"):
                await task
            return time.monotonic() - started

    try:
        assert run(main()) < 5.0
    finally:
        fake.stop()



@pytest.mark.timeout(20)
def test_pings_keep_a_slow_request_alive_past_broker_timeout(tmp_path: Path) -> None:
    with FakeBroker(ipc(tmp_path)) as fake:  # holds the Submit until the test answers it

        async def main() -> None:
            client = AsyncClient(
                fake.address, model="m", heartbeat_interval=0.1, broker_timeout=0.5
            )
            async with client:
                task = asyncio.create_task(client.chat("slow", request_id="p1"))
                submit = await wait_fake(fake, lambda m: isinstance(m, Submit))
                # 12 pings at 0.1 s: well past the 0.5 s broker_timeout, answered by Pongs
                await asyncio.to_thread(
                    fake.wait_for, lambda m: sum(isinstance(x, Ping) for x in fake.received) >= 12
                )
                assert not task.done()
                identity = fake.identity_of(submit)
                send_answer(fake, identity, "p1", ["late", " but fine"])
                assert (await task).text == "late but fine"
                assert client.stats.broker_lost == 0

        run(main())


@pytest.mark.timeout(20)
@pytest.mark.parametrize("loop", LOOPS)
def test_cancelling_the_task_sends_cancel(tmp_path: Path, loop: str) -> None:
    with FakeBroker(ipc(tmp_path)) as fake:  # never answers a Submit

        async def main() -> None:
            async with AsyncClient(fake.address, model="m") as client:
                task = asyncio.create_task(client.chat("long", request_id="c1"))
                await wait_fake(fake, lambda m: isinstance(m, Submit))
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await wait_fake(fake, is_cancel_of("c1"))
                assert client.in_flight == 0

        run(main(), loop)


@pytest.mark.timeout(20)
def test_leaving_a_stream_early_sends_cancel(tmp_path: Path) -> None:
    def script(fake: FakeBroker, identity: bytes, request: Request) -> None:
        fake.send(identity, Chunk(id=request.id, seq=0, text="first"))  # and then nothing

    with FakeBroker(ipc(tmp_path), script) as fake:

        async def main() -> None:
            async with AsyncClient(fake.address, model="m") as client:
                async with client.stream("go", request_id="s1") as stream:
                    async for chunk in stream:
                        assert chunk.text == "first"
                        break
                await wait_fake(fake, is_cancel_of("s1"))
                assert client.in_flight == 0

        run(main())


@pytest.mark.timeout(20)
def test_timeout_is_sent_to_broker_and_enforced_locally(tmp_path: Path) -> None:
    with FakeBroker(ipc(tmp_path)) as fake:  # answers pings, never the Submit

        async def main() -> float:
            async with AsyncClient(fake.address, model="m") as client:
                started = time.monotonic()
                with pytest.raises(DeadlineExceeded):
                    await client.chat("slow", timeout=0.5, request_id="t1")
                elapsed = time.monotonic() - started
                await wait_fake(fake, is_cancel_of("t1"))
                return elapsed

        elapsed = run(main())
        assert 0.5 <= elapsed < 2.0
        sent = fake.submits[0].timeout
        assert sent is not None and 0.3 < sent <= 0.5


@pytest.mark.timeout(20)
def test_ctrl_c_in_the_sync_client_cancels_at_the_broker(tmp_path: Path) -> None:
    """A real SIGINT while Client.chat blocks: KeyboardInterrupt for the caller, Cancel for
    the broker (the request is not left running)."""

    def interrupt(fake: FakeBroker, identity: bytes, request: Request) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the main thread waits

    with FakeBroker(ipc(tmp_path), interrupt) as fake, Client(fake.address, model="m") as client:
        with pytest.raises(KeyboardInterrupt):
            client.chat("long", request_id="k1")
        fake.wait_for(is_cancel_of("k1"))
        assert client.stats.unknown_id == 0
