"""``tokenhive node --join tcp://HEAD:PORT [--config node.toml]``: the node agent, one per
machine. It finds the machine's GPUs (NVML, else ``nvidia-smi -L``, else
``CUDA_VISIBLE_DEVICES``; none on a CPU host), starts one worker per GPU per configured model
with that GPU pinned (``gpus_per_worker`` GPUs each for a model too big for one), restarts
crashed workers with backoff, reports the node to the broker, and drains every worker on
SIGTERM or Ctrl-C (a second signal hurries them).

``--join`` is the broker's *worker* endpoint. Without ``--config`` the node serves the
embedded default model, every layer on the GPU where there is one. The node id (default: the
host name) is the start of every worker id and the node the broker groups them under.
A non-loopback ``--join`` needs CURVE keys (``--curve-secret-key``, ``--curve-server-key``:
FILES) unless ``--insecure``.

Exit codes: 0 stopped cleanly; 1 every worker failed for good; 2 usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from tokenhive import transport
from tokenhive.clients.cli.common import EXIT_USAGE, LOG_LEVELS, add_log_format, run_async
from tokenhive.clients.node.agent import NodeAgent
from tokenhive.clients.node.gpus import Discovery, discover
from tokenhive.clients.node.plan import NodePlan, plan_workers
from tokenhive.clients.pool.options import default_spec_dict, read_workers_file
from tokenhive.metrics_http import metrics_problems
from tokenhive.schemas.config import AnyWorkerSpec, ConfigError
from tokenhive.schemas.node_config import (
    NODE_ID,
    NodeConfig,
    load_node_config,
    node_config_problems,
)

PROG = "tokenhive node"
log = logging.getLogger("tokenhive.node")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--join", metavar="ENDPOINT",
                        help="the broker's worker endpoint, e.g. tcp://head:5556 (overrides "
                             "`join` in the config)")
    parser.add_argument("--config", metavar="NODE.TOML",
                        help="node definition (see examples/node.toml); default: the embedded "
                             "model, one worker per GPU")
    parser.add_argument("--node-id", metavar="ID", help="node id (default: the host name)")
    parser.add_argument("--curve-secret-key", metavar="FILE",
                        help="our CURVE key pair (*.key_secret), for the node and its workers")
    parser.add_argument("--curve-server-key", metavar="FILE",
                        help="the broker's public CURVE key (*.key)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="join a non-loopback tcp endpoint without CURVE keys")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus text on http://HOST:PORT/metrics (a bare PORT "
                             "binds loopback): GPU memory and use, worker states, restarts")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                        help="logs on stderr at this level (default: the config's, else info)")
    add_log_format(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config = node_config_from_args(args)
        curve = curve_keys(config)
        flags = worker_flags(config)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with tempfile.TemporaryDirectory(prefix="tokenhive-node-") as run_dir:
        return run_async(_main(config, curve, flags, Path(run_dir)), config.log_level,
                         args.log_format)


async def _main(config: NodeConfig, curve: transport.CurveKeys | None, flags: list[str],
                run_dir: Path) -> int:
    discovery = await asyncio.to_thread(discover)
    try:
        plan = node_plan(config, discovery)
    except ConfigError as exc:
        discovery.close()
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    agent = NodeAgent(node=config.node, host=socket.gethostname(), join=config.join,
                      config=config, plan=plan, discovery=discovery, run_dir=run_dir,
                      log_level=config.log_level, curve=curve, worker_flags=flags)
    return await agent.run()


def node_config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The config file (or the defaults) with the flags over it, checked; ConfigError."""
    config = read_node_file(Path(args.config)) if args.config else NodeConfig()
    overrides: dict[str, Any] = {
        "join": args.join, "node": args.node_id, "curve_secret_key": args.curve_secret_key,
        "curve_server_key": args.curve_server_key, "insecure": args.insecure,
        "log_level": args.log_level, "metrics": args.metrics,
    }
    config = msgspec.structs.replace(
        config, **{k: v for k, v in overrides.items() if v is not None})
    if not config.join:
        raise ConfigError("--join tcp://HEAD:PORT is required (the broker's worker endpoint), "
                          "or `join` in the config")
    if not re.fullmatch(r"(tcp|ipc)://.+", config.join):
        raise ConfigError(f"--join {config.join!r}: expected tcp://HOST:PORT or ipc://PATH")
    if not config.node:
        host = socket.gethostname()
        if not NODE_ID.fullmatch(host):
            raise ConfigError(f"the host name {host!r} is no usable node id: give --node-id")
        config = msgspec.structs.replace(config, node=host)
    if problems := node_config_problems(config) + metrics_problems(config.metrics):
        raise ConfigError("; ".join(problems))
    if not config.curve_secret_key and not config.insecure and not transport.is_loopback(
            config.join):
        raise ConfigError(f"refusing to join {config.join} without CURVE keys: the node's "
                          "and its workers' traffic (prompts included) would cross the network "
                          "in the clear; give --curve-secret-key and --curve-server-key, or "
                          "--insecure")
    return config


def read_node_file(path: Path) -> NodeConfig:
    return read_workers_file(path, load_node_config)


def curve_keys(config: NodeConfig) -> transport.CurveKeys | None:
    if not config.curve_secret_key:
        return None
    try:
        return transport.load_curve_keys(config.curve_secret_key, config.curve_server_key)
    except transport.CurveKeyError as exc:
        raise ConfigError(str(exc)) from None


def worker_flags(config: NodeConfig) -> list[str]:
    """What every worker gets after ``worker_argv``'s flags: its timing, the key FILES (the
    worker reads them itself) and chunk packing."""
    flags = ["--heartbeat-interval", str(config.heartbeat_interval),
             "--drain-timeout", str(config.drain_timeout)]
    if config.curve_secret_key:
        flags += ["--curve-secret-key", str(Path(config.curve_secret_key).resolve()),
                  "--curve-server-key", str(Path(config.curve_server_key).resolve())]
    if config.pack_chunks:
        flags.append("--pack-chunks")
    return flags


def node_plan(config: NodeConfig, discovery: Discovery) -> NodePlan:
    """The workers of ``config`` on the GPUs found (the default model without a config)."""
    specs: list[AnyWorkerSpec] = config.workers
    if not specs:
        raw = default_spec_dict()
        if discovery.gpus:
            raw["n_gpu_layers"] = -1  # a GPU node: every layer on its GPU
        specs = [msgspec.convert(raw, type=AnyWorkerSpec)]  # type: ignore[arg-type]
    plan = plan_workers(config.node, specs, discovery.gpus, config.gpus_per_worker)
    for note in plan.notes:
        log.warning(note)
    return plan
