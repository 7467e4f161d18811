"""A pool that lives for the length of one command (``chat``, ``generate``, ``batch``
without ``--broker``): broker and workers as subprocesses on private ipc sockets in a
temporary directory, stopped and removed when the command ends, however it ends."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.pool.pool import PoolProcesses
from tokenhive.schemas.config import PoolConfig


@dataclass(frozen=True)
class LocalPool:
    address: str  # where clients connect
    models: list[str]  # served model names, in config order
    run_dir: Path  # the private directory of its sockets and ready files
    processes: PoolProcesses  # broker and workers, for a last-resort stop (public.Pool)


@asynccontextmanager
async def local_pool(
    config: PoolConfig, *, log_level: str = "warning", ready_timeout: float = 120.0
) -> AsyncIterator[LocalPool]:
    with tempfile.TemporaryDirectory(prefix="tokenhive-") as run_dir:
        broker = msgspec.structs.replace(
            config.broker, clients=f"ipc://{run_dir}/clients.sock",
            workers=f"ipc://{run_dir}/workers.sock",
        )
        processes = PoolProcesses(
            msgspec.structs.replace(config, broker=broker), run_dir=Path(run_dir),
            log_level=log_level,
        )
        try:
            endpoints = await processes.start()
            async with AsyncClient(endpoints.clients, curve=processes.client_curve) as probe:
                await processes.wait_workers(probe, ready_timeout)
            models = list(dict.fromkeys(spec.model for spec in config.workers))
            yield LocalPool(address=endpoints.clients, models=models, run_dir=Path(run_dir),
                            processes=processes)
        finally:
            await processes.stop(drain=5.0)
