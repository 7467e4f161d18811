"""CurveZMQ for the broker: its key pair and allow-lists from the config's FILES, and the
refusal to expose plain sockets to the network.

A side (clients or workers) is keyed when it has an allow-list: ``curve_allow`` keys both,
``curve_allow_clients`` / ``curve_allow_workers`` one each (so a pool can key its tcp client
side and keep its local workers on plain ipc). ipc and loopback tcp stay plain unless keyed.
A non-loopback tcp side without keys is refused unless ``insecure`` is set: any host could
register as a worker there and read other people's prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import zmq.auth

from tokenhive import transport
from tokenhive.schemas.config import BrokerConfig

WORKERS_DOMAIN = "workers"
CLIENTS_DOMAIN = "clients"


class BrokerCurve(NamedTuple):
    keys: transport.CurveKeys
    allow: dict[str, str]  # ZAP domain -> directory of allowed public *.key files


def _allow_lists(cfg: BrokerConfig) -> dict[str, str]:
    """ZAP domain -> allow-list directory, for the keyed sides only."""
    sides = {WORKERS_DOMAIN: cfg.curve_allow_workers or cfg.curve_allow,
             CLIENTS_DOMAIN: cfg.curve_allow_clients or cfg.curve_allow}
    return {domain: directory for domain, directory in sides.items() if directory}


def curve_problems(cfg: BrokerConfig) -> list[str]:
    """What makes the CURVE settings unusable or the binds unsafe (empty: fine)."""
    allow = _allow_lists(cfg)
    if cfg.curve_secret_key and not allow:
        return ["--curve-secret-key needs an allow-list (--curve-allow DIR, or "
                "--curve-allow-workers / --curve-allow-clients)"]
    if allow and not cfg.curve_secret_key:
        return ["--curve-allow* needs --curve-secret-key (the broker's key pair)"]
    if cfg.insecure:
        return []
    exposed = [address for domain, address in ((CLIENTS_DOMAIN, cfg.clients),
                                                (WORKERS_DOMAIN, cfg.workers))
               if domain not in allow and not transport.is_loopback(address)]
    if exposed:
        return [f"refusing to bind {', '.join(exposed)} without CURVE keys: anyone on the "
                "network could connect; give --curve-secret-key and --curve-allow, or "
                "--insecure"]
    return []


def operator_check(cfg: BrokerConfig, curve: BrokerCurve | None) -> Callable[[str | None], bool]:
    """Who may send operator messages (DrainNode, MarkModelFailed), by CURVE key: with keyed
    clients, the broker's own key and those in ``curve_allow_admins`` (read at each check, so
    a removed key loses the right at once). A plain client side (loopback or ipc) has no keys
    to tell apart: every client there may (``user`` is None)."""
    own = curve.keys.public.decode() if curve is not None else None
    directory = cfg.curve_allow_admins

    def may_operate(user: str | None) -> bool:
        if user is None or user == own:
            return True
        if not directory:
            return False
        try:
            return bool(zmq.auth.load_certificates(directory).get(user.encode()))
        except OSError:
            return False

    return may_operate


def broker_curve(cfg: BrokerConfig) -> BrokerCurve | None:
    """The keys and allow-lists the config names, read now; None when CURVE is off.
    ``transport.CurveKeyError`` names an unreadable file."""
    allow = _allow_lists(cfg)
    if not cfg.curve_secret_key or not allow:
        return None
    return BrokerCurve(transport.load_curve_keys(cfg.curve_secret_key), allow)
