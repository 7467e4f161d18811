"""``python -m tokenhive.broker`` / ``tokenhive broker``: flags, config, run until a signal.

Every BrokerConfig field has a flag (``queue_size`` -> ``--queue-size``); flags left out
keep the config defaults. Once both sockets are bound the broker logs "broker ready" with
the actual endpoints (tcp port 0 picks a free port) and, with ``--ready-file``, writes
``{"clients": ..., "workers": ..., "pid": ..., "metrics": ...}`` there atomically, which is
what tests and ``tokenhive up`` wait for. With ``--metrics HOST:PORT`` the broker also serves
Prometheus text on ``http://HOST:PORT/metrics`` (broker/metrics_http.py), from its own event
loop; ``metrics`` in the ready file is the bound ``HOST:PORT`` ("" when off).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import msgspec
import uvloop
import zmq
from prometheus_client import generate_latest

from tokenhive.broker.auth import curve_problems
from tokenhive.broker.loop import BrokerServer
from tokenhive.broker.metrics_collect import broker_registry
from tokenhive.broker.validate import config_problems
from tokenhive.logs import configure_logging
from tokenhive.metrics_http import MetricsServer
from tokenhive.schemas.config import BrokerConfig
from tokenhive.transport import CurveKeyError

log = logging.getLogger("tokenhive.broker")

_HELP = {
    "clients": "address clients connect to (tcp://host:0 picks a free port)",
    "workers": "address workers connect to",
    "heartbeat_interval": "seconds between pings to workers",
    "heartbeat_liveness": "missed heartbeat intervals before a worker is dead",
    "client_liveness": "seconds of client silence before its requests are cancelled",
    "queue_size": "queued requests per model before new ones get 'overloaded'",
    "max_attempts": "dispatches per request when workers die before streaming",
    "retry_after": "seconds suggested to clients with 'overloaded'",
    "balancer": "least_loaded | round_robin | fastest",
    "hwm": "ZeroMQ high-water mark (messages) on both sockets",
    "client_buffer": "messages buffered for a slow client before its requests are cut off",
    "no_worker_timeout": "seconds queued requests wait while no worker of their model is "
                         "alive and healthy (or loading)",
    "fallback_wait": "seconds a queued request with fallbacks waits while its model has no "
                     "healthy worker before it moves to the next model",
    "cooldown_failures": "worker failures of a model within cooldown_window that start a "
                         "cooldown",
    "cooldown_window": "seconds over which a model's failures are counted",
    "cooldown_s": "seconds a failing model is skipped while an alternative is left",
    "curve_secret_key": "FILE with the broker's CURVE key pair (a *.key_secret from "
                        "`tokenhive keys generate`): encrypts and authenticates tcp links",
    "curve_allow": "DIR of allowed public *.key files, for workers and clients",
    "curve_allow_workers": "DIR of workers' allowed public *.key files (instead of --curve-allow)",
    "curve_allow_clients": "DIR of clients' allowed public *.key files (instead of --curve-allow)",
    "curve_allow_admins": "DIR of public *.key files that may drain nodes (besides the broker's "
                          "own key); with keyed clients, no other client may",
    "insecure": "allow a non-loopback tcp bind without CURVE keys",
    "metrics": "HOST:PORT to serve Prometheus metrics on (http://HOST:PORT/metrics); a bare "
               "PORT or :PORT binds loopback, port 0 picks a free one; empty: off",
}


def _flag_fields() -> list[msgspec.structs.FieldInfo]:
    """Scalar fields get a flag each; nested sections (``limits``) come by --config-json."""
    return [f for f in msgspec.structs.fields(BrokerConfig)
            if isinstance(f.default, (str, int, float, bool))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-json", metavar="JSON",
                        help="the whole [broker] section as JSON (`-`: read it from stdin); "
                        "flags override its fields")
    for field in _flag_fields():
        if isinstance(field.default, bool):
            parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name,
                                action="store_true", default=None,
                                help=_HELP.get(field.name, field.name))
            continue
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=type(field.default),
            default=None,
            metavar=type(field.default).__name__.upper(),
            help=f"{_HELP.get(field.name, field.name)} (default: {field.default})",
        )
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="write the bound endpoints here as JSON once ready")


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    """The config the flags describe; ValueError naming every bad value."""
    raw = getattr(args, "config_json", None)
    text = sys.stdin.read() if raw == "-" else raw
    given: dict[str, object] = {}
    if text:
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise ValueError("--config-json must be a JSON object")
        given.update(loaded)
    given.update({
        f.name: getattr(args, f.name)
        for f in _flag_fields()
        if getattr(args, f.name, None) is not None
    })
    cfg = msgspec.convert(given, BrokerConfig)
    problems = config_problems(cfg) + curve_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


def write_ready_file(path: Path, clients: str, workers: str, metrics: str = "") -> None:
    """Atomically: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"clients": clients, "workers": workers, "pid": os.getpid(),
                               "metrics": metrics}))
    os.replace(tmp, path)


async def start_metrics(server: BrokerServer, address: str) -> tuple[MetricsServer, str]:
    """The /metrics endpoint over the broker's state, in this (the broker's) event loop;
    returns it and its bound HOST:PORT. OSError if the address cannot be bound."""
    core = server.core
    registry = broker_registry(core.status, core.state.metrics)
    metrics = MetricsServer(lambda: generate_latest(registry))
    return metrics, await metrics.start(address)


async def serve(cfg: BrokerConfig, ready_file: Path | None = None) -> int:
    try:
        server = BrokerServer(cfg)
    except CurveKeyError as exc:
        log.error("bad CURVE keys", extra={"error": str(exc)})
        print(f"tokenhive broker: {exc}", file=sys.stderr)
        return 2
    try:
        clients, workers = server.bind()
    except zmq.ZMQError as exc:
        log.error("cannot bind", extra={"clients": cfg.clients, "workers": cfg.workers,
                                        "error": str(exc)})
        server.close(linger_ms=0)
        return 1
    metrics: MetricsServer | None = None
    metrics_at = ""
    if cfg.metrics:
        try:
            metrics, metrics_at = await start_metrics(server, cfg.metrics)
        except OSError as exc:
            log.error("cannot bind metrics", extra={"metrics": cfg.metrics, "error": str(exc)})
            server.close(linger_ms=0)
            return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("broker ready", extra={"clients": clients, "workers": workers, "pid": os.getpid(),
                                    "balancer": cfg.balancer, "metrics": metrics_at,
                                    "curve": server.authenticator is not None})
    if ready_file is not None:
        write_ready_file(ready_file, clients, workers, metrics_at)
    try:
        await server.serve(stop)
    finally:
        if metrics is not None:
            await metrics.close()
        server.close()
    log.info("broker stopped", extra={"counters": server.core.status().counters})
    return 0


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError, msgspec.ValidationError) as exc:
        log.error("bad broker config", extra={"error": str(exc)})
        print(f"tokenhive broker: {exc}", file=sys.stderr)
        return 2
    return uvloop.run(serve(cfg, args.ready_file))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenhive broker", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
