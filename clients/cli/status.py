"""``tokenhive status``: the broker's view of the pool, as a table or as JSON."""

from __future__ import annotations

import argparse
import sys

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.cli.common import (
    BROKER_ENV,
    EXIT_OK,
    add_broker,
    add_curve_arguments,
    add_log_level,
    curve_from_args,
    print_json,
    report,
    run_async,
)
from tokenhive.clients.cli.target import CONNECT_TIMEOUT, NoBrokerAnswers, probe_broker
from tokenhive.schemas.config import DEFAULT_CLIENTS
from tokenhive.schemas.errors import BrokerUnavailable, TokenHiveError
from tokenhive.schemas.messages import NodeStatus, StatusReply, WorkerStatus

COLUMNS = ("worker", "model", "backend", "health", "slots", "free", "in-flight", "served",
           "failed", "latency ms", "seen s", "device")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker(parser, f"default {DEFAULT_CLIENTS}")
    add_curve_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the StatusReply as JSON")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="give up when the broker has not answered in this long")
    add_log_level(parser, "warning")


def run(args: argparse.Namespace) -> int:
    return run_async(_main(args), args.log_level)


async def _main(args: argparse.Namespace) -> int:
    address = args.broker or DEFAULT_CLIENTS
    try:
        curve = curve_from_args(args)
        try:  # nothing listening is known at once, not after --timeout
            await probe_broker(address, connect_timeout=min(args.timeout, CONNECT_TIMEOUT),
                               status_timeout=args.timeout, curve=curve)
        except NoBrokerAnswers as exc:  # with its code: scripts match broker_unavailable
            raise BrokerUnavailable(exc.message) from None
        async with AsyncClient(address, broker_timeout=args.timeout, curve=curve) as client:
            status = await client.status(timeout=args.timeout)
    except TokenHiveError as exc:
        if not args.broker:
            print(f"(no --broker given and {BROKER_ENV} unset: tried {address})", file=sys.stderr)
        return report(exc, "status")
    if args.json:
        print_json(status)
    else:
        sys.stdout.write(render(status, address))
    return EXIT_OK


def render(status: StatusReply, address: str) -> str:
    lines = [f"broker {address}: up {status.uptime_s:.0f}s, {len(status.workers)} workers, "
             f"{status.in_flight} in flight"]
    if not status.workers:
        lines.append("(no workers registered)")
    nodes = {n.id: n for n in status.nodes}
    for node_id in sorted({w.node for w in status.workers} | set(nodes)):
        workers = [w for w in status.workers if w.node == node_id]
        if node_id:
            lines.append(node_line(nodes[node_id]) if node_id in nodes else f"node {node_id}")
        elif nodes:
            lines.append("no node")
        if workers:
            lines += ["  " + line if node_id or nodes else line
                      for line in table(COLUMNS, [worker_row(w) for w in workers])]
    queued = ", ".join(f"{m}={n}" for m, n in sorted(status.queues.items())) or "none"
    lines.append(f"queue depth: {queued}")
    counters = ", ".join(f"{k}={v}" for k, v in status.counters.items() if v) or "all zero"
    lines.append(f"counters: {counters}")
    lines += gateway_lines(status)
    return "\n".join(lines) + "\n"


def worker_row(w: WorkerStatus) -> tuple[str, ...]:
    return (w.id, w.model, w.backend, w.health, str(w.slots), str(w.free_slots),
            str(w.in_flight), str(w.served), str(w.failed), f"{w.latency_ms:.1f}",
            f"{w.last_seen_s:.1f}", w.device)


def node_line(node: NodeStatus) -> str:
    """``node gpu-1 (host a): ok, draining; 2 GPUs, 12.5/160.0 GiB used; ...``"""
    parts = [node.health.value]
    if node.stopping:
        parts.append("stopping")
    elif node.draining:
        parts.append("draining")
    if node.detail:
        parts.append(node.detail)
    if node.gpus:
        used = sum(g.memory_used_mb for g in node.gpus) / 1024
        total = sum(g.memory_total_mb for g in node.gpus) / 1024
        names = sorted({g.name for g in node.gpus if g.name})
        gpus = f"{len(node.gpus)} GPUs" + (f" ({', '.join(names)})" if names else "")
        if total:
            gpus += f", {used:.1f}/{total:.1f} GiB used"
        parts.append(gpus)
    elif node.agent:
        parts.append("no GPUs")
    host = f" ({node.host})" if node.host and node.host != node.id else ""
    return f"node {node.id}{host}: " + "; ".join(parts)


def gateway_lines(status: StatusReply) -> list[str]:
    """Groups, cooldowns and what finished requests used and cost, when there are any."""
    lines: list[str] = []
    if status.groups:
        groups = "; ".join(f"{g} = {', '.join(ms)}" for g, ms in sorted(status.groups.items()))
        lines.append(f"groups: {groups}")
    if status.cooldowns:
        cooling = ", ".join(f"{m} ({s:.0f}s left)" for m, s in sorted(status.cooldowns.items()))
        lines.append(f"cooling down: {cooling}")
    for title, spend in (("model", status.spend_by_model), ("profile", status.spend_by_profile)):
        if not spend:
            continue
        rows: list[tuple[str, ...]] = [
            (name, str(s.requests), str(s.prompt_tokens), str(s.completion_tokens),
             f"{s.cost_usd:.6f}", str(s.estimated) if s.estimated else "")
            for name, s in sorted(spend.items())
        ]
        lines += table((title, "requests", "prompt tok", "completion tok", "cost USD",
                        "estimated"), rows)
    return lines


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), *(line(r) for r in rows)]
