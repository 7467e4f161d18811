"""``tokenhive node``: the node agent as a real process with real echo workers, against a real
broker (and, where the test reads the node's reports byte for byte, a FAKE broker: a raw
ROUTER from tests/support/worker_peers.py). This host has no GPU: the node finds "GPUs"
through the documented fallback, ``CUDA_VISIBLE_DEVICES`` (no NVML library, no nvidia-smi
here), and the echo workers do not care what they are pinned to. The discovery fallbacks are
unit-tested with a FAKE ``nvidia-smi`` script on PATH, and the plan as a pure function."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import types
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from tokenhive.clients import NO_RETRY, AsyncClient
from tokenhive.clients.cli.main import main as cli_main
from tokenhive.clients.node import gpus as gpus_module
from tokenhive.clients.node.command import worker_flags
from tokenhive.clients.node.gpus import Gpu, discover, restrict, visible_tokens
from tokenhive.clients.node.plan import plan_workers
from tokenhive.schemas.config import ConfigError, EchoSpec, GGUFSpec
from tokenhive.schemas.messages import Goodbye, NodeReport, Ready, StatusReply
from tokenhive.schemas.node_config import NodeConfig, load_node_config, node_config_problems

from .support.procs import Proc, ipc_address, start_broker, start_process
from .support.worker_peers import FakeBroker, Received, short_ipc_dir

T = TypeVar("T")
NODE = "n1"
SCRIPT = "one two three four five six seven eight nine ten "
ECHO_NODE_TOML = f"""
heartbeat_interval = 0.2
drain_timeout = 20
restart_backoff_max = 1

[[workers]]
backend = "echo"
model = "echo"
slots = 8
text = "{SCRIPT}"
tokens = 20
tokens_per_s = 20
"""


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


# -- the plan (pure) ------------------------------------------------------------------------


def gpus(n: int) -> list[Gpu]:
    return [Gpu(index=i, device=str(i)) for i in range(n)]


@pytest.mark.timeout(10)
def test_plan_two_gpus_per_worker_on_four_gpus() -> None:
    plan = plan_workers("box", [GGUFSpec(model="big", n_gpu_layers=-1)], gpus(4),
                        gpus_per_worker=2)
    assert [w.worker_id for w in plan.workers] == ["box-big-gpu0", "box-big-gpu2"]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in plan.workers] == ["0,1", "2,3"]
    assert [w.gpus for w in plan.workers] == [(0, 1), (2, 3)]
    assert all(w.env["TOKENHIVE_NODE"] == "box" for w in plan.workers)
    for w in plan.workers:  # the spec as configured, named and made one replica
        assert isinstance(w.spec, GGUFSpec)
        assert (w.spec.id, w.spec.count, w.spec.n_gpu_layers) == (w.worker_id, 1, -1)
    assert plan.pinned() == {0: ["box-big-gpu0"], 1: ["box-big-gpu0"],
                             2: ["box-big-gpu2"], 3: ["box-big-gpu2"]}
    assert plan.notes == []


@pytest.mark.timeout(10)
def test_plan_one_worker_per_gpu_per_spec_and_leftovers() -> None:
    specs = [EchoSpec(model="a"), EchoSpec(model="b", id="bee", gpus=[2, 0])]
    plan = plan_workers("box", specs, gpus(3))
    assert [(w.worker_id, w.env["CUDA_VISIBLE_DEVICES"]) for w in plan.workers] == [
        ("box-a-gpu0", "0"), ("box-a-gpu1", "1"), ("box-a-gpu2", "2"),
        ("box-bee-gpu2", "2"), ("box-bee-gpu0", "0")]
    odd = plan_workers("box", [EchoSpec(model="a")], gpus(3), gpus_per_worker=2)
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in odd.workers] == ["0,1"]
    assert odd.notes and "GPU 2 left without a worker" in odd.notes[0]
    counted = plan_workers("box", [EchoSpec(model="a", count=3)], gpus(2))
    assert len(counted.workers) == 2 and "count = 3 is for hosts without a GPU" in (
        counted.notes[0])


@pytest.mark.timeout(10)
def test_plan_pins_by_uuid_when_known() -> None:
    found = [Gpu(index=0, device="GPU-aaa", uuid="GPU-aaa"),
             Gpu(index=1, device="GPU-bbb", uuid="GPU-bbb")]
    plan = plan_workers("box", [EchoSpec(model="m")], found, gpus_per_worker=2)
    assert plan.workers[0].env["CUDA_VISIBLE_DEVICES"] == "GPU-aaa,GPU-bbb"


@pytest.mark.timeout(10)
def test_plan_cpu_host_runs_count_replicas() -> None:
    plan = plan_workers("box", [EchoSpec(model="m", count=3, env={"X": "1"})], [])
    assert [w.worker_id for w in plan.workers] == ["box-m-cpu0", "box-m-cpu1", "box-m-cpu2"]
    assert all(w.gpus == () and "CUDA_VISIBLE_DEVICES" not in w.env for w in plan.workers)
    assert all(w.env == {"X": "1", "TOKENHIVE_NODE": "box"} for w in plan.workers)
    assert all(w.spec.count == 1 for w in plan.workers)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("specs", "found", "per", "says"), [
    ([EchoSpec(model="m", gpus=[0])], [], 1, "this host has no GPU"),
    ([EchoSpec(model="m", gpus=[5])], gpus(2), 1, "no GPU 5"),
    ([EchoSpec(model="m")], gpus(1), 2, "only 1 GPU to use"),
    ([EchoSpec(model="m"), EchoSpec(model="m")], gpus(1), 1, "the id box-m-gpu0"),
    ([EchoSpec(model="m")], gpus(1), 0, "gpus_per_worker must be >= 1"),
])
def test_plan_refuses_what_cannot_be_placed(specs: list[EchoSpec], found: list[Gpu], per: int,
                                            says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        plan_workers("box", list(specs), found, gpus_per_worker=per)


# -- discovery (a FAKE nvidia-smi: there is no GPU here) ------------------------------------


FAKE_SMI_LIST = """\
GPU 0: NVIDIA H200 (UUID: GPU-aaaa1111-0000-0000-0000-000000000000)
GPU 1: NVIDIA H200 (UUID: GPU-bbbb2222-0000-0000-0000-000000000000)
  MIG 1g.18gb     Device  0: (UUID: MIG-cccc3333-0000-0000-0000-000000000000)
