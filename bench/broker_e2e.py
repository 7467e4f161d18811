"""The broker end to end: a real echo worker and real client processes, all over ipc.

``local_pool`` starts ``tokenhive.broker`` and one ``tokenhive.workers`` echo worker (slots
for every stream; as fast as it can, one token per chunk). ``clients`` processes each open
an ``AsyncClient`` (uvloop) and, once all are connected, stream ``requests`` requests of
``tokens`` chunks, ``concurrency`` at a time. Throughput runs from the first send in any
client to the last answer in any (CLOCK_MONOTONIC is system-wide). The CPU each process
spent, per chunk and as cores busy, shows which one bounds the figure.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection

import msgspec
import uvloop

from bench.cpu import delta, descendants, snapshot
from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.pool.local import local_pool
from tokenhive.schemas.config import EchoSpec, PoolConfig

MODEL = "bench"


class ClientRun(msgspec.Struct):
    chunks: int
    requests: int
    first_send: float  # time.monotonic()
    last_end: float
    latencies: list[float]
    cpu: float  # this client's process CPU seconds during the run


class E2E(msgspec.Struct):
    chunks_per_s: float
    requests_per_s: float
    p50_ms: float
    cpu: dict[str, tuple[float, float]]  # process -> (µs per chunk, cores busy)


async def _stream_all(address: str, requests: int, concurrency: int, tokens: int,
                      start: mp.synchronize.Event, out: Connection) -> None:
    async with AsyncClient(address, model=MODEL, timeout=120.0) as client:
        await client.status()  # connected and answered before the start line
        out.send(b"ready")
        await asyncio.to_thread(start.wait)
        todo = iter(range(requests))
        latencies: list[float] = []
        chunks = 0

        async def lane() -> None:
            nonlocal chunks
            for _ in todo:
                t0 = time.monotonic()
                result = await client.stream(prompt="go", max_tokens=tokens).collect()
                latencies.append(time.monotonic() - t0)
                chunks += result.chunks
                assert result.usage.completion_tokens == tokens, result

        cpu0, first = time.process_time(), time.monotonic()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        run = ClientRun(chunks, requests, first, time.monotonic(), latencies,
                        time.process_time() - cpu0)
        out.send(msgspec.msgpack.encode(run))


def _client_main(address: str, requests: int, concurrency: int, tokens: int,
                 start: mp.synchronize.Event, out: Connection) -> None:
    uvloop.run(_stream_all(address, requests, concurrency, tokens, start, out))


async def _run(clients: int, concurrency: int, requests: int, tokens: int) -> E2E:
    spec = EchoSpec(model=MODEL, slots=clients * concurrency, tokens=1_000_000)
    ctx = mp.get_context("spawn")
    async with local_pool(PoolConfig(workers=[spec]), log_level="warning") as pool:
        roles = _roles(descendants())
        start = ctx.Event()
        pipes, procs = [], []
        for _ in range(clients):
            mine, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_client_main, args=(pool.address, requests, concurrency,
                                                          tokens, start, theirs))
            proc.start()
            theirs.close()  # a client that dies closes the pipe: recv raises, not hangs
            pipes.append(mine)
            procs.append(proc)
        try:
            for pipe in pipes:
                await asyncio.to_thread(pipe.recv)  # "ready"
            before = snapshot(list(roles))
            t0 = time.monotonic()
            start.set()
            runs = [msgspec.msgpack.decode(await asyncio.to_thread(p.recv), type=ClientRun)
                    for p in pipes]
            wall_pool = time.monotonic() - t0
            after = snapshot(list(roles))
        finally:
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
    wall = max(r.last_end for r in runs) - min(r.first_send for r in runs)
    chunks = sum(r.chunks for r in runs)
    cpu: dict[str, tuple[float, float]] = {}
    for role in sorted(set(roles.values())):
        pids = [p for p, r in roles.items() if r == role]
        spent = delta({p: before[p] for p in pids if p in before}, after)
        cpu[role] = (spent / chunks * 1e6, spent / wall_pool)
    spent = sum(r.cpu for r in runs)
    cpu["clients"] = (spent / chunks * 1e6, spent / wall)
    return E2E(chunks / wall, sum(r.requests for r in runs) / wall,
               statistics.median(x for r in runs for x in r.latencies) * 1e3, cpu)


def _roles(pids: list[int]) -> dict[int, str]:
    roles = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"tokenhive.broker" in cmdline:
            roles[pid] = "broker"
        elif b"tokenhive.workers" in cmdline:
            roles[pid] = "worker"
    return roles


def run_e2e(clients: int, concurrency: int, requests: int, tokens: int) -> E2E:
    return asyncio.run(_run(clients, concurrency, requests, tokens))
