"""``tokenhive serve`` as a real subprocess for tests.

    with ServeProcess(["--broker", broker.clients, "--port", "0"], tmp_path) as serve:
        openai.OpenAI(base_url=serve.url + "/v1", api_key="x")

The server is started on port 0 and announces its real address on stdout
("tokenhive serve: listening on http://127.0.0.1:PORT"), which ``ServeProcess`` waits for.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx

LISTENING = "tokenhive serve: listening on "


class ServeProcess:
    def __init__(self, args: list[str], workdir: Path, *, env: dict[str, str] | None = None,
                 ready_timeout: float = 60.0, name: str = "serve") -> None:
        self.log_path = workdir / f"{name}.stderr"
        self._log = self.log_path.open("wb")
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenhive.clients.cli.main", "serve", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True,
            # the default Batches data dir lives under the test's tmp dir, never ~/.local
            env={**os.environ, "XDG_DATA_HOME": str(workdir / "xdg-data"), **(env or {})},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_listening(ready_timeout)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith(LISTENING):
                return line.removeprefix(LISTENING).strip()
        self.kill()
        raise RuntimeError(f"serve did not start (exit {self.proc.poll()}):\n"
                           f"{self.stderr_text()[-3000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def http(self, api_key: str | None = None, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stderr_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a service manager would; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            self._log.close()


def wait_until(check: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``check`` (every 20 ms) until it holds; the seconds it took. TimeoutError after
    ``within`` seconds. The interval is a polling period, not synchronisation."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise TimeoutError(f"{what}: not within {within}s")
        time.sleep(0.02)
    return time.monotonic() - start


