"""Nodes in the broker core: health from reports and workers, drain, whole-node loss.

Driven in-process like tests/test_broker_core.py (same harness: real frames, a recording
sink, a clock the test advances), so liveness is exact instead of slept for.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_broker_core import C1, Harness
from tokenhive.clients.cli.status import render
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import VERSION_FRAME, encode
from tokenhive.schemas.messages import (
    Chunk,
    DrainNode,
    Error,
    Final,
    GpuInfo,
    Health,
    NodeHealth,
    NodeReport,
    NodeStatus,
    Ready,
    Rejected,
)


def report(h: Harness, node: str, workers: list[str], ident: bytes | None = None,
           **fields: Any) -> None:
    body = encode(NodeReport(node=node, host=f"{node}.lan", workers=workers, **fields))
    h.worker_frames(ident or f"agent-{node}".encode(), b"", body)


def node_of(h: Harness, node: str) -> NodeStatus:
    return next(n for n in h.status().nodes if n.id == node)


def two_nodes(h: Harness) -> None:
    """Node a runs wa1, wa2; node b runs wb1; each worker one slot of model m."""
    for node, names in (("a", ["wa1", "wa2"]), ("b", ["wb1"])):
        report(h, node, names, gpus=[GpuInfo(index=i, name="H200", memory_used_mb=1024.0,
                                             memory_total_mb=143771.0) for i in range(len(names))])
        for name in names:
            h.ready(name.encode(), node=node)


@pytest.mark.timeout(30)
def test_nodes_in_status_with_gpus_and_workers() -> None:
    h = Harness()
    two_nodes(h)
    a = node_of(h, "a")
    assert a.health is NodeHealth.OK and a.agent and a.host == "a.lan" and not a.draining
    assert a.workers == ["wa1", "wa2"] and len(a.gpus) == 2 and a.gpus[0].name == "H200"
    assert {w.id: w.node for w in h.status().workers} == {"wa1": "a", "wa2": "a", "wb1": "b"}
    assert h.status().counters["node_reports"] == 2


@pytest.mark.timeout(30)
def test_degraded_node_is_avoided_while_a_healthy_one_has_room() -> None:
    h = Harness()
    two_nodes(h)
    report(h, "a", ["wa1", "wa2"], restarting=["wa3"])
    assert node_of(h, "a").health is NodeHealth.DEGRADED
    assert "1 restarting" in node_of(h, "a").detail
    h.submit("r1")
    h.submit("r2")
    # r1 goes to b's worker (the healthy node), r2 to a: degraded nodes still serve
    assert len(h.dispatches(b"wb1")) == 1
    assert len(h.dispatches(b"wa1")) + len(h.dispatches(b"wa2")) == 1


@pytest.mark.timeout(30)
def test_worker_not_serving_degrades_its_node() -> None:
    h = Harness()
    two_nodes(h)
    h.heartbeat(b"wa1", Health.DEGRADED)
    a = node_of(h, "a")
    assert a.health is NodeHealth.DEGRADED and "1 of 2 workers not serving" in a.detail
    h.heartbeat(b"wa1", Health.OK)
    assert node_of(h, "a").health is NodeHealth.OK


@pytest.mark.timeout(30)
def test_drain_sends_nothing_new_and_undrain_resumes_queued_work() -> None:
    h = Harness()
    two_nodes(h)
    h.client(C1, DrainNode(node="b"))
    assert node_of(h, "b").draining
    for i in range(3):
        h.submit(f"r{i}")
    assert not h.dispatches(b"wb1")  # drained: r0, r1 went to a, r2 waits
    assert h.status().queues["m"] == 1
    h.client(C1, DrainNode(node="b", drain=False))
    assert not node_of(h, "b").draining
    assert [d.request.id for d in h.dispatches(b"wb1")] == ["r2"]


@pytest.mark.timeout(30)
def test_drain_of_unknown_node_changes_nothing() -> None:
    h = Harness()
    two_nodes(h)
    h.client(C1, DrainNode(node="nope"))
    assert sorted(n.id for n in h.status().nodes) == ["a", "b"]
    assert not any(n.draining for n in h.status().nodes)


@pytest.mark.timeout(30)
def test_whole_node_lost_requeues_unstarted_and_ends_streaming_with_worker_lost() -> None:
    h = Harness(max_attempts=3)
    two_nodes(h)
    h.submit("streaming")
    h.submit("unstarted")
    h.submit("on-b")
    by_worker = {w: [d for d in h.dispatches(w.encode())] for w in ("wa1", "wa2", "wb1")}
    on_a = [d for w in ("wa1", "wa2") for d in by_worker[w]]
    assert len(on_a) == 2 and len(by_worker["wb1"]) == 1
    streaming = next(d for d in on_a if d.request.id == "streaming")
    ident = b"wa1" if streaming in by_worker["wa1"] else b"wa2"
    h.chunk(ident, streaming.key, "streaming", 0)
    # node a goes silent (agent and workers); node b keeps reporting and beating
    for _ in range(5):
        report(h, "b", ["wb1"])
        h.heartbeat(b"wb1")
        h.advance(0.7)
    a = node_of(h, "a")
    assert a.health is NodeHealth.DOWN and "no report" in a.detail and a.workers == []
    assert h.status().counters["nodes_down"] == 1
    last = h.last("streaming")
    assert isinstance(last, Error) and last.code is ErrorCode.WORKER_LOST
    assert last.chunks_sent == 1 and not last.retryable
    # the unstarted one was requeued and waits for b's only slot (busy with on-b)
    on_b = next(d for d in by_worker["wb1"])
    h.final(b"wb1", on_b.key, on_b.request.id, chunks=0)
    again = [d for d in h.dispatches(b"wb1") if d.request.id == "unstarted"]
    assert len(again) == 1 and again[0].attempt == 2
    h.final(b"wb1", again[0].key, "unstarted")
    answers = h.answers()
    assert sum(isinstance(m, (Final, Error)) for ms in answers.values() for m in ms) == 3
    assert isinstance(answers["unstarted"][-1], Final)
    assert [type(m) for m in answers["streaming"]] == [Chunk, Error]


@pytest.mark.timeout(30)
def test_node_whose_workers_all_left_is_down_and_gets_nothing() -> None:
    h = Harness()
    two_nodes(h)
    for name in ("wb1",):
        h.core.flow.lose_worker(h.core.registry.by_name(name), "test")  # type: ignore[arg-type]
    h.core.settle()
    b = node_of(h, "b")
    assert b.health is NodeHealth.DOWN and b.detail == "no live worker"


@pytest.mark.timeout(30)
def test_stopping_node_takes_no_new_work() -> None:
    h = Harness()
    two_nodes(h)
    report(h, "a", ["wa1", "wa2"], stopping=True)
    assert node_of(h, "a").draining
    h.submit("r1")
    assert [d.request.id for d in h.dispatches(b"wb1")] == ["r1"]
    assert not h.dispatches(b"wa1") and not h.dispatches(b"wa2")


@pytest.mark.timeout(30)
def test_bad_node_reports_are_refused_and_change_nothing() -> None:
    h = Harness()
    two_nodes(h)
    report(h, "", ["x"], ident=b"bad1")
    report(h, "c" * 300, [], ident=b"bad2")
    report(h, "d", ["w"] * 5000, ident=b"bad3")
    rejected = [m for ident in (b"bad1", b"bad2", b"bad3")
                for m in h.sink.worker_msgs(ident, Rejected)]
    assert len(rejected) == 3 and all("bad NodeReport" in r.message for r in rejected)
    assert sorted(n.id for n in h.status().nodes) == ["a", "b"]
    assert h.status().counters["bad_frames"] == 3


@pytest.mark.timeout(30)
def test_workers_without_node_serve_as_before() -> None:
    h = Harness()
    h.ready(b"w1")
    h.submit("r1")
    assert len(h.dispatches(b"w1")) == 1 and h.status().nodes == []


@pytest.mark.timeout(30)
def test_with_keys_a_node_and_its_workers_belong_to_the_first_key() -> None:
    """Under CURVE the loop passes each control message's key: a node id (from a report or
    a worker's Ready) belongs to the first key that used it; another key is refused."""
    h = Harness()
    report_body = encode(NodeReport(node="a", workers=["wa1"]))
    h.core.on_worker_frames([b"agent-a", VERSION_FRAME, b"", report_body], "KEY-A")
    ready = Ready(worker="wa1", model="m", backend="test", slots=1, node="a")
    h.core.on_worker_frames([b"wa1", VERSION_FRAME, b"", encode(ready)], "KEY-A")
    rogue = Ready(worker="rogue", model="m", backend="test", slots=1, node="a")
    h.core.on_worker_frames([b"rogue", VERSION_FRAME, b"", encode(rogue)], "KEY-B")
    h.core.on_worker_frames([b"fake-agent", VERSION_FRAME, b"", encode(
        NodeReport(node="a", workers=[], stopping=True))], "KEY-B")
    refused = [m.message for ident in (b"rogue", b"fake-agent")
               for m in h.sink.worker_msgs(ident, Rejected)]
    assert len(refused) == 2 and all("registered to another key" in m for m in refused)
    a = node_of(h, "a")
    assert a.workers == ["wa1"] and not a.draining and a.health is NodeHealth.OK
    assert h.status().counters["worker_claims_refused"] == 2


@pytest.mark.timeout(30)
def test_status_table_groups_workers_under_their_node() -> None:
    """`tokenhive status` renders the core's own reply: each node's line (health, GPUs and
    their memory, draining or stopping), then its workers, indented under it."""
    h = Harness()
    two_nodes(h)
    h.ready(b"loose")  # a worker under no node
    h.client(C1, DrainNode(node="b"))
    report(h, "a", ["wa1", "wa2"], stopping=True, gpus=[
        GpuInfo(index=0, name="H200", memory_used_mb=2048.0, memory_total_mb=143771.0)])
    lines = render(h.status(), "tcp://head:5555").splitlines()
    a = lines.index("node a (a.lan): ok; stopping; 1 GPUs (H200), 2.0/140.4 GiB used")
    b = lines.index("node b (b.lan): ok; draining; 1 GPUs (H200), 1.0/140.4 GiB used")
    loose = lines.index("no node")
    assert [line.split()[0] for line in lines[a + 2:a + 4]] == ["wa1", "wa2"]
    assert lines[b + 2].split()[0] == "wb1" and lines[loose + 2].split()[0] == "loose"
    assert all(line.startswith("  ") for line in lines[a + 1:a + 4])
