"""Start tokenhive processes for tests and wait until they are ready.

    with start_broker(tmp_path, heartbeat_interval=0.2) as broker:
        client = FakeClient(broker.clients)
        worker_address = broker.workers

Each process's stderr (JSON log lines) goes to a file in ``tmp_path``; ``stderr_text()``
and ``log_records()`` read it back, and a failed start raises with its tail.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_counter = itertools.count(1)
IPC_PATH_MAX = 100  # sockaddr_un holds ~107 bytes; stay clear of it


class Proc:
    """A started process. ``ready`` is the JSON its ready file held (empty if none)."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], stderr_path: Path,
                 ready: dict[str, Any]) -> None:
        self.name = name
        self.popen = popen
        self.stderr_path = stderr_path
        self.ready = ready

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def clients(self) -> str:
        return str(self.ready["clients"])

    @property
    def workers(self) -> str:
        return str(self.ready["workers"])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout=timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int:
        if self.alive():
            self.popen.kill()
        return self.popen.wait(timeout=10)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (other lines are skipped)."""
        records = []
        for line in self.stderr_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    records.append(obj)
        return records

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
        self.popen.wait()


def ipc_address(tmp_path: Path, name: str) -> str:
    """A unique ipc:// address under tmp_path, or under a short fresh /tmp dir when
    tmp_path is too long for a unix socket path."""
    path = tmp_path / f"{name}-{next(_counter)}.sock"
    if len(str(path)) > IPC_PATH_MAX:
        path = Path(tempfile.mkdtemp(prefix="th-")) / f"{name}.sock"
    return f"ipc://{path}"


def start_process(
    args: list[str],
    *,
    name: str,
    workdir: Path,
    ready_file: Path | None = None,
    ready_timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> Proc:
    """Run ``args`` with stderr to ``workdir/<name>-N.stderr``; with ``ready_file``, wait
    until the process has written it (or raise, with the stderr tail, if it exits first)."""
    stderr_path = workdir / f"{name}-{next(_counter)}.stderr"
    full_env = {**os.environ, **(env or {})}
    with stderr_path.open("wb") as err:
        popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                 env=full_env)
    proc = Proc(name, popen, stderr_path, {})
    if ready_file is None:
        return proc
    deadline = time.monotonic() + ready_timeout
    while not ready_file.exists():
        if not proc.alive():
            raise RuntimeError(f"{name} exited with {popen.returncode} before it was ready:\n"
                               f"{proc.stderr_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{name} not ready in {ready_timeout}s:\n"
                               f"{proc.stderr_text()[-3000:]}")
        time.sleep(0.02)
    proc.ready = json.loads(ready_file.read_text())
    return proc


def start_broker(
    tmp_path: Path,
    *,
    clients: str | None = None,
    workers: str | None = None,
    log_level: str = "info",
    ready_timeout: float = 30.0,
    **options: Any,
) -> Proc:
    """A broker process: clients on tcp port 0 and workers on a fresh ipc path by default.
    ``options`` are BrokerConfig fields (``queue_size=2`` -> ``--queue-size 2``)."""
    n = next(_counter)
    ready_file = tmp_path / f"broker-{n}.ready.json"
    args = [
        sys.executable, "-m", "tokenhive.broker",
        "--clients", clients or "tcp://127.0.0.1:0",
        "--workers", workers or ipc_address(tmp_path, "workers"),
        "--ready-file", str(ready_file),
        "--log-level", log_level,
    ]
    for key, value in options.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return start_process(args, name="broker", workdir=tmp_path, ready_file=ready_file,
                         ready_timeout=ready_timeout)
