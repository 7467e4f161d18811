"""Turning one request's deltas into Chunk messages, optionally coalesced.

With ``window_s == 0`` every delta goes out as its own chunk at once: the lowest inter-token
latency. With a window, the first delta after a flush opens the window; everything produced
until it closes goes out as one chunk (texts joined, tokens summed). A timer closes the window,
so a stalled backend never holds text back longer than the window.

Counting: a chunk is counted in ``sent`` when it is handed to the socket queue, and a queued
send is never withdrawn (waits on it are shielded), so ``sent`` is exactly the number of chunks
the broker will see before the terminal message, which is what Final.chunks and
Error.chunks_sent promise. With packing on (``link.packer``), a chunk is handed to the link's
``ChunkPacker`` instead, which sends it at the end of the loop turn together with the same
client's other chunks; a held chunk is never withdrawn either (packer.py), so the count stays
exact.
"""

from __future__ import annotations

import asyncio

from tokenhive.schemas.frames import ROUTE_CHUNK, VERSION_FRAME, encode
from tokenhive.schemas.messages import Chunk
from tokenhive.schemas.tools import ToolCallDelta
from tokenhive.workers.link import BrokerLink


class ChunkStream:
    def __init__(self, link: BrokerLink, key: bytes, request_id: str, window_s: float,
                 client: bytes = b"") -> None:
        self._link = link
        self._key = key
        self._client = client  # Dispatch.client: chunks for the same client may share a Pack
        self._route = ROUTE_CHUNK + key
        self._id = request_id
        self._window = window_s
        self.sent = 0
        self.cumulative = 0  # tokens in the chunks sent so far (Chunk.cumulative_tokens)
        self._texts: list[str] = []
        self._tokens = 0  # tokens waiting to go out (also those of empty-text deltas)
        self._timer: asyncio.TimerHandle | None = None
        self._last: asyncio.Future[None] | None = None  # latest send that had to wait

    async def add(
        self, text: str, tokens: int, tool_calls: list[ToolCallDelta] | None = None
    ) -> None:
        if tool_calls:  # rare and structural: out at once, after any text held back
            self._flush()
            self._emit(text, self._tokens + tokens, tool_calls)
            self._tokens = 0
            await self._backpressure()
            return
        self._tokens += tokens
        if not text:
            return  # e.g. half a UTF-8 character: its tokens ride with the next text
        self._texts.append(text)
        if self._window <= 0:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window, self._flush)
        await self._backpressure()

    def single(
        self, text: str, tokens: int, tool_calls: list[ToolCallDelta] | None = None
    ) -> None:
        """The one chunk of a non-streaming request (sent even when the text is empty)."""
        self._emit(text, tokens, tool_calls)

    async def close(self) -> None:
        """Flush what is buffered; after this, every counted chunk is queued."""
        self._flush()
        if self._tokens:  # tokens that never produced text: still counted in some chunk
            self._emit("", self._tokens)
            self._tokens = 0
        await self._backpressure()

    def discard(self) -> None:
        """Stop the window timer (on error/cancel the buffered text is dropped, not sent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush(self) -> None:
        self.discard()
        if self._texts:
            text = self._texts[0] if len(self._texts) == 1 else "".join(self._texts)
            self._texts.clear()
            self._emit(text, self._tokens)
            self._tokens = 0

    def _emit(
        self, text: str, tokens: int, tool_calls: list[ToolCallDelta] | None = None
    ) -> None:
        self.cumulative += tokens
        body = encode(Chunk(self._id, self.sent, text, tokens, tool_calls=tool_calls,
                            cumulative_tokens=self.cumulative))
        link = self._link
        if link.packer is None:
            waiting = link.send([VERSION_FRAME, self._route, body])
        else:
            waiting = link.send_packed(self._key, self._client, body)
        if waiting is not None:
            self._last = waiting
        self.sent += 1

    async def _backpressure(self) -> None:
        """Wait while the socket is full, without ever withdrawing a counted chunk."""
        last = self._last
        if last is not None and not last.done():
            await asyncio.shield(last)
