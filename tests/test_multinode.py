"""Several hosts for real on one machine: a head and two GPU-less nodes, CURVE on every link.

Where root can make network namespaces, each host is its own namespace with its own address
on a bridge (tests/support/netns.py): the broker binds a non-loopback address with keys,
two ``tokenhive node`` agents join it over real TCP between network stacks, and the test
talks to the broker from the root namespace. Elsewhere the same scenario runs over loopback
with distinct node ids (the namespace form is then skipped with the reason).

The scenario: a batch runs across both nodes; one node's processes are all SIGKILLed at
once (the host is gone). Every request still gets exactly one final answer: those that
had not streamed are re-run on the surviving node and complete; those streaming on the
lost node end with ``worker_lost``. The broker marks the node down, and it stays out of
dispatch.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from tokenhive.clients import NO_RETRY, AsyncClient
from tokenhive.schemas.errors import TokenHiveError, WorkerLost
from tokenhive.schemas.messages import NodeHealth, StatusReply
from tokenhive.transport import load_curve_keys

from .support.netns import Hosts, kill_all
from .support.procs import Proc, start_process
from .test_sidecar_lifecycle import descendants

CLI = [sys.executable, "-m", "tokenhive.clients.cli.main"]
NODES = ("n1", "n2")
# Liveness is heartbeat_interval x 3 on both sides: 1.5 s, so a loaded 2-core machine does not
# make a live worker and the broker give each other up (0.6 s did, under the whole suite).
NODE_TOML = """
heartbeat_interval = 0.5
drain_timeout = 5.0
[[workers]]
backend = "echo"
model = "echo"
slots = 2
count = 2
tokens = 30
tokens_per_s = 15.0
"""


@dataclass
class Cluster:
    mode: str  # "netns" or "loopback"
    broker: Proc
    clients: str  # the address the test (root namespace) connects to
    keys: Path
    nodes: dict[str, Proc] = field(default_factory=dict)
    kill_node: Callable[[str], list[int]] = lambda name: []


def make_keys(root: Path) -> Path:
    keys, allow = root / "keys", root / "allow"
    allow.mkdir()
    for name in ("broker", "client", *NODES):
        done = subprocess.run([*CLI, "keys", "generate", str(keys), "--name", name],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        if name != "broker":
            (allow / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    return keys


@pytest.fixture(params=["netns", "loopback"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """Namespaces where they can be made (skipped with the reason elsewhere), and always
    the loopback form, so a host without root still runs the scenario."""
    if request.param == "netns" and (why_not := Hosts.unavailable()) is not None:
        pytest.skip(f"hosts as network namespaces: {why_not}; the loopback form runs")
    keys = make_keys(tmp_path)
    config = tmp_path / "node.toml"
    config.write_text(NODE_TOML)
    hosts = Hosts.make(["head", *NODES]) if request.param == "netns" else None
    procs: list[Proc] = []
    try:
        head = hosts.address("head") if hosts else "127.0.0.1"
        prefix = hosts.run_in("head") if hosts else []
        ready = tmp_path / "broker.ready"
        # a fixed port inside the head namespace; an ephemeral one on shared loopback
        port_c, port_w = (5555, 5556) if hosts else (0, 0)
        broker = start_process(
            [*prefix, sys.executable, "-m", "tokenhive.broker",
             "--clients", f"tcp://{'0.0.0.0' if hosts else head}:{port_c}",
             "--workers", f"tcp://{head}:{port_w}", "--heartbeat-interval", "0.5",
             "--curve-secret-key", str(keys / "broker.key_secret"),
             "--curve-allow", str(tmp_path / "allow"), "--ready-file", str(ready)],
            name="broker", workdir=tmp_path, ready_file=ready)
        procs.append(broker)
        workers_ep = broker.ready["workers"]
        clients_port = broker.ready["clients"].rpartition(":")[2]
        cluster = Cluster("netns" if hosts else "loopback", broker,
                          f"tcp://{head}:{clients_port}", keys)
        for name in NODES:
            node_prefix = hosts.run_in(name) if hosts else []
            proc = start_process(
                [*node_prefix, *CLI, "node", "--join", workers_ep, "--config", str(config),
                 "--node-id", name, "--curve-secret-key", str(keys / f"{name}.key_secret"),
                 "--curve-server-key", str(keys / "broker.key"), "--log-level", "warning"],
                name=f"node-{name}", workdir=tmp_path)
            procs.append(proc)
            cluster.nodes[name] = proc
        if hosts is not None:
            cluster.kill_node = hosts.kill_all
        else:
            cluster.kill_node = lambda name: kill_all(
                [cluster.nodes[name].popen.pid, *descendants(cluster.nodes[name].popen.pid)])
        yield cluster
    finally:
        for proc in reversed(procs):
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if hosts is not None:
            hosts.close()


async def wait_for(client: AsyncClient, ok: Callable[[StatusReply], bool],
                   within: float = 30.0) -> StatusReply:
    deadline = time.monotonic() + within
    status = None
    while time.monotonic() < deadline:
        try:
            status = await client.status(timeout=2.0)
        except TokenHiveError:
            status = None
        if status is not None and ok(status):
            return status
        await asyncio.sleep(0.05)  # polling a remote state; the deadline bounds it
    raise AssertionError(f"status never satisfied the condition; last: {status}")


@pytest.mark.timeout(120)
def test_a_whole_node_lost_every_request_gets_exactly_one_answer(cluster: Cluster) -> None:
    curve = load_curve_keys(cluster.keys / "client.key_secret", cluster.keys / "broker.key")

    async def scenario() -> None:
        async with AsyncClient(cluster.clients, model="echo", curve=curve,
                               retry=NO_RETRY) as client:
            status = await wait_for(client, lambda s: sum(w.health == "ok"
                                                          for w in s.workers) == 4
                                    and all(n.health is NodeHealth.OK for n in s.nodes)
                                    and len(s.nodes) == 2)
            assert {w.node for w in status.workers} == set(NODES), cluster.mode
            outcomes: dict[str, tuple[str, int, str]] = {}  # id -> (outcome, chunks, worker)

            async def one(i: int) -> None:
                rid = f"r{i}"
                chunks = 0
                stream = client.stream(prompt=f"request {i} " * 4, request_id=rid, timeout=90)
                try:
                    async for _ in stream:
                        chunks += 1
                except WorkerLost as exc:
                    assert rid not in outcomes
                    outcomes[rid] = ("worker_lost", exc.chunks_sent, "")
                    return
                assert rid not in outcomes
                outcomes[rid] = ("completed", chunks, stream.result.worker)

            total = 16  # 8 slots over two nodes: half run at once, half wait in the queue
            tasks = [asyncio.create_task(one(i)) for i in range(total)]
            busy = await wait_for(client, lambda s: sum(w.in_flight for w in s.workers
                                                        if w.node == "n2") >= 2
                                  and s.counters["chunks"] > 8)
            lost_workers = {w.id for w in busy.workers if w.node == "n2"}
            killed = cluster.kill_node("n2")
            assert len(killed) >= 3  # the agent and its two workers, all at once
            await asyncio.wait_for(asyncio.gather(*tasks), 90)
            assert sorted(outcomes) == sorted(f"r{i}" for i in range(total))
            lost = {rid: o for rid, o in outcomes.items() if o[0] == "worker_lost"}
            done = {rid: o for rid, o in outcomes.items() if o[0] == "completed"}
            # what streamed on n2 when it died ended with worker_lost, after its chunks;
            # everything else completed in full, on n1 (or on n2 before it went)
            assert lost and all(chunks > 0 for _, chunks, _ in lost.values())
            assert all(chunks == 30 for _, chunks, _ in done.values())
            assert len(lost) + len(done) == total
            after = await client.status(timeout=5)
            n2 = next(n for n in after.nodes if n.id == "n2")
            assert n2.health is NodeHealth.DOWN and n2.workers == []
            assert after.counters["nodes_down"] == 1
            assert after.counters["worker_lost"] == len(lost), (after.counters, outcomes)
            assert after.counters["completed"] == len(done)
            assert after.counters["accepted"] == total
            assert after.in_flight == 0 and sum(after.queues.values()) == 0
            assert not any(w.id in lost_workers for w in after.workers)
            # the work the lost node had not started moved to n1 and finished there
            moved = [rid for rid, (_, _, w) in done.items() if w.startswith("n1")]
            assert len(moved) >= total // 2
            answer = await client.chat("still serving", max_tokens=4, timeout=30)
            assert answer.worker.startswith("n1")

    uvloop.run(scenario())
