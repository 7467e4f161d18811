"""Raw-zmq peers for client-only tests.

``FakeBroker`` is a FAKE broker: a ROUTER socket on a thread that plays the broker's side of
the client protocol from a script the test supplies. It exists for what a real broker cannot
be made to do on demand: go silent mid-request (broker_unavailable), answer a Submit with a
scripted error sequence (``overloaded`` then success; a chunk then ``worker_lost``), never
answer at all (timeouts), or send messages for request ids that are not in flight. The normal
paths are tested against the real broker and workers as subprocesses.

Everything it receives is recorded, so tests can wait for a Cancel or count Submits.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import uvloop
import zmq

from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import VERSION_FRAME, client_msg_decoder, encode
from tokenhive.schemas.messages import (
    BrokerToClientMsg,
    Cancel,
    Chunk,
    ClientMsg,
    Error,
    Final,
    Ping,
    Pong,
    Request,
    StatusQuery,
    StatusReply,
    Submit,
    Timings,
    Usage,
)

#: called on the fake's thread for every Submit: (broker, client identity, request)
SubmitScript = Callable[["FakeBroker", bytes, Request], None]
T = TypeVar("T")
LOOPS = ["asyncio", "uvloop"]


class FakeBroker:
    def __init__(
        self,
        address: str,
        on_submit: SubmitScript | None = None,
        *,
        answer_pings: bool = True,
        status: StatusReply | None = None,
    ) -> None:
        self.requested_address = address
        self.on_submit = on_submit
        self.answer_pings = answer_pings
        self.status = status or StatusReply(workers=[], queues={}, in_flight=0, counters={})
        self.silent = threading.Event()  # set: receive and record, answer nothing
        self.address = ""
        self._received: list[ClientMsg] = []
        self._identities: list[bytes] = []  # parallel to _received: who sent it
        self._cond = threading.Condition()
        self._outbox: queue.Queue[tuple[bytes, list[bytes]]] = queue.Queue()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-broker", daemon=True)
        self._error: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeBroker:
        self._thread.start()
        if not self._bound.wait(5.0) or self._error is not None:
            raise RuntimeError(
                f"fake broker failed to bind {self.requested_address}: {self._error}"
            )
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def __enter__(self) -> FakeBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what the test sees ---------------------------------------------------------------

    @property
    def received(self) -> list[ClientMsg]:
        with self._cond:
            return list(self._received)

    @property
    def submits(self) -> list[Request]:
        return [m.request for m in self.received if isinstance(m, Submit)]

    def wait_for(self, predicate: Callable[[ClientMsg], bool], timeout: float = 5.0) -> ClientMsg:
        """The first received message matching ``predicate``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self._received:
                    if predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fake broker: no matching message in {timeout}s")
                self._cond.wait(left)

    def identity_of(self, msg: ClientMsg) -> bytes:
        """The ROUTER identity of the client that sent ``msg`` (a received message)."""
        with self._cond:
            for received, identity in zip(self._received, self._identities, strict=True):
                if received is msg:
                    return identity
        raise KeyError("message was not received by this fake")

    def send(self, identity: bytes, msg: BrokerToClientMsg) -> None:
        """Send from any thread (queued to the fake's own thread, which owns the socket)."""
        self._outbox.put((identity, [VERSION_FRAME, encode(msg)]))

    def send_raw(self, identity: bytes, frames: list[bytes]) -> None:
        self._outbox.put((identity, frames))

    # -- the fake's thread ----------------------------------------------------------------

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.requested_address)
            self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._bound.set()
            sock.close()
            return
        self._bound.set()
        try:
            while not self._stop.is_set():
                self._flush_outbox(sock)
                if sock.poll(10, zmq.POLLIN):
                    frames = sock.recv_multipart()
                    self._handle(sock, frames[0], frames[1:])
        finally:
            sock.close(linger=0)

    def _flush_outbox(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                identity, frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            if not self.silent.is_set():
                sock.send_multipart([identity, *frames])

    def _handle(self, sock: zmq.Socket[bytes], identity: bytes, frames: list[bytes]) -> None:
        if len(frames) != 2 or frames[0] != VERSION_FRAME:
            return
        try:
            msg = client_msg_decoder.decode(frames[1])
        except msgspec.DecodeError:
            return
        with self._cond:
            self._received.append(msg)
            self._identities.append(identity)
            self._cond.notify_all()
        if self.silent.is_set():
            return
        if isinstance(msg, Ping) and self.answer_pings:
            self.send(identity, Pong(at=msg.at))
        elif isinstance(msg, StatusQuery):
            self.send(identity, self.status)
        elif isinstance(msg, Submit) and self.on_submit is not None:
            self.on_submit(self, identity, msg.request)
        self._flush_outbox(sock)


# -- scripts ----------------------------------------------------------------------------------


def reply_text(
    parts: list[str], finish_reason: str = "stop", worker: str = "fake-0"
) -> SubmitScript:
    """Answer every Submit with one Chunk per part, then a Final."""

    def script(broker: FakeBroker, identity: bytes, request: Request) -> None:
        send_answer(broker, identity, request.id, parts, finish_reason, worker)

    return script


def send_answer(
    broker: FakeBroker,
    identity: bytes,
    request_id: str,
    parts: list[str],
    finish_reason: str = "stop",
    worker: str = "fake-0",
) -> None:
    for seq, text in enumerate(parts):
        broker.send(identity, Chunk(id=request_id, seq=seq, text=text, tokens=1))
    usage = Usage(prompt_tokens=3, completion_tokens=len(parts), total_tokens=3 + len(parts))
    broker.send(identity, Final(
        id=request_id, chunks=len(parts), finish_reason=finish_reason, usage=usage,
        timings=Timings(queue_ms=1.0, ttft_ms=2.0, total_ms=3.0), worker=worker,
    ))


def send_error(
    broker: FakeBroker,
    identity: bytes,
    request_id: str,
    code: ErrorCode,
    *,
    retry_after: float | None = None,
    chunks_sent: int = 0,
) -> None:
    error = Error.make(request_id, code, f"scripted {code.value}", retry_after=retry_after,
                       chunks_sent=chunks_sent)
    broker.send(identity, error)


# -- test helpers -----------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """Run a test's coroutine on a fresh loop of the given kind (the client must work on both)."""
    return uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)


def ipc(tmp_path: Path, name: str = "broker") -> str:
    """A unique ipc address per test (pytest's tmp_path is unique)."""
    return f"ipc://{tmp_path}/{name}.sock"


async def wait_fake(fake: FakeBroker, predicate: Callable[[ClientMsg], bool]) -> ClientMsg:
    """From async code: wait (on the fake's condition, in a thread) for a matching message."""
    return await asyncio.to_thread(fake.wait_for, predicate, 5.0)


def is_cancel_of(request_id: str) -> Callable[[ClientMsg], bool]:
    return lambda m: isinstance(m, Cancel) and m.id == request_id
