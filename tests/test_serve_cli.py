"""``tokenhive serve`` as a command: its own local pool (no --broker), a clean stop on
SIGTERM/SIGINT, /health and errors when no worker serves or the broker is gone, and flags
refused before anything starts."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import openai
import pytest

from tests.support.procs import start_broker
from tests.support.serve import ServeProcess, wait_until
from tokenhive.clients.cli.main import main


def children_of(pid: int) -> set[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(c) for c in text)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


@pytest.mark.timeout(90)
def test_without_broker_it_runs_a_local_pool_and_sigterm_stops_it_all(tmp_path: Path) -> None:
    args = ["--backend", "echo", "--model", "m", "--slots", "2", "--port", "0"]
    with ServeProcess(args, tmp_path) as serve:
        with openai.OpenAI(base_url=serve.url + "/v1", api_key="x", max_retries=0) as client:
            assert [m.id for m in client.models.list()] == ["m"]
            r = client.chat.completions.create(model="m", messages=[{"role": "user",
                                                                      "content": "local"}])
            assert r.choices[0].message.content == "local"
        pool = children_of(serve.pid)
        assert pool, "the local pool runs as child processes"
        assert serve.stop() == 0
    wait_until(lambda: not any(alive(p) for p in pool), 15, "local pool processes gone")
    assert "Traceback" not in serve.stderr_text()


@pytest.mark.timeout(60)
def test_no_worker_and_broker_gone(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, heartbeat_interval=0.2)
    try:
        serve = ServeProcess(["--broker", broker.clients, "--port", "0",
                              "--broker-timeout", "1", "--max-attempts", "1"], tmp_path)
        with serve, serve.http() as http, \
                openai.OpenAI(base_url=serve.url + "/v1", api_key="x", max_retries=0) as client:
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["healthy_workers"] == 0
            assert client.models.list().data == []
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="m", prompt="x")
            broker.terminate()
            assert http.get("/health").status_code == 503
            with pytest.raises(openai.APIStatusError) as gone:
                client.completions.create(model="m", prompt="x")
            assert gone.value.status_code == 503 and gone.value.code == "broker_unavailable"
            assert "tokenhive_pool_up 0.0" in http.get("/metrics").text
            serve.proc.send_signal(signal.SIGINT)
            assert serve.proc.wait(30) == 0
    finally:
        broker.terminate()


@pytest.mark.timeout(30)
def test_bad_flags_exit_2_before_starting(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    broker = ["--broker", "ipc:///nowhere"]
    assert main(["serve", *broker, "--port", "70000"]) == 2
    assert main(["serve", *broker, "--max-body-bytes", "0"]) == 2
    assert main(["serve", *broker, "--api-key-env", "TH_NO_SUCH_VARIABLE_SET"]) == 2
    empty = tmp_path / "keys.txt"
    empty.write_text("# nothing here\n\n")
    assert main(["serve", *broker, "--api-key-file", str(empty)]) == 2
    assert main(["serve", *broker, "--api-key-file", str(tmp_path / "missing")]) == 2
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", *broker, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "TH_NO_SUCH_VARIABLE_SET" in err and "no key in it" in err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
