"""Semantic checks of the gateway tables of a BrokerConfig: groups, fallbacks, profiles,
prices. Names of models no worker serves yet are fine (one may register later); a cycle
through groups and fallbacks is not, nor a name that is both a group and a model route."""

from __future__ import annotations

from tokenhive.schemas.config import BrokerConfig
from tokenhive.schemas.tools import tools_problem


def gateway_problems(cfg: BrokerConfig) -> list[str]:
    problems: list[str] = []
    need = _collector(problems)
    need(cfg.fallback_wait >= 0, f"fallback_wait must be >= 0, got {cfg.fallback_wait}")
    need(cfg.cooldown_failures >= 1,
         f"cooldown_failures must be >= 1, got {cfg.cooldown_failures}")
    need(cfg.cooldown_window > 0, f"cooldown_window must be > 0, got {cfg.cooldown_window}")
    need(cfg.cooldown_s >= 0, f"cooldown_s must be >= 0, got {cfg.cooldown_s}")
    for name in sorted(set(cfg.groups) & set(cfg.models)):
        problems.append(f"{name!r} is both a group (groups.{name}) and a model "
                        f"(models.{name}): give the group its own name")
    for name, group in cfg.groups.items():
        need(bool(group.models), f"groups.{name}.models must not be empty")
        need(all(group.models), f"groups.{name}.models must not hold an empty name")
        if group.strategy == "weighted":
            need(len(group.weights) == len(group.models),
                 f"groups.{name}.weights needs one weight per model "
                 f"({len(group.models)}), got {len(group.weights)}")
            need(all(w >= 0 for w in group.weights) and sum(group.weights) > 0,
                 f"groups.{name}.weights must be >= 0 with a positive sum")
        else:
            need(not group.weights, f"groups.{name}.weights is only for strategy = 'weighted'")
    for name, route in cfg.models.items():
        need(all(route.fallbacks) and all(route.context_fallbacks),
             f"models.{name}: fallbacks must not hold an empty name")
    for name, profile in cfg.profiles.items():
        need(profile.model is None or bool(profile.model),
             f"profiles.{name}.model must not be empty")
        if profile.tools or profile.tool_choice is not None:
            problem = tools_problem(profile.tools, profile.tool_choice)
            need(problem is None, f"profiles.{name}.{problem}")
        for field in ("tokens_per_minute", "tokens_per_day", "usd_per_minute", "usd_per_day"):
            value = getattr(profile, field)
            need(value is None or value > 0, f"profiles.{name}.{field} must be > 0, got {value}")
    cycle = _cycle(cfg)
    if cycle:
        problems.append("groups/fallbacks form a cycle: " + " -> ".join(cycle))
    return problems


def _collector(problems: list[str]):  # type: ignore[no-untyped-def]
    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)
    return need


def _cycle(cfg: BrokerConfig) -> list[str]:
    """One cycle through group members, fallbacks and context fallbacks, or []."""
    edges: dict[str, list[str]] = {name: list(g.models) for name, g in cfg.groups.items()}
    for name, route in cfg.models.items():
        edges.setdefault(name, []).extend([*route.fallbacks, *route.context_fallbacks])
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return []
        path.append(node)
        for nxt in edges.get(node, ()):
            found = visit(nxt)
            if found:
                return found
        path.pop()
        done.add(node)
        return []

    for start in sorted(edges):
        found = visit(start)
        if found:
            return found
    return []
