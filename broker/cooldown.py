"""Per-model cooldown: a model whose workers keep failing is skipped for a while.

Like LiteLLM's cooldowns: ``failures`` failures within ``window`` seconds put the model in
cooldown for ``cooldown_s`` seconds. While it lasts, routing picks the model only when no
alternative is left (a model without fallbacks keeps being served: a cooldown reorders
choices, it never refuses work on its own).
"""

from __future__ import annotations

from collections import deque


class Cooldowns:
    def __init__(self, failures: int, window: float, cooldown_s: float) -> None:
        self.failures = failures
        self.window = window
        self.cooldown_s = cooldown_s
        self._recent: dict[str, deque[float]] = {}  # model -> times of its last failures
        self._until: dict[str, float] = {}  # model -> when its cooldown ends

    def failed(self, model: str, now: float) -> bool:
        """Count a failure; True when it starts a cooldown."""
        recent = self._recent.get(model)
        if recent is None:
            recent = self._recent[model] = deque(maxlen=self.failures)
        recent.append(now)
        if len(recent) < self.failures or now - recent[0] > self.window:
            return False
        if self.cooling(model, now):
            return False
        self._until[model] = now + self.cooldown_s
        recent.clear()
        return True

    def cooling(self, model: str, now: float) -> bool:
        until = self._until.get(model)
        if until is None:
            return False
        if until <= now:
            del self._until[model]
            return False
        return True

    def left(self, now: float) -> dict[str, float]:
        """Model -> seconds of cooldown left, for status."""
        return {m: round(u - now, 3) for m, u in self._until.items() if u > now}
