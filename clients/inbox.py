"""The stream messages of one request attempt, as the connection's reader delivers them.

Cheaper than an ``asyncio.Queue`` per request (no getter/putter deques, no task-done
bookkeeping): a deque and at most one waiting future. The attempt's deadline is one timer
for its whole life (``expire_at``), not a timeout context around every wait.
"""

from __future__ import annotations

import asyncio
from collections import deque

import msgspec

from tokenhive.schemas.messages import StreamMsg


class Inbox:
    __slots__ = ("_expired", "_items", "_timer", "_waiter")

    def __init__(self) -> None:
        self._items: deque[StreamMsg] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    def put(self, msg: StreamMsg) -> None:
        self._items.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def expire_at(self, when: float) -> None:
        """From loop time ``when`` on, ``get`` raises TimeoutError once nothing is left."""
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(when, self._expire)

    def close(self) -> None:
        """The attempt is over: stop its deadline timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def get(self) -> StreamMsg:
        """The next message; TimeoutError once the deadline passed with nothing waiting."""
        items = self._items
        while not items:
            if self._expired:
                raise TimeoutError
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return items.popleft()

    def _expire(self) -> None:
        self._timer = None
        self._expired = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class ConnectionStats(msgspec.Struct):
    received: int = 0
    unknown_id: int = 0  # stream messages for ids not in flight here (late, or not ours)
    bad_frames: int = 0  # undecodable, or another protocol version
    broker_lost: int = 0  # times the broker went silent and the socket was replaced
    sockets: int = 0  # sockets opened so far