"""


def fake_nvidia_smi(directory: Path, body: str) -> dict[str, str]:
    """A FAKE ``nvidia-smi`` (a shell script) first on PATH; the env to discover with."""
    directory.mkdir(exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{directory}:{os.environ.get('PATH', '')}"}


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML is absent on this host anyway (its library is not found); forcing it keeps the
    fallback tests meaning the same on a host with a driver."""
    monkeypatch.setattr(gpus_module, "_from_nvml", lambda: None)


@pytest.mark.timeout(10)
def test_nvidia_smi_list_is_the_fallback(tmp_path: Path, no_nvml: None) -> None:
    env = fake_nvidia_smi(tmp_path / "bin", f"[ \"$1\" = -L ] || exit 9\ncat <<'EOF'\n"
                                            f"{FAKE_SMI_LIST}EOF")
    found = discover(env)
    assert found.source == "nvidia-smi"
    assert [(g.index, g.name, g.uuid[:13]) for g in found.gpus] == [
        (0, "NVIDIA H200", "GPU-aaaa1111-"), (1, "NVIDIA H200", "GPU-bbbb2222-")]
    assert [g.device for g in found.gpus] == [g.uuid for g in found.gpus]  # pinned by UUID
    infos = found.sample({1: ["w"]})  # no NVML: names only, no live figures
    assert [(i.index, i.workers, i.memory_total_mb) for i in infos] == [(0, [], 0.0),
                                                                         (1, ["w"], 0.0)]
    # CUDA_VISIBLE_DEVICES restricts what nvidia-smi found: by index, or by UUID prefix
    assert [g.index for g in discover({**env, "CUDA_VISIBLE_DEVICES": "1"}).gpus] == [1]
    assert [g.index for g in discover({**env, "CUDA_VISIBLE_DEVICES": "GPU-bbbb,0"}).gpus] == [
        1, 0]
    assert discover({**env, "CUDA_VISIBLE_DEVICES": ""}).gpus == []  # CUDA: none visible


@pytest.mark.timeout(10)
def test_failing_nvidia_smi_is_one_plain_line(tmp_path: Path, no_nvml: None,
                                              caplog: pytest.LogCaptureFixture) -> None:
    env = fake_nvidia_smi(tmp_path / "bin", "echo 'NVIDIA-SMI has failed: no driver' >&2\nexit 9")
    with caplog.at_level(logging.INFO, logger="tokenhive.node"):
        found = discover({**env, "CUDA_VISIBLE_DEVICES": "0,1"})
    assert found.source == "CUDA_VISIBLE_DEVICES"
    assert [(g.index, g.device) for g in found.gpus] == [(0, "0"), (1, "1")]
    failed = [r for r in caplog.records if "nvidia-smi -L failed" in r.getMessage()]
    assert len(failed) == 1 and "exit code 9: NVIDIA-SMI has failed" in failed[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)  # explained, never a traceback


