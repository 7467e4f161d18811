"""The CLI answers fast and cleans up: no broker at an address is one human line within a
couple of seconds; SIGTERM of a command with a local pool stops the pool and removes its
runtime directory; logs read as text on a terminal and as JSON lines otherwise."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_sidecar_lifecycle import descendants, wait_gone

CLI = [sys.executable, "-m", "tokenhive.clients.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["chat", "generate"])
def test_no_broker_is_one_line_at_once(command: str) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run([*CLI, command, "--broker", address, "hello"], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "TOKENHIVE_LOG_FORMAT": ""})
    took = time.monotonic() - started
    assert done.returncode == 1
    assert done.stderr == f"tokenhive {command}: no broker answers at {address} (is it running?)\n"
    assert done.stdout == ""
    assert took < 6, took  # a refused connection is known at once; the rest is start-up


@pytest.mark.timeout(60)
def test_log_format_text_on_a_terminal_json_otherwise() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    args = [*CLI, "status", "--broker", address, "--timeout", "0.3", "--log-level", "debug"]
    env = {**os.environ, "TOKENHIVE_LOG_FORMAT": ""}
    piped = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env)
    debug = [line for line in piped.stderr.splitlines() if "broker probe" in line]
    assert len(debug) == 1 and debug[0].startswith('{"ts":')
    assert '"refused":true' in debug[0]

    forced = subprocess.run([*args, "--log-format", "text"], capture_output=True, text=True,
                            timeout=30, env=env)
    (line,) = [line for line in forced.stderr.splitlines() if "broker probe" in line]
    assert line.endswith(f"debug tokenhive.cli: broker probe address={address} refused=true")

    controller, terminal = os.openpty()  # stderr a terminal: text by itself
    try:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=terminal, env=env)
        os.close(terminal)
        output = b""
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other side closed
                break
            if not data:
                break
            output += data
        proc.wait(30)
    finally:
        os.close(controller)
    text = output.decode(errors="replace")
    assert "debug tokenhive.cli: broker probe" in text and '{"ts":' not in text


@pytest.mark.timeout(90)
@pytest.mark.parametrize("command", ["chat", "generate"])
def test_sigterm_stops_the_local_pool_and_removes_its_directory(
    tmp_path: Path, command: str
) -> None:
    run_dir = tmp_path / "tmp"
    run_dir.mkdir()
    proc = subprocess.Popen(
        [*CLI, command, "--backend", "echo", "--model", "m", "--option", "tokens_per_s=10",
         " ".join(["word"] * 300)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(run_dir), "TOKENHIVE_BROKER": ""},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.read(4) == b"word"  # streaming: the pool is up and serving
        pool = descendants(proc.pid)
        assert len(pool) >= 2 and len(list(run_dir.iterdir())) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert not wait_gone(pool, 10)
        assert list(run_dir.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
