"""The sidecar's two pipes: capped lines in from stdin, whole lines out to the protocol fd.

Both do their blocking I/O on threads, so they work on whatever the descriptors are (a pipe
from llmkit, a terminal, a file redirected in by hand) without stalling the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import stat
import threading
from collections.abc import Callable

READ_SIZE = 1 << 16


class Overlong:
    """Stands for a line longer than the cap: its bytes were read and dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit


#: a line (without its newline), an over-long one, or None at end of input
LineItem = bytes | Overlong | None


class LineReader:
    """Lines from ``fd`` on a daemon thread, at most ``max_bytes`` each: a longer line is
    read to its end and dropped (memory stays bounded however long it is) and an Overlong
    takes its place. The thread waits while ``queue`` is full, so a peer that floods us is
    slowed down by its own pipe, not by our memory."""

    def __init__(self, fd: int, max_bytes: int, queue_size: int = 64) -> None:
        self.fd = fd
        self.max_bytes = max_bytes
        self.queue: asyncio.Queue[LineItem] = asyncio.Queue(queue_size)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._pump, name="sidecar-stdin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def next(self) -> LineItem:
        return await self.queue.get()

    def _put(self, item: LineItem) -> bool:
        try:
            asyncio.run_coroutine_threadsafe(self.queue.put(item), self._loop).result()
        except (RuntimeError, asyncio.CancelledError):  # the loop is gone: nobody reads
            return False
        return True

    def _pump(self) -> None:
        buf = bytearray()
        dropping = False  # inside an over-long line, until its newline
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except OSError:
                data = b""
            if not data:
                break
            start = 0
            while True:
                end = data.find(b"\n", start)
                piece = data[start:] if end < 0 else data[start:end]
                if dropping:
                    if end >= 0:
                        dropping = False
                elif len(buf) + len(piece) > self.max_bytes:
                    buf.clear()
                    dropping = end < 0
                    if not self._put(Overlong(self.max_bytes)):
                        return
                elif end >= 0:
                    buf += piece
                    line = bytes(buf.rstrip(b"\r"))
                    buf.clear()
                    if not self._put(line):
                        return
                else:
                    buf += piece
                if end < 0:
                    break
                start = end + 1
        if buf and not dropping:
            self._put(bytes(buf))
        self._put(None)


class LineWriter:
    """Writes whole lines to ``fd`` in the order given, from one task, off the loop.
    ``broken`` is set when the reader of ``fd`` is gone (EPIPE): everything after is
    dropped."""

    def __init__(self, fd: int, backlog: int = 1024) -> None:
        self.fd = fd
        self.broken = asyncio.Event()
        self.backlog = backlog
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._room = asyncio.Event()  # set when the backlog is below its limit
        self._room.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sidecar-stdout")

    async def send(self, line: bytes) -> None:
        """Queue ``line``, first waiting while ``backlog`` lines are not written yet (a peer
        that does not read slows the streams down instead of growing our memory)."""
        while self._queue.qsize() >= self.backlog and not self.broken.is_set():
            self._room.clear()
            await self._room.wait()
        self.send_now(line)

    def send_now(self, line: bytes) -> None:
        """Queue ``line`` without waiting: for final answers, which must not be lost to a
        cancellation while waiting (they are at most one per accepted request)."""
        if not self.broken.is_set():
            self._queue.put_nowait(line)

    async def flush(self) -> None:
        """Until every line sent so far is written (or the pipe broke)."""
        done = asyncio.ensure_future(self._queue.join())
        broken = asyncio.ensure_future(self.broken.wait())
        await asyncio.wait({done, broken}, return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        broken.cancel()

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            lines = [await self._queue.get()]
            while not self._queue.empty():
                lines.append(self._queue.get_nowait())
            try:
                if not self.broken.is_set():
                    await loop.run_in_executor(None, _write_all, self.fd, b"".join(lines))
            except OSError:  # EPIPE: the peer closed its end
                self.broken.set()
                self._room.set()
            finally:
                for _ in lines:
                    self._queue.task_done()
                self._room.set()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def watch_hangup(fd: int, on_hangup: Callable[[], None]) -> bool:
    """Call ``on_hangup`` on the loop once the reading end of pipe/socket ``fd`` is closed
    (the parent died, or closed our stdout), even while we have nothing to write. False
    when ``fd`` is not a pipe or socket (a terminal or file never hangs up)."""
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return False
    loop = asyncio.get_running_loop()

    def wait() -> None:
        poller = select.poll()
        poller.register(fd, 0)  # no events asked: POLLERR/POLLHUP are reported regardless
        while not poller.poll():
            pass
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(on_hangup)

    threading.Thread(target=wait, name="sidecar-stdout-watch", daemon=True).start()
    return True
