"""The simulated fleet of ``bench.fleet``: GPU-like workers and a batch client, as raw zmq.

Simulated workers are not worker runtimes: one process hosts many DEALER sockets, each a
worker that registers with Ready (``slots`` = streams it decodes together), takes
Dispatches, and on every decode step (``step_hz`` per second, each worker at its own phase,
as GPUs are not in lockstep) emits one token for every request it holds. A step goes out
either as one ``ROUTE_CHUNK`` message per chunk (the per-chunk path) or as one message per
client (``ROUTE_PACK``, the bytes ``workers/packer.py`` builds; a group of one stays a
chunk). Chunk bodies are encoded once per request; only the 19-digit emission stamp
(``time.monotonic_ns()``, the text) changes per step, so a step is one ``bytes.join``.

The batch client submits every stream at once, then reads. It finds each chunk's stamp at a
fixed offset (request ids have a fixed width) without decoding, and checks that against a
full msgspec decode every ``CHECK_EVERY`` messages. Latency = receipt - stamp (CLOCK_MONOTONIC
is system-wide), weighted per chunk, into a log histogram.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import time
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import zmq

from tokenhive import transport
from tokenhive.schemas.frames import (
    ROUTE_CHUNK,
    VERSION_FRAME,
    broker_to_client_decoder,
    encode,
)
from tokenhive.schemas.frames import broker_to_worker_decoder as worker_in
from tokenhive.schemas.messages import (
    CancelWork,
    Chunk,
    Dispatch,
    Heartbeat,
    Kind,
    Pack,
    Ping,
    Pong,
    Ready,
    Rejected,
    Request,
    Reregister,
    StatusQuery,
    StatusReply,
    Submit,
)
from tokenhive.transport import NOBLOCK
from tokenhive.workers.packer import MAX_PACK_CHUNKS, PACK_HEAD, array_header, pack_body, pack_route

MODEL = "fleet"
ID_WIDTH = 8  # request ids "00000042": the stamp sits at a fixed offset in every chunk
STAMP_ZERO = b"0" * 19
CHECK_EVERY = 101  # messages between full decodes that check the fast stamp parse
HEARTBEAT_S = 1.0

_TEMPLATE = encode(Chunk(id="0" * ID_WIDTH, seq=0, text=STAMP_ZERO.decode(), tokens=1))
STAMP_AT = _TEMPLATE.index(b"\xb3" + STAMP_ZERO) + 1  # after the fixstr header of the text


def chunk_parts(request_id: str) -> tuple[bytes, bytes]:
    """A request's chunk body, split around its stamp."""
    body = encode(Chunk(id=request_id, seq=0, text=STAMP_ZERO.decode(), tokens=1))
    at = body.index(b"\xb3" + STAMP_ZERO) + 1
    return body[:at], body[at + 19:]


# -- simulated workers ------------------------------------------------------------------------


class SimWorker:
    __slots__ = ("active", "name", "plan", "send", "sock")

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], address: str, name: str) -> None:
        self.name = name
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.send = transport.raw(self.sock).send
        # key -> (client, chunk body before the stamp, after it)
        self.active: dict[bytes, tuple[bytes, bytes, bytes]] = {}
        # what a step sends: (route, segments joined by the stamp), rebuilt on changes
        self.plan: list[tuple[bytes, list[bytes]]] = []


def _plan(worker: SimWorker, packed: bool) -> list[tuple[bytes, list[bytes]]]:
    if not packed:
        return [(ROUTE_CHUNK + key, [pre, post]) for key, (_, pre, post) in worker.active.items()]
    groups: dict[bytes, list[tuple[bytes, bytes, bytes]]] = {}
    for key, (client, pre, post) in worker.active.items():
        groups.setdefault(client, []).append((key, pre, post))
    plan = []
    for members in groups.values():
        for start in range(0, len(members), MAX_PACK_CHUNKS):
            part = members[start:start + MAX_PACK_CHUNKS]
            if len(part) == 1:
                key, pre, post = part[0]
                plan.append((ROUTE_CHUNK + key, [pre, post]))
                continue
            # [HEAD + hdr + pre0, post0 + pre1, ..., postN]: stamp.join() is the pack body
            segments = [PACK_HEAD + array_header(len(part)) + part[0][1]]
            segments += [part[i][2] + part[i + 1][1] for i in range(len(part) - 1)]
            segments.append(part[-1][2])
            stamp = b"%019d" % 1
            assert stamp.join(segments) == pack_body([p + stamp + q for _, p, q in part])
            plan.append((pack_route([k for k, _, _ in part]), segments))
    return plan


