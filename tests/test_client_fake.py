"""AsyncClient against a fake broker (tests/support/client_peers.py): typed errors, retries,
demultiplexing — with scripted answers a real broker cannot be made to give on demand."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.support.client_peers import (
    LOOPS,
    FakeBroker,
    ipc,
    reply_text,
    run,
    send_answer,
    send_error,
    wait_fake,
)
from tokenhive.clients import AsyncClient, RetryPolicy
from tokenhive.schemas.errors import (
    ContextTooLong,
    ErrorCode,
    InvalidRequest,
    Overloaded,
    TokenHiveError,
    UnknownModel,
    WorkerLost,
)
from tokenhive.schemas.messages import (
    Chunk,
    Request,
    StatusReply,
    Submit,
    WorkerStatus,
)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("loop", LOOPS)
def test_chat_and_stream_collect_chunks_and_final(tmp_path: Path, loop: str) -> None:
    with FakeBroker(ipc(tmp_path), reply_text(["Hel", "lo", "!"], worker="w-1")) as fake:

        async def main() -> None:
            async with AsyncClient(fake.address, model="m") as client:
                result = await client.chat("hi", max_tokens=5, temperature=0.0)
                assert (result.text, result.chunks, result.worker) == ("Hello!", 3, "w-1")
                assert result.finish_reason == "stop" and result.usage.completion_tokens == 3
                assert result.attempts == 1 and result.timings.total_ms == 3.0
                stream = client.stream(prompt="p", request_id="mine-1")
                texts = [chunk.text async for chunk in stream]
                assert texts == ["Hel", "lo", "!"]
                assert stream.result.text == "Hello!" and stream.result.id == "mine-1"
                assert client.in_flight == 0 and client.stats.sockets == 1

        run(main(), loop)
        chat, completion = fake.submits
        assert chat.kind == "chat" and chat.messages[0].content == "hi" and not chat.stream
        assert chat.sampling.max_tokens == 5 and chat.sampling.temperature == 0.0
        assert completion.kind == "completion" and completion.prompt == "p" and completion.stream
        assert completion.id == "mine-1" and len(chat.id) == 32


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("code", "exc_type"),
    [
        (ErrorCode.UNKNOWN_MODEL, UnknownModel),
        (ErrorCode.CONTEXT_TOO_LONG, ContextTooLong),
        (ErrorCode.INVALID_REQUEST, InvalidRequest),
    ],
)
def test_error_codes_raise_typed_exceptions_without_retry(
    tmp_path: Path, code: ErrorCode, exc_type: type[TokenHiveError]
) -> None:
    def script(fake: FakeBroker, identity: bytes, request: Request) -> None:
        send_error(fake, identity, request.id, code)

    with FakeBroker(ipc(tmp_path), script) as fake:

        async def main() -> None:
            async with AsyncClient(fake.address, model="m") as client:
                with pytest.raises(exc_type) as info:
                    await client.chat("hi", request_id="r1")
                assert type(info.value) is exc_type and info.value.request_id == "r1"
                assert client.in_flight == 0

        run(main())
        assert len(fake.submits) == 1


@pytest.mark.timeout(20)
def test_retryable_error_is_retried_after_retry_after(tmp_path: Path) -> None:
    def script(fake: FakeBroker, identity: bytes, request: Request) -> None:
        if len(fake.submits) == 1:
            send_error(fake, identity, request.id, ErrorCode.OVERLOADED, retry_after=0.3)
        else:
            send_answer(fake, identity, request.id, ["ok"])

    with FakeBroker(ipc(tmp_path), script) as fake:

        async def main() -> float:
            async with AsyncClient(fake.address, model="m") as client:
                started = time.monotonic()
                result = await client.chat("hi", request_id="base")
                assert result.text == "ok" and result.attempts == 2 and result.id == "base.r2"
                return time.monotonic() - started

        elapsed = run(main())
        assert elapsed >= 0.3  # retry_after is a floor on the backoff
        assert [r.id for r in fake.submits] == ["base", "base.r2"]


@pytest.mark.timeout(20)
def test_retries_are_bounded(tmp_path: Path) -> None:
    def script(fake: FakeBroker, identity: bytes, request: Request) -> None:
        send_error(fake, identity, request.id, ErrorCode.OVERLOADED, retry_after=0.01)

    with FakeBroker(ipc(tmp_path), script) as fake:

        async def main() -> None:
            policy = RetryPolicy(max_attempts=3, backoff_base=0.01)
            async with AsyncClient(fake.address, model="m", retry=policy) as client:
                with pytest.raises(Overloaded):
                    await client.chat("hi")

        run(main())
        assert len(fake.submits) == 3


@pytest.mark.timeout(20)
def test_no_retry_once_a_chunk_was_streamed(tmp_path: Path) -> None:
    def script(fake: FakeBroker, identity: bytes, request: Request) -> None:
        fake.send(identity, Chunk(id=request.id, seq=0, text="partial"))
        send_error(fake, identity, request.id, ErrorCode.WORKER_LOST, chunks_sent=1)

    with FakeBroker(ipc(tmp_path), script) as fake:

        async def main() -> list[str]:
            seen: list[str] = []
            async with AsyncClient(fake.address, model="m") as client:
                with pytest.raises(WorkerLost) as info:
                    async for chunk in client.stream("hi"):
                        seen.append(chunk.text)
                assert info.value.chunks_sent == 1
            return seen

        assert run(main()) == ["partial"]
        assert len(fake.submits) == 1


@pytest.mark.timeout(20)
def test_unknown_ids_and_bad_frames_are_ignored_and_counted(tmp_path: Path) -> None:
    def script(fake: FakeBroker, identity: bytes, request: Request) -> None:
        fake.send(identity, Chunk(id="not-in-flight", seq=0, text="stray"))
        fake.send_raw(identity, [b"TH\x09", b"from the future"])
        fake.send_raw(identity, [b"TH\x01", b"\xc1garbage"])
        send_answer(fake, identity, request.id, ["real"])

    with FakeBroker(ipc(tmp_path), script) as fake:

        async def main() -> None:
            async with AsyncClient(fake.address, model="m") as client:
                assert (await client.chat("hi")).text == "real"
                assert client.stats.unknown_id == 1 and client.stats.bad_frames == 2

        run(main())


@pytest.mark.timeout(20)
def test_concurrent_requests_share_one_socket_and_are_demultiplexed(tmp_path: Path) -> None:
    def script(fake: FakeBroker, identity: bytes, request: Request) -> None:
        send_answer(fake, identity, request.id, [request.id[:4], request.id[4:]])

    with FakeBroker(ipc(tmp_path), script) as fake:

        async def main() -> None:
            async with AsyncClient(fake.address, model="m") as client:
                ids = [f"req-{i:03d}" for i in range(64)]
                results = await asyncio.gather(*(client.chat("x", request_id=i) for i in ids))
                assert [r.text for r in results] == ids
                assert client.stats.sockets == 1

        run(main())


@pytest.mark.timeout(20)
def test_status_returns_the_broker_reply(tmp_path: Path) -> None:
    reply = StatusReply(
        workers=[WorkerStatus(id="w0", model="m", backend="echo", health="ok", slots=2,
                              free_slots=1, in_flight=1)],
        queues={"m": 4}, in_flight=1, counters={"accepted": 9}, uptime_s=12.5,
    )
    with FakeBroker(ipc(tmp_path), status=reply) as fake:

        async def main() -> None:
            async with AsyncClient(fake.address) as client:
                assert await client.status() == reply

        run(main())


@pytest.mark.timeout(20)
def test_bad_input_raises_before_anything_is_sent(tmp_path: Path) -> None:
    with FakeBroker(ipc(tmp_path), reply_text(["x"])) as fake:

        async def main() -> None:
            async with AsyncClient(fake.address, model="m") as client:
                with pytest.raises(InvalidRequest, match="empty"):
                    await client.chat([])
                with pytest.raises(InvalidRequest, match="role"):
                    await client.chat([{"role": "robot", "content": "x"}])
                with pytest.raises(InvalidRequest, match="max_tokens"):
                    await client.chat("x", max_tokens=0)
                with pytest.raises(InvalidRequest, match="exactly one"):
                    client.stream()
            async with AsyncClient(fake.address) as no_model:
                with pytest.raises(InvalidRequest, match="model"):
                    await no_model.complete("x")

        run(main())
        assert fake.submits == []


@pytest.mark.timeout(20)
def test_a_request_id_already_in_flight_is_refused(tmp_path: Path) -> None:
    with FakeBroker(ipc(tmp_path)) as fake:

        async def main() -> None:
            async with AsyncClient(fake.address, model="m") as client:
                first = asyncio.create_task(client.chat("a", request_id="dup"))
                await wait_fake(fake, lambda m: isinstance(m, Submit))
                with pytest.raises(InvalidRequest, match="already in flight"):
                    await client.chat("b", request_id="dup")
                first.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await first

        run(main())
        assert len(fake.submits) == 1


@pytest.mark.timeout(10)
def test_a_malformed_broker_address_is_a_typed_error() -> None:
    async def main() -> None:
        async with AsyncClient("not-an-address", model="m") as client:
            with pytest.raises(InvalidRequest, match="not-an-address"):
                await client.chat("hi")
            assert client.in_flight == 0

    run(main())
