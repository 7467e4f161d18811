"""Single-stream generation: llama-cpp-python direct vs our engine vs the whole pool.

    .venv/bin/python -m bench.gguf [--tokens 256] [--rounds 5] [--threads 2] [--model PATH]

Same model (Gemma 3 270M Q4_K_M unless --model), same prompt, greedy, same thread count,
in one run, rounds interleaved (A B C A B C ...) so machine noise hits every mode alike;
medians are reported. Modes:

* ``llama-cpp-python``: the high-level ``Llama.create_completion(stream=True)``;
* ``engine``: ``GGUFBackend.stream`` in this process (the continuous-batching engine);
* ``pool``: broker + one gguf worker as real subprocesses (``local_pool``), streamed
  through ``AsyncClient`` over ipc: what a client of tokenhive sees.

Per run: TTFT (request sent -> first text) and decode rate ((tokens - 1) / (last - first
token time)). Targets: pool >= 97% of direct decode rate, TTFT within 2 ms of direct.

On a small shared machine wall-clock rates are noisy, so the CPU time the broker process
spends per streamed token is reported too (Linux /proc): the pool's own cost, free of
noise. All modes use flash attention (llama.cpp's "auto" picks it on CPU; the high-level
``Llama`` would otherwise turn it off), so they run the same kernels.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from tokenhive.clients import AsyncClient
from tokenhive.clients.pool.local import local_pool
from tokenhive.schemas.config import GGUFSpec, PoolConfig
from tokenhive.schemas.messages import Kind, Request, Sampling
from tokenhive.workers.backend import Delta
from tokenhive.workers.backends.gguf import GGUFBackend

PROMPT = "Once upon a time, in a small village by the sea, there lived"


@dataclass
class Run:
    ttft: float
    rate: float
    tokens: int
    text: str


@dataclass
class Mode:
    name: str
    once: Callable[[int], Awaitable[Run]]
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def measure(t0: float, stamps: list[tuple[float, int]], text: str) -> Run:
    """stamps: (arrival time, tokens in that piece) for every non-empty piece."""
    tokens = sum(n for _, n in stamps)
    first, last = stamps[0][0], stamps[-1][0]
    return Run(ttft=first - t0, rate=(tokens - 1) / (last - first), tokens=tokens, text=text)


def direct_mode(llm: llama_cpp.Llama) -> Callable[[int], Awaitable[Run]]:
    async def once(n: int) -> Run:
        stamps, parts = [], []
        t0 = time.perf_counter()
        for chunk in llm.create_completion(PROMPT, max_tokens=n, temperature=0.0, stream=True):
            piece = chunk["choices"][0]["text"]  # type: ignore[index]
            if piece:
                stamps.append((time.perf_counter(), 1))  # one token per streamed piece
                parts.append(piece)
        return measure(t0, stamps, "".join(parts))

    return once


def engine_mode(backend: GGUFBackend) -> Callable[[int], Awaitable[Run]]:
    async def once(n: int) -> Run:
        stamps, parts = [], []
        req = Request(id="b", model="m", kind=Kind.COMPLETION, prompt=PROMPT,
                      sampling=Sampling(max_tokens=n, temperature=0.0))
        t0 = time.perf_counter()
        async for ev in backend.stream(req):
            if isinstance(ev, Delta) and ev.text:
                stamps.append((time.perf_counter(), ev.tokens))
                parts.append(ev.text)
        return measure(t0, stamps, "".join(parts))

    return once


def pool_mode(client: AsyncClient) -> Callable[[int], Awaitable[Run]]:
    async def once(n: int) -> Run:
        stamps, parts = [], []
        t0 = time.perf_counter()
        async for chunk in client.stream(prompt=PROMPT, max_tokens=n, temperature=0.0):
            if chunk.text:
                stamps.append((time.perf_counter(), chunk.tokens))
                parts.append(chunk.text)
        return measure(t0, stamps, "".join(parts))

    return once


async def main(args: argparse.Namespace) -> None:
    path = Path(args.model) if args.model else _gemma()
    n_ctx = args.tokens + 64
    spec = GGUFSpec(model="bench", path=str(path), n_ctx=n_ctx, slots=1, n_threads=args.threads)
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=True, verbose=False)
    async with (
        GGUFBackend(spec) as backend,
        local_pool(PoolConfig(workers=[spec])) as pool,
        AsyncClient(pool.address, model="bench") as client,
    ):
        modes = [Mode("llama-cpp-python", direct_mode(llm)), Mode("engine", engine_mode(backend)),
                 Mode("pool", pool_mode(client))]
        for m in modes:  # warm-up: first-decode allocations, page cache
            await m.once(8)
        broker_cpu = 0.0
        for r in range(args.rounds):
            for m in modes:
                before = proc_cpu_seconds("tokenhive.broker")
                m.runs.append(await m.once(args.tokens))
                if m.name == "pool":
                    broker_cpu += proc_cpu_seconds("tokenhive.broker") - before
            print(f"round {r + 1}: " + "  ".join(
                f"{m.name} {m.runs[-1].rate:.1f} tok/s ttft {m.runs[-1].ttft * 1e3:.1f} ms"
                for m in modes), flush=True)
    llm.close()
    report(modes, args)
    per_token = broker_cpu / sum(r.tokens for r in modes[2].runs)
    print(f"broker CPU per streamed token: {per_token * 1e6:.0f} us")


def proc_cpu_seconds(cmdline_part: str) -> float:
    """User + system CPU seconds of the processes whose command line has ``cmdline_part``."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if cmdline_part.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def report(modes: list[Mode], args: argparse.Namespace) -> None:
    print(f"\n{args.tokens} tokens, greedy, {args.threads} threads, median of {args.rounds}")
    print(f"{'mode':<18}{'decode tok/s':>14}{'TTFT ms':>10}{'tokens':>8}")
    for m in modes:
        print(f"{m.name:<18}{m.median('rate'):>14.1f}{m.median('ttft') * 1e3:>10.1f}"
              f"{m.runs[-1].tokens:>8}")
    direct, engine, pool = modes
    same = direct.runs[-1].text == engine.runs[-1].text == pool.runs[-1].text
    print(f"same text in all three: {same}")
    for base in (direct, engine):
        ratio = pool.median("rate") / base.median("rate")
        dttft = (pool.median("ttft") - base.median("ttft")) * 1e3
        print(f"pool vs {base.name}: decode {ratio:.1%} (target >= 97%), "
              f"TTFT {dttft:+.1f} ms (target within 2 ms)")


def _gemma() -> Path:
    from tokenhive.workers.models.default import default_model_path

    return default_model_path()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="GGUF path (default: Gemma 3 270M)")
    asyncio.run(main(parser.parse_args()))
