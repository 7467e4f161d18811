"""Built-in prices of the hosted models our remote backends reach, USD per million tokens.

List prices as of 2026-03 (the providers' pricing pages), standard tier, no batch discount.
They change: a ``[prices.NAME]`` in the config overrides an entry (by the worker's model name
or its upstream name). Lookup is by the longest entry that is the name itself or the name up
to a ``-`` (a dated snapshot or alias: ``gpt-4o-2024-08-06``, ``claude-3-5-sonnet-20241022``,
``claude-3-5-haiku-latest``), so ``gpt-5.4`` is not priced as ``gpt-5``: unknown is free.
Only workers of remote backends (openai, anthropic, azure) are priced from this table;
local models cost 0 unless the config prices them.
"""

from __future__ import annotations

from tokenhive.schemas.gateway_config import Price

REMOTE_BACKENDS = frozenset({"openai", "anthropic", "azure"})


def _p(input: float, output: float, cached_input: float | None = None) -> Price:
    return Price(input=input, output=output, cached_input=cached_input)


# as of 2026-03
BUILTIN_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-4o": _p(2.50, 10.00, 1.25),
    "gpt-4o-mini": _p(0.15, 0.60, 0.075),
    "gpt-4.1": _p(2.00, 8.00, 0.50),
    "gpt-4.1-mini": _p(0.40, 1.60, 0.10),
    "gpt-4.1-nano": _p(0.10, 0.40, 0.025),
    "gpt-4-turbo": _p(10.00, 30.00),
    "gpt-3.5-turbo": _p(0.50, 1.50),
    "o1": _p(15.00, 60.00, 7.50),
    "o1-mini": _p(1.10, 4.40, 0.55),
    "o3": _p(2.00, 8.00, 0.50),
    "o3-mini": _p(1.10, 4.40, 0.55),
    "o4-mini": _p(1.10, 4.40, 0.275),
    "gpt-5": _p(1.25, 10.00, 0.125),
    "gpt-5.1": _p(1.25, 10.00, 0.125),
    "gpt-5-mini": _p(0.25, 2.00, 0.025),
    "gpt-5-nano": _p(0.05, 0.40, 0.005),
    "text-embedding-3-small": _p(0.02, 0.0),
    "text-embedding-3-large": _p(0.13, 0.0),
    # Anthropic (cached_input: a cache read)
    "claude-3-5-sonnet": _p(3.00, 15.00, 0.30),
    "claude-3-7-sonnet": _p(3.00, 15.00, 0.30),
    "claude-sonnet-4": _p(3.00, 15.00, 0.30),
    "claude-3-5-haiku": _p(0.80, 4.00, 0.08),
    "claude-3-haiku": _p(0.25, 1.25, 0.03),
    "claude-3-opus": _p(15.00, 75.00, 1.50),
    "claude-opus-4": _p(15.00, 75.00, 1.50),
    "claude-opus-4-1": _p(15.00, 75.00, 1.50),
    "claude-opus-4-5": _p(5.00, 25.00, 0.50),
    "claude-opus-4-6": _p(5.00, 25.00, 0.50),
    "claude-sonnet-4-5": _p(3.00, 15.00, 0.30),
    "claude-sonnet-4-6": _p(3.00, 15.00, 0.30),
    "claude-haiku-4-5": _p(1.00, 5.00, 0.10),
}

_BY_LENGTH = sorted(BUILTIN_PRICES, key=len, reverse=True)


def builtin_price(name: str) -> Price | None:
    """The longest entry that is ``name`` or ``name`` up to a ``-``; None if none is."""
    for key in _BY_LENGTH:
        if name.startswith(key) and (len(name) == len(key) or name[len(key)] == "-"):
            return BUILTIN_PRICES[key]
    return None
