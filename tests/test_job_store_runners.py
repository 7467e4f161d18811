"""JobService on a real pool (broker + echo worker processes): two services with their own
PostgreSQL connections share one batch and run every line exactly once; a service stopped
mid-batch gives its lines back and another finishes the batch."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from tests.support.postgres import Postgres
from tests.support.procs import start_broker
from tests.support.worker_peers import start_worker
from tests.test_batch import wait_models
from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.batch.input_file import split_input
from tokenhive.clients.batch.job_service import JobService
from tokenhive.clients.batch.objects import BatchObject
from tokenhive.clients.batch.service import running
from tokenhive.clients.batch.store import JobStore, open_store

pytestmark = pytest.mark.anyio
ENDPOINT = "/v1/chat/completions"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"



@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One echo worker of model m, 4 slots at 100 tokens/s: a line takes ~40 ms."""
    logs = tmp_path_factory.mktemp("pool")
    proc = start_broker(logs, heartbeat_interval=0.2)
    worker = start_worker(proc.workers, logs, "--option", "tokens_per_s=100", model="m",
                          worker_id="m0", slots=4)
    try:
        wait_models(proc.clients, {"m"})
        yield proc.clients
    finally:
        worker.stop()
        proc.terminate()


def chat_line(cid: str, **body: object) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": {
        "model": "m", "messages": [{"role": "user", "content": f"{cid} a b c"}], **body}})


async def submit(store: JobStore, lines: list[str]) -> str:
    content = "\n".join(lines).encode()
    file = await store.create_file(purpose="batch", filename="in.jsonl", content=content)
    parsed, errors = split_input(content, ENDPOINT, max_lines=1000)
    assert errors is None
    batch = await store.create_batch(input_file_id=file.id, endpoint=ENDPOINT,
                                     completion_window="24h", metadata=None, lines=parsed,
                                     errors=None)
    return batch.id


async def wait_batch(store: JobStore, batch_id: str, status: str, within: float = 60
                     ) -> BatchObject:
    deadline = time.monotonic() + within
    while True:
        batch = await store.get_batch(batch_id)
        assert batch is not None
        if batch.status == status:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        await asyncio.sleep(0.05)  # polling interval


async def output_lines(store: JobStore, file_id: str | None) -> list[dict[str, object]]:
    if file_id is None:
        return []
    content = await store.file_content(file_id)
    assert content is not None
    return [json.loads(line) for line in content.decode().splitlines()]


class Runner:
    """A server's worth of batch machinery: its own store connection, client and service."""

    def __init__(self, store: JobStore, service: JobService) -> None:
        self.store, self.service = store, service


async def start_runner(stack: AsyncExitStack, url: str | None, data_dir: Path, broker: str,
                       concurrency: int = 3) -> Runner:
    store = await open_store(data_dir=data_dir, url=url)
    stack.push_async_callback(store.aclose)
    client = await stack.enter_async_context(AsyncClient(broker))
    service = JobService(store, client, concurrency=concurrency, lease_s=30, poll_s=0.05)
    await stack.enter_async_context(running(service))
    return Runner(store, service)


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exits:
        yield exits


@pytest.mark.timeout(120)
async def test_two_services_on_one_postgres_run_each_line_exactly_once(
    postgres: Postgres, broker: str, tmp_path: Path, stack: AsyncExitStack
) -> None:
    url = postgres.new_database()
    first = await start_runner(stack, url, tmp_path / "a", broker)
    second = await start_runner(stack, url, tmp_path / "b", broker)
    lines = [chat_line(f"c{i}") for i in range(40)] + [chat_line("bad", n=3)]
    batch_id = await submit(first.store, lines)

    batch = await wait_batch(second.store, batch_id, "completed")
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (41, 40, 1)
    good = await output_lines(second.store, batch.output_file_id)
    assert sorted(str(line["custom_id"]) for line in good) == sorted(f"c{i}" for i in range(40))
    assert all(json.dumps(line).count(f"{line['custom_id']} a b c") == 1 for line in good)
    (bad,) = await output_lines(first.store, batch.error_file_id)
    assert bad["custom_id"] == "bad" and "body.n: n=3 is not supported" in str(bad["error"])
    # every line ran once in all: the two engines' results add up to the batch, no more
    ran = [r.service.succeeded for r in (first, second)]
    assert sum(ran) == 40 and min(ran) > 0, ran


# above the sum of the two 60 s deadlines inside, so a slow run fails with their message
@pytest.mark.timeout(180)
@pytest.mark.parametrize("shared", [False, True], ids=["sqlite", "postgres"])
async def test_a_stopped_service_gives_its_lines_back_and_the_next_one_finishes(
    shared: bool, request: pytest.FixtureRequest, broker: str, tmp_path: Path
) -> None:
    url = request.getfixturevalue("postgres").new_database() if shared else None
    async with AsyncExitStack() as first_stack:
        first = await start_runner(first_stack, url, tmp_path / "data", broker, concurrency=2)
        batch_id = await submit(first.store, [chat_line(f"c{i}") for i in range(30)])
        deadline = time.monotonic() + 60
        while (b := await first.store.get_batch(batch_id)) and b.request_counts.completed < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)  # polling interval
    # the first service is stopped: its in-flight lines were cancelled and given back
    async with AsyncExitStack() as second_stack:
        second = await start_runner(second_stack, url, tmp_path / "data", broker)
        batch = await wait_batch(second.store, batch_id, "completed")
        assert batch.request_counts.completed == 30
        good = await output_lines(second.store, batch.output_file_id)
        assert sorted(str(line["custom_id"]) for line in good) == sorted(
            f"c{i}" for i in range(30))
        ran = first.service.succeeded + second.service.succeeded
        assert ran == 30  # none ran twice to completion
