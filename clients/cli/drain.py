"""``tokenhive drain NODE`` / ``tokenhive undrain NODE``: stop or resume new work on a node.

Draining sends nothing new to the node's workers; what already runs there finishes, and
queued work goes to workers on other nodes. Use it before maintenance, then stop the node
(its agent drains its workers on SIGTERM), or undrain it to put it back.
"""

from __future__ import annotations

import argparse
import sys

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.cli.common import (
    EXIT_OK,
    add_broker,
    add_curve_arguments,
    add_log_level,
    curve_from_args,
    report,
    run_async,
)
from tokenhive.schemas.config import DEFAULT_CLIENTS
from tokenhive.schemas.errors import TokenHiveError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("node", help="the node id, as `tokenhive status` shows it")
    add_broker(parser, f"default {DEFAULT_CLIENTS}")
    add_curve_arguments(parser)
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="give up when the broker has not answered in this long")
    add_log_level(parser, "warning")


def run(args: argparse.Namespace) -> int:
    return run_async(_main(args, drain=args.command != "undrain"), args.log_level)


async def _main(args: argparse.Namespace, drain: bool) -> int:
    address = args.broker or DEFAULT_CLIENTS
    try:
        curve = curve_from_args(args)
        async with AsyncClient(address, broker_timeout=args.timeout, curve=curve) as client:
            node = await client.drain_node(args.node, drain=drain, timeout=args.timeout)
    except TokenHiveError as exc:
        return report(exc, "drain" if drain else "undrain")
    state = "draining" if node.draining else "taking work"
    sys.stdout.write(f"node {node.id}: {state}, health {node.health.value}, "
                     f"{len(node.workers)} workers\n")
    return EXIT_OK
