"""Pool overhead for remote-API workers: small streamed requests through tokenhive vs the
same server called directly with httpx, in the same run.

    .venv/bin/python -m bench.remote [--requests 2000] [--concurrency 32] [--tokens 16]

The upstream is a deliberately trivial OpenAI-compatible server started by this script (a
raw asyncio protocol in its own process, uvloop): every POST gets the same prebuilt SSE
reply (``--tokens`` content chunks, a finish chunk, a usage chunk, ``[DONE]``) in one write.
It does no model work, so what is measured is the overhead of each path, not a model:

- direct: ``httpx.AsyncClient`` streaming POST + SSE parsing, ``--concurrency`` at once;
- adapter: the openai backend alone, in this process (``OpenAIBackend.stream``): what the
  worker's adapter costs over plain httpx, without broker, worker runtime or client;
- pool: ``tokenhive.clients.AsyncClient.stream`` -> real ``tokenhive.broker`` -> one real
  ``tokenhive.workers`` worker with the openai backend (slots = concurrency) -> the server.

Two measurements per path, interleaved direct/adapter/pool for ``--rounds`` rounds (on a shared
machine, interleaving keeps drift from favouring one side): sequential requests (added
latency at p50) and ``--concurrency`` concurrent requests (request rate). Targets: the
pool adds <= 2 ms at p50, and keeps >= 90% of the direct request rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import msgspec
import uvloop

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.pool.local import local_pool
from tokenhive.schemas.config import OpenAISpec, PoolConfig
from tokenhive.schemas.messages import Message, Request, Sampling
from tokenhive.workers.backends.http.sse import iter_sse
from tokenhive.workers.backends.openai import OpenAIBackend

TARGET_ADDED_P50_MS = 2.0
TARGET_RATE_RATIO = 0.90

# -- the upstream: a fixed-reply OpenAI-compatible SSE server ------------------------------------


def sse_reply(tokens: int) -> bytes:
    events: list[dict[str, object]] = [
        {"choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]} for i in range(tokens)]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": tokens,
                                            "total_tokens": 5 + tokens}})
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    body += b"data: [DONE]\n\n"
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    return head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


class KeepAliveProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive server side: ``respond()`` once per complete request."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            assert self.transport is not None
            self.respond(self.transport)

    def respond(self, transport: asyncio.WriteTransport) -> None:
        raise NotImplementedError


class FixedReplyProtocol(KeepAliveProtocol):
    """Every complete request gets ``reply``."""

    def __init__(self, reply: bytes) -> None:
        super().__init__()
        self.reply = reply

    def respond(self, transport: asyncio.WriteTransport) -> None:
        transport.write(self.reply)


async def serve(tokens: int) -> None:
    loop = asyncio.get_running_loop()
    reply = sse_reply(tokens)
    server = await loop.create_server(lambda: FixedReplyProtocol(reply), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await server.serve_forever()


# -- measuring -----------------------------------------------------------------------------------


class Stats(msgspec.Struct):
    requests: int
    seconds: float
    rate: float  # requests / s
    p50_ms: float
    p95_ms: float


async def measure(one: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> Stats:
    latencies: list[float] = []
    todo = iter(range(requests))

    async def lane() -> None:
        for _ in todo:
            t0 = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return Stats(requests, round(wall, 3), round(requests / wall, 1), round(q[49] * 1e3, 3),
                 round(q[94] * 1e3, 3))


def direct_call(client: httpx.AsyncClient, tokens: int) -> Callable[[], Awaitable[None]]:
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}

    async def one() -> None:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            # Read to the end of the body (not just to [DONE]) so that httpx can reuse the
            # connection; the adapter does the same.
            async for event in iter_sse(response):
                if event.data != "[DONE]":
                    msgspec.json.decode(event.data)

    return one


def adapter_call(backend: OpenAIBackend, tokens: int) -> Callable[[], Awaitable[None]]:
    request = Request(id="a", model="bench", messages=[Message("user", "hi")],
                      sampling=Sampling(max_tokens=tokens))

    async def one() -> None:
        async for _ in backend.stream(request):
            pass

    return one


def pool_call(client: AsyncClient, tokens: int) -> Callable[[], Awaitable[None]]:
    async def one() -> None:
        stream = client.stream("hi", max_tokens=tokens)
        async for _ in stream:
            pass
        assert stream.result.finish_reason == "stop"

    return one


async def bench(args: argparse.Namespace, upstream: str) -> dict[str, object]:
    spec = OpenAISpec(model="bench", base_url=upstream + "/v1", slots=args.concurrency,
                      include_usage=True, timeout=30.0)
    config = PoolConfig(workers=[spec])
    paths = ("direct", "adapter", "pool")
    results: dict[str, list[Stats]] = {f"{p}_{m}": [] for p in paths for m in ("seq", "conc")}
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    async with (
        httpx.AsyncClient(base_url=upstream, limits=limits, timeout=30.0) as http,
        local_pool(config, log_level="warning") as pool,
        AsyncClient(pool.address, model="bench", timeout=30.0) as client,
        OpenAIBackend(spec) as backend,
    ):
        calls = {"direct": direct_call(http, args.tokens),
                 "adapter": adapter_call(backend, args.tokens),
                 "pool": pool_call(client, args.tokens)}
        for call in calls.values():  # warm-up: connections, caches
            await measure(call, 200, args.concurrency)
        seq = max(200, args.requests // 4)
        for _ in range(args.rounds):
            for path, call in calls.items():
                results[f"{path}_seq"].append(await measure(call, seq, 1))
            for path, call in calls.items():
                results[f"{path}_conc"].append(await measure(call, args.requests,
                                                             args.concurrency))
    best = {k: _median(v) for k, v in results.items()}
    added = best["pool_seq"].p50_ms - best["direct_seq"].p50_ms
    ratio = best["pool_conc"].rate / best["direct_conc"].rate
    return {
        "config": {"requests": args.requests, "concurrency": args.concurrency,
                   "tokens": args.tokens, "rounds": args.rounds},
        "results": {k: msgspec.to_builtins(v) for k, v in best.items()},
        "added_p50_ms": round(added, 3),
        "rate_ratio": round(ratio, 3),
        "adapter_added_p50_ms": round(best["adapter_seq"].p50_ms - best["direct_seq"].p50_ms, 3),
        "adapter_rate_ratio": round(best["adapter_conc"].rate / best["direct_conc"].rate, 3),
        "targets": {"added_p50_ms<=": TARGET_ADDED_P50_MS, "rate_ratio>=": TARGET_RATE_RATIO},
        "pass": {"latency": added <= TARGET_ADDED_P50_MS, "rate": ratio >= TARGET_RATE_RATIO},
    }


def _median(runs: list[Stats]) -> Stats:
    """The run with the median rate (its own latencies kept together with it)."""
    return sorted(runs, key=lambda s: s.rate)[len(runs) // 2]


def with_upstream(
    serve_argv: list[str], run: Callable[[str], Coroutine[Any, Any, dict[str, object]]]
) -> dict[str, object]:
    """Start the upstream in its own process (it prints its port), run the bench against it."""
    server = subprocess.Popen(serve_argv, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        return uvloop.run(run(f"http://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per concurrent run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="content chunks per reply")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.tokens))
        return 0
    summary = with_upstream([sys.executable, __file__, "--serve", "--tokens", str(args.tokens)],
                            lambda url: bench(args, url))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
