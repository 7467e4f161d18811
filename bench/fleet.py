"""One broker's ceiling in GPU workers: a simulated fleet, per-chunk messages vs packed steps.

    .venv/bin/python -m bench.fleet [--workers 4,8,16,32,64,128,256] [--streams 48]
        [--step-hz 60] [--warmup 1] [--window 4] [--sim-procs 2] [--paths chunk,packed]
        [--out bench/results/fleet.json]

One broker process (``python -m tokenhive.broker``), ``--sim-procs`` processes hosting the
simulated GPU workers (``bench/fleet_peers.py``: each worker decodes ``--streams`` requests
at ``--step-hz`` steps per second, one token per request per step), and one batch client
process holding every stream. Per worker count and path, side by side:

* ``chunk``: one message per token, today's default;
* ``packed``: one message per step per client (``Pack``, what ``--pack-chunks`` workers send),
  forwarded by the broker without decoding.

Each point runs on a fresh broker: every stream flowing, ``--warmup`` s, then a ``--window``
s measurement: the broker's CPU (utime + stime from /proc, all its threads), chunks the
client got, and added latency (stamped at emission, taken at receipt; p50/p99 per chunk).
A path stops after its first saturated point (the client got under 95% of the offered
chunks, or the median chunk was over 100 ms late). The machine's cores are shared by the
broker, the simulators and the client, so besides the measured rows it prints the estimate
"workers one broker core carries" = 1 core / (broker cores per worker) at the path's largest
unsaturated point. Results are
also written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
import zmq

from bench.broker import start_broker
from bench.cpu import cpu_seconds
from bench.fleet_peers import ClientReport, percentile, run_client, run_workers
from tokenhive.schemas.frames import VERSION_FRAME, broker_to_client_decoder, encode
from tokenhive.schemas.messages import StatusQuery, StatusReply

# A point is past what the fleet carries when the client gets under this share of the offered
# chunks, or when the median chunk is this late (queues growing, not jitter).
SATURATED = 0.95
SATURATED_P50_US = 100_000.0


class Row(msgspec.Struct):
    path: str
    workers: int
    offered_chunks_s: float
    delivered_chunks_s: float
    messages_s: float  # broker -> client messages per second
    broker_cores: float  # CPU seconds per second of the window
    broker_us_per_chunk: float
    broker_us_per_message: float
    p50_us: float
    p99_us: float
    sims_cores: float
    client_cores: float
    sim_steps_skipped: int  # steps the simulators fell behind on (their own saturation)
    sends_refused: int  # simulator sends refused by a full pipe (the broker not reading)
    broker_chunks: int  # the broker's own counters at the end
    broker_packs: int
    stamps_checked: int  # client messages whose fast stamp parse a full decode confirmed
    saturated: bool
    # what gave out at a saturated point ("" if none): broker | simulators | client | machine
    # (none of them near a core: the machine's other work had the CPU)
    limit: str
    load_avg: float  # the machine's 1-minute load average at the end of the point


def _wait_registered(address: str, n: int, timeout: float = 60.0) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.send_multipart([VERSION_FRAME, encode(StatusQuery())])
            if sock.poll(5000):
                reply = broker_to_client_decoder.decode(sock.recv_multipart()[-1])
                if isinstance(reply, StatusReply) and len(reply.workers) >= n:
                    return
            time.sleep(0.1)  # polling interval
    finally:
        sock.close()
    raise SystemExit(f"{n} simulated workers did not register in {timeout}s")


def _last(pipe: Connection) -> tuple[int, int, int]:
    """The latest (steps, skipped, refused) a simulator process reported."""
    got = (0, 0, 0)
    while pipe.poll():
        got = pipe.recv()
    return got


def run_point(tmp: Path, path: str, workers: int, args: argparse.Namespace) -> Row:
    ctx = mp.get_context("spawn")
    broker, clients, worker_address = start_broker(tmp)
    procs: list[Any] = []
    sim_pipes: list[Connection] = []
    try:
        names = [f"sim{i:04d}" for i in range(workers)]
        for j in range(min(args.sim_procs, workers)):
            mine, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=run_workers, daemon=True, args=(
                worker_address, names[j::args.sim_procs], args.streams, args.step_hz,
                path == "packed", theirs))
            proc.start()
            procs.append(proc)
            sim_pipes.append(mine)
        _wait_registered(clients, workers)
        mine, theirs = ctx.Pipe(duplex=False)
        client = ctx.Process(target=run_client, daemon=True, args=(
            clients, workers * args.streams, args.warmup, args.window, theirs))
        client.start()
        procs.append(client)
        if not mine.poll(120) or mine.recv() != "start":
            raise SystemExit("the client's streams never all flowed")
        pids = {"broker": broker.pid, "client": client.pid}
        sims = [p.pid for p in procs[:-1]]
        before = {k: cpu_seconds(v) or 0.0 for k, v in pids.items()}
        sims_before = sum(cpu_seconds(p) or 0.0 for p in sims)
        skipped0 = sum(_last(p)[1] for p in sim_pipes)
        t0 = time.monotonic()
        if not mine.poll(args.window + 60) or mine.recv() != "end":
            raise SystemExit("the client did not finish its window")
        wall = time.monotonic() - t0
        after = {k: cpu_seconds(v) or 0.0 for k, v in pids.items()}
        sims_cpu = sum(cpu_seconds(p) or 0.0 for p in sims) - sims_before
        report = msgspec.msgpack.decode(mine.recv_bytes(), type=ClientReport)
        sim_stats = [_last(p) for p in sim_pipes]
    finally:
        for proc in procs:
            proc.kill()
            proc.join(timeout=10)
        broker.terminate()
        broker.wait(timeout=10)
    broker_cpu = after["broker"] - before["broker"]
    offered = workers * args.streams * args.step_hz
    delivered = report.chunks / report.window_s
    counters = report.status.counters if report.status is not None else {}
    p50 = percentile(report.hist, 0.50)
    skipped = sum(s[1] for s in sim_stats) - skipped0
    client_cores = (after["client"] - before["client"]) / wall
    saturated = delivered < SATURATED * offered or p50 > SATURATED_P50_US
    # The simulators share the cores: when they fell behind their own schedule, the point
    # says more about the machine than about the broker.
    broker_cores = broker_cpu / wall
    refused = sum(s[2] for s in sim_stats)
    limit = "" if not saturated else (
        "simulators" if skipped > 0.02 * workers * args.step_hz * wall
        else "broker" if broker_cores > 0.8 or refused
        else "client" if client_cores > 0.85
        else "machine")  # nobody near a core: other work on the machine took the CPU
    return Row(
        path=path, workers=workers, offered_chunks_s=offered, delivered_chunks_s=delivered,
        messages_s=report.messages / report.window_s, broker_cores=broker_cores,
        broker_us_per_chunk=broker_cpu / max(report.chunks, 1) * 1e6,
        broker_us_per_message=broker_cpu / max(report.messages, 1) * 1e6,
        p50_us=p50, p99_us=percentile(report.hist, 0.99),
        sims_cores=sims_cpu / wall, client_cores=client_cores, sim_steps_skipped=skipped,
        sends_refused=refused,
        broker_chunks=counters.get("chunks", 0), broker_packs=counters.get("packs", 0),
        stamps_checked=report.checked,
        saturated=saturated, limit=limit, load_avg=os.getloadavg()[0],
    )


def summarize(rows: list[Row]) -> dict[str, Any]:
    """Per path: CPU per chunk, where p99 doubles, workers per broker core."""
    out: dict[str, Any] = {}
    for path in dict.fromkeys(r.path for r in rows):
        mine = [r for r in rows if r.path == path]
        ok = [r for r in mine if not r.saturated] or mine[:1]
        base = mine[0].p99_us
        doubled = next((r.workers for r in mine if r.p99_us >= 2 * base), None)
        top = max(ok, key=lambda r: r.workers)  # the largest unsaturated point
        out[path] = {
            # at the largest point it carries: the broker's fixed costs (timers, heartbeats,
            # one wake-up per message at low rates) weigh least there
            "broker_us_per_chunk": top.broker_us_per_chunk,
            "broker_us_per_chunk_median": statistics.median(r.broker_us_per_chunk for r in ok),
            "p99_base_us": base,
            "p99_doubles_at_workers": doubled,
            "largest_unsaturated_workers": top.workers if not top.saturated else None,
            "saturated_at_workers": next((r.workers for r in mine if r.saturated), None),
            "saturated_by": next((r.limit for r in mine if r.saturated), None),
            "workers_per_broker_core": top.workers / top.broker_cores if top.broker_cores
            else None,
        }
    if {"chunk", "packed"} <= out.keys():
        c, p = out["chunk"], out["packed"]
        out["packed_vs_chunk"] = {
            "cpu_per_chunk": p["broker_us_per_chunk"] / c["broker_us_per_chunk"],
            "workers_per_core": (p["workers_per_broker_core"] / c["workers_per_broker_core"])
            if p["workers_per_broker_core"] and c["workers_per_broker_core"] else None,
        }
    return out


def _print_row(r: Row) -> None:
    print(f"{r.path:7s} {r.workers:5d} {r.offered_chunks_s:10,.0f} {r.delivered_chunks_s:10,.0f}"
          f" {r.messages_s:9,.0f} {r.broker_cores:6.2f} {r.broker_us_per_chunk:7.2f}"
          f" {r.broker_us_per_message:7.2f} {r.p50_us / 1000:8.2f} {r.p99_us / 1000:8.2f}"
          f" {r.sims_cores:5.2f} {r.client_cores:5.2f} {r.sim_steps_skipped:6d}"
          f" {r.load_avg:4.1f}{f'  saturated ({r.limit})' if r.saturated else ''}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="4,8,16,32,64,128,256",
                        help="worker counts, ascending")
    parser.add_argument("--streams", type=int, default=48, help="streams per worker")
    parser.add_argument("--step-hz", type=float, default=60.0,
                        help="decode steps per second per worker (tokens/s per stream)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=4.0, help="seconds measured per point")
    parser.add_argument("--sim-procs", type=int, default=2, help="simulator processes")
    parser.add_argument("--paths", default="chunk,packed")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fleet.json"))
    args = parser.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    paths = args.paths.split(",")
    print(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}; "
          f"{args.streams} streams x {args.step_hz:g} tokens/s per worker, "
          f"{args.sim_procs} simulator processes, 1 batch client", flush=True)
    print("path    workers  offered/s delivered/s  msgs/s  broker  us/chk  us/msg  p50 ms"
          "   p99 ms  sims client skipped load")
    rows: list[Row] = []
    live = set(paths)
    with tempfile.TemporaryDirectory(prefix="thf-") as d:
        for workers in counts:  # the paths take turns at each count: load falls on both
            for path in paths:
                if path not in live:
                    continue
                sub = Path(d) / f"{path}-{workers}"
                sub.mkdir()
                row = run_point(sub, path, workers, args)
                rows.append(row)
                _print_row(row)
                if row.saturated:
                    live.discard(path)
            if not live:
                break
    summary = summarize(rows)
    for path, s in summary.items():
        if path == "packed_vs_chunk":
            continue
        per_core = s["workers_per_broker_core"]
        by = f" (by the {s['saturated_by']})" if s["saturated_by"] else ""
        carries = f"~{per_core:,.0f}" if per_core else "?"
        print(f"{path:7s}: broker {s['broker_us_per_chunk']:.2f} µs CPU per chunk (at "
              f"{s['largest_unsaturated_workers']} workers); p99 "
              f"{s['p99_base_us'] / 1000:.2f} ms at {counts[0]} workers, doubled at "
              f"{s['p99_doubles_at_workers'] or 'none tested'}; saturated at "
              f"{s['saturated_at_workers'] or 'none tested'}{by}; one broker core carries "
              f"{carries} such workers")
    if "packed_vs_chunk" in summary:
        ratio = summary["packed_vs_chunk"]
        print(f"packed / chunk: CPU per chunk {ratio['cpu_per_chunk']:.3f}, workers per "
              f"broker core {ratio['workers_per_core'] or float('nan'):.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench.fleet",
                             *sys.argv[1:]]),
        "streams_per_worker": args.streams, "step_hz": args.step_hz, "window_s": args.window,
        "rows": [msgspec.to_builtins(r) for r in rows], "summary": summary,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
