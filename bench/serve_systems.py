"""The systems a serving bench drives, each as ``send(item) -> Record``.

* ``PoolSystem``: tokenhive through its Python ``AsyncClient`` (streamed);
* ``OpenAIHTTPSystem``: any OpenAI-compatible HTTP server, streamed over SSE: used for both
  ``tokenhive serve`` and ``llama-server``, so the two HTTP fronts meet the same client code
  (our lean HTTP/1.1 transport, the SSE parser and msgspec decoding the openai adapter uses);
* ``TokenhiveServe``: starts ``tokenhive serve --broker ADDR --port N`` for a running pool.

All requests are greedy (temperature 0) with the item's ``max_tokens``; ``api`` picks a raw
completion (the prompt as is: no chat template, so every system sees the same tokens) or a
chat (each system applies its own chat template).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal, Protocol

import httpx
import msgspec

from bench.llama_server import ServerProcess
from bench.serve_metrics import Record
from bench.serve_workload import Item
from tokenhive.clients.async_client import AsyncClient
from tokenhive.workers.backends.http.sse import iter_sse
from tokenhive.workers.backends.http.transport import LeanHTTPTransport

Api = Literal["completion", "chat"]
SERVE_COMMAND = Path(__file__).resolve().parent.parent / "clients" / "http" / "command.py"


class System(Protocol):
    name: str

    async def send(self, item: Item) -> Record: ...


class PoolSystem:
    def __init__(self, name: str, client: AsyncClient, api: Api) -> None:
        self.name, self.client, self.api = name, client, api

    async def send(self, item: Item) -> Record:
        rec = Record(start=time.perf_counter())
        last = 0.0
        try:
            if self.api == "chat":
                stream = self.client.stream(item.prompt, max_tokens=item.max_tokens,
                                            temperature=0.0)
            else:
                stream = self.client.stream(prompt=item.prompt, max_tokens=item.max_tokens,
                                            temperature=0.0)
            async for chunk in stream:
                if chunk.text:
                    now = time.perf_counter()
                    if last:
                        rec.itl.append(now - last)
                    else:
                        rec.ttft = now - rec.start
                    last = now
            rec.end = time.perf_counter()
            rec.output_tokens = stream.result.usage.completion_tokens
        except Exception as exc:  # a failed request is counted, not fatal to the run
            rec.error = f"{type(exc).__name__}: {exc}"[:200]
        return rec


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Event(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None


_decode_event = msgspec.json.Decoder(_Event).decode


class OpenAIHTTPSystem:
    """Streams ``/v1/completions`` or ``/v1/chat/completions`` and times each SSE event."""

    def __init__(self, name: str, base_url: str, api: Api, max_connections: int,
                 model: str = "bench") -> None:
        self.name, self.api, self.model = name, api, model
        self.http = httpx.AsyncClient(base_url=base_url, timeout=600.0,
                                      transport=LeanHTTPTransport(max_connections))

    def _body(self, item: Item) -> dict[str, object]:
        body: dict[str, object] = {
            "model": self.model, "max_tokens": item.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": item.prompt}]
        else:
            body["prompt"] = item.prompt
        return body

    async def send(self, item: Item) -> Record:
        path = "/v1/chat/completions" if self.api == "chat" else "/v1/completions"
        rec = Record(start=time.perf_counter())
        last, pieces, usage = 0.0, 0, 0
        try:
            async with self.http.stream("POST", path, json=self._body(item)) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:120]}")
                async for event in iter_sse(response):
                    if event.data == "[DONE]":
                        continue
                    doc = _decode_event(event.data)
                    if doc.usage is not None:
                        usage = doc.usage.completion_tokens
                    for choice in doc.choices:
                        text = choice.text if choice.delta is None else choice.delta.content
                        if text:
                            now = time.perf_counter()
                            if last:
                                rec.itl.append(now - last)
                            else:
                                rec.ttft = now - rec.start
                            last, pieces = now, pieces + 1
            rec.end = time.perf_counter()
            # The server's own count when it sends usage; else one token per text event.
            rec.output_tokens = usage or pieces
        except Exception as exc:  # a failed request is counted, not fatal to the run
            rec.error = f"{type(exc).__name__}: {exc}"[:200]
        return rec

    async def aclose(self) -> None:
        await self.http.aclose()


def serve_available() -> bool:
    """``tokenhive serve`` exists in this checkout (helper A is building clients/http/)."""
    return SERVE_COMMAND.is_file()


class TokenhiveServe(ServerProcess):
    """``tokenhive serve`` in front of a running pool, healthy inside the block."""

    name = "tokenhive serve"
    health_path = "/v1/models"
    within = 60.0
    stderr = None  # its one-line errors are worth seeing

    def __init__(self, broker: str, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        script = Path(sys.executable).parent / "tokenhive"
        self.argv = [str(script), "serve", "--broker", broker, "--port", str(port)]
        self.proc = None

    def healthy(self, status: int) -> bool:
        return status < 500  # listening; whether a model serves is the bench's business
