"""Stop sequences over streamed text: cut at the first stop, hold back what could start one.

Shared by every backend that matches stops itself (gguf, binary), so a stop that spans two
chunks is found the same way everywhere.
"""

from __future__ import annotations


def held_suffix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class StopMatcher:
    """Feeds text through, cutting at the first stop sequence; holds back possible prefixes."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to emit now. After a stop is found, ``stopped`` is True and the text
        up to (not including) the stop is returned; the rest is dropped."""
        if not self._stops:
            return text
        pending = self._held + text
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return pending[:cut]
        hold = held_suffix_len(pending, self._stops)
        self._held = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]

    def flush(self) -> str:
        """End of output without a stop: the held text was not a stop after all."""
        held, self._held = self._held, ""
        return held
