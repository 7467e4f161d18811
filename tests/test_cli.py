"""The ``tokenhive`` CLI: config errors, ``up`` as a real process tree, chat/generate/status."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import ipc_address
from tokenhive.clients import Client
from tokenhive.clients.cli.main import main


class UpProcess:
    """``tokenhive up`` as a subprocess; its stdout lines are collected on a thread."""

    def __init__(self, args: list[str], log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenhive.clients.cli.main", "up", *args],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"`up` never printed {text!r}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if text in line:
                return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self._log.close()


@pytest.fixture
def echo_up(tmp_path: Path) -> Iterator[tuple[UpProcess, str]]:
    up = UpProcess(
        ["--backend", "echo", "--model", "m", "--workers", "2", "--slots", "2",
         "--clients", "tcp://127.0.0.1:0", "--worker-endpoint", ipc_address(tmp_path, "w")],
        tmp_path / "up.stderr",
    )
    try:
        address = up.expect("clients connect to").rsplit(" ", 1)[-1]
        up.expect("workers ready")
        yield up, address
    finally:
        up.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[[workers]]\nbackend = "echo"\nmodel = "m"\ncolour = "red"\n', "colour"),
        ('[broker]\nclientz = "tcp://127.0.0.1:1"\n', "clientz"),
        ('[brokr]\n', "brokr"),
    ],
)
def test_up_with_unknown_key_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, named: str
) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(toml)
    assert main(["up", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"unknown field `{named}`" in err and "Traceback" not in err


@pytest.mark.timeout(30)
def test_config_problems_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[[workers]\n")
    assert main(["up", "--config", str(broken)]) == 2
    assert main(["up", "--config", str(tmp_path / "missing.toml")]) == 2
    assert main(["up", "--config", str(broken), "--workers", "2"]) == 2
    assert main(["up", "--backend", "echo", "--slots", "0"]) == 2
    assert main(["chat", "--broker", "ipc:///nowhere", "--backend", "echo", "hi"]) == 2
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "cannot be combined" in err and "pool flags" in err


@pytest.mark.timeout(30)
def test_broker_and_worker_subcommands_are_mounted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broker", "--help"]) == 0
    assert "--ready-file" in capsys.readouterr().out
    assert main(["worker", "--help"]) == 0
    assert "--spec-json" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_up_serves_restarts_a_dead_worker_and_stops_cleanly(
    echo_up: tuple[UpProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    up, address = echo_up
    assert main(["status", "--broker", address]) == 0
    table = capsys.readouterr().out
    assert "2 workers" in table and table.count(" echo ") == 2 and "ok" in table

    assert main(["status", "--broker", address, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    pids = sorted(int(w["id"].rsplit("-", 1)[1]) for w in status["workers"])
    assert len(pids) == 2 and status["counters"]["workers_registered"] >= 2

    assert main(["chat", "--broker", address, "hello from the cli"]) == 0
    assert capsys.readouterr().out == "hello from the cli\n"

    os.kill(pids[0], signal.SIGKILL)  # the supervisor must bring a replacement up
    with Client(address) as client:
        deadline = time.monotonic() + 60
        while True:
            ids = {w.id for w in client.status().workers if w.health == "ok"}
            if len(ids) == 2 and f"m-{pids[0]}" not in ids:
                break
            assert time.monotonic() < deadline, f"no replacement worker: {ids}"
            time.sleep(0.1)  # polling interval
    children = [p for p in pids if _alive(p)]
    assert up.stop() == 0
    assert not any(_alive(p) for p in children)  # workers stopped with it


@pytest.mark.timeout(60)
def test_up_without_a_worker_endpoint_uses_a_private_socket_per_run(tmp_path: Path) -> None:
    """No fixed /tmp path another user could squat or a second `up` could take over: the
    workers meet the broker in this run's own 0700 directory."""
    up = UpProcess(["--backend", "echo", "--model", "m", "--clients", "tcp://127.0.0.1:0"],
                   tmp_path / "up.stderr")
    try:
        address = up.expect("clients connect to").rsplit(" ", 1)[-1]
        up.expect("workers ready")
        with Client(address) as client:
            (worker,) = client.status().workers
        pid = int(worker.id.rsplit("-", 1)[1])  # echo workers are named MODEL-PID
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        endpoint = argv[argv.index(b"--broker") + 1].decode()
        run_dir = Path(endpoint.removeprefix("ipc://")).parent
        assert run_dir.name.startswith("tokenhive-up-") and run_dir.stat().st_mode & 0o077 == 0
    finally:
        assert up.stop() == 0


@pytest.mark.timeout(60)
def test_up_gives_up_on_a_worker_whose_model_fails_to_load(tmp_path: Path) -> None:
    config = tmp_path / "pool.toml"
    config.write_text(
        f'[broker]\nclients = "tcp://127.0.0.1:0"\nworkers = "{ipc_address(tmp_path, "w")}"\n'
        '[[workers]]\nbackend = "echo"\nmodel = "bad"\nembedding_dim = 0\ncount = 2\n'
    )
    up = UpProcess(["--config", str(config)], tmp_path / "up.stderr")
    try:
        up.expect("clients connect to")
        assert up.proc.wait(60) == 1  # every replica exited 3: nothing left to serve
    finally:
        up.stop()
    log = (tmp_path / "up.stderr").read_text()
    assert log.count('"reason":"model load failed"') == 2
    assert "every worker failed" in log


@pytest.mark.timeout(120)
def test_chat_and_generate_with_a_local_pool(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["chat", "--backend", "echo", "--model", "m", "a local answer"]) == 0
    assert capsys.readouterr().out == "a local answer\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    assert main(["generate", "--backend", "echo", "--max-tokens", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == "from" and result["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 1


@pytest.mark.timeout(30)
def test_status_without_a_broker_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    address = ipc_address(tmp_path, "nobody")
    assert main(["status", "--broker", address, "--timeout", "0.5"]) == 1
    assert time.monotonic() - started < 5
    assert "broker_unavailable" in capsys.readouterr().err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
