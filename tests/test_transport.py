"""tokenhive.transport: socket options, endpoint resolution, the raw send/recv helpers.

Real sockets in one process (tcp on 127.0.0.1 and inproc); nothing waits on a clock except
``poll`` with a timeout for a message that must arrive.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from tests.support.procs import ipc_address
from tokenhive import transport
from tokenhive.broker.loop import BrokerServer
from tokenhive.schemas.config import BrokerConfig, Limits

KiB = 1024


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def recv_within(sock: zmq.Socket[Any], timeout_s: float = 5.0) -> list[bytes]:
    """The next whole message, through the raw helper; fails if none comes in time."""
    poller = zmq.Poller()  # the plain one: it takes zmq.asyncio sockets too
    poller.register(sock, zmq.POLLIN)
    assert poller.poll(int(timeout_s * 1000)), f"nothing received in {timeout_s}s"
    recv = transport.raw(sock).recv
    if sock.type == zmq.ROUTER:
        return transport.recv_routed(recv)
    return transport.recv_message(recv)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("given", "bound"), [
    ("tcp://127.0.0.1:0", "tcp://127.0.0.1:*"),
    ("tcp://*:0", "tcp://*:*"),
    ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
    ("tcp://127.0.0.1:50", "tcp://127.0.0.1:50"),  # a port ending in 0 is a real port
    ("ipc:///tmp/x:0", "ipc:///tmp/x:0"),
    ("inproc://a", "inproc://a"),
])
def test_bindable(given: str, bound: str) -> None:
    assert transport.bindable(given) == bound


@pytest.mark.timeout(10)
def test_bind_port_zero_reports_the_real_endpoint(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    server = transport.router(ctx)
    endpoint = transport.bind(server, "tcp://127.0.0.1:0")
    host, _, port = endpoint.rpartition(":")
    assert host == "tcp://127.0.0.1" and port.isdigit() and int(port) > 0
    assert endpoint == server.getsockopt(zmq.LAST_ENDPOINT).decode()  # type: ignore[union-attr]
    # and it is really there: a message crosses it
    peer = transport.dealer(ctx)
    transport.connect(peer, endpoint)
    transport.send_pair(transport.raw(peer).send, b"v", b"hello")
    ident, *frames = recv_within(server)
    assert ident and frames == [b"v", b"hello"]
    # a second bind to :0 gets another port
    other = transport.router(ctx)
    assert transport.bind(other, "tcp://127.0.0.1:0") != endpoint


@pytest.mark.timeout(10)
def test_router_options(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    sock = transport.router(ctx, hwm=1234, max_message_bytes=99 * KiB, linger_ms=7)
    assert sock.type == zmq.ROUTER
    assert sock.getsockopt(zmq.SNDHWM) == sock.getsockopt(zmq.RCVHWM) == 1234
    assert sock.getsockopt(zmq.MAXMSGSIZE) == 99 * KiB
    assert sock.getsockopt(zmq.LINGER) == 7
    assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
    assert sock.getsockopt(zmq.TCP_KEEPALIVE_IDLE) == transport.KEEPALIVE_IDLE_S
    assert sock.getsockopt(zmq.TCP_KEEPALIVE_INTVL) == transport.KEEPALIVE_INTVL_S
    assert sock.getsockopt(zmq.TCP_KEEPALIVE_CNT) == transport.KEEPALIVE_CNT
    # ROUTER_MANDATORY: a send to a peer that is not there raises instead of vanishing
    sock.bind("inproc://mandatory")
    with pytest.raises(zmq.ZMQError) as err:
        transport.send_pair(transport.raw(sock).send, b"nobody", b"body")
    assert err.value.errno == zmq.EHOSTUNREACH


@pytest.mark.timeout(10)
def test_dealer_options_and_defaults(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    plain = transport.dealer(ctx)
    assert plain.type == zmq.DEALER
    assert plain.getsockopt(zmq.SNDHWM) == transport.DEFAULT_HWM
    assert plain.getsockopt(zmq.MAXMSGSIZE) == transport.DEFAULT_MAX_MESSAGE_BYTES == 16 * 2**20
    assert plain.getsockopt(zmq.LINGER) == 0
    assert plain.getsockopt(zmq.TCP_KEEPALIVE) == 1
    assert plain.getsockopt(zmq.IMMEDIATE) == 0

    sock = transport.dealer(ctx, hwm=10, max_message_bytes=5000, linger_ms=100,
                            routing_id=b"w-1", immediate=True, reconnect_ivl_ms=50,
                            reconnect_ivl_max_ms=700)
    assert sock.getsockopt(zmq.SNDHWM) == sock.getsockopt(zmq.RCVHWM) == 10
    assert sock.getsockopt(zmq.MAXMSGSIZE) == 5000
    assert sock.getsockopt(zmq.LINGER) == 100
    assert sock.getsockopt(zmq.ROUTING_ID) == b"w-1"
    assert sock.getsockopt(zmq.IMMEDIATE) == 1
    assert sock.getsockopt(zmq.RECONNECT_IVL) == 50
    assert sock.getsockopt(zmq.RECONNECT_IVL_MAX) == 700


@pytest.mark.timeout(10)
def test_bad_max_message_bytes_is_refused(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        transport.router(ctx, max_message_bytes=0)
    with pytest.raises(ValueError, match="max_message_bytes"):
        transport.dealer(ctx, max_message_bytes=-1)


@pytest.mark.timeout(10)
def test_connect_failure_closes_the_socket(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    sock = transport.dealer(ctx)
    with pytest.raises(zmq.ZMQError):
        transport.connect(sock, "nonsense://x")
    assert sock.closed


@pytest.mark.timeout(10)
def test_asyncio_context_gets_asyncio_sockets_with_working_raw_io() -> None:
    ctx = zmq.asyncio.Context()
    try:
        a = transport.dealer(ctx)
        b = transport.dealer(ctx)
        assert isinstance(a, zmq.asyncio.Socket)
        a.bind("inproc://aio")
        b.connect("inproc://aio")
        transport.send_message(transport.raw(b).send, [b"1", b"2", b"3"])
        assert recv_within(a) == [b"1", b"2", b"3"]
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(10)
def test_send_is_all_or_nothing(ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path) -> None:
    # IMMEDIATE with no connection: nothing can be queued, so the first frame raises Again
    address = ipc_address(tmp_path, "later")
    sender = transport.dealer(ctx, immediate=True, reconnect_ivl_ms=10)
    transport.connect(sender, address)
    send = transport.raw(sender).send
    for attempt in (lambda: transport.send_message(send, [b"a", b"b", b"c"]),
                    lambda: transport.send_message(send, [b"only"]),
                    lambda: transport.send_pair(send, b"a", b"b"),
                    lambda: transport.send_triple(send, b"a", b"b", b"c")):
        with pytest.raises(zmq.Again):
            attempt()
    receiver = transport.dealer(ctx)
    transport.bind(receiver, address)
    # once connected, whole messages arrive, and none of the refused ones (or parts of them)
    assert sender.poll(5000, zmq.POLLOUT), "no connection"
    transport.send_triple(send, b"x", b"y", b"z")
    transport.send_message(send, [b"one"])
    received = [recv_within(receiver), recv_within(receiver)]
    assert received == [[b"x", b"y", b"z"], [b"one"]]
    with pytest.raises(zmq.Again):
        transport.recv_message(transport.raw(receiver).recv)


@pytest.mark.timeout(10)
def test_recv_helpers_return_whole_messages(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    router = transport.router(ctx)
    endpoint = transport.bind(router, "tcp://127.0.0.1:0")
    dealer = transport.dealer(ctx, routing_id=b"peer")
    transport.connect(dealer, endpoint)
    big = b"z" * (200 * KiB)  # above pyzmq's copy threshold: a zero-copy frame
    send = transport.raw(dealer).send
    transport.send_message(send, [b"a", big, b""])
    transport.send_message(send, [b"solo"])
    assert recv_within(router) == [b"peer", b"a", big, b""]
    assert recv_within(router) == [b"peer", b"solo"]
    with pytest.raises(zmq.Again):
        transport.recv_routed(transport.raw(router).recv)
    transport.send_triple(transport.raw(router).send, b"peer", b"back", b"again")
    assert recv_within(dealer) == [b"back", b"again"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("address", ["tcp://127.0.0.1:0", "ipc"])
def test_oversized_frame_drops_the_connection_not_the_socket(
    ctx: zmq.Context[zmq.Socket[bytes]], address: str, tmp_path: Path
) -> None:
    """A frame over MAXMSGSIZE never reaches the receiver: libzmq drops that connection at
    the frame's header. The sender's next message goes out on the reconnected link."""
    if address == "ipc":
        address = ipc_address(tmp_path, "oversized")
    router = transport.router(ctx, max_message_bytes=64 * KiB)
    endpoint = transport.bind(router, address)
    dealer = transport.dealer(ctx, reconnect_ivl_ms=10)
    transport.connect(dealer, endpoint)
    send = transport.raw(dealer).send
    transport.send_pair(send, b"v", b"\xff" * (4 * 2**20))
    transport.send_pair(send, b"v", b"small")
    _ident, *frames = recv_within(router, timeout_s=20)
    assert frames == [b"v", b"small"]
    transport.send_pair(send, b"v", b"x" * (64 * KiB))  # exactly the limit is fine
    assert recv_within(router)[1:] == [b"v", b"x" * (64 * KiB)]


@pytest.mark.timeout(10)
def test_broker_sockets_take_the_configured_limits() -> None:
    cfg = BrokerConfig(clients="inproc://c", workers="inproc://w", hwm=321,
                       limits=Limits(max_message_bytes=3 * 2**20))
    server = BrokerServer(cfg)
    try:
        for sock in (server.frontend, server.backend):
            assert sock.type == zmq.ROUTER
            assert sock.getsockopt(zmq.MAXMSGSIZE) == 3 * 2**20
            assert sock.getsockopt(zmq.SNDHWM) == sock.getsockopt(zmq.RCVHWM) == 321
            assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
    finally:
        server.close(linger_ms=0)
    # the default cap is transport's default
    assert BrokerConfig().limits.max_message_bytes == transport.DEFAULT_MAX_MESSAGE_BYTES


@pytest.mark.timeout(10)
def test_a_live_ipc_socket_is_never_taken_over(
    ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path
) -> None:
    address = f"ipc://{tmp_path}/run/workers.sock"  # the directory does not exist yet
    first_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()  # its own, to term() it below
    first = transport.router(first_ctx)
    try:
        assert transport.bind(first, address) == address
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700  # made private
        second = transport.router(ctx)
        try:
            with pytest.raises(zmq.ZMQError, match="another process is listening"):
                transport.bind(second, address)
        finally:
            second.close(linger=0)
    finally:
        first.close(linger=0)
        first_ctx.term()  # returns once the listener is really closed
    # the first broker is gone: a socket file left behind (a crash) is stale and reusable
    Path(tmp_path / "run" / "workers.sock").unlink(missing_ok=True)
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(tmp_path / "run" / "workers.sock"))  # bound, never listening
    leftover.close()
    third = transport.router(ctx)
    try:
        assert transport.bind(third, address) == address
    finally:
        third.close(linger=0)


@pytest.mark.timeout(10)
def test_an_ipc_path_that_is_not_a_socket_is_refused(
    ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path
) -> None:
    squatted = tmp_path / "workers.sock"
    squatted.write_text("not a socket")
    sock = transport.router(ctx)
    try:
        with pytest.raises(zmq.ZMQError, match="not a socket"):
            transport.bind(sock, f"ipc://{squatted}")
        assert squatted.read_text() == "not a socket"  # untouched
    finally:
        sock.close(linger=0)
