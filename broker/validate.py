"""Semantic checks of a BrokerConfig (msgspec checks the types, this checks the values)."""

from __future__ import annotations

import msgspec

from tokenhive.broker.balancer import BALANCERS
from tokenhive.broker.validate_gateway import gateway_problems
from tokenhive.metrics_http import metrics_problems
from tokenhive.schemas.config import BrokerConfig

MIN_MESSAGE_BYTES = 4096  # below this even a small request or a status reply would not fit


def config_problems(cfg: BrokerConfig) -> list[str]:
    """Every problem, each naming its field; empty when the config is usable."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(cfg.heartbeat_interval > 0,
         f"heartbeat_interval must be > 0, got {cfg.heartbeat_interval}")
    need(cfg.heartbeat_liveness >= 1,
         f"heartbeat_liveness must be >= 1, got {cfg.heartbeat_liveness}")
    need(cfg.client_liveness > 0, f"client_liveness must be > 0, got {cfg.client_liveness}")
    need(cfg.queue_size >= 1, f"queue_size must be >= 1, got {cfg.queue_size}")
    need(cfg.max_attempts >= 1, f"max_attempts must be >= 1, got {cfg.max_attempts}")
    need(cfg.retry_after >= 0, f"retry_after must be >= 0, got {cfg.retry_after}")
    need(cfg.hwm >= 1, f"hwm must be >= 1, got {cfg.hwm}")
    need(cfg.client_buffer >= 1, f"client_buffer must be >= 1, got {cfg.client_buffer}")
    need(cfg.no_worker_timeout > 0, f"no_worker_timeout must be > 0, got {cfg.no_worker_timeout}")
    need(cfg.balancer in BALANCERS,
         f"balancer must be one of {', '.join(sorted(BALANCERS))}, got {cfg.balancer!r}")
    for limit in msgspec.structs.fields(cfg.limits):
        value = getattr(cfg.limits, limit.name)
        least = MIN_MESSAGE_BYTES if limit.name == "max_message_bytes" else 1
        need(type(value) is int and value >= least,
             f"limits.{limit.name} must be an integer >= {least}, got {value!r}")
    for field in ("clients", "workers"):
        address = getattr(cfg, field)
        need(address.partition("://")[0] in ("tcp", "ipc", "inproc"),
             f"{field} must be a tcp://, ipc:// or inproc:// address, got {address!r}")
    problems += metrics_problems(cfg.metrics)
    problems += gateway_problems(cfg)
    return problems
