"""Packed chunks: a worker sends one decode step's chunks for one client as one message.

From the bytes up: the Pack body the worker builds by concatenation is exactly msgspec's
encoding of ``Pack``; the worker link groups one loop turn's chunks per client over a real
socket and never lets a terminal overtake them; the broker core's ``on_pack`` (driven
in-process with the recording sink of test_broker_core) forwards a pack once, counts each
chunk, and refuses or prunes what is not this worker's; and end to end, a real broker, a
real echo worker with ``--pack-chunks`` and real clients get every chunk in order with one
terminal each, whichever client and whatever is cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
import zmq

from bench.fleet import run_point
from tests.support.broker_peers import FakeClient
from tests.support.procs import Proc, ipc_address, start_broker
from tests.support.worker_peers import WorkerProc, start_worker
from tests.test_broker_core import C1, C2, Harness
from tests.test_pool_e2e import healthy, wait_status
from tokenhive.broker.packs import MAX_PACK_KEYS, RouteMemo, on_pack
from tokenhive.clients import NO_RETRY, AsyncClient
from tokenhive.schemas.frames import (
    ROUTE_CHUNK,
    ROUTE_END,
    ROUTE_PACK,
    VERSION_FRAME,
    broker_to_client_decoder,
    encode,
)
from tokenhive.schemas.messages import (
    Cancel,
    Chunk,
    Error,
    Final,
    Pack,
    Rejected,
    Reregister,
    Sampling,
    StatusReply,
)
from tokenhive.workers.link import BrokerLink
from tokenhive.workers.packer import MAX_PACK_CHUNKS, pack_body, pack_route

# -- the wire format -------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [2, 15, 16, 64, 65_539])  # fixarray, array16 and array32 headers
def test_pack_body_is_the_msgpack_of_pack(n: int) -> None:
    chunks = [Chunk(id=f"r{i % 7}", seq=i, text="tok", tokens=1, cumulative_tokens=i + 1)
              for i in range(n)]
    body = pack_body([encode(c) for c in chunks])
    assert body == encode(Pack(chunks=chunks))
    assert broker_to_client_decoder.decode(body) == Pack(chunks=chunks)


# -- the worker link, over a real socket -------------------------------------------------------


def _recv_n(router: zmq.Socket[bytes], n: int, timeout: float = 10.0) -> list[list[bytes]]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        if not router.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
            raise TimeoutError(f"got {len(got)} of {n} messages")
        got.append(router.recv_multipart())
    return got


@pytest.mark.timeout(60)
def test_link_packs_a_turn_per_client_and_flushes_before_a_terminal(tmp_path: Path) -> None:
    address = ipc_address(tmp_path, "link")
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(address)
    a, b = b"client-a", b"client-b"
    k1, k2, k3 = (bytes([i]) * 8 for i in (1, 2, 3))
    body = {name: encode(Chunk(id=name, seq=0, text=name)) for name in
            ("a1", "a2", "b1", "a3", "a4", *(f"m{i}" for i in range(130)))}
    final = encode(Final(id="k1", chunks=3))

    async def main() -> list[list[bytes]]:
        link = BrokerLink(address, b"w1", on_message=lambda frames: None)
        link.enable_packing()
        link.open()
        try:
            hello = link.send([VERSION_FRAME, b"", b"hello"])  # waits for the connection
            if hello is not None:
                await hello
            # one loop turn: two clients' chunks, a terminal in the middle, more after it
            link.send_packed(k1, a, body["a1"])
            link.send_packed(k2, a, body["a2"])
            link.send_packed(k3, b, body["b1"])
            link.send_packed(k1, a, body["a3"])
            link.send([VERSION_FRAME, ROUTE_END + k1, final])  # flushes what is held first
            link.send_packed(k2, a, body["a4"])
            for i in range(130):  # one client, one turn: over the 64-chunk cap
                link.send_packed(k3, b, body[f"m{i}"])
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, _recv_n, router, 1 + 3 + 1 + 3)
        finally:
            link.terminate()

    try:
        got = uvloop.run(main())
    finally:
        router.close()
    assert all(m[0] == b"w1" and m[1] == VERSION_FRAME for m in got)
    routes = [m[2] for m in got[1:]]
    bodies = [m[3] for m in got[1:]]
    assert routes[0] == pack_route([k1, k2, k1])
    assert bodies[0] == pack_body([body["a1"], body["a2"], body["a3"]])
    assert routes[1] == ROUTE_CHUNK + k3 and bodies[1] == body["b1"]  # one chunk: as today
    assert routes[2] == ROUTE_END + k1 and bodies[2] == final  # after its chunks, never before
    # after the terminal: client a's one chunk, and client b's 130 in packs of at most 64
    # (a full pack leaves at once; order is kept per client, not across clients)
    later = list(zip(routes[3:], bodies[3:], strict=True))
    assert [(r, x) for r, x in later if r[:1] == ROUTE_CHUNK] == [(ROUTE_CHUNK + k2, body["a4"])]
    packs = [(r, x) for r, x in later if r[:1] == ROUTE_PACK]
    sizes = [(len(r) - 1) // 8 for r, _ in packs]
    assert sizes == [MAX_PACK_CHUNKS, MAX_PACK_CHUNKS, 130 - 2 * MAX_PACK_CHUNKS]
    members = [broker_to_client_decoder.decode(x) for _, x in packs]
    assert [c.id for p in members for c in p.chunks] == [f"m{i}" for i in range(130)]


@pytest.mark.timeout(60)
def test_a_full_socket_holds_packing_chunks_back_without_losing_or_reordering(
        tmp_path: Path) -> None:
    """A peer that does not read: the link's backlog fills, ``send_packed`` hands out a
    future (backpressure), and once the peer reads, every chunk arrives, in order."""
    address = ipc_address(tmp_path, "full")
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, 2)
    router.bind(address)
    big = "x" * 65_536  # fills the pipe and the kernel's socket buffers in a few dozen sends
    keys = [bytes([i]) * 8 for i in range(3)]

    async def main() -> tuple[int, list[list[bytes]]]:
        link = BrokerLink(address, b"w1", on_message=lambda frames: None, hwm=2)
        link.enable_packing()
        link.open()
        try:
            hello = link.send([VERSION_FRAME, b"", b"hello"])
            if hello is not None:
                await hello
            waiter = None
            sent = 0
            while waiter is None and sent < 10_000:
                body = encode(Chunk(id=f"r{sent % 3}", seq=sent // 3, text=big))
                client = b"client-a" if sent % 3 < 2 else b"client-b"  # r0 and r1 share packs
                waiter = link.send_packed(keys[sent % 3], client, body)
                sent += 1
                if sent % 3 == 0:
                    link.send([VERSION_FRAME, b"", b"tick"])  # flushes what is held first
            assert waiter is not None, "the socket never filled up"
            link.send([VERSION_FRAME, b"", b"last"])
            assert not waiter.done()  # nobody reads yet: the caller really waits
            # hello; per whole turn a pack (r0, r1), a chunk (r2) and a tick; what the last
            # turn held (one message); "last"
            expect = 1 + 3 * (sent // 3) + (1 if sent % 3 else 0) + 1
            reader = asyncio.get_running_loop().run_in_executor(
                None, _recv_n, router, expect, 30.0)
            await waiter  # completes once the peer has read enough
            return sent, await reader
        finally:
            link.terminate()

    try:
        sent, got = uvloop.run(main())
    finally:
        router.close()
    chunks = []
    for m in got[1:]:
        if m[2][:1] in (ROUTE_CHUNK, ROUTE_PACK):
            msg = broker_to_client_decoder.decode(m[3])
            chunks += msg.chunks if isinstance(msg, Pack) else [msg]
    assert len(chunks) == sent
    assert sum(m[2][:1] == ROUTE_PACK for m in got) == sent // 3 + (sent % 3 == 2)
    for rid in ("r0", "r1", "r2"):
        seqs = [c.seq for c in chunks if c.id == rid]
        assert seqs == list(range(len(seqs)))
    controls = [m[3] for m in got[1:] if m[2] == b""]
    assert controls[-1] == b"last" and len(controls) == sent // 3 + 1


# -- the broker core's on_pack, in-process -------------------------------------------------------

W1, W2 = b"w1", b"w2"


def _dispatched(h: Harness, ident: bytes) -> dict[str, bytes]:
    """request id -> routing key of what the harness dispatched to ``ident``."""
    return {d.request.id: d.key for d in h.dispatches(ident)}


def _pack(h: Harness, ident: bytes, route: bytes, body: bytes) -> None:
    h.core.touch()
    on_pack(h.core.state, ident, route, body)  # as the loop's hot path calls it
    h.core.settle()


def _chunk_body(rid: str, seq: int = 0) -> bytes:
    return encode(Chunk(id=rid, seq=seq, text=f"{rid}:{seq}", tokens=1))


@pytest.mark.timeout(30)
def test_on_pack_forwards_the_body_once_and_counts_every_chunk() -> None:
    h = Harness()
    h.ready(W1, slots=4)
    for rid in ("r1", "r2"):
        h.submit(rid)
    keys = _dispatched(h, W1)
    body = pack_body([_chunk_body("r1"), _chunk_body("r2"), _chunk_body("r1", 1)])
    before = len(h.sink.clients)
    _pack(h, W1, pack_route([keys["r1"], keys["r2"], keys["r1"]]), body)
    assert h.sink.clients[before:] == [(C1, body)]  # byte for byte, one message
    status = h.status()
    assert status.counters["packs"] == 1 and status.counters["chunks"] == 3
    assert status.counters["late_chunks"] == 0 and status.counters["bad_frames"] == 0
    h.final(W1, keys["r1"], "r1", chunks=2)
    h.final(W1, keys["r2"], "r2", chunks=1)
    assert isinstance(h.last("r1"), Final) and isinstance(h.last("r2"), Final)
    assert h.status().counters["completed"] == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("route", [ROUTE_PACK, ROUTE_PACK + b"k" * 7, ROUTE_PACK + b"k" * 12,
                                   ROUTE_PACK + b"k" * 8 * (MAX_PACK_KEYS + 1)])
def test_on_pack_refuses_a_route_that_is_not_whole_keys(route: bytes) -> None:
    h = Harness()
    h.ready(W1, slots=2)
    h.submit("r1")
    before = len(h.sink.clients)
    _pack(h, W1, route, pack_body([_chunk_body("r1"), _chunk_body("r1", 1)]))
    assert h.sink.clients[before:] == []
    assert h.status().counters["bad_frames"] == 1
    rejected = h.sink.worker_msgs(W1, Rejected)
    assert len(rejected) == 1 and "bad pack route" in rejected[0].message
    assert h.core.inflight.by_end_route and all(
        j.chunks == 0 for j in h.core.inflight.by_end_route.values())


@pytest.mark.timeout(30)
def test_on_pack_never_forwards_another_workers_chunk() -> None:
    h = Harness()
    h.ready(W1, slots=1)
    h.ready(W2, slots=1)
    h.submit("r1")
    h.submit("r2")
    keys = {**_dispatched(h, W1), **_dispatched(h, W2)}
    mine = next(iter(_dispatched(h, W1)))
    theirs = next(iter(_dispatched(h, W2)))
    before = len(h.sink.clients)
    # only the other worker's key: nothing forwarded
    _pack(h, W1, pack_route([keys[theirs], keys[theirs]]),
          pack_body([_chunk_body(theirs), _chunk_body(theirs, 1)]))
    assert h.sink.clients[before:] == []
    # mixed: the client gets this worker's chunk alone, not the other's
    _pack(h, W1, pack_route([keys[mine], keys[theirs]]),
          pack_body([_chunk_body(mine), _chunk_body(theirs, 2)]))
    sent = h.sink.clients[before:]
    assert sent == [(C1, _chunk_body(mine))]
    counters = h.status().counters
    assert counters["late_chunks"] == 3 and counters["chunks"] == 1 and counters["packs"] == 0
    jobs = {j.id: j for j in h.core.inflight.by_end_route.values()}
    assert jobs[mine].chunks == 1 and jobs[theirs].chunks == 0


@pytest.mark.timeout(30)
def test_on_pack_prunes_the_chunks_of_requests_already_answered() -> None:
    h = Harness()
    h.ready(W1, slots=3)
    for rid in ("r1", "r2", "r3"):
        h.submit(rid)
    keys = _dispatched(h, W1)
    h.client(C1, Cancel(id="r2"))
    before = len(h.sink.clients)
    _pack(h, W1, pack_route([keys["r1"], keys["r2"], keys["r3"]]),
          pack_body([_chunk_body("r1"), _chunk_body("r2"), _chunk_body("r3")]))
    sent = h.sink.clients[before:]
    assert len(sent) == 1 and sent[0][0] == C1
    assert broker_to_client_decoder.decode(sent[0][1]) == Pack(chunks=[
        broker_to_client_decoder.decode(_chunk_body("r1")),
        broker_to_client_decoder.decode(_chunk_body("r3"))])
    counters = h.status().counters
    assert counters["late_chunks"] == 1 and counters["chunks"] == 2 and counters["packs"] == 1


@pytest.mark.timeout(30)
def test_route_memo_splits_routes_and_stays_within_its_bound() -> None:
    memo = RouteMemo(max_keys=5)
    routes = [pack_route([bytes([r, k]) * 4 for k in range(3)]) for r in range(4)]
    for _ in range(2):  # the second round finds some cached, some cleared: same answers
        for r, route in enumerate(routes):
            assert memo(route) == tuple(ROUTE_CHUNK + bytes([r, k]) * 4 for k in range(3))
            assert memo._keys <= 5
    assert memo(ROUTE_PACK + b"k" * 9) is None and memo(ROUTE_PACK) is None


@pytest.mark.timeout(30)
def test_on_pack_refuses_a_pack_for_two_clients() -> None:
    h = Harness()
    h.ready(W1, slots=2)
    h.submit("r1", ident=C1)
    h.submit("r2", ident=C2)
    keys = _dispatched(h, W1)
    before = len(h.sink.clients)
    _pack(h, W1, pack_route([keys["r1"], keys["r2"]]),
          pack_body([_chunk_body("r1"), _chunk_body("r2")]))
    assert h.sink.clients[before:] == []
    assert h.status().counters["bad_frames"] == 1 and h.status().counters["chunks"] == 0
    assert len(h.sink.worker_msgs(W1, Rejected)) == 1


@pytest.mark.timeout(30)
def test_on_pack_from_an_unknown_worker_asks_it_to_register() -> None:
    h = Harness()
    _pack(h, b"stranger", pack_route([b"k" * 8, b"j" * 8]),
          pack_body([_chunk_body("x"), _chunk_body("y")]))
    assert h.status().counters["late_chunks"] == 2
    assert len(h.sink.worker_msgs(b"stranger", Reregister)) == 1
    assert h.sink.clients == []


# -- end to end: real broker, real echo worker, real clients ----------------------------------


@pytest.fixture
def pool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Proc, WorkerProc]]:
    """A broker and one echo worker with 16 slots; ``request.param``: (packing, extra flags)."""
    packing, extra = request.param
    broker = start_broker(tmp_path, heartbeat_interval=0.5)
    flags = [*extra, *(["--pack-chunks"] if packing else [])]
    worker = start_worker(broker.workers, tmp_path, *flags, slots=16, interval=0.2)
    try:
        yield broker, worker
    finally:
        worker.stop()
        broker.terminate()


def _wait_ready(client: FakeClient, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w.health == "ok" for w in client.status().workers):
            return
        time.sleep(0.05)  # polling interval, not synchronisation
    raise TimeoutError("the worker did not register")


def _collect(client: FakeClient, ids: set[str], timeout: float = 30.0, cancel: str = ""
             ) -> tuple[dict[str, list[Chunk]], dict[str, list[Final | Error]], list[Pack]]:
    """Chunks (packs opened) and terminals per id until every id in ``ids`` has a terminal;
    ``cancel``: the id to cancel once its first chunk arrived."""
    chunks: dict[str, list[Chunk]] = {i: [] for i in ids}
    ends: dict[str, list[Final | Error]] = {i: [] for i in ids}
    packs: list[Pack] = []
    deadline = time.monotonic() + timeout
    while any(not ends[i] for i in ids):
        msg = client.recv(max(0.0, deadline - time.monotonic()))
        members = msg.chunks if isinstance(msg, Pack) else [msg]
        if isinstance(msg, Pack):
            packs.append(msg)
        for m in members:
            if isinstance(m, Chunk):
                assert not ends[m.id], f"a chunk of {m.id} after its terminal"
                chunks[m.id].append(m)
                if m.id == cancel and len(chunks[m.id]) == 1:
                    client.cancel(cancel)
            elif isinstance(m, (Final, Error)):
                ends[m.id].append(m)
    return chunks, ends, packs


TOKENS = 40


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", [(True, ()), (False, ())], indirect=True,
                         ids=["packed", "per-chunk"])
def test_sixteen_streams_of_one_client_each_get_every_chunk_once(
        pool: tuple[Proc, WorkerProc], request: pytest.FixtureRequest) -> None:
    broker, _ = pool
    packing = request.node.callspec.id == "packed"
    ids = {f"r{i}" for i in range(16)}
    with FakeClient(broker.clients) as client:
        _wait_ready(client)
        for rid in sorted(ids):
            client.submit(rid, model="echo", prompt=" ".join(f"{rid}w{j}" for j in range(TOKENS)))
        chunks, ends, packs = _collect(client, ids)
        for rid in ids:
            (end,) = ends[rid]
            assert isinstance(end, Final), end
            assert [c.seq for c in chunks[rid]] == list(range(TOKENS))
            assert end.chunks == TOKENS and end.usage.completion_tokens == TOKENS
            assert "".join(c.text for c in chunks[rid]) == " ".join(
                f"{rid}w{j}" for j in range(TOKENS))
        status = client.status()
    assert status.counters["chunks"] == 16 * TOKENS
    assert status.counters["late_chunks"] == 0 and status.counters["bad_frames"] == 0
    if packing:
        assert status.counters["packs"] > 0 and len(packs) == status.counters["packs"]
        # one decode turn of several requests shares a message
        assert any(len({c.id for c in p.chunks}) > 1 for p in packs), [
            [c.id for c in p.chunks] for p in packs[:5]]
    else:
        assert status.counters["packs"] == 0 and packs == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", [(True, ())], indirect=True)
def test_two_clients_on_one_packing_worker_get_only_their_own_chunks(
        pool: tuple[Proc, WorkerProc]) -> None:
    """The same request ids on two clients, different prompts: a chunk delivered to the
    wrong client would land in a stream of the same id with the other client's text."""
    broker, _ = pool

    async def streams(client: AsyncClient, who: str) -> dict[str, str]:
        async def one(i: int) -> tuple[str, str]:
            stream = client.stream(prompt=" ".join(f"{who}{i}w{j}" for j in range(30)),
                                   request_id=f"r{i}", timeout=60)
            return f"r{i}", "".join([c.text async for c in stream])
        return dict(await asyncio.gather(*(one(i) for i in range(8))))

    async def main() -> tuple[list[dict[str, str]], StatusReply, list[int]]:
        async with AsyncClient(broker.clients, model="echo", retry=NO_RETRY) as alice, \
                AsyncClient(broker.clients, model="echo", retry=NO_RETRY) as bob:
            await wait_status(alice, healthy(1))
            got = await asyncio.gather(streams(alice, "alice"), streams(bob, "bob"))
            return list(got), await alice.status(timeout=5), [
                alice.stats.unknown_id, bob.stats.unknown_id]

    (texts_a, texts_b), status, unknown = uvloop.run(main())
    for who, texts in (("alice", texts_a), ("bob", texts_b)):
        assert texts == {f"r{i}": " ".join(f"{who}{i}w{j}" for j in range(30))
                         for i in range(8)}
    assert unknown == [0, 0]
    assert status.counters["packs"] > 0 and status.counters["chunks"] == 16 * 30


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", [(True, ("--option", "tokens_per_s=100",
                                          "--option", "tokens=100"))], indirect=True)
