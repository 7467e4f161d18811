"""A model whose workers keep crashing before they are ready fails fast, with the reason.

Real processes: a broker and two echo workers under the pool supervisor. The "bad" worker is
made to die the way a llama.cpp built for missing CPU features does, by a real SIGILL at the
end of loading. The fault is injected with a ``sitecustomize`` module on that worker's
PYTHONPATH (the test cannot conjure a CPU without an instruction); everything else is the
production code path: the supervisor names the signal and gives up after 3 runs, tells the
broker, and the broker fails the queued request and every new one at once with the reason.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tokenhive.clients import NO_RETRY, AsyncClient
from tokenhive.clients.pool.pool import PoolProcesses
from tokenhive.clients.pool.supervisor import State
from tokenhive.schemas.config import BrokerConfig, EchoSpec, PoolConfig
from tokenhive.schemas.errors import ModelFailed

CRASH_AFTER_LOAD = '''
import os, signal
from tokenhive.workers.backends import echo

_start = echo.EchoBackend.start

async def start(self):
    await _start(self)  # loads (health "loading" at the broker meanwhile), then dies
    os.kill(os.getpid(), signal.SIGILL)

echo.EchoBackend.start = start
'''


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_crashing_model_fails_queued_and_new_requests_with_the_reason(tmp_path: Path) -> None:
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    (crash_dir / "sitecustomize.py").write_text(CRASH_AFTER_LOAD)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    no_worker_timeout = 60.0  # what a queued request would otherwise wait
    config = PoolConfig(
        broker=BrokerConfig(clients=f"ipc://{run_dir}/c.sock", workers=f"ipc://{run_dir}/w.sock",
                            no_worker_timeout=no_worker_timeout),
        workers=[
            EchoSpec(model="good", text="fine"),
            EchoSpec(model="bad", text="never", load_seconds=0.5,
                     env={"PYTHONPATH": str(crash_dir)}),
        ],
    )

    async def main() -> None:
        pool = PoolProcesses(config, run_dir=run_dir, log_level="warning", backoff_base=0.2)
        endpoints = await pool.start()
        try:
            async with AsyncClient(endpoints.clients, retry=NO_RETRY) as client:
                # wait until the bad worker is registered (loading), so a request for it queues
                deadline = time.monotonic() + 30
                while not any(w.model == "bad" for w in (await client.status()).workers):
                    assert time.monotonic() < deadline, "the bad worker never registered"
                    await asyncio.sleep(0.05)  # polling a status, not synchronising on time
                started = time.monotonic()
                with pytest.raises(ModelFailed) as queued:
                    await client.complete("hello", model="bad", timeout=no_worker_timeout * 2)
                waited = time.monotonic() - started
                assert "SIGILL (illegal instruction)" in queued.value.message
                assert "3 times in a row" in queued.value.message
                assert waited < no_worker_timeout / 2, waited
                (bad,) = [r for s, r in pool.workers if s.model == "bad"]
                assert bad.state is State.GAVE_UP and bad.starts == 3

                started = time.monotonic()
                with pytest.raises(ModelFailed, match="SIGILL"):
                    await client.complete("again", model="bad")
                assert time.monotonic() - started < 2.0  # refused on arrival
                # the rest of the pool serves on
                assert (await client.complete("hi", model="good")).text == "fine"
        finally:
            await pool.stop(drain=2.0)

    asyncio.run(main())
