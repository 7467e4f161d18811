"""Decode tokens/s for heartbeats, from a backend's running total of generated tokens."""

from __future__ import annotations

import time


class TokenRate:
    """Tokens/s between heartbeats, from the backend's running total. Heartbeats also go out
    early (a health change): a window shorter than ``MIN_WINDOW_S`` keeps the last rate
    rather than dividing by almost nothing."""

    MIN_WINDOW_S = 0.05

    def __init__(self) -> None:
        self.total = 0
        self.at = time.monotonic()
        self.rate = 0.0

    def update(self, total: int, now: float) -> float:
        elapsed = now - self.at
        if total < self.total:  # the backend restarted its count
            self.total, self.at, self.rate = total, now, 0.0
        elif elapsed >= self.MIN_WINDOW_S:
            self.rate = (total - self.total) / elapsed
            self.total, self.at = total, now
        return self.rate