def test_a_cancel_mid_stream_ends_with_exactly_one_terminal(
        pool: tuple[Proc, WorkerProc]) -> None:
    broker, _ = pool
    ids = {"r0", "r1", "r2", "r3"}
    with FakeClient(broker.clients) as client:
        _wait_ready(client)
        for rid in sorted(ids):
            client.submit(rid, model="echo")
        chunks, ends, _ = _collect(client, ids, cancel="r0")
        (end,) = ends["r0"]
        assert isinstance(end, Error) and end.code == "cancelled"
        assert 0 < len(chunks["r0"]) < 100
        for rid in ids - {"r0"}:
            (final,) = ends[rid]
            assert isinstance(final, Final) and final.chunks == 100 == len(chunks[rid])
        status = client.status()
        # nothing more arrives for r0: the status reply came after everything queued before it
        assert not any(isinstance(m, (Chunk, Final, Error)) and m.id == "r0"
                       for m in client.held())
    assert status.counters["cancelled"] == 1 and status.counters["completed"] == 3


@pytest.mark.timeout(120)
def test_a_gguf_worker_packs_one_decode_step_of_several_sequences(
        tmp_path: Path, tiny_gguf: Path) -> None:
    """The real engine: a step decodes every slot's sequence, and its tokens for one client
    leave the worker as one message."""
    broker = start_broker(tmp_path, heartbeat_interval=0.5)
    args = ["--broker", broker.workers, "--id", "g0", "--heartbeat-interval", "0.2",
            "--pack-chunks", "--log-level", "debug", "--spec-json", json.dumps({
                "backend": "gguf", "model": "tiny", "n_ctx": 256, "n_threads": 1,
                "slots": 4, "path": str(tiny_gguf)})]
    worker = WorkerProc(args, tmp_path / "g0.log")
    ids = {f"g{i}" for i in range(4)}
    try:
        with FakeClient(broker.clients) as client:
            _wait_ready(client, timeout=60)
            for rid in sorted(ids):
                client.submit(rid, model="tiny", prompt="hello world",
                              sampling=Sampling(max_tokens=24, temperature=0.0))
            chunks, ends, packs = _collect(client, ids, timeout=60)
            status = client.status()
    finally:
        worker.stop()
        broker.terminate()
    texts = set()
    for rid in ids:
        (end,) = ends[rid]
        assert isinstance(end, Final), end
        assert end.chunks == len(chunks[rid]) > 0 and end.usage.completion_tokens == 24
        assert [c.seq for c in chunks[rid]] == list(range(end.chunks))
        texts.add("".join(c.text for c in chunks[rid]))
    assert len(texts) == 1  # greedy, same prompt: the packing changed no text
    assert any(len({c.id for c in p.chunks}) > 1 for p in packs)
    assert status.counters["packs"] == len(packs) > 0
    assert status.counters["chunks"] == sum(len(c) for c in chunks.values())


