"""Throughput of the GGUF engine at N concurrent requests, with and without output grammars.

    .venv/bin/python -m bench.grammar [--concurrent 8] [--tokens 96] [--rounds 3]
                                      [--threads 2] [--model PATH]

Same model (Gemma 3 270M Q4_K_M unless --model), same chat prompt asking for JSON, one
engine with ``--concurrent`` slots, ``--concurrent`` requests at once, sampled at
temperature 0.8 with fixed seeds. Modes, rounds interleaved (A B A B ...) so machine noise
hits both alike:

* ``free``: no grammar;
* ``schema``: every request under a ``response_format`` JSON schema (a grammar per
  sequence, see workers/gguf/grammar_gate.py).

Throughput = completion tokens / wall time of the round. The ratio schema / free (1.0:
grammars cost nothing) is the median of the per-pair ratios (a schema round against the free
round just before it), which a busy shared machine disturbs less than the ratio of medians;
the same is given for this process's CPU time per token (all threads), the steadiest measure
there. Also: how often a grammar refused the model's own pick (and how often that needed a
pass over the whole vocabulary). Every schema output that finished is checked to parse.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from tokenhive.schemas.config import GGUFSpec
from tokenhive.schemas.messages import Message, Request, Sampling
from tokenhive.schemas.tools import JSONSchemaFormat, ResponseFormat
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends.gguf import GGUFBackend

PROMPT = "Describe three made-up cities as JSON: name, country, population, and a motto."
SCHEMA = {
    "type": "object",
    "properties": {
        "cities": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "country": {"type": "string"},
                    "population": {"type": "integer"},
                    "motto": {"type": "string"},
                },
                "required": ["name", "country", "population", "motto"],
            },
        },
    },
    "required": ["cities"],
}


def request(i: int, tokens: int, grammar: bool) -> Request:
    fmt = ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(
        name="cities", schema=SCHEMA)) if grammar else None
    return Request(
        id=f"r{i}", model="m", messages=[Message("user", PROMPT)],
        sampling=Sampling(max_tokens=tokens, temperature=0.8, seed=1000 + i),
        response_format=fmt,
    )


async def one(backend: GGUFBackend, req: Request) -> tuple[str, Done]:
    parts: list[str] = []
    async for event in backend.stream(req):
        if isinstance(event, Delta):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise AssertionError("stream ended without Done")


async def round_(
    backend: GGUFBackend, n: int, tokens: int, grammar: bool
) -> tuple[float, float, int]:
    """(tokens per second, CPU ms per token, outputs that finished but do not parse)."""
    start, cpu = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(one(backend, request(i, tokens, grammar)) for i in range(n)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    generated = sum(done.usage.completion_tokens for _, done in results)
    bad = 0
    if grammar:
        for text, done in results:
            if done.finish_reason == "stop":
                try:
                    json.loads(text)
                except ValueError:
                    bad += 1
    return generated / wall, cpu * 1000 / generated, bad


def resamples(backend: GGUFBackend) -> tuple[int, int]:
    assert backend.engine is not None
    stats = backend.engine.stats
    return stats.grammar_resamples, stats.grammar_full_passes


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--chat-format", default=None,
                    help="for a --model without a chat template (the default model: gemma)")
    args = ap.parse_args()
    if args.model is None:
        from tokenhive.workers.models.default import default_model_path

        args.model = default_model_path()
        args.chat_format = args.chat_format or "gemma"  # its GGUF carries no template
    spec = GGUFSpec(
        model="m", path=str(args.model), slots=args.concurrent, n_ctx=512,
        n_threads=args.threads, chat_format=args.chat_format,
    )
    rates: dict[str, list[float]] = {"free": [], "schema": []}
    cpu_ms: dict[str, list[float]] = {"free": [], "schema": []}
    bad = 0
    async with GGUFBackend(spec) as backend:
        await round_(backend, args.concurrent, 8, False)  # warm-up
        for _ in range(args.rounds):
            for mode in ("free", "schema"):
                rate, ms, n_bad = await round_(backend, args.concurrent, args.tokens,
                                               mode == "schema")
                rates[mode].append(rate)
                cpu_ms[mode].append(ms)
                bad += n_bad
                print(f"  {mode:6s} {rate:8.1f} tok/s  {ms:6.2f} CPU ms/token")
        refused, full = resamples(backend)
    free, schema = statistics.median(rates["free"]), statistics.median(rates["schema"])
    wall_ratio = statistics.median(
        s / f for s, f in zip(rates["schema"], rates["free"], strict=True))
    cpu_ratio = statistics.median(
        f / s for s, f in zip(cpu_ms["schema"], cpu_ms["free"], strict=True))
    print(f"model {args.model.name}, {args.concurrent} concurrent, {args.tokens} tokens each, "
          f"{args.threads} threads, {args.rounds} rounds")
    print(f"free   {free:8.1f} tok/s (median)")
    print(f"schema {schema:8.1f} tok/s (median)")
    print(f"ratio schema/free = {wall_ratio:.3f} (median of pairs; throughput), "
          f"{cpu_ratio:.3f} (CPU time per token)")
    generated = args.rounds * args.concurrent * args.tokens
    print(f"model picks the grammar refused: {refused} (of <= {generated} tokens; {full} "
          f"resampled over the whole vocabulary); finished outputs that do not parse: {bad}")


if __name__ == "__main__":
    asyncio.run(main())
