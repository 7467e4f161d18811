"""The node agent's Prometheus figures (``tokenhive node --metrics HOST:PORT``).

What only the node sees, read from the agent at scrape time on its own event loop (served by
``tokenhive.metrics_http``): its GPUs as the last report sampled them (memory, utilisation),
each supervised worker's state and restarts, and whether the node is stopping. The broker's
``/metrics`` has the pool's view (requests, latency, node health); a node's adds the
machine's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenhive.clients.pool.supervisor import State

if TYPE_CHECKING:
    from tokenhive.clients.node.agent import NodeAgent

MIB = 1024 * 1024


class NodeCollector(Collector):
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent, node = self.agent, self.agent.node
        used = GaugeMetricFamily("tokenhive_node_gpu_memory_used_bytes",
                                 "GPU memory in use (NVML)", labels=["node", "gpu", "name"])
        total = GaugeMetricFamily("tokenhive_node_gpu_memory_total_bytes",
                                  "GPU memory (NVML)", labels=["node", "gpu", "name"])
        util = GaugeMetricFamily("tokenhive_node_gpu_utilization_ratio",
                                 "GPU busy share over NVML's last sample period (0..1)",
                                 labels=["node", "gpu", "name"])
        for gpu in agent.gpus:
            labels = [node, str(gpu.index), gpu.name]
            if gpu.memory_total_mb:
                used.add_metric(labels, gpu.memory_used_mb * MIB)
                total.add_metric(labels, gpu.memory_total_mb * MIB)
            if gpu.utilization_pct is not None:
                util.add_metric(labels, gpu.utilization_pct / 100.0)
        state = GaugeMetricFamily("tokenhive_node_worker_state",
                                  "1 on the supervised worker's current state",
                                  labels=["node", "worker", "state"])
        restarts = CounterMetricFamily("tokenhive_node_worker_restarts",
                                       "times the node started a worker again after it exited",
                                       labels=["node", "worker"])
        for plan, replica in agent.workers:
            for each in State:
                state.add_metric([node, plan.worker_id, each.value],
                                 1.0 if replica.state is each else 0.0)
            restarts.add_metric([node, plan.worker_id], max(0, replica.starts - 1))
        stopping = GaugeMetricFamily("tokenhive_node_stopping",
                                     "1 while the node drains its workers to stop",
                                     labels=["node"])
        stopping.add_metric([node], 1.0 if agent.stopping else 0.0)
        yield from (used, total, util, state, restarts, stopping)


def node_registry(agent: NodeAgent) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(agent))
    return registry
