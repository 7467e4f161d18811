"""Client CPU per streamed request for three httpx transports against a paced upstream.

    .venv/bin/python -m bench.http_transport [--requests 320] [--concurrency 32]
        [--events 16] [--interval-ms 1] [--rounds 5]

- ``old``: the hand-parsing LeanHTTPTransport as of commit ``OLD_COMMIT`` (read with
  ``git show``; skipped when git or the commit is not there);
- ``new``: ``tokenhive.workers.backends.http.transport.LeanHTTPTransport`` (h11 framing);
- ``httpx``: httpx's own ``AsyncHTTPTransport`` (httpcore + h11 + anyio).

The upstream runs in its own process (uvloop), as a real one would: every POST gets a
chunked SSE reply written one event per write, ``--interval-ms`` apart (``--events``
content events, a finish event, a usage event, ``[DONE]``), so each event reaches the
client in its own read, the case where per-read framing cost shows. The client (uvloop,
one process) streams ``--concurrency`` requests at once, parsing the SSE and decoding each
event's JSON as the adapter does. Measured: ``time.process_time()`` of the client process
per request, interleaved old/new/httpx for ``--rounds`` rounds; medians and ratios printed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import uvloop

from bench.upstream import serve, with_upstream
from tokenhive.workers.backends.http.sse import iter_sse
from tokenhive.workers.backends.http.transport import LeanHTTPTransport

OLD_COMMIT = "2b1031eba8256761e8fea4f5ada41e92e6131db1"  # the last hand-parsing version
OLD_PATH = "workers/backends/http/transport.py"
ROOT = Path(__file__).resolve().parent.parent

# -- the client ----------------------------------------------------------------------------------


def old_transport_class() -> type[httpx.AsyncBaseTransport] | None:
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:{OLD_PATH}"],
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("_old_http_transport", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{OLD_COMMIT[:8]}:{OLD_PATH}", "exec"), module.__dict__)
    cls: type[httpx.AsyncBaseTransport] = module.LeanHTTPTransport
    return cls


async def run_once(http: httpx.AsyncClient, requests: int, concurrency: int,
                   events: int) -> tuple[float, float]:
    """(client CPU seconds, wall seconds) for ``requests`` streamed requests."""
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    todo = iter(range(requests))

    async def lane() -> None:
        for _ in todo:
            seen = 0
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for event in iter_sse(response):
                    if event.data != "[DONE]":
                        msgspec.json.decode(event.data)
                    seen += 1
            assert seen == events + 3, seen

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.process_time() - cpu0, time.perf_counter() - wall0


async def bench(args: argparse.Namespace, url: str) -> dict[str, object]:
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    makers: dict[str, Callable[[], httpx.AsyncBaseTransport]] = {}
    old = old_transport_class()
    if old is not None:
        makers["old"] = lambda: old(args.concurrency)  # type: ignore[call-arg]
    makers["new"] = lambda: LeanHTTPTransport(args.concurrency)
    makers["httpx"] = lambda: httpx.AsyncHTTPTransport(limits=limits)
    cpu_us: dict[str, list[float]] = {name: [] for name in makers}
    wall_s: dict[str, list[float]] = {name: [] for name in makers}
    clients = {name: httpx.AsyncClient(base_url=url, transport=make(), timeout=30.0)
               for name, make in makers.items()}
    try:
        for http in clients.values():  # warm-up: connections, caches
            await run_once(http, args.concurrency * 2, args.concurrency, args.events)
        for _ in range(args.rounds):
            for name, http in clients.items():
                cpu, wall = await run_once(http, args.requests, args.concurrency, args.events)
                cpu_us[name].append(cpu / args.requests * 1e6)
                wall_s[name].append(wall)
    finally:
        for http in clients.values():
            await http.aclose()
    med = {name: statistics.median(v) for name, v in cpu_us.items()}
    return {
        "config": vars(args) | {"old": OLD_COMMIT if old else "unavailable"},
        "cpu_us_per_request_median": {k: round(v, 1) for k, v in med.items()},
        "cpu_us_per_request_runs": {k: [round(x, 1) for x in v] for k, v in cpu_us.items()},
        "wall_s_median": {k: round(statistics.median(v), 3) for k, v in wall_s.items()},
        "ratios": {f"{a}/{b}": round(med[a] / med[b], 3)
                   for a, b in (("new", "old"), ("httpx", "new"), ("httpx", "old"))
                   if a in med and b in med},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=320, help="per run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--events", type=int, default=16, help="content events per reply")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="between writes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.events, args.interval_ms / 1000))
        return 0
    summary = with_upstream(
        [sys.executable, "-m", "bench.http_transport", "--serve", "--events", str(args.events),
         "--interval-ms", str(args.interval_ms)], lambda url, _pid: bench(args, url))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