def _control(worker: SimWorker, msg: msgspec.Struct) -> None:
    worker.sock.send_multipart([VERSION_FRAME, b"", encode(msg)])


def _ready(worker: SimWorker, slots: int) -> None:
    _control(worker, Ready(worker=worker.name, model=MODEL, backend="sim", slots=slots))


def _on_message(worker: SimWorker, frames: list[bytes], slots: int, packed: bool) -> None:
    msg = worker_in.decode(frames[-1])
    if isinstance(msg, Dispatch):
        if len(worker.active) < slots:
            pre, post = chunk_parts(msg.request.id)
            worker.active[msg.key] = (msg.client, pre, post)
            worker.plan = _plan(worker, packed)
    elif isinstance(msg, CancelWork):
        if worker.active.pop(msg.key, None) is not None:
            worker.plan = _plan(worker, packed)
    elif isinstance(msg, Reregister):
        _ready(worker, slots)
    elif isinstance(msg, Rejected):
        print(f"{worker.name}: rejected: {msg.message}", flush=True)


def run_workers(address: str, names: list[str], slots: int, step_hz: float, packed: bool,
                out: Connection) -> None:
    """A process of simulated workers; runs until killed. Every second it reports
    (steps done, steps skipped for lag, sends refused by a full pipe) on ``out``."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    workers = [SimWorker(ctx, address, name) for name in names]
    poller = zmq.Poller()
    by_sock = {}
    for w in workers:
        poller.register(w.sock, zmq.POLLIN)
        by_sock[w.sock] = w
        _ready(w, slots)
    period = 1.0 / step_hz
    now = time.monotonic()
    due = [(now + random.uniform(0, period), i) for i in range(len(workers))]
    heapq.heapify(due)
    steps = skipped = refused = 0
    next_beat = now + HEARTBEAT_S
    more, last = zmq.SNDMORE | NOBLOCK, NOBLOCK
    while True:
        now = time.monotonic()
        while due[0][0] <= now:
            at, i = due[0]
            w = workers[i]
            send = w.send
            stamp = b"%019d" % time.monotonic_ns()
            for route, segments in w.plan:
                try:
                    send(VERSION_FRAME, more)
                    send(route, more)
                    send(stamp.join(segments), last)
                except zmq.Again:
                    refused += 1
            steps += 1
            at += period
            if at < now - period:  # fell behind by more than a step: skip, and say so
                skipped += int((now - at) / period)
                at = now + period
            heapq.heapreplace(due, (at, i))
        if now >= next_beat:
            next_beat = now + HEARTBEAT_S
            for w in workers:
                _control(w, Heartbeat(worker=w.name, free_slots=slots - len(w.active),
                                      in_flight=len(w.active)))
            out.send((steps, skipped, refused))
        wait_ms = max(1, math.ceil((due[0][0] - time.monotonic()) * 1000))
        for sock, _ in poller.poll(wait_ms):
            w = by_sock[sock]
            while sock.poll(0):
                _on_message(w, sock.recv_multipart(), slots, packed)


# -- the batch client ---------------------------------------------------------------------------

# Latency histogram: log buckets of 2% from 1 µs to 100 s.
BOUNDS = [1.02 ** i for i in range(int(math.log(1e8) / math.log(1.02)) + 1)]


class ClientReport(msgspec.Struct):
    chunks: int  # received in the window
    messages: int
    window_s: float
    hist: list[int]  # chunk counts per BOUNDS bucket (µs)
    checked: int  # messages whose fast stamp parse was checked against a full decode
    status: StatusReply | None = None


def percentile(hist: list[int], q: float) -> float:
    """The bucket bound (µs) below which ``q`` of the chunks fall."""
    total = sum(hist)
    if not total:
        return 0.0
    want, seen = q * total, 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= want:
            return BOUNDS[min(i, len(BOUNDS) - 1)]
    return BOUNDS[-1]


def _stamp_of(body: bytes) -> tuple[int, int] | None:
    """(stamp, chunks) of a chunk or pack body by offset; None for other messages."""
    if body[1:3] == b"\xa1c":
        return int(body[STAMP_AT:STAMP_AT + 19]), 1
    if body[:3] == PACK_HEAD:
        head = body[3]
        n, skip = (head & 0x0F, 1) if head & 0xF0 == 0x90 else (
            int.from_bytes(body[4:6], "big"), 3)
        at = 3 + skip + STAMP_AT
        return int(body[at:at + 19]), n
    return None


def _check(body: bytes, stamp: int, n: int) -> None:
    msg: Any = broker_to_client_decoder.decode(body)
    chunks = msg.chunks if isinstance(msg, Pack) else [msg]
    assert len(chunks) == n and int(chunks[0].text) == stamp, (msg, stamp, n)


def run_client(address: str, streams: int, warmup_s: float, window_s: float,
               out: Connection) -> None:
    """Submit ``streams`` requests, wait until every one streams and ``warmup_s`` more, tell
    ``out`` "start", measure ``window_s``, tell "end", then send the ClientReport."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1_000_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    for i in range(streams):
        request = Request(id=f"{i:0{ID_WIDTH}d}", model=MODEL, kind=Kind.COMPLETION,
                          prompt="x")
        sock.send_multipart([VERSION_FRAME, encode(Submit(request=request))])
    recv = transport.raw(sock).recv
    hist = [0] * (len(BOUNDS) + 1)
    seen: set[bytes] = set()
    phase, ready_at, t_end = "warming", math.inf, math.inf
    chunks = messages = checked = 0
    next_ping = time.monotonic() + 1.0
    status: StatusReply | None = None
    while status is None:
        sock.poll(50)
        now = time.monotonic()
        if now >= next_ping:  # the broker drops a client silent past client_liveness
            next_ping = now + 1.0
            sock.send_multipart([VERSION_FRAME, encode(Ping(at=time.time()))])
        if phase == "warming" and len(seen) == streams:
            if ready_at == math.inf:
                ready_at = now + warmup_s  # every stream flows: let the queues settle
            elif now >= ready_at:
                phase, t_end = "measuring", now + window_s
                out.send("start")
        elif phase == "measuring" and now >= t_end:
            phase = "done"
            out.send("end")
            sock.send_multipart([VERSION_FRAME, encode(StatusQuery())])
        while True:
            try:
                recv(NOBLOCK)
                body = recv(NOBLOCK)
            except zmq.Again:
                break
            got = _stamp_of(body)
            if got is None:
                msg = broker_to_client_decoder.decode(body)
                if isinstance(msg, StatusReply):
                    status = msg
                elif not isinstance(msg, Pong):
                    print(f"client: {msg}", flush=True)
                continue
            stamp, n = got
            if phase == "warming":
                if len(seen) < streams:
                    members = broker_to_client_decoder.decode(body)
                    for c in members.chunks if isinstance(members, Pack) else [members]:
                        seen.add(c.id.encode())
                continue
            if phase != "measuring":
                continue
            latency_us = (time.monotonic_ns() - stamp) / 1000
            hist[bisect.bisect_left(BOUNDS, latency_us)] += n
            chunks += n
            messages += 1
            if messages % CHECK_EVERY == 1:  # the first of the window, then every CHECK_EVERY
                _check(body, stamp, n)
                checked += 1
    out.send_bytes(msgspec.msgpack.encode(ClientReport(chunks, messages, window_s, hist, checked,
                                                 status)))
