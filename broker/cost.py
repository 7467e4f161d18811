"""What a finished request cost, from the price of the model that served it.

The broker computes cost, not the worker: it already decodes every terminal (to check it
answers the right request), it needs the usage anyway for profile budgets and status totals,
and the price table then lives in one place, the broker's config. Only the Final is touched,
once per request; chunks stay undecoded.
"""

from __future__ import annotations

from tokenhive.broker.price_table import REMOTE_BACKENDS, builtin_price
from tokenhive.schemas.gateway_config import Price
from tokenhive.schemas.messages import Usage

PER = 1_000_000  # prices are per million tokens


class PriceBook:
    def __init__(self, configured: dict[str, Price]) -> None:
        self.configured = configured
        self._cache: dict[tuple[str, str, str], Price | None] = {}

    def price_of(self, model: str, backend: str, upstream: str = "") -> Price | None:
        """Configured price of the model (or its upstream name) first, then, for remote
        backends only, the built-in table; None: it costs nothing."""
        key = (model, backend, upstream)
        if key in self._cache:
            return self._cache[key]
        price = self.configured.get(model) or (self.configured.get(upstream) if upstream
                                               else None)
        if price is None and backend in REMOTE_BACKENDS:
            price = builtin_price(upstream or model)
        self._cache[key] = price
        return price


def cost_usd(price: Price | None, usage: Usage) -> float:
    if price is None:
        return 0.0
    cached = min(max(usage.cached_tokens, 0), usage.prompt_tokens)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    dollars = ((usage.prompt_tokens - cached) * price.input + cached * cached_rate
               + usage.completion_tokens * price.output) / PER
    return round(dollars, 9)
