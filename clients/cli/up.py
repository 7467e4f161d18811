"""``tokenhive up``: run a broker and its workers until SIGINT/SIGTERM.

The pool comes from ``--config pool.toml`` (see ``schemas/config.py``; unknown keys are
errors naming the key) or from flags (``--backend echo --model m --workers 2 --slots 4``).
Workers that die are restarted with exponential backoff, except those that exit 3 (the
model failed to load): those are reported and left down. Exits 1 if no worker is left.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from pathlib import Path

import msgspec

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    LOG_LEVELS,
    add_log_format,
    report,
    run_async,
)
from tokenhive.clients.pool.options import (
    ConfigError,
    add_pool_arguments,
    pool_config_from_args,
    with_broker,
)
from tokenhive.clients.pool.pool import PoolProcesses
from tokenhive.clients.pool.supervisor import State
from tokenhive.metrics_http import metrics_problems
from tokenhive.schemas.config import DEFAULT_WORKERS, PoolConfig
from tokenhive.schemas.errors import TokenHiveError
from tokenhive.transport import CurveKeyError

log = logging.getLogger("tokenhive.up")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pool_arguments(parser)
    parser.add_argument("--clients", metavar="ADDR",
                        help="address clients connect to (overrides [broker] clients)")
    parser.add_argument("--worker-endpoint", metavar="ADDR",
                        help="address workers connect to (overrides [broker] workers)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, metavar="S",
                        help="seconds to wait for workers before reporting them not ready")
    parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                        help="on stop, seconds workers get to finish in-flight work")
    parser.add_argument("--metrics", metavar="HOST:PORT", default=None,
                        help="the broker serves Prometheus metrics on http://HOST:PORT/metrics "
                        "(a bare PORT binds loopback; overrides [broker] metrics)")
    keys = parser.add_argument_group(
        "CURVE keys (files, never key material; override [broker] in the pool file)")
    for flag, help_text in CURVE_FLAGS.items():
        keys.add_argument(flag, metavar="FILE" if flag.endswith("key") else "DIR",
                          default=None, help=help_text)
    keys.add_argument("--insecure", action="store_true", default=None,
                      help="allow a non-loopback tcp bind without CURVE keys")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                        help="logs on stderr at this level (default: the config's, else info)")
    add_log_format(parser)


CURVE_FLAGS = {
    "--curve-secret-key": "the broker's *.key_secret: keys the sides that have an allow-list; "
                          "this pool's own workers and readiness client use it too",
    "--curve-allow": "DIR of allowed public *.key files, for workers and clients",
    "--curve-allow-clients": "DIR of clients' allowed public *.key files",
    "--curve-allow-workers": "DIR of workers' allowed public *.key files",
    "--curve-allow-admins": "DIR of public *.key files that may drain nodes (besides the "
                            "broker's own key)",
}


def with_curve(config: PoolConfig, args: argparse.Namespace) -> PoolConfig:
    """The CURVE flags given, over the pool file's [broker] settings."""
    given = {name: getattr(args, name) for name in (
        "curve_secret_key", "curve_allow", "curve_allow_clients", "curve_allow_workers",
        "curve_allow_admins", "insecure") if getattr(args, name, None) is not None}
    if not given:
        return config
    return msgspec.structs.replace(config, broker=msgspec.structs.replace(config.broker,
                                                                          **given))


def with_metrics(config: PoolConfig, metrics: str | None) -> PoolConfig:
    """``--metrics`` over the pool file's [broker] metrics."""
    if metrics is None:
        return config
    if problems := metrics_problems(metrics):
        raise ConfigError("; ".join(problems))
    return msgspec.structs.replace(config, broker=msgspec.structs.replace(config.broker,
                                                                          metrics=metrics))


def run(args: argparse.Namespace) -> int:
    try:
        config = with_broker(pool_config_from_args(args), args.clients, args.worker_endpoint)
        config = with_curve(config, args)
        config = with_metrics(config, args.metrics)
    except ConfigError as exc:
        print(f"tokenhive up: {exc}", file=sys.stderr)
        return EXIT_USAGE
    level = args.log_level or config.log_level
    with tempfile.TemporaryDirectory(prefix="tokenhive-up-") as run_dir:
        config = with_private_worker_socket(config, Path(run_dir))
        try:
            processes = PoolProcesses(config, run_dir=Path(run_dir), log_level=level)
        except CurveKeyError as exc:
            print(f"tokenhive up: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return run_async(_serve(processes, args), level)


def with_private_worker_socket(config: PoolConfig, run_dir: Path) -> PoolConfig:
    """Unless told otherwise, our own workers only meet the broker in this run's private
    (0700) directory, so two `tokenhive up` never share, or steal, one socket."""
    if config.broker.workers != DEFAULT_WORKERS:
        return config
    broker = msgspec.structs.replace(config.broker, workers=f"ipc://{run_dir}/workers.sock")
    return msgspec.structs.replace(config, broker=broker)


async def _serve(processes: PoolProcesses, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            endpoints = await processes.start()
        except TokenHiveError as exc:
            return report(exc, "up")
        print(f"tokenhive: broker ready; clients connect to {endpoints.clients}", flush=True)
        if endpoints.metrics:
            print(f"tokenhive: metrics on http://{endpoints.metrics}/metrics", flush=True)
        ready = asyncio.create_task(_announce_ready(processes, endpoints.clients, args))
        lost = asyncio.create_task(_all_workers_gone(processes))
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
        for task in (ready, lost, stopped):
            task.cancel()
        if lost in done:
            print("tokenhive up: every worker failed for good; stopping", file=sys.stderr)
            return EXIT_FAILED
        print("tokenhive: stopping", file=sys.stderr, flush=True)
        return EXIT_OK
    finally:
        await processes.stop(drain=args.drain_timeout)


async def _announce_ready(processes: PoolProcesses, address: str, args: argparse.Namespace) -> None:
    async with AsyncClient(address, curve=processes.client_curve) as client:
        try:
            await processes.wait_workers(client, args.ready_timeout)
        except TokenHiveError as exc:
            log.error("workers not ready", extra={"error": exc.message})
            return
    models = sorted({spec.model for spec, _ in processes.workers})
    print(f"tokenhive: workers ready, serving {', '.join(models)}", flush=True)


async def _all_workers_gone(processes: PoolProcesses) -> None:
    """Returns once every worker replica has given up (nothing left to serve)."""
    while True:
        if processes.workers and all(r.state is State.GAVE_UP for _, r in processes.workers):
            return
        processes.supervisor.changed.clear()
        await processes.supervisor.changed.wait()
