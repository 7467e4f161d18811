"""The async iterator of Chunks that ``AsyncClient.stream`` returns."""

from __future__ import annotations

import asyncio
from types import TracebackType

from tokenhive.clients.call import Call
from tokenhive.clients.result import Result
from tokenhive.schemas.messages import Chunk


class Stream:
    """Iterate for Chunks; ``result`` holds the whole answer once iteration ended.

    Leaving early (``break``, ``aclose()``, the ``async with`` block, or dropping the stream)
    sends the broker a Cancel, so no worker keeps generating for nobody.
    """

    def __init__(self, call: Call) -> None:
        self._call = call
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def id(self) -> str:
        return self._call.id

    @property
    def result(self) -> Result:
        """The finished answer (text, finish_reason, usage, ...); only after the last chunk."""
        return self._call.result()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Chunk:
        self._loop = asyncio.get_running_loop()
        chunk = await self._call.next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def collect(self) -> Result:
        """Read to the end and return the result."""
        async for _ in self:
            pass
        return self.result

    async def aclose(self) -> None:
        if not self._call.finished:
            self._call.abort()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # A stream dropped half-read: cancel on the loop's own thread (GC may run anywhere).
        loop = self._loop
        if loop is not None and not self._call.finished and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._call.abort)
            except RuntimeError:
                pass  # the loop closed meanwhile; the broker's own liveness check takes over
