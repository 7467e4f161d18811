"""Packs: several requests' chunks of one decode step, for one client, in one worker message.

A packing worker (``workers/packer.py``) sends ``[VERSION, b"p" + key1 + key2 + ..., body]``
where ``body`` is the msgpack of ``Pack`` holding one chunk per key, in the keys' order. The
broker does for each key exactly what ``WorkerEvents.on_chunk`` does for one chunk (first
chunk time, counts, the worker's liveness) and forwards the body once, unchanged, to the
client: one dict lookup per chunk and one send per pack.

Rules, so a pack never carries more than a chunk would:

* The route must be ``b"p"`` and a whole number (1 to ``MAX_PACK_KEYS``) of 8-byte keys;
  anything else is a bad frame: counted and answered with Rejected, nothing forwarded.
* A key that is not in flight on this worker (the request was answered meanwhile, or it is
  another worker's) is a late chunk, as in ``on_chunk``: counted, and its chunk is not
  forwarded. Since the body is then no longer what the client may see, it is decoded and
  re-encoded without those chunks (rare: only after a cancel, deadline or requeue).
* Every live key must belong to the same client, else the whole pack is a bad frame.
"""

from __future__ import annotations

import msgspec

from tokenhive.broker import wire
from tokenhive.broker.inflight import KEY_BYTES
from tokenhive.broker.job import Job
from tokenhive.broker.state import BrokerState
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import ROUTE_CHUNK, encode
from tokenhive.schemas.messages import Pack

# A worker packs at most 64 chunks; a route this long is garbage, not a pack.
MAX_PACK_KEYS = 1024

_pack_decoder = msgspec.msgpack.Decoder(Pack)


class RouteMemo:
    """Route frame -> the chunk routes it names (``b"c" + key`` each: the in-flight table's
    keys). A worker sends the same route every step until its batch changes, so this saves
    the slicing and hashing per key. A pure function of the bytes, so it is never stale;
    bounded by the keys it holds (cleared when full; a worker cannot grow it)."""

    def __init__(self, max_keys: int = 65_536) -> None:
        self.max_keys = max_keys
        self._routes: dict[bytes, tuple[bytes, ...]] = {}
        self._keys = 0

    def __call__(self, route: bytes) -> tuple[bytes, ...] | None:
        """The chunk routes of a pack route, in order; None if it is not 1 to MAX_PACK_KEYS
        whole keys."""
        routes = self._routes.get(route)
        if routes is None:
            n, rest = divmod(len(route) - 1, KEY_BYTES)
            if rest or not 0 < n <= MAX_PACK_KEYS:
                return None
            routes = tuple([ROUTE_CHUNK + route[i:i + KEY_BYTES]
                            for i in range(1, len(route), KEY_BYTES)])
            if self._keys + n > self.max_keys:
                self._routes.clear()
                self._keys = 0
            self._routes[route] = routes
            self._keys += n
        return routes


chunk_routes = RouteMemo()


def on_pack(state: BrokerState, ident: bytes, route: bytes, body: bytes) -> None:
    """Forward a pack's body to its client (see the module docstring); ``state.now`` is
    fresh (the socket loop touched it), follow-ups are left for ``settle``."""
    routes = chunk_routes(route)
    if routes is None:
        _reject(state, ident, f"bad pack route: {len(route) - 1} key bytes is not 1 to "
                f"{MAX_PACK_KEYS} keys of {KEY_BYTES} bytes")
        return
    get = state.inflight.by_chunk_route.get
    jobs = [get(r) for r in routes]
    first = jobs[0]
    if first is not None and first.worker_ident == ident:
        client = first.client
        for job in jobs:
            if job is None or job.worker_ident != ident or job.client != client:
                break
        else:  # the usual case: every chunk live, this worker's, one client's
            _forward(state, jobs, client, body)  # type: ignore[arg-type]
            return
    _forward_some(state, ident, jobs, body)


def _forward(state: BrokerState, jobs: list[Job], client: bytes, body: bytes) -> None:
    """Per chunk what ``WorkerEvents.on_chunk`` does (first chunk time, gap metric, counts);
    then one send."""
    now = state.now
    gaps = state.metrics.gaps
    for job in jobs:
        if job.chunks:
            gaps.observe(now - job.last_at)  # a chunk's gap, as broker/metrics.py says
        else:
            job.first_at = now
        job.last_at = now
        job.chunks += 1
    state.chunks += len(jobs)
    jobs[0].worker.last_seen = now  # type: ignore[union-attr]  # in flight => has a worker
    if len(jobs) > 1:
        state.counts["packs"] += 1
    rc = state.sink.to_client(client, body)
    if rc:
        state.client_trouble(client, rc)


def _forward_some(state: BrokerState, ident: bytes, jobs: list[Job | None], body: bytes
                  ) -> None:
    """A pack with chunks that are not (or no longer) this worker's: those are late and cut
    out of the body; chunks of two clients make it a bad frame."""
    live = [j if j is not None and j.worker_ident == ident else None for j in jobs]
    kept = [j for j in live if j is not None]
    if len({j.client for j in kept}) > 1:
        _reject(state, ident, "a pack holds chunks of one client only")
        return
    state.counts["late_chunks"] += len(jobs) - len(kept)
    if not kept:
        if state.registry.get(ident) is None:
            state.ask_reregister(ident)
        return
    pruned = _without_dead(body, live)
    if pruned is None:
        _reject(state, ident, f"pack body does not hold the {len(jobs)} chunks its route names")
        return
    _forward(state, kept, kept[0].client, pruned)


def _without_dead(body: bytes, jobs: list[Job | None]) -> bytes | None:
    """The body again, without the chunks whose key is dead: a Pack of the live ones, or
    the one live Chunk alone. None when the body does not match the route."""
    try:
        pack = _pack_decoder.decode(body)
    except msgspec.DecodeError:
        return None
    if len(pack.chunks) != len(jobs):
        return None
    kept = [chunk for chunk, job in zip(pack.chunks, jobs, strict=True) if job is not None]
    return encode(kept[0]) if len(kept) == 1 else encode(Pack(chunks=kept))


def _reject(state: BrokerState, ident: bytes, message: str) -> None:
    """A bad frame: counted and told to the worker, as ``WorkerEvents._reject`` does."""
    state.counts["bad_frames"] += 1
    state.send_worker_ident(ident, wire.rejected_body(ErrorCode.INVALID_REQUEST, message))