@pytest.mark.timeout(10)
def test_cpu_host_has_no_gpus(tmp_path: Path, no_nvml: None,
                              caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.INFO, logger="tokenhive.node"):
        found = discover({"PATH": str(empty)})
    assert (found.source, found.gpus) == ("none", [])
    messages = [r.getMessage() for r in caplog.records]
    assert "nvidia-smi is not on PATH" in messages
    assert "no GPU found: workers run on the CPU" in messages


@pytest.mark.timeout(10)
def test_real_nvml_failure_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """Without the mock: on this host NVML's library really is missing."""
    with caplog.at_level(logging.INFO, logger="tokenhive.node"):
        found = discover({"PATH": "/nonexistent"})
    if found.source == "nvml":
        pytest.skip("this host has a working NVML")
    nvml = [r.getMessage() for r in caplog.records if "NVML" in r.getMessage()]
    assert len(nvml) == 1 and nvml[0].startswith("NVML unavailable (")


class FakeNvml(types.ModuleType):
    """A FAKE ``pynvml`` (no GPU and no NVML library here): two GPUs with 80 GiB each, the
    second without utilisation support, as some GPUs are."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.shut = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return int(uuid[-1])

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-fake-{handle}".encode()

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "Fake H200"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(used=(handle + 1) * 1024 * 1024 * 1024,
                                     total=80 * 1024 * 1024 * 1024)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> types.SimpleNamespace:
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=37)


@pytest.mark.timeout(10)
def test_nvml_gives_names_memory_and_utilisation(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    found = discover({"PATH": "/nonexistent"})
    assert found.source == "nvml"
    assert [(g.index, g.device, g.name) for g in found.gpus] == [
        (0, "GPU-fake-0", "Fake H200"), (1, "GPU-fake-1", "Fake H200")]
    infos = found.sample({0: ["a"], 1: ["b"]})
    assert [(i.memory_used_mb, i.memory_total_mb, i.utilization_pct, i.workers)
            for i in infos] == [(1024.0, 81920.0, 37.0, ["a"]), (2048.0, 81920.0, None, ["b"])]
    found.close()
    assert fake.shut
    only = discover({"PATH": "/nonexistent", "CUDA_VISIBLE_DEVICES": "GPU-fake-1"})
    assert [g.index for g in only.gpus] == [1]


@pytest.mark.timeout(10)
def test_visible_devices_read_as_cuda_does() -> None:
    assert visible_tokens("0, 1,-1,2") == ["0", "1"]  # an invalid token ends the list
    assert visible_tokens("1,1,0") == ["1", "0"]
    assert visible_tokens("") == []
    two = [Gpu(index=0, device="GPU-a", uuid="GPU-a"), Gpu(index=1, device="GPU-b", uuid="GPU-b")]
    assert restrict(two, "1,7,0") == [two[1]]  # 7 is not here: it and what follows are ignored


# -- config and flags -----------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_node_config_names_unknown_keys_and_bad_values() -> None:
    with pytest.raises(msgspec.ValidationError, match="gpus_per_workr"):
        load_node_config('gpus_per_workr = 2\n')
    config = load_node_config(ECHO_NODE_TOML)
    assert isinstance(config.workers[0], EchoSpec) and config.heartbeat_interval == 0.2
    bad = NodeConfig(node="bad id", heartbeat_interval=0, gpus_per_worker=0,
                     curve_secret_key="x.key_secret")
    problems = "; ".join(node_config_problems(bad))
    for part in ("heartbeat_interval", "gpus_per_worker", "node 'bad id'",
                 "curve_secret_key and curve_server_key go together"):
        assert part in problems


@pytest.mark.timeout(10)
def test_example_node_file_is_valid() -> None:
    path = Path(__file__).resolve().parent.parent / "examples" / "node.toml"
    config = load_node_config(path.read_bytes())
    assert node_config_problems(config) == []
    spec = config.workers[0]
    assert isinstance(spec, GGUFSpec) and spec.n_gpu_layers == -1
    plan = plan_workers("gpu1", config.workers, gpus(2), config.gpus_per_worker)
    assert [w.worker_id for w in plan.workers] == ["gpu1-gemma3-270m-gpu0",
                                                   "gpu1-gemma3-270m-gpu1"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("argv", "says"), [
    ([], "--join tcp://HEAD:PORT is required"),
    (["--join", "tcp://10.1.2.3:5556"], "refusing to join tcp://10.1.2.3:5556 without CURVE"),
    (["--join", "http://x"], "expected tcp://HOST:PORT"),
    (["--join", "tcp://127.0.0.1:1", "--curve-secret-key", "/nonexistent.key_secret",
      "--curve-server-key", "/nonexistent.key"], "cannot read CURVE key file"),
    (["--join", "tcp://127.0.0.1:1", "--node-id", "a b"], "node 'a b'"),
])
def test_usage_errors_exit_2_with_one_line(argv: list[str], says: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["node", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tokenhive node: ") and says in err


@pytest.mark.timeout(30)
def test_config_file_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_text(ECHO_NODE_TOML + "colour = 'blue'\n")
    assert cli_main(["node", "--join", "tcp://127.0.0.1:1", "--config", str(path)]) == 2
    assert "colour" in capsys.readouterr().err
    path.write_text("heartbeat_interval = 1\n")
    assert cli_main(["node", "--join", "tcp://127.0.0.1:1", "--config", str(path)]) == 2
    assert "no [[workers]]" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_worker_flags_pass_timing_keys_and_packing(tmp_path: Path) -> None:
    config = NodeConfig(heartbeat_interval=0.5, drain_timeout=7.0)
    assert worker_flags(config) == ["--heartbeat-interval", "0.5", "--drain-timeout", "7.0"]
    keyed = NodeConfig(curve_secret_key="keys/n1.key_secret", curve_server_key="keys/broker.key")
    assert worker_flags(keyed)[4:] == [  # the FILES, absolute: workers read the keys themselves
        "--curve-secret-key", str(Path("keys/n1.key_secret").resolve()),
        "--curve-server-key", str(Path("keys/broker.key").resolve())]
    assert worker_flags(NodeConfig(pack_chunks=True))[-1] == "--pack-chunks"


# -- the node as a process ------------------------------------------------------------------


def start_node(tmp_path: Path, join: str, *extra: str, toml: str = ECHO_NODE_TOML,
               visible: str | None = "0,1") -> Proc:
    config = tmp_path / "node.toml"
    config.write_text(toml)
    env = {"TOKENHIVE_LOG_FORMAT": "json"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible  # the documented fallback: 2 "GPUs", no NVML
    return start_process(
        [sys.executable, "-m", "tokenhive.clients.cli.main", "node", "--join", join,
         "--config", str(config), "--node-id", NODE, *extra],
        name="node", workdir=tmp_path, env=env)


def started_pids(node: Proc) -> dict[str, list[int]]:
    """worker id -> pids in start order, from the node's supervisor log lines."""
    out: dict[str, list[int]] = {}
    for record in node.log_records():
        if record.get("msg") == "child started":
            out.setdefault(record["child"], []).append(int(record["pid"]))
    return out


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def parent_of(pid: int) -> int:
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return int(stat_line.rsplit(")", 1)[1].split()[1])


