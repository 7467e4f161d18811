"""What CurveZMQ costs: chunks through the broker over tcp loopback, plain vs CURVE.

    .venv/bin/python -m bench.broker_curve [--chunks 200000] [--producers 1] [--rounds 3]

The same raw-zmq producers and consumer as ``bench.broker`` (throughput: producers stream as
fast as they can, the consumer counts chunks), but both links are tcp://127.0.0.1 and, on the
CURVE side, the broker runs with ``--curve-secret-key``/``--curve-allow`` and every peer
with a key pair from ``tokenhive keys generate``. The two variants take turns, round after
round, so that other load on the machine falls on both alike; the best round of each is
reported, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from bench.broker import MODEL, SLOTS, _stream, _wait_workers, consume
from tokenhive.schemas.frames import VERSION_FRAME, encode
from tokenhive.schemas.frames import broker_to_worker_decoder as worker_in
from tokenhive.schemas.messages import Dispatch, Ready, Request, Sampling, Submit
from tokenhive.transport import CurveKeys, load_curve_keys


def _curve_socket(ctx: zmq.Context[zmq.Socket[bytes]], keys: CurveKeys | None
                  ) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    if keys is not None:
        assert keys.server_public is not None
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    return sock


def producer(address: str, name: str, keys: CurveKeys | None) -> None:
    """A worker: Ready, then stream each Dispatch as fast as it can."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = _curve_socket(ctx, keys)
    sock.setsockopt(zmq.SNDHWM, 1_000_000)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    sock.send_multipart([VERSION_FRAME, b"", encode(Ready(worker=name, model=MODEL,
                                                          backend="bench", slots=SLOTS))])
    while True:
        msg = worker_in.decode(sock.recv_multipart()[1])
        if isinstance(msg, Dispatch):
            _stream(sock, msg.key, msg.request.id, msg.request.sampling.max_tokens or 0, 0)


def make_keys(tmp: Path) -> Path:
    allow = tmp / "allow"
    allow.mkdir()
    for name in ("broker", "peer"):
        subprocess.run([sys.executable, "-m", "tokenhive.clients.cli.main", "keys", "generate",
                        str(tmp / "keys"), "--name", name], check=True, capture_output=True)
    shutil.copy(tmp / "keys" / "peer.key", allow)
    return tmp / "keys"


def run_once(tmp: Path, keys_dir: Path, curve: bool, producers: int, chunks: int
             ) -> tuple[int, float]:
    ready = tmp / "ready.json"
    args = [sys.executable, "-m", "tokenhive.broker", "--clients", "tcp://127.0.0.1:0",
            "--workers", "tcp://127.0.0.1:0", "--ready-file", str(ready),
            "--heartbeat-interval", "5", "--log-level", "warning"]
    keys = None
    if curve:
        args += ["--curve-secret-key", str(keys_dir / "broker.key_secret"),
                 "--curve-allow", str(keys_dir.parent / "allow")]
        keys = load_curve_keys(keys_dir / "peer.key_secret", keys_dir / "broker.key")
    broker = subprocess.Popen(args)
    procs: list[mp.Process] = []
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = _curve_socket(ctx, keys)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if broker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("broker did not start")
            time.sleep(0.05)  # polling for the ready file
        info = json.loads(ready.read_text())
        procs = [mp.Process(target=producer, args=(info["workers"], f"p{i}", keys))
                 for i in range(producers)]
        for p in procs:
            p.start()
        sock.setsockopt(zmq.RCVHWM, 1_000_000)
        sock.connect(info["clients"])
        _wait_workers(sock, producers)
        requests = producers * SLOTS
        for i in range(requests):
            req = Request(id=f"r{i}", model=MODEL, prompt="x", timeout=600,
                          sampling=Sampling(max_tokens=chunks // requests))
            sock.send_multipart([VERSION_FRAME, encode(Submit(request=req))])
        got, secs, _ = consume(sock, requests, latency=False, frames=2)
        return got, secs
    finally:
        sock.close(linger=0)
        broker.terminate()
        broker.wait(timeout=10)
        for p in procs:
            p.kill()
            p.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=200_000)
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    mp.set_start_method("spawn")
    print(f"machine: {os.cpu_count()} cpus, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}"
          f", curve: {zmq.has('curve')}")
    best: dict[str, float] = {"plain": 0.0, "curve": 0.0}
    with tempfile.TemporaryDirectory(prefix="thc-") as d:
        tmp = Path(d)
        keys_dir = make_keys(tmp)
        for r in range(args.rounds):
            for name in best:
                sub = tmp / f"{name}-{r}"
                sub.mkdir()
                got, secs = run_once(sub, keys_dir, name == "curve", args.producers, args.chunks)
                print(f"round {r} {name:5s} {got:>9,d} chunks in {secs:6.3f} s = "
                      f"{got / secs:>10,.0f} chunks/s")
                best[name] = max(best[name], got / secs)
    print(f"best: plain {best['plain']:,.0f} chunks/s, curve {best['curve']:,.0f} chunks/s, "
          f"curve / plain = {best['curve'] / best['plain']:.2f}")


if __name__ == "__main__":
    main()
