"""When and how long to wait before resubmitting a request that failed."""

from __future__ import annotations

import random

import msgspec

from tokenhive.schemas.errors import TokenHiveError


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Retry only retryable errors, only when nothing was streamed, at most ``max_attempts``.

    The delay before attempt ``n + 1`` is ``backoff_base * 2**(n - 1)`` with +-``jitter``
    (a fraction), capped at ``backoff_max``, and never shorter than the ``retry_after`` the
    error carried: the broker or an upstream asked us to wait at least that long.
    """

    max_attempts: int = 3
    backoff_base: float = 0.1
    backoff_max: float = 5.0
    jitter: float = 0.2

    def should_retry(self, exc: TokenHiveError, attempt: int, chunks_seen: int) -> bool:
        return exc.retryable and chunks_seen == 0 and attempt < self.max_attempts

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        backoff *= 1.0 + random.uniform(-self.jitter, self.jitter)
        return max(backoff, retry_after or 0.0)


NO_RETRY = RetryPolicy(max_attempts=1)