def wait_for(what: str, cond: Callable[[], T | None], within: float = 30.0) -> T:
    deadline = time.monotonic() + within
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not within {within}s"
        time.sleep(0.05)  # polling interval, not synchronisation


async def wait_status(client: AsyncClient, ok: Callable[[StatusReply], bool],
                      within: float = 30.0) -> StatusReply:
    deadline = time.monotonic() + within
    status = None
    while time.monotonic() < deadline:
        status = await client.status(timeout=2.0)
        if ok(status):
            return status
        await asyncio.sleep(0.05)  # polling interval, not synchronisation
    raise AssertionError(f"status condition not met within {within}s; last: {status}")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Proc]:
    with start_broker(tmp_path, heartbeat_interval=0.2, heartbeat_liveness=5) as proc:
        yield proc


@pytest.mark.timeout(120)
def test_node_pins_restarts_and_drains_against_a_real_broker(tmp_path: Path,
                                                             broker: Proc) -> None:
    node = start_node(tmp_path, broker.workers, "--metrics", "127.0.0.1:0")
    ids = {f"{NODE}-echo-gpu0": "0", f"{NODE}-echo-gpu1": "1"}
    try:
        async def registered() -> None:
            async with AsyncClient(broker.clients, model="echo", retry=NO_RETRY) as client:
                status = await wait_status(client, lambda s: sorted(
                    w.id for w in s.workers if w.health == "ok") == sorted(ids))
                assert all(w.node == NODE for w in status.workers)
                await wait_status(client, lambda s: any(
                    n.id == NODE and n.agent and len(n.gpus) == 2 for n in s.nodes))

        run(registered())
        pids = started_pids(node)
        for worker_id, gpu in ids.items():  # each worker process sees its own GPU only
            (pid,) = pids[worker_id]
            env = environ(pid)
            assert env["CUDA_VISIBLE_DEVICES"] == gpu and env["TOKENHIVE_NODE"] == NODE
            assert parent_of(pid) == node.pid

        # kill -9 one worker: the node starts it again and it registers again
        victim = f"{NODE}-echo-gpu1"
        async def registrations() -> int:
            async with AsyncClient(broker.clients) as client:
                return (await client.status()).counters["workers_registered"]

        before = run(registrations())
        os.kill(pids[victim][0], signal.SIGKILL)
        new_pid = wait_for("a restarted worker", lambda: (
            started_pids(node)[victim][1:2] or [None])[0])
        assert new_pid != pids[victim][0] and environ(new_pid)["CUDA_VISIBLE_DEVICES"] == "1"
        # the node's own /metrics: both workers running again, the victim restarted once
        url = next(r["url"] for r in node.log_records() if r.get("msg") == "node metrics")

        def node_metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            with urllib.request.urlopen(url, timeout=5) as answer:
                text = answer.read().decode()
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(text)
                       for s in family.samples}
            running = [k for k, v in samples.items() if k[0] == "tokenhive_node_worker_state"
                       and ("state", "running") in k[1] and v == 1.0]
            return samples if len(running) == 2 else None

        samples = wait_for("both workers running in /metrics", node_metrics)
        restarts = {dict(labels)["worker"]: value for (name, labels), value in samples.items()
                    if name == "tokenhive_node_worker_restarts_total"}
        assert restarts == {f"{NODE}-echo-gpu0": 0.0, victim: 1.0}
        assert samples[("tokenhive_node_stopping", (("node", NODE),))] == 0.0

        async def streams_survive_sigterm() -> None:
            async with AsyncClient(broker.clients, model="echo", retry=NO_RETRY) as client:
                await wait_status(client, lambda s: s.counters["workers_registered"] > before
                                  and sorted(w.id for w in s.workers if w.health == "ok")
                                  == sorted(ids))
                started = [asyncio.Event() for _ in range(8)]

                async def one(i: int) -> tuple[str, int]:
                    stream = client.stream(prompt=f"p{i}", request_id=f"r{i}", timeout=60)
                    text = []
                    async for chunk in stream:
                        started[i].set()
                        text.append(chunk.text)
                    return "".join(text), stream.result.chunks

                tasks = [asyncio.create_task(one(i)) for i in range(8)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
                node.popen.send_signal(signal.SIGTERM)  # every stream is under way
                results = await asyncio.gather(*tasks)  # any error (worker_lost...) raises
                # each ended in its one Final, whole: 20 tokens (the script's 10 words and
                # its trailing space, then 9 words again), the same text for all
                assert [chunks for _, chunks in results] == [20] * 8
                assert {text for text, _ in results} == {SCRIPT + SCRIPT.rsplit(" ", 2)[0]}
                status = await wait_status(client, lambda s: not s.workers)
                assert status.counters.get("completed", 8) >= 8

        run(streams_survive_sigterm())
        assert node.wait(30) == 0
        records = node.log_records()
        assert any(r.get("msg") == "node stopped" for r in records)
        assert "Traceback" not in node.stderr_text()  # JSON records or not
    finally:
        node.terminate()


def node_reports(fake: FakeBroker, ok: Callable[[NodeReport], bool],
                 timeout: float = 20.0, what: str = "") -> NodeReport:
    def match(r: Received) -> bool:
        return isinstance(r.msg, NodeReport) and ok(r.msg)

    got = fake.expect(match, timeout=timeout, what=what or "node report")
    assert isinstance(got.msg, NodeReport)
    return got.msg


@pytest.mark.timeout(60)
def test_node_reports_what_it_runs_to_a_fake_broker(tmp_path: Path) -> None:
    """A FAKE broker (a raw ROUTER) keeps every message, so the reports can be read whole."""
    with FakeBroker(ipc_address(short_ipc_dir(), "w")) as fake:
        node = start_node(tmp_path, fake.address)
        ids = [f"{NODE}-echo-gpu0", f"{NODE}-echo-gpu1"]
        try:
            report = node_reports(fake, lambda r: sorted(r.workers) == ids, what="2 workers")
            assert report.node == NODE and report.host == socket.gethostname()
            assert [(g.index, g.workers) for g in report.gpus] == [(0, [ids[0]]), (1, [ids[1]])]
            assert not report.stopping and report.failed == [] and report.restarting == []
            readies: dict[str, str] = {}  # worker -> its node (a worker sends Ready twice:
            while len(readies) < len(ids):  # registering while loading, then loaded)
                ready = fake.expect(Ready, what="Ready").msg
                assert isinstance(ready, Ready)
                readies[ready.worker] = ready.node
            assert readies == {i: NODE for i in ids}
            # a killed worker is reported as restarting at once, then as running again
            fake.drop_pending()  # from here on only what follows the kill counts
            os.kill(started_pids(node)[ids[1]][0], signal.SIGKILL)
            back = node_reports(fake, lambda r: r.restarting == [ids[1]], what="restarting")
            assert back.workers == [ids[0]] and [g.workers for g in back.gpus] == [[ids[0]],
                                                                                   [ids[1]]]
            node_reports(fake, lambda r: sorted(r.workers) == ids and not r.restarting,
                         what="the worker back")
            new_pid = wait_for("the restart", lambda: (started_pids(node)[ids[1]][1:] or [0])[0])
            fake.expect(lambda r: isinstance(r.msg, Ready) and r.msg.pid == new_pid,
                        what="the restarted worker's Ready")  # (not the killed one's, late)
            node.popen.send_signal(signal.SIGTERM)
            node_reports(fake, lambda r: r.stopping, what="a stopping report")
            for _ in ids:
                fake.expect(Goodbye, what="a worker's Goodbye")
            last = node_reports(fake, lambda r: r.stopping and not r.workers,
                                what="the last report")
            assert last.failed == [] and [g.workers for g in last.gpus] == [[], []]
            assert node.wait(30) == 0
            assert "Traceback" not in node.stderr_text()
        finally:
            node.terminate()


@pytest.mark.timeout(60)
def test_node_whose_workers_all_fail_reports_them_and_exits_1(tmp_path: Path) -> None:
    toml = ("heartbeat_interval = 0.2\n[[workers]]\nbackend = \"gguf\"\nmodel = \"gone\"\n"
            f"path = \"{tmp_path / 'missing.gguf'}\"\n")
    with FakeBroker(ipc_address(short_ipc_dir(), "w")) as fake:
        node = start_node(tmp_path, fake.address, toml=toml, visible="0")
        try:
            report = node_reports(fake, lambda r: bool(r.failed), what="a failed worker")
            assert report.failed == [f"{NODE}-gone-gpu0"] and report.workers == []
            assert node.wait(30) == 1
        finally:
            node.terminate()


@pytest.mark.timeout(90)
def test_second_signal_hurries_the_drain(tmp_path: Path, broker: Proc) -> None:
    """Streams that would take 20 s: SIGTERM starts the drain, a second SIGTERM makes the
    workers give their work up (each stream still gets exactly one terminal: an error), and
    the node exits 0 long before drain_timeout."""
    slow = ECHO_NODE_TOML.replace("tokens = 20", "tokens = 100").replace(
        "tokens_per_s = 20", "tokens_per_s = 5")
    node = start_node(tmp_path, broker.workers, toml=slow)
    try:
        async def main() -> None:
            async with AsyncClient(broker.clients, model="echo", retry=NO_RETRY) as client:
                await wait_status(client, lambda s: sum(w.health == "ok"
                                                        for w in s.workers) == 2)
                started = [asyncio.Event() for _ in range(4)]

                async def one(i: int) -> str:
                    try:
                        async for _ in client.stream(prompt="p", request_id=f"s{i}", timeout=60):
                            started[i].set()
                    except Exception as exc:  # the typed error that ended it
                        return type(exc).__name__
                    return "final"

                tasks = [asyncio.create_task(one(i)) for i in range(4)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
                node.popen.send_signal(signal.SIGTERM)
                await wait_status(client, lambda s: all(w.health != "ok" for w in s.workers))
                t0 = time.monotonic()
                node.popen.send_signal(signal.SIGTERM)  # the second: hurry
                ends = await asyncio.gather(*tasks)
                assert ends == ["WorkerLost"] * 4, ends
                assert time.monotonic() - t0 < 10  # not the 20 s drain, nor the 20 s streams

        run(main())
        assert node.wait(15) == 0
    finally:
        node.terminate()


# -- bench/gpu.sh: its paths that need no GPU ------------------------------------------------

GPU_SH = Path(__file__).resolve().parent.parent / "bench" / "gpu.sh"
# A FAKE nvidia-smi for a dry run on this CPU host: two GPUs, and as their compute apps the
# processes pinned to them (what the real one shows when every worker sits on its own GPU).
# SAME_GPU=1 makes it put every process on GPU 0: the pinning check must then fail.
FAKE_SMI_DRY_RUN = """\
case "$1" in
-L) echo "GPU 0: Fake GPU (UUID: GPU-aaaa1111-0000)"
    echo "GPU 1: Fake GPU (UUID: GPU-bbbb2222-0000)";;
--query-compute-apps=pid,gpu_uuid)
  for e in /proc/[0-9]*/environ; do
    pid=${e#/proc/}; pid=${pid%/environ}
    tr '\\0' '\\n' < "$e" 2>/dev/null | grep -q '^TOKENHIVE_NODE=gpubench$' || continue
    v=$(tr '\\0' '\\n' < "$e" | sed -n 's/^CUDA_VISIBLE_DEVICES=//p')
    if [ "${SAME_GPU:-0}" = 1 ]; then v=GPU-aaaa1111-0000; fi
    echo "$pid, $v"
  done;;
*) exit 9;;
esac"""


def run_gpu_sh(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(GPU_SH)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env}, cwd="/")


@pytest.mark.timeout(30)
def test_gpu_sh_parses() -> None:
    assert subprocess.run(["bash", "-n", str(GPU_SH)], timeout=20).returncode == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("smi", "says"), [
    (None, "no NVIDIA GPU: nvidia-smi is not installed"),
    ("echo 'NVIDIA-SMI has failed because it could not communicate' >&2; exit 9",
     "no NVIDIA GPU: nvidia-smi -L failed: NVIDIA-SMI has failed because it could not "
     "communicate"),
    ("exit 0", "no NVIDIA GPU: nvidia-smi -L lists none"),
])
def test_gpu_sh_without_a_gpu_says_so_and_exits_3(tmp_path: Path, smi: str | None,
                                                 says: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "awk", "dirname", "cat", "mktemp"):  # all but nvidia-smi
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    env = {"PATH": str(bin_dir)}
    if smi is not None:
        env = fake_nvidia_smi(bin_dir, smi) | {"PATH": str(bin_dir)}
    done = run_gpu_sh(env)
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip() == f"bench/gpu.sh: {says}"


