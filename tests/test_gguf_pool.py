"""GGUF workers inside the real pool: broker, llama.cpp worker and client as separate
processes. Covers the path a user takes, and a worker killed while its model is loading."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.procs import start_broker
from tests.support.range_file_server import RangeFileServer
from tests.support.worker_peers import WorkerProc
from tests.test_pool_e2e import run, wait_status
from tokenhive.clients import NO_RETRY, AsyncClient
from tokenhive.schemas.errors import BackendUnavailable, ContextTooLong, WorkerLost


def gguf_worker(broker: str, tmp_path: Path, worker_id: str, **spec: object) -> WorkerProc:
    full = {"backend": "gguf", "model": "tiny", "n_ctx": 256, "n_threads": 1, **spec}
    args = ["--broker", broker, "--id", worker_id, "--heartbeat-interval", "0.2",
            "--spec-json", json.dumps(full), "--log-level", "debug"]
    return WorkerProc(args, tmp_path / f"{worker_id}.log")


@pytest.mark.timeout(90)
def test_gguf_worker_serves_chat_completion_and_refuses_overflow(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    broker = start_broker(tmp_path, heartbeat_interval=0.2)
    worker = gguf_worker(broker.workers, tmp_path, "g0", path=str(tiny_gguf), slots=2)
    try:
        async def main() -> None:
            async with AsyncClient(broker.clients, model="tiny", retry=NO_RETRY) as client:
                status = await wait_status(client, lambda s: any(
                    w.health == "ok" for w in s.workers), within=60)
                assert status.workers[0].backend == "gguf" and status.workers[0].slots == 2
                a, b = await asyncio.gather(
                    client.complete("hello world", max_tokens=12, temperature=0, timeout=30),
                    client.complete("hello world", max_tokens=12, temperature=0, timeout=30))
                assert a.text == b.text and a.usage.completion_tokens == 12
                assert a.finish_reason == "length" and a.usage.prompt_tokens > 0
                chat = await client.chat([{"role": "user", "content": "hi"}], max_tokens=5,
                                         timeout=30)
                assert chat.usage.completion_tokens <= 5 and chat.worker == "g0"
                with pytest.raises(ContextTooLong, match="256"):
                    await client.complete("x " * 200, max_tokens=200, timeout=30)
                # the refusal changed nothing else: the worker still serves
                after = await client.complete("hello world", max_tokens=12, temperature=0,
                                              timeout=30)
                assert after.text == a.text

        run(main())
    finally:
        worker.stop()
        broker.terminate()


@pytest.mark.timeout(120)
def test_worker_killed_while_loading(tmp_path: Path, tiny_gguf: Path) -> None:
    """A worker whose model is still downloading is `loading`: it gets no work. Killed
    there, its queued request fails in bounded time; a new worker resumes the download."""
    payload = tiny_gguf.read_bytes()
    cache = tmp_path / "cache"
    broker = start_broker(tmp_path, heartbeat_interval=0.2, no_worker_timeout=2.0)
    workers: list[WorkerProc] = []
    with RangeFileServer(payload, stall_first_after=len(payload) // 2) as server:
        try:
            workers.append(gguf_worker(broker.workers, tmp_path, "first", url=server.url,
                                       cache_dir=str(cache)))

            async def main() -> None:
                async with AsyncClient(broker.clients, model="tiny", retry=NO_RETRY) as client:
                    await wait_status(client, lambda s: [w.health for w in s.workers]
                                      == ["loading"], within=30)
                    queued = asyncio.ensure_future(client.complete("hi", timeout=60))
                    await wait_status(client, lambda s: s.queues.get("tiny") == 1, within=10)
                    os.kill(workers[0].pid, signal.SIGKILL)
                    t0 = time.monotonic()
                    with pytest.raises((WorkerLost, BackendUnavailable)) as info:
                        await queued
                    assert info.value.retryable
                    assert time.monotonic() - t0 < 15
                    server.release.set()
                    workers.append(gguf_worker(broker.workers, tmp_path, "second",
                                               url=server.url, cache_dir=str(cache)))
                    await wait_status(client, lambda s: [(w.id, w.health) for w in s.workers]
                                      == [("second", "ok")], within=60)
                    done = await client.complete("hi", max_tokens=3, timeout=30)
                    assert done.worker == "second" and done.usage.completion_tokens == 3

            run(main())
            resumed = server.range_headers[-1]
            assert resumed is not None and resumed.startswith("bytes=")
            assert int(resumed.removeprefix("bytes=").split("-")[0]) > 0
        finally:
            for w in workers:
                w.stop()
            broker.terminate()
