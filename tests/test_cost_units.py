"""Prices and cost as plain code: the built-in table's prefix lookup, configured prices
winning, local backends free unless priced, cached prompt tokens, and the rolling windows
budgets are counted in."""

from __future__ import annotations

import pytest

from tokenhive.broker.cost import PriceBook, cost_usd
from tokenhive.broker.price_table import BUILTIN_PRICES, builtin_price
from tokenhive.broker.spend import DAY, MINUTE, SlidingSum, SpendBook
from tokenhive.schemas.gateway_config import Price, Profile
from tokenhive.schemas.messages import Usage


@pytest.mark.timeout(10)
def test_builtin_prices_match_dated_snapshots_by_longest_prefix() -> None:
    assert builtin_price("gpt-4o-2024-08-06") is BUILTIN_PRICES["gpt-4o"]
    assert builtin_price("gpt-4o-mini-2024-07-18") is BUILTIN_PRICES["gpt-4o-mini"]
    assert builtin_price("gpt-4.1-nano") is BUILTIN_PRICES["gpt-4.1-nano"]
    assert builtin_price("claude-3-5-sonnet-20241022") is BUILTIN_PRICES["claude-3-5-sonnet"]
    assert builtin_price("claude-3-5-haiku-latest") is BUILTIN_PRICES["claude-3-5-haiku"]
    assert builtin_price("claude-opus-4-5-20251101") is BUILTIN_PRICES["claude-opus-4-5"]
    assert builtin_price("claude-opus-4-20250514") is BUILTIN_PRICES["claude-opus-4"]
    assert builtin_price("gpt-5.4") is None  # not a snapshot of gpt-5: unknown, so free
    assert builtin_price("gpt-4o1") is None
    assert builtin_price("gemma3-270m") is None


@pytest.mark.timeout(10)
def test_price_lookup_configured_first_then_builtin_for_remote_backends_only() -> None:
    mine = Price(input=1.0, output=1.0)
    book = PriceBook({"fast": mine, "gpt-4o": Price(input=0.0, output=0.0)})
    assert book.price_of("fast", "gguf") is mine  # a local model priced on purpose
    assert book.price_of("gemma", "gguf") is None  # local and unpriced: free
    assert book.price_of("gpt-4o-mini", "echo") is None  # a local worker's name alone
    assert book.price_of("chat", "openai", "gpt-4o-mini") is BUILTIN_PRICES["gpt-4o-mini"]
    assert book.price_of("x", "openai", "gpt-4o") == Price(input=0.0, output=0.0)  # override
    assert book.price_of("x", "azure", "my-deployment") is None


@pytest.mark.timeout(10)
def test_cost_counts_cached_prompt_tokens_at_the_cached_price() -> None:
    price = BUILTIN_PRICES["gpt-4o-mini"]  # 0.15 in, 0.60 out, 0.075 cached in
    usage = Usage(prompt_tokens=2000, completion_tokens=1000, total_tokens=3000,
                  cached_tokens=1000)
    assert cost_usd(price, usage) == pytest.approx((1000 * 0.15 + 1000 * 0.075 + 600) / 1e6)
    no_cache_price = Price(input=3.0, output=15.0)  # cached_input None: the input price
    assert cost_usd(no_cache_price, usage) == pytest.approx((2000 * 3.0 + 1000 * 15.0) / 1e6)
    assert cost_usd(None, usage) == 0.0


@pytest.mark.timeout(10)
def test_sliding_sum_forgets_what_left_the_window() -> None:
    window = SlidingSum(MINUTE)
    window.add(100.0, 5)
    window.add(130.0, 7)
    assert window.total(130.5) == 12
    assert window.frees_in(130.5) == pytest.approx(160.0 - 130.5)  # the 100 s bucket's end
    assert window.total(160.5) == 7
    assert window.total(191.0) == 0 and window.frees_in(191.0) == 0.0
    day = SlidingSum(DAY)
    day.add(0.0, 1)
    assert day.total(DAY - 1) == 1 and day.total(DAY + DAY / 60) == 0


@pytest.mark.timeout(10)
def test_spend_book_budgets_per_profile() -> None:
    book = SpendBook()
    profile = Profile(tokens_per_day=100, usd_per_minute=0.5)
    assert book.over_budget("p", profile, 0.0) is None
    book.record("m", "p", Usage(10, 20, 30), 0.25, 0.0)
    assert book.over_budget("p", profile, 1.0) is None
    book.record("m", "p", Usage(10, 20, 30), 0.25, 2.0)
    why, frees_in = book.over_budget("p", profile, 3.0)  # type: ignore[misc]
    assert "usd_per_minute=0.5" in why and 0 < frees_in <= MINUTE
    assert book.over_budget("p", profile, 61.5) is None  # the minute passed
    book.record("m", "p", Usage(20, 30, 50), 0.0, 62.0)
    why, _ = book.over_budget("p", profile, 63.0)  # type: ignore[misc]
    assert "tokens_per_day=100" in why
    assert book.by_model["m"].requests == 3 and book.by_profile["p"].prompt_tokens == 40
    assert book.over_budget("other", profile, 63.0) is None