@pytest.mark.timeout(60)
def test_gpu_sh_refuses_a_llama_cpp_without_gpu_offload(tmp_path: Path) -> None:
    env = fake_nvidia_smi(tmp_path / "bin", FAKE_SMI_DRY_RUN)
    done = run_gpu_sh({**env, "PYTHON": sys.executable})
    if done.returncode == 0 or "cannot offload" not in done.stderr:
        pytest.skip("this llama-cpp-python offloads to GPUs")
    assert done.returncode == 4 and "rebuild it with CUDA" in done.stderr


@pytest.mark.timeout(240)
@pytest.mark.parametrize("same_gpu", [False, True])
def test_gpu_sh_dry_run_on_the_cpu(tmp_path: Path, tiny_gguf: Path, same_gpu: bool) -> None:
    """The whole script (keys, keyed broker, node on 1 then 2 "GPUs", pinning check, batch,
    ratio) with the FAKE nvidia-smi and the tiny model on the CPU: the plumbing, not the
    figures. With every process reported on GPU 0 the pinning check fails (exit 5)."""
    env = fake_nvidia_smi(tmp_path / "bin", FAKE_SMI_DRY_RUN)
    env |= {"PYTHON": sys.executable, "SKIP_OFFLOAD_CHECK": "1", "MODEL": str(tiny_gguf),
            "REQUESTS": "4", "MAX_TOKENS": "4", "SLOTS": "2", "SCALE_MIN": "0.01",
            "SAME_GPU": "1" if same_gpu else "0", "TMPDIR": str(tmp_path)}
    done = run_gpu_sh(env, timeout=200)
    if same_gpu:
        assert done.returncode == 5, done.stderr
        assert "PINNING: workers share GPUs" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert "gpu bench: 1 GPU: " in done.stdout and "ratio" in done.stdout
        assert "pinning ok" in done.stdout
        pins = [line for line in done.stderr.splitlines() if line.startswith("worker pid")]
        assert len(pins) == 3  # 1 on the one-GPU run, 2 on the two-GPU run
    assert not list(tmp_path.glob("tokenhive-gpu-bench.*"))  # its work dir is removed


