"""CurveZMQ for the broker: its key pair and allow-lists from the config's FILES, and the
refusal to expose plain sockets to the network.

ipc and loopback tcp stay plain unless keys are given. A non-loopback tcp bind without keys
is refused unless ``insecure`` is set: any host could register as a worker there and read
other people's prompts.
"""

from __future__ import annotations

from typing import NamedTuple

from tokenhive import transport
from tokenhive.schemas.config import BrokerConfig

WORKERS_DOMAIN = "workers"
CLIENTS_DOMAIN = "clients"


class BrokerCurve(NamedTuple):
    keys: transport.CurveKeys
    allow: dict[str, str]  # ZAP domain -> directory of allowed public *.key files


def curve_problems(cfg: BrokerConfig) -> list[str]:
    """What makes the CURVE settings unusable (empty: fine)."""
    problems: list[str] = []
    sides = {"workers": cfg.curve_allow_workers or cfg.curve_allow,
             "clients": cfg.curve_allow_clients or cfg.curve_allow}
    any_allow = cfg.curve_allow or cfg.curve_allow_workers or cfg.curve_allow_clients
    if cfg.curve_secret_key:
        missing = [side for side, directory in sides.items() if not directory]
        if missing:
            problems.append(f"--curve-secret-key needs an allow-list for {' and '.join(missing)}"
                            " (--curve-allow DIR, or --curve-allow-workers/--curve-allow-clients)")
    elif any_allow:
        problems.append("--curve-allow* needs --curve-secret-key (the broker's key pair)")
    elif not cfg.insecure:
        exposed = [a for a in (cfg.clients, cfg.workers) if not transport.is_loopback(a)]
        if exposed:
            problems.append(f"refusing to bind {', '.join(exposed)} without CURVE keys: anyone "
                            "on the network could connect; give --curve-secret-key and "
                            "--curve-allow, or --insecure")
    return problems


def broker_curve(cfg: BrokerConfig) -> BrokerCurve | None:
    """The keys and allow-lists the config names, read now; None when CURVE is off.
    ``transport.CurveKeyError`` names an unreadable file."""
    if not cfg.curve_secret_key:
        return None
    keys = transport.load_curve_keys(cfg.curve_secret_key)
    return BrokerCurve(keys, {
        WORKERS_DOMAIN: cfg.curve_allow_workers or cfg.curve_allow,
        CLIENTS_DOMAIN: cfg.curve_allow_clients or cfg.curve_allow,
    })