@pytest.mark.timeout(120)
def test_fleet_bench_measures_both_paths_through_a_real_broker(tmp_path: Path) -> None:
    """bench.fleet's own machinery at a tiny size: the simulated workers' steps reach the
    client whole on both paths, one message per step and client when packed, and the fast
    stamp parse agrees with msgspec's decode."""
    args = argparse.Namespace(streams=4, step_hz=50.0, warmup=0.2, window=1.0, sim_procs=2)
    rows = {}
    for path in ("chunk", "packed"):
        (tmp_path / path).mkdir()
        rows[path] = run_point(tmp_path / path, path, 2, args)
    for row in rows.values():
        assert row.offered_chunks_s == 2 * 4 * 50
        assert row.delivered_chunks_s == pytest.approx(row.offered_chunks_s, rel=0.25)
        assert row.stamps_checked > 0 and 0 < row.p50_us <= row.p99_us
        assert row.broker_chunks >= row.delivered_chunks_s * args.window  # the whole run's
    chunk, packed = rows["chunk"], rows["packed"]
    assert chunk.broker_packs == 0 and chunk.messages_s == pytest.approx(chunk.delivered_chunks_s)
    # packed: one message per worker step (4 streams of one client each)
    assert packed.broker_packs > 0
    assert packed.messages_s == pytest.approx(packed.delivered_chunks_s / 4, rel=0.05)
