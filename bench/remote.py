"""Pool overhead for remote-API workers, against a paced upstream, all paths with one transport.

    .venv/bin/python -m bench.remote [--requests 640] [--concurrency 32] [--tokens 16]
        [--token-rate 100] [--sequential 40] [--rounds 3] [--json PATH]

The upstream (``bench.upstream``, its own uvloop process) streams each reply as a real API
does: one SSE event per write, at ``--token-rate`` events per second per stream. Three
paths, all speaking HTTP through the same transport (our ``LeanHTTPTransport``, SSE parser
and msgspec decoding), so transport choice cannot skew the comparison:

- direct: a plain client (that transport + ``iter_sse`` + decode each event), in this process;
- adapter: the openai backend alone, in this process (``OpenAIBackend.stream``);
- pool: ``AsyncClient.stream`` -> real ``tokenhive.broker`` -> one real ``tokenhive.workers``
  worker with the openai backend (slots = concurrency) -> the upstream.

Per path, interleaved direct/adapter/pool for ``--rounds`` rounds (the round with the median
rate kept): sequential requests (latency: added TTFT and end-to-end at p50 and p99 over
direct) and ``--concurrency`` concurrent ones (request rate ratio). CPU-seconds per request
count every process a path involves: this process (client, and the adapter when in-process),
plus the broker and the worker for the pool; the upstream's own CPU is shown apart (it is
the same work for every path). Targets: the pool adds <= 2 ms at p50 over the adapter, and
keeps >= 90% of the direct request rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import msgspec
import uvloop

from bench.cpu import delta, descendants, snapshot
from bench.serve_metrics import percentile
from bench.upstream import serve, with_upstream
from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.pool.local import local_pool
from tokenhive.schemas.config import OpenAISpec, PoolConfig
from tokenhive.schemas.messages import Message, Request, Sampling
from tokenhive.workers.backend import Delta
from tokenhive.workers.backends.http.sse import iter_sse
from tokenhive.workers.backends.http.transport import LeanHTTPTransport
from tokenhive.workers.backends.openai import OpenAIBackend

TARGET_ADDED_P50_MS = 2.0
TARGET_RATE_RATIO = 0.90
One = Callable[[], Awaitable[float]]  # one request; returns its TTFT (s)


class Stats(msgspec.Struct):
    requests: int
    seconds: float
    rate: float  # requests / s
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    cpu_ms_per_request: float  # the path's processes (see the module doc)
    upstream_cpu_ms_per_request: float


def direct_call(http: httpx.AsyncClient, tokens: int) -> One:
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}

    async def one() -> float:
        t0, ttft = time.perf_counter(), 0.0
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            # Read to the end of the body (not just to [DONE]) so that the connection is
            # reused; the adapter does the same.
            async for event in iter_sse(response):
                if event.data != "[DONE]":
                    msgspec.json.decode(event.data)
                    if not ttft:
                        ttft = time.perf_counter() - t0
        return ttft

    return one


def adapter_call(backend: OpenAIBackend, tokens: int) -> One:
    request = Request(id="a", model="bench", messages=[Message("user", "hi")],
                      sampling=Sampling(max_tokens=tokens))

    async def one() -> float:
        t0, ttft = time.perf_counter(), 0.0
        async for ev in backend.stream(request):
            if not ttft and isinstance(ev, Delta) and ev.text:
                ttft = time.perf_counter() - t0
        return ttft

    return one


def pool_call(client: AsyncClient, tokens: int) -> One:
    async def one() -> float:
        t0, ttft = time.perf_counter(), 0.0
        stream = client.stream("hi", max_tokens=tokens)
        async for chunk in stream:
            if not ttft and chunk.text:
                ttft = time.perf_counter() - t0
        assert stream.result.finish_reason == "stop"
        return ttft

    return one


async def measure(one: One, requests: int, concurrency: int, pids: list[int],
                  upstream: int) -> Stats:
    e2e: list[float] = []
    ttft: list[float] = []
    todo = iter(range(requests))

    async def lane() -> None:
        for _ in todo:
            t0 = time.perf_counter()
            ttft.append(await one())
            e2e.append(time.perf_counter() - t0)

    cpu0, procs0, up0 = time.process_time(), snapshot(pids), snapshot([upstream])
    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0 + delta(procs0, snapshot(pids))
    up = delta(up0, snapshot([upstream]))
    return Stats(requests, round(wall, 3), round(requests / wall, 1),
                 round(percentile(ttft, 50) * 1e3, 3), round(percentile(ttft, 99) * 1e3, 3),
                 round(percentile(e2e, 50) * 1e3, 3), round(percentile(e2e, 99) * 1e3, 3),
                 round(cpu / requests * 1e3, 3), round(up / requests * 1e3, 3))


async def bench(args: argparse.Namespace, upstream: str, upstream_pid: int
                ) -> dict[str, object]:
    spec = OpenAISpec(model="bench", base_url=upstream + "/v1", slots=args.concurrency,
                      include_usage=True, timeout=60.0)
    paths = ("direct", "adapter", "pool")
    results: dict[str, list[Stats]] = {f"{p}_{m}": [] for p in paths for m in ("seq", "conc")}
    async with (
        httpx.AsyncClient(base_url=upstream, timeout=60.0,
                          transport=LeanHTTPTransport(args.concurrency)) as http,
        local_pool(PoolConfig(workers=[spec]), log_level="warning") as pool,
        AsyncClient(pool.address, model="bench", timeout=60.0) as client,
        OpenAIBackend(spec) as backend,
    ):
        # broker and worker: this process's children, less the upstream
        pool_pids = [p for p in descendants() if p != upstream_pid]
        calls = {"direct": (direct_call(http, args.tokens), []),
                 "adapter": (adapter_call(backend, args.tokens), []),
                 "pool": (pool_call(client, args.tokens), pool_pids)}
        for call, pids in calls.values():  # warm-up: connections, caches
            await measure(call, args.concurrency * 2, args.concurrency, pids, upstream_pid)
        for _ in range(args.rounds):
            for path, (call, pids) in calls.items():
                results[f"{path}_seq"].append(
                    await measure(call, args.sequential, 1, pids, upstream_pid))
            for path, (call, pids) in calls.items():
                results[f"{path}_conc"].append(
                    await measure(call, args.requests, args.concurrency, pids, upstream_pid))
    return summarize(args, {k: _median(v) for k, v in results.items()})


def summarize(args: argparse.Namespace, best: dict[str, Stats]) -> dict[str, object]:
    def added(path: str, base: str, field: str) -> float:
        seq_path, seq_base = best[f"{path}_seq"], best[f"{base}_seq"]
        return round(getattr(seq_path, field) - getattr(seq_base, field), 3)

    comparisons = {}
    for path, base in (("adapter", "direct"), ("pool", "adapter"), ("pool", "direct")):
        comparisons[f"{path}-{base}"] = {
            f"added_{f}": added(path, base, f)
            for f in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")} | {
            "rate_ratio_at_concurrency": round(
                best[f"{path}_conc"].rate / best[f"{base}_conc"].rate, 3),
            "cpu_ratio": round(best[f"{path}_conc"].cpu_ms_per_request
                               / best[f"{base}_conc"].cpu_ms_per_request, 2)}
    pool_adapter, pool_direct = comparisons["pool-adapter"], comparisons["pool-direct"]
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "serve")},
        "results": {k: msgspec.to_builtins(v) for k, v in best.items()},
        "comparisons": comparisons,
        "targets": {"pool added e2e p50 over adapter (ms) <=": TARGET_ADDED_P50_MS,
                    "pool rate / direct rate >=": TARGET_RATE_RATIO},
        "pass": {"latency": pool_adapter["added_e2e_p50_ms"] <= TARGET_ADDED_P50_MS,
                 "rate": pool_direct["rate_ratio_at_concurrency"] >= TARGET_RATE_RATIO},
    }


def _median(runs: list[Stats]) -> Stats:
    """The run with the median rate (its own latencies kept together with it)."""
    return sorted(runs, key=lambda s: s.rate)[len(runs) // 2]


def print_summary(summary: dict[str, object]) -> None:
    results = summary["results"]
    assert isinstance(results, dict)
    print(f"{'path':<10}{'seq TTFT p50/p99 ms':>22}{'seq E2E p50/p99 ms':>22}"
          f"{'conc req/s':>12}{'CPU ms/req':>12}{'upstream':>10}")
    for path in ("direct", "adapter", "pool"):
        s, c = results[f"{path}_seq"], results[f"{path}_conc"]
        print(f"{path:<10}{s['ttft_p50_ms']:>12.2f}/{s['ttft_p99_ms']:<9.2f}"
              f"{s['e2e_p50_ms']:>12.2f}/{s['e2e_p99_ms']:<9.2f}{c['rate']:>12.1f}"
              f"{c['cpu_ms_per_request']:>12.3f}{c['upstream_cpu_ms_per_request']:>10.3f}")
    comparisons = summary["comparisons"]
    assert isinstance(comparisons, dict)
    for name, cmp in comparisons.items():
        print(f"{name}: added TTFT p50 {cmp['added_ttft_p50_ms']:+.2f} ms p99 "
              f"{cmp['added_ttft_p99_ms']:+.2f} ms, E2E p50 {cmp['added_e2e_p50_ms']:+.2f} ms "
              f"p99 {cmp['added_e2e_p99_ms']:+.2f} ms; rate ratio "
              f"{cmp['rate_ratio_at_concurrency']:.3f}; CPU/request x{cmp['cpu_ratio']}")
    print(f"targets: {summary['targets']} pass: {summary['pass']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=640, help="per concurrent run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="content events per reply")
    parser.add_argument("--token-rate", type=float, default=100.0,
                        help="events/s per stream (0: the whole reply in one write)")
    parser.add_argument("--sequential", type=int, default=40, help="requests per latency run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    interval = 1 / args.token_rate if args.token_rate > 0 else 0.0
    if args.serve:
        uvloop.run(serve(args.tokens, interval))
        return 0
    summary = with_upstream(
        [sys.executable, "-m", "bench.remote", "--serve", "--tokens", str(args.tokens),
         "--token-rate", str(args.token_rate)], lambda url, pid: bench(args, url, pid))
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
