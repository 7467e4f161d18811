"""One event-loop turn's chunks, grouped by client, out as one message per client.

With ``WorkerConfig.pack_chunks`` a worker does not send each chunk as it is made: the
chunks produced in one loop turn (one decode step of the gguf engine, whose outbox wakes
every sequence's task in the same turn; one tick of echo) wait here, grouped by the client
that asked (``Dispatch.client``), and ``flush`` sends them on the next turn: a group of one
as today's ``ROUTE_CHUNK`` message, a larger one as one ``ROUTE_PACK`` message whose body is
the msgpack of ``Pack``, built by concatenating the chunk bodies already encoded (see
``schemas/frames.py``). So a batch client with dozens of streams on this worker costs the
broker one message per step instead of one per token.

Ordering: a request's chunks all go to its client's group, in order. Any other send on the
link (a terminal, a heartbeat) flushes this buffer first (``link.py``), so a terminal never
overtakes its chunks. A held chunk is committed: it is never withdrawn except when the link
closes (the broker it was meant for is gone), exactly like a send waiting in the link's
backlog, so ``ChunkStream.sent`` stays exact.

Backpressure: while the link's backlog is not empty (the socket is full), ``add`` returns a
future that completes when this turn's messages have reached the socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tokenhive.schemas.frames import ROUTE_CHUNK, ROUTE_PACK, VERSION_FRAME

# A pack's caps: more chunks, or more bytes, for one client in one turn go out as several.
MAX_PACK_CHUNKS = 64
MAX_PACK_BYTES = 256 * 1024

# ``encode(Pack(chunks=[...]))`` is the 2-element array [tag "p", chunks]: these three bytes,
# then the array header of the chunks, then each chunk's own encoding.
PACK_HEAD = b"\x92\xa1p"

Enqueue = Callable[[list[bytes]], "asyncio.Future[None] | None"]


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def pack_body(bodies: list[bytes]) -> bytes:
    """The msgpack of ``Pack(chunks)`` from the chunks' own encodings, without re-encoding."""
    return PACK_HEAD + array_header(len(bodies)) + b"".join(bodies)


def pack_route(keys: list[bytes]) -> bytes:
    return ROUTE_PACK + b"".join(keys)


class _Group:
    """One client's chunks of this turn, in order."""

    __slots__ = ("bodies", "keys", "size")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.bodies: list[bytes] = []
        self.size = 0


class ChunkPacker:
    def __init__(self, enqueue: Enqueue, blocked: Callable[[], bool],
                 max_chunks: int = MAX_PACK_CHUNKS, max_bytes: int = MAX_PACK_BYTES) -> None:
        self._enqueue = enqueue  # the link's send, without flushing this buffer first
        self._blocked = blocked  # True while the link's backlog is not empty
        self.max_chunks = max_chunks
        self.max_bytes = max_bytes
        self._groups: dict[bytes, _Group] = {}
        self._scheduled = False
        self._waiter: asyncio.Future[None] | None = None  # backpressure for this turn
        self._last: asyncio.Future[None] | None = None  # latest message that had to wait
        self.packs = 0  # ROUTE_PACK messages sent (chunks in them: ``packed``)
        self.packed = 0

    @property
    def pending(self) -> bool:
        return bool(self._groups)

    def add(self, key: bytes, client: bytes, body: bytes) -> asyncio.Future[None] | None:
        """Hold one chunk (``body``, for the request with routing key ``key``) until the end
        of this loop turn. Returns a future to wait on while the link is backed up."""
        group = self._groups.get(client)
        if group is None:
            group = self._groups[client] = _Group()
        elif group.size + len(body) > self.max_bytes:
            self._send_group(group)  # full: out now, in order; later chunks start afresh
        group.keys.append(key)
        group.bodies.append(body)
        group.size += len(body)
        if len(group.keys) >= self.max_chunks:
            self._send_group(group)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._on_turn_end)
        if not self._blocked():
            return None
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def flush(self) -> None:
        """Send everything held, one message per client (more where a group hit a cap)."""
        groups = self._groups
        if groups:
            for group in groups.values():
                if group.keys:
                    self._send_group(group)
            groups.clear()
        self._release(self._last)
        self._last = None

    def drop(self) -> None:
        """The link closed: what is held was for a broker that is gone."""
        self._groups.clear()
        self._last = None
        if self._waiter is not None:
            self._waiter.cancel()
            self._waiter = None

    def _on_turn_end(self) -> None:
        self._scheduled = False
        self.flush()

    def _send_group(self, group: _Group) -> None:
        keys, bodies = group.keys, group.bodies
        if len(keys) == 1:
            frames = [VERSION_FRAME, ROUTE_CHUNK + keys[0], bodies[0]]
        else:
            frames = [VERSION_FRAME, pack_route(keys), pack_body(bodies)]
            self.packs += 1
            self.packed += len(keys)
        group.keys, group.bodies, group.size = [], [], 0
        waiting = self._enqueue(frames)
        if waiting is not None:
            self._last = waiting

    def _release(self, last: asyncio.Future[None] | None) -> None:
        """This turn's waiter completes when its last message reached the socket (the link's
        backlog is sent in order, so every earlier one has too)."""
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if last is None or last.done():
            if last is not None and last.cancelled():
                waiter.cancel()
            else:
                waiter.set_result(None)
            return

        def chain(done: asyncio.Future[None]) -> None:
            if waiter.done():
                return
            if done.cancelled():
                waiter.cancel()
            else:
                waiter.set_result(None)

        last.add_done_callback(chain)
