"""Token ids -> text, incrementally and in linear time, with text-level stop sequences.

llama-cpp-python's high-level streaming re-detokenizes the whole output at every token, so
its cost per token grows with the output (quadratic overall). Here every token's bytes are
looked up once (a per-vocabulary piece cache) and fed once through an incremental UTF-8
decoder, which keeps only the few bytes of a character split across tokens pending.

Stop sequences are matched on text. Text that could still turn out to be the start of a
stop sequence is held back until the next token decides it, so a stop spanning two tokens
is found and never half-streamed. Held text is short (shorter than the longest stop), so
matching costs O(longest stop) per token, independent of the output length.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class PieceCache:
    """Token id -> its bytes, asking llama.cpp at most once per token id."""

    def __init__(self, piece_of: Callable[[int], bytes]) -> None:
        self._piece_of = piece_of
        self._cache: dict[int, bytes] = {}
        self.lookups = 0  # calls into llama.cpp, for tests and stats

    def __call__(self, token: int) -> bytes:
        piece = self._cache.get(token)
        if piece is None:
            self.lookups += 1
            piece = self._piece_of(token)
            self._cache[token] = piece
        return piece


class Detokenizer:
    """One sequence's byte stream -> text; bytes of an unfinished character stay pending."""

    def __init__(self, pieces: PieceCache) -> None:
        self._pieces = pieces
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.bytes_fed = 0  # total bytes decoded: equals the output's bytes when linear

    def push(self, token: int) -> str:
        piece = self._pieces(token)
        self.bytes_fed += len(piece)
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """End of output: an incomplete trailing character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
