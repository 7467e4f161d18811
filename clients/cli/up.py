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
from tokenhive.schemas.config import DEFAULT_WORKERS, PoolConfig
from tokenhive.schemas.errors import TokenHiveError

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
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                        help="logs on stderr at this level (default: the config's, else info)")
    add_log_format(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config = with_broker(pool_config_from_args(args), args.clients, args.worker_endpoint)
    except ConfigError as exc:
        print(f"tokenhive up: {exc}", file=sys.stderr)
        return EXIT_USAGE
    level = args.log_level or config.log_level
    with tempfile.TemporaryDirectory(prefix="tokenhive-up-") as run_dir:
        config = with_private_worker_socket(config, Path(run_dir))
        processes = PoolProcesses(config, run_dir=Path(run_dir), log_level=level)
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
    async with AsyncClient(address) as client:
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
