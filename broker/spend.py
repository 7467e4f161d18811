"""What finished requests used, per model and per profile, and the profiles' budgets.

Budgets are rolling windows (the last minute, the last 24 hours) over finished requests'
usage, each kept as 60 buckets, so memory is fixed however many requests there are and a
window's total is exact to within one bucket (1 s for a minute, 24 min for a day). They are
checked when a request arrives: requests already running are not counted until they finish,
so a burst admitted together may overshoot a budget by what that burst uses.
"""

from __future__ import annotations

from tokenhive.schemas.gateway_config import Profile
from tokenhive.schemas.messages import Spend, Usage

BUCKETS = 60
MINUTE = 60.0
DAY = 86_400.0


class SlidingSum:
    """The sum of amounts added over the last ``span`` seconds, in ``BUCKETS`` buckets.

    A running total is kept and buckets are cleared as time moves past them, so ``add`` and
    ``total`` cost O(1) however long the window (a budget check is on every admission)."""

    __slots__ = ("head", "running", "sums", "width")

    def __init__(self, span: float) -> None:
        self.width = span / BUCKETS
        self.sums = [0.0] * BUCKETS  # bucket number b lives in slot b % BUCKETS
        self.head = -1  # the newest bucket number the ring holds; -1: none yet
        self.running = 0.0

    def _advance(self, now: float) -> int:
        """Clear the buckets that left the window; the bucket of ``now``."""
        bucket = int(now // self.width)
        head = self.head
        if bucket <= head:
            return head  # the same bucket (a clock never goes back; if it did: the newest)
        if head < 0 or bucket - head >= BUCKETS:
            self.sums = [0.0] * BUCKETS
            self.running = 0.0
        else:
            for gone in range(head + 1, bucket + 1):
                slot = gone % BUCKETS
                self.running -= self.sums[slot]
                self.sums[slot] = 0.0
        self.head = bucket
        return bucket

    def add(self, now: float, amount: float) -> None:
        bucket = self._advance(now)
        self.sums[bucket % BUCKETS] += amount
        self.running += amount

    def total(self, now: float) -> float:
        self._advance(now)
        return max(self.running, 0.0)  # never a float crumb below zero

    def frees_in(self, now: float) -> float:
        """Seconds until the oldest amount still counted leaves the window."""
        head = self._advance(now)
        for age in range(BUCKETS - 1, -1, -1):  # oldest bucket first
            bucket = head - age
            if self.sums[bucket % BUCKETS]:
                return max((bucket + BUCKETS) * self.width - now, 0.0)
        return 0.0


class ProfileWindows:
    __slots__ = ("day_tokens", "day_usd", "minute_tokens", "minute_usd")

    def __init__(self) -> None:
        self.minute_tokens = SlidingSum(MINUTE)
        self.day_tokens = SlidingSum(DAY)
        self.minute_usd = SlidingSum(MINUTE)
        self.day_usd = SlidingSum(DAY)


class SpendBook:
    def __init__(self) -> None:
        self.by_model: dict[str, Spend] = {}
        self.by_profile: dict[str, Spend] = {}
        self._windows: dict[str, ProfileWindows] = {}

    def record(self, model: str, profile: str | None, usage: Usage, cost: float,
               now: float) -> None:
        _add(self.by_model, model, usage, cost)
        if profile is None:
            return
        _add(self.by_profile, profile, usage, cost)
        windows = self._windows.get(profile)
        if windows is None:
            windows = self._windows[profile] = ProfileWindows()
        tokens = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
        windows.minute_tokens.add(now, tokens)
        windows.day_tokens.add(now, tokens)
        windows.minute_usd.add(now, cost)
        windows.day_usd.add(now, cost)

    def over_budget(self, name: str, profile: Profile, now: float) -> tuple[str, float] | None:
        """(why, seconds until the window frees) when a budget of ``profile`` is spent."""
        windows = self._windows.get(name)
        if windows is None:
            return None
        checks = (
            ("tokens_per_minute", profile.tokens_per_minute, windows.minute_tokens, "tokens"),
            ("tokens_per_day", profile.tokens_per_day, windows.day_tokens, "tokens"),
            ("usd_per_minute", profile.usd_per_minute, windows.minute_usd, "USD"),
            ("usd_per_day", profile.usd_per_day, windows.day_usd, "USD"),
        )
        for field, limit, window, unit in checks:
            if limit is None:
                continue
            used = window.total(now)
            if used >= limit:
                shown = f"{used:.6g}" if unit == "USD" else f"{used:.0f}"
                return (f"profile {name!r} spent {shown} {unit} of its {field}={limit}",
                        round(window.frees_in(now), 3))
        return None


def _add(table: dict[str, Spend], key: str, usage: Usage, cost: float) -> None:
    spend = table.get(key)
    if spend is None:
        spend = table[key] = Spend()
    spend.requests += 1
    spend.prompt_tokens += usage.prompt_tokens
    spend.completion_tokens += usage.completion_tokens
    spend.cost_usd = round(spend.cost_usd + cost, 9)
    spend.estimated += usage.estimated
