"""The GGUF backend: a local model served by the continuous-batching engine.

Glue only: resolve the model file, pick the chat formatter, start ``GGUFEngine`` (which
owns every llama.cpp object on its own thread), and turn each request into an engine job
whose events arrive on an ``asyncio.Queue``. Leaving ``stream()`` early (the runtime
cancels the task, or closes the iterator) cancels the job: the engine drops it between two
tokens and the other sequences carry on.

Tools and structured output: ``response_format`` and a forced tool call become a grammar
the engine applies to the request's sequence (``gguf/grammar.py``); tools reach the prompt
through the chat template or as instructions (``gguf/tool_prompt.py``); calls are read back
out of the text (``gguf/tool_output.py``: exact when forced, best effort with "auto").

In embedding mode (``spec.embedding``) the model is loaded by ``GGUFEmbedder`` instead and
only ``embed()`` is served.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import llama_cpp

from tokenhive.schemas.config import GGUFSpec
from tokenhive.schemas.errors import (
    BackendError,
    InvalidRequest,
    ModelLoadFailed,
    TokenHiveError,
)
from tokenhive.schemas.messages import Health, Kind, Request, Usage
from tokenhive.workers.backend import (
    Backend,
    BackendInfo,
    BackendStats,
    Delta,
    Done,
    Embeddings,
    HealthReport,
)
from tokenhive.workers.gguf.chat_format import ChatFormatter, make_chat_formatter
from tokenhive.workers.gguf.embed import GGUFEmbedder
from tokenhive.workers.gguf.engine import GGUFEngine
from tokenhive.workers.gguf.grammar import forced_tools, request_grammar
from tokenhive.workers.gguf.native import NativeParams
from tokenhive.workers.gguf.sampling import check_sampling
from tokenhive.workers.gguf.slots import Job
from tokenhive.workers.gguf.tool_output import ToolOutputFilter
from tokenhive.workers.gguf.tool_prompt import (
    has_tool_turns,
    tool_dicts,
    tools_offered,
    with_tool_instructions,
)
from tokenhive.workers.models.gguf_file import read_gguf_metadata
from tokenhive.workers.models.source import resolve_model


def _device(n_gpu_layers: int) -> str:
    if n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    return f"cuda:{visible}"


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class GGUFBackend(Backend):
    def __init__(self, spec: GGUFSpec) -> None:
        self.spec = spec
        self.engine: GGUFEngine | None = None
        self._embedder: GGUFEmbedder | None = None
        self._embed_lock = asyncio.Lock()
        self._formatter: ChatFormatter | None = None
        self._keys = itertools.count(1)
        self._info = BackendInfo(backend="gguf", context_length=spec.n_ctx)

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._load)
        except TokenHiveError:
            raise
        except Exception as e:  # OOM, a llama.cpp refusal: one clear load failure
            raise ModelLoadFailed(f"could not load model {self.spec.model!r}: {e}") from e

    def _load(self) -> None:
        spec = self.spec
        path = resolve_model(spec)  # checks the file (missing, truncated) before llama.cpp
        if spec.embedding:
            embedder = GGUFEmbedder()
            embedder.load(path, spec)
            self._embedder = embedder
            self._info = BackendInfo(
                backend="gguf", context_length=embedder.max_tokens,
                device=_device(spec.n_gpu_layers), kinds=[Kind.EMBEDDING], memory_mb=_rss_mb(),
            )
            return
        self._formatter = make_chat_formatter(read_gguf_metadata(path), spec.chat_format)
        engine = GGUFEngine(
            NativeParams(
                path=Path(path), slots=spec.slots, n_ctx=spec.n_ctx, n_batch=spec.n_batch,
                n_threads=spec.n_threads, n_gpu_layers=spec.n_gpu_layers,
            ),
            seed=spec.seed, prefix_cache=spec.prefix_cache,
        )
        engine.start()
        self.engine = engine
        assert engine.native is not None
        self._info = BackendInfo(
            backend="gguf", context_length=spec.n_ctx, device=_device(spec.n_gpu_layers),
            kinds=[Kind.CHAT, Kind.COMPLETION],
            memory_mb=max(_rss_mb(), engine.native.model_bytes / 2**20),
        )

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)
        embedder, self._embedder = self._embedder, None
        if embedder is not None:
            async with self._embed_lock:
                await asyncio.to_thread(embedder.close)

    def info(self) -> BackendInfo:
        return self._info

    def health(self) -> HealthReport:
        engine = self.engine
        if engine is None:
            return HealthReport()
        if not engine.alive:
            return HealthReport(health=Health.UNHEALTHY, detail="the gguf engine stopped")
        stats = engine.stats
        if stats.consecutive_decode_errors >= self.spec.degraded_after_errors:
            return HealthReport(
                health=Health.DEGRADED,
                detail=f"{stats.consecutive_decode_errors} decode errors in a row: "
                f"{stats.last_error}",
            )
        return HealthReport()

    def stats(self) -> BackendStats:
        """The engine's counters (plain ints its thread writes; reading one is atomic)."""
        engine = self.engine
        if engine is None:
            return BackendStats()
        stats = engine.stats
        cells = engine.n_ctx * engine.params.slots  # one unified cache for all slots
        return BackendStats(generated_tokens=stats.generated_tokens,
                            kv_used=stats.kv_cells / cells if cells else 0.0,
                            prefix_hits=stats.prefix_hits)

    def make_job(self, request: Request) -> Job:
        """Validate and format a request into an engine job (nothing queued yet)."""
        if self._embedder is not None:
            raise InvalidRequest(
                f"model {self.spec.model!r} is served for embeddings only (embedding = true)"
            )
        if self.engine is None or not self.engine.alive:
            raise BackendError("the gguf engine is not running (closed or crashed)")
        # The ranges are the schema's, already checked when the worker decoded the request;
        # this re-applies them for requests built in Python (in-process use of the backend).
        check_sampling(request.sampling)
        stops = list(request.sampling.stop)
        if request.kind is Kind.COMPLETION:
            if request.prompt is None:
                raise InvalidRequest("a completion request needs a prompt")
            if request.tools or request.tool_choice is not None:
                raise InvalidRequest("tools and tool_choice are for chat requests")
            prompt, add_bos = request.prompt, self._native_add_bos()
        elif request.kind is Kind.CHAT:
            prompt, add_bos = self._chat_prompt(request)
            assert self._formatter is not None
            stops += [s for s in self._formatter.stop if s not in stops]
        else:
            raise InvalidRequest(f"{request.kind.value} requests go to an embedding worker")
        return Job(
            key=next(self._keys), request_id=request.id, prompt=prompt, add_bos=add_bos,
            sampling=request.sampling, stops=stops, loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(), grammar=request_grammar(request),
        )

    def _chat_prompt(self, request: Request) -> tuple[str, bool]:
        formatter = self._formatter
        assert formatter is not None
        messages, offered = request.messages, tools_offered(request)
        if formatter.native_tools:
            tools = tool_dicts(request.tools) if offered else None
            return formatter(messages, tools), formatter.add_bos
        if offered or has_tool_turns(messages):
            messages = with_tool_instructions(messages, request.tools if offered else [])
        return formatter(messages), formatter.add_bos

    def _native_add_bos(self) -> bool:
        assert self.engine is not None and self.engine.native is not None
        return self.engine.native.add_bos

    def stream(self, request: Request) -> AsyncIterator[Delta | Done]:
        events = self._engine_events(request)
        if request.kind is not Kind.CHAT or not tools_offered(request):
            return events
        names = {t.function.name for t in request.tools}
        return self._tool_events(events, ToolOutputFilter(bool(forced_tools(request)), names))

    async def _tool_events(
        self, events: AsyncGenerator[Delta | Done], tools: ToolOutputFilter
    ) -> AsyncIterator[Delta | Done]:
        try:
            async for event in events:
                if isinstance(event, Done):
                    for item in tools.finish(event):
                        yield item
                    return
                if (passed := tools.feed(event)) is not None:
                    yield passed
        finally:
            await events.aclose()  # now, not at garbage collection: it cancels the job

    async def _engine_events(self, request: Request) -> AsyncGenerator[Delta | Done]:
        job = self.make_job(request)
        engine = self.engine
        assert engine is not None
        engine.submit(job)
        finished = False
        try:
            while True:
                event = await job.queue.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                assert isinstance(event, Delta | Done)
                if isinstance(event, Done):
                    finished = True
                yield event
                if finished:
                    return
        finally:
            if not finished:  # the consumer left early: stop generating for it
                engine.cancel(job.key)

    async def embed(self, request: Request) -> Embeddings:
        embedder = self._embedder
        if embedder is None:
            raise InvalidRequest(
                f"model {self.spec.model!r} is served for generation; embeddings need a worker "
                "with embedding = true"
            )
        async with self._embed_lock:  # GGUFEmbedder is single-threaded
            vectors, n = await asyncio.to_thread(embedder.embed, list(request.input))
        return Embeddings(vectors=vectors, usage=Usage(prompt_tokens=n, total_tokens=n))