@pytest.mark.timeout(90)
def test_node_joins_a_keyed_broker(tmp_path: Path) -> None:
    """CURVE on tcp: the node's own reports and its workers connect with the node's key pair;
    the broker lists the node (from its reports) with both workers."""
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    allow.mkdir()
    for name in ("broker", "node"):
        assert cli_main(["keys", "generate", str(keys), "--name", name]) == 0
    (allow / "node.key").write_bytes((keys / "node.key").read_bytes())
    with start_broker(tmp_path, clients="tcp://127.0.0.1:0", workers="tcp://127.0.0.1:0",
                      heartbeat_interval=0.2, curve_secret_key=str(keys / "broker.key_secret"),
                      curve_allow_workers=str(allow)) as keyed:
        node = start_node(tmp_path, keyed.workers, "--curve-secret-key",
                          str(keys / "node.key_secret"), "--curve-server-key",
                          str(keys / "broker.key"))
        try:
            async def main() -> None:
                async with AsyncClient(keyed.clients) as client:
                    status = await wait_status(client, lambda s: any(
                        n.id == NODE and n.agent and len(n.workers) == 2 for n in s.nodes))
                    assert sorted(w.id for w in status.workers) == [f"{NODE}-echo-gpu0",
                                                                    f"{NODE}-echo-gpu1"]
                    assert status.counters.get("auth_failures", 0) == 0

            run(main())
            node.popen.send_signal(signal.SIGTERM)
            assert node.wait(30) == 0
        finally:
            node.terminate()


