"""Nodes: the machines workers run on, their health, and an operator's drain.

A node is known from two sources: the reports of its node agent (``tokenhive node`` sends a
``NodeReport`` every heartbeat interval) and the ``Ready.node`` of its workers (``tokenhive
up`` names the local host that way, without an agent). Health, recomputed by ``refresh``:

* ``down``: an agent node whose reports stopped for the worker timeout (the machine or its
  network is gone), or a node with no live worker left. Nothing is dispatched to it; when
  its reports stop, its workers are lost at once (see ``Timers``), without waiting for each
  worker's own liveness, so a whole machine lost costs one timeout, not one per worker.
* ``degraded``: some of its workers are not serving (unhealthy, loading, rate limited), the
  agent reports replicas it restarts or gave up on, or workers it runs are not registered.
  Its workers still serve, but the balancer prefers workers on ``ok`` nodes.
* ``ok``: otherwise.

``draining`` is separate: set by an operator (``tokenhive drain NODE``) or by an agent that
is stopping. A draining node gets no new work; what runs there finishes.

The verdict lands on each worker as ``Worker.node_rank`` (0 ok, 1 degraded, 2 unusable), so
the dispatch path filters with one integer compare per candidate.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenhive.broker.registry import RANK_DEGRADED, RANK_OK, RANK_UNUSABLE, Worker
from tokenhive.schemas.messages import GpuInfo, Health, NodeHealth, NodeReport, NodeStatus

MAX_NODES = 4096  # agent nodes remembered; a report beyond this is refused
MAX_NODE_GPUS = 256
MAX_NODE_WORKERS = 4096
MAX_NODE_TEXT = 256  # node id, host, GPU names and worker ids


class Node:
    __slots__ = ("agent", "detail", "draining", "failed", "gpus", "health", "host", "id",
                 "last_report", "lost", "reported", "restarting", "stopping")

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.host = ""
        self.agent = False  # an agent has reported it
        self.last_report = 0.0
        self.lost = False  # its reports stopped and its workers were dropped (until the next)
        self.gpus: list[GpuInfo] = []
        self.reported: list[str] = []  # worker ids the agent says it runs
        self.failed: list[str] = []
        self.restarting: list[str] = []
        self.stopping = False
        self.draining = False  # by an operator
        self.health = NodeHealth.OK
        self.detail = ""

    @property
    def rank(self) -> int:
        if self.draining or self.stopping or self.health is NodeHealth.DOWN:
            return RANK_UNUSABLE
        return RANK_DEGRADED if self.health is NodeHealth.DEGRADED else RANK_OK


def report_problem(report: NodeReport) -> str | None:
    """Why a node report is refused (sizes a peer controls are capped), or None."""
    texts = [report.node, report.host, *(g.name for g in report.gpus), *report.workers,
             *report.failed, *report.restarting]
    if not report.node:
        return "node id must not be empty"
    if len(report.gpus) > MAX_NODE_GPUS:
        return f"at most {MAX_NODE_GPUS} GPUs per node report"
    if max(len(report.workers), len(report.failed), len(report.restarting)) > MAX_NODE_WORKERS:
        return f"at most {MAX_NODE_WORKERS} workers per node report"
    if any(len(t) > MAX_NODE_TEXT for t in texts):
        return f"node ids, hosts, GPU names and worker ids must be at most {MAX_NODE_TEXT} chars"
    return None


class NodeBook:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}

    def get(self, node_id: str) -> Node | None:
        return self.nodes.get(node_id)

    def on_report(self, report: NodeReport, now: float) -> Node | None:
        """Record a report; None when the table is full of other nodes."""
        node = self.nodes.get(report.node)
        if node is None:
            if sum(1 for n in self.nodes.values() if n.agent) >= MAX_NODES:
                return None
            node = self.nodes[report.node] = Node(report.node)
        node.agent = True
        node.lost = False
        node.last_report = now
        node.host = report.host
        node.gpus = report.gpus
        node.reported = report.workers
        node.failed = report.failed
        node.restarting = report.restarting
        node.stopping = report.stopping
        return node

    def silent(self, now: float, timeout: float) -> list[Node]:
        """Agent nodes whose reports stopped for ``timeout``, not yet handled as lost."""
        return [n for n in self.nodes.values()
                if n.agent and not n.lost and now - n.last_report > timeout]

    def refresh(self, workers: Iterable[Worker], now: float, timeout: float) -> set[str]:
        """Recompute every node's health from its reports and its workers, and each worker's
        ``node_rank``. Nodes known only from workers are forgotten when the last one goes.
        Returns the models of workers whose rank changed (their queues may move now)."""
        changed: set[str] = set()
        by_node: dict[str, list[Worker]] = {}
        for worker in workers:
            if worker.node:
                by_node.setdefault(worker.node, []).append(worker)
            else:
                worker.node_rank = RANK_OK
        for name in by_node:
            if name not in self.nodes:
                self.nodes[name] = Node(name)
        for name, node in list(self.nodes.items()):
            mine = by_node.get(name, [])
            if not node.agent and not mine and not node.draining:
                del self.nodes[name]  # a worker-only node whose workers all left
                continue
            node.health, node.detail = _judge(node, mine, now, timeout)
            rank = node.rank
            for worker in mine:
                if worker.node_rank != rank:
                    worker.node_rank = rank
                    changed.add(worker.model)
        return changed

    def status(self, workers: Iterable[Worker], now: float) -> list[NodeStatus]:
        ids: dict[str, list[str]] = {}
        for worker in workers:
            if worker.node:
                ids.setdefault(worker.node, []).append(worker.name)
        return [
            NodeStatus(
                id=n.id, health=n.health, draining=n.draining or n.stopping,
                stopping=n.stopping, host=n.host,
                gpus=n.gpus, workers=sorted(ids.get(n.id, [])), detail=n.detail,
                last_seen_s=round(now - n.last_report, 3) if n.agent else 0.0, agent=n.agent,
            )
            for n in sorted(self.nodes.values(), key=lambda n: n.id)
        ]


def _judge(node: Node, workers: list[Worker], now: float,
           timeout: float) -> tuple[NodeHealth, str]:
    if node.agent and now - node.last_report > timeout:
        return NodeHealth.DOWN, f"no report for more than {timeout:g}s"
    if not workers:
        expected = len(node.reported) + len(node.restarting) + len(node.failed)
        return NodeHealth.DOWN, ("no live worker" if expected or not node.agent
                                 else "runs no worker")
    problems = []
    serving = sum(1 for w in workers if w.health is Health.OK)
    if serving < len(workers):
        problems.append(f"{len(workers) - serving} of {len(workers)} workers not serving")
    registered = {w.name for w in workers}
    missing = [w for w in node.reported if w not in registered]
    if missing:
        problems.append(f"{len(missing)} workers not registered")
    if node.restarting:
        problems.append(f"{len(node.restarting)} restarting")
    if node.failed:
        problems.append(f"{len(node.failed)} failed for good")
    if not problems:  # a stopping node is not less healthy: it shows as stopping (rank 2)
        return NodeHealth.OK, ""
    return NodeHealth.DEGRADED, "; ".join(problems)
