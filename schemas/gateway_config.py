"""Gateway config: model groups, fallbacks, per-agent profiles and prices (``BrokerConfig``).

In a pool file these are top-level tables (``PoolConfig`` hands them to the broker)::

    [groups.chat-default]              # a public name served by several backing models
    models = ["gemma3-270m", "gpt-4o-mini"]
    strategy = "order"                 # "order": first that can serve; "weighted": by weights
    # weights = [3, 1]

    [models.gemma3-270m]               # what to try when a model fails before its first chunk
    fallbacks = ["gpt-4o-mini"]
    context_fallbacks = ["gpt-4.1-mini"]   # tried on context_too_long

    [profiles.planner]                 # per-agent defaults and budgets
    model = "chat-default"
    system = "You plan. Answer with numbered steps."
    sampling = { temperature = 0.2, max_tokens = 512 }
    priority = 2
    tokens_per_minute = 20000
    usd_per_day = 5.0

    [prices.my-finetune]               # USD per million tokens; overrides the built-in table
    input = 0.30
    output = 1.20

A group or fallback may name a model no worker serves yet (one may register later); a cycle
through groups and fallbacks is a config error (``broker/validate.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from tokenhive.schemas.messages import PriorityLevel, Sampling
from tokenhive.schemas.tools import Tool, ToolChoice

NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]


class ModelRoute(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[models.NAME]``: where a request for NAME goes when NAME cannot serve it."""

    fallbacks: list[str] = msgspec.field(default_factory=list)
    context_fallbacks: list[str] = msgspec.field(default_factory=list)


class ModelGroup(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[groups.NAME]``: one public name over several backing models (or groups)."""

    models: list[str]
    strategy: Literal["order", "weighted"] = "order"
    weights: list[float] = msgspec.field(default_factory=list)  # weighted: one per model


class Price(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """USD per million tokens."""

    input: NonNegative = 0.0
    output: NonNegative = 0.0
    cached_input: NonNegative | None = None  # None: the input price


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[profiles.NAME]``: one agent's defaults and budgets. A request's own fields win;
    ``priority`` applies when the request left the default (normal)."""

    model: str | None = None  # a model or group
    system: str | None = None  # a chat's system message, when the request has none
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    priority: PriorityLevel | None = None
    # The agent's tool set (OpenAI's shape): offered to its chat requests that bring none.
    tools: list[Tool] = msgspec.field(default_factory=list)
    tool_choice: ToolChoice | None = None  # with the profile's tools; None: "auto"
    # Budgets over rolling windows, counted from finished requests' usage. Over one: the
    # request is refused with budget_exceeded before it is queued.
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    usd_per_minute: float | None = None
    usd_per_day: float | None = None
