"""Raw zmq peers of the broker, for tests: a worker and a client made of one DEALER each.

They are honest peers, not mocks: real sockets, the real frame layout and the real msgspec
codecs of ``tokenhive.schemas``. What they do is scripted by the test (when to stream, what
to send, when to die), which is exactly what the real worker and client cannot do on demand.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import (
    ROUTE_CHUNK,
    ROUTE_CONTROL,
    ROUTE_END,
    VERSION_FRAME,
    broker_to_client_decoder,
    broker_to_worker_decoder,
    encode,
)
from tokenhive.schemas.messages import (
    BrokerPing,
    BrokerToClientMsg,
    BrokerToWorkerMsg,
    Cancel,
    CancelWork,
    Chunk,
    Dispatch,
    Error,
    Final,
    Goodbye,
    Health,
    Heartbeat,
    Kind,
    Ping,
    Ready,
    Request,
    StatusQuery,
    StatusReply,
    Submit,
)

T = TypeVar("T")
_context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()


class FakeWorker:
    """A scripted worker: a DEALER plus a thread that owns it.

    The thread sends a Heartbeat every ``heartbeat`` seconds (until ``silence()``), counts
    BrokerPings, and queues every other broker message for ``expect``. Everything the test
    sends goes through the thread too, so the socket is only ever used by one thread.

    With ``auto_chunks=n`` it behaves like an echo worker instead: every Dispatch is
    streamed by the thread as n chunks (``"<id>:<seq>"``, ``chunk_bytes`` long) and a Final,
    all active requests interleaved chunk by chunk; a CancelWork ends that stream with an
    Error(cancelled), as a real worker does.
    """

    def __init__(
        self,
        address: str,
        *,
        name: str = "w1",
        model: str = "m",
        slots: int = 1,
        kinds: list[Kind] | None = None,
        heartbeat: float = 0.1,
        identity: bytes | None = None,
        health: Health = Health.OK,
        auto_chunks: int | None = None,
        chunk_bytes: int = 0,
    ) -> None:
        self.address = address
        self.name = name
        self.model = model
        self.slots = slots
        self.kinds = kinds or [Kind.CHAT, Kind.COMPLETION]
        self.heartbeat_interval = heartbeat
        self.health = health
        self.pings = 0
        self.received: list[BrokerToWorkerMsg] = []  # everything but pings, in order
        self._identity = identity
        self.auto_chunks = auto_chunks
        self.chunk_bytes = chunk_bytes
        self._active: dict[bytes, list[Any]] = {}  # auto mode: key -> [request id, next seq]
        self._inbox: queue.Queue[BrokerToWorkerMsg] = queue.Queue()
        self._held: deque[BrokerToWorkerMsg] = deque()  # received but not yet expected
        self._outbox: queue.Queue[list[bytes]] = queue.Queue()
        self._beating = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fake-worker-{name}", daemon=True)
        self._thread.start()

    # -- sending ---------------------------------------------------------------------------

    def send_frames(self, frames: list[bytes]) -> None:
        self._outbox.put(frames)

    def control(self, msg: msgspec.Struct) -> None:
        self.send_frames([VERSION_FRAME, ROUTE_CONTROL, encode(msg)])

    def ready(self, *, heartbeats: bool = True, **overrides: Any) -> None:
        fields: dict[str, Any] = dict(worker=self.name, model=self.model, backend="fake",
                                      slots=self.slots, kinds=self.kinds, health=self.health)
        fields.update(overrides)
        self.control(Ready(**fields))
        if heartbeats:
            self._beating.set()

    def send_heartbeat(self, health: Health | None = None) -> None:
        if health is not None:
            self.health = health
        self.control(Heartbeat(worker=self.name, free_slots=self.slots, in_flight=0,
                               health=self.health))

    def goodbye(self, reason: str = "done") -> None:
        self._beating.clear()
        self.control(Goodbye(worker=self.name, reason=reason))

    def chunk(self, key: bytes, request_id: str, seq: int, text: str = "x") -> None:
        self.send_frames([VERSION_FRAME, ROUTE_CHUNK + key,
                          encode(Chunk(id=request_id, seq=seq, text=text, tokens=1))])

    def final(self, key: bytes, request_id: str, chunks: int, **fields: Any) -> None:
        body = encode(Final(id=request_id, chunks=chunks, worker=self.name, **fields))
        self.send_frames([VERSION_FRAME, ROUTE_END + key, body])

    def error(self, key: bytes, request_id: str, code: ErrorCode, message: str) -> None:
        body = encode(Error.make(request_id, code, message, worker=self.name))
        self.send_frames([VERSION_FRAME, ROUTE_END + key, body])

    def stream(self, key: bytes, request_id: str, n: int, prefix: str = "t") -> None:
        """n chunks ``prefix0 .. prefix{n-1}`` then a Final."""
        for seq in range(n):
            self.chunk(key, request_id, seq, f"{prefix}{seq}")
        self.final(key, request_id, n)

    def silence(self) -> None:
        """Stop heartbeating (a hung worker): the broker should declare it dead."""
        self._beating.clear()

    def resume(self) -> None:
        self._beating.set()

    # -- receiving -------------------------------------------------------------------------

    def expect(self, kind: type[T], timeout: float = 5.0) -> T:
        """The next message of ``kind`` (earlier ones of other kinds are kept for later)."""
        for i, msg in enumerate(self._held):
            if isinstance(msg, kind):
                del self._held[i]
                return msg
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {kind.__name__} in {timeout}s "
                                   f"(held: {list(self._held)})")
            try:
                msg = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            if isinstance(msg, kind):
                return msg
            self._held.append(msg)

    def assert_nothing(self, kind: type[Any], within: float) -> None:
        """Fail if a message of ``kind`` arrives within ``within`` seconds."""
        try:
            msg = self.expect(kind, timeout=within)
        except TimeoutError:
            return
        raise AssertionError(f"{self.name} unexpectedly received {msg!r}")

    def wait_pings(self, n: int, timeout: float = 5.0) -> None:
        wait_for(lambda: self.pings >= n, timeout, f"{self.name}: {n} pings")

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the thread and close the socket at once (what a killed process looks like)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        sock = _context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._identity is not None:
            sock.setsockopt(zmq.IDENTITY, self._identity)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        sock.send_multipart(self._outbox.get_nowait())
                    except queue.Empty:
                        break
                now = time.monotonic()
                if self._beating.is_set() and now >= next_beat:
                    next_beat = now + self.heartbeat_interval
                    self.send_heartbeat()
                if self._active:
                    self._auto_step(sock)
                if poller.poll(timeout=0 if self._active else 5):
                    while int(sock.EVENTS) & zmq.POLLIN:  # type: ignore[arg-type]
                        self._take(sock.recv_multipart())
        finally:
            sock.close(linger=0)

    def _take(self, frames: list[bytes]) -> None:
        assert len(frames) == 2 and frames[0] == VERSION_FRAME, f"bad frames {frames!r}"
        msg = broker_to_worker_decoder.decode(frames[1])
        if isinstance(msg, BrokerPing):
            self.pings += 1
            return
        self.received.append(msg)
        if self.auto_chunks is not None and isinstance(msg, Dispatch):
            self._active[msg.key] = [msg.request.id, 0]
        elif self.auto_chunks is not None and isinstance(msg, CancelWork):
            stream = self._active.pop(msg.key, None)
            if stream is not None:
                self._outbox.put([VERSION_FRAME, ROUTE_END + msg.key, encode(Error.make(
                    stream[0], ErrorCode.CANCELLED, "cancelled", chunks_sent=stream[1]))])
        else:
            self._inbox.put(msg)

    def _auto_step(self, sock: zmq.Socket[bytes]) -> None:
        """One chunk of every active stream (a Final for those that are complete)."""
        assert self.auto_chunks is not None
        for key, stream in list(self._active.items()):
            rid, seq = stream
            if seq < self.auto_chunks:
                text = f"{rid}:{seq}".ljust(self.chunk_bytes, ".")
                sock.send_multipart([VERSION_FRAME, ROUTE_CHUNK + key,
                                     encode(Chunk(id=rid, seq=seq, text=text, tokens=1))])
                stream[1] = seq + 1
            else:
                del self._active[key]
                sock.send_multipart([VERSION_FRAME, ROUTE_END + key,
                                     encode(Final(id=rid, chunks=seq, worker=self.name))])


class FakeClient:
    """A scripted client: one DEALER used from the test's own thread."""

    def __init__(self, address: str, identity: bytes | None = None, rcvhwm: int = 1000) -> None:
        self.sock = _context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        # The monitor lets a test wait for "the broker dropped us and we reconnected"
        # instead of guessing how long that takes.
        self._monitor = self.sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(address)
        self._held: deque[BrokerToClientMsg] = deque()

    def wait_reconnected(self, timeout: float = 20.0) -> None:
        """Block until the broker has dropped this connection and the DEALER has made a new
        one: a message sent after this cannot be lost with the dropped connection's buffers."""
        deadline = time.monotonic() + timeout
        wanted = [zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED]
        while wanted:
            left = deadline - time.monotonic()
            if left <= 0 or not self._monitor.poll(timeout=int(left * 1000)):
                raise TimeoutError(f"client: no {zmq.Event(wanted[0]).name} in {timeout}s")
            event = recv_monitor_message(self._monitor)["event"]
            if event == wanted[0]:
                wanted.pop(0)

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def send(self, msg: msgspec.Struct) -> None:
        self.send_frames([VERSION_FRAME, encode(msg)])

    def submit(self, request_id: str, model: str = "m", **fields: Any) -> None:
        fields.setdefault("prompt", "hello")
        fields.setdefault("kind", Kind.COMPLETION)
        self.send(Submit(request=Request(id=request_id, model=model, **fields)))

    def cancel(self, request_id: str) -> None:
        self.send(Cancel(id=request_id))

    def ping(self) -> None:
        self.send(Ping(at=time.time()))

    def recv_frames(self, timeout: float = 5.0) -> list[bytes]:
        if not self.sock.poll(timeout=int(timeout * 1000)):
            raise TimeoutError(f"client: nothing received in {timeout}s")
        return self.sock.recv_multipart()

    def recv(self, timeout: float = 5.0) -> BrokerToClientMsg:
        if self._held:
            return self._held.popleft()
        frames = self.recv_frames(timeout)
        assert len(frames) == 2 and frames[0] == VERSION_FRAME, f"bad frames {frames!r}"
        return broker_to_client_decoder.decode(frames[1])

    def next_where(self, pred: Callable[[BrokerToClientMsg], bool], timeout: float = 5.0
                   ) -> BrokerToClientMsg:
        """The first message matching ``pred``; the others are kept, in order, for later."""
        for i, msg in enumerate(self._held):
            if pred(msg):
                del self._held[i]
                return msg
        deadline = time.monotonic() + timeout
        skipped: list[BrokerToClientMsg] = []
        try:
            while True:
                frames = self.recv_frames(max(0.0, deadline - time.monotonic()))
                assert frames[0] == VERSION_FRAME, f"bad frames {frames!r}"
                msg = broker_to_client_decoder.decode(frames[1])
                if pred(msg):
                    return msg
                skipped.append(msg)
        finally:
            self._held.extend(skipped)

    def status(self, timeout: float = 5.0) -> StatusReply:
        self.send(StatusQuery())
        msg = self.next_where(lambda m: isinstance(m, StatusReply), timeout)
        assert isinstance(msg, StatusReply)
        return msg

    def terminal(self, request_id: str, timeout: float = 5.0) -> Final | Error:
        """The Final or Error for ``request_id`` (chunks of it before are kept)."""
        msg = self.next_where(
            lambda m: isinstance(m, (Final, Error)) and m.id == request_id, timeout)
        assert isinstance(msg, (Final, Error))
        return msg

    def result(self, request_id: str, timeout: float = 5.0) -> tuple[list[Chunk], Final | Error]:
        """All chunks of ``request_id`` and its terminal, waiting for the terminal."""
        chunks: list[Chunk] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next_where(
                lambda m: isinstance(m, (Chunk, Final, Error)) and m.id == request_id,
                max(0.0, deadline - time.monotonic()),
            )
            if isinstance(msg, Chunk):
                chunks.append(msg)
            else:
                assert isinstance(msg, (Final, Error))
                return chunks, msg

    def held(self) -> list[BrokerToClientMsg]:
        return list(self._held)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        with contextlib.suppress(zmq.ZMQError):
            self._monitor.close(linger=0)
            self.sock.close(linger=0)

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition",
             interval: float = 0.01) -> None:
    """Poll ``cond`` until true; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
