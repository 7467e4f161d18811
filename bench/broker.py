"""Chunks through the broker vs zmq.proxy (C) vs a direct link, on this machine, in one run.

    .venv/bin/python -m bench.broker [--chunks 400000] [--rate 5000] [--seconds 2] [--rounds 3]
        [--e2e-clients 2] [--e2e-concurrency 16] [--e2e-requests 400] [--e2e-tokens 64]

Producers are raw zmq processes that speak the worker protocol (Ready, then on each
Dispatch stream chunks with the route frame, then a Final); the consumer is a raw DEALER
client. The same producers stream the same frames through a ``zmq.proxy`` ROUTER/DEALER
forwarder and straight to the consumer for the baselines. All links are ipc.

1. Throughput: producers stream as fast as they can; the consumer counts chunks.
2. Latency at a fixed rate: one producer sends a chunk carrying its send time every
   1/rate s; the consumer records receive - send (CLOCK_MONOTONIC is system-wide), and the
   broker's and proxy's added latency is reported against the direct link.
3. End to end (``bench.broker_e2e``): the same broker with a real ``tokenhive.workers``
   echo worker and real client processes streaming through ``AsyncClient``: chunks/s and
   requests/s a user of the pool gets, beside the synthetic figure of 1 and as a share of it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from bench.broker_e2e import run_e2e
from tokenhive.schemas.frames import (
    ROUTE_CHUNK,
    ROUTE_END,
    VERSION_FRAME,
    broker_to_client_decoder,
    encode,
    stream_decoder,
)
from tokenhive.schemas.frames import broker_to_worker_decoder as worker_in
from tokenhive.schemas.messages import (
    Chunk,
    Dispatch,
    Final,
    Heartbeat,
    Ready,
    Request,
    Sampling,
    StatusQuery,
    StatusReply,
    Submit,
)

MODEL = "bench"
SLOTS = 2  # per producer: each producer streams this many requests at once


# -- producers (child processes) ---------------------------------------------------------


def _stream(sock: zmq.Socket[bytes], key: bytes, rid: str, n: int, rate: float) -> None:
    """n chunks, paced at ``rate`` per second if rate > 0 (each carries its send time)."""
    route, send = ROUTE_CHUNK + key, sock.send
    body = encode(Chunk(id=rid, seq=0, text="tok", tokens=1))
    period_ns = int(1e9 / rate) if rate else 0
    next_ns = time.monotonic_ns()
    for seq in range(n):
        if period_ns:
            next_ns += period_ns
            wait = next_ns - time.monotonic_ns()
            if wait > 0:
                time.sleep(wait / 1e9)
            body = encode(Chunk(id=rid, seq=seq, text=str(time.monotonic_ns()), tokens=1))
        send(VERSION_FRAME, zmq.SNDMORE)
        send(route, zmq.SNDMORE)
        send(body)
    sock.send_multipart([VERSION_FRAME, ROUTE_END + key, encode(Final(id=rid, chunks=n))])


def producer_broker(address: str, name: str, rate: float) -> None:
    """A worker: Ready, then stream each Dispatch (request.sampling.max_tokens chunks)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 1_000_000)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    sock.send_multipart([VERSION_FRAME, b"", encode(Ready(worker=name, model=MODEL,
                                                          backend="bench", slots=SLOTS))])
    pending: list[Dispatch] = []
    while True:
        frames = sock.recv_multipart()
        msg = worker_in.decode(frames[1])
        if isinstance(msg, Dispatch):
            pending.append(msg)
            # interleave a producer's SLOTS requests by streaming them back to back
            while sock.poll(0):
                more = worker_in.decode(sock.recv_multipart()[1])
                if isinstance(more, Dispatch):
                    pending.append(more)
            for d in pending:
                _stream(sock, d.key, d.request.id, d.request.sampling.max_tokens or 0, rate)
            pending.clear()
        sock.send_multipart([VERSION_FRAME, b"", encode(Heartbeat(worker=name, free_slots=SLOTS,
                                                                  in_flight=0))])


