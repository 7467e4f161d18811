"""Single-stream generation: the pool vs the best native path, same model, threads, greedy.

    .venv/bin/python -m bench.gguf [--tokens 256] [--rounds 5] [--threads 2] [--model PATH]
        [--with-llama-cpp-python]

Same model (Gemma 3 270M Q4_K_M unless --model), greedy, same thread count, in one run,
rounds interleaved (A B C A B C ...) so machine noise hits every mode alike; medians are
reported. Each round has its own prompt (a distinct first word), so no mode answers from a
prefix cache a previous round warmed. Modes:

* ``llama-server``: llama.cpp's own server with one slot, its ``/completion`` SSE stream
  (the best native serving path: C++ all the way, one token per event);
* ``engine``: ``GGUFBackend.stream`` in this process (our continuous-batching engine, no
  IPC at all: the floor for TTFT);
* ``pool``: broker + one gguf worker as real subprocesses (``local_pool``), streamed
  through ``AsyncClient`` over ipc: what a client of tokenhive sees;
* ``llama-cpp-python`` (only with ``--with-llama-cpp-python``): the high-level
  ``Llama.create_completion(stream=True)``. Not a fair baseline: it detokenizes the whole
  output again at every token (quadratic), so it is slow by construction; kept to show it.

Per run: TTFT (request sent -> first text) and decode rate ((tokens - 1) / (last - first
token time)). Headline: the pool against the best native decode rate (the faster of
llama-server and the in-process engine) and its TTFT against the in-process engine.
Targets: pool >= 97% of the best native decode rate, TTFT within 2 ms of the engine.

The CPU the broker process spends per streamed token is reported too (Linux /proc): the
pool's own cost, free of wall-clock noise.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec

from bench.cpu import cpu_seconds, descendants
from bench.llama_server import LlamaServer
from tokenhive.clients import AsyncClient
from tokenhive.clients.pool.local import local_pool
from tokenhive.schemas.config import GGUFSpec, PoolConfig
from tokenhive.schemas.messages import Kind, Request, Sampling
from tokenhive.workers.backend import Delta
from tokenhive.workers.backends.gguf import GGUFBackend
from tokenhive.workers.backends.http.sse import iter_sse
from tokenhive.workers.backends.http.transport import LeanHTTPTransport

STORY = "Once upon a time, in a small village by the sea, there lived"
ROUND_WORDS = ("Yesterday", "Tonight", "Somewhere", "Meanwhile", "Suddenly", "Later", "Then",
               "Still", "Again", "Today", "Soon", "Finally")


def prompt(round_no: int) -> str:
    """A distinct first word per round: no prefix-cache hit from an earlier round."""
    return f"{ROUND_WORDS[round_no % len(ROUND_WORDS)]} {round_no}. {STORY}"


@dataclass
class Run:
    ttft: float
    rate: float
    tokens: int
    text: str


Once = Callable[[str, int], Awaitable[Run]]  # (prompt, max tokens) -> Run


@dataclass
class Mode:
    name: str
    once: Once
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def measure(t0: float, stamps: list[tuple[float, int]], text: str) -> Run:
    """stamps: (arrival time, tokens in that piece) for every non-empty piece."""
    tokens = sum(n for _, n in stamps)
    first, last = stamps[0][0], stamps[-1][0]
    return Run(ttft=first - t0, rate=(tokens - 1) / (last - first), tokens=tokens, text=text)


class _ServerEvent(msgspec.Struct):
    content: str = ""
    tokens: list[int] = msgspec.field(default_factory=list)


def server_mode(http: httpx.AsyncClient) -> Once:
    decode = msgspec.json.Decoder(_ServerEvent).decode

    async def once(text: str, n: int) -> Run:
        stamps, parts = [], []
        body = {"prompt": text, "n_predict": n, "temperature": 0.0, "stream": True}
        t0 = time.perf_counter()
        async with http.stream("POST", "/completion", json=body) as response:
            response.raise_for_status()
            async for event in iter_sse(response):
                ev = decode(event.data)
                if ev.content:
                    stamps.append((time.perf_counter(), max(1, len(ev.tokens))))
                    parts.append(ev.content)
        return measure(t0, stamps, "".join(parts))

    return once


def engine_mode(backend: GGUFBackend) -> Once:
    async def once(text: str, n: int) -> Run:
        stamps, parts = [], []
        req = Request(id="b", model="m", kind=Kind.COMPLETION, prompt=text,
                      sampling=Sampling(max_tokens=n, temperature=0.0))
        t0 = time.perf_counter()
        async for ev in backend.stream(req):
            if isinstance(ev, Delta) and ev.text:
                stamps.append((time.perf_counter(), ev.tokens))
                parts.append(ev.text)
        return measure(t0, stamps, "".join(parts))

    return once


def pool_mode(client: AsyncClient) -> Once:
    async def once(text: str, n: int) -> Run:
        stamps, parts = [], []
        t0 = time.perf_counter()
        async for chunk in client.stream(prompt=text, max_tokens=n, temperature=0.0):
            if chunk.text:
                stamps.append((time.perf_counter(), chunk.tokens))
                parts.append(chunk.text)
        return measure(t0, stamps, "".join(parts))

    return once


def llama_cpp_python_mode(path: Path, n_ctx: int, threads: int) -> Once:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads,
                          n_threads_batch=threads, flash_attn=True, verbose=False)

    async def once(text: str, n: int) -> Run:
        stamps, parts = [], []
        t0 = time.perf_counter()
        for chunk in llm.create_completion(text, max_tokens=n, temperature=0.0, stream=True):
            piece = chunk["choices"][0]["text"]  # type: ignore[index]
            if piece:
                stamps.append((time.perf_counter(), 1))  # one token per streamed piece
                parts.append(piece)
        return measure(t0, stamps, "".join(parts))

    return once


async def main(args: argparse.Namespace) -> None:
    path = Path(args.model) if args.model else _gemma()
    n_ctx = args.tokens + 64
    spec = GGUFSpec(model="bench", path=str(path), n_ctx=n_ctx, slots=1, n_threads=args.threads)
    async with (
        LlamaServer(path, slots=1, ctx_per_slot=n_ctx, threads=args.threads) as server,
        httpx.AsyncClient(base_url=server.url, timeout=600.0,
                          transport=LeanHTTPTransport(1)) as http,
        GGUFBackend(spec) as backend,
        local_pool(PoolConfig(workers=[spec])) as pool,
        AsyncClient(pool.address, model="bench") as client,
    ):
        modes = [Mode("llama-server", server_mode(http)), Mode("engine", engine_mode(backend)),
                 Mode("pool", pool_mode(client))]
        if args.with_llama_cpp_python:
            modes.append(Mode("llama-cpp-python", llama_cpp_python_mode(path, n_ctx,
                                                                        args.threads)))
        for m in modes:  # warm-up: first-decode allocations, page cache
            await m.once(prompt(-1), 8)
        broker = _broker_pid()
        broker_cpu = 0.0
        for r in range(args.rounds):
            for m in modes:
                before = cpu_seconds(broker) or 0.0
                m.runs.append(await m.once(prompt(r), args.tokens))
                if m.name == "pool":
                    broker_cpu += (cpu_seconds(broker) or 0.0) - before
            print(f"round {r + 1}: " + "  ".join(
                f"{m.name} {m.runs[-1].rate:.1f} tok/s ttft {m.runs[-1].ttft * 1e3:.1f} ms"
                for m in modes), flush=True)
    report(modes, args)
    per_token = broker_cpu / sum(r.tokens for r in modes[2].runs)
    print(f"broker CPU during the pool runs per streamed token (its timers and heartbeats "
          f"included): {per_token * 1e6:.0f} us")


def _broker_pid() -> int:
    """The pool's broker: the one child of this process running ``tokenhive.broker``."""
    for pid in descendants():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"tokenhive.broker" in f.read():
                    return pid
        except OSError:
            continue
    raise SystemExit("the pool's broker process was not found")


