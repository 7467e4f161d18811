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
    """The sum of amounts added over the last ``span`` seconds, in ``BUCKETS`` buckets."""

    __slots__ = ("ids", "sums", "width")

    def __init__(self, span: float) -> None:
        self.width = span / BUCKETS
        self.ids = [-1] * BUCKETS  # bucket number held in each slot
        self.sums = [0.0] * BUCKETS

    def add(self, now: float, amount: float) -> None:
        bucket = int(now // self.width)
        slot = bucket % BUCKETS
        if self.ids[slot] != bucket:
            self.ids[slot] = bucket
            self.sums[slot] = 0.0
        self.sums[slot] += amount

    def total(self, now: float) -> float:
        bucket = int(now // self.width)
        return sum(s for i, s in zip(self.ids, self.sums, strict=True)
                   if bucket - BUCKETS < i <= bucket)

    def frees_in(self, now: float) -> float:
        """Seconds until the oldest amount still counted leaves the window."""
        bucket = int(now // self.width)
        live = [i for i, s in zip(self.ids, self.sums, strict=True)
                if bucket - BUCKETS < i <= bucket and s]
        if not live:
            return 0.0
        return max((min(live) + BUCKETS) * self.width - now, 0.0)


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