def producer_plain(address: str, start: mp.synchronize.Event, n: int, rate: float) -> None:
    """The same frames to a proxy or straight to the consumer, once ``start`` is set."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 1_000_000)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(address)
    sock.send_multipart([VERSION_FRAME, b"hello", b""])  # the consumer counts these
    start.wait()
    _stream(sock, os.urandom(8), "p", n, rate)
    sock.close()
    ctx.term()


def run_proxy(front: str, back: str) -> None:
    ctx = zmq.Context()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (frontend, backend):
        s.setsockopt(zmq.SNDHWM, 1_000_000)
        s.setsockopt(zmq.RCVHWM, 1_000_000)
    frontend.bind(front)
    backend.bind(back)
    zmq.proxy(frontend, backend)


# -- consumers (this process) -------------------------------------------------------------


def consume(sock: zmq.Socket[bytes], ends: int, latency: bool, frames: int
            ) -> tuple[int, float, list[float]]:
    """Receive until ``ends`` terminals; (chunks, seconds from first to last, latencies µs).

    The consumer must not be the bottleneck: it knows how many frames each message has
    (this bench's own traffic) and reads them without asking RCVMORE; the body is the last
    one, and a terminal is told from a chunk by its msgpack tag (array header, then the
    one-letter tag string) without decoding chunk bodies."""
    chunks, first, lat = 0, 0.0, []
    recv = sock.recv
    while ends:
        for _ in range(frames - 1):
            recv()
        body = recv()
        if not first:
            first = time.perf_counter()
        if body[2:3] == b"c":
            chunks += 1
            if latency:
                msg = stream_decoder.decode(body)
                assert isinstance(msg, Chunk)
                lat.append((time.monotonic_ns() - int(msg.text)) / 1000)
        else:
            ends -= 1
    return chunks, time.perf_counter() - first, lat


def start_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    ready = tmp / "ready.json"
    proc = subprocess.Popen([
        sys.executable, "-m", "tokenhive.broker", "--clients", f"ipc://{tmp}/clients",
        "--workers", f"ipc://{tmp}/workers", "--ready-file", str(ready),
        "--heartbeat-interval", "5", "--log-level", "warning",
    ])
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("broker did not start")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return proc, info["clients"], info["workers"]


def via_broker(tmp: Path, producers: int, per_request: int, rate: float
               ) -> tuple[int, float, list[float]]:
    broker, clients, workers = start_broker(tmp)
    procs = [mp.Process(target=producer_broker, args=(workers, f"p{i}", rate))
             for i in range(producers)]
    for p in procs:
        p.start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1_000_000)
    sock.connect(clients)
    try:
        requests = producers * SLOTS if not rate else 1
        _wait_workers(sock, producers)
        for i in range(requests):
            req = Request(id=f"r{i}", model=MODEL, prompt="x", timeout=600,
                          sampling=Sampling(max_tokens=per_request))
            sock.send_multipart([VERSION_FRAME, encode(Submit(request=req))])
        return consume(sock, requests, latency=bool(rate), frames=2)
    finally:
        sock.close(linger=0)
        broker.terminate()
        broker.wait(timeout=10)
        for p in procs:  # workers serve until killed
            p.kill()
            p.join(timeout=10)


def _wait_workers(sock: zmq.Socket[bytes], n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sock.send_multipart([VERSION_FRAME, encode(StatusQuery())])
        reply = broker_to_client_decoder.decode(sock.recv_multipart()[-1])
        if isinstance(reply, StatusReply) and len(reply.workers) == n:
            return
        time.sleep(0.05)
    raise SystemExit("producers did not register")


def via_plain(tmp: Path, producers: int, per_producer: int, rate: float, proxy: bool
              ) -> tuple[int, float, list[float]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER if proxy else zmq.ROUTER)
    sock.setsockopt(zmq.RCVHWM, 1_000_000)
    start = mp.Event()
    helper = None
    if proxy:
        helper = mp.Process(target=run_proxy, args=(f"ipc://{tmp}/pf", f"ipc://{tmp}/pb"),
                            daemon=True)
        helper.start()
        sock.connect(f"ipc://{tmp}/pb")
        target = f"ipc://{tmp}/pf"
    else:
        sock.bind(f"ipc://{tmp}/direct")
        target = f"ipc://{tmp}/direct"
    procs = [mp.Process(target=producer_plain, args=(target, start, per_producer, rate))
             for _ in range(producers)]
    for p in procs:
        p.start()
    for _ in procs:  # every producer is connected before anyone streams
        sock.recv_multipart()
    start.set()
    try:
        # [ident, VERSION, route, body]
        return consume(sock, producers, latency=bool(rate), frames=4)
    finally:
        for p in procs:
            p.join(timeout=10)
        if helper is not None:
            helper.kill()
        sock.close(linger=0)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 10 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=400_000, help="throughput run total")
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--rate", type=float, default=5000.0, help="latency run chunks/s")
    parser.add_argument("--seconds", type=float, default=2.0, help="latency run length")
    parser.add_argument("--rounds", type=int, default=3, help="latency runs per path")
    parser.add_argument("--e2e-clients", type=int, default=2, help="client processes")
    parser.add_argument("--e2e-concurrency", type=int, default=16, help="streams per client")
    parser.add_argument("--e2e-requests", type=int, default=400, help="per client")
    parser.add_argument("--e2e-tokens", type=int, default=64, help="chunks per request")
    args = parser.parse_args()
    mp.set_start_method("spawn")
    print(f"machine: {os.cpu_count()} cpus, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")

    rows = {}
    with tempfile.TemporaryDirectory(prefix="thb-") as d:
        tmp = Path(d)
        per_request = args.chunks // (args.producers * SLOTS)
        for name, run in (
            ("zmq.proxy", lambda t: via_plain(t, args.producers, args.chunks // args.producers,
                                              0, proxy=True)),
            ("broker", lambda t: via_broker(t, args.producers, per_request, 0)),
        ):
            sub = tmp / name.replace(".", "_")
            sub.mkdir()
            chunks, secs, _ = run(sub)
            rows[name] = chunks / secs
            print(f"throughput {name:10s} {chunks:>9,d} chunks in {secs:6.3f} s = "
                  f"{chunks / secs:>10,.0f} chunks/s")
        print(f"broker / zmq.proxy = {rows['broker'] / rows['zmq.proxy']:.2f}")

        # Latency: the three paths take turns, round after round, so that load from other
        # processes on this machine falls on all of them alike; samples are pooled per path.
        n = int(args.rate * args.seconds)
        samples: dict[str, list[float]] = {"direct": [], "zmq.proxy": [], "broker": []}
        rates: dict[str, list[float]] = {name: [] for name in samples}
        for r in range(args.rounds):
            for name, run in (
                ("direct", lambda t: via_plain(t, 1, n, args.rate, proxy=False)),
                ("zmq.proxy", lambda t: via_plain(t, 1, n, args.rate, proxy=True)),
                ("broker", lambda t: via_broker(t, 1, n, args.rate)),
            ):
                sub = tmp / f"lat_{name.replace('.', '_')}_{r}"
                sub.mkdir()
                chunks, secs, values = run(sub)
                samples[name] += values
                rates[name].append(chunks / secs)
        lat = {name: (pct(v, 50), pct(v, 99)) for name, v in samples.items()}
        for name, (p50, p99) in lat.items():
            print(f"latency @ {statistics.mean(rates[name]):,.0f} chunks/s {name:10s} "
                  f"p50 {p50:7.1f} µs  p99 {p99:7.1f} µs  ({len(samples[name]):,d} chunks)")
        for name in ("zmq.proxy", "broker"):
            print(f"added by {name:10s} p50 {lat[name][0] - lat['direct'][0]:+7.1f} µs  "
                  f"p99 {lat[name][1] - lat['direct'][1]:+7.1f} µs")

    e2e = run_e2e(args.e2e_clients, args.e2e_concurrency, args.e2e_requests, args.e2e_tokens)
    print(f"end to end (echo worker, {args.e2e_clients} client processes x "
          f"{args.e2e_concurrency} streams, {args.e2e_tokens} chunks/request): "
          f"{e2e.chunks_per_s:,.0f} chunks/s, {e2e.requests_per_s:,.1f} requests/s, "
          f"p50 request {e2e.p50_ms:.1f} ms")
    print("  CPU per chunk / cores busy: " + ", ".join(
        f"{name} {us:.1f} µs / {cores:.2f}" for name, (us, cores) in e2e.cpu.items()))
    busy = sum(cores for _, cores in e2e.cpu.values())
    print(f"end to end / synthetic broker throughput = {e2e.chunks_per_s / rows['broker']:.2f}"
          f" (cores busy add up to {busy:.2f} of {os.cpu_count()}: near the total, the machine "
          "bounds it; else the process nearest 1.0)")


if __name__ == "__main__":
    main()
