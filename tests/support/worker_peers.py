"""Peers for worker-runtime tests: a FAKE broker, and the real worker as a subprocess.

``FakeBroker`` is a FAKE broker: a raw zmq ROUTER that plays the broker's side of the worker
protocol step by step, as the test says. It exists for what the real broker will not do on
demand: fall silent while staying bound, vanish and come back on the same address, send
Reregister or Rejected, dispatch beyond a worker's free slots, or dispatch the same key twice.
It speaks the real frame layout with the real codecs (``schemas/frames.py``), so the worker
cannot tell it from a broker. Like the real broker it pings every worker that has sent it a
Ready, but only while a test waits on it (``pinging=False`` makes it silent); unlike the real
one it never answers an unknown worker with Reregister by itself (tests send that). It keeps
every message it receives, so a test can wait for one kind of message without losing others.

``start_worker`` runs ``python -m tokenhive.workers`` as a real OS process, stderr (JSON log
lines) captured to a file.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq

from tokenhive.schemas.frames import (
    ROUTE_CHUNK,
    ROUTE_CONTROL,
    ROUTE_END,
    VERSION_FRAME,
    encode,
    stream_decoder,
    worker_msg_decoder,
)
from tokenhive.schemas.messages import (
    BrokerPing,
    BrokerToWorkerMsg,
    Chunk,
    Dispatch,
    Error,
    Final,
    Ready,
    Request,
    StreamMsg,
    WorkerMsg,
)


@dataclass
class Received:
    identity: bytes
    route: bytes  # b"" control, b"c"+key chunk, b"e"+key terminal
    msg: WorkerMsg | StreamMsg
    at: float  # time.monotonic() on arrival

    @property
    def key(self) -> bytes:
        return self.route[1:]


def short_ipc_dir() -> Path:
    """A fresh directory whose socket paths fit the ~107-byte limit of ipc addresses."""
    return Path(tempfile.mkdtemp(prefix="thw-", dir="/tmp"))


class FakeBroker:
    def __init__(self, address: str, *, ping_interval: float = 0.05) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a worker's fresh socket replaces its old
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone worker is an error
        self.sock.bind(address)
        self.address: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ping_interval = ping_interval
        self.pinging = True
        self.known: set[bytes] = set()  # identities that sent Ready: these get pings
        self.pending: collections.deque[Received] = collections.deque()
        self.seen: list[Received] = []  # everything, in arrival order
        self._next_ping = 0.0
        self._keys = 0

    # -- sending ---------------------------------------------------------------------------

    def send(self, identity: bytes, msg: BrokerToWorkerMsg) -> None:
        self.sock.send_multipart([identity, VERSION_FRAME, encode(msg)])

    def send_raw(self, identity: bytes, frames: list[bytes]) -> None:
        self.sock.send_multipart([identity, *frames])

    def dispatch(self, identity: bytes, request: Request, *, queued_ms: float = 0.0,
                 key: bytes | None = None) -> bytes:
        if key is None:
            self._keys += 1
            key = self._keys.to_bytes(8, "big")
        self.send(identity, Dispatch(key=key, request=request, queued_ms=queued_ms))
        return key

    # -- receiving -------------------------------------------------------------------------

    def _poll_once(self, timeout: float) -> Received | None:
        now = time.monotonic()
        if self.pinging and now >= self._next_ping:
            for identity in list(self.known):
                try:
                    self.send(identity, BrokerPing(at=time.time()))
                except zmq.ZMQError:  # EHOSTUNREACH: that worker is gone
                    self.known.discard(identity)
            self._next_ping = now + self.ping_interval
        wait_ms = max(0, int(min(timeout, self.ping_interval) * 1000))
        if not self.sock.poll(wait_ms):
            return None
        identity, version, route, body = self.sock.recv_multipart()
        assert version == VERSION_FRAME, f"worker sent version frame {version!r}"
        decoded: WorkerMsg | StreamMsg
        if route == ROUTE_CONTROL:
            decoded = worker_msg_decoder.decode(body)
            if isinstance(decoded, Ready):
                self.known.add(identity)
        else:
            assert route[:1] in (ROUTE_CHUNK, ROUTE_END), f"bad route frame {route!r}"
            decoded = stream_decoder.decode(body)
            assert isinstance(decoded, Chunk) == (route[:1] == ROUTE_CHUNK), (route, decoded)
        got = Received(identity, route, decoded, time.monotonic())
        self.seen.append(got)
        return got

    def pump(self, duration: float) -> None:
        """Keep receiving (and pinging) for ``duration`` seconds."""
        end = time.monotonic() + duration
        while (left := end - time.monotonic()) > 0:
            got = self._poll_once(left)
            if got is not None:
                self.pending.append(got)

    def expect(self, match: type | Callable[[Received], bool], timeout: float = 10.0,
               what: str = "") -> Received:
        """The first message (kept or new) that matches: a message type or a predicate."""
        def ok(r: Received) -> bool:
            return isinstance(r.msg, match) if isinstance(match, type) else match(r)

        for r in self.pending:
            if ok(r):
                self.pending.remove(r)
                return r
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            got = self._poll_once(left)
            if got is None:
                continue
            if ok(got):
                return got
            self.pending.append(got)
        recent = [type(r.msg).__name__ for r in self.seen[-20:]]
        raise AssertionError(f"no {what or match} within {timeout}s; recent: {recent}")

    def drop_pending(self) -> None:
        self.pending.clear()

    def collect(self, key: bytes, timeout: float = 10.0) -> tuple[list[Chunk], Final | Error]:
        """Every chunk of one request, in arrival order, and its terminal message."""
        chunks: list[Chunk] = []
        end = time.monotonic() + timeout
        while True:
            r = self.expect(
                lambda r: r.route[1:] == key and r.route[:1] in (ROUTE_CHUNK, ROUTE_END),
                timeout=max(0.0, end - time.monotonic()), what=f"stream of {key!r}",
            )
            if isinstance(r.msg, Chunk):
                chunks.append(r.msg)
            else:
                assert isinstance(r.msg, Final | Error)
                return chunks, r.msg

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> FakeBroker:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class WorkerProc:
    """A real ``python -m tokenhive.workers`` process."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenhive.workers", *args],
            stdout=subprocess.DEVNULL, stderr=self._log, env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> Iterator[dict[str, Any]]:
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                yield json.loads(line)


def start_worker(broker: str, log_dir: Path, *extra: str, model: str = "echo",
                 worker_id: str = "w1", slots: int = 2, interval: float = 0.1,
                 liveness: int = 50) -> WorkerProc:
    """An echo worker on ``broker`` with fast heartbeats; ``extra`` flags are appended."""
    args = [
        "--broker", broker, "--backend", "echo", "--model", model, "--id", worker_id,
        "--slots", str(slots), "--heartbeat-interval", str(interval),
        "--heartbeat-liveness", str(liveness), "--log-level", "debug", *extra,
    ]
    return WorkerProc(args, log_dir / f"{worker_id}.log")
