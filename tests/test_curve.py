"""CurveZMQ on tcp links: real broker, worker and client processes on tcp://127.0.0.1 with
keys from ``tokenhive keys generate``. Keyed peers work end to end; a peer without keys, with
an unknown key or with the wrong server key is refused at the handshake and counted
(``auth_failures``); a second worker claiming a registered id with another allowed key is
Rejected and cannot evict it; a non-loopback bind without keys needs ``--insecure``."""

from __future__ import annotations

import asyncio
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from tokenhive.clients import AsyncClient, Client
from tokenhive.schemas.errors import BrokerUnavailable, InvalidRequest
from tokenhive.schemas.messages import StatusReply
from tokenhive.transport import CurveKeys, load_curve_keys

from .support.procs import Proc, start_broker, start_process
from .support.worker_peers import WorkerProc, start_worker

T = TypeVar("T")
CLI = [sys.executable, "-m", "tokenhive.clients.cli.main"]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


class Keys:
    """Key pairs made by the real CLI: ``dir/NAME.key`` + ``.key_secret``; ``allow`` holds
    the public keys of the allowed workers and clients (not ``rogue``'s)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "keys"
        self.allow = root / "allow"
        self.allow.mkdir()
        for name in ("broker", "worker1", "worker2", "client", "rogue"):
            done = subprocess.run([*CLI, "keys", "generate", str(self.dir), "--name", name],
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            if name in ("worker1", "worker2", "client"):
                shutil.copy(self.dir / f"{name}.key", self.allow)

    def secret(self, name: str) -> str:
        return str(self.dir / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def flags(self, name: str, server: str = "broker") -> list[str]:
        return ["--curve-secret-key", self.secret(name), "--curve-server-key", self.public(server)]

    def client(self, name: str = "client", server: str = "broker") -> CurveKeys:
        return load_curve_keys(self.secret(name), self.public(server))


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def broker(tmp_path: Path, keys: Keys) -> Iterator[Proc]:
    with start_broker(tmp_path, clients="tcp://127.0.0.1:0", workers="tcp://127.0.0.1:0",
                      heartbeat_interval=0.2, curve_secret_key=keys.secret("broker"),
                      curve_allow=str(keys.allow)) as proc:
        yield proc


async def wait_status(client: AsyncClient, ok: Callable[[StatusReply], bool],
                      within: float = 20.0) -> StatusReply:
    """Poll status until ``ok`` holds (deadline ``within`` s)."""
    deadline = time.monotonic() + within
    status: StatusReply | None = None
    while True:
        try:
            status = await client.status(timeout=2.0)
        except BrokerUnavailable:
            status = None
        if status is not None and ok(status):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {within}s: {status}")
        await asyncio.sleep(0.05)  # polling interval, not synchronisation


def worker_ids(status: StatusReply) -> list[str]:
    return sorted(w.id for w in status.workers)


@pytest.mark.timeout(90)
def test_keys_generate_writes_private_secret_and_refuses_overwrite(tmp_path: Path,
                                                                   keys: Keys) -> None:
    mode = stat.S_IMODE((keys.dir / "client.key_secret").stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(keys.dir.stat().st_mode) == 0o700
    public, secret = load_curve_keys(keys.secret("client"))[:2]
    assert len(public) == 40 and len(secret) == 40  # z85 of 32 bytes
    assert secret.decode() not in (keys.dir / "client.key").read_text()  # public file
    again = subprocess.run([*CLI, "keys", "generate", str(keys.dir), "--name", "client"],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert load_curve_keys(keys.secret("client")).public == public  # unchanged


@pytest.mark.timeout(90)
def test_keyed_worker_and_client_work_end_to_end(tmp_path: Path, keys: Keys,
                                                 broker: Proc) -> None:
    worker = start_worker(broker.workers, tmp_path, *keys.flags("worker1"), worker_id="w1")
    try:
        async def scenario() -> None:
            async with AsyncClient(broker.clients, model="echo", curve=keys.client()) as client:
                status = await wait_status(client, lambda s: worker_ids(s) == ["w1"])
                assert status.counters["auth_failures"] == 0
                result = await client.chat("hello over curve", max_tokens=8, timeout=20)
                assert result.text == "hello over curve"
        run(scenario())
        with Client(broker.clients, model="echo", curve=keys.client(), timeout=20) as sync:
            assert sync.chat("and from the sync client", max_tokens=8).text == (
                "and from the sync client")
        # the CLI names the key files
        chat = subprocess.run(
            [*CLI, "chat", "--broker", broker.clients, "--model", "echo", "--timeout", "20",
             *keys.flags("client"), "from the command line"],
            capture_output=True, text=True, timeout=60)
        assert chat.returncode == 0 and "from the command line" in chat.stdout, chat.stderr
        status = subprocess.run([*CLI, "status", "--broker", broker.clients, "--json",
                                 *keys.flags("client")], capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0 and '"w1"' in status.stdout, status.stderr
        # keyed CLI runs (their connection probes too) are no auth failures
        assert '"auth_failures": 0' in status.stdout.replace('":0', '": 0'), status.stdout
        refused = subprocess.run([*CLI, "status", "--broker", broker.clients, "--timeout", "1",
                                  *keys.flags("client", server="rogue")],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "broker_unavailable" in refused.stderr
    finally:
        worker.stop()


@pytest.mark.timeout(120)
def test_unkeyed_unknown_and_wrong_server_peers_are_refused(tmp_path: Path, keys: Keys,
                                                             broker: Proc) -> None:
    plain = start_worker(broker.workers, tmp_path, worker_id="plain")
    rogue = start_worker(broker.workers, tmp_path, *keys.flags("rogue"), worker_id="rogue")
    good = start_worker(broker.workers, tmp_path, *keys.flags("worker1"), worker_id="w1")
    try:
        async def scenario() -> None:
            async with AsyncClient(broker.clients, model="echo", curve=keys.client()) as client:
                # a client that expects another server key: its handshake fails, so it
                # never gets an answer
                async with AsyncClient(broker.clients, model="echo",
                                       curve=keys.client(server="rogue")) as wrong:
                    with pytest.raises(BrokerUnavailable):
                        await wrong.status(timeout=1.5)
                async with AsyncClient(broker.clients, model="echo") as unkeyed:
                    with pytest.raises(BrokerUnavailable):
                        await unkeyed.status(timeout=1.5)
                # plain worker, rogue worker, wrong-server client, unkeyed client
                status = await wait_status(
                    client, lambda s: s.counters["auth_failures"] >= 4 and "w1" in worker_ids(s))
                assert worker_ids(status) == ["w1"]
                result = await client.chat("still served", max_tokens=8, timeout=20)
                assert result.text == "still served"
        run(scenario())
        for refused in (plain, rogue):
            assert refused.proc.poll() is None  # still trying, never let in
            text = refused.log_text()
            # no connection ever completed: Ready never went out, nothing came back
            assert '"msg":"registered"' not in text and "from broker" not in text, text[-2000:]
    finally:
        for proc in (plain, rogue, good):
            proc.stop()


@pytest.mark.timeout(120)
def test_second_key_cannot_take_over_a_worker_id(tmp_path: Path, keys: Keys,
                                                 broker: Proc) -> None:
    first = start_worker(broker.workers, tmp_path, *keys.flags("worker1"), worker_id="w",
                         slots=1)
    try:
        async def scenario() -> None:
            async with AsyncClient(broker.clients, model="echo", curve=keys.client()) as client:
                await wait_status(client, lambda s: worker_ids(s) == ["w"])
                # the same id from another allowed key (its log: a separate file)
                second = WorkerProc(
                    ["--broker", broker.workers, "--backend", "echo", "--model", "echo",
                     "--id", "w", "--slots", "3", "--heartbeat-interval", "0.1",
                     "--log-level", "debug", *keys.flags("worker2")],
                    tmp_path / "w-second.log")
                try:
                    status = await wait_status(
                        client, lambda s: s.counters["worker_claims_refused"] >= 1)
                    assert [(w.id, w.slots) for w in status.workers] == [("w", 1)]
                    assert status.counters["workers_lost"] == 0
                    result = await client.chat("first keeps it", max_tokens=8, timeout=20)
                    assert result.text == "first keeps it"
                    deadline = time.monotonic() + 10
                    while "broker rejected us" not in second.log_text():
                        assert time.monotonic() < deadline, second.log_text()[-2000:]
                        await asyncio.sleep(0.05)  # polling its log, not synchronisation
                    assert "registered to another key" in second.log_text()
                finally:
                    second.stop()
                # the key that owns the id may register it again (a restarted worker)
                nonlocal first
                first.stop()
                first = start_worker(broker.workers, tmp_path / "restart",
                                     *keys.flags("worker1"), worker_id="w", slots=2)
                await wait_status(client, lambda s: [(w.id, w.slots) for w in s.workers]
                                  == [("w", 2)])
        (tmp_path / "restart").mkdir()
        run(scenario())
    finally:
        first.stop()


@pytest.mark.timeout(60)
def test_non_loopback_bind_without_keys_needs_insecure(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "tokenhive.broker", "--clients", "tcp://0.0.0.0:0",
            "--workers", "tcp://127.0.0.1:0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("tokenhive broker:")]
    assert len(lines) == 1, done.stderr
    assert "refusing to bind tcp://0.0.0.0:0 without CURVE keys" in lines[0]
    assert "--insecure" in lines[0]
    ready = tmp_path / "insecure.ready.json"
    with start_process([*args, "--insecure", "--ready-file", str(ready)], name="broker",
                       workdir=tmp_path, ready_file=ready) as proc:
        assert proc.alive() and proc.clients.startswith("tcp://0.0.0.0:")


@pytest.mark.timeout(60)
def test_unreadable_key_file_is_a_one_line_error(tmp_path: Path, keys: Keys) -> None:
    args = [sys.executable, "-m", "tokenhive.broker", "--clients", "tcp://127.0.0.1:0",
            "--workers", "tcp://127.0.0.1:0", "--curve-allow", str(keys.allow),
            "--curve-secret-key", keys.public("broker")]  # a public key: no secret in it
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "holds no secret key" in done.stderr


@pytest.mark.timeout(60)
def test_worker_slots_over_the_cap_are_rejected(tmp_path: Path) -> None:
    with start_broker(tmp_path, heartbeat_interval=0.2,
                      config_json='{"limits": {"max_worker_slots": 4}}') as proc:
        worker = start_worker(proc.workers, tmp_path, worker_id="big", slots=8)
        long_name = start_worker(proc.workers, tmp_path, worker_id="long", model="m" * 300,
                                 slots=1)
        try:
            async def scenario() -> None:
                async with AsyncClient(proc.clients, model="echo") as client:
                    status = await wait_status(client, lambda s: s.counters["bad_frames"] >= 2)
                    assert worker_ids(status) == []
            run(scenario())
            for refused, reason in ((worker, "over limits.max_worker_slots 4"),
                                    (long_name, "must be at most 256 characters")):
                deadline = time.monotonic() + 10
                while reason not in refused.log_text():
                    assert time.monotonic() < deadline, refused.log_text()[-2000:]
                    time.sleep(0.05)  # polling its log, not synchronisation
        finally:
            worker.stop()
            long_name.stop()


@pytest.mark.timeout(90)
def test_keyed_client_side_with_plain_ipc_workers(tmp_path: Path, keys: Keys) -> None:
    """--curve-allow-clients alone keys the client side only: local workers stay on ipc (how
    a pool serves remote clients), and a non-loopback side left unkeyed is still refused."""
    exposed = subprocess.run(
        [sys.executable, "-m", "tokenhive.broker", "--clients", "tcp://127.0.0.1:0",
         "--workers", "tcp://0.0.0.0:0", "--curve-secret-key", keys.secret("broker"),
         "--curve-allow-clients", str(keys.allow)],
        capture_output=True, text=True, timeout=30)
    assert exposed.returncode == 2 and "refusing to bind tcp://0.0.0.0:0" in exposed.stderr
    with start_broker(tmp_path, clients="tcp://0.0.0.0:0", heartbeat_interval=0.2,
                      curve_secret_key=keys.secret("broker"),
                      curve_allow_clients=str(keys.allow)) as proc:
        assert proc.workers.startswith("ipc://")
        worker = start_worker(proc.workers, tmp_path, worker_id="local")
        try:
            port = proc.clients.rpartition(":")[2]
            address = f"tcp://127.0.0.1:{port}"

            async def scenario() -> None:
                async with AsyncClient(address, model="echo", curve=keys.client()) as client:
                    await wait_status(client, lambda s: worker_ids(s) == ["local"])
                    assert (await client.chat("keyed client", max_tokens=8, timeout=20)).text \
                        == "keyed client"
                    async with AsyncClient(address, model="echo") as unkeyed:
                        with pytest.raises(BrokerUnavailable):
                            await unkeyed.status(timeout=1.5)
                    await wait_status(client, lambda s: s.counters["auth_failures"] >= 1)
            run(scenario())
        finally:
            worker.stop()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(90)
def test_up_with_keys_starts_its_keyed_workers_and_readiness_client(tmp_path: Path,
                                                                    keys: Keys) -> None:
    """`tokenhive up` with both sides keyed on tcp: its own workers and its readiness client
    connect with the broker's own key pair (always allowed), so it reports ready; an allowed
    client is served, an unlisted key is refused; its workers name this host as their node."""
    import socket as socket_module
    clients, workers = free_port(), free_port()
    up = subprocess.Popen(
        [*CLI, "up", "--backend", "echo", "--model", "echo", "--workers", "2",
         "--clients", f"tcp://127.0.0.1:{clients}", "--worker-endpoint",
         f"tcp://127.0.0.1:{workers}", "--curve-secret-key", keys.secret("broker"),
         "--curve-allow", str(keys.allow), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        lines = []
        for line in up.stdout:  # ends at EOF if up dies; the timeout bounds a hang
            lines.append(line)
            if "workers ready" in line:
                break
        assert any("workers ready" in line for line in lines), (lines, up.stderr)

        async def scenario() -> None:
            address = f"tcp://127.0.0.1:{clients}"
            async with AsyncClient(address, model="echo", curve=keys.client()) as client:
                status = await client.status(timeout=5)
                assert sorted(w.node for w in status.workers) == [socket_module.gethostname()] * 2
                assert (await client.chat("keyed up", max_tokens=8, timeout=20)).text == \
                    "keyed up"
                async with AsyncClient(address, model="echo",
                                       curve=keys.client("rogue")) as rogue:
                    with pytest.raises(BrokerUnavailable):
                        await rogue.status(timeout=1.5)
        run(scenario())
    finally:
        up.terminate()
        assert up.wait(timeout=30) == 0


@pytest.mark.timeout(90)
def test_only_admin_keys_may_drain_nodes(tmp_path: Path, keys: Keys) -> None:
    """With keyed clients, draining a node (an operator message) needs the broker's own key
    or one in --curve-allow-admins, read at each check; an ordinary allowed client is
    refused, counted, and its drain changes nothing."""
    admins = tmp_path / "admins"
    admins.mkdir()
    with start_broker(tmp_path, clients="tcp://127.0.0.1:0", workers="tcp://127.0.0.1:0",
                      heartbeat_interval=0.2, curve_secret_key=keys.secret("broker"),
                      curve_allow=str(keys.allow), curve_allow_admins=str(admins)) as proc:
        worker = start_worker(proc.workers, tmp_path, *keys.flags("worker1"), "--node", "n1",
                              worker_id="w1")
        try:
            async def scenario() -> None:
                operator = load_curve_keys(keys.secret("broker"), keys.public("broker"))
                async with AsyncClient(proc.clients, curve=keys.client()) as client, \
                        AsyncClient(proc.clients, curve=operator) as head:
                    await wait_status(client, lambda s: [n.id for n in s.nodes] == ["n1"])
                    with pytest.raises(InvalidRequest, match="curve-allow-admins"):
                        await client.drain_node("n1")
                    status = await client.status()
                    assert status.counters["operator_refused"] == 1
                    assert not status.nodes[0].draining
                    assert (await head.drain_node("n1")).draining  # the broker's own key
                    assert not (await head.drain_node("n1", drain=False)).draining
                    shutil.copy(keys.public("client"), admins)  # made an admin, no restart
                    assert (await client.drain_node("n1")).draining
                    assert (await client.status()).counters["operator_refused"] == 1
            run(scenario())
        finally:
            worker.stop()


@pytest.mark.timeout(60)
def test_a_key_removed_from_the_allow_list_is_refused_without_a_restart(
        tmp_path: Path, keys: Keys, broker: Proc) -> None:
    """The allow-list directory is read at each handshake: once a client's key file is gone,
    its next connection is refused (and counted), with the broker still running."""
    async def scenario() -> None:
        async with AsyncClient(broker.clients, curve=keys.client("worker1")) as watcher:
            async with AsyncClient(broker.clients, curve=keys.client()) as client:
                await client.status(timeout=5)  # allowed now
            (keys.allow / "client.key").unlink()
            async with AsyncClient(broker.clients, curve=keys.client()) as revoked:
                with pytest.raises(BrokerUnavailable):
                    await revoked.status(timeout=1.5)
            await wait_status(watcher, lambda s: s.counters["auth_failures"] >= 1)
    run(scenario())