@pytest.mark.timeout(90)
def test_pack_chunks_reaches_the_workers(tmp_path: Path, broker: Proc) -> None:
    node = start_node(tmp_path, broker.workers, toml="pack_chunks = true\n" + ECHO_NODE_TOML)
    try:
        async def main() -> list[str]:
            async with AsyncClient(broker.clients, model="echo", retry=NO_RETRY) as client:
                await wait_status(client, lambda s: sum(w.health == "ok"
                                                        for w in s.workers) == 2)
                return [r.text for r in await asyncio.gather(*(
                    client.complete(f"p{i}", timeout=60) for i in range(6)))]

        texts = run(main())
        assert texts == [SCRIPT + SCRIPT.rsplit(" ", 2)[0]] * 6
        for pids in started_pids(node).values():
            argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")
            assert b"--pack-chunks" in argv
        node.popen.send_signal(signal.SIGTERM)
        assert node.wait(30) == 0
    finally:
        node.terminate()


@pytest.mark.timeout(60)
def test_node_says_once_when_reports_find_no_broker_and_when_they_do_again(
        tmp_path: Path) -> None:
    address = ipc_address(short_ipc_dir(), "w")  # nothing listens there yet
    node = start_node(tmp_path, address)
    try:
        def lines(text: str) -> list[dict[str, Any]]:
            return [r for r in node.log_records() if r.get("msg", "").startswith(text)]

        wait_for("the no-connection warning", lambda: lines("no connection to the broker"))
        with FakeBroker(address) as fake:  # the broker turns up
            report = node_reports(fake, lambda r: len(r.workers) == 2, what="a report")
            assert report.node == NODE
            wait_for("the recovery line", lambda: lines("node reports reach the broker again"))
            assert len(lines("no connection to the broker")) == 1  # said once, not per report
            node.popen.send_signal(signal.SIGTERM)
            assert node.wait(30) == 0
            assert "Traceback" not in node.stderr_text()  # dropped reports are no errors
    finally:
        node.terminate()


@pytest.mark.gemma
@pytest.mark.timeout(120)
def test_without_a_config_the_node_serves_the_default_model_on_every_gpu() -> None:
    from tokenhive.clients.node.command import node_plan
    from tokenhive.clients.node.gpus import Discovery

    on_gpus = node_plan(NodeConfig(node="box"), Discovery(gpus(2), "nvidia-smi"))
    assert [w.worker_id for w in on_gpus.workers] == ["box-gemma3-270m-gpu0",
                                                      "box-gemma3-270m-gpu1"]
    assert all(isinstance(w.spec, GGUFSpec) and w.spec.n_gpu_layers == -1
               for w in on_gpus.workers)
    on_cpu = node_plan(NodeConfig(node="box"), Discovery([], "none"))
    assert [w.worker_id for w in on_cpu.workers] == ["box-gemma3-270m-cpu0"]
    assert isinstance(on_cpu.workers[0].spec, GGUFSpec) and on_cpu.workers[0].spec.n_gpu_layers == 0