def report(modes: list[Mode], args: argparse.Namespace) -> None:
    print(f"\n{args.tokens} tokens, greedy, {args.threads} threads, median of {args.rounds} "
          "rounds (interleaved)")
    print(f"{'mode':<18}{'decode tok/s':>14}{'TTFT ms':>10}{'tokens':>8}")
    for m in modes:
        print(f"{m.name:<18}{m.median('rate'):>14.1f}{m.median('ttft') * 1e3:>10.1f}"
              f"{m.runs[-1].tokens:>8}")
    by = {m.name: m for m in modes}
    server, engine, pool = by["llama-server"], by["engine"], by["pool"]
    texts = {m.name: m.runs[-1].text for m in modes}
    same = [name for name, text in texts.items() if text == texts["pool"]]
    print(f"same text as the pool (last round): {', '.join(same)}")
    best = max((server, engine), key=lambda m: m.median("rate"))
    for base in (server, engine):
        ratio = pool.median("rate") / base.median("rate")
        dttft = (pool.median("ttft") - base.median("ttft")) * 1e3
        print(f"pool vs {base.name}: decode {ratio:.1%}, TTFT {dttft:+.1f} ms")
    ratio = pool.median("rate") / best.median("rate")
    dttft = (pool.median("ttft") - engine.median("ttft")) * 1e3
    print(f"HEADLINE pool decode = {ratio:.1%} of the best native path ({best.name}); target "
          f">= 97%: {'met' if ratio >= 0.97 else f'SHORT by {0.97 - ratio:.1%}'}")
    print(f"HEADLINE pool TTFT = engine in-process {dttft:+.1f} ms; target within 2 ms: "
          f"{'met' if dttft <= 2.0 else f'SHORT by {dttft - 2.0:.1f} ms'}")
    if "llama-cpp-python" in by:
        slow = by["llama-cpp-python"]
        print(f"(llama-cpp-python high-level streaming, quadratic detokenize: pool decode = "
              f"{pool.median('rate') / slow.median('rate'):.0%} of it; not a fair baseline)")


def _gemma() -> Path:
    from tokenhive.workers.models.default import default_model_path

    return default_model_path()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="GGUF path (default: Gemma 3 270M)")
    parser.add_argument("--with-llama-cpp-python", action="store_true",
                        help="also the high-level llama-cpp-python stream (quadratic, slow)")
    asyncio.run(main(parser.parse_args()))
