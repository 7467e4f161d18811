"""Embeddings from a GGUF model with llama-cpp-python (a worker in embedding mode).

One pooled vector per input. Pooling is always set explicitly (``spec.pooling``, default
``mean``): llama.cpp's default for llama-architecture models is no pooling, which returns one
vector per *token*. ``none`` is refused because callers are promised one vector per input.

Vectors are L2-normalised to unit length, as OpenAI's embeddings are, so cosine similarity
is a plain dot product and results are comparable with OpenAI-backed workers. (A zero
vector, which cannot be normalised, is returned as is.)

An input longer than the context is rejected with ``ContextTooLong`` rather than silently
cut: a truncated text's vector would answer a different question than the one asked. The
whole input must fit one micro-batch for pooling, so the context, the batch and the
micro-batch are all ``spec.n_ctx`` tokens.

Blocking, and not thread-safe: the worker calls it from one thread.
"""

from __future__ import annotations

import math
from pathlib import Path

import llama_cpp

from tokenhive.schemas.config import GGUFSpec
from tokenhive.schemas.errors import ContextTooLong, InternalError, InvalidRequest, ModelLoadFailed
from tokenhive.workers.gguf import llama_log
from tokenhive.workers.gguf.cpu_check import check_cpu

POOLING: dict[str, int] = {
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
}


def normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0.0 else list(vector)


class GGUFEmbedder:
    def __init__(self) -> None:
        self._llama: llama_cpp.Llama | None = None
        self.max_tokens = 0  # per input
        self.dims = 0

    def load(self, path: Path, spec: GGUFSpec) -> None:
        """Load ``path`` for embeddings; raise ModelLoadFailed with the reason."""
        check_cpu()
        pooling = spec.pooling or "mean"
        if pooling not in POOLING:
            raise ModelLoadFailed(
                f"pooling {pooling!r} is not supported for embeddings; use one of "
                f"{sorted(POOLING)} (one vector per input)"
            )
        if not Path(path).is_file():
            raise ModelLoadFailed(f"model file not found: {path}")
        llama_log.install()  # llama.cpp's lines become our debug records, not raw stderr
        try:
            self._llama = llama_cpp.Llama(
                model_path=str(path),
                embedding=True,
                pooling_type=POOLING[pooling],
                n_ctx=spec.n_ctx,
                n_batch=spec.n_ctx,
                n_ubatch=spec.n_ctx,
                n_threads=spec.n_threads,
                n_gpu_layers=spec.n_gpu_layers,
                seed=spec.seed,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelLoadFailed(f"llama.cpp could not load {path} for embeddings: {e}") from e
        self.max_tokens = self._llama.n_batch
        self.dims = self._llama.n_embd()

    def count_tokens(self, text: str) -> int:
        return len(self._model().tokenize(text.encode("utf-8")))

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit-length vectors, one per text, and the number of prompt tokens used."""
        llama = self._model()
        if not texts:
            raise InvalidRequest("an embedding request needs at least one input")
        total = 0
        for i, text in enumerate(texts):
            n = self.count_tokens(text)
            if n == 0:
                raise InvalidRequest(f"input[{i}] is empty: it has no tokens to embed")
            if n > self.max_tokens:
                raise ContextTooLong(
                    f"input[{i}] has {n} tokens; this embedding model takes at most "
                    f"{self.max_tokens} per input"
                )
            total += n
        vectors = llama.embed(texts, normalize=False, truncate=False)
        return [normalize(list(map(float, v))) for v in vectors], total

    def close(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    def _model(self) -> llama_cpp.Llama:
        if self._llama is None:
            raise InternalError("GGUFEmbedder used before load() or after close()")
        return self._llama
